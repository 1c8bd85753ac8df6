//! Framing: how several protocol messages share one WebSocket message, in each format.
//!
//! * **JSON** (text frames): each message is one JSON object; messages are separated by `\n`. We accept a
//!   trailing newline, `\r\n`, and blank lines (the SDKs skip them too), and write no trailing newline.
//! * **Protobuf** (binary frames, subprotocol `centrifuge-protobuf`): each message is prefixed with its
//!   length as a varint — protobuf's "length-delimited" stream.
//!
//! Decoding fills a caller-owned `Vec` so a connection can reuse one allocation for every frame it reads.
//! Anything wrong with the bytes is a [`ProtocolError`], which the caller turns into a disconnect with
//! [`ProtocolError::disconnect`]; decoding never panics, whatever the input (fuzzed by a proptest below).
//!
//! Encoding *appends* to a `BytesMut` that holds the frame being built, so replies produced while handling
//! one received frame can go out in one WebSocket message. In JSON the separator is written before a
//! message whenever the buffer is not empty — so give each frame its own buffer (or `split()` it off), and
//! never let the buffer hold anything but this frame's messages.
//!
//! This module knows nothing about what a command means; that is the server's business.

use bytes::{BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{EncodeError, ProtocolError};
use crate::messages::{Command, Reply};

/// The WebSocket subprotocol a client offers to speak Protobuf; the server echoes it back.
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";

/// The wire format of a connection, fixed at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    /// The format a client asked for in `Sec-WebSocket-Protocol` (JSON unless it offered Protobuf).
    pub fn from_subprotocols<'a>(mut offered: impl Iterator<Item = &'a str>) -> Format {
        if offered.any(|p| p.trim() == PROTOBUF_SUBPROTOCOL) {
            Format::Protobuf
        } else {
            Format::Json
        }
    }

    /// JSON travels in text frames, Protobuf in binary frames.
    pub fn is_binary(self) -> bool {
        self == Format::Protobuf
    }

    /// What goes between two encoded messages in one frame: `\n` for JSON, nothing for Protobuf (each
    /// message carries its length). For callers that join messages encoded separately, e.g. shared pushes.
    pub fn separator(self) -> &'static [u8] {
        match self {
            Format::Json => b"\n",
            Format::Protobuf => b"",
        }
    }
}

/// Bounds on what one received frame may make us allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted, in bytes. The WebSocket layer should enforce the same bound earlier.
    pub max_frame_len: usize,
    /// Most messages accepted in one frame. A decoded `Command` is far larger in memory than its shortest
    /// encoding (`{}` is 3 bytes with its separator), so this caps the amplification.
    pub max_messages: usize,
}

impl Default for Limits {
    /// 64 KiB frames, 1024 messages per frame.
    fn default() -> Limits {
        Limits { max_frame_len: 64 * 1024, max_messages: 1024 }
    }
}

/// Decodes every command of a received frame into `out` (cleared first), with [`Limits::default`].
///
/// An empty command (`{}` / a zero-length Protobuf message) is kept: it is the client's pong, a
/// [`Command`] whose [`request`](Command::request) is `None`.
///
/// Never panics, whatever `frame` holds. On error, `out` holds the commands decoded before the bad one.
pub fn decode_commands(format: Format, frame: &[u8], out: &mut Vec<Command>) -> Result<(), ProtocolError> {
    decode_commands_with(format, frame, &Limits::default(), out)
}

/// [`decode_commands`] with explicit limits.
pub fn decode_commands_with(
    format: Format,
    frame: &[u8],
    limits: &Limits,
    out: &mut Vec<Command>,
) -> Result<(), ProtocolError> {
    decode_frame(format, frame, limits, out)
}

/// Decodes every reply of a frame received from a server (client side: load generator, tests).
pub fn decode_replies(format: Format, frame: &[u8], out: &mut Vec<Reply>) -> Result<(), ProtocolError> {
    decode_frame(format, frame, &Limits { max_frame_len: usize::MAX, max_messages: usize::MAX }, out)
}

/// Appends `reply` to the frame being built in `out`.
///
/// On error `out` is left exactly as it was.
pub fn encode_reply(format: Format, reply: &Reply, out: &mut BytesMut) -> Result<(), EncodeError> {
    encode_message(format, reply, out)
}

/// Appends `command` to the frame being built in `out` (client side).
pub fn encode_command(format: Format, command: &Command, out: &mut BytesMut) -> Result<(), EncodeError> {
    encode_message(format, command, out)
}

fn decode_frame<M>(format: Format, frame: &[u8], limits: &Limits, out: &mut Vec<M>) -> Result<(), ProtocolError>
where
    M: DeserializeOwned + prost::Message + Default,
{
    out.clear();
    if frame.len() > limits.max_frame_len {
        return Err(ProtocolError::FrameTooLarge { len: frame.len(), limit: limits.max_frame_len });
    }
    let mut pos = 0;
    decode_some(format, frame, &mut pos, limits.max_messages, out)?;
    if pos < frame.len() {
        return Err(ProtocolError::TooManyMessages { limit: limits.max_messages });
    }
    if out.is_empty() {
        // Nothing but whitespace (or nothing at all): Centrifugo disconnects such a client too.
        return Err(ProtocolError::EmptyFrame);
    }
    Ok(())
}

/// Decodes the commands of `frame` from byte `*pos` on, at most `max` of them, into `out` (cleared
/// first), and moves `*pos` past them: to `frame.len()` once nothing but whitespace is left, else to the
/// first command not decoded. Call again with the same `pos` for the next batch.
///
/// This is how a server bounds what one frame costs in decoded commands (`max` at a time, each far
/// larger in memory than its shortest encoding) without refusing a frame that carries more: it can
/// run, or answer, the commands batch by batch. The frame's size is the WebSocket layer's business
/// (`max_message_size`, enforced before a byte is buffered), so none is checked here.
///
/// A frame with no command at all (empty, or only whitespace) is [`ProtocolError::EmptyFrame`]. On any
/// other error `out` holds the commands before the bad one.
pub fn decode_commands_from(
    format: Format,
    frame: &[u8],
    pos: &mut usize,
    max: usize,
    out: &mut Vec<Command>,
) -> Result<(), ProtocolError> {
    out.clear();
    let first = *pos == 0;
    decode_some(format, frame, pos, max, out)?;
    if first && out.is_empty() {
        return Err(ProtocolError::EmptyFrame);
    }
    Ok(())
}

/// Decodes messages from `frame[*pos..]` into `out` until the frame ends or `out` holds `max`;
/// `*pos` ends at `frame.len()` if only whitespace is left, else at the next message.
fn decode_some<M>(
    format: Format,
    frame: &[u8],
    pos: &mut usize,
    max: usize,
    out: &mut Vec<M>,
) -> Result<(), ProtocolError>
where
    M: DeserializeOwned + prost::Message + Default,
{
    match format {
        Format::Json => decode_json(frame, pos, max, out),
        Format::Protobuf => decode_protobuf(frame, pos, max, out),
    }
}

fn decode_json<M: DeserializeOwned>(
    frame: &[u8],
    pos: &mut usize,
    max: usize,
    out: &mut Vec<M>,
) -> Result<(), ProtocolError> {
    // Splitting on the byte `\n` is exact: a JSON string cannot hold a raw newline, so a newline is always
    // between two messages (or inside whitespace, which the protocol does not allow within a message).
    while *pos < frame.len() {
        let rest = &frame[*pos..];
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], *pos + i + 1),
            None => (rest, frame.len()),
        };
        // `\r` of a `\r\n` separator, and blank lines, are whitespace: serde_json skips them around a value,
        // and a line of nothing else carries no message.
        let Some(&first) = line.iter().find(|b| !b.is_ascii_whitespace()) else {
            *pos = next;
            continue;
        };
        if out.len() >= max {
            return Ok(());
        }
        // serde's derived structs also accept a JSON array (fields by position); a message is an object.
        if first != b'{' {
            return Err(ProtocolError::Json(serde::de::Error::custom("expected a JSON object")));
        }
        let message = serde_json::from_slice(line).map_err(ProtocolError::Json)?;
        out.push(message);
        *pos = next;
    }
    Ok(())
}

fn decode_protobuf<M: prost::Message + Default>(
    frame: &[u8],
    pos: &mut usize,
    max: usize,
    out: &mut Vec<M>,
) -> Result<(), ProtocolError> {
    while *pos < frame.len() {
        if out.len() >= max {
            return Ok(());
        }
        let mut rest = &frame[*pos..];
        // `decode_varint` advances `rest` past the prefix; it rejects prefixes longer than 10 bytes, values
        // over u64::MAX, and a frame that ends inside the prefix.
        let declared = prost::encoding::decode_varint(&mut rest).map_err(|_| ProtocolError::BadVarint)?;
        let len = match usize::try_from(declared) {
            Ok(len) if len <= rest.len() => len,
            _ => return Err(ProtocolError::Truncated { declared, available: rest.len() }),
        };
        let (body, tail) = rest.split_at(len);
        let message = M::decode(body).map_err(ProtocolError::Protobuf)?;
        out.push(message);
        *pos = frame.len() - tail.len();
    }
    Ok(())
}

fn encode_message<M: Serialize + prost::Message>(
    format: Format,
    message: &M,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let start = out.len();
    match format {
        Format::Json => {
            if start != 0 {
                out.put_u8(b'\n');
            }
            serde_json::to_writer((&mut *out).writer(), message).map_err(|e| {
                out.truncate(start);
                EncodeError::Json(e)
            })
        }
        Format::Protobuf => {
            // `BytesMut` grows on demand, so prost's capacity check cannot fail; mapped rather than unwrapped.
            message.encode_length_delimited(out).map_err(|e| {
                out.truncate(start);
                EncodeError::Protobuf(e)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn commands(format: Format, frame: &[u8]) -> Result<Vec<Command>, ProtocolError> {
        let mut out = Vec::new();
        decode_commands(format, frame, &mut out).map(|()| out)
    }

    fn json_frame(replies: &[Reply]) -> String {
        let mut out = BytesMut::new();
        for r in replies {
            encode_reply(Format::Json, r, &mut out).unwrap();
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn format_from_subprotocol() {
        assert_eq!(Format::from_subprotocols(["centrifuge-protobuf"].into_iter()), Format::Protobuf);
        assert_eq!(Format::from_subprotocols(["x", " centrifuge-protobuf "].into_iter()), Format::Protobuf);
        assert_eq!(Format::from_subprotocols(["centrifuge-json"].into_iter()), Format::Json);
        assert_eq!(Format::from_subprotocols(std::iter::empty()), Format::Json);
    }

    // --- JSON framing -----------------------------------------------------------------------------------

    #[test]
    fn json_several_commands_in_one_frame() {
        let frame = br#"{"id":1,"connect":{"token":"t","name":"js"}}
{"id":2,"subscribe":{"channel":"news","recover":true,"epoch":"ab12","offset":5}}
{"id":3,"publish":{"channel":"news","data":{"text":"hi"}}}"#;
        let cmds = commands(Format::Json, frame).unwrap();
        let methods: Vec<_> = cmds.iter().map(|c| (c.id, c.method())).collect();
        assert_eq!(methods, [(1, Some(Method::Connect)), (2, Some(Method::Subscribe)), (3, Some(Method::Publish))]);
        assert_eq!(cmds[2].publish.as_ref().unwrap().data, Bytes::from_static(br#"{"text":"hi"}"#));
    }

    #[test]
    fn json_as_python_json_dumps_writes_it() {
        // centrifuge-python joins `json.dumps(command)` with `\n`: spaces after `:` and `,`, non-ASCII escaped.
        let frame = b"{\"id\": 1, \"connect\": {\"token\": \"t\", \"name\": \"python\"}}\n\
                      {\"id\": 2, \"publish\": {\"channel\": \"caf\\u00e9\", \"data\": {\"text\": \"\\u00e9\"}}}";
        let cmds = commands(Format::Json, frame).unwrap();
        assert_eq!(cmds[0].connect.as_ref().unwrap().name, "python");
        let publish = cmds[1].publish.as_ref().unwrap();
        assert_eq!(publish.channel, "café");
        // The payload is kept exactly as sent, escapes included.
        assert_eq!(publish.data, Bytes::from_static(b"{\"text\": \"\\u00e9\"}"));
    }

    #[test]
    fn json_trailing_newline_crlf_and_blank_lines_are_tolerated() {
        let frame = b"{\"id\":1,\"ping\":{}}\r\n\r\n{\"id\":2,\"ping\":{}}\r\n";
        let ids: Vec<u32> = commands(Format::Json, frame).unwrap().iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 2]);
    }

    #[test]
    fn json_empty_object_is_a_pong_command_without_method() {
        let cmds = commands(Format::Json, b"{}").unwrap();
        assert_eq!(cmds.len(), 1);
        assert_eq!(cmds[0], Command::default());
        assert_eq!(cmds[0].request(), None);
    }

    #[test]
    fn json_malformed_is_an_error_not_a_panic() {
        for frame in [
            &b"{"[..],
            b"{\"id\":1",
            b"not json",
            b"[]",
            b"42",
            b"{\"id\":-1}",
            b"{\"id\":4294967296}",
            b"{\"id\":1}{\"id\":2}",
            b"{\"id\":1,\"id\":2}",
            b"{\"subscribe\":{\"channel\":5}}",
            b"{\"publish\":{\"data\":}}",
            b"\xff\xfe",
            b"{\"connect\":{\"token\":\"\xff\"}}",
        ] {
            let err = commands(Format::Json, frame).unwrap_err();
            assert!(matches!(err, ProtocolError::Json(_)), "{:?}: {err}", String::from_utf8_lossy(frame));
            assert_eq!(err.disconnect().code, 3501);
        }
    }

    #[test]
    fn json_deep_nesting_does_not_overflow_the_stack() {
        // serde_json skips and captures nested values iteratively, so depth only costs frame bytes.
        let nested = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
        let frame = format!(r#"{{"id":1,"publish":{{"channel":"c","data":{nested}}},"unknown":{nested}}}"#);
        let limits = Limits { max_frame_len: usize::MAX, max_messages: 1 };
        let mut out = Vec::new();
        decode_commands_with(Format::Json, frame.as_bytes(), &limits, &mut out).unwrap();
        assert_eq!(out[0].publish.as_ref().unwrap().data.len(), nested.len());
    }

    #[test]
    fn empty_frame_is_bad_request() {
        for format in [Format::Json, Format::Protobuf] {
            let err = commands(format, b"").unwrap_err();
            assert!(matches!(err, ProtocolError::EmptyFrame));
            assert_eq!(err.disconnect().code, 3501);
        }
        assert!(matches!(commands(Format::Json, b"\n\r\n ").unwrap_err(), ProtocolError::EmptyFrame));
    }

    #[test]
    fn frame_over_the_size_limit_is_bad_request() {
        let limits = Limits { max_frame_len: 4, max_messages: 10 };
        let err = decode_commands_with(Format::Json, b"{}\n{}", &limits, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge { len: 5, limit: 4 }));
        assert_eq!(err.disconnect().code, 3501);
    }

    #[test]
    fn decode_commands_from_resumes_batch_by_batch() {
        let ids = |v: &[Command]| v.iter().map(|c| c.id).collect::<Vec<_>>();
        let mut out = Vec::new();
        let frame = b"{\"id\":1}\n\n{\"id\":2}\r\n{\"id\":3}\n \n";
        let mut pos = 0;
        decode_commands_from(Format::Json, frame, &mut pos, 2, &mut out).unwrap();
        assert_eq!(ids(&out), [1, 2]);
        assert!(pos < frame.len(), "a third command is left");
        decode_commands_from(Format::Json, frame, &mut pos, 2, &mut out).unwrap();
        assert_eq!(ids(&out), [3]);
        assert_eq!(pos, frame.len(), "trailing whitespace is consumed");
        // Protobuf: the same, by length prefix.
        let mut pb = BytesMut::new();
        for id in 1..=3 {
            encode_command(Format::Protobuf, &Command { id, ..Default::default() }, &mut pb).unwrap();
        }
        let mut pos = 0;
        decode_commands_from(Format::Protobuf, &pb, &mut pos, 2, &mut out).unwrap();
        assert_eq!(ids(&out), [1, 2]);
        decode_commands_from(Format::Protobuf, &pb, &mut pos, 2, &mut out).unwrap();
        assert_eq!((ids(&out), pos), (vec![3], pb.len()));
        // No frame-size limit of its own (the WebSocket layer has it); nothing at all is an empty frame.
        let big = format!("{{\"id\":1,\"publish\":{{\"channel\":\"a\",\"data\":\"{}\"}}}}", "x".repeat(200_000));
        let mut pos = 0;
        decode_commands_from(Format::Json, big.as_bytes(), &mut pos, 1024, &mut out).unwrap();
        assert_eq!(ids(&out), [1]);
        let mut pos = 0;
        let err = decode_commands_from(Format::Json, b" \n ", &mut pos, 1024, &mut out).unwrap_err();
        assert!(matches!(err, ProtocolError::EmptyFrame));
    }

    #[test]
    fn too_many_messages_in_one_frame_is_bad_request() {
        let limits = Limits { max_frame_len: 1024, max_messages: 2 };
        let mut out = Vec::new();
        assert!(decode_commands_with(Format::Json, b"{}\n{}", &limits, &mut out).is_ok());
        let err = decode_commands_with(Format::Json, b"{}\n{}\n{}", &limits, &mut out).unwrap_err();
        assert!(matches!(err, ProtocolError::TooManyMessages { limit: 2 }));
        let err = decode_commands_with(Format::Protobuf, &[0, 0, 0], &limits, &mut out).unwrap_err();
        assert!(matches!(err, ProtocolError::TooManyMessages { limit: 2 }));
    }

    #[test]
    fn decoding_reuses_and_clears_the_vec() {
        let mut out = Vec::with_capacity(8);
        decode_commands(Format::Json, b"{\"id\":1}\n{\"id\":2}", &mut out).unwrap();
        decode_commands(Format::Json, b"{\"id\":3}", &mut out).unwrap();
        assert_eq!(out.iter().map(|c| c.id).collect::<Vec<_>>(), [3]);
        assert!(out.capacity() >= 8);
    }

    #[test]
    fn json_replies_are_joined_by_newline_without_trailing_newline() {
        let frame = json_frame(&[
            Reply { id: 3, publish: Some(PublishResult {}), ..Reply::default() },
            Reply::server_ping(),
            Reply::error(4, crate::codes::ErrorCode::PERMISSION_DENIED.into()),
        ]);
        assert_eq!(
            frame,
            "{\"id\":3,\"publish\":{}}\n{}\n{\"id\":4,\"error\":{\"code\":103,\"message\":\"permission denied\"}}"
        );
    }

    #[test]
    fn failed_encode_leaves_the_frame_untouched() {
        let mut out = BytesMut::new();
        encode_reply(Format::Json, &Reply::server_ping(), &mut out).unwrap();
        let bad = Reply { id: 1, rpc: Some(RpcResult { data: Bytes::from_static(b"{not json") }), ..Reply::default() };
        assert!(matches!(encode_reply(Format::Json, &bad, &mut out), Err(EncodeError::Json(_))));
        assert_eq!(&out[..], b"{}");
    }

    // --- Protobuf framing -------------------------------------------------------------------------------

    fn protobuf_frame(cmds: &[Command]) -> BytesMut {
        let mut out = BytesMut::new();
        for c in cmds {
            encode_command(Format::Protobuf, c, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn protobuf_several_commands_in_one_frame() {
        let sent = vec![
            Command {
                id: 1,
                connect: Some(ConnectRequest { token: "t".into(), name: "js".into(), ..Default::default() }),
                ..Default::default()
            },
            Command {
                id: 2,
                publish: Some(PublishRequest { channel: "news".into(), data: Bytes::from_static(&[0, 255, 10]) }),
                ..Default::default()
            },
            Command::default(),
        ];
        let frame = protobuf_frame(&sent);
        assert_eq!(commands(Format::Protobuf, &frame).unwrap(), sent);
    }

    /// A frame produced by the npm `centrifuge` 5.8.0 SDK's own Protobuf codec (`encodeCommands`), one
    /// command per method plus a send and an empty pong.
    const JS_SDK_FRAME: &str = "34080122300a036a7774120201021a100a046e6577731208180132026531380522026a732a05352e382e30\
        32080a03782d611201622908022a250a046e65777312027374180132046162313238054201074801500158016206666f7373696c\
        0e08033a0a0a046e657773120200ff120804520e0a0168380a4205080312017848010a08056a060a010912016d07080642030a\
        01700808074a040a02707307080832030a017507080972030a01720a080a7a060a01731201740562030a010500";

    #[test]
    fn protobuf_frame_from_the_js_sdk_decodes() {
        let frame: Vec<u8> = (0..JS_SDK_FRAME.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&JS_SDK_FRAME[i..i + 2], 16).unwrap())
            .collect();
        let cmds = commands(Format::Protobuf, &frame).unwrap();
        let methods: Vec<_> = cmds.iter().map(|c| (c.id, c.method())).collect();
        assert_eq!(
            methods,
            [
                (1, Some(Method::Connect)),
                (2, Some(Method::Subscribe)),
                (3, Some(Method::Publish)),
                (4, Some(Method::History)),
                (5, Some(Method::Rpc)),
                (6, Some(Method::Presence)),
                (7, Some(Method::PresenceStats)),
                (8, Some(Method::Unsubscribe)),
                (9, Some(Method::Refresh)),
                (10, Some(Method::SubRefresh)),
                (0, Some(Method::Send)),
                (0, None),
            ]
        );
        let connect = cmds[0].connect.as_ref().unwrap();
        assert_eq!((connect.token.as_str(), connect.name.as_str(), connect.version.as_str()), ("jwt", "js", "5.8.0"));
        assert_eq!(&connect.data[..], [1, 2]);
        assert_eq!(connect.headers.get("x-a").map(String::as_str), Some("b"));
        let restored = &connect.subs["news"];
        assert_eq!((restored.recover, restored.epoch.as_str(), restored.offset), (true, "e1", 5));
        assert_eq!(
            cmds[1].subscribe,
            Some(SubscribeRequest {
                channel: "news".into(),
                token: "st".into(),
                recover: true,
                epoch: "ab12".into(),
                offset: 5,
                data: Bytes::from_static(&[7]),
                positioned: true,
                recoverable: true,
                join_leave: true,
                delta: "fossil".into(),
            })
        );
        assert_eq!(&cmds[2].publish.as_ref().unwrap().data[..], [0, 255]);
        assert_eq!(
            cmds[3].history,
            Some(HistoryRequest {
                channel: "h".into(),
                limit: 10,
                since: Some(StreamPosition { offset: 3, epoch: "x".into() }),
                reverse: true,
            })
        );
        assert_eq!(cmds[4].rpc, Some(RpcRequest { data: Bytes::from_static(&[9]), method: "m".into() }));
        assert_eq!(cmds[9].sub_refresh, Some(SubRefreshRequest { channel: "s".into(), token: "t".into() }));
    }

    #[test]
    fn protobuf_empty_message_is_a_pong_command_without_method() {
        let cmds = commands(Format::Protobuf, &[0x00]).unwrap();
        assert_eq!(cmds, [Command::default()]);
        assert_eq!(cmds[0].method(), None);
        // …and the server ping is the empty reply, one zero length byte.
        let mut out = BytesMut::new();
        encode_reply(Format::Protobuf, &Reply::server_ping(), &mut out).unwrap();
        assert_eq!(&out[..], [0x00]);
    }

    #[test]
    fn protobuf_truncated_message_is_bad_request() {
        let frame = protobuf_frame(&[Command { id: 300, ..Default::default() }]);
        let err = commands(Format::Protobuf, &frame[..frame.len() - 1]).unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated { declared: 3, available: 2 }), "{err}");
        assert_eq!(err.disconnect().code, 3501);
    }

    #[test]
    fn protobuf_bad_varint_is_bad_request() {
        // Ends inside the prefix.
        assert!(matches!(commands(Format::Protobuf, &[0x80]).unwrap_err(), ProtocolError::BadVarint));
        // Eleven continuation bytes: longer than any u64.
        assert!(matches!(commands(Format::Protobuf, &[0xff; 11]).unwrap_err(), ProtocolError::BadVarint));
        // A valid but huge length.
        let err = commands(Format::Protobuf, &[0xff, 0xff, 0xff, 0xff, 0x0f]).unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated { declared: 0xffff_ffff, available: 0 }));
    }

    #[test]
    fn protobuf_malformed_body_is_bad_request() {
        // Length 2, then field 1 with wire type 2 (length-delimited) claiming 5 bytes.
        let err = commands(Format::Protobuf, &[0x02, 0x0a, 0x05]).unwrap_err();
        assert!(matches!(err, ProtocolError::Protobuf(_)));
        // Wire type 7 does not exist.
        assert!(matches!(commands(Format::Protobuf, &[0x01, 0x0f]).unwrap_err(), ProtocolError::Protobuf(_)));
        // A string field that is not UTF-8 (ConnectRequest.token).
        let err = commands(Format::Protobuf, &[0x05, 0x22, 0x03, 0x0a, 0x01, 0xff]).unwrap_err();
        assert!(matches!(err, ProtocolError::Protobuf(_)));
    }

    #[test]
    fn protobuf_unknown_fields_are_skipped() {
        // id = 7, then unknown field 99 (varint) = 1.
        let body = [0x08, 0x07, 0x98, 0x06, 0x01];
        let mut frame = vec![body.len() as u8];
        frame.extend_from_slice(&body);
        assert_eq!(commands(Format::Protobuf, &frame).unwrap(), [Command { id: 7, ..Default::default() }]);
    }

    #[test]
    fn replies_round_trip_through_both_formats() {
        let replies = vec![
            Reply {
                id: 1,
                connect: Some(ConnectResult {
                    client: "c".into(),
                    version: "1.0.0".into(),
                    ping: 25,
                    pong: true,
                    ..Default::default()
                }),
                ..Default::default()
            },
            Reply::push(Push {
                channel: "news".into(),
                publication: Some(Publication { data: Bytes::from_static(b"[1,2]"), offset: 8, ..Default::default() }),
                ..Default::default()
            }),
            Reply::server_ping(),
            Reply { id: 9, history: Some(HistoryResult::default()), ..Default::default() },
        ];
        for format in [Format::Json, Format::Protobuf] {
            let mut frame = BytesMut::new();
            for r in &replies {
                encode_reply(format, r, &mut frame).unwrap();
            }
            let mut decoded = Vec::new();
            decode_replies(format, &frame, &mut decoded).unwrap();
            assert_eq!(decoded, replies, "{format:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The fuzz entry point: any bytes, either format, an answer and no panic.
        #[test]
        fn decode_commands_never_panics(format in prop_oneof![Just(Format::Json), Just(Format::Protobuf)],
                                        frame in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            let _ = decode_commands(format, &frame, &mut out);
        }

        /// Arbitrary bytes after a valid-looking start reach deeper into the decoders.
        #[test]
        fn decode_commands_never_panics_on_mangled_valid_frames(
            format in prop_oneof![Just(Format::Json), Just(Format::Protobuf)],
            cut in any::<prop::sample::Index>(),
            noise in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let cmd = Command {
                id: 5,
                subscribe: Some(SubscribeRequest {
                    channel: "chat:1".into(), recover: true, epoch: "e".into(), offset: 3,
                    data: Bytes::from_static(b"{\"a\":[1,2,{}]}"), ..Default::default()
                }),
                ..Default::default()
            };
            let mut frame = BytesMut::new();
            encode_command(format, &cmd, &mut frame).unwrap();
            encode_command(format, &Command::default(), &mut frame).unwrap();
            let mut bytes = frame.to_vec();
            let at = cut.index(bytes.len() + 1);
            bytes.splice(at..at, noise);
            let _ = decode_commands(format, &bytes, &mut Vec::new());
        }
    }
}
