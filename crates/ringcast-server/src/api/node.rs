//! The node as the HTTP API's backend: each API method mapped onto node operations.
//!
//! The API is trusted with every channel (it authenticated with the API key), so no client permission
//! checks apply here; namespaces still decide whether history and presence exist for a channel.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{
    ApiBackend, ApiError, ClientInfoJson, HistoryResultJson, InfoJson, PublicationJson, PublishOptions, PublishResult,
    StreamPosition,
};
use crate::broker::HistoryFilter;
use crate::engine::Control;
use crate::pubsub::node::Node;
use ringcast_protocol::messages::ClientInfo;
use ringcast_protocol::ErrorCode;

fn api_error(code: ErrorCode) -> ApiError {
    match code.code {
        102 => ApiError::UnknownChannel,
        106 => ApiError::LimitExceeded,
        107 => ApiError::BadRequest,
        108 => ApiError::NotAvailable,
        112 => ApiError::UnrecoverablePosition,
        _ => ApiError::Internal,
    }
}

fn info_json(info: ClientInfo) -> ClientInfoJson {
    let opt = |b: Bytes| (!b.is_empty()).then_some(b);
    ClientInfoJson {
        client: info.client,
        user: info.user,
        conn_info: opt(info.conn_info),
        chan_info: opt(info.chan_info),
    }
}

/// A glob with `*` (any run) and `?` (one character), as Centrifugo's channels pattern.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl ApiBackend for Node {
    fn degraded(&self) -> Option<String> {
        crate::engine::breaker::degraded(&self.remote.as_ref()?.breakers)
    }

    fn publish(&self, channel: &str, data: Bytes, skip_history: bool) -> Result<PublishResult, ApiError> {
        let (pos, _) = if skip_history {
            self.publish_without_history(channel, data)
        } else {
            Node::publish(self, channel, data, None)
        }
        .map_err(api_error)?;
        Ok(PublishResult { offset: pos.offset, epoch: pos.epoch.to_string() })
    }

    fn broadcast(&self, channels: &[String], data: Bytes, skip_history: bool) -> Vec<Result<PublishResult, ApiError>> {
        channels.iter().map(|c| ApiBackend::publish(self, c, data.clone(), skip_history)).collect()
    }

    /// Tags go with the publication; an idempotency key already seen on this channel within the window
    /// returns the first result and publishes nothing ([`crate::pubsub::idempotency`]).
    fn publish_with(&self, channel: &str, data: Bytes, opts: &PublishOptions) -> Result<PublishResult, ApiError> {
        let publish = || {
            self.publish_tagged(channel, data, opts.tags.clone(), opts.skip_history)
                .map(|(pos, _)| pos)
                .map_err(api_error)
        };
        let pos = if opts.idempotency_key.is_empty() {
            publish()?
        } else {
            let (pos, repeated) = self.idempotency.run(channel, &opts.idempotency_key, publish)?;
            if repeated {
                metrics::counter!("ringcast_api_idempotent_repeats_total").increment(1);
            }
            pos
        };
        Ok(PublishResult { offset: pos.offset, epoch: pos.epoch.to_string() })
    }

    fn subscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError> {
        self.options(channel).map_err(api_error)?;
        let control = Control::Subscribe { user: user.into(), client: client.map(Into::into), channel: channel.into() };
        self.control(control).map_err(api_error)
    }

    fn unsubscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError> {
        let control =
            Control::Unsubscribe { user: user.into(), client: client.map(Into::into), channel: channel.into() };
        self.control(control).map_err(api_error)
    }

    fn disconnect(&self, user: &str, code: u32, reason: &str, client: Option<&str>) -> Result<(), ApiError> {
        let code = u16::try_from(code).map_err(|_| ApiError::BadRequest)?;
        let control =
            Control::Disconnect { user: user.into(), client: client.map(Into::into), code, reason: reason.into() };
        self.control(control).map_err(api_error)
    }

    fn refresh(&self, user: &str, expire_at: Option<i64>, expired: bool, client: Option<&str>) -> Result<(), ApiError> {
        let control = Control::Refresh { user: user.into(), client: client.map(Into::into), expire_at, expired };
        self.control(control).map_err(api_error)
    }

    fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfoJson>, ApiError> {
        let p = Node::presence(self, channel).map_err(api_error)?;
        Ok(p.into_iter().map(|(k, v)| (k, info_json(v))).collect())
    }

    fn presence_stats(&self, channel: &str) -> Result<(u32, u32), ApiError> {
        Node::presence_stats(self, channel).map_err(api_error)
    }

    fn history(
        &self,
        channel: &str,
        limit: i32,
        since: Option<StreamPosition>,
        reverse: bool,
    ) -> Result<HistoryResultJson, ApiError> {
        let filter = HistoryFilter { since: since.map(|s| (s.offset, s.epoch)), limit, reverse };
        let (pubs, pos) = Node::history(self, channel, &filter).map_err(api_error)?;
        Ok(HistoryResultJson {
            publications: pubs
                .into_iter()
                .map(|p| PublicationJson { data: p.data, info: p.info.map(info_json), offset: p.offset, tags: p.tags })
                .collect(),
            offset: pos.offset,
            epoch: pos.epoch.to_string(),
        })
    }

    fn history_remove(&self, channel: &str) -> Result<(), ApiError> {
        self.options(channel).map_err(api_error)?;
        match &self.remote {
            Some(remote) => remote
                .resolve(remote.history.remove_history(channel))
                .map_err(|e| api_error(crate::engine::failed("history_remove", e).code())),
            None => {
                self.broker.remove_history(channel);
                Ok(())
            }
        }
    }

    fn channels(&self, pattern: Option<&str>) -> Result<BTreeMap<String, u32>, ApiError> {
        Ok(self
            .hub
            .channels()
            .into_iter()
            .filter(|(name, _)| pattern.is_none_or(|p| glob(p, name)))
            .map(|(name, n)| (name, n as u32))
            .collect())
    }

    /// This node, then every peer that announced itself recently ([`crate::pubsub::registry`]).
    fn info(&self) -> Result<InfoJson, ApiError> {
        let mut nodes = vec![self.stats()];
        nodes.extend(self.nodes.live(&self.uid, std::time::Instant::now()));
        Ok(InfoJson { nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn channel_patterns() {
        assert!(glob("*", "anything"));
        assert!(glob("news:*", "news:sport"));
        assert!(!glob("news:*", "chat:x"));
        assert!(glob("user?", "user1"));
        assert!(!glob("user?", "user12"));
        assert!(glob("a*b*c", "axxbyyc"));
    }
}
