//! Configuration reload: SIGHUP and `POST /api/reload` read the configuration again and apply what can
//! change while connections stay.
//!
//! # What a reload does
//! 1. Loads the configuration exactly as at start ([`ConfigSource`]: the same file, environment and
//!    flags) and validates all of it. Any error rejects the reload as a whole: the log line and the
//!    reply name the key, and the configuration in force stays.
//! 2. Prepares every reloadable part: the node's [`Policy`] (namespaces and channel options, token keys,
//!    client limits, allowed origins) and each registered [`ReloadHook`] (the log filter; TLS files on
//!    the TLS branch). A part that fails to prepare rejects the reload as a whole too.
//! 3. Commits them all. The policy is one `ArcSwap` in the node: new operations (connects, subscribes,
//!    publishes, upgrades) load the new one; an operation already running finishes with the old one;
//!    existing connections and subscriptions stay as they are. Nothing on the hot path takes a lock.
//! 4. Reports every changed key that cannot change at run time (listen addresses, `read_buffer`,
//!    `workers`, timeouts baked into the deadline table, ...) as "needs restart": logged, and listed in
//!    the reply. Such a key keeps its old value until the process is restarted or upgraded (SIGUSR2).
//!
//! # Adding a reloadable part
//! Implement [`ReloadHook`] (its keys, and a `prepare` that validates the new configuration and
//! returns the commit) and register it with [`Reloader::add_hook`] before the server runs. Its keys then
//! count as reloadable, and it takes part in the all-or-nothing rule above.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::app::config::{Config, ConfigError, KEYS};
use crate::policy::auth::{TokenConfig, TokenVerifier};
use crate::policy::namespace::Namespaces;
use crate::pubsub::node::{ClientLimits, Node, Policy};

/// Keys applied by a reload through the node's [`Policy`] (the log level is the CLI's hook).
pub const POLICY_KEYS: &[&str] = &[
    "allowed_origins",
    "allow_anonymous",
    "token_hmac_secret_key",
    "token_rsa_public_key",
    "token_ecdsa_public_key",
    "channels",
    "namespaces",
    "channel_max_length",
    "client_channel_limit",
    "client_user_connection_limit",
    "history_max_publication_limit",
    "client_command_rate",
    "client_command_burst",
    "client_flood_disconnect_after",
    "client_channel_publish_rate",
    "client_channel_publish_burst",
];

/// Where the configuration came from at start, so a reload reads it the same way.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    /// Command-line flags (key → raw value); they still win over the file on reload.
    pub flags: Vec<(String, String)>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.file.as_deref(), |k| std::env::var(k).ok(), &self.flags).map(|(c, _)| c)
    }
}

/// The commit step of a prepared reload part.
pub type Commit = Box<dyn FnOnce() + Send>;

/// A part of the process that a reload may change, other than the node's policy.
pub trait ReloadHook: Send + Sync {
    /// The configuration keys this part applies (changes to them are not "needs restart").
    fn keys(&self) -> &'static [&'static str];
    /// Validates `new` for this part and returns how to apply it; an error rejects the whole reload.
    fn prepare(&self, new: &Config) -> Result<Commit, ConfigError>;
}

/// What a reload did, as logged and as `POST /api/reload` answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Changed keys now in force.
    pub applied: Vec<String>,
    /// Changed keys that keep their old value until a restart.
    pub needs_restart: Vec<String>,
}

/// Re-reads and applies the configuration (see the module docs).
pub struct Reloader {
    source: Mutex<ConfigSource>,
    node: Arc<Node>,
    /// The configuration as loaded (before dev-mode fill-ins) and as applied; also serializes reloads.
    state: Mutex<(Config, Config)>,
    hooks: Mutex<Vec<Box<dyn ReloadHook>>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

fn key_error(key: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.to_string() }
}

/// The node's policy for a validated configuration (dev-mode fill-ins already applied).
pub fn build_policy(config: &Config) -> Result<Policy, ConfigError> {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let token_config = TokenConfig {
        hmac_secret: opt(&config.token_hmac_secret_key),
        rsa_public_key: opt(&config.token_rsa_public_key),
        ecdsa_public_key: opt(&config.token_ecdsa_public_key),
    };
    let tokens = if token_config.hmac_secret.is_none()
        && token_config.rsa_public_key.is_none()
        && token_config.ecdsa_public_key.is_none()
    {
        None
    } else {
        let key = if token_config.rsa_public_key.is_some() {
            "token_rsa_public_key"
        } else if token_config.ecdsa_public_key.is_some() {
            "token_ecdsa_public_key"
        } else {
            "token_hmac_secret_key"
        };
        Some(Arc::new(TokenVerifier::new(&token_config).map_err(|e| key_error(key, e))?))
    };
    let namespaces = if config.dev {
        Namespaces::dev_mode()
    } else {
        Namespaces::new(config.channels.clone(), config.namespaces.clone()).map_err(|e| key_error("namespaces", e))?
    }
    .with_max_channel_length(config.channel_max_length);
    let client_limits = ClientLimits {
        user_connection_limit: config.client_user_connection_limit,
        history_max_publication_limit: config.history_max_publication_limit,
        commands: crate::session::CommandQuota::new(
            config.client_command_rate,
            config.client_command_burst,
            config.client_flood_disconnect_after,
        ),
        // No flood disconnect for publications: a client over a channel's rate is told 111 and may go on
        // publishing elsewhere; client_command_rate is what disconnects floods.
        publications: crate::session::CommandQuota::new(
            config.client_channel_publish_rate,
            config.client_channel_publish_burst,
            std::time::Duration::ZERO,
        ),
    };
    let allowed_origins = if config.allowed_origins.is_empty() && config.dev {
        vec!["*".to_string()]
    } else {
        config.allowed_origins.clone()
    };
    Ok(Policy {
        namespaces,
        tokens,
        allow_anonymous: config.allow_anonymous || config.dev,
        client_limits,
        client_channel_limit: config.client_channel_limit,
        allowed_origins,
    })
}

/// Dev mode generates an API key and a token secret when none is set; a reload keeps the generated
/// ones rather than making new ones (clients hold tokens signed with them).
pub fn keep_dev_secrets(new: &mut Config, applied: &Config) {
    if new.dev {
        if new.api_key.is_empty() {
            new.api_key = applied.api_key.clone();
        }
        if new.token_hmac_secret_key.is_empty() {
            new.token_hmac_secret_key = applied.token_hmac_secret_key.clone();
        }
    }
}

/// The keys whose values differ between `a` and `b`, in [`KEYS`] order.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<&'static str> {
    let table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let (ta, tb) = (table(a), table(b));
    KEYS.iter().map(|k| k.name).filter(|k| ta.get(*k) != tb.get(*k)).collect()
}

impl Reloader {
    /// `loaded`: the configuration as loaded from `source`; `applied`: as the server runs it (dev-mode
    /// fill-ins).
    pub fn new(source: ConfigSource, loaded: Config, applied: Config, node: Arc<Node>) -> Reloader {
        Reloader {
            source: Mutex::new(source),
            node,
            state: Mutex::new((loaded, applied)),
            hooks: Mutex::new(Vec::new()),
        }
    }

    /// Where a reload reads the configuration from (what the process was started with).
    pub fn set_source(&self, source: ConfigSource) {
        match self.source.lock() {
            Ok(mut s) => *s = source,
            Err(p) => *p.into_inner() = source,
        }
    }

    /// Registers another reloadable part (see the module docs).
    pub fn add_hook(&self, hook: Box<dyn ReloadHook>) {
        match self.hooks.lock() {
            Ok(mut h) => h.push(hook),
            Err(p) => p.into_inner().push(hook),
        }
    }

    /// Reads the configuration again and applies it; on error nothing changed.
    pub fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let source = match self.source.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let result = source.load().and_then(|new| self.apply(new));
        match &result {
            Ok(report) => {
                metrics::counter!("ringcast_config_reloads_total", "result" => "ok").increment(1);
                tracing::info!(applied = ?report.applied, "configuration reloaded");
                if !report.needs_restart.is_empty() {
                    tracing::warn!(keys = ?report.needs_restart, "configuration reload: these keys need a restart (or an upgrade, SIGUSR2) to change; their old values stay in force");
                }
            }
            Err(e) => {
                metrics::counter!("ringcast_config_reloads_total", "result" => "rejected").increment(1);
                tracing::error!(error = %e, "configuration reload rejected; the configuration in force stays");
            }
        }
        result
    }

    /// Applies `new` (already loaded and validated) as a reload would.
    pub fn apply(&self, new: Config) -> Result<ReloadReport, ConfigError> {
        let mut state = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (loaded, applied) = &mut *state;
        let mut effective = new.clone();
        keep_dev_secrets(&mut effective, applied);
        // Everything is prepared before anything is committed: one bad part rejects the whole file.
        let policy = build_policy(&effective)?;
        let hooks = match self.hooks.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut commits = Vec::with_capacity(hooks.len());
        for hook in hooks.iter() {
            commits.push(hook.prepare(&effective)?);
        }
        let reloadable = |k: &str| POLICY_KEYS.contains(&k) || hooks.iter().any(|h| h.keys().contains(&k));
        let mut report = ReloadReport::default();
        for key in changed_keys(loaded, &new) {
            if reloadable(key) {
                report.applied.push(key.to_string());
            } else {
                report.needs_restart.push(key.to_string());
            }
        }
        self.node.set_policy(policy);
        for commit in commits {
            commit();
        }
        // What needs a restart is not in force: keep comparing against what was loaded at start for
        // those keys, so a second reload reports them again.
        let mut kept = loaded.clone();
        let mut kept_applied = applied.clone();
        for key in &report.applied {
            copy_key(&new, &mut kept, key);
            copy_key(&effective, &mut kept_applied, key);
        }
        *loaded = kept;
        *applied = kept_applied;
        Ok(report)
    }
}

/// Sets `key` of `to` to its value in `from` (through TOML, so one function serves every key).
fn copy_key(from: &Config, to: &mut Config, key: &str) {
    let (Ok(toml::Value::Table(f)), Ok(toml::Value::Table(mut t))) =
        (toml::Value::try_from(from), toml::Value::try_from(&*to))
    else {
        return;
    };
    match f.get(key) {
        Some(v) => {
            t.insert(key.to_string(), v.clone());
        }
        None => {
            t.remove(key);
        }
    }
    if let Ok(c) = toml::Value::Table(t).try_into::<Config>() {
        *to = c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_name_what_differs() {
        let a = Config::default();
        let mut b = a.clone();
        b.workers = 3;
        b.allowed_origins = vec!["https://x".into()];
        assert_eq!(changed_keys(&a, &b), vec!["workers", "allowed_origins"]);
        assert!(changed_keys(&a, &a).is_empty());
    }

    #[test]
    fn a_reload_applies_policy_keys_and_reports_the_rest() {
        let c = Config::default();
        let node =
            Arc::new(Node::new(Arc::new(crate::broker::MemoryBroker::new()), Namespaces::default(), None, false));
        let r = Reloader::new(ConfigSource::default(), c.clone(), c.clone(), node.clone());
        let mut new = c.clone();
        new.allow_anonymous = true;
        new.read_buffer = "ring".into();
        let report = r.apply(new.clone()).unwrap();
        assert_eq!(report.applied, vec!["allow_anonymous"]);
        assert_eq!(report.needs_restart, vec!["read_buffer"]);
        assert!(node.policy().allow_anonymous);
        // Still not in force: reported again.
        let report = r.apply(new).unwrap();
        assert!(report.applied.is_empty());
        assert_eq!(report.needs_restart, vec!["read_buffer"]);
        // A bad token key rejects the whole reload: the policy stays.
        let mut bad = c.clone();
        bad.allow_anonymous = false;
        bad.token_rsa_public_key = "not a pem".into();
        let e = r.apply(bad).unwrap_err();
        assert!(e.to_string().contains("`token_rsa_public_key`"), "{e}");
        assert!(node.policy().allow_anonymous, "the old policy stays");
    }
}
