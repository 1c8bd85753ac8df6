//! The error types of the protocol layer.
//!
//! [`ProtocolError`] is everything a client can get wrong in the bytes of a frame. The protocol gives all of
//! it one answer — disconnect with 3501 "bad request" — and [`ProtocolError::disconnect`] is the single place
//! that says so; handlers never pick a disconnect code for a malformed frame themselves. Semantic problems
//! with a well-formed command (unknown channel, permission denied) are not errors of this layer: they are
//! reply errors chosen by the server from [`crate::codes::ErrorCode`].
//!
//! [`EncodeError`] is the server's own mistake (a JSON `data` payload that is not JSON), never the peer's.

use crate::codes::DisconnectCode;

/// A malformed frame received from the peer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty frame")]
    EmptyFrame,
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("more than {limit} messages in one frame")]
    TooManyMessages { limit: usize },
    #[error("malformed JSON message: {0}")]
    Json(#[source] serde_json::Error),
    #[error("malformed length prefix")]
    BadVarint,
    #[error("length prefix says {declared} bytes, {available} remain in the frame")]
    Truncated { declared: u64, available: usize },
    #[error("malformed Protobuf message: {0}")]
    Protobuf(#[source] prost::DecodeError),
}

impl ProtocolError {
    /// How the connection is closed for this error: always 3501 "bad request", which is terminal.
    pub fn disconnect(&self) -> DisconnectCode {
        match self {
            ProtocolError::EmptyFrame
            | ProtocolError::FrameTooLarge { .. }
            | ProtocolError::TooManyMessages { .. }
            | ProtocolError::Json(_)
            | ProtocolError::BadVarint
            | ProtocolError::Truncated { .. }
            | ProtocolError::Protobuf(_) => DisconnectCode::BAD_REQUEST,
        }
    }

    /// A short, stable label for metrics and logs (`reason` label values).
    pub fn label(&self) -> &'static str {
        match self {
            ProtocolError::EmptyFrame => "empty_frame",
            ProtocolError::FrameTooLarge { .. } => "frame_too_large",
            ProtocolError::TooManyMessages { .. } => "too_many_messages",
            ProtocolError::Json(_) => "malformed_json",
            ProtocolError::BadVarint => "bad_varint",
            ProtocolError::Truncated { .. } => "truncated",
            ProtocolError::Protobuf(_) => "malformed_protobuf",
        }
    }
}

/// A message the server tried to encode cannot be put on the wire.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// In JSON mode a `data`-like field must hold exactly one JSON value.
    #[error("JSON encoding failed (is every data field valid JSON?): {0}")]
    Json(#[source] serde_json::Error),
    /// Only on a buffer that cannot grow; a `BytesMut` always can.
    #[error("Protobuf encoding failed: {0}")]
    Protobuf(#[source] prost::EncodeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_error_disconnects_with_3501_bad_request() {
        let json = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let proto = <crate::messages::Command as prost::Message>::decode(&[0x0a, 0x05][..]).unwrap_err();
        let all = [
            ProtocolError::EmptyFrame,
            ProtocolError::FrameTooLarge { len: 2, limit: 1 },
            ProtocolError::TooManyMessages { limit: 1 },
            ProtocolError::Json(json),
            ProtocolError::BadVarint,
            ProtocolError::Truncated { declared: 9, available: 1 },
            ProtocolError::Protobuf(proto),
        ];
        for e in &all {
            let d = e.disconnect();
            assert_eq!((d.code, d.reason), (3501, "bad request"), "{e}");
            assert!(!d.reconnect());
            assert!(!e.label().is_empty());
        }
    }
}
