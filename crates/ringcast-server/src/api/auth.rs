//! The API key check, as Centrifugo's `APIKeyAuth` middleware does it:
//! 1. an `X-API-Key` header, if present and non-empty, is the only thing looked at;
//! 2. otherwise `Authorization: apikey <KEY>` (scheme case-insensitive, exactly two whitespace-separated words);
//! 3. failing both, an `api_key` query parameter (`/api/publish?api_key=…`; Centrifugo documents it for
//!    clients that cannot set headers, and recommends the header).
//!
//! With no key configured every call is refused (401) unless the API is explicitly `insecure`: an empty key
//! must never mean "no key needed" by accident. Keys are compared without an early exit on the first
//! differing byte, so response timing does not reveal how much of a guess was right (a length mismatch is
//! refused at once: the length is not the secret).

use axum::extract::Query;
use axum::http::{HeaderMap, Uri};
use serde::Deserialize;

use super::ApiConfig;

#[derive(Deserialize)]
struct KeyParam {
    api_key: Option<String>,
}

/// Whether a request carrying these headers and URI may call the API.
pub(crate) fn authorized(config: &ApiConfig, headers: &HeaderMap, uri: &Uri) -> bool {
    if config.insecure {
        return true;
    }
    let key = config.api_key.as_bytes();
    if key.is_empty() {
        return false;
    }
    let header_ok = match headers.get("x-api-key").map(|v| v.as_bytes()).filter(|v| !v.is_empty()) {
        Some(given) => constant_time_eq(key, given),
        None => headers
            .get("authorization")
            .is_some_and(|v| apikey_scheme(v.as_bytes()).is_some_and(|given| constant_time_eq(key, given))),
    };
    header_ok
        || uri.query().is_some_and(|q| !q.is_empty())
            && Query::<KeyParam>::try_from_uri(uri)
                .ok()
                .and_then(|Query(p)| p.api_key)
                .is_some_and(|given| constant_time_eq(key, given.as_bytes()))
}

/// The key of an `Authorization: apikey <KEY>` value.
fn apikey_scheme(value: &[u8]) -> Option<&[u8]> {
    let mut words = value.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty());
    let (scheme, key) = (words.next()?, words.next()?);
    (words.next().is_none() && scheme.eq_ignore_ascii_case(b"apikey")).then_some(key)
}

/// Equal contents, compared in time that depends only on the length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn config(key: &str) -> ApiConfig {
        ApiConfig { api_key: key.into(), insecure: false }
    }

    fn check(config: &ApiConfig, headers: &[(&'static str, &str)], uri: &str) -> bool {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).expect("header value"));
        }
        authorized(config, &map, &uri.parse().expect("uri"))
    }

    #[test]
    fn x_api_key_header() {
        let c = config("secret");
        assert!(check(&c, &[("x-api-key", "secret")], "/api/info"));
        assert!(!check(&c, &[("x-api-key", "secreT")], "/api/info"));
        assert!(!check(&c, &[("x-api-key", "secret2")], "/api/info"));
        assert!(!check(&c, &[], "/api/info"));
    }

    #[test]
    fn x_api_key_when_present_is_the_only_header_looked_at() {
        let c = config("secret");
        assert!(!check(&c, &[("x-api-key", "wrong"), ("authorization", "apikey secret")], "/api/info"));
        // An empty X-API-Key counts as absent.
        assert!(check(&c, &[("x-api-key", ""), ("authorization", "apikey secret")], "/api/info"));
    }

    #[test]
    fn authorization_apikey_scheme() {
        let c = config("secret");
        assert!(check(&c, &[("authorization", "apikey secret")], "/api"));
        assert!(check(&c, &[("authorization", "APIKEY  secret ")], "/api"));
        assert!(!check(&c, &[("authorization", "Bearer secret")], "/api"));
        assert!(!check(&c, &[("authorization", "apikey secret extra")], "/api"));
        assert!(!check(&c, &[("authorization", "secret")], "/api"));
    }

    #[test]
    fn api_key_query_parameter() {
        let c = config("s e&cret");
        assert!(check(&c, &[], "/api/info?api_key=s%20e%26cret"));
        assert!(check(&c, &[], "/api/info?x=1&api_key=s+e%26cret"));
        assert!(!check(&c, &[], "/api/info?api_key=nope"));
        assert!(!check(&c, &[], "/api/info?apikey=s%20e%26cret"));
        // A wrong header does not stop a right query parameter (Centrifugo checks the query last, on failure).
        assert!(check(&c, &[("x-api-key", "wrong")], "/api/info?api_key=s%20e%26cret"));
    }

    #[test]
    fn empty_key_refuses_everything_unless_insecure() {
        let c = config("");
        assert!(!check(&c, &[("x-api-key", "")], "/api/info"));
        assert!(!check(&c, &[("authorization", "apikey ")], "/api/info?api_key="));
        let insecure = ApiConfig { api_key: String::new(), insecure: true };
        assert!(check(&insecure, &[], "/api/info"));
        let insecure_with_key = ApiConfig { api_key: "k".into(), insecure: true };
        assert!(check(&insecure_with_key, &[("x-api-key", "wrong")], "/api/info"));
    }

    #[test]
    fn constant_time_eq_compares_contents_and_length() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
