//! The two serde rules that make our JSON match Centrifugo's, shared by every message.
//!
//! * `data`-like fields are `bytes` in the proto, but in JSON they are an *embedded JSON value* — never a
//!   base64 string. [`raw_json`] keeps the value's exact text in a [`Bytes`] on the way in and writes it
//!   back verbatim on the way out, so a payload is never parsed into a tree and re-printed.
//! * Centrifugo's decoder treats `"field": null` as an absent field. serde would reject `null` for a
//!   `String` or `u32`; [`nullable`] turns it into the type's default instead.
//!
//! Omission of empty values on output is the third rule; it is spelled out on each field with
//! `skip_serializing_if = "is_default"` (or `is_empty`) because a few fields are deliberately always written.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serializer};
use serde_json::value::RawValue;

/// `skip_serializing_if` predicate: the proto3 zero value (0, false, "").
pub(crate) fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Deserializes `null` as `T::default()`, anything else as `T`.
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Checks that `bytes` hold exactly one JSON value (surrounding whitespace allowed) and returns that value's
/// text without the surrounding whitespace.
///
/// This is the single definition of "what a JSON `data` field writes": the serde path below and the fan-out
/// fast path ([`crate::fanout`]) both call it, which is what keeps their output byte-identical.
pub(crate) fn json_value(bytes: &[u8]) -> Result<&RawValue, serde_json::Error> {
    serde_json::from_slice::<&RawValue>(bytes)
}

/// `#[serde(with = "raw_json")]` for `Bytes` fields that carry an embedded JSON value.
pub(crate) mod raw_json {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        // Validation costs one scan of the payload; writing invalid JSON would corrupt the whole frame for
        // the client (every reply batched with it), so an invalid payload is an encode error instead.
        let value = json_value(bytes).map_err(serde::ser::Error::custom)?;
        serde::Serialize::serialize(value, serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        // `Box<RawValue>` (rather than `&RawValue`) works for every input, borrowed or not; the one copy
        // it makes is the copy into the `Bytes` we keep anyway.
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        let text: Box<str> = raw.into();
        if &*text == "null" {
            // Centrifugo treats `"data": null` as no data.
            return Ok(Bytes::new());
        }
        Ok(Bytes::from(text.into_boxed_bytes()))
    }
}
