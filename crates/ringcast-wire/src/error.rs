//! The one error type of the wire layer.
//!
//! Every way a peer can break RFC 6455 is a variant here, and [`WireError::close_code`] is the single
//! place that decides which close code the peer is told. Handlers never pick close codes themselves.

use crate::close::CloseCode;

/// A violation of the WebSocket protocol by the peer, or a configured limit it exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("client frame is not masked")]
    UnmaskedFrame,
    #[error("server frame is masked")]
    MaskedFrame,
    #[error("64-bit payload length with its most significant bit set")]
    LengthTopBit,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("fragmented control frame")]
    ControlFragmented,
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame payload of one byte")]
    CloseOneByte,
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    #[error("frame payload exceeds the limit")]
    FrameTooLarge,
    #[error("message exceeds the size limit")]
    MessageTooLarge,
    #[error("RSV1 (compressed) on a control or continuation frame")]
    MisplacedRsv1,
    #[error("compressed payload is not a valid deflate stream")]
    InflateFailed,
}

impl WireError {
    /// The close code RFC 6455 §7.4.1 prescribes for this failure.
    pub fn close_code(self) -> CloseCode {
        match self {
            WireError::InvalidUtf8 | WireError::InvalidCloseReason => CloseCode::INVALID_PAYLOAD,
            WireError::FrameTooLarge | WireError::MessageTooLarge => CloseCode::TOO_BIG,
            WireError::ReservedBits
            | WireError::UnknownOpcode(_)
            | WireError::UnmaskedFrame
            | WireError::MaskedFrame
            | WireError::LengthTopBit
            | WireError::ControlTooLong
            | WireError::ControlFragmented
            | WireError::UnexpectedContinuation
            | WireError::ExpectedContinuation
            | WireError::CloseOneByte
            | WireError::InvalidCloseCode(_)
            // The extension's framing of the message is broken, not its content (see `deflate`).
            | WireError::MisplacedRsv1
            | WireError::InflateFailed => CloseCode::PROTOCOL_ERROR,
        }
    }

    /// A short, stable label for metrics and logs (`reason` label values).
    pub fn label(self) -> &'static str {
        match self {
            WireError::ReservedBits => "reserved_bits",
            WireError::UnknownOpcode(_) => "unknown_opcode",
            WireError::UnmaskedFrame => "unmasked_frame",
            WireError::MaskedFrame => "masked_frame",
            WireError::LengthTopBit => "length_top_bit",
            WireError::ControlTooLong => "control_too_long",
            WireError::ControlFragmented => "control_fragmented",
            WireError::UnexpectedContinuation => "unexpected_continuation",
            WireError::ExpectedContinuation => "expected_continuation",
            WireError::InvalidUtf8 => "invalid_utf8",
            WireError::CloseOneByte => "close_one_byte",
            WireError::InvalidCloseCode(_) => "invalid_close_code",
            WireError::InvalidCloseReason => "invalid_close_reason",
            WireError::FrameTooLarge => "frame_too_large",
            WireError::MessageTooLarge => "message_too_large",
            WireError::MisplacedRsv1 => "misplaced_rsv1",
            WireError::InflateFailed => "inflate_failed",
        }
    }
}
