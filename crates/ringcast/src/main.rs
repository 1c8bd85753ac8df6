//! `ringcast`: the command line. No logic lives here: it parses arguments, sets up logging, and calls
//! into `ringcast-server`. Every configuration key becomes a `serve` flag of the same name, generated
//! from the server's key table, so a new key never needs a CLI change.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command};
use ringcast_server::app::config::{self, Kind, KEYS};
use ringcast_server::Config;

/// mimalloc rather than the system allocator: tokio's per-connection task and socket registrations are
/// 128-byte-aligned allocations; glibc serves those with padding that cost ~45% on top of what an idle
/// connection really needs (BENCHMARKS.md, "idle memory"). Built with `no_thp`: otherwise mimalloc asks
/// for transparent huge pages, and a 2 MiB page is resident as soon as one connection's bytes touch it —
/// measured here, that alone added 200–500 B to every idle connection's share of RSS, in 2 MiB steps.
/// Version 2 of mimalloc rather than 3: tokio's task cell is 384 bytes aligned to 128, and v2 lays out
/// its 384-byte blocks 128-aligned, while v3 falls back to a padded allocation for them (measured: 10,000
/// idle echo connections 697 B each with v2, 814 B with v3).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    /// mimalloc's own: frees what this thread's heap holds unused and purges free pages whose delay
    /// expired (linked in by libmimalloc-sys; declared here because its binding is behind a feature).
    fn mi_collect(force: bool);
}

/// Under memory pressure the server runs this on each worker (`memory_high_watermark`): mimalloc
/// otherwise returns freed pages only when the owning thread next allocates.
fn collect_allocator() {
    // SAFETY: mi_collect has no preconditions; it may be called on any thread at any time.
    unsafe { mi_collect(false) }
}

/// Exit status for invalid configuration or usage.
const EXIT_CONFIG: u8 = 2;

fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

fn cli() -> Command {
    let mut serve = Command::new("serve")
        .about("Run the server (embedded defaults; no config file needed)")
        .arg(Arg::new("config").long("config").value_name("FILE").help("TOML configuration file"));
    // Table-valued keys (channel options, namespaces) live in the config file only.
    for k in KEYS.iter().filter(|k| k.kind != Kind::Table) {
        let mut arg = Arg::new(k.name)
            .long(flag_name(k.name))
            .help(format!("{} [env: {}]", k.help, config::env_var(k.name)))
            .action(ArgAction::Set);
        arg = match k.kind {
            Kind::Bool => arg.num_args(0..=1).default_missing_value("true").value_name("BOOL"),
            Kind::Int => arg.value_name("N"),
            Kind::Str => arg.value_name("VALUE"),
            Kind::List | Kind::Table => arg.value_name("A,B,..."),
        };
        serve = serve.arg(arg);
    }
    Command::new("ringcast")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Real-time WebSocket pub/sub server")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(serve)
        .subcommand(Command::new("genconfig").about("Print a documented configuration file with every default"))
        .subcommand(
            Command::new("gentoken")
                .about("Print an HS256 connection token (for testing clients)")
                .arg(Arg::new("user").long("user").value_name("USER").default_value("").help("Token subject (user id)"))
                .arg(
                    Arg::new("ttl")
                        .long("ttl")
                        .value_name("DURATION")
                        .help("Expire after this long (e.g. 1h); default never"),
                )
                .arg(Arg::new("channels").long("channels").value_name("A,B").help("Channels to subscribe at connect"))
                .arg(
                    Arg::new("secret")
                        .long("secret")
                        .value_name("SECRET")
                        .help("HMAC secret [default: token_hmac_secret_key of the config]"),
                )
                .arg(Arg::new("config").long("config").value_name("FILE").help("TOML configuration file")),
        )
        .subcommand(ringcast_bench::command())
}

fn flags_from(m: &ArgMatches) -> Vec<(String, String)> {
    KEYS.iter()
        .filter(|k| k.kind != Kind::Table)
        .filter_map(|k| m.get_one::<String>(k.name).map(|v| (k.name.to_string(), v.clone())))
        .collect()
}

fn gentoken(m: &ArgMatches) -> ExitCode {
    let secret = match m.get_one::<String>("secret") {
        Some(s) => s.clone(),
        None => {
            let file = m.get_one::<String>("config").map(PathBuf::from);
            match Config::load(file.as_deref(), |k| std::env::var(k).ok(), &[]) {
                Ok((c, _)) => c.token_hmac_secret_key,
                Err(e) => {
                    eprintln!("ringcast: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    if secret.is_empty() {
        eprintln!(
            "ringcast: no secret: pass --secret, or set token_hmac_secret_key (config, RINGCAST_TOKEN_HMAC_SECRET_KEY)"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let exp = match m.get_one::<String>("ttl").map(|t| humantime::parse_duration(t)) {
        None => None,
        Some(Ok(d)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |n| n.as_secs());
            Some((now + d.as_secs()) as i64)
        }
        Some(Err(e)) => {
            eprintln!("ringcast: invalid --ttl: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let channels: Vec<String> = m
        .get_one::<String>("channels")
        .map(|c| c.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let user = m.get_one::<String>("user").cloned().unwrap_or_default();
    match ringcast_server::policy::auth::make_hs256_token(&secret, &user, exp, &channels) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringcast: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `log_level` on reload: the log filter is swapped in place (unless RUST_LOG, which wins, is set).
struct LogLevel(tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>);

impl ringcast_server::app::reload::ReloadHook for LogLevel {
    fn keys(&self) -> &'static [&'static str] {
        &["log_level"]
    }

    fn prepare(&self, new: &Config) -> Result<ringcast_server::app::reload::Commit, ringcast_server::ConfigError> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Ok(Box::new(|| tracing::warn!("log_level reloaded, but RUST_LOG is set and wins")));
        }
        let filter = tracing_subscriber::EnvFilter::try_new(&new.log_level)
            .map_err(|e| ringcast_server::ConfigError::Invalid { key: "log_level".into(), message: e.to_string() })?;
        let handle = self.0.clone();
        Ok(Box::new(move || {
            if let Err(e) = handle.reload(filter) {
                tracing::warn!(error = %e, "log_level: the new filter could not be installed");
            }
        }))
    }
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    match matches.subcommand() {
        Some(("serve", m)) => {
            let file = m.get_one::<String>("config").map(PathBuf::from);
            let (config, settings) = match Config::load(file.as_deref(), |k| std::env::var(k).ok(), &flags_from(m)) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("ringcast: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            ringcast_server::app::memory::set_allocator_collect(collect_allocator);
            let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_level.clone());
            let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into());
            let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
            {
                use tracing_subscriber::layer::SubscriberExt;
                use tracing_subscriber::util::SubscriberInitExt;
                tracing_subscriber::registry().with(filter).with(tracing_subscriber::fmt::layer()).init();
            }
            let options = ringcast_server::app::server::RunOptions {
                source: ringcast_server::app::reload::ConfigSource { file, flags: flags_from(m) },
                hooks: vec![Box::new(LogLevel(handle))],
            };
            match ringcast_server::app::server::run_blocking_with(config, settings, options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("ringcast: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(("genconfig", _)) => {
            print!("{}", Config::documented_toml());
            ExitCode::SUCCESS
        }
        Some(("bench", m)) => ringcast_bench::main(m),
        Some(("gentoken", m)) => gentoken(m),
        _ => ExitCode::from(EXIT_CONFIG),
    }
}
