//! History under `broker = "nats"`: one JetStream stream holds every history channel's publications,
//! numbered per channel (contiguous offsets, one epoch) by the nodes themselves.
//!
//! # The stream
//! `{prefix}_history` (the prefix with every byte a stream name cannot hold as `_`), subjects
//! `P.h.>`; channel C's publications are stored on `P.h.T`, `T` = [`super::nats::escape`]`(C)`.
//! `max_msgs_per_subject` is the largest `history_size` of any namespace (a read keeps the namespace's
//! own size), `max_age` the largest `history_meta_ttl`: a channel's newest message is what carries its
//! offset and epoch, so it must outlive `history_ttl` (applied at read time, by the messages' stored
//! time) and go only when the channel was forgotten for `history_meta_ttl` — the next publication
//! then starts a new epoch, as with Redis when the meta hash expires.
//!
//! # Append (contiguous offsets without a counter)
//! Read the subject's last message (`STREAM.MSG.GET` last-by-subject: seq `s`, headers offset `n` and
//! epoch `e`); publish with headers `n + 1`, `e` and `Nats-Expected-Last-Subject-Sequence: s` (`0` and
//! a fresh epoch for an empty subject). The server compares the subject's last sequence with `s` and
//! stores in one step under the stream's lock (nats-server `processJetStreamMsg`; for a single server
//! `0` means "the subject holds nothing"), so of two nodes that read the same last message only one
//! is stored; the other gets "wrong last sequence" (error 10071) and reads again. The PubAck means the
//! offset is final; only then does the publish reply carry it. A bounded number of conflicts in a row
//! answers error 100 (the publication was not stored; the client may retry).
//!
//! # Markers
//! A message with the `Ringcast-Marker` header is not a publication: it carries a position only. One is
//! written (expecting an empty subject) when a channel without messages is read, so that the epoch
//! subscribers learn is the one the first publication continues; and one by `remove_history` (then the
//! subject is purged down to it), so the offset survives the removal. Reads and live delivery skip them.

use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use ringcast_protocol::messages::Publication;

use super::EngineError;

pub const OFFSET_HEADER: &str = "Ringcast-Offset";
pub const EPOCH_HEADER: &str = "Ringcast-Epoch";
pub const MARKER_HEADER: &str = "Ringcast-Marker";

/// Conflicts ("wrong last sequence") an append retries before it answers error 100. Each conflict
/// means another publication of the channel was stored meanwhile, so a publisher loses this many
/// rounds in a row only under that many concurrent publishers of one channel.
pub const APPEND_ATTEMPTS: usize = 64;

/// The stream's limits, from every namespace with history (`None` when none has any: JetStream is not
/// used and need not be enabled on the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// The largest `history_size`.
    pub max_per_subject: usize,
    /// The largest effective `history_meta_ttl`.
    pub max_age: Duration,
}

/// A stored message's position as its headers carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
    /// A position only, not a publication.
    pub marker: bool,
}

/// The headers a stored message carries.
pub fn encode_position(pos: &Position) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(OFFSET_HEADER, pos.offset.to_string().as_str());
    headers.insert(EPOCH_HEADER, pos.epoch.as_str());
    if pos.marker {
        headers.insert(MARKER_HEADER, "1");
    }
    headers
}

/// The position in a stored message's headers; `None` for a message ringcast did not write.
pub fn decode_position(headers: Option<&HeaderMap>) -> Option<Position> {
    let headers = headers?;
    let offset = headers.get(OFFSET_HEADER)?.as_str().parse().ok()?;
    let epoch = headers.get(EPOCH_HEADER)?.as_str();
    if epoch.is_empty() {
        return None;
    }
    Some(Position { offset, epoch: epoch.to_string(), marker: headers.get(MARKER_HEADER).is_some() })
}

/// The stream's name: the prefix's bytes a stream name cannot hold (`.`, wildcards, path separators,
/// anything but ASCII letters, digits, `-` and `_`) as `_`.
pub fn stream_name(prefix: &str) -> String {
    format!("{}_history", stream_name_part(prefix))
}

/// The prefix as the first part of a stream name (this one's and [`super::control_stream`]'s).
pub(crate) fn stream_name_part(prefix: &str) -> String {
    prefix.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The last stored message of a subject.
#[derive(Debug, Clone)]
pub struct Last {
    pub seq: u64,
    pub pos: Position,
}

/// The history stream of one NATS connection.
#[derive(Clone)]
pub struct History {
    context: jetstream::Context,
    stream: stream::Stream<()>,
    name: String,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("stream", &self.name).finish_non_exhaustive()
    }
}

/// A failed JetStream call as the engine answers it (logged at debug with `op`).
pub(crate) fn unavailable<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> EngineError {
    move |e| {
        tracing::debug!(op, error = %e, "jetstream call failed");
        EngineError::Unavailable
    }
}

impl History {
    /// Creates the stream, or updates its limits to these (every node of a cluster should run the same
    /// namespaces: the last to start sets them).
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        limits: StreamLimits,
        timeout: Duration,
    ) -> Result<History, String> {
        let mut context = jetstream::new(client);
        context.set_timeout(timeout);
        let name = stream_name(prefix);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.h.>")],
            max_messages_per_subject: i64::try_from(limits.max_per_subject).unwrap_or(i64::MAX),
            max_age: limits.max_age,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        context.create_or_update_stream(config).await.map_err(|e| format!("nats: history stream {name}: {e}"))?;
        let stream =
            context.get_stream_no_info(&name).await.map_err(|e| format!("nats: history stream {name}: {e}"))?;
        Ok(History { context, stream, name })
    }

    /// The subject's last message (`None` when it holds none).
    pub async fn last(&self, subject: &str) -> Result<Option<Last>, EngineError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(decode_position(Some(&m.headers)).map(|pos| Last { seq: m.sequence, pos })),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("history_last")(e)),
        }
    }

    /// Stores `payload` with `pos` if the subject's last message is still `expect` (0: none). `Ok(None)`
    /// when another message was stored meanwhile.
    async fn put(
        &self,
        subject: &str,
        pos: &Position,
        expect: u64,
        payload: Bytes,
    ) -> Result<Option<u64>, EngineError> {
        let mut headers = encode_position(pos);
        headers.insert("Nats-Expected-Last-Subject-Sequence", expect.to_string().as_str());
        let ack = self
            .context
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(unavailable("history_publish"))?;
        match ack.await {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                metrics::counter!("ringcast_engine_append_conflicts_total").increment(1);
                Ok(None)
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::TimedOut => Err(EngineError::Timeout),
            Err(e) => Err(unavailable("history_publish")(e)),
        }
    }

    /// Appends a publication: the next offset of the channel, in its epoch (a fresh one for an empty
    /// subject). See the module docs for why two appends never get the same offset.
    pub async fn append(&self, subject: &str, publication: &Publication) -> Result<Position, EngineError> {
        let payload = Bytes::from(publication.encode_to_vec());
        for _ in 0..APPEND_ATTEMPTS {
            let last = self.last(subject).await?;
            let (pos, expect) = match last {
                Some(l) => (Position { offset: l.pos.offset + 1, epoch: l.pos.epoch, marker: false }, l.seq),
                None => (Position { offset: 1, epoch: super::random_epoch(), marker: false }, 0),
            };
            if self.put(subject, &pos, expect, payload.clone()).await?.is_some() {
                return Ok(pos);
            }
        }
        tracing::warn!(subject, "nats: history append lost {APPEND_ATTEMPTS} races in a row");
        Err(EngineError::Unavailable)
    }

    /// The subject's position: its last message's, or, when it holds none, a marker's written now at
    /// offset 0 with a fresh epoch (or the one a concurrent writer stored first).
    pub async fn position(&self, subject: &str) -> Result<Last, EngineError> {
        for _ in 0..APPEND_ATTEMPTS {
            if let Some(last) = self.last(subject).await? {
                return Ok(last);
            }
            let pos = Position { offset: 0, epoch: super::random_epoch(), marker: true };
            if let Some(seq) = self.put(subject, &pos, 0, Bytes::new()).await? {
                return Ok(Last { seq, pos });
            }
        }
        Err(EngineError::Unavailable)
    }

    /// Every publication of the subject stored up to sequence `top` (and, with `ttl`, no older than it),
    /// oldest first, each with its offset; markers skipped. Read by an ephemeral pull consumer filtered
    /// on the subject, deleted afterwards.
    pub async fn read(&self, subject: &str, top: u64, ttl: Duration) -> Result<Vec<Publication>, EngineError> {
        let deliver_policy = match time::OffsetDateTime::now_utc().checked_sub(time_duration(ttl)) {
            Some(start_time) if !ttl.is_zero() => consumer::DeliverPolicy::ByStartTime { start_time },
            _ => consumer::DeliverPolicy::All,
        };
        let config = consumer::pull::Config {
            filter_subject: subject.to_string(),
            deliver_policy,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            ..Default::default()
        };
        let consumer = self.stream.create_consumer(config).await.map_err(unavailable("history_read"))?;
        let result = read_until(&consumer, top).await;
        let name = consumer.cached_info().name.clone();
        let stream = self.stream.clone();
        // Not waited for: the server drops it after `inactive_threshold` anyway.
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        result
    }

    /// Drops the subject's publications, keeping its offset and epoch: a marker with the last position
    /// is stored behind the last message, then the subject is purged down to its last message.
    pub async fn remove(&self, subject: &str) -> Result<(), EngineError> {
        for _ in 0..APPEND_ATTEMPTS {
            let Some(last) = self.last(subject).await? else { return Ok(()) };
            if !last.pos.marker {
                let pos = Position { marker: true, ..last.pos };
                if self.put(subject, &pos, last.seq, Bytes::new()).await?.is_none() {
                    continue;
                }
            }
            self.stream.purge().filter(subject).keep(1).await.map_err(unavailable("history_remove"))?;
            return Ok(());
        }
        Err(EngineError::Unavailable)
    }

    /// A live consumer of the subject for this node: ordered (the client recreates it from the last
    /// sequence it handed over when the server reports a gap or goes quiet), from sequence `start`.
    pub async fn follow(&self, subject: &str, start: u64) -> Result<consumer::push::Ordered, EngineError> {
        let config = consumer::push::OrderedConfig {
            deliver_subject: self.context.client().new_inbox(),
            filter_subject: subject.to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start.max(1) },
            ..Default::default()
        };
        let consumer = self.stream.create_consumer(config).await.map_err(unavailable("history_follow"))?;
        consumer.messages().await.map_err(unavailable("history_follow"))
    }
}

/// Deletes the streams of `prefix` on the NATS at `url`, history and control ([`super::control_stream`]),
/// those that exist (tests clean up with it).
pub async fn delete_stream(url: &str, prefix: &str) -> Result<(), String> {
    let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
    let context = jetstream::new(client);
    for name in [stream_name(prefix), super::control_stream::stream_name(prefix)] {
        match context.delete_stream(&name).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(j)
                if j.kind() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
            Err(e) => return Err(format!("{name}: {e}")),
        }
    }
    Ok(())
}

fn time_duration(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// Reads the consumer's messages in batches until sequence `top` (or nothing more comes).
async fn read_until(consumer: &consumer::PullConsumer, top: u64) -> Result<Vec<Publication>, EngineError> {
    let mut out = Vec::new();
    loop {
        let mut batch = consumer.fetch().max_messages(256).messages().await.map_err(unavailable("history_read"))?;
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(unavailable("history_read"))?;
            got += 1;
            let seq = m.info().map_err(unavailable("history_read"))?.stream_sequence;
            if seq > top {
                return Ok(out);
            }
            if let Some(p) = stored_publication(&m) {
                out.push(p);
            }
            if seq == top {
                return Ok(out);
            }
        }
        if got == 0 {
            return Ok(out);
        }
    }
}

/// The publication a stored message holds, with its offset; `None` for a marker or a message
/// ringcast did not write.
pub fn stored_publication(m: &async_nats::Message) -> Option<Publication> {
    let pos = decode_position(m.headers.as_ref())?;
    if pos.marker {
        return None;
    }
    let mut p = Publication::decode(m.payload.clone()).ok()?;
    p.offset = pos.offset;
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_survives_its_headers() {
        for pos in [
            Position { offset: 1, epoch: "beef".into(), marker: false },
            Position { offset: u64::MAX, epoch: "0a1b2c3d".into(), marker: false },
            Position { offset: 0, epoch: "e".into(), marker: true },
        ] {
            assert_eq!(decode_position(Some(&encode_position(&pos))), Some(pos));
        }
    }

    #[test]
    fn headers_ringcast_did_not_write_are_no_position() {
        assert_eq!(decode_position(None), None);
        let mut h = HeaderMap::new();
        assert_eq!(decode_position(Some(&h)), None);
        h.insert(OFFSET_HEADER, "x");
        h.insert(EPOCH_HEADER, "e");
        assert_eq!(decode_position(Some(&h)), None, "offset not a number");
        let mut h = HeaderMap::new();
        h.insert(OFFSET_HEADER, "3");
        assert_eq!(decode_position(Some(&h)), None, "no epoch");
        h.insert(EPOCH_HEADER, "");
        assert_eq!(decode_position(Some(&h)), None, "empty epoch");
    }

    #[test]
    fn a_stored_message_is_its_publication_at_its_offset() {
        let p = Publication { data: Bytes::from_static(b"{\"a\":1}"), ..Default::default() };
        let pos = Position { offset: 7, epoch: "ab".into(), marker: false };
        let m = async_nats::Message {
            subject: "p.h.c".into(),
            reply: None,
            payload: Bytes::from(p.encode_to_vec()),
            headers: Some(encode_position(&pos)),
            status: None,
            description: None,
            length: 0,
        };
        let got = stored_publication(&m).expect("a publication");
        assert_eq!((got.offset, got.data), (7, p.data));
        let marker = async_nats::Message { headers: Some(encode_position(&Position { marker: true, ..pos })), ..m };
        assert_eq!(stored_publication(&marker), None);
    }

    #[test]
    fn stream_names_hold_no_separator_or_wildcard() {
        assert_eq!(stream_name("ringcast"), "ringcast_history");
        assert_eq!(stream_name("app.ringcast"), "app_ringcast_history");
        assert_eq!(stream_name("a/b\\c>d*e"), "a_b_c_d_e_history");
    }
}
