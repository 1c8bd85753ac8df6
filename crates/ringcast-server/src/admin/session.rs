//! Who may see the dashboard: the password check and the session tokens a login hands out.
//!
//! A session token is `EXPIRY.MAC`: the expiry in Unix seconds and, base64url, HMAC-SHA256 under
//! `admin_secret` of `ringcast-admin:EXPIRY`. The server keeps no session table: a token is valid while
//! its MAC verifies and its expiry is ahead, so a restart with the same `admin_secret` keeps sessions,
//! and a new secret (or the random per-process one) ends them all. The login sets it as an HttpOnly,
//! SameSite=Strict cookie scoped to `/admin`; scripts can send it as `Authorization: token ...`.
//!
//! Both comparisons are constant-time (aws-lc's): the MAC through `hmac::verify`, the password by
//! comparing the MACs of the two strings, which also hides the configured password's length.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hmac};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The cookie a login sets.
pub const COOKIE: &str = "ringcast_admin";

/// The password and the token key.
pub struct Sessions {
    key: hmac::Key,
    password_mac: hmac::Tag,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions { .. }")
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Sessions {
    /// `secret` signs tokens (empty: 32 random bytes, so tokens last as long as the process).
    pub fn new(password: &str, secret: &str) -> Sessions {
        let key = if secret.is_empty() {
            let random: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
            hmac::Key::new(hmac::HMAC_SHA256, &random)
        } else {
            hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
        };
        let password_mac = hmac::sign(&key, &password_message(password));
        Sessions { key, password_mac }
    }

    /// Whether `candidate` is the configured password, in time independent of where they differ.
    pub fn password_matches(&self, candidate: &str) -> bool {
        let mac = hmac::sign(&self.key, &password_message(candidate));
        constant_time::verify_slices_are_equal(mac.as_ref(), self.password_mac.as_ref()).is_ok()
    }

    /// A token valid for [`SESSION_TTL`] from now.
    pub fn issue(&self) -> String {
        self.issue_until(now_secs() + SESSION_TTL.as_secs())
    }

    fn issue_until(&self, expiry: u64) -> String {
        let mac = hmac::sign(&self.key, token_message(expiry).as_bytes());
        format!("{expiry}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    /// The token's expiry (Unix seconds) when it is genuine and not expired.
    pub fn verify(&self, token: &str) -> Option<u64> {
        let (expiry, mac) = token.split_once('.')?;
        let expiry: u64 = expiry.parse().ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        hmac::verify(&self.key, token_message(expiry).as_bytes(), &mac).ok()?;
        (expiry > now_secs()).then_some(expiry)
    }

    /// Whether a token verified earlier, expiring at `expiry`, is still in force.
    pub fn still_valid(expiry: u64) -> bool {
        expiry > now_secs()
    }
}

fn token_message(expiry: u64) -> String {
    format!("ringcast-admin:{expiry}")
}

fn password_message(password: &str) -> Vec<u8> {
    let mut m = b"ringcast-admin-password:".to_vec();
    m.extend_from_slice(password.as_bytes());
    m
}

/// The session token of a request: the `ringcast_admin` cookie, or `Authorization: token T`.
pub fn token_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    if let Some(t) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("token "))
    {
        return Some(t.trim());
    }
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_password_matches() {
        let s = Sessions::new("correct horse", "");
        assert!(s.password_matches("correct horse"));
        for wrong in ["", "correct", "correct horse ", "Correct horse", "correct horsf"] {
            assert!(!s.password_matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn a_token_verifies_until_it_expires_and_only_under_its_key() {
        let s = Sessions::new("pw", "secret one");
        let t = s.issue();
        assert!(s.verify(&t).is_some());
        assert!(Sessions::new("pw", "secret one").verify(&t).is_some(), "same secret: survives a restart");
        assert!(Sessions::new("pw", "secret two").verify(&t).is_none(), "another secret: refused");
        assert!(s.verify(&s.issue_until(now_secs() - 1)).is_none(), "expired");
        let (expiry, mac) = t.split_once('.').unwrap();
        let later = format!("{}.{mac}", expiry.parse::<u64>().unwrap() + 3600);
        assert!(s.verify(&later).is_none(), "the expiry is covered by the MAC");
        for junk in ["", ".", "1.", "x.y", "99999999999.AAAA", &t[..t.len() - 1]] {
            assert!(s.verify(junk).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn the_token_comes_from_the_cookie_or_the_authorization_header() {
        use axum::http::{header, HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=b; ringcast_admin=T1; c=d"));
        assert_eq!(token_of(&h), Some("T1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("token T2"));
        assert_eq!(token_of(&h), Some("T2"));
        assert_eq!(token_of(&HeaderMap::new()), None);
    }
}
