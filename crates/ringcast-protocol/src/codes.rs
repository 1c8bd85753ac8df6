//! Reply error codes and disconnect codes of the client protocol, with the exact messages Centrifugo sends.
//!
//! SDKs branch on the numbers, and people grep logs and dashboards for the strings, so both are fixed here
//! once and never spelled out by handlers. Application-defined reply errors use codes 400–1999;
//! application-defined disconnects use 4000–4999.
//!
//! Whether a client reconnects after a disconnect is decided by the code alone ([`reconnect`]); the
//! `reconnect` flag of the [`Disconnect`](crate::messages::Disconnect) message is a protocol v1 leftover.

use crate::messages;

/// A reply error: code, message, and whether retrying the same command may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode {
    pub code: u32,
    pub message: &'static str,
    /// The SDKs retry temporary errors (e.g. a subscribe) instead of failing.
    pub temporary: bool,
}

impl ErrorCode {
    const fn new(code: u32, message: &'static str) -> ErrorCode {
        ErrorCode { code, message, temporary: false }
    }

    pub const INTERNAL: ErrorCode = ErrorCode { code: 100, message: "internal server error", temporary: true };
    pub const UNAUTHORIZED: ErrorCode = ErrorCode::new(101, "unauthorized");
    pub const UNKNOWN_CHANNEL: ErrorCode = ErrorCode::new(102, "unknown channel");
    pub const PERMISSION_DENIED: ErrorCode = ErrorCode::new(103, "permission denied");
    pub const METHOD_NOT_FOUND: ErrorCode = ErrorCode::new(104, "method not found");
    pub const ALREADY_SUBSCRIBED: ErrorCode = ErrorCode::new(105, "already subscribed");
    pub const LIMIT_EXCEEDED: ErrorCode = ErrorCode::new(106, "limit exceeded");
    pub const BAD_REQUEST: ErrorCode = ErrorCode::new(107, "bad request");
    pub const NOT_AVAILABLE: ErrorCode = ErrorCode::new(108, "not available");
    pub const TOKEN_EXPIRED: ErrorCode = ErrorCode::new(109, "token expired");
    pub const EXPIRED: ErrorCode = ErrorCode::new(110, "expired");
    pub const TOO_MANY_REQUESTS: ErrorCode = ErrorCode { code: 111, message: "too many requests", temporary: true };
    pub const UNRECOVERABLE_POSITION: ErrorCode = ErrorCode::new(112, "unrecoverable position");
    pub const TOKEN_REVOKED: ErrorCode = ErrorCode::new(113, "token revoked");

    /// Every built-in error, in code order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::INTERNAL,
        ErrorCode::UNAUTHORIZED,
        ErrorCode::UNKNOWN_CHANNEL,
        ErrorCode::PERMISSION_DENIED,
        ErrorCode::METHOD_NOT_FOUND,
        ErrorCode::ALREADY_SUBSCRIBED,
        ErrorCode::LIMIT_EXCEEDED,
        ErrorCode::BAD_REQUEST,
        ErrorCode::NOT_AVAILABLE,
        ErrorCode::TOKEN_EXPIRED,
        ErrorCode::EXPIRED,
        ErrorCode::TOO_MANY_REQUESTS,
        ErrorCode::UNRECOVERABLE_POSITION,
        ErrorCode::TOKEN_REVOKED,
    ];

    /// The built-in error with this code, if any.
    pub fn from_code(code: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|e| e.code == code)
    }

    /// The protocol message for a reply.
    pub fn to_message(self) -> messages::Error {
        messages::Error { code: self.code, message: self.message.to_owned(), temporary: self.temporary }
    }
}

impl From<ErrorCode> for messages::Error {
    fn from(code: ErrorCode) -> messages::Error {
        code.to_message()
    }
}

/// A disconnect: the WebSocket close code and its reason text (kept under the 123-byte close reason limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DisconnectCode {
    pub code: u16,
    pub reason: &'static str,
}

impl DisconnectCode {
    const fn new(code: u16, reason: &'static str) -> DisconnectCode {
        DisconnectCode { code, reason }
    }

    // Reconnect: the client comes back on its own (with backoff).
    pub const CONNECTION_CLOSED: DisconnectCode = DisconnectCode::new(3000, "connection closed");
    pub const SHUTDOWN: DisconnectCode = DisconnectCode::new(3001, "shutdown");
    pub const SERVER_ERROR: DisconnectCode = DisconnectCode::new(3004, "internal server error");
    pub const EXPIRED: DisconnectCode = DisconnectCode::new(3005, "connection expired");
    pub const SUB_EXPIRED: DisconnectCode = DisconnectCode::new(3006, "subscription expired");
    pub const SLOW: DisconnectCode = DisconnectCode::new(3008, "slow");
    pub const WRITE_ERROR: DisconnectCode = DisconnectCode::new(3009, "write error");
    pub const INSUFFICIENT_STATE: DisconnectCode = DisconnectCode::new(3010, "insufficient state");
    pub const FORCE_RECONNECT: DisconnectCode = DisconnectCode::new(3011, "force reconnect");
    pub const NO_PONG: DisconnectCode = DisconnectCode::new(3012, "no pong");
    /// Centrifugo's `DisconnectTooManyRequests`: a client that kept sending over its command rate.
    pub const TOO_MANY_REQUESTS: DisconnectCode = DisconnectCode::new(3013, "too many requests");

    // Terminal: the client stays disconnected.
    pub const INVALID_TOKEN: DisconnectCode = DisconnectCode::new(3500, "invalid token");
    pub const BAD_REQUEST: DisconnectCode = DisconnectCode::new(3501, "bad request");
    pub const STALE: DisconnectCode = DisconnectCode::new(3502, "stale");
    pub const FORCE_DISCONNECT: DisconnectCode = DisconnectCode::new(3503, "force disconnect");
    pub const CONNECTION_LIMIT: DisconnectCode = DisconnectCode::new(3504, "connection limit");
    pub const CHANNEL_LIMIT: DisconnectCode = DisconnectCode::new(3505, "channel limit");

    /// Every built-in disconnect, in code order.
    pub const ALL: [DisconnectCode; 17] = [
        DisconnectCode::CONNECTION_CLOSED,
        DisconnectCode::SHUTDOWN,
        DisconnectCode::SERVER_ERROR,
        DisconnectCode::EXPIRED,
        DisconnectCode::SUB_EXPIRED,
        DisconnectCode::SLOW,
        DisconnectCode::WRITE_ERROR,
        DisconnectCode::INSUFFICIENT_STATE,
        DisconnectCode::FORCE_RECONNECT,
        DisconnectCode::NO_PONG,
        DisconnectCode::TOO_MANY_REQUESTS,
        DisconnectCode::INVALID_TOKEN,
        DisconnectCode::BAD_REQUEST,
        DisconnectCode::STALE,
        DisconnectCode::FORCE_DISCONNECT,
        DisconnectCode::CONNECTION_LIMIT,
        DisconnectCode::CHANNEL_LIMIT,
    ];

    /// Whether the client will reconnect after this disconnect.
    pub fn reconnect(self) -> bool {
        reconnect(self.code)
    }

    /// The `Disconnect` push for transports that cannot carry a close code.
    pub fn to_message(self) -> messages::Disconnect {
        messages::Disconnect { code: u32::from(self.code), reason: self.reason.to_owned(), reconnect: self.reconnect() }
    }
}

/// Whether a client reconnects after being disconnected with `code`: terminal are 3500–3999 and 4500–4999,
/// everything else (3000–3499, 4000–4499, ≥ 5000, and transport codes below 3000) reconnects.
pub fn reconnect(code: u16) -> bool {
    !matches!(code, 3500..=3999 | 4500..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_only_for_internal_and_too_many_requests() {
        let temporary: Vec<u32> = ErrorCode::ALL.iter().filter(|e| e.temporary).map(|e| e.code).collect();
        assert_eq!(temporary, [100, 111]);
    }

    #[test]
    fn error_codes_are_100_to_113_in_order() {
        let codes: Vec<u32> = ErrorCode::ALL.iter().map(|e| e.code).collect();
        assert_eq!(codes, (100..=113).collect::<Vec<_>>());
        assert_eq!(ErrorCode::from_code(103), Some(ErrorCode::PERMISSION_DENIED));
        assert_eq!(ErrorCode::from_code(99), None);
    }

    #[test]
    fn error_messages_match_centrifugo() {
        let expected = [
            (100, "internal server error"),
            (101, "unauthorized"),
            (102, "unknown channel"),
            (103, "permission denied"),
            (104, "method not found"),
            (105, "already subscribed"),
            (106, "limit exceeded"),
            (107, "bad request"),
            (108, "not available"),
            (109, "token expired"),
            (110, "expired"),
            (111, "too many requests"),
            (112, "unrecoverable position"),
            (113, "token revoked"),
        ];
        for (code, message) in expected {
            assert_eq!(ErrorCode::from_code(code).map(|e| e.message), Some(message));
        }
    }

    #[test]
    fn reconnect_codes_3000_to_3013_reconnect() {
        for d in &ByRange::RECONNECT {
            assert!(d.reconnect(), "{d:?}");
            assert!((3000..=3013).contains(&d.code));
        }
    }

    #[test]
    fn terminal_codes_3500_to_3505_do_not_reconnect() {
        for d in &ByRange::TERMINAL {
            assert!(!d.reconnect(), "{d:?}");
            assert!((3500..=3505).contains(&d.code));
        }
    }

    /// The split of [`DisconnectCode::ALL`] by the documented ranges.
    struct ByRange;
    impl ByRange {
        const RECONNECT: [DisconnectCode; 11] = [
            DisconnectCode::CONNECTION_CLOSED,
            DisconnectCode::SHUTDOWN,
            DisconnectCode::SERVER_ERROR,
            DisconnectCode::EXPIRED,
            DisconnectCode::SUB_EXPIRED,
            DisconnectCode::SLOW,
            DisconnectCode::WRITE_ERROR,
            DisconnectCode::INSUFFICIENT_STATE,
            DisconnectCode::FORCE_RECONNECT,
            DisconnectCode::NO_PONG,
            DisconnectCode::TOO_MANY_REQUESTS,
        ];
        const TERMINAL: [DisconnectCode; 6] = [
            DisconnectCode::INVALID_TOKEN,
            DisconnectCode::BAD_REQUEST,
            DisconnectCode::STALE,
            DisconnectCode::FORCE_DISCONNECT,
            DisconnectCode::CONNECTION_LIMIT,
            DisconnectCode::CHANNEL_LIMIT,
        ];
    }

    #[test]
    fn reconnect_follows_the_ranges() {
        for (code, expected) in [
            (1000, true),
            (2999, true),
            (3000, true),
            (3499, true),
            (3500, false),
            (3999, false),
            (4000, true),
            (4499, true),
            (4500, false),
            (4999, false),
            (5000, true),
            (u16::MAX, true),
        ] {
            assert_eq!(reconnect(code), expected, "code {code}");
        }
    }

    #[test]
    fn disconnect_reasons_match_centrifugo_and_fit_a_close_frame() {
        let expected = [
            (3000, "connection closed"),
            (3001, "shutdown"),
            (3004, "internal server error"),
            (3005, "connection expired"),
            (3006, "subscription expired"),
            (3008, "slow"),
            (3009, "write error"),
            (3010, "insufficient state"),
            (3011, "force reconnect"),
            (3012, "no pong"),
            (3013, "too many requests"),
            (3500, "invalid token"),
            (3501, "bad request"),
            (3502, "stale"),
            (3503, "force disconnect"),
            (3504, "connection limit"),
            (3505, "channel limit"),
        ];
        let all: Vec<(u16, &str)> = DisconnectCode::ALL.iter().map(|d| (d.code, d.reason)).collect();
        assert_eq!(all, expected);
        assert!(DisconnectCode::ALL.iter().all(|d| d.reason.len() <= 123));
    }

    #[test]
    fn disconnect_message_carries_the_reconnect_flag() {
        let m = DisconnectCode::BAD_REQUEST.to_message();
        assert_eq!((m.code, m.reason.as_str(), m.reconnect), (3501, "bad request", false));
        assert!(DisconnectCode::SHUTDOWN.to_message().reconnect);
    }
}
