//! `ringcast`: the command line. No logic lives here: it parses arguments, sets up logging, and calls
//! into `ringcast-server`. Every configuration key becomes a `serve` flag of the same name, generated
//! from the server's key table, so a new key never needs a CLI change.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command};
use ringcast_server::config::{self, Kind, KEYS};
use ringcast_server::Config;

/// mimalloc rather than the system allocator: tokio's per-connection task and socket registrations are
/// 128-byte-aligned allocations; glibc serves those with padding that cost ~45% on top of what an idle
/// connection really needs (BENCHMARKS.md, "idle memory").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        .subcommand(ringcast_bench::command())
}

fn flags_from(m: &ArgMatches) -> Vec<(String, String)> {
    KEYS.iter()
        .filter(|k| k.kind != Kind::Table)
        .filter_map(|k| m.get_one::<String>(k.name).map(|v| (k.name.to_string(), v.clone())))
        .collect()
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
            let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_level.clone());
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
                .init();
            match ringcast_server::run_blocking(config, settings) {
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
        _ => ExitCode::from(EXIT_CONFIG),
    }
}
