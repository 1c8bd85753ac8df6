//! The commands of the TCP protocol: their codes, their body layouts, decoding and encoding.
//!
//! | cmd    | name         | body                                                      |
//! |--------|--------------|-----------------------------------------------------------|
//! | 0x0001 | CONNECT      | token, UTF-8 (may be empty: anonymous, if allowed)        |
//! | 0x8001 | CONNECTED    | client id, UTF-8                                          |
//! | 0x0002 | SUBSCRIBE    | channel, UTF-8                                            |
//! | 0x8002 | SUBSCRIBED   | channel, UTF-8                                            |
//! | 0x0003 | UNSUBSCRIBE  | channel, UTF-8                                            |
//! | 0x8003 | UNSUBSCRIBED | channel, UTF-8                                            |
//! | 0x0004 | PUBLISH      | u16 channel length, channel, data                         |
//! | 0x8004 | PUBLISHED    | u64 offset (0 when the channel keeps no history)          |
//! | 0x0005 | PING         | any bytes, ≤ 125 (sent by either side)                    |
//! | 0x8005 | PONG         | the same bytes (sent by either side)                      |
//! | 0x8010 | MESSAGE      | server push: u16 channel length, channel, u64 offset, data |
//! | 0x80FF | ERROR        | u16 error code, UTF-8 message                             |
//!
//! Decoding borrows every field from the frame's body: no allocation. A command that the receiving side
//! never receives (a client sending MESSAGE, a server receiving CONNECTED) is an unknown command (5), as
//! is an unassigned code; a body that does not match its layout is malformed (6). Neither is fatal.
//!
//! Encoding writes header and body straight into the caller's buffer ([`bytes::BufMut`]: a `BytesMut`, a
//! `Vec<u8>`), hashing the body parts where they lie: no allocation beyond the output buffer. A MESSAGE
//! push is encoded once into a `Bytes` ([`encode_message`]) that every subscriber's queue shares.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::Role;
use crate::tcp::error::{ErrorCode, Malformed, TcpError};
use crate::tcp::{frame_crc, header_prefix, HEADER_LEN, MAX_PING_BODY};

/// A command code (the header's `cmd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CommandCode {
    Connect = 0x0001,
    Connected = 0x8001,
    Subscribe = 0x0002,
    Subscribed = 0x8002,
    Unsubscribe = 0x0003,
    Unsubscribed = 0x8003,
    Publish = 0x0004,
    Published = 0x8004,
    Ping = 0x0005,
    Pong = 0x8005,
    Message = 0x8010,
    Error = 0x80FF,
}

impl CommandCode {
    pub const ALL: [CommandCode; 12] = [
        CommandCode::Connect,
        CommandCode::Connected,
        CommandCode::Subscribe,
        CommandCode::Subscribed,
        CommandCode::Unsubscribe,
        CommandCode::Unsubscribed,
        CommandCode::Publish,
        CommandCode::Published,
        CommandCode::Ping,
        CommandCode::Pong,
        CommandCode::Message,
        CommandCode::Error,
    ];

    pub fn from_u16(v: u16) -> Option<CommandCode> {
        CommandCode::ALL.into_iter().find(|c| *c as u16 == v)
    }

    /// Whether `role` receives this command: a server receives the client's commands, a client the
    /// server's replies and pushes; PING and PONG flow both ways.
    pub fn received_by(self, role: Role) -> bool {
        match self {
            CommandCode::Ping | CommandCode::Pong => true,
            CommandCode::Connect | CommandCode::Subscribe | CommandCode::Unsubscribe | CommandCode::Publish => {
                role == Role::Server
            }
            CommandCode::Connected
            | CommandCode::Subscribed
            | CommandCode::Unsubscribed
            | CommandCode::Published
            | CommandCode::Message
            | CommandCode::Error => role == Role::Client,
        }
    }
}

/// A decoded command; every field borrows the frame's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Connect { token: &'a str },
    Connected { client: &'a str },
    Subscribe { channel: &'a str },
    Subscribed { channel: &'a str },
    Unsubscribe { channel: &'a str },
    Unsubscribed { channel: &'a str },
    Publish { channel: &'a str, data: &'a [u8] },
    Published { offset: u64 },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Message { channel: &'a str, offset: u64, data: &'a [u8] },
    Error { code: ErrorCode, message: &'a str },
}

/// A command we were asked to send cannot be represented (our own mistake, never the peer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("channel of {0} bytes is longer than 65535")]
    ChannelTooLong(usize),
    #[error("ping or pong body of {0} bytes is longer than 125")]
    PingTooLong(usize),
    #[error("body of {0} bytes does not fit a u32 length")]
    BodyTooLong(usize),
}

impl<'a> Command<'a> {
    /// Decodes the body of a frame with command code `cmd`, as received by `role`.
    pub fn decode(role: Role, cmd: u16, body: &'a [u8]) -> Result<Command<'a>, TcpError> {
        let code = match CommandCode::from_u16(cmd) {
            Some(c) if c.received_by(role) => c,
            _ => return Err(TcpError::UnknownCommand(cmd)),
        };
        let malformed = TcpError::MalformedBody;
        Ok(match code {
            CommandCode::Connect => Command::Connect { token: utf8(body)? },
            CommandCode::Connected => Command::Connected { client: utf8(body)? },
            CommandCode::Subscribe => Command::Subscribe { channel: utf8(body)? },
            CommandCode::Subscribed => Command::Subscribed { channel: utf8(body)? },
            CommandCode::Unsubscribe => Command::Unsubscribe { channel: utf8(body)? },
            CommandCode::Unsubscribed => Command::Unsubscribed { channel: utf8(body)? },
            CommandCode::Publish => {
                let (channel, data) = channel_prefixed(body)?;
                Command::Publish { channel, data }
            }
            CommandCode::Published => {
                let offset: [u8; 8] = match body.len() {
                    0..=7 => return Err(malformed(Malformed::ShortBody)),
                    8 => body.try_into().map_err(|_| malformed(Malformed::ShortBody))?,
                    _ => return Err(malformed(Malformed::TrailingBytes)),
                };
                Command::Published { offset: u64::from_be_bytes(offset) }
            }
            CommandCode::Ping | CommandCode::Pong => {
                if body.len() > MAX_PING_BODY {
                    return Err(malformed(Malformed::PingTooLong));
                }
                if code == CommandCode::Ping {
                    Command::Ping(body)
                } else {
                    Command::Pong(body)
                }
            }
            CommandCode::Message => {
                let (channel, rest) = channel_prefixed(body)?;
                let Some((offset, data)) = rest.split_first_chunk::<8>() else {
                    return Err(malformed(Malformed::ShortBody));
                };
                Command::Message { channel, offset: u64::from_be_bytes(*offset), data }
            }
            CommandCode::Error => {
                let Some((code, message)) = body.split_first_chunk::<2>() else {
                    return Err(malformed(Malformed::ShortBody));
                };
                Command::Error { code: ErrorCode(u16::from_be_bytes(*code)), message: utf8(message)? }
            }
        })
    }

    /// The command's code.
    pub fn code(&self) -> CommandCode {
        match self {
            Command::Connect { .. } => CommandCode::Connect,
            Command::Connected { .. } => CommandCode::Connected,
            Command::Subscribe { .. } => CommandCode::Subscribe,
            Command::Subscribed { .. } => CommandCode::Subscribed,
            Command::Unsubscribe { .. } => CommandCode::Unsubscribe,
            Command::Unsubscribed { .. } => CommandCode::Unsubscribed,
            Command::Publish { .. } => CommandCode::Publish,
            Command::Published { .. } => CommandCode::Published,
            Command::Ping(_) => CommandCode::Ping,
            Command::Pong(_) => CommandCode::Pong,
            Command::Message { .. } => CommandCode::Message,
            Command::Error { .. } => CommandCode::Error,
        }
    }

    /// Bytes the encoded frame takes (header included).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Command::Connect { token: s }
                | Command::Connected { client: s }
                | Command::Subscribe { channel: s }
                | Command::Subscribed { channel: s }
                | Command::Unsubscribe { channel: s }
                | Command::Unsubscribed { channel: s } => s.len(),
                Command::Publish { channel, data } => 2 + channel.len() + data.len(),
                Command::Published { .. } => 8,
                Command::Ping(b) | Command::Pong(b) => b.len(),
                Command::Message { channel, data, .. } => 2 + channel.len() + 8 + data.len(),
                Command::Error { message, .. } => 2 + message.len(),
            }
    }

    /// Appends the whole frame (header, body) to `out`. On error nothing is written.
    pub fn encode<B: BufMut + ?Sized>(&self, out: &mut B) -> Result<(), EncodeError> {
        let code = self.code() as u16;
        match *self {
            Command::Connect { token: s }
            | Command::Connected { client: s }
            | Command::Subscribe { channel: s }
            | Command::Subscribed { channel: s }
            | Command::Unsubscribe { channel: s }
            | Command::Unsubscribed { channel: s } => encode_parts(out, code, &[s.as_bytes()]),
            Command::Publish { channel, data } => {
                encode_parts(out, code, &[&channel_len(channel)?, channel.as_bytes(), data])
            }
            Command::Published { offset } => encode_parts(out, code, &[&offset.to_be_bytes()]),
            Command::Ping(b) | Command::Pong(b) => {
                if b.len() > MAX_PING_BODY {
                    return Err(EncodeError::PingTooLong(b.len()));
                }
                encode_parts(out, code, &[b])
            }
            Command::Message { channel, offset, data } => {
                encode_parts(out, code, &[&channel_len(channel)?, channel.as_bytes(), &offset.to_be_bytes(), data])
            }
            Command::Error { code: e, message } => encode_parts(out, code, &[&e.0.to_be_bytes(), message.as_bytes()]),
        }
    }
}

/// Encodes a MESSAGE push once, into one shareable buffer of exactly its size: one allocation, however
/// many TCP subscribers it is then queued on (a clone of the `Bytes` is a reference-count increment).
pub fn encode_message(channel: &str, offset: u64, data: &[u8]) -> Result<Bytes, EncodeError> {
    let push = Command::Message { channel, offset, data };
    let mut out = BytesMut::with_capacity(push.encoded_len());
    push.encode(&mut out)?;
    Ok(out.freeze())
}

/// Writes a header with the CRC of `parts` (the body, in order), then the parts.
fn encode_parts<B: BufMut + ?Sized>(out: &mut B, cmd: u16, parts: &[&[u8]]) -> Result<(), EncodeError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let body_len = u32::try_from(len).map_err(|_| EncodeError::BodyTooLong(len))?;
    let prefix = header_prefix(cmd, body_len);
    out.put_slice(&prefix);
    out.put_u32(frame_crc(&prefix, parts));
    for part in parts {
        out.put_slice(part);
    }
    Ok(())
}

fn channel_len(channel: &str) -> Result<[u8; 2], EncodeError> {
    u16::try_from(channel.len()).map(u16::to_be_bytes).map_err(|_| EncodeError::ChannelTooLong(channel.len()))
}

fn utf8(bytes: &[u8]) -> Result<&str, TcpError> {
    simdutf8::basic::from_utf8(bytes).map_err(|_| TcpError::MalformedBody(Malformed::InvalidUtf8))
}

/// Splits `u16 length, channel, rest`.
fn channel_prefixed(body: &[u8]) -> Result<(&str, &[u8]), TcpError> {
    let Some((len, rest)) = body.split_first_chunk::<2>() else {
        return Err(TcpError::MalformedBody(Malformed::ShortBody));
    };
    let len = usize::from(u16::from_be_bytes(*len));
    if len > rest.len() {
        return Err(TcpError::MalformedBody(Malformed::ChannelPastEnd));
    }
    let (channel, rest) = rest.split_at(len);
    Ok((utf8(channel)?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(c: &Command<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        c.encode(&mut out).unwrap();
        assert_eq!(out.len(), c.encoded_len(), "{c:?}");
        out
    }

    /// The worked example of docs/tcp-protocol.md, byte for byte. The CRC was computed independently
    /// (Python's `zlib.crc32` over bytes 0..9 followed by the body) and must never change.
    #[test]
    fn publish_news_known_answer() {
        let frame = encode(&Command::Publish { channel: "news", data: br#"{"x":1}"# });
        #[rustfmt::skip]
        let expected: [u8; 26] = [
            0x42, 0x4D,             // magic "BM"
            0x01,                   // version 1
            0x00, 0x04,             // cmd PUBLISH
            0x00, 0x00, 0x00, 0x0D, // body_len 13
            0xEF, 0xC2, 0xF3, 0x26, // crc
            0x00, 0x04,             // channel length 4
            b'n', b'e', b'w', b's', // channel
            b'{', b'"', b'x', b'"', b':', b'1', b'}', // data
        ];
        assert_eq!(frame, expected);
        assert_eq!(crc32fast::hash(&[&frame[..9], &frame[13..]].concat()), 0xEFC2_F326);
    }

    /// The second worked example of docs/tcp-protocol.md: the push a subscriber of `news` receives for
    /// that publication at offset 1. CRC computed independently, as above.
    #[test]
    fn message_news_known_answer() {
        let push = encode_message("news", 1, br#"{"x":1}"#).unwrap();
        #[rustfmt::skip]
        let expected: [u8; 34] = [
            0x42, 0x4D, 0x01,       // magic, version
            0x80, 0x10,             // cmd MESSAGE
            0x00, 0x00, 0x00, 0x15, // body_len 21
            0x31, 0x27, 0xF8, 0xC8, // crc
            0x00, 0x04, b'n', b'e', b'w', b's',             // channel
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // offset 1
            b'{', b'"', b'x', b'"', b':', b'1', b'}',       // data
        ];
        assert_eq!(&push[..], &expected[..]);
    }

    #[test]
    fn every_command_round_trips() {
        let cmds = [
            (Role::Server, Command::Connect { token: "" }),
            (Role::Server, Command::Connect { token: "eyJhbGciOi.x.y" }),
            (Role::Client, Command::Connected { client: "c-1" }),
            (Role::Server, Command::Subscribe { channel: "news" }),
            (Role::Client, Command::Subscribed { channel: "news" }),
            (Role::Server, Command::Unsubscribe { channel: "ns:κόσμε" }),
            (Role::Client, Command::Unsubscribed { channel: "ns:κόσμε" }),
            (Role::Server, Command::Publish { channel: "news", data: b"\x00\xffbinary" }),
            (Role::Server, Command::Publish { channel: "", data: b"" }),
            (Role::Client, Command::Published { offset: 0 }),
            (Role::Client, Command::Published { offset: u64::MAX }),
            (Role::Server, Command::Ping(b"")),
            (Role::Client, Command::Ping(&[7; 125])),
            (Role::Server, Command::Pong(&[7; 125])),
            (Role::Client, Command::Pong(b"t=1")),
            (Role::Client, Command::Message { channel: "news", offset: 42, data: br#"{"x":1}"# }),
            (Role::Client, Command::Error { code: ErrorCode::PERMISSION_DENIED, message: "permission denied" }),
        ];
        for (role, c) in cmds {
            let f = encode(&c);
            assert_eq!(u16::from_be_bytes([f[3], f[4]]), c.code() as u16);
            assert_eq!(Command::decode(role, c.code() as u16, &f[HEADER_LEN..]), Ok(c));
        }
    }

    #[test]
    fn message_push_is_encoded_once_into_shared_bytes() {
        let push = encode_message("news", 7, b"hello").unwrap();
        let expected = encode(&Command::Message { channel: "news", offset: 7, data: b"hello" });
        assert_eq!(&push[..], &expected[..]);
        // Fan-out clones share the one buffer.
        let clone = push.clone();
        assert_eq!(clone.as_ptr(), push.as_ptr());
    }

    #[test]
    fn command_in_the_wrong_direction_is_unknown_command_5() {
        for code in CommandCode::ALL {
            for role in [Role::Server, Role::Client] {
                let r = Command::decode(role, code as u16, &[0; 16]);
                if code.received_by(role) {
                    assert_ne!(r, Err(TcpError::UnknownCommand(code as u16)), "{code:?} {role:?}");
                } else {
                    assert_eq!(r, Err(TcpError::UnknownCommand(code as u16)), "{code:?} {role:?}");
                }
            }
        }
        assert!(CommandCode::Ping.received_by(Role::Server) && CommandCode::Ping.received_by(Role::Client));
        assert!(CommandCode::Pong.received_by(Role::Server) && CommandCode::Pong.received_by(Role::Client));
    }

    #[test]
    fn unassigned_command_is_unknown_command_5() {
        for cmd in [0x0000u16, 0x0006, 0x8000, 0x8011, 0x80FE, 0xFFFF] {
            let e = Command::decode(Role::Server, cmd, b"").unwrap_err();
            assert_eq!(e, TcpError::UnknownCommand(cmd));
            assert_eq!(e.code(), ErrorCode::UNKNOWN_COMMAND);
            assert!(!e.is_fatal());
        }
    }

    fn malformed(role: Role, code: CommandCode, body: &[u8]) -> Malformed {
        match Command::decode(role, code as u16, body) {
            Err(e @ TcpError::MalformedBody(m)) => {
                assert_eq!(e.code(), ErrorCode::MALFORMED_BODY);
                assert!(!e.is_fatal());
                m
            }
            other => panic!("{code:?} {body:?}: expected a malformed body, got {other:?}"),
        }
    }

    #[test]
    fn bad_utf8_is_malformed_body_6() {
        for code in [CommandCode::Connect, CommandCode::Subscribe, CommandCode::Unsubscribe] {
            assert_eq!(malformed(Role::Server, code, b"ab\xffc"), Malformed::InvalidUtf8);
        }
        for code in [CommandCode::Connected, CommandCode::Subscribed, CommandCode::Unsubscribed] {
            // A truncated multi-byte sequence at the end is invalid too.
            assert_eq!(malformed(Role::Client, code, "κό".as_bytes()[..3].as_ref()), Malformed::InvalidUtf8);
        }
        assert_eq!(malformed(Role::Server, CommandCode::Publish, b"\x00\x02\xc3\x28data"), Malformed::InvalidUtf8);
        assert_eq!(
            malformed(Role::Client, CommandCode::Message, b"\x00\x01\x80\0\0\0\0\0\0\0\x01"),
            Malformed::InvalidUtf8
        );
        assert_eq!(malformed(Role::Client, CommandCode::Error, b"\x00\x05\xed\xa0\x80"), Malformed::InvalidUtf8);
    }

    #[test]
    fn short_body_is_malformed_body_6() {
        assert_eq!(malformed(Role::Server, CommandCode::Publish, b""), Malformed::ShortBody);
        assert_eq!(malformed(Role::Server, CommandCode::Publish, b"\x00"), Malformed::ShortBody);
        assert_eq!(malformed(Role::Client, CommandCode::Published, &[0; 7]), Malformed::ShortBody);
        assert_eq!(malformed(Role::Client, CommandCode::Published, &[0; 9]), Malformed::TrailingBytes);
        assert_eq!(malformed(Role::Client, CommandCode::Message, b"\x00\x04news\0\0\0\0\0\0\0"), Malformed::ShortBody);
        assert_eq!(malformed(Role::Client, CommandCode::Error, b"\x00"), Malformed::ShortBody);
    }

    #[test]
    fn channel_length_past_the_body_is_malformed_body_6() {
        assert_eq!(malformed(Role::Server, CommandCode::Publish, b"\x00\x05news"), Malformed::ChannelPastEnd);
        assert_eq!(malformed(Role::Server, CommandCode::Publish, b"\xff\xffnews"), Malformed::ChannelPastEnd);
        assert_eq!(malformed(Role::Client, CommandCode::Message, b"\x00\x09news"), Malformed::ChannelPastEnd);
        // Exactly to the end is fine: an empty data.
        assert_eq!(
            Command::decode(Role::Server, CommandCode::Publish as u16, b"\x00\x04news"),
            Ok(Command::Publish { channel: "news", data: b"" })
        );
    }

    #[test]
    fn ping_over_125_bytes_is_malformed_body_6() {
        assert_eq!(malformed(Role::Server, CommandCode::Ping, &[0; 126]), Malformed::PingTooLong);
        assert_eq!(malformed(Role::Client, CommandCode::Pong, &[0; 126]), Malformed::PingTooLong);
        let mut out = Vec::new();
        assert_eq!(Command::Ping(&[0; 126]).encode(&mut out), Err(EncodeError::PingTooLong(126)));
        assert!(out.is_empty());
    }

    #[test]
    fn channel_too_long_to_encode_writes_nothing() {
        let long = "x".repeat(65_536);
        let mut out = Vec::new();
        assert_eq!(
            Command::Publish { channel: &long, data: b"" }.encode(&mut out),
            Err(EncodeError::ChannelTooLong(65_536))
        );
        assert!(out.is_empty());
        assert!(encode_message(&long[..65_535], 1, b"").is_ok());
    }
}
