//! The one error type of the TCP layer, and the protocol's error codes.
//!
//! [`TcpError`] is everything a peer can get wrong in the bytes it sends; [`TcpError::code`] is the single
//! place that decides which [`ErrorCode`] it is told, and [`ErrorCode::closes_connection`] the single place
//! that decides whether the stream is still trusted. Handlers never pick codes themselves.
//!
//! Codes 1–4 come from the framing ([`crate::tcp::decoder`]): after one, the position of the next frame
//! is unknown (or the bytes are corrupt), so the server sends ERROR and closes. Codes 5 and 6 come from a
//! frame that was whole and intact but whose command is unknown or whose body is malformed: the frame is
//! consumed and the next one decodes normally. Codes 7–12 are the server's policy and never produced here.

/// An error code carried by an ERROR frame (u16 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const BAD_MAGIC: ErrorCode = ErrorCode(1);
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(2);
    pub const CRC_MISMATCH: ErrorCode = ErrorCode(3);
    pub const BODY_TOO_LARGE: ErrorCode = ErrorCode(4);
    pub const UNKNOWN_COMMAND: ErrorCode = ErrorCode(5);
    pub const MALFORMED_BODY: ErrorCode = ErrorCode(6);
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(7);
    pub const PERMISSION_DENIED: ErrorCode = ErrorCode(8);
    pub const RATE_LIMITED: ErrorCode = ErrorCode(9);
    /// Any command but CONNECT or PING before CONNECT.
    pub const NOT_CONNECTED: ErrorCode = ErrorCode(10);
    /// The peer did not answer a PING in time.
    pub const PING_TIMEOUT: ErrorCode = ErrorCode(11);
    /// The server turned the connection away as it was accepted (full, or over its memory watermark):
    /// try again later. Sent before anything else, then the connection is closed.
    pub const UNAVAILABLE: ErrorCode = ErrorCode(12);

    /// Every code of protocol version 1, in order.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BAD_MAGIC,
        ErrorCode::UNSUPPORTED_VERSION,
        ErrorCode::CRC_MISMATCH,
        ErrorCode::BODY_TOO_LARGE,
        ErrorCode::UNKNOWN_COMMAND,
        ErrorCode::MALFORMED_BODY,
        ErrorCode::UNAUTHORIZED,
        ErrorCode::PERMISSION_DENIED,
        ErrorCode::RATE_LIMITED,
        ErrorCode::NOT_CONNECTED,
        ErrorCode::PING_TIMEOUT,
        ErrorCode::UNAVAILABLE,
    ];

    /// Whether the server closes the connection after sending this ERROR: 1–4 (the stream can no longer be
    /// trusted), 11 (the peer stopped answering) and 12 (the server turned the connection away). 5–10
    /// leave it open (a 9 sent at accept, for the connect rate, is followed by a close all the same:
    /// docs/tcp-protocol.md). Unknown codes leave it open.
    pub fn closes_connection(self) -> bool {
        matches!(self.0, 1..=4 | 11 | 12)
    }

    /// The text the server puts in the ERROR frame's message, for the codes of version 1.
    pub fn message(self) -> &'static str {
        match self.0 {
            1 => "bad magic",
            2 => "unsupported version",
            3 => "crc mismatch",
            4 => "body too large",
            5 => "unknown command",
            6 => "malformed body",
            7 => "unauthorized",
            8 => "permission denied",
            9 => "rate limited",
            10 => "not connected",
            11 => "ping timeout",
            12 => "server unavailable",
            _ => "error",
        }
    }
}

/// What exactly is wrong with a malformed body (all of it is code 6; the detail is for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("text field is not valid UTF-8")]
    InvalidUtf8,
    #[error("body shorter than its fixed fields")]
    ShortBody,
    #[error("channel length runs past the end of the body")]
    ChannelPastEnd,
    #[error("bytes after the last field")]
    TrailingBytes,
    #[error("ping or pong body longer than 125 bytes")]
    PingTooLong,
}

/// A violation of the TCP protocol by the peer, or the configured body limit it exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    #[error("bad magic (frames start with 0x42 0x4D)")]
    BadMagic,
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("CRC mismatch: header says {declared:#010x}, frame hashes to {computed:#010x}")]
    CrcMismatch { declared: u32, computed: u32 },
    #[error("body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge { len: u32, max: u32 },
    #[error("unknown command {0:#06x}")]
    UnknownCommand(u16),
    #[error("malformed body: {0}")]
    MalformedBody(Malformed),
}

impl TcpError {
    /// The error code the peer is told (the ERROR frame's code).
    pub fn code(self) -> ErrorCode {
        match self {
            TcpError::BadMagic => ErrorCode::BAD_MAGIC,
            TcpError::UnsupportedVersion(_) => ErrorCode::UNSUPPORTED_VERSION,
            TcpError::CrcMismatch { .. } => ErrorCode::CRC_MISMATCH,
            TcpError::BodyTooLarge { .. } => ErrorCode::BODY_TOO_LARGE,
            TcpError::UnknownCommand(_) => ErrorCode::UNKNOWN_COMMAND,
            TcpError::MalformedBody(_) => ErrorCode::MALFORMED_BODY,
        }
    }

    /// Whether the stream can no longer be trusted: send ERROR, then close. A non-fatal error concerned
    /// one whole frame, which is consumed; decoding continues with the next.
    pub fn is_fatal(self) -> bool {
        self.code().closes_connection()
    }

    /// A short, stable label for metrics and logs (`reason` label values).
    pub fn label(self) -> &'static str {
        match self {
            TcpError::BadMagic => "bad_magic",
            TcpError::UnsupportedVersion(_) => "unsupported_version",
            TcpError::CrcMismatch { .. } => "crc_mismatch",
            TcpError::BodyTooLarge { .. } => "body_too_large",
            TcpError::UnknownCommand(_) => "unknown_command",
            TcpError::MalformedBody(Malformed::InvalidUtf8) => "malformed_body_utf8",
            TcpError::MalformedBody(Malformed::ShortBody) => "malformed_body_short",
            TcpError::MalformedBody(Malformed::ChannelPastEnd) => "malformed_body_channel_length",
            TcpError::MalformedBody(Malformed::TrailingBytes) => "malformed_body_trailing",
            TcpError::MalformedBody(Malformed::PingTooLong) => "malformed_body_ping_too_long",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_1_to_4_11_and_12_close_the_connection_5_to_10_do_not() {
        for code in ErrorCode::ALL {
            assert_eq!(code.closes_connection(), matches!(code.0, 1..=4 | 11 | 12), "code {}", code.0);
        }
        assert_eq!(ErrorCode::ALL.map(|c| c.0), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn each_error_maps_to_its_issue_code() {
        let cases = [
            (TcpError::BadMagic, 1, true),
            (TcpError::UnsupportedVersion(2), 2, true),
            (TcpError::CrcMismatch { declared: 1, computed: 2 }, 3, true),
            (TcpError::BodyTooLarge { len: 2, max: 1 }, 4, true),
            (TcpError::UnknownCommand(0x7777), 5, false),
            (TcpError::MalformedBody(Malformed::InvalidUtf8), 6, false),
            (TcpError::MalformedBody(Malformed::ShortBody), 6, false),
            (TcpError::MalformedBody(Malformed::ChannelPastEnd), 6, false),
            (TcpError::MalformedBody(Malformed::TrailingBytes), 6, false),
            (TcpError::MalformedBody(Malformed::PingTooLong), 6, false),
        ];
        for (e, code, fatal) in cases {
            assert_eq!(e.code(), ErrorCode(code), "{e}");
            assert_eq!(e.is_fatal(), fatal, "{e}");
            assert!(!e.label().is_empty());
        }
    }
}
