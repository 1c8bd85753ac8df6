//! Connection and subscription tokens: JWTs verified the way Centrifugo verifies them.
//!
//! Applications authenticate their users themselves and hand each one a JWT signed with a key ringcast
//! knows; ringcast never sees a password. Two kinds of token exist:
//! * a **connection token** (`connect` command, and `refresh` when it expires) names the user (`sub`,
//!   empty for anonymous) and may carry connection info, server-side channels and metadata;
//! * a **subscription token** (`subscribe` to a private `$` channel) names the user *and* the channel, so
//!   a token leaked for one channel or one user opens nothing else.
//!
//! The key is chosen by the token's `alg` header: HS256/384/512 use the HMAC secret, RS256/384/512 the RSA
//! public key, ES256/384 the ECDSA public key. An `alg` whose key is not configured is refused as an invalid
//! token, never verified with another key: that is what stops the classic "RS256 public key used as an
//! HS256 secret" forgery. The signature is always checked before any claim is believed, so an expired token
//! with a bad signature is *invalid*, not *expired*.
//!
//! Time is an argument (`now_unix`), not read from the clock, so expiry is tested exactly. `exp` absent or
//! `0` means the token never expires; `nbf`, when present, is honoured; `aud` and `iss` are ignored. The
//! only slack is [`TokenVerifier::with_leeway`] (default none).
//!
//! What a failure does to the client (reply error or disconnect, and which code) is decided in one place,
//! the `impl AuthError` block ([`AuthError::for_connect`], [`AuthError::for_refresh`],
//! [`AuthError::for_subscribe`]), following Centrifugo.
//!
//! This module refuses to do IO, read the clock, or panic on anything a client sent: every malformed token
//! is an [`AuthError`].

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::{self, DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use ringcast_protocol::{DisconnectCode, ErrorCode};

/// Configuration key names, used in errors so they point at what to fix.
const HMAC_KEY: &str = "token_hmac_secret_key";
const RSA_KEY: &str = "token_rsa_public_key";
const ECDSA_KEY: &str = "token_ecdsa_public_key";

/// The verification keys. An absent or empty value means "no key of that kind": tokens whose `alg` needs it
/// are refused.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenConfig {
    /// Secret for HS256/HS384/HS512 (`token_hmac_secret_key`).
    pub hmac_secret: Option<String>,
    /// PEM public key (`-----BEGIN PUBLIC KEY-----` or `RSA PUBLIC KEY`) for RS256/RS384/RS512.
    pub rsa_public_key: Option<String>,
    /// PEM public key (`-----BEGIN PUBLIC KEY-----`, P-256 or P-384) for ES256/ES384.
    pub ecdsa_public_key: Option<String>,
}

/// Never prints the HMAC secret: configurations end up in logs.
impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("hmac_secret", &self.hmac_secret.as_ref().map(|_| "<redacted>"))
            .field("rsa_public_key", &self.rsa_public_key.is_some())
            .field("ecdsa_public_key", &self.ecdsa_public_key.is_some())
            .finish()
    }
}

/// Why a token was refused, or why the verifier could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Signature valid, but `exp` is past. The client may fetch a new token and retry.
    #[error("token expired")]
    Expired,
    /// Malformed, badly signed, not yet valid (`nbf`), unsupported `alg`, or claims of the wrong shape.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `alg` needs a key that is not configured.
    #[error("invalid token: no {alg} verification key is configured")]
    NoKey { alg: &'static str },
    /// A valid subscription token for another channel.
    #[error("subscription token is for channel {token:?}, not {requested:?}")]
    WrongChannel { token: String, requested: String },
    /// A valid subscription token for another user.
    #[error("subscription token is for user {token:?}, not {connected:?}")]
    WrongUser { token: String, connected: String },
    /// A configured key could not be used (at start, never per token). Names the configuration key.
    #[error("`{key}`: {reason}")]
    BadKey { key: &'static str, reason: String },
    /// A token could not be signed (`gentoken`).
    #[error("cannot sign token: {0}")]
    Sign(String),
}

/// What happens to the client after a refused connection token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Reply to the command with this error; the connection stays.
    Error(ErrorCode),
    /// Close the connection with this code.
    Disconnect(DisconnectCode),
}

/// The name the connection handler uses for [`Outcome`].
pub type ConnectOutcome = Outcome;

/// What the client sees after a refused token: this impl block is the only place that decides it.
///
/// | | connect | refresh | subscribe | sub_refresh |
/// |---|---|---|---|---|
/// | expired | error 109 | disconnect 3005 | error 109 | error 109 |
/// | invalid, no key | disconnect 3500 | disconnect 3500 | error 103 | disconnect 3500 |
/// | wrong user / channel | — | disconnect 3500 | disconnect 3500 | disconnect 3500 |
///
/// Expired at connect or subscribe is a reply, so the SDK fetches a fresh token and retries. An expired
/// *refresh* token means the connection's time is up: Centrifugo closes with 3005 and the client reconnects
/// (with a new token). An invalid connection token is terminal (3500). An invalid subscription token only
/// fails that subscription (103), as in Centrifugo; a valid one for another user or channel disconnects
/// 3500, as in Centrifugo v6 (`internal/client/handler.go`, OnSubscribe), and so does any invalid token in
/// a `sub_refresh` (OnSubRefresh).
impl AuthError {
    /// For the `connect` command.
    pub fn for_connect(&self) -> Outcome {
        match self {
            AuthError::Expired => Outcome::Error(ErrorCode::TOKEN_EXPIRED),
            AuthError::Invalid(_)
            | AuthError::NoKey { .. }
            | AuthError::WrongChannel { .. }
            | AuthError::WrongUser { .. } => Outcome::Disconnect(DisconnectCode::INVALID_TOKEN),
            // Not the token's fault: the server could not do its part; the client may retry.
            AuthError::BadKey { .. } | AuthError::Sign(_) => Outcome::Error(ErrorCode::INTERNAL),
        }
    }

    /// For the `refresh` command (client-side refresh of the connection token). The handler also refuses,
    /// as [`AuthError::WrongUser`], a valid token for another user than the connection's.
    pub fn for_refresh(&self) -> Outcome {
        match self {
            AuthError::Expired => Outcome::Disconnect(DisconnectCode::EXPIRED),
            AuthError::BadKey { .. } | AuthError::Sign(_) => Outcome::Error(ErrorCode::INTERNAL),
            _ => Outcome::Disconnect(DisconnectCode::INVALID_TOKEN),
        }
    }

    /// For the `subscribe` command.
    pub fn for_subscribe(&self) -> Outcome {
        match self {
            AuthError::Expired => Outcome::Error(ErrorCode::TOKEN_EXPIRED),
            AuthError::BadKey { .. } | AuthError::Sign(_) => Outcome::Error(ErrorCode::INTERNAL),
            AuthError::Invalid(_) | AuthError::NoKey { .. } => Outcome::Error(ErrorCode::PERMISSION_DENIED),
            AuthError::WrongChannel { .. } | AuthError::WrongUser { .. } => {
                Outcome::Disconnect(DisconnectCode::INVALID_TOKEN)
            }
        }
    }

    /// For the `sub_refresh` command.
    pub fn for_sub_refresh(&self) -> Outcome {
        match self {
            AuthError::Expired => Outcome::Error(ErrorCode::TOKEN_EXPIRED),
            AuthError::BadKey { .. } | AuthError::Sign(_) => Outcome::Error(ErrorCode::INTERNAL),
            _ => Outcome::Disconnect(DisconnectCode::INVALID_TOKEN),
        }
    }
}

fn invalid(e: impl fmt::Display) -> AuthError {
    AuthError::Invalid(e.to_string())
}

/// Per-channel options a connection token's `subs` claim may carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSubOptions {
    /// Channel info (`info` as raw JSON, or `b64info` decoded); empty when absent.
    pub info: Bytes,
    /// Data sent to the client in the subscribe push (`data` as raw JSON, or `b64data` decoded); empty when
    /// absent.
    pub data: Bytes,
}

/// The claims of a verified connection token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectClaims {
    /// `sub`: the user id; empty for an anonymous connection.
    pub user: String,
    /// `exp` when set and non-zero: the Unix second at which the connection must be refreshed. With a
    /// leeway it may already be past.
    pub expires_at: Option<i64>,
    /// Connection info attached to presence and client publications: `info` as the exact JSON bytes the
    /// token carried, or `b64info` decoded (for Protobuf clients whose info is not JSON). `b64info` wins.
    /// Empty when absent (or JSON `null`).
    pub info: Bytes,
    /// `channels`: subscribe the connection to these server-side at connect.
    pub channels: Vec<String>,
    /// `subs`: server-side subscriptions with per-channel options.
    pub subs: BTreeMap<String, TokenSubOptions>,
    /// `meta`: raw JSON never sent to clients (for proxies); empty when absent.
    pub meta: Bytes,
}

/// The claims of a verified subscription token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeClaims {
    /// `sub`: equal to the connection's user (checked).
    pub user: String,
    /// `channel`: equal to the requested channel (checked).
    pub channel: String,
    /// `exp` when set and non-zero: the Unix second at which the subscription must be refreshed.
    pub expires_at: Option<i64>,
    /// Channel info: `info` as raw JSON bytes, or `b64info` decoded (`b64info` wins); empty when absent.
    pub info: Bytes,
}

/// Verifies connection and subscription tokens. Build once at start; cheap to share (`&self` only).
pub struct TokenVerifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ecdsa: Option<DecodingKey>,
    hmac_validation: Validation,
    rsa_validation: Validation,
    ecdsa_validation: Validation,
    leeway: i64,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("hmac", &self.hmac.is_some())
            .field("rsa", &self.rsa.is_some())
            .field("ecdsa", &self.ecdsa.is_some())
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Installs jsonwebtoken's aws-lc backend as the process default.
///
/// jsonwebtoken picks its backend from its crate features; if another crate in the build turned on its
/// other backend too, the inferred provider panics on first use. Installing ours explicitly, before any
/// token is verified or signed, rules that out. Idempotent: a provider installed earlier stands.
fn install_crypto_provider() {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

/// A value that is set and not empty.
fn configured(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.trim().is_empty())
}

/// Public-key settings must hold public keys: a private key there is a leak waiting to happen, and
/// jsonwebtoken would accept an RSA one and then fail every token.
fn public_pem(key: &'static str, pem: &str) -> Result<(), AuthError> {
    if pem.contains("PRIVATE KEY") {
        return Err(AuthError::BadKey { key, reason: "expected a PEM public key, got a private key".into() });
    }
    Ok(())
}

/// jsonwebtoken validation for one key family: signature and `alg` only. `exp`/`nbf` are checked by
/// [`TokenVerifier::check_times`] against the caller's clock, `aud`/`iss` not at all.
fn validation(algorithms: &[Algorithm]) -> Validation {
    Validation {
        algorithms: algorithms.to_vec(),
        required_spec_claims: HashSet::new(),
        validate_exp: false,
        validate_nbf: false,
        validate_aud: false,
        leeway: 0,
        ..Validation::default()
    }
}

const HMAC_ALGS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA_ALGS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
const ECDSA_ALGS: [Algorithm; 2] = [Algorithm::ES256, Algorithm::ES384];

/// The public key configured under `key`, if any, decoded with `decode`; errors name the key.
fn pem_key(
    key: &'static str,
    value: &Option<String>,
    decode: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>,
    what: &str,
) -> Result<Option<DecodingKey>, AuthError> {
    let Some(pem) = configured(value) else { return Ok(None) };
    public_pem(key, pem)?;
    decode(pem.as_bytes())
        .map(Some)
        .map_err(|e| AuthError::BadKey { key, reason: format!("not a PEM {what} public key ({e})") })
}

impl TokenVerifier {
    /// Builds the verifier; an unusable key is an error naming its configuration key.
    pub fn new(config: &TokenConfig) -> Result<TokenVerifier, AuthError> {
        install_crypto_provider();
        let hmac = configured(&config.hmac_secret).map(|s| DecodingKey::from_secret(s.as_bytes()));
        let rsa = pem_key(RSA_KEY, &config.rsa_public_key, DecodingKey::from_rsa_pem, "RSA")?;
        let ecdsa = pem_key(ECDSA_KEY, &config.ecdsa_public_key, DecodingKey::from_ec_pem, "ECDSA (P-256/P-384)")?;
        Ok(TokenVerifier {
            hmac,
            rsa,
            ecdsa,
            hmac_validation: validation(&HMAC_ALGS),
            rsa_validation: validation(&RSA_ALGS),
            ecdsa_validation: validation(&ECDSA_ALGS),
            leeway: 0,
        })
    }

    /// Tolerates this much clock skew on `exp` and `nbf` (whole seconds count). Default: none.
    pub fn with_leeway(mut self, leeway: Duration) -> TokenVerifier {
        self.leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// Whether any key is configured; without one every token is refused.
    pub fn has_keys(&self) -> bool {
        self.hmac.is_some() || self.rsa.is_some() || self.ecdsa.is_some()
    }

    /// Verifies a connection token at `now_unix` (seconds since the epoch).
    pub fn verify_connect(&self, token: &str, now_unix: i64) -> Result<ConnectClaims, AuthError> {
        let c: ConnectRepr = self.decode(token)?;
        self.check_times(c.exp, c.nbf, now_unix)?;
        // A subscription token must not open a connection: it was handed out for one channel only.
        if c.channel.as_deref().is_some_and(|ch| !ch.is_empty()) {
            return Err(AuthError::Invalid("a subscription token (with `channel`) is not a connection token".into()));
        }
        let subs = c
            .subs
            .unwrap_or_default()
            .into_iter()
            .map(|(channel, o)| {
                let o = o.unwrap_or_default();
                Ok((channel, TokenSubOptions { info: payload(o.info, o.b64info)?, data: payload(o.data, o.b64data)? }))
            })
            .collect::<Result<_, AuthError>>()?;
        Ok(ConnectClaims {
            user: c.sub.unwrap_or_default(),
            expires_at: c.exp.filter(|&e| e != 0),
            info: payload(c.info, c.b64info)?,
            channels: c.channels.unwrap_or_default(),
            subs,
            meta: c.meta.map(raw_bytes).unwrap_or_default(),
        })
    }

    /// Verifies a subscription token for `channel` presented by a connection of `user`, at `now_unix`.
    pub fn verify_subscribe(
        &self,
        token: &str,
        user: &str,
        channel: &str,
        now_unix: i64,
    ) -> Result<SubscribeClaims, AuthError> {
        let c: SubscribeRepr = self.decode(token)?;
        self.check_times(c.exp, c.nbf, now_unix)?;
        let token_channel = c.channel.unwrap_or_default();
        if token_channel != channel {
            return Err(AuthError::WrongChannel { token: token_channel, requested: channel.to_owned() });
        }
        let token_user = c.sub.unwrap_or_default();
        if token_user != user {
            return Err(AuthError::WrongUser { token: token_user, connected: user.to_owned() });
        }
        Ok(SubscribeClaims {
            user: token_user,
            channel: token_channel,
            expires_at: c.exp.filter(|&e| e != 0),
            info: payload(c.info, c.b64info)?,
        })
    }

    /// Checks the signature with the key the `alg` header calls for, then parses the claims.
    fn decode<T: DeserializeOwned>(&self, token: &str) -> Result<T, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let (key, validation, alg) = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => (&self.hmac, &self.hmac_validation, "HMAC"),
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => (&self.rsa, &self.rsa_validation, "RSA"),
            Algorithm::ES256 | Algorithm::ES384 => (&self.ecdsa, &self.ecdsa_validation, "ECDSA"),
            other => return Err(AuthError::Invalid(format!("unsupported algorithm {other:?}"))),
        };
        let key = key.as_ref().ok_or(AuthError::NoKey { alg })?;
        jsonwebtoken::decode::<T>(token, key, validation).map(|data| data.claims).map_err(invalid)
    }

    /// `exp` (0 or absent: never) and `nbf` against the caller's clock, with the configured leeway.
    ///
    /// A token is expired from its `exp` second on, as in Centrifugo (`exp` must be after now).
    fn check_times(&self, exp: Option<i64>, nbf: Option<i64>, now: i64) -> Result<(), AuthError> {
        if let Some(exp) = exp.filter(|&e| e != 0) {
            if now >= exp.saturating_add(self.leeway) {
                return Err(AuthError::Expired);
            }
        }
        if let Some(nbf) = nbf {
            if nbf > now.saturating_add(self.leeway) {
                return Err(AuthError::Invalid("token not valid yet (nbf)".into()));
            }
        }
        Ok(())
    }
}

/// Raw JSON exactly as the token carried it.
fn raw_bytes(raw: Box<RawValue>) -> Bytes {
    Bytes::from(String::from(Box::<str>::from(raw)))
}

/// A JSON payload or its base64 twin (standard alphabet, padded, as Go's `base64.StdEncoding`); the base64
/// one wins, as in Centrifugo. Empty when neither is there (a JSON `null` counts as absent).
fn payload(json: Option<Box<RawValue>>, b64: Option<String>) -> Result<Bytes, AuthError> {
    if let Some(b64) = b64.filter(|s| !s.is_empty()) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| AuthError::Invalid(format!("bad base64 payload: {e}")))?;
        return Ok(Bytes::from(bytes));
    }
    Ok(json.map(raw_bytes).unwrap_or_default())
}

#[derive(Deserialize)]
struct ConnectRepr {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<i64>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    b64info: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    subs: Option<BTreeMap<String, Option<SubOptionsRepr>>>,
    #[serde(default)]
    meta: Option<Box<RawValue>>,
    /// Only to refuse subscription tokens presented as connection tokens.
    #[serde(default)]
    channel: Option<String>,
}

/// One `subs` entry; Centrifugo's `override` and other fields are accepted and ignored.
#[derive(Default, Deserialize)]
struct SubOptionsRepr {
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    b64info: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    b64data: Option<String>,
}

#[derive(Deserialize)]
struct SubscribeRepr {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<i64>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    b64info: Option<String>,
}

/// A JWT NumericDate: seconds since the epoch, integer or fractional (RFC 7519 allows both; the fraction is
/// dropped). `null` is absent; anything else (a string, a non-finite number) makes the token invalid.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct Visitor;
    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a NumericDate (seconds since the epoch)")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(i64::try_from(v).unwrap_or(i64::MAX)))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.is_finite() {
                // `as` saturates at the i64 range.
                Ok(Some(v.floor() as i64))
            } else {
                Err(E::custom("NumericDate is not a finite number"))
            }
        }
    }
    d.deserialize_option(Visitor)
}

#[derive(Serialize)]
struct GenConnectClaims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    channels: &'a [String],
}

#[derive(Serialize)]
struct GenSubscribeClaims<'a> {
    sub: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
}

fn sign_hs256(secret: &str, claims: &impl Serialize) -> Result<String, AuthError> {
    if secret.trim().is_empty() {
        return Err(AuthError::BadKey { key: HMAC_KEY, reason: "is empty".into() });
    }
    install_crypto_provider();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|e| AuthError::Sign(e.to_string()))
}

/// An HS256 connection token for `user` (`""` for anonymous), expiring at `exp_unix` (`None`: never), with
/// server-side `channels`. For `ringcast gentoken` and tests.
pub fn make_hs256_token(
    secret: &str,
    user: &str,
    exp_unix: Option<i64>,
    channels: &[String],
) -> Result<String, AuthError> {
    sign_hs256(secret, &GenConnectClaims { sub: user, exp: exp_unix, channels })
}

/// An HS256 subscription token letting `user` subscribe to the private `channel`, expiring at `exp_unix`
/// (`None`: never). For `ringcast gensubtoken` and tests.
pub fn make_hs256_subscription_token(
    secret: &str,
    user: &str,
    channel: &str,
    exp_unix: Option<i64>,
) -> Result<String, AuthError> {
    sign_hs256(secret, &GenSubscribeClaims { sub: user, channel, exp: exp_unix })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "test-secret-do-not-use";
    const NOW: i64 = 1_700_000_000;

    // TEST KEYS ONLY: generated with `openssl genpkey` for this module; they protect nothing.
    const RSA_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQC9dB8NpNAaGhsk\n\
/4QRrSMPsHFzCX71+KwGwUb3GPagiDBVwIe9TE99OgJ6m56Bhrj9VKOJqqn/KEQK\n\
Zn4+DeB/xYjwRKhF956A1oDdjAYPoRzZeuhyVBuMCjUWiRFXUCguUNMq+tmMqbNV\n\
xe4Zr+nrmUzriLZ9Hj5XHMmfqkhYt6MowoJi90SkCx66BWI/v6wIv9yamZu0qz18\n\
wqmK7cu2kwWdNInMIoHJAsr6X5KQywpdDTfCZED9WAvl/HJi9nOnHn7oPl2ifzhU\n\
tq+A8a7QUY5abQEKSgEm/2IczcwO9+490NFSMxm99PrcuCQtlR+rWJTQjZHa5uSR\n\
eil4R2mbAgMBAAECggEAMqF2bRSHQvqIF5aryneNX7OFVjuK8RxwiOudVgsXWiab\n\
WEd4X0gmFC7tG6w8K5yAEr/MZs2z2ct+h5MFmPrnbO4zHxcSK4S2GPN6g/rYYdPq\n\
XFrDBU7h/8Z4kpm2BzIWUu5pyNo6SqPNmBYqADZpmvuguW+TaZOsEGbSoXeGFyMh\n\
ryr+K3X0ydkGpeBjEBY7rMx5OFsGB0gNTKOw1BKqoSrP0VxgOoFzR25q3EdVIqZA\n\
sYJ1zT92oAOCmGOwbj81A9a0Z0tgD9I+lXZHSYnUdTaSO7itOu+BkFX8tVzZ1dvM\n\
vj9/Tk9D8ol/VLlmVaWk19HebxrlJWygBTGaX/d2/QKBgQD+B8Qg7ZLSxvdU4KEG\n\
OvBLqungKUMA82C8TYNobMTeMVczAVPkXl4+ZAqrMtpTzA85Bh4JdOhqfuwO2o2t\n\
P3c3vKmNSO8UZ0/c9ehwb+9fsOv5ZhGdtNlpBeLK70MMFCHtaehFUqQeQJewZ2g6\n\
Zu2hxSJrgQa+uIuo81irQhRNrwKBgQC+7CysY/maJGENF/jOG6L7f3V5LL87F9k5\n\
0v7VMX1+5e/iEhIZhZEjVb5KM2bZ/P56eFpDiY+SawJajDE3KaBo2n4Pm6TrL55v\n\
o+3Mtb38BwX/kA2G3z2IGs3Ooou/jYoVdyu1bnPbl5guuGQa3ztutLtUBxNK5ZWg\n\
XyHQRlpp1QKBgD9yzyDuVdrBiWsww+dbd0NfCBVOGQc2wrWloqnFaRKaPk5mCX8j\n\
tuRcdnG2POPrNu4mQgBYq+hVlT5MhlB8ZpmMTMkWK2jsOP1WilzzCFXdScM8JDBA\n\
yIC70J6hThzJNoQnDLWr44QO3BRab6UOqlHafDNfwcCHNZLYXRBBa/LPAoGAD92E\n\
YNb1+O8o+XOSg14cjxWqZ2VmhryWmo2EC6dPLGpjIsAprOFCjFMluvjGhTrW0sqJ\n\
ha86tQobafbYaCMXZ18wto9ShxCv88sFictYfEcBIpmP5jNK47KGg7NSNZrHbL04\n\
bp09F3Rjew5rkygVwj9WiccEvWaSpn8BSlNuU/kCgYALbRcjUDy0KuVH+q11kx8D\n\
VaSVxAG6sIjhKSPa2JxMUeDoF1V4UHLRXvin7xj0H2G5tSEYjP8LzI8rxmR9yJb+\n\
0jlnopuZRKHp7XmeCqzDXxpmAE0b+HIChMib66zUFm07zDq9Aszu8tMLOXNvSkPp\n\
SqSxmb/I4kNJtISpwtEGgw==\n\
-----END PRIVATE KEY-----\n\
";

    const RSA_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvXQfDaTQGhobJP+EEa0j\n\
D7Bxcwl+9fisBsFG9xj2oIgwVcCHvUxPfToCepuegYa4/VSjiaqp/yhECmZ+Pg3g\n\
f8WI8ESoRfeegNaA3YwGD6Ec2XroclQbjAo1FokRV1AoLlDTKvrZjKmzVcXuGa/p\n\
65lM64i2fR4+VxzJn6pIWLejKMKCYvdEpAseugViP7+sCL/cmpmbtKs9fMKpiu3L\n\
tpMFnTSJzCKByQLK+l+SkMsKXQ03wmRA/VgL5fxyYvZzpx5+6D5don84VLavgPGu\n\
0FGOWm0BCkoBJv9iHM3MDvfuPdDRUjMZvfT63LgkLZUfq1iU0I2R2ubkkXopeEdp\n\
mwIDAQAB\n\
-----END PUBLIC KEY-----\n\
";

    const EC256_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglEhhJVeJEzRfSMhW\n\
CVBTeC3DfPkqpxVAi9Anrd1PZQOhRANCAAQJFM92ezTCwxm1t8hIPiKsgpiT2vBf\n\
+WP01sfYo/3utQYv0qq2c8AgLM2ho43XKrPQ21Am6gwKS84ibUxHJ4i5\n\
-----END PRIVATE KEY-----\n\
";

    const EC256_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAECRTPdns0wsMZtbfISD4irIKYk9rw\n\
X/lj9NbH2KP97rUGL9KqtnPAICzNoaON1yqz0NtQJuoMCkvOIm1MRyeIuQ==\n\
-----END PUBLIC KEY-----\n\
";

    const EC384_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDAsJONngCnKmMqijlxa\n\
zWvgEOMB39r65AIHAl9u477q5OE8pkdo4RtItwr9j28d6rmhZANiAAT9QqeBUcr3\n\
LfJ1BppMoNJp3nM1nLQCMf9KWJ7Ah1PiKEoekHux3QjrojmEovU/a+uXydLVaJVP\n\
KQmMOJ+1Ev9nL+8WhRVNyhD6YknsG1VY15yrtjsjABHPqcb34QXkXLg=\n\
-----END PRIVATE KEY-----\n\
";

    const EC384_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE/UKngVHK9y3ydQaaTKDSad5zNZy0AjH/\n\
SliewIdT4ihKHpB7sd0I66I5hKL1P2vrl8nS1WiVTykJjDiftRL/Zy/vFoUVTcoQ\n\
+mJJ7BtVWNecq7Y7IwARz6nG9+EF5Fy4\n\
-----END PUBLIC KEY-----\n\
";

    fn verifier(config: TokenConfig) -> TokenVerifier {
        TokenVerifier::new(&config).unwrap()
    }

    fn hmac_only() -> TokenVerifier {
        verifier(TokenConfig { hmac_secret: Some(SECRET.into()), ..Default::default() })
    }

    fn all_keys() -> TokenVerifier {
        verifier(TokenConfig {
            hmac_secret: Some(SECRET.into()),
            rsa_public_key: Some(RSA_PUBLIC.into()),
            ecdsa_public_key: Some(EC256_PUBLIC.into()),
        })
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &impl Serialize) -> String {
        install_crypto_provider();
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    fn hs(claims: &serde_json::Value) -> String {
        sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
    }

    fn b64url(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    // --- HMAC ---

    #[test]
    fn hs256_valid_token_yields_its_claims() {
        let t = hs(&json!({"sub": "42", "exp": NOW + 60}));
        let c = hmac_only().verify_connect(&t, NOW).unwrap();
        assert_eq!(c.user, "42");
        assert_eq!(c.expires_at, Some(NOW + 60));
        assert!(c.info.is_empty() && c.meta.is_empty() && c.channels.is_empty() && c.subs.is_empty());
    }

    #[test]
    fn hs384_and_hs512_use_the_same_secret() {
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t = sign(alg, &EncodingKey::from_secret(SECRET.as_bytes()), &json!({"sub": "u"}));
            assert_eq!(hmac_only().verify_connect(&t, NOW).unwrap().user, "u", "{alg:?}");
        }
    }

    #[test]
    fn expired_token_is_expired_109_at_connect_and_3005_at_refresh() {
        let t = hs(&json!({"sub": "u", "exp": NOW - 1}));
        let e = hmac_only().verify_connect(&t, NOW).unwrap_err();
        assert_eq!(e, AuthError::Expired);
        assert_eq!(e.for_connect(), Outcome::Error(ErrorCode::TOKEN_EXPIRED));
        assert_eq!(e.for_refresh(), Outcome::Disconnect(DisconnectCode::EXPIRED));
    }

    #[test]
    fn token_is_expired_from_its_exp_second_on() {
        let t = hs(&json!({"sub": "u", "exp": NOW}));
        assert_eq!(hmac_only().verify_connect(&t, NOW - 1).map(|c| c.user), Ok("u".into()));
        assert_eq!(hmac_only().verify_connect(&t, NOW), Err(AuthError::Expired));
    }

    #[test]
    fn exp_absent_or_zero_never_expires() {
        for claims in [json!({"sub": "u"}), json!({"sub": "u", "exp": 0}), json!({"sub": "u", "exp": null})] {
            let c = hmac_only().verify_connect(&hs(&claims), i64::MAX).unwrap();
            assert_eq!(c.expires_at, None, "{claims}");
        }
    }

    #[test]
    fn fractional_and_huge_exp_are_numeric_dates() {
        let t = hs(&json!({"sub": "u", "exp": (NOW as f64) + 10.75}));
        assert_eq!(hmac_only().verify_connect(&t, NOW).unwrap().expires_at, Some(NOW + 10));
        let t = hs(&json!({"sub": "u", "exp": u64::MAX}));
        assert_eq!(hmac_only().verify_connect(&t, NOW).unwrap().expires_at, Some(i64::MAX));
        let t = hs(&json!({"sub": "u", "exp": "tomorrow"}));
        assert!(matches!(hmac_only().verify_connect(&t, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn leeway_extends_exp_and_nbf_by_whole_seconds() {
        let v = hmac_only().with_leeway(Duration::from_millis(5900));
        let t = hs(&json!({"sub": "u", "exp": NOW - 4}));
        assert!(v.verify_connect(&t, NOW).is_ok());
        let t = hs(&json!({"sub": "u", "exp": NOW - 5}));
        assert_eq!(v.verify_connect(&t, NOW), Err(AuthError::Expired));
        let t = hs(&json!({"sub": "u", "nbf": NOW + 5}));
        assert!(v.verify_connect(&t, NOW).is_ok());
    }

    #[test]
    fn nbf_in_the_future_is_invalid() {
        let t = hs(&json!({"sub": "u", "nbf": NOW + 1}));
        assert!(matches!(hmac_only().verify_connect(&t, NOW), Err(AuthError::Invalid(_))));
        let t = hs(&json!({"sub": "u", "nbf": NOW}));
        assert!(hmac_only().verify_connect(&t, NOW).is_ok());
    }

    #[test]
    fn bad_signature_is_invalid_3500() {
        let t = sign(Algorithm::HS256, &EncodingKey::from_secret(b"another secret"), &json!({"sub": "u"}));
        let e = hmac_only().verify_connect(&t, NOW).unwrap_err();
        assert!(matches!(e, AuthError::Invalid(_)), "{e:?}");
        assert_eq!(e.for_connect(), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
        assert_eq!(e.for_refresh(), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
    }

    #[test]
    fn expired_token_with_bad_signature_is_invalid_not_expired() {
        let t = sign(Algorithm::HS256, &EncodingKey::from_secret(b"another secret"), &json!({"exp": NOW - 100}));
        assert!(matches!(hmac_only().verify_connect(&t, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn tampered_payload_is_invalid() {
        let t = hs(&json!({"sub": "alice"}));
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], b64url(r#"{"sub":"admin"}"#), parts[2]);
        assert!(matches!(hmac_only().verify_connect(&forged, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn alg_without_configured_key_is_no_key_3500() {
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let t = sign(Algorithm::RS256, &rsa, &json!({"sub": "u"}));
        let e = hmac_only().verify_connect(&t, NOW).unwrap_err();
        assert_eq!(e, AuthError::NoKey { alg: "RSA" });
        assert_eq!(e.for_connect(), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
        let e = verifier(TokenConfig::default()).verify_connect(&hs(&json!({"sub": "u"})), NOW).unwrap_err();
        assert_eq!(e, AuthError::NoKey { alg: "HMAC" });
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        // The algorithm-confusion forgery: the RSA public key is public, so an attacker can HMAC with it.
        let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()), &json!({"sub": "u"}));
        let rsa_only = verifier(TokenConfig { rsa_public_key: Some(RSA_PUBLIC.into()), ..Default::default() });
        assert_eq!(rsa_only.verify_connect(&forged, NOW), Err(AuthError::NoKey { alg: "HMAC" }));
        assert!(matches!(all_keys().verify_connect(&forged, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn alg_none_and_unsupported_algs_are_invalid() {
        let payload = b64url(r#"{"sub":"u"}"#);
        for header in [r#"{"alg":"none"}"#, r#"{"alg":"None","typ":"JWT"}"#, r#"{"alg":"ES512"}"#] {
            let t = format!("{}.{payload}.", b64url(header));
            assert!(matches!(all_keys().verify_connect(&t, NOW), Err(AuthError::Invalid(_))), "{header}");
        }
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let ps = sign(Algorithm::PS256, &rsa, &json!({"sub": "u"}));
        assert!(matches!(all_keys().verify_connect(&ps, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn empty_secret_means_no_hmac_key() {
        let v = verifier(TokenConfig { hmac_secret: Some(String::new()), ..Default::default() });
        assert!(!v.has_keys());
        assert_eq!(v.verify_connect(&hs(&json!({})), NOW), Err(AuthError::NoKey { alg: "HMAC" }));
    }

    // --- RSA and ECDSA ---

    #[test]
    fn rs256_rs384_rs512_verify_with_the_rsa_public_key() {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
            let t = sign(alg, &key, &json!({"sub": "r", "exp": NOW + 1}));
            assert_eq!(all_keys().verify_connect(&t, NOW).unwrap().user, "r", "{alg:?}");
        }
        let t = sign(Algorithm::RS256, &key, &json!({"sub": "r", "exp": NOW}));
        assert_eq!(all_keys().verify_connect(&t, NOW), Err(AuthError::Expired));
    }

    #[test]
    fn es256_verifies_with_the_p256_key_and_es384_with_a_p384_key() {
        let p256 = EncodingKey::from_ec_pem(EC256_PRIVATE.as_bytes()).unwrap();
        let t = sign(Algorithm::ES256, &p256, &json!({"sub": "e"}));
        assert_eq!(all_keys().verify_connect(&t, NOW).unwrap().user, "e");

        let p384 = EncodingKey::from_ec_pem(EC384_PRIVATE.as_bytes()).unwrap();
        let t384 = sign(Algorithm::ES384, &p384, &json!({"sub": "e384"}));
        let v384 = verifier(TokenConfig { ecdsa_public_key: Some(EC384_PUBLIC.into()), ..Default::default() });
        assert_eq!(v384.verify_connect(&t384, NOW).unwrap().user, "e384");
        // A P-256 signature against the P-384 key, and the other way round.
        assert!(matches!(v384.verify_connect(&t, NOW), Err(AuthError::Invalid(_))));
        assert!(matches!(all_keys().verify_connect(&t384, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn rsa_signature_over_another_payload_is_invalid() {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let a = sign(Algorithm::RS256, &key, &json!({"sub": "a"}));
        let b = sign(Algorithm::RS256, &key, &json!({"sub": "b"}));
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
        let spliced = format!("{}.{}.{}", a[0], a[1], b[2]);
        assert!(matches!(all_keys().verify_connect(&spliced, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn invalid_pem_is_an_error_naming_the_key() {
        let e = TokenVerifier::new(&TokenConfig { rsa_public_key: Some("not a key".into()), ..Default::default() })
            .unwrap_err();
        assert!(matches!(e, AuthError::BadKey { key: "token_rsa_public_key", .. }), "{e:?}");
        assert!(e.to_string().contains("`token_rsa_public_key`"), "{e}");
        let e = TokenVerifier::new(&TokenConfig {
            ecdsa_public_key: Some("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("`token_ecdsa_public_key`"), "{e}");
        // An RSA key where the ECDSA key belongs, and the other way round.
        let e = TokenVerifier::new(&TokenConfig { ecdsa_public_key: Some(RSA_PUBLIC.into()), ..Default::default() })
            .unwrap_err();
        assert!(matches!(e, AuthError::BadKey { key: "token_ecdsa_public_key", .. }), "{e:?}");
        let e = TokenVerifier::new(&TokenConfig { rsa_public_key: Some(EC256_PUBLIC.into()), ..Default::default() })
            .unwrap_err();
        assert!(matches!(e, AuthError::BadKey { key: "token_rsa_public_key", .. }), "{e:?}");
    }

    #[test]
    fn private_key_in_a_public_key_setting_is_refused() {
        for (config, key) in [
            (TokenConfig { rsa_public_key: Some(RSA_PRIVATE.into()), ..Default::default() }, RSA_KEY),
            (TokenConfig { ecdsa_public_key: Some(EC256_PRIVATE.into()), ..Default::default() }, ECDSA_KEY),
        ] {
            let e = TokenVerifier::new(&config).unwrap_err();
            assert!(e.to_string().contains(key) && e.to_string().contains("private key"), "{e}");
        }
    }

    // --- claims ---

    #[derive(Serialize)]
    struct RawInfoClaims<'a> {
        sub: &'a str,
        info: &'a RawValue,
        meta: &'a RawValue,
    }

    #[test]
    fn info_and_meta_raw_json_are_preserved_byte_for_byte() {
        let info_text = r#"{ "name" : "Ann",  "tags":[1, 2.50, "é\u00e9"], "z":null }"#;
        let meta_text = r#"[ true ,false]"#;
        let info = RawValue::from_string(info_text.into()).unwrap();
        let meta = RawValue::from_string(meta_text.into()).unwrap();
        let t = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &RawInfoClaims { sub: "u", info: &info, meta: &meta },
        );
        let c = hmac_only().verify_connect(&t, NOW).unwrap();
        assert_eq!(&c.info[..], info_text.as_bytes());
        assert_eq!(&c.meta[..], meta_text.as_bytes());
    }

    #[test]
    fn b64info_is_decoded_and_wins_over_info() {
        let t = hs(&json!({"sub": "u", "info": {"a": 1}, "b64info": "AAEC/w=="}));
        assert_eq!(&hmac_only().verify_connect(&t, NOW).unwrap().info[..], [0u8, 1, 2, 255]);
        let t = hs(&json!({"sub": "u", "b64info": "not base64!"}));
        assert!(matches!(hmac_only().verify_connect(&t, NOW), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn null_info_is_absent() {
        let t = hs(&json!({"sub": "u", "info": null, "meta": null}));
        let c = hmac_only().verify_connect(&t, NOW).unwrap();
        assert!(c.info.is_empty() && c.meta.is_empty());
    }

    #[test]
    fn channels_and_subs_are_parsed() {
        let t = hs(&json!({
            "sub": "u",
            "channels": ["news", "chat:lobby"],
            "subs": {
                "a": {"info": {"x": 1}, "data": "hello", "override": {"presence": {"value": true}}},
                "b": {"b64info": "AQ==", "b64data": "Ag=="},
                "c": {},
                "d": null
            }
        }));
        let c = hmac_only().verify_connect(&t, NOW).unwrap();
        assert_eq!(c.channels, ["news", "chat:lobby"]);
        assert_eq!(c.subs.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!(&c.subs["a"].info[..], br#"{"x":1}"#);
        assert_eq!(&c.subs["a"].data[..], br#""hello""#);
        assert_eq!(c.subs["b"], TokenSubOptions { info: Bytes::from_static(&[1]), data: Bytes::from_static(&[2]) });
        assert_eq!(c.subs["c"], TokenSubOptions::default());
        assert_eq!(c.subs["d"], TokenSubOptions::default());
    }

    #[test]
    fn anonymous_token_has_an_empty_user() {
        for claims in [json!({}), json!({"sub": ""}), json!({"sub": null})] {
            assert_eq!(hmac_only().verify_connect(&hs(&claims), NOW).unwrap().user, "", "{claims}");
        }
    }

    #[test]
    fn claims_of_the_wrong_shape_are_invalid() {
        for claims in [json!({"sub": 42}), json!({"channels": "news"}), json!({"subs": ["a"]}), json!([1, 2])] {
            assert!(matches!(hmac_only().verify_connect(&hs(&claims), NOW), Err(AuthError::Invalid(_))), "{claims}");
        }
    }

    #[test]
    fn aud_and_iss_are_ignored() {
        let t = hs(&json!({"sub": "u", "aud": "someone-else", "iss": "whoever"}));
        assert!(hmac_only().verify_connect(&t, NOW).is_ok());
    }

    // --- subscription tokens ---

    #[test]
    fn subscription_token_for_this_user_and_channel_is_accepted() {
        let t = hs(&json!({"sub": "u", "channel": "$secret", "exp": NOW + 10, "info": {"role": "mod"}}));
        let c = hmac_only().verify_subscribe(&t, "u", "$secret", NOW).unwrap();
        assert_eq!((c.user.as_str(), c.channel.as_str(), c.expires_at), ("u", "$secret", Some(NOW + 10)));
        assert_eq!(&c.info[..], br#"{"role":"mod"}"#);
        let t = hs(&json!({"sub": "u", "channel": "$secret", "b64info": "/w=="}));
        assert_eq!(&hmac_only().verify_subscribe(&t, "u", "$secret", NOW).unwrap().info[..], [255u8]);
    }

    #[test]
    fn subscription_token_for_another_channel_is_wrong_channel_103() {
        let t = hs(&json!({"sub": "u", "channel": "$other"}));
        let e = hmac_only().verify_subscribe(&t, "u", "$secret", NOW).unwrap_err();
        assert_eq!(e, AuthError::WrongChannel { token: "$other".into(), requested: "$secret".into() });
        assert_eq!(e.for_subscribe(), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
    }

    #[test]
    fn subscription_token_for_another_user_is_wrong_user_103() {
        let t = hs(&json!({"sub": "mallory", "channel": "$secret"}));
        let e = hmac_only().verify_subscribe(&t, "alice", "$secret", NOW).unwrap_err();
        assert_eq!(e, AuthError::WrongUser { token: "mallory".into(), connected: "alice".into() });
        assert_eq!(e.for_subscribe(), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
        // An anonymous connection cannot use a token issued to a user, nor the other way round.
        let e = hmac_only().verify_subscribe(&t, "", "$secret", NOW).unwrap_err();
        assert!(matches!(e, AuthError::WrongUser { .. }));
        let anon = hs(&json!({"channel": "$secret"}));
        assert!(hmac_only().verify_subscribe(&anon, "", "$secret", NOW).is_ok());
        assert!(matches!(
            hmac_only().verify_subscribe(&anon, "alice", "$secret", NOW),
            Err(AuthError::WrongUser { .. })
        ));
    }

    #[test]
    fn expired_subscription_token_is_109_and_invalid_one_is_103() {
        let t = hs(&json!({"sub": "u", "channel": "$c", "exp": NOW - 1}));
        let e = hmac_only().verify_subscribe(&t, "u", "$c", NOW).unwrap_err();
        assert_eq!(e.for_subscribe(), Outcome::Error(ErrorCode::TOKEN_EXPIRED));
        let e = hmac_only().verify_subscribe("garbage", "u", "$c", NOW).unwrap_err();
        assert_eq!(e.for_subscribe(), Outcome::Error(ErrorCode::PERMISSION_DENIED));
        let e = verifier(TokenConfig::default()).verify_subscribe(&t, "u", "$c", NOW).unwrap_err();
        assert_eq!(e.for_subscribe(), Outcome::Error(ErrorCode::PERMISSION_DENIED));
    }

    #[test]
    fn connection_token_is_not_a_subscription_token_and_vice_versa() {
        let connect = hs(&json!({"sub": "u"}));
        assert!(matches!(hmac_only().verify_subscribe(&connect, "u", "$c", NOW), Err(AuthError::WrongChannel { .. })));
        let subscribe = hs(&json!({"sub": "u", "channel": "$c"}));
        assert!(matches!(hmac_only().verify_connect(&subscribe, NOW), Err(AuthError::Invalid(_))));
    }

    // --- what the client sees, and gentoken ---

    #[test]
    fn outcomes_follow_centrifugo() {
        use Outcome::{Disconnect as D, Error as E};
        let invalid_token = D(DisconnectCode::INVALID_TOKEN);
        let errors = [
            AuthError::Expired,
            AuthError::Invalid("x".into()),
            AuthError::NoKey { alg: "RSA" },
            AuthError::WrongUser { token: "a".into(), connected: "b".into() },
            AuthError::WrongChannel { token: "a".into(), requested: "b".into() },
        ];
        let expired = E(ErrorCode::TOKEN_EXPIRED);
        let denied = E(ErrorCode::PERMISSION_DENIED);
        let expected = [
            (expired, D(DisconnectCode::EXPIRED), expired, expired),
            (invalid_token, invalid_token, denied, invalid_token),
            (invalid_token, invalid_token, denied, invalid_token),
            (invalid_token, invalid_token, invalid_token, invalid_token),
            (invalid_token, invalid_token, invalid_token, invalid_token),
        ];
        for (e, (connect, refresh, subscribe, sub_refresh)) in errors.iter().zip(expected) {
            assert_eq!(e.for_connect(), connect, "{e:?}");
            assert_eq!(e.for_refresh(), refresh, "{e:?}");
            assert_eq!(e.for_subscribe(), subscribe, "{e:?}");
            assert_eq!(e.for_sub_refresh(), sub_refresh, "{e:?}");
        }
        assert_eq!((DisconnectCode::INVALID_TOKEN.code, DisconnectCode::EXPIRED.code), (3500, 3005));
        assert_eq!((ErrorCode::TOKEN_EXPIRED.code, ErrorCode::PERMISSION_DENIED.code), (109, 103));
    }

    #[test]
    fn gentoken_tokens_verify() {
        let channels = vec!["news".to_string(), "chat:lobby".to_string()];
        let t = make_hs256_token(SECRET, "42", Some(NOW + 3600), &channels).unwrap();
        let c = hmac_only().verify_connect(&t, NOW).unwrap();
        assert_eq!((c.user.as_str(), c.expires_at, c.channels), ("42", Some(NOW + 3600), channels));
        let t = make_hs256_token(SECRET, "", None, &[]).unwrap();
        assert_eq!(hmac_only().verify_connect(&t, i64::MAX).unwrap(), ConnectClaims::default());
        let t = make_hs256_subscription_token(SECRET, "42", "$room", Some(NOW + 1)).unwrap();
        assert_eq!(hmac_only().verify_subscribe(&t, "42", "$room", NOW).unwrap().channel, "$room");
        assert!(matches!(
            make_hs256_token("", "u", None, &[]),
            Err(AuthError::BadKey { key: "token_hmac_secret_key", .. })
        ));
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let config = TokenConfig { hmac_secret: Some(SECRET.into()), ..Default::default() };
        assert!(!format!("{config:?}").contains(SECRET));
        assert!(!format!("{:?}", verifier(config)).contains(SECRET));
    }

    // --- hostile input ---

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn malformed_tokens_never_panic() {
        let v = all_keys();
        let valid = hs(&json!({"sub": "u", "channel": "$c", "info": {"a": [1, 2, 3]}}));
        let header = b64url(r#"{"alg":"HS256","typ":"JWT"}"#);
        let mut fixed: Vec<String> = vec![
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            "a.b.c".into(),
            format!("{header}.."),
            format!("{header}.e30."),
            format!("{header}.{}.", b64url("null")),
            format!("{header}.{}.", b64url("\"str\"")),
            format!("{header}.{}.AAAA", b64url(r#"{"exp":1e999}"#)),
            format!("{}.e30.AAAA", b64url(r#"{"alg":"RS256"}"#)),
            format!("{}.e30.AAAA", b64url(r#"{"alg":"ES256"}"#)),
            format!("{}.e30.AAAA", b64url(r#"{"alg":"ES384","kid":7}"#)),
            format!("{}.e30.AAAA", b64url("[]")),
            "\u{0}\u{7f}\u{ff}é.€.𝄞".into(),
            "A".repeat(100_000),
            ".".repeat(10_000),
            valid.replace('.', ""),
            format!("{valid}.extra"),
            format!("{valid}=="),
        ];
        let alphabet: Vec<char> = "ABCxyz019-_+/=.{}\":, \u{0}é".chars().collect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..2000 {
            let len = rng.below(120);
            fixed.push((0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect());
        }
        // Every single-character mutation of a valid token.
        let bytes: Vec<char> = valid.chars().collect();
        for i in 0..bytes.len() {
            let mut m = bytes.clone();
            m[i] = alphabet[rng.below(alphabet.len())];
            fixed.push(m.into_iter().collect());
        }
        for t in &fixed {
            let _ = v.verify_connect(t, NOW);
            let _ = v.verify_subscribe(t, "u", "$c", NOW);
        }
        assert!(v.verify_subscribe(&valid, "u", "$c", NOW).is_ok());
    }
}
