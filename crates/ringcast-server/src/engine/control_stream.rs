//! Control messages under `broker = "nats"` kept in a JetStream stream, so a node whose connection to
//! NATS was down applies those it missed once it is back: what Redis's control log (`P:control:log`,
//! [`super::redis`]) gives a Redis cluster.
//!
//! # The stream
//! `{prefix}_control` (the prefix's characters a stream name cannot hold as `_`), one subject,
//! `P.control.log`, file storage, at most [`super::CONTROL_LOG_MAX`] messages and each kept at most
//! [`super::CONTROL_LOG_TTL`] (discard old). Every control message but the nodes' announcements is
//! published there (JSON, as on core NATS), and the publish answers only once the server stored it (the
//! PubAck). Nothing else carries them: every node, the sender included, receives them from the stream.
//! Announcements (`Control::Node`, every 3 s, each replacing the last) stay on core `P.control`.
//!
//! # Reading it
//! Each node reads the stream with one ordered push consumer (async-nats's: one client-side consumer
//! that the client recreates, after a reconnect, a gap or missed heartbeats, from the stream sequence
//! after the last one it delivered). The stream's sequences are the order every node applies the
//! messages in, and they are contiguous: the server numbers each stored message one above the last,
//! and only the limits above remove messages (from the oldest). So a node keeps the sequence of the last
//! message it applied ([`Cursor`]) and:
//! * skips a sequence at or below it (a consumer recreated from an older point delivers it again);
//! * applies the next one; a sequence more than one above it means the messages between were removed
//!   before this node read them (the stream was trimmed past what it had applied): it is applied, and
//!   the gap is counted (`ringcast_control_log_gaps_total`) and logged, not hidden.
//!
//! A node starts at the stream's last sequence (nothing older is applied: `$`, as with Redis). Its
//! consumer starts *at* that sequence, not after it: the first message delivered is then the one the
//! node already counts as applied (skipped), and the client knows a sequence to recreate from. A consumer
//! that delivered nothing yet is recreated by the client from the stream's first message; the node
//! skips what is older than its start, so that is correct too, only slower.
//!
//! # What it refuses
//! Without JetStream on the server (the stream cannot be made: nobody answers the JetStream API), the
//! node logs a warning and control messages travel over core NATS as before: at most once, lost by a
//! node whose connection is down. Any other failure to make the stream stops the node at start.
//! A NATS server restarted without its JetStream store has lost the stream: logged control messages then
//! answer error 100 until the nodes are restarted (as history does).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, context, stream};
use bytes::Bytes;

use super::jetstream::unavailable;
use super::{EngineError, CONTROL_LOG_MAX, CONTROL_LOG_TTL};

/// The control stream's name for `prefix`.
pub fn stream_name(prefix: &str) -> String {
    format!("{}_control", super::jetstream::stream_name_part(prefix))
}

/// The subject logged control messages are published on.
pub fn subject(prefix: &str) -> String {
    format!("{prefix}.control.log")
}

/// The control stream of one NATS connection.
#[derive(Clone)]
pub struct ControlStream {
    context: jetstream::Context,
    stream: stream::Stream<()>,
    subject: String,
}

impl std::fmt::Debug for ControlStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlStream").field("subject", &self.subject).finish_non_exhaustive()
    }
}

impl ControlStream {
    /// Creates the stream or updates its limits; `Ok(None)` when the server has no JetStream.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Option<ControlStream>, String> {
        let mut context = jetstream::new(client);
        context.set_timeout(timeout);
        let name = stream_name(prefix);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subject(prefix)],
            max_messages: i64::try_from(CONTROL_LOG_MAX).unwrap_or(i64::MAX),
            max_age: CONTROL_LOG_TTL,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        match context.create_or_update_stream(config).await {
            Ok(_) => {}
            Err(e) if e.kind() == context::CreateStreamErrorKind::JetStreamUnavailable => return Ok(None),
            Err(e) => return Err(format!("nats: control stream {name}: {e}")),
        }
        let stream =
            context.get_stream_no_info(&name).await.map_err(|e| format!("nats: control stream {name}: {e}"))?;
        Ok(Some(ControlStream { context, stream, subject: subject(prefix) }))
    }

    /// The sequence of the last message ever stored (0 for none).
    pub async fn last_sequence(&self) -> Result<u64, EngineError> {
        let info = self.stream.get_info().await.map_err(unavailable("control_info"))?;
        Ok(info.state.last_sequence)
    }

    /// Stores a control message; `Ok` once the server has. `Unavailable` when it certainly was not
    /// (the client did not take it, or no stream answered); `Lost` when it may have been.
    pub async fn append(&self, payload: Bytes) -> Result<(), EngineError> {
        let ack = self.context.publish(self.subject.clone(), payload).await.map_err(unavailable("control_publish"))?;
        match ack.await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == context::PublishErrorKind::StreamNotFound => Err(EngineError::Unavailable),
            Err(e) if e.kind() == context::PublishErrorKind::TimedOut => Err(EngineError::Timeout),
            Err(e) => {
                tracing::debug!(error = %e, "nats: control publish unacknowledged");
                Err(EngineError::Lost)
            }
        }
    }

    /// This node's consumer, from sequence `from` (see the module docs for why not after it).
    pub async fn follow(&self, from: u64) -> Result<consumer::push::Ordered, EngineError> {
        let config = consumer::push::OrderedConfig {
            deliver_subject: self.context.client().new_inbox(),
            filter_subject: self.subject.clone(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
            ..Default::default()
        };
        let consumer = self.stream.create_consumer(config).await.map_err(unavailable("control_follow"))?;
        consumer.messages().await.map_err(unavailable("control_follow"))
    }
}

/// Where a node is in the control stream: the sequence of the last message it applied (or, at start,
/// the stream's last one, which it counts as applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(u64);

/// What a node does with the message at a stream sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// At or below the last applied: already applied (or older than the node's start).
    Skip,
    /// The next one.
    Apply,
    /// Applied, but the messages between the last applied and this one were removed unread.
    ApplyAfterGap,
}

impl Cursor {
    pub fn at(last: u64) -> Cursor {
        Cursor(last)
    }

    pub fn last(self) -> u64 {
        self.0
    }

    /// Moves past `seq` if it is new.
    pub fn step(&mut self, seq: u64) -> Step {
        if seq <= self.0 {
            return Step::Skip;
        }
        let gap = seq > self.0 + 1;
        self.0 = seq;
        if gap {
            Step::ApplyAfterGap
        } else {
            Step::Apply
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sequence_is_applied_once_in_order_and_a_trimmed_stretch_is_a_gap() {
        // Started at the stream's last sequence, 7: the consumer delivers 7 first (already counted).
        let mut c = Cursor::at(7);
        assert_eq!(c.step(7), Step::Skip);
        assert_eq!((c.step(8), c.step(9)), (Step::Apply, Step::Apply));
        // A consumer recreated from an older point delivers 8 and 9 again.
        assert_eq!((c.step(8), c.step(9)), (Step::Skip, Step::Skip));
        // 10..=14 were removed by the limits before this node read them.
        assert_eq!(c.step(15), Step::ApplyAfterGap);
        assert_eq!((c.step(16), c.last()), (Step::Apply, 16));
        // An empty stream: the first message ever is 1.
        assert_eq!(Cursor::at(0).step(1), Step::Apply);
    }

    #[test]
    fn the_control_stream_and_subject_are_the_prefix_s_own() {
        assert_eq!(stream_name("ringcast"), "ringcast_control");
        assert_eq!(stream_name("app.ringcast"), "app_ringcast_control");
        assert_eq!(subject("app.ringcast"), "app.ringcast.control.log");
    }
}
