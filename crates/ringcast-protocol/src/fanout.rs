//! The fan-out hot path: a publication encoded once per format, the bytes shared by every subscriber.
//!
//! A publication to a channel with N subscribers becomes the *same* push for all of them, so the hub encodes
//! it once per wire format in use and hands each connection a clone of the resulting [`Bytes`] (a reference
//! count increment). The encoding is written directly — no `Reply`/`Push` structs built around a cloned
//! `Publication`, no serde machinery — but it must be byte-for-byte what [`crate::codec::encode_reply`]
//! would produce for `Reply::push(Push { channel, publication, .. })`: clients cannot tell the two paths
//! apart, and the tests below hold the two paths to equality over random inputs.
//!
//! Invariant for callers: an encoded push is immutable once shared. Batching it with other messages means
//! copying it next to them in a frame (with [`Format::separator`](crate::codec::Format::separator)), never
//! writing into it.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use crate::codec::Format;
use crate::error::EncodeError;
use crate::messages::{ClientInfo, Publication};
use crate::serde_helpers::json_value;

// Field numbers used below; they must match `messages.rs` (the equality tests check that they do).
const REPLY_PUSH: u32 = 4;
const PUSH_CHANNEL: u32 = 2;
const PUSH_PUB: u32 = 4;

/// Appends the push of `publication` in `channel` to the frame being built in `out`, exactly as
/// [`encode_reply`](crate::codec::encode_reply) would encode `Reply::push(Push { channel, pub, .. })` —
/// including the `\n` separator before it in JSON when `out` is not empty.
///
/// JSON: `{"push":{"channel":"news","pub":{"data":{…},"offset":8}}}`. The `data` (and `info`'s
/// `conn_info`/`chan_info`) are checked to be one JSON value each, once here rather than once per
/// subscriber. On error `out` is left as it was.
pub fn encode_publication_push(
    format: Format,
    channel: &str,
    publication: &Publication,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    match format {
        Format::Json => {
            let start = out.len();
            write_json_push(channel, publication, out).inspect_err(|_| out.truncate(start))
        }
        Format::Protobuf => write_protobuf_push(channel, publication, out),
    }
}

/// [`encode_publication_push`] into a buffer of its own, frozen for sharing.
pub fn publication_push_bytes(format: Format, channel: &str, publication: &Publication) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::with_capacity(estimated_len(channel, publication));
    encode_publication_push(format, channel, publication, &mut out)?;
    Ok(out.freeze())
}

/// Enough for the JSON form in the common case (escaping aside); the Protobuf form is always shorter.
fn estimated_len(channel: &str, publication: &Publication) -> usize {
    let info = publication
        .info
        .as_ref()
        .map_or(0, |i| 40 + i.user.len() + i.client.len() + i.conn_info.len() + i.chan_info.len());
    let tags: usize = publication.tags.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    48 + channel.len() + publication.data.len() + info + tags + 40
}

// ---------------------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------------------

fn write_json_push(channel: &str, publication: &Publication, out: &mut BytesMut) -> Result<(), EncodeError> {
    if !out.is_empty() {
        out.put_u8(b'\n');
    }
    out.put_slice(b"{\"push\":{");
    if !channel.is_empty() {
        out.put_slice(b"\"channel\":");
        write_json_str(channel, out);
        out.put_u8(b',');
    }
    out.put_slice(b"\"pub\":");
    write_json_publication(publication, out)?;
    out.put_slice(b"}}");
    Ok(())
}

/// Writes the fields that serde would write, in the same order, under the same omission rules
/// (see `Publication` in `messages.rs`).
fn write_json_publication(p: &Publication, out: &mut BytesMut) -> Result<(), EncodeError> {
    let mut fields = JsonFields::open(out);
    if !p.data.is_empty() {
        fields.name(out, "data");
        write_json_raw(&p.data, out)?;
    }
    if let Some(info) = &p.info {
        fields.name(out, "info");
        write_json_client_info(info, out)?;
    }
    if p.offset != 0 {
        fields.name(out, "offset");
        write_u64(p.offset, out);
    }
    if !p.tags.is_empty() {
        fields.name(out, "tags");
        let mut tags = JsonFields::open(out);
        for (k, v) in &p.tags {
            tags.key(out, k);
            write_json_str(v, out);
        }
        tags.close(out);
    }
    if p.delta {
        fields.name(out, "delta");
        out.put_slice(b"true");
    }
    fields.close(out);
    Ok(())
}

fn write_json_client_info(info: &ClientInfo, out: &mut BytesMut) -> Result<(), EncodeError> {
    // `user` and `client` are always written (see `ClientInfo`).
    out.put_slice(b"{\"user\":");
    write_json_str(&info.user, out);
    out.put_slice(b",\"client\":");
    write_json_str(&info.client, out);
    if !info.conn_info.is_empty() {
        out.put_slice(b",\"conn_info\":");
        write_json_raw(&info.conn_info, out)?;
    }
    if !info.chan_info.is_empty() {
        out.put_slice(b",\"chan_info\":");
        write_json_raw(&info.chan_info, out)?;
    }
    out.put_u8(b'}');
    Ok(())
}

/// An object being written: puts the commas between fields.
struct JsonFields {
    first: bool,
}

impl JsonFields {
    fn open(out: &mut BytesMut) -> JsonFields {
        out.put_u8(b'{');
        JsonFields { first: true }
    }

    fn comma(&mut self, out: &mut BytesMut) {
        if !std::mem::take(&mut self.first) {
            out.put_u8(b',');
        }
    }

    /// A field name known not to need escaping.
    fn name(&mut self, out: &mut BytesMut, name: &str) {
        self.comma(out);
        out.put_u8(b'"');
        out.put_slice(name.as_bytes());
        out.put_slice(b"\":");
    }

    /// An arbitrary key (map entry).
    fn key(&mut self, out: &mut BytesMut, key: &str) {
        self.comma(out);
        write_json_str(key, out);
        out.put_u8(b':');
    }

    fn close(self, out: &mut BytesMut) {
        out.put_u8(b'}');
    }
}

/// The embedded JSON value, validated and trimmed exactly as the serde path does it.
fn write_json_raw(bytes: &[u8], out: &mut BytesMut) -> Result<(), EncodeError> {
    let value = json_value(bytes).map_err(EncodeError::Json)?;
    out.put_slice(value.get().as_bytes());
    Ok(())
}

/// A JSON string literal, escaped the way serde_json escapes (so the two paths agree byte for byte):
/// `"` and `\` with a backslash; `\b \t \n \f \r` by their short forms; the other control characters
/// below U+0020 as `\u00XX` with lowercase hex; everything else — DEL and all non-ASCII — verbatim (the
/// string is UTF-8 already, and JSON text is UTF-8).
pub(crate) fn write_json_str(s: &str, out: &mut BytesMut) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.put_u8(b'"');
    // Copy runs of bytes that need no escape in one go; most channel names are a single run.
    let mut run_start = 0;
    let mut unicode = *b"\\u00XX";
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                unicode[4] = HEX[usize::from(b >> 4)];
                unicode[5] = HEX[usize::from(b & 0xf)];
                &unicode
            }
            _ => continue,
        };
        out.put_slice(&bytes[run_start..i]);
        out.put_slice(escape);
        run_start = i + 1;
    }
    out.put_slice(&bytes[run_start..]);
    out.put_u8(b'"');
}

fn write_u64(mut value: u64, out: &mut BytesMut) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        // `value % 10` is below 10, so the cast cannot truncate.
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

// ---------------------------------------------------------------------------------------------------------
// Protobuf
// ---------------------------------------------------------------------------------------------------------

/// `varint(len(Reply))`, then `Reply { push(4): Push { channel(2), pub(4): Publication } }` — the sizes are
/// computed first because each length prefix comes before its body.
fn write_protobuf_push(channel: &str, publication: &Publication, out: &mut BytesMut) -> Result<(), EncodeError> {
    use prost::Message;

    let pub_len = publication.encoded_len();
    let channel_field_len = if channel.is_empty() {
        0 // proto3 does not write an empty string
    } else {
        key_len(PUSH_CHANNEL) + encoded_len_varint(channel.len() as u64) + channel.len()
    };
    let push_len = channel_field_len + key_len(PUSH_PUB) + encoded_len_varint(pub_len as u64) + pub_len;
    let reply_len = key_len(REPLY_PUSH) + encoded_len_varint(push_len as u64) + push_len;
    out.reserve(encoded_len_varint(reply_len as u64) + reply_len);

    encode_varint(reply_len as u64, out);
    encode_key(REPLY_PUSH, WireType::LengthDelimited, out);
    encode_varint(push_len as u64, out);
    if !channel.is_empty() {
        encode_key(PUSH_CHANNEL, WireType::LengthDelimited, out);
        encode_varint(channel.len() as u64, out);
        out.put_slice(channel.as_bytes());
    }
    encode_key(PUSH_PUB, WireType::LengthDelimited, out);
    encode_varint(pub_len as u64, out);
    publication.encode(out).map_err(EncodeError::Protobuf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_replies, encode_reply};
    use crate::messages::{Push, Reply};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn generic(format: Format, channel: &str, publication: &Publication, out: &mut BytesMut) {
        let reply = Reply::push(Push {
            channel: channel.to_owned(),
            publication: Some(publication.clone()),
            ..Push::default()
        });
        encode_reply(format, &reply, out).unwrap();
    }

    fn assert_same(channel: &str, publication: &Publication) {
        for format in [Format::Json, Format::Protobuf] {
            // Into an empty buffer, and after a message already in the frame (separator rule).
            for prefix in [&b""[..], b"{}"] {
                let mut fast = BytesMut::from(prefix);
                let mut slow = BytesMut::from(prefix);
                encode_publication_push(format, channel, publication, &mut fast).unwrap();
                generic(format, channel, publication, &mut slow);
                assert_eq!(
                    fast,
                    slow,
                    "{format:?}\nfast: {}\nslow: {}",
                    String::from_utf8_lossy(&fast),
                    String::from_utf8_lossy(&slow)
                );
            }
        }
    }

    #[test]
    fn push_matches_the_documented_json_shape() {
        let p = Publication { data: Bytes::from_static(br#"{"text":"hi"}"#), offset: 8, ..Default::default() };
        let bytes = publication_push_bytes(Format::Json, "news", &p).unwrap();
        assert_eq!(&bytes[..], br#"{"push":{"channel":"news","pub":{"data":{"text":"hi"},"offset":8}}}"#);
        assert_same("news", &p);
    }

    #[test]
    fn push_with_every_publication_field() {
        let p = Publication {
            data: Bytes::from_static(b" [1, {\"a\": null}] "),
            info: Some(ClientInfo {
                user: "u\"1".into(),
                client: "c".into(),
                conn_info: Bytes::from_static(b"{\"n\":1}"),
                chan_info: Bytes::from_static(b"\"x\""),
            }),
            offset: u64::MAX,
            tags: BTreeMap::from([("k\n".to_owned(), "v\u{1}".to_owned()), ("a".to_owned(), String::new())]),
            delta: true,
        };
        assert_same("chat:\"room\"\\1", &p);
        assert_same("", &p);
        assert_same("x", &Publication::default());
        assert_same("x", &Publication { info: Some(ClientInfo::default()), ..Default::default() });
    }

    #[test]
    fn protobuf_push_decodes_back() {
        let p = Publication { data: Bytes::from_static(&[0, 1, 2, 255]), offset: 300, ..Default::default() };
        let bytes = publication_push_bytes(Format::Protobuf, "news", &p).unwrap();
        let mut replies = Vec::new();
        decode_replies(Format::Protobuf, &bytes, &mut replies).unwrap();
        let push = replies[0].push.as_ref().unwrap();
        assert_eq!((push.channel.as_str(), push.publication.as_ref()), ("news", Some(&p)));
    }

    #[test]
    fn json_push_rejects_invalid_data_and_leaves_the_frame() {
        let mut out = BytesMut::from(&b"{}"[..]);
        for bad in [&b"{"[..], b"1 2", b"\xff", b"'x'"] {
            let p = Publication { data: Bytes::copy_from_slice(bad), ..Default::default() };
            assert!(matches!(encode_publication_push(Format::Json, "c", &p, &mut out), Err(EncodeError::Json(_))));
            assert_eq!(&out[..], b"{}");
        }
    }

    #[test]
    fn string_escaping_matches_serde_json_for_every_ascii_byte() {
        let all: String = (0u8..=0x7f).map(char::from).collect();
        let mut out = BytesMut::new();
        write_json_str(&all, &mut out);
        assert_eq!(&out[..], serde_json::to_string(&all).unwrap().as_bytes());
    }

    #[test]
    fn u64_formatting_matches() {
        for v in [0, 1, 9, 10, 99, 100, 12345, u64::from(u32::MAX), u64::MAX] {
            let mut out = BytesMut::new();
            write_u64(v, &mut out);
            assert_eq!(&out[..], v.to_string().as_bytes());
        }
    }

    fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e12f64..1e12).prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ]
    }

    fn json_value_strategy() -> impl Strategy<Value = serde_json::Value> {
        json_leaf().prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Raw JSON text as a client might send it: compact or pretty, with surrounding whitespace sometimes.
    fn json_text() -> impl Strategy<Value = Bytes> {
        (json_value_strategy(), any::<bool>(), prop_oneof![Just(""), Just(" "), Just("\n\t ")]).prop_map(
            |(v, pretty, pad)| {
                let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) };
                Bytes::from(format!("{pad}{}{pad}", text.unwrap()))
            },
        )
    }

    fn client_info() -> impl Strategy<Value = ClientInfo> {
        (any::<String>(), any::<String>(), prop::option::of(json_text()), prop::option::of(json_text())).prop_map(
            |(user, client, conn, chan)| ClientInfo {
                user,
                client,
                conn_info: conn.unwrap_or_default(),
                chan_info: chan.unwrap_or_default(),
            },
        )
    }

    fn publication() -> impl Strategy<Value = Publication> {
        (
            prop::option::of(json_text()),
            prop::option::of(client_info()),
            prop_oneof![Just(0u64), any::<u64>()],
            proptest::collection::btree_map(any::<String>(), any::<String>(), 0..4),
            any::<bool>(),
        )
            .prop_map(|(data, info, offset, tags, delta)| Publication {
                data: data.unwrap_or_default(),
                info,
                offset,
                tags,
                delta,
            })
    }

    fn channel() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z:$#._-]{1,24}",
            // Quotes, backslashes, control characters, DEL, unicode incl. astral and U+2028.
            proptest::collection::vec(
                prop_oneof![
                    Just('"'),
                    Just('\\'),
                    Just('/'),
                    Just('\u{7f}'),
                    Just('\u{2028}'),
                    Just('😀'),
                    proptest::char::range('\0', '\u{1f}'),
                    any::<char>(),
                ],
                0..24
            )
            .prop_map(|chars| chars.into_iter().collect()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn fast_path_is_byte_identical_to_generic_encoding(channel in channel(), p in publication()) {
            assert_same(&channel, &p);
        }

        #[test]
        fn protobuf_fast_path_is_byte_identical_for_arbitrary_data(
            channel in any::<String>(),
            data in proptest::collection::vec(any::<u8>(), 0..300),
            offset in any::<u64>(),
        ) {
            let p = Publication { data: Bytes::from(data), offset, ..Default::default() };
            let mut fast = BytesMut::new();
            let mut slow = BytesMut::new();
            encode_publication_push(Format::Protobuf, &channel, &p, &mut fast).unwrap();
            generic(Format::Protobuf, &channel, &p, &mut slow);
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn escaping_matches_serde_json(s in any::<String>()) {
            let mut out = BytesMut::new();
            write_json_str(&s, &mut out);
            let expected = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(&out[..], expected.as_bytes());
        }
    }
}
