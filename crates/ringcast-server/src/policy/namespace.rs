//! Channel namespaces, their options, and the rules deciding what a client may do on a channel.
//!
//! A channel name is a plain string; two prefixes give it meaning, exactly as in Centrifugo:
//! * `$` at the very start makes it **private**: subscribing needs a subscription token
//!   ([`crate::policy::auth`]). The prefix comes before the namespace: `$secrets`, `$chat:room` (private, in
//!   namespace `chat`). `chat:$room` is *not* private.
//! * `ns:` makes it part of **namespace** `ns`, the text before the first `:` (after a leading `$`). No `:`
//!   (or an empty prefix, `:x`) means the default namespace. A namespace that is not configured answers
//!   `102 unknown channel`.
//!
//! Every namespace has [`ChannelOptions`]; by default a client may do nothing on a channel (the backend
//! publishes through the server API). The `allow_*` options open operations up, with Centrifugo's names
//! and semantics: `…_for_client` lets any authenticated connection do it, `…_for_subscriber` only
//! connections subscribed to the channel, and `…_for_anonymous` extends either to connections without a
//! user.
//!
//! The decisions are pure functions ([`can_subscribe`], [`can_publish`], [`can_presence`], [`features`],
//! [`can_history`], …) returning [`Denied`], which maps to the protocol error code in one place,
//! [`Denied::error_code`]. No IO, no clock, no state beyond the validated configuration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use ringcast_protocol::ErrorCode;

/// Prefix of private channels.
pub const PRIVATE_PREFIX: char = '$';
/// Separates a namespace from the rest of a channel name.
pub const NAMESPACE_BOUNDARY: char = ':';
/// Longest channel name accepted by default, in bytes (Centrifugo's `channel_max_length`).
pub const DEFAULT_CHANNEL_MAX_LENGTH: usize = 255;
/// Separates a user-limited channel's name from the users it admits (`news#42,43`).
pub const USER_BOUNDARY: char = '#';
/// Separates the users of a user-limited channel.
pub const USER_SEPARATOR: char = ',';
/// How long a stream's position is kept when `history_meta_ttl` is not set (Centrifugo's default, 720h).
pub const DEFAULT_HISTORY_META_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Centrifugo channel options ringcast does not implement. Each is refused by name when configured, so
/// that no configuration silently loses a behaviour it asked for.
pub const UNSUPPORTED_OPTIONS: &[&str] = &[
    "map_clients_presence_channel_prefix",
    "map_users_presence_channel_prefix",
    "force_recovery_mode",
    "auto_cache_recover",
    "allowed_delta_types",
    "allow_tags_filter",
    "delta_publish",
    "publication_data_format",
    "subscribe_proxy_enabled",
    "subscribe_proxy_name",
    "publish_proxy_enabled",
    "publish_proxy_name",
    "sub_refresh_proxy_enabled",
    "sub_refresh_proxy_name",
    "subscribe_stream_proxy_enabled",
    "subscribe_stream_proxy_name",
    "subscribe_stream_proxy_bidirectional",
    "subscription_type",
    "map",
    "shared_poll",
];

/// Options of the channels of one namespace. Every field defaults to off/zero; unknown keys are refused.
///
/// Names and meaning follow Centrifugo's channel options (v4+, the client protocol v2 generation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelOptions {
    /// Keep track of who is subscribed (presence). Required for `presence`/`presence_stats` commands.
    pub presence: bool,
    /// Publish join/leave events when clients subscribe and unsubscribe.
    pub join_leave: bool,
    /// Push join/leave events to every subscriber, whether it asked for them or not.
    pub force_push_join_leave: bool,
    /// Publications kept per channel; 0 = no history. Needs `history_ttl`.
    pub history_size: usize,
    /// How long history is kept after the last publication; 0 = no history. Needs `history_size`.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// How long a stream's position (offset, epoch) is kept after its last publication, so a client can
    /// still tell it missed something; 0 = [`DEFAULT_HISTORY_META_TTL`] (Centrifugo's 30 days). Not
    /// shorter than `history_ttl`.
    #[serde(with = "humantime_serde")]
    pub history_meta_ttl: Duration,
    /// Make every subscription positioned (the server checks the client misses nothing).
    pub force_positioning: bool,
    /// Let a client ask for positioning.
    pub allow_positioning: bool,
    /// Make every subscription recoverable (missed publications replayed on resubscribe). Needs history.
    pub force_recovery: bool,
    /// Let a client ask for recovery even without history permissions.
    pub allow_recovery: bool,
    /// Any authenticated connection may subscribe (private `$` channels still need a token).
    pub allow_subscribe_for_client: bool,
    /// Extends `allow_subscribe_for_client` to anonymous connections.
    pub allow_subscribe_for_anonymous: bool,
    /// Any authenticated connection may publish.
    pub allow_publish_for_client: bool,
    /// Connections subscribed to the channel may publish.
    pub allow_publish_for_subscriber: bool,
    /// Extends the two publish permissions to anonymous connections.
    pub allow_publish_for_anonymous: bool,
    /// Any authenticated connection may ask for presence.
    pub allow_presence_for_client: bool,
    /// Connections subscribed to the channel may ask for presence.
    pub allow_presence_for_subscriber: bool,
    /// Extends the two presence permissions to anonymous connections.
    pub allow_presence_for_anonymous: bool,
    /// Any authenticated connection may ask for history.
    pub allow_history_for_client: bool,
    /// Connections subscribed to the channel may ask for history.
    pub allow_history_for_subscriber: bool,
    /// Extends the two history permissions to anonymous connections.
    pub allow_history_for_anonymous: bool,
    /// Channels with `#` are user-limited: `news#42,43` admits only users `42` and `43` (no token needed,
    /// and `allow_subscribe_for_client` does not open them to others).
    pub allow_user_limited_channels: bool,
    /// A regular expression the channel name (after the namespace prefix) must match; empty: any ASCII
    /// name. A name that does not match is answered 107 bad request.
    pub channel_regex: String,
}

impl ChannelOptions {
    /// What `ringcast serve --dev` uses: anyone, anonymous included, may subscribe, publish, and ask for
    /// presence and history; presence and join/leave are on; the last 100 publications are kept for an hour.
    pub fn dev() -> ChannelOptions {
        ChannelOptions {
            presence: true,
            // Off even in dev: on a channel with n subscribers, joins cost O(n²) pushes (50 million for
            // 10,000 subscribers). Enable it per namespace where it is wanted.
            join_leave: false,
            force_push_join_leave: false,
            history_size: 100,
            history_ttl: Duration::from_secs(3600),
            history_meta_ttl: Duration::ZERO,
            force_positioning: false,
            allow_positioning: true,
            force_recovery: false,
            allow_recovery: true,
            allow_subscribe_for_client: true,
            allow_subscribe_for_anonymous: true,
            allow_publish_for_client: true,
            allow_publish_for_subscriber: true,
            allow_publish_for_anonymous: true,
            allow_presence_for_client: true,
            allow_presence_for_subscriber: true,
            allow_presence_for_anonymous: true,
            allow_history_for_client: true,
            allow_history_for_subscriber: true,
            allow_history_for_anonymous: true,
            allow_user_limited_channels: false,
            channel_regex: String::new(),
        }
    }

    /// How long a stream's position outlives its last publication: `history_meta_ttl`, or the default.
    pub fn effective_history_meta_ttl(&self) -> Duration {
        if self.history_meta_ttl.is_zero() {
            DEFAULT_HISTORY_META_TTL
        } else {
            self.history_meta_ttl
        }
    }

    /// History is kept only when both its size and its TTL are set.
    pub fn history_enabled(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }

    /// Whether the channel's publications carry positions (offsets): with history, or when positioning
    /// or recovery is forced. Only the engine assigns them, so a publication of such a channel is never
    /// delivered by its node alone (see [`crate::pubsub::node::Node`]'s publish).
    pub fn keeps_positions(&self) -> bool {
        self.history_enabled() || self.force_positioning || self.force_recovery
    }

    /// The rules Centrifugo enforces at start; `scope` names the namespace in the error.
    fn validate(&self, scope: &Scope) -> Result<(), NamespaceError> {
        let bad = |option: &'static str, reason: &'static str| NamespaceError::InvalidOption {
            scope: scope.to_string(),
            option,
            reason,
        };
        if self.history_size > 0 && self.history_ttl.is_zero() {
            return Err(bad("history_ttl", "must be set when history_size is (history needs both)"));
        }
        if self.history_size == 0 && !self.history_ttl.is_zero() {
            return Err(bad("history_size", "must be set when history_ttl is (history needs both)"));
        }
        if self.history_ttl.subsec_nanos() != 0 {
            return Err(bad("history_ttl", "must be a whole number of seconds"));
        }
        if self.history_meta_ttl.subsec_nanos() != 0 {
            return Err(bad("history_meta_ttl", "must be a whole number of seconds"));
        }
        if self.effective_history_meta_ttl() < self.history_ttl {
            return Err(bad("history_meta_ttl", "must not be shorter than history_ttl"));
        }
        if self.force_recovery && !self.history_enabled() {
            return Err(bad("force_recovery", "needs history (history_size and history_ttl)"));
        }
        Ok(())
    }

    /// The compiled `channel_regex`, if set.
    fn compile_regex(&self, scope: &Scope) -> Result<Option<regex::Regex>, NamespaceError> {
        if self.channel_regex.is_empty() {
            return Ok(None);
        }
        regex::Regex::new(&self.channel_regex)
            .map(Some)
            .map_err(|e| NamespaceError::InvalidRegex { scope: scope.to_string(), error: e.to_string() })
    }
}

/// A configured namespace: its name and its options, side by side in the same table
/// (`{ name = "chat", presence = true, … }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceConfig {
    pub name: String,
    #[serde(flatten)]
    pub options: ChannelOptions,
}

/// Written by hand because serde's `flatten` would silently drop misspelt options (it cannot be combined
/// with `deny_unknown_fields`). Here `name` is taken out and everything else must be a known option; an
/// error names the namespace and the offending key.
impl<'de> Deserialize<'de> for NamespaceConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let name = match table.remove("name") {
            Some(serde_json::Value::String(name)) => name,
            Some(other) => return Err(de::Error::custom(format!("namespace `name` must be a string, got {other}"))),
            None => return Err(de::Error::missing_field("name")),
        };
        if let Some(key) = unsupported_option(&table) {
            return Err(de::Error::custom(format!("namespace `{name}`: {}", unsupported_message(key))));
        }
        let options = ChannelOptions::deserialize(serde_json::Value::Object(table))
            .map_err(|e| de::Error::custom(format!("namespace `{name}`: {e}")))?;
        Ok(NamespaceConfig { name, options })
    }
}

/// The first key of `table` that is a Centrifugo option ringcast does not implement.
fn unsupported_option(table: &serde_json::Map<String, serde_json::Value>) -> Option<&'static str> {
    UNSUPPORTED_OPTIONS.iter().copied().find(|k| table.contains_key(*k))
}

fn unsupported_message(key: &str) -> String {
    format!("`{key}` is a Centrifugo channel option ringcast does not implement; remove it")
}

/// Reads channel options (the `[channels]` table) refusing, by name, the Centrifugo options ringcast does
/// not implement (unknown keys are refused by `deny_unknown_fields` as for any option).
pub fn deserialize_options<'de, D: Deserializer<'de>>(d: D) -> Result<ChannelOptions, D::Error> {
    let table = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    if let Some(key) = unsupported_option(&table) {
        return Err(de::Error::custom(unsupported_message(key)));
    }
    ChannelOptions::deserialize(serde_json::Value::Object(table)).map_err(de::Error::custom)
}

/// A configuration mistake, found at start. Names the namespace and, where it applies, the option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace {name:?}: name must be at least 2 characters of a-z, A-Z, 0-9, '-', '_', '.'")]
    InvalidName { name: String },
    #[error("namespace `{name}` is defined more than once")]
    Duplicate { name: String },
    #[error("{scope}: `{option}` {reason}")]
    InvalidOption { scope: String, option: &'static str, reason: &'static str },
    #[error("{scope}: `channel_regex` is not a valid regular expression: {error}")]
    InvalidRegex { scope: String, error: String },
}

/// Where options come from, for error messages.
enum Scope<'a> {
    Default,
    Namespace(&'a str),
}

impl std::fmt::Display for Scope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Default => f.write_str("default channel options"),
            Scope::Namespace(name) => write!(f, "namespace `{name}`"),
        }
    }
}

/// Centrifugo's namespace name rule, `^[-a-zA-Z0-9_.]{2,}$`.
fn is_valid_namespace_name(name: &str) -> bool {
    name.len() >= 2 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The channel's namespace in a configuration that does not know it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown namespace `{namespace}`")]
pub struct UnknownNamespace {
    pub namespace: String,
}

/// Why a client command on a channel is refused. [`Denied::error_code`] is the only place these become
/// protocol error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The channel's namespace is not configured.
    #[error("unknown namespace `{0}`")]
    UnknownNamespace(String),
    /// The options (or a missing subscription token) do not allow it.
    #[error("permission denied")]
    PermissionDenied,
    /// The feature is off for the channel (presence, history).
    #[error("not available")]
    NotAvailable,
    /// The channel name is over the configured maximum length.
    #[error("channel name is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    /// The channel name is empty or not ASCII.
    #[error("channel name is empty or not ASCII")]
    BadName,
}

impl Denied {
    /// The reply error: 102 unknown channel, 103 permission denied, 108 not available, 107 bad request
    /// (name too long or malformed: Centrifugo answers both with `ErrorBadRequest`).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Denied::UnknownNamespace(_) => ErrorCode::UNKNOWN_CHANNEL,
            Denied::PermissionDenied => ErrorCode::PERMISSION_DENIED,
            Denied::NotAvailable => ErrorCode::NOT_AVAILABLE,
            Denied::TooLong { .. } => ErrorCode::BAD_REQUEST,
            Denied::BadName => ErrorCode::BAD_REQUEST,
        }
    }
}

impl From<UnknownNamespace> for Denied {
    fn from(e: UnknownNamespace) -> Denied {
        Denied::UnknownNamespace(e.namespace)
    }
}

/// Whether subscribing to `channel` needs a subscription token.
pub fn is_private(channel: &str) -> bool {
    channel.starts_with(PRIVATE_PREFIX)
}

/// The namespace of `channel`: the text before the first `:`, after a leading `$`. `None` for the default
/// namespace (no `:`, or nothing before it).
pub fn namespace_of(channel: &str) -> Option<&str> {
    let rest = channel.strip_prefix(PRIVATE_PREFIX).unwrap_or(channel);
    match rest.split_once(NAMESPACE_BOUNDARY) {
        Some((ns, _)) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

/// The validated namespace configuration: default options, named namespaces, the channel name limit.
#[derive(Debug, Clone)]
pub struct Namespaces {
    default: Namespace,
    named: HashMap<String, Namespace>,
    /// Dev mode: a namespace that is not configured uses the default options instead of being unknown.
    any_namespace: bool,
    max_channel_length: usize,
}

/// One namespace's options, with what is compiled from them.
#[derive(Debug, Clone)]
struct Namespace {
    /// Shared, so that a lookup can outlive a configuration reload ([`Namespaces::channel_options_shared`]).
    options: Arc<ChannelOptions>,
    regex: Option<regex::Regex>,
}

impl Namespace {
    fn new(options: ChannelOptions, scope: &Scope) -> Result<Namespace, NamespaceError> {
        options.validate(scope)?;
        let regex = options.compile_regex(scope)?;
        Ok(Namespace { options: Arc::new(options), regex })
    }
}

impl PartialEq for Namespaces {
    /// The regexes are compiled from the options, so comparing the options compares them too.
    fn eq(&self, other: &Namespaces) -> bool {
        let opts = |n: &Namespaces| -> Vec<(String, ChannelOptions)> {
            let mut v: Vec<_> = n.named.iter().map(|(k, ns)| (k.clone(), ChannelOptions::clone(&ns.options))).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        self.default.options == other.default.options
            && self.any_namespace == other.any_namespace
            && self.max_channel_length == other.max_channel_length
            && opts(self) == opts(other)
    }
}

impl Default for Namespaces {
    /// No namespaces, default options that let clients do nothing.
    fn default() -> Namespaces {
        Namespaces {
            default: Namespace { options: Arc::new(ChannelOptions::default()), regex: None },
            named: HashMap::new(),
            any_namespace: false,
            max_channel_length: DEFAULT_CHANNEL_MAX_LENGTH,
        }
    }
}

impl Namespaces {
    /// Validates and indexes the configuration: namespace names match `^[-a-zA-Z0-9_.]{2,}$` and are
    /// unique, and every set of options is coherent (history needs both size and TTL, whole seconds;
    /// `force_recovery` needs history; `channel_regex` compiles).
    pub fn new(default: ChannelOptions, namespaces: Vec<NamespaceConfig>) -> Result<Namespaces, NamespaceError> {
        let default = Namespace::new(default, &Scope::Default)?;
        let mut named = HashMap::with_capacity(namespaces.len());
        for ns in namespaces {
            if !is_valid_namespace_name(&ns.name) {
                return Err(NamespaceError::InvalidName { name: ns.name });
            }
            let compiled = Namespace::new(ns.options, &Scope::Namespace(&ns.name))?;
            if named.contains_key(&ns.name) {
                return Err(NamespaceError::Duplicate { name: ns.name });
            }
            named.insert(ns.name, compiled);
        }
        Ok(Namespaces { default, named, any_namespace: false, max_channel_length: DEFAULT_CHANNEL_MAX_LENGTH })
    }

    /// `ringcast serve --dev`: every channel, in any namespace, has [`ChannelOptions::dev`]. Private `$`
    /// channels still need a subscription token, as in Centrifugo's insecure mode.
    pub fn dev_mode() -> Namespaces {
        Namespaces {
            default: Namespace { options: Arc::new(ChannelOptions::dev()), regex: None },
            any_namespace: true,
            ..Namespaces::default()
        }
    }

    /// Sets the longest accepted channel name, in bytes (default [`DEFAULT_CHANNEL_MAX_LENGTH`]).
    pub fn with_max_channel_length(mut self, max: usize) -> Namespaces {
        self.max_channel_length = max;
        self
    }

    /// The longest accepted channel name, in bytes.
    pub fn max_channel_length(&self) -> usize {
        self.max_channel_length
    }

    /// The options of channels outside any namespace.
    pub fn default_options(&self) -> &ChannelOptions {
        &self.default.options
    }

    fn namespace(&self, channel: &str) -> Result<&Namespace, UnknownNamespace> {
        match namespace_of(channel) {
            None => Ok(&self.default),
            Some(ns) => match self.named.get(ns) {
                Some(namespace) => Ok(namespace),
                None if self.any_namespace => Ok(&self.default),
                None => Err(UnknownNamespace { namespace: ns.to_owned() }),
            },
        }
    }

    /// The options of the channel's namespace.
    pub fn resolve(&self, channel: &str) -> Result<&ChannelOptions, UnknownNamespace> {
        self.namespace(channel).map(|n| &*n.options)
    }

    /// What every command on a channel checks first, client or server API: a name within the length limit,
    /// a known namespace, then a well-formed name (ASCII, or matching the namespace's `channel_regex`,
    /// which is tested against the name after the namespace prefix, as in Centrifugo).
    pub fn channel_options(&self, channel: &str) -> Result<&ChannelOptions, Denied> {
        self.checked(channel).map(|n| &*n.options)
    }

    /// [`Namespaces::channel_options`], as a shared handle that stays valid when the configuration is
    /// reloaded meanwhile (what the node hands out: one reference-count increment, no copy).
    pub fn channel_options_shared(&self, channel: &str) -> Result<Arc<ChannelOptions>, Denied> {
        self.checked(channel).map(|n| n.options.clone())
    }

    fn checked(&self, channel: &str) -> Result<&Namespace, Denied> {
        if channel.is_empty() {
            return Err(Denied::BadName);
        }
        if channel.len() > self.max_channel_length {
            return Err(Denied::TooLong { len: channel.len(), max: self.max_channel_length });
        }
        let namespace = self.namespace(channel)?;
        let ok = match &namespace.regex {
            Some(regex) => regex.is_match(name_in_namespace(channel)),
            None => channel.is_ascii(),
        };
        if !ok {
            return Err(Denied::BadName);
        }
        Ok(namespace)
    }
}

/// The part of `channel` after its namespace prefix (the whole name, `$` included, in the default
/// namespace), which `channel_regex` is matched against.
pub fn name_in_namespace(channel: &str) -> &str {
    let rest = channel.strip_prefix(PRIVATE_PREFIX).unwrap_or(channel);
    match rest.split_once(NAMESPACE_BOUNDARY) {
        Some((_, name)) => name,
        None => channel,
    }
}

/// Whether `channel` is user-limited (has a `#`); only matters where `allow_user_limited_channels` is on.
pub fn is_user_limited(channel: &str) -> bool {
    channel.contains(USER_BOUNDARY)
}

/// Whether `user` is one of the users listed after the last `#` of `channel` (`news#42,43`). The empty
/// (anonymous) user is never listed.
pub fn user_listed(channel: &str, user: &str) -> bool {
    let Some((_, users)) = channel.rsplit_once(USER_BOUNDARY) else { return false };
    !user.is_empty() && users.split(USER_SEPARATOR).any(|u| u == user)
}

/// Whether a permission given "for client" (and maybe "for anonymous") covers `user`.
fn covers(user: &str, for_anonymous: bool) -> bool {
    !user.is_empty() || for_anonymous
}

/// `subscribe`: a valid subscription token (already checked against this user and channel) always
/// suffices; without one, private channels are closed, user-limited channels (`news#42,43`, with
/// `allow_user_limited_channels`) admit only their listed users, and others need
/// `allow_subscribe_for_client` (plus `allow_subscribe_for_anonymous` for anonymous connections).
pub fn can_subscribe(
    opts: &ChannelOptions,
    channel: &str,
    user: &str,
    has_valid_sub_token: bool,
) -> Result<(), Denied> {
    if has_valid_sub_token {
        return Ok(());
    }
    if is_private(channel) {
        return Err(Denied::PermissionDenied);
    }
    if opts.allow_user_limited_channels && is_user_limited(channel) {
        // Only the listed users; `allow_subscribe_for_client` does not open it to anyone else.
        return if user_listed(channel, user) { Ok(()) } else { Err(Denied::PermissionDenied) };
    }
    if opts.allow_subscribe_for_client && covers(user, opts.allow_subscribe_for_anonymous) {
        return Ok(());
    }
    Err(Denied::PermissionDenied)
}

/// `publish`: `allow_publish_for_client`, or `allow_publish_for_subscriber` when `subscribed`; either way
/// anonymous connections also need `allow_publish_for_anonymous`.
pub fn can_publish(opts: &ChannelOptions, user: &str, subscribed: bool) -> Result<(), Denied> {
    let granted = opts.allow_publish_for_client || (opts.allow_publish_for_subscriber && subscribed);
    if granted && covers(user, opts.allow_publish_for_anonymous) {
        Ok(())
    } else {
        Err(Denied::PermissionDenied)
    }
}

/// `presence` and `presence_stats`: not available unless `presence` is on; then as [`can_publish`] with the
/// `allow_presence_*` options.
pub fn can_presence(opts: &ChannelOptions, user: &str, subscribed: bool) -> Result<(), Denied> {
    if !opts.presence {
        return Err(Denied::NotAvailable);
    }
    if presence_access(opts, user, subscribed) {
        Ok(())
    } else {
        Err(Denied::PermissionDenied)
    }
}

/// `history`: not available unless history is on (size and TTL); then as [`can_publish`] with the
/// `allow_history_*` options.
pub fn can_history(opts: &ChannelOptions, user: &str, subscribed: bool) -> Result<(), Denied> {
    if !opts.history_enabled() {
        return Err(Denied::NotAvailable);
    }
    if history_access(opts, user, subscribed) {
        Ok(())
    } else {
        Err(Denied::PermissionDenied)
    }
}

fn presence_access(opts: &ChannelOptions, user: &str, subscribed: bool) -> bool {
    let granted = opts.allow_presence_for_client || (opts.allow_presence_for_subscriber && subscribed);
    granted && covers(user, opts.allow_presence_for_anonymous)
}

fn history_access(opts: &ChannelOptions, user: &str, subscribed: bool) -> bool {
    let granted = opts.allow_history_for_client || (opts.allow_history_for_subscriber && subscribed);
    granted && covers(user, opts.allow_history_for_anonymous)
}

/// Whether a subscription being made is recoverable: always with `force_recovery`; when the client asks
/// (`recoverable` in the subscribe request), with `allow_recovery` or history access (counting the
/// subscriber permission, since the subscription is being made). Never without history.
pub fn recovery_enabled(opts: &ChannelOptions, user: &str, requested: bool) -> bool {
    opts.history_enabled()
        && (opts.force_recovery || (requested && (opts.allow_recovery || history_access(opts, user, true))))
}

/// Whether a subscription being made is positioned: as [`recovery_enabled`], with the positioning
/// options; a recoverable subscription is always positioned (as in Centrifugo).
pub fn positioning_enabled(opts: &ChannelOptions, user: &str, requested: bool) -> bool {
    opts.history_enabled()
        && (opts.force_positioning || (requested && (opts.allow_positioning || history_access(opts, user, true))))
}

/// Whether join/leave events are pushed to a subscription being made: always with `force_push_join_leave`;
/// when the client asks, if `join_leave` is on and it has presence access (counting the subscriber
/// permission).
pub fn push_join_leave(opts: &ChannelOptions, user: &str, requested: bool) -> bool {
    opts.force_push_join_leave || (requested && opts.join_leave && presence_access(opts, user, true))
}

/// What a subscription being made gets, decided in one place for client and server-side subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// Missed publications can be recovered (`recoverable` in the reply).
    pub recoverable: bool,
    /// The stream position is sent and checked (`positioned` in the reply).
    pub positioned: bool,
    /// The subscriber receives join/leave pushes.
    pub push_join_leave: bool,
    /// Subscribing and leaving emit join/leave pushes to the others (`join_leave`).
    pub emit_join_leave: bool,
    /// The subscriber is in the channel's presence (`presence`).
    pub presence: bool,
}

/// What the client asked for in its subscribe request (server-side subscriptions ask for nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requested {
    pub recoverable: bool,
    pub positioned: bool,
    pub join_leave: bool,
}

/// The [`Features`] of a subscription by `user` that asked for `requested`.
pub fn features(opts: &ChannelOptions, user: &str, requested: Requested) -> Features {
    let recoverable = recovery_enabled(opts, user, requested.recoverable);
    Features {
        recoverable,
        positioned: recoverable || positioning_enabled(opts, user, requested.positioned),
        push_join_leave: push_join_leave(opts, user, requested.join_leave),
        emit_join_leave: opts.join_leave,
        presence: opts.presence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, options: ChannelOptions) -> NamespaceConfig {
        NamespaceConfig { name: name.into(), options }
    }

    fn with_history(size: usize, ttl: u64) -> ChannelOptions {
        ChannelOptions { history_size: size, history_ttl: Duration::from_secs(ttl), ..Default::default() }
    }

    // --- names ---

    #[test]
    fn channel_without_boundary_is_in_the_default_namespace() {
        assert_eq!(namespace_of("news"), None);
        assert_eq!(namespace_of("$news"), None);
        assert_eq!(namespace_of(":news"), None, "empty prefix is the default namespace");
        assert_eq!(namespace_of("$:news"), None);
    }

    #[test]
    fn namespace_is_the_text_before_the_first_boundary() {
        assert_eq!(namespace_of("chat:room"), Some("chat"));
        assert_eq!(namespace_of("chat:room:42"), Some("chat"));
        assert_eq!(namespace_of("chat:"), Some("chat"));
    }

    #[test]
    fn private_prefix_comes_before_the_namespace() {
        assert!(is_private("$secrets"));
        assert!(is_private("$chat:room"));
        assert_eq!(namespace_of("$chat:room"), Some("chat"));
        assert!(!is_private("chat:$room"), "Centrifugo checks `$` at the start of the whole name");
        assert!(!is_private("news$"));
    }

    #[test]
    fn channel_names_are_non_empty_ascii_within_the_limit() {
        let n = Namespaces::dev_mode();
        assert!(n.channel_options("news").is_ok());
        assert!(n.channel_options(&"x".repeat(255)).is_ok());
        assert_eq!(n.channel_options(&"x".repeat(256)).unwrap_err(), Denied::TooLong { len: 256, max: 255 });
        assert_eq!(n.channel_options(""), Err(Denied::BadName));
        assert_eq!(n.channel_options("café"), Err(Denied::BadName));
    }

    #[test]
    fn too_long_and_malformed_channel_names_are_107_as_in_centrifugo() {
        let n = Namespaces::dev_mode();
        assert_eq!(n.channel_options(&"x".repeat(300)).unwrap_err().error_code().code, 107);
        assert_eq!(n.channel_options("café").unwrap_err().error_code().code, 107);
    }

    #[test]
    fn channel_regex_is_matched_after_the_namespace_prefix() {
        let chat = ChannelOptions { channel_regex: "^[a-z]+$".into(), ..Default::default() };
        let n = Namespaces::new(ChannelOptions::default(), vec![ns("chat", chat)]).unwrap();
        assert!(n.channel_options("chat:room").is_ok());
        assert!(n.channel_options("$chat:room").is_ok(), "the private prefix is not part of the name");
        assert_eq!(n.channel_options("chat:Room1"), Err(Denied::BadName));
        assert_eq!(n.channel_options("chat:Room1").unwrap_err().error_code().code, 107);
        assert!(n.channel_options("Room1").is_ok(), "the default namespace has no regex");
        assert_eq!(name_in_namespace("chat:a:b"), "a:b");
        assert_eq!(name_in_namespace("$news"), "$news");
    }

    #[test]
    fn invalid_channel_regex_is_refused_at_start() {
        let bad = ChannelOptions { channel_regex: "([a-z".into(), ..Default::default() };
        let e = Namespaces::new(ChannelOptions::default(), vec![ns("chat", bad)]).unwrap_err();
        assert!(e.to_string().contains("namespace `chat`: `channel_regex`"), "{e}");
    }

    #[test]
    fn history_meta_ttl_defaults_to_30_days_and_is_not_shorter_than_history_ttl() {
        let o = with_history(10, 60);
        assert_eq!(o.effective_history_meta_ttl(), Duration::from_secs(720 * 3600));
        let short = ChannelOptions { history_meta_ttl: Duration::from_secs(30), ..o.clone() };
        let e = Namespaces::new(ChannelOptions::default(), vec![ns("chat", short)]).unwrap_err();
        assert!(e.to_string().contains("`history_meta_ttl`"), "{e}");
        let ok = ChannelOptions { history_meta_ttl: Duration::from_secs(600), ..o };
        assert_eq!(ok.effective_history_meta_ttl(), Duration::from_secs(600));
        assert!(Namespaces::new(ChannelOptions::default(), vec![ns("chat", ok)]).is_ok());
    }

    #[test]
    fn user_limited_channels_admit_only_the_listed_users() {
        let o = ChannelOptions {
            allow_user_limited_channels: true,
            allow_subscribe_for_client: true,
            allow_subscribe_for_anonymous: true,
            ..Default::default()
        };
        assert_eq!(can_subscribe(&o, "news#42,43", "42", false), Ok(()));
        assert_eq!(can_subscribe(&o, "news#42,43", "43", false), Ok(()));
        assert_eq!(can_subscribe(&o, "news#42,43", "4", false), Err(Denied::PermissionDenied));
        assert_eq!(can_subscribe(&o, "news#42,43", "", false), Err(Denied::PermissionDenied));
        assert_eq!(can_subscribe(&o, "news#", "", false), Err(Denied::PermissionDenied), "anonymous is never listed");
        let off = ChannelOptions { allow_user_limited_channels: false, ..o };
        assert_eq!(can_subscribe(&off, "news#42", "7", false), Ok(()), "without the option `#` is an ordinary byte");
    }

    #[test]
    fn unsupported_centrifugo_options_are_refused_by_name() {
        let e = toml::from_str::<File>("[[namespaces]]\nname = \"chat\"\nsubscribe_proxy_enabled = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("namespace `chat`") && e.contains("`subscribe_proxy_enabled`") && e.contains("not implement"),
            "{e}"
        );
        #[derive(Debug, Deserialize)]
        struct Channels {
            #[serde(deserialize_with = "deserialize_options")]
            #[allow(dead_code)]
            channels: ChannelOptions,
        }
        let e = toml::from_str::<Channels>("[channels]\ndelta_publish = true\n").unwrap_err().to_string();
        assert!(e.contains("`delta_publish`") && e.contains("not implement"), "{e}");
        let e = toml::from_str::<Channels>("[channels]\npresense = true\n").unwrap_err().to_string();
        assert!(e.contains("presense"), "{e}");
        let ok =
            toml::from_str::<Channels>("[channels]\nhistory_meta_ttl = \"1h\"\nchannel_regex = \"^a$\"\n").unwrap();
        assert_eq!(ok.channels.history_meta_ttl, Duration::from_secs(3600));
    }

    // --- resolve ---

    #[test]
    fn unknown_namespace_is_102() {
        let n = Namespaces::new(ChannelOptions::default(), vec![ns("chat", ChannelOptions::default())]).unwrap();
        let e = n.resolve("game:1").unwrap_err();
        assert_eq!(e, UnknownNamespace { namespace: "game".into() });
        let d = Denied::from(e);
        assert_eq!(d.error_code(), ErrorCode::UNKNOWN_CHANNEL);
        assert_eq!(d.error_code().code, 102);
        assert_eq!(n.channel_options("$game:1"), Err(Denied::UnknownNamespace("game".into())));
    }

    #[test]
    fn known_namespace_and_default_resolve_to_their_options() {
        let chat = ChannelOptions { presence: true, ..Default::default() };
        let n = Namespaces::new(ChannelOptions::default(), vec![ns("chat", chat.clone())]).unwrap();
        assert_eq!(n.resolve("chat:1"), Ok(&chat));
        assert_eq!(n.resolve("$chat:1"), Ok(&chat));
        assert_eq!(n.resolve("news"), Ok(&ChannelOptions::default()));
        assert_eq!(n.resolve("news"), Ok(n.default_options()));
    }

    #[test]
    fn channel_options_checks_the_name_first() {
        let n = Namespaces::default().with_max_channel_length(8);
        assert_eq!(n.max_channel_length(), 8);
        assert_eq!(n.channel_options("123456789"), Err(Denied::TooLong { len: 9, max: 8 }));
        assert_eq!(n.channel_options(""), Err(Denied::BadName));
        assert!(n.channel_options("news").is_ok());
    }

    // --- subscribe ---

    #[test]
    fn private_channel_without_token_is_denied_103() {
        let e = can_subscribe(&ChannelOptions::dev(), "$secret", "u", false).unwrap_err();
        assert_eq!(e, Denied::PermissionDenied);
        assert_eq!(e.error_code().code, 103);
    }

    #[test]
    fn private_channel_with_valid_token_is_allowed() {
        assert_eq!(can_subscribe(&ChannelOptions::default(), "$secret", "u", true), Ok(()));
        assert_eq!(can_subscribe(&ChannelOptions::default(), "$secret", "", true), Ok(()));
    }

    #[test]
    fn valid_token_allows_subscribe_even_where_clients_may_not() {
        assert_eq!(can_subscribe(&ChannelOptions::default(), "news", "u", true), Ok(()));
    }

    #[test]
    fn subscribe_is_denied_103_by_default() {
        assert_eq!(can_subscribe(&ChannelOptions::default(), "news", "u", false), Err(Denied::PermissionDenied));
    }

    #[test]
    fn allow_subscribe_for_client_admits_users_not_anonymous() {
        let o = ChannelOptions { allow_subscribe_for_client: true, ..Default::default() };
        assert_eq!(can_subscribe(&o, "news", "u", false), Ok(()));
        assert_eq!(can_subscribe(&o, "news", "", false), Err(Denied::PermissionDenied));
    }

    #[test]
    fn anonymous_subscribe_needs_allow_subscribe_for_anonymous_too() {
        let o = ChannelOptions {
            allow_subscribe_for_client: true,
            allow_subscribe_for_anonymous: true,
            ..Default::default()
        };
        assert_eq!(can_subscribe(&o, "news", "", false), Ok(()));
        let only_anon = ChannelOptions { allow_subscribe_for_anonymous: true, ..Default::default() };
        assert_eq!(can_subscribe(&only_anon, "news", "", false), Err(Denied::PermissionDenied));
    }

    // --- publish ---

    #[test]
    fn publish_is_denied_103_by_default() {
        let e = can_publish(&ChannelOptions::default(), "u", true).unwrap_err();
        assert_eq!(e.error_code(), ErrorCode::PERMISSION_DENIED);
    }

    #[test]
    fn allow_publish_for_client_admits_users_subscribed_or_not() {
        let o = ChannelOptions { allow_publish_for_client: true, ..Default::default() };
        assert_eq!(can_publish(&o, "u", false), Ok(()));
        assert_eq!(can_publish(&o, "", false), Err(Denied::PermissionDenied));
    }

    #[test]
    fn allow_publish_for_subscriber_requires_being_subscribed() {
        let o = ChannelOptions { allow_publish_for_subscriber: true, ..Default::default() };
        assert_eq!(can_publish(&o, "u", true), Ok(()));
        assert_eq!(can_publish(&o, "u", false), Err(Denied::PermissionDenied));
        assert_eq!(can_publish(&o, "", true), Err(Denied::PermissionDenied));
    }

    #[test]
    fn anonymous_publish_needs_allow_publish_for_anonymous() {
        let o = ChannelOptions {
            allow_publish_for_subscriber: true,
            allow_publish_for_anonymous: true,
            ..Default::default()
        };
        assert_eq!(can_publish(&o, "", true), Ok(()));
        assert_eq!(can_publish(&o, "", false), Err(Denied::PermissionDenied));
    }

    // --- presence and history ---

    #[test]
    fn presence_off_is_not_available_108() {
        let o = ChannelOptions { allow_presence_for_client: true, ..Default::default() };
        let e = can_presence(&o, "u", true).unwrap_err();
        assert_eq!(e, Denied::NotAvailable);
        assert_eq!(e.error_code().code, 108);
    }

    #[test]
    fn presence_needs_a_presence_permission_103() {
        let on = ChannelOptions { presence: true, ..Default::default() };
        assert_eq!(can_presence(&on, "u", true), Err(Denied::PermissionDenied));
        let client = ChannelOptions { allow_presence_for_client: true, ..on.clone() };
        assert_eq!(can_presence(&client, "u", false), Ok(()));
        assert_eq!(can_presence(&client, "", false), Err(Denied::PermissionDenied));
        let subscriber = ChannelOptions { allow_presence_for_subscriber: true, ..on.clone() };
        assert_eq!(can_presence(&subscriber, "u", true), Ok(()));
        assert_eq!(can_presence(&subscriber, "u", false), Err(Denied::PermissionDenied));
        let anonymous = ChannelOptions { allow_presence_for_anonymous: true, ..subscriber };
        assert_eq!(can_presence(&anonymous, "", true), Ok(()));
    }

    #[test]
    fn history_off_is_not_available_108() {
        let o = ChannelOptions { allow_history_for_client: true, history_size: 10, ..Default::default() };
        assert_eq!(can_history(&o, "u", true), Err(Denied::NotAvailable), "size without TTL is no history");
        assert_eq!(can_history(&ChannelOptions::default(), "u", true).unwrap_err().error_code().code, 108);
    }

    #[test]
    fn history_needs_a_history_permission_103() {
        let on = with_history(10, 60);
        assert_eq!(can_history(&on, "u", true), Err(Denied::PermissionDenied));
        let client = ChannelOptions { allow_history_for_client: true, ..on.clone() };
        assert_eq!(can_history(&client, "u", false), Ok(()));
        assert_eq!(can_history(&client, "", false), Err(Denied::PermissionDenied));
        let subscriber = ChannelOptions { allow_history_for_subscriber: true, ..on.clone() };
        assert_eq!(can_history(&subscriber, "u", true), Ok(()));
        assert_eq!(can_history(&subscriber, "u", false), Err(Denied::PermissionDenied));
        let anonymous = ChannelOptions { allow_history_for_anonymous: true, ..client };
        assert_eq!(can_history(&anonymous, "", false), Ok(()));
    }

    // --- what a new subscription gets ---

    #[test]
    fn force_recovery_makes_every_subscription_recoverable() {
        let o = ChannelOptions { force_recovery: true, ..with_history(10, 60) };
        assert!(recovery_enabled(&o, "", false));
    }

    #[test]
    fn requested_recovery_needs_allow_recovery_or_history_access() {
        let o = with_history(10, 60);
        assert!(!recovery_enabled(&o, "u", true));
        assert!(recovery_enabled(&ChannelOptions { allow_recovery: true, ..o.clone() }, "u", true));
        let sub = ChannelOptions { allow_history_for_subscriber: true, ..o.clone() };
        assert!(recovery_enabled(&sub, "u", true), "the subscription being made counts as subscribed");
        assert!(!recovery_enabled(&sub, "", true), "anonymous needs allow_history_for_anonymous");
        assert!(!recovery_enabled(&ChannelOptions { allow_recovery: true, ..o }, "u", false), "not asked");
    }

    #[test]
    fn recovery_and_positioning_need_history() {
        let no_history = ChannelOptions { allow_recovery: true, allow_positioning: true, ..Default::default() };
        assert!(!recovery_enabled(&no_history, "u", true));
        assert!(!positioning_enabled(&no_history, "u", true));
    }

    #[test]
    fn features_put_recoverable_and_positioned_in_force_as_centrifugo() {
        let o = ChannelOptions { allow_recovery: true, ..with_history(10, 60) };
        let asked = Requested { recoverable: true, ..Default::default() };
        let f = features(&o, "u", asked);
        assert!(f.recoverable && f.positioned, "a recoverable subscription is positioned");
        let f = features(&o, "u", Requested::default());
        assert!(!f.recoverable && !f.positioned, "not asked, not forced: {f:?}");
        let forced = ChannelOptions { force_positioning: true, ..with_history(10, 60) };
        let f = features(&forced, "", Requested::default());
        assert!(f.positioned && !f.recoverable);
        let jl = ChannelOptions { join_leave: true, presence: true, allow_presence_for_subscriber: true, ..o };
        let f = features(&jl, "u", Requested { join_leave: true, ..Default::default() });
        assert!(f.push_join_leave && f.emit_join_leave && f.presence);
        let f = features(&jl, "u", Requested::default());
        assert!(!f.push_join_leave && f.emit_join_leave, "joins are emitted, but not pushed to who did not ask");
    }

    #[test]
    fn positioning_follows_the_positioning_options() {
        let o = with_history(10, 60);
        assert!(positioning_enabled(&ChannelOptions { force_positioning: true, ..o.clone() }, "", false));
        assert!(positioning_enabled(&ChannelOptions { allow_positioning: true, ..o.clone() }, "u", true));
        assert!(!positioning_enabled(&o, "u", true));
    }

    #[test]
    fn join_leave_is_pushed_when_forced_or_asked_with_presence_access() {
        let o = ChannelOptions { presence: true, join_leave: true, ..Default::default() };
        assert!(!push_join_leave(&o, "u", true), "no presence permission");
        let sub = ChannelOptions { allow_presence_for_subscriber: true, ..o.clone() };
        assert!(push_join_leave(&sub, "u", true));
        assert!(!push_join_leave(&sub, "u", false));
        assert!(!push_join_leave(&ChannelOptions { join_leave: false, ..sub }, "u", true));
        assert!(push_join_leave(&ChannelOptions { force_push_join_leave: true, ..o }, "", false));
    }

    // --- dev mode ---

    #[test]
    fn dev_mode_allows_everything_for_anyone_in_any_namespace() {
        let n = Namespaces::dev_mode();
        for channel in ["news", "chat:room", "anything.at-all:x"] {
            let o = n.channel_options(channel).unwrap();
            for user in ["", "u"] {
                assert_eq!(can_subscribe(o, channel, user, false), Ok(()), "{channel} {user:?}");
                assert_eq!(can_publish(o, user, false), Ok(()));
                assert_eq!(can_presence(o, user, false), Ok(()));
                assert_eq!(can_history(o, user, false), Ok(()));
            }
            assert!(o.presence && !o.join_leave, "presence on; join/leave off (O(n²) pushes on big channels)");
            assert_eq!((o.history_size, o.history_ttl), (100, Duration::from_secs(3600)));
        }
        assert_eq!(can_subscribe(n.default_options(), "$secret", "u", false), Err(Denied::PermissionDenied));
        // The dev options pass the same validation as any configuration.
        assert!(Namespaces::new(ChannelOptions::dev(), vec![ns("chat", ChannelOptions::dev())]).is_ok());
    }

    // --- validation ---

    #[test]
    fn namespace_names_must_match_the_pattern() {
        for good in ["ab", "chat", "a-b_c.d", "42", "--"] {
            assert!(Namespaces::new(ChannelOptions::default(), vec![ns(good, ChannelOptions::default())]).is_ok());
        }
        for bad in ["", "a", "chat room", "chat:x", "$chat", "é1", "a/b"] {
            let e = Namespaces::new(ChannelOptions::default(), vec![ns(bad, ChannelOptions::default())]).unwrap_err();
            assert_eq!(e, NamespaceError::InvalidName { name: bad.into() });
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn duplicate_namespace_is_refused_by_name() {
        let e = Namespaces::new(
            ChannelOptions::default(),
            vec![
                ns("chat", ChannelOptions::default()),
                ns("news", ChannelOptions::default()),
                ns("chat", ChannelOptions::default()),
            ],
        )
        .unwrap_err();
        assert_eq!(e, NamespaceError::Duplicate { name: "chat".into() });
        assert!(e.to_string().contains("`chat`"), "{e}");
    }

    #[test]
    fn history_size_without_ttl_names_the_namespace_and_option() {
        let e = Namespaces::new(ChannelOptions::default(), vec![ns("chat", with_history(10, 0))]).unwrap_err();
        assert!(matches!(&e, NamespaceError::InvalidOption { option: "history_ttl", .. }), "{e:?}");
        assert!(e.to_string().contains("namespace `chat`") && e.to_string().contains("`history_ttl`"), "{e}");
    }

    #[test]
    fn history_ttl_without_size_names_history_size() {
        let e = Namespaces::new(ChannelOptions::default(), vec![ns("chat", with_history(0, 60))]).unwrap_err();
        assert!(e.to_string().contains("namespace `chat`: `history_size`"), "{e}");
    }

    #[test]
    fn history_ttl_must_be_whole_seconds() {
        let o = ChannelOptions { history_size: 1, history_ttl: Duration::from_millis(1500), ..Default::default() };
        let e = Namespaces::new(ChannelOptions::default(), vec![ns("chat", o)]).unwrap_err();
        assert!(e.to_string().contains("`history_ttl`") && e.to_string().contains("whole"), "{e}");
    }

    #[test]
    fn force_recovery_without_history_is_refused() {
        let o = ChannelOptions { force_recovery: true, ..Default::default() };
        let e = Namespaces::new(ChannelOptions::default(), vec![ns("feed", o)]).unwrap_err();
        assert!(e.to_string().contains("namespace `feed`: `force_recovery`"), "{e}");
    }

    #[test]
    fn default_options_are_validated_too() {
        let e = Namespaces::new(with_history(5, 0), vec![]).unwrap_err();
        assert!(e.to_string().starts_with("default channel options: `history_ttl`"), "{e}");
    }

    // --- configuration files ---

    #[derive(Debug, Deserialize)]
    struct File {
        #[serde(default)]
        default: ChannelOptions,
        #[serde(default)]
        namespaces: Vec<NamespaceConfig>,
    }

    #[test]
    fn options_default_to_off() {
        let o: ChannelOptions = toml::from_str("").unwrap();
        assert_eq!(o, ChannelOptions::default());
        assert!(!o.history_enabled());
    }

    #[test]
    fn namespaces_parse_from_toml_with_humantime_ttl() {
        let f: File = toml::from_str(
            r#"
            [default]
            allow_subscribe_for_client = true

            [[namespaces]]
            name = "chat"
            presence = true
            join_leave = true
            history_size = 50
            history_ttl = "5m"
            force_recovery = true
            allow_publish_for_subscriber = true
            "#,
        )
        .unwrap();
        assert!(f.default.allow_subscribe_for_client);
        let chat = &f.namespaces[0];
        assert_eq!(chat.name, "chat");
        assert_eq!((chat.options.history_size, chat.options.history_ttl), (50, Duration::from_secs(300)));
        assert!(chat.options.presence && chat.options.force_recovery && chat.options.allow_publish_for_subscriber);
        let n = Namespaces::new(f.default, f.namespaces).unwrap();
        assert!(n.resolve("chat:1").unwrap().presence);
    }

    #[test]
    fn unknown_option_in_a_namespace_names_both() {
        let e = toml::from_str::<File>("[[namespaces]]\nname = \"chat\"\npresense = true\n").unwrap_err().to_string();
        assert!(e.contains("namespace `chat`") && e.contains("presense"), "{e}");
        let e = toml::from_str::<File>("[default]\npresense = true\n").unwrap_err().to_string();
        assert!(e.contains("presense"), "{e}");
    }

    #[test]
    fn namespace_without_a_name_is_refused() {
        let e = toml::from_str::<File>("[[namespaces]]\npresence = true\n").unwrap_err().to_string();
        assert!(e.contains("name"), "{e}");
        let e = toml::from_str::<File>("[[namespaces]]\nname = 7\n").unwrap_err().to_string();
        assert!(e.contains("name"), "{e}");
    }

    #[test]
    fn namespace_config_round_trips_through_json_and_toml() {
        let original = ns(
            "chat",
            ChannelOptions { history_size: 3, history_ttl: Duration::from_secs(90), ..ChannelOptions::dev() },
        );
        let json = serde_json::to_string(&original).unwrap();
        assert!(json.contains(r#""name":"chat""#) && json.contains(r#""history_ttl":"1m 30s""#), "{json}");
        assert_eq!(serde_json::from_str::<NamespaceConfig>(&json).unwrap(), original);
        let toml_text = toml::to_string(&original).unwrap();
        assert_eq!(toml::from_str::<NamespaceConfig>(&toml_text).unwrap(), original);
    }
}
