//! `ringcast bench`: the command line of the load generator (clap builder API).
//!
//! [`command`] builds the subcommand tree the `ringcast` binary mounts as `bench`; [`main`] turns the
//! matches into [`Params`], runs, prints the table, writes `--json`/`--plot`, and picks the exit status:
//! 0 when something was measured, 1 when nothing could be (every connection failed, say), 2 for bad
//! arguments. Defaults shown in `--help` come from [`Params::new`], the single source of them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};

use crate::error::BenchError;
use crate::params::{parse_duration, parse_source_ips, Params, PayloadKind, Protocol, Scenario};
use crate::proc::raise_nofile_limit;
use crate::reconnect::ReconnectParams;

const DEFAULT_URL: &str = "ws://127.0.0.1:8000/echo";

/// The `bench` subcommand and its scenarios.
pub fn command() -> Command {
    Command::new("bench")
        .about("Generate load against any WebSocket server: echo, fanout, connect, idle; reconnect (Centrifugo clients across a restart)")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(scenario(
            Scenario::Echo,
            "Round trips: C connections each keep W messages in flight to an echo endpoint",
        ))
        .subcommand(scenario(
            Scenario::Fanout,
            "Pub/sub: P publishers, S subscribers; delivery latency, loss and order",
        ))
        .subcommand(scenario(Scenario::Connect, "Connection storm: handshakes per second and their latency"))
        .subcommand(scenario(
            Scenario::Idle,
            "Hold N idle connections; with --server-pid, the server's memory per connection",
        ))
        .subcommand(reconnect_command())
        .subcommand(Command::new("worker").hide(true).about("Internal: one worker process of --processes"))
}

fn scenario(s: Scenario, about: &'static str) -> Command {
    let d = Params::new(s, DEFAULT_URL);
    let mut c = Command::new(s.name()).about(about);
    let url = Arg::new("url").long("url").value_name("ws://HOST:PORT/PATH");
    c = c.arg(if s == Scenario::Fanout {
        url.required(true)
            .help("Server URL (raw: a broadcast endpoint; centrifuge: e.g. ws://host:8000/connection/websocket)")
    } else {
        url.default_value(DEFAULT_URL).help("Server URL")
    });
    let n = |name: &'static str, help: String| {
        Arg::new(name).long(name).value_name("N").value_parser(value_parser!(u64)).help(help)
    };
    match s {
        Scenario::Echo => {
            c = c
                .arg(n("connections", format!("Connections [default: {}]", d.connections)))
                .arg(n("window", format!("Messages in flight per connection [default: {}]", d.window)))
        }
        Scenario::Fanout => {
            c = c
                .arg(n("subscribers", format!("Subscribers [default: {}]", d.subscribers)))
                .arg(n("publishers", format!("Publishers [default: {}]", d.publishers)))
                .arg(n("window", format!("With --rate 0: messages per publisher not yet seen by a subscriber [default: {}]", d.window)))
                .arg(
                    Arg::new("protocol")
                        .long("protocol")
                        .value_parser(["raw", "centrifuge", "tcp"])
                        .help("raw: every message sent on a publisher connection reaches every subscriber; centrifuge: Centrifugo client protocol v2 (JSON), channel \"bench\"; tcp: ringcast's TCP binary protocol on a tcp://HOST:PORT URL (tcp_listen), channel \"bench\", publishing over TCP at --rate [default: tcp for a tcp:// URL, centrifuge when the URL path is /connection/websocket, else raw]"),
                )
                .arg(
                    Arg::new("payload")
                        .long("payload")
                        .value_parser(["filler", "json"])
                        .help("centrifuge: what pads a publication to --size; json: a realistic JSON document that changes per message (for --compression) [default: filler]"),
                )
                .arg(Arg::new("urls").long("urls").value_name("URL,URL").help("Subscribers connect to these servers (split into contiguous blocks) instead of --url; publishers stay on --url. E.g. two nodes of one cluster: --url NODE_A --urls NODE_A,NODE_B spreads subscribers, --urls NODE_B measures cross-node delivery"))
                .arg(Arg::new("api-key").long("api-key").value_name("KEY").help("Centrifugo: publish through POST /api/publish with this X-API-Key instead of over WebSocket"))
        }
        Scenario::Connect => {
            c = c
                .arg(n("connections", format!("Connections to open (at most) [default: {}]", d.connections)))
                .arg(n("window", format!("Handshakes in flight [default: {}]", d.window)))
        }
        Scenario::Idle => {
            c = c
                .arg(n("connections", format!("Connections to hold [default: {}]", d.connections)))
                .arg(n("window", format!("Handshakes in flight while opening [default: {}]", d.window)))
                .arg(
                    Arg::new("protocol")
                        .long("protocol")
                        .value_parser(["raw", "centrifuge", "tcp"])
                        .help("raw: plain WebSocket connections; centrifuge: each connection also connects and subscribes to channel \"bench\" (Centrifugo client protocol v2, JSON); tcp: TCP binary protocol connections (a tcp://HOST:PORT URL), each CONNECTed and subscribed to \"bench\" [default: tcp for a tcp:// URL, centrifuge when the URL path is /connection/websocket, else raw]"),
                )
        }
    }
    if s != Scenario::Idle {
        let what = if s == Scenario::Connect { "Handshakes" } else { "Messages" };
        c = c.arg(
            Arg::new("rate")
                .long("rate")
                .value_name("PER_SEC")
                .value_parser(value_parser!(f64))
                .help(format!("{what} per second in all; 0: as fast as the window allows. With a rate, latency is measured from the intended send time [default: {}]", d.rate)),
        );
    }
    if matches!(s, Scenario::Echo | Scenario::Fanout) {
        c = c
            .arg(Arg::new("compare").long("compare").value_name("URL2").help(
                "Also run the same scenario against a second server, in alternating rounds (A, B, A, B, …), and print both and the ratio B/A",
            ))
            .arg(
                Arg::new("compare-pid")
                    .long("compare-pid")
                    .value_name("PID")
                    .value_parser(value_parser!(u32))
                    .requires("compare")
                    .help("The second server's pid, for its CPU and memory"),
            )
            .arg(
                Arg::new("rounds")
                    .long("rounds")
                    .value_name("N")
                    .value_parser(value_parser!(usize))
                    .requires("compare")
                    .help("With --compare: rounds per server [default: 3]"),
            );
    }
    if matches!(s, Scenario::Echo | Scenario::Fanout) {
        c = c
            .arg(
                Arg::new("size")
                    .long("size")
                    .value_name("BYTES")
                    .value_parser(value_parser!(usize))
                    .help(format!("Payload bytes per message [default: {}]", d.size)),
            )
            .arg(Arg::new("warmup").long("warmup").value_name("DURATION").help(format!(
                "Warm-up before measuring, excluded from the figures [default: {}s]",
                d.warmup.as_secs_f64()
            )));
    }
    let duration_help = match s {
        Scenario::Idle => "How long to hold the connections",
        Scenario::Connect => "Stop opening connections after this long",
        _ => "Measured time, after warm-up",
    };
    c.arg(
        Arg::new("duration")
            .long("duration")
            .value_name("DURATION")
            .help(format!("{duration_help}: seconds or 500ms, 2m [default: {}s]", d.duration.as_secs_f64())),
    )
    .arg(
        Arg::new("source-ips")
            .long("source-ips")
            .value_name("A-B,C")
            .help("Local addresses to spread connections over, e.g. 127.0.0.1-127.0.0.8 (more ephemeral ports)"),
    )
    .arg(
        Arg::new("server-pid")
            .long("server-pid")
            .value_name("PID")
            .value_parser(value_parser!(u32))
            .help("The server's pid: report its CPU time (and, for idle, memory per connection) from /proc"),
    )
    .arg(
        Arg::new("processes")
            .long("processes")
            .value_name("N")
            .value_parser(value_parser!(usize))
            .default_value("1")
            .help("Split the load over N worker processes"),
    )
    .arg(
        Arg::new("connect-timeout")
            .long("connect-timeout")
            .value_name("DURATION")
            .help(format!("Bound on each connect + upgrade [default: {}s]", d.connect_timeout.as_secs_f64())),
    )
    .arg(
        Arg::new("insecure")
            .long("insecure")
            .action(ArgAction::SetTrue)
            .help("wss://: accept any server certificate (a self-signed test certificate); without it the roots are SSL_CERT_FILE or the system's"),
    )
    .arg(
        Arg::new("json")
            .long("json")
            .value_name("FILE")
            .value_parser(value_parser!(PathBuf))
            .help("Write every figure and the parameters as JSON (\"-\": to stdout, table to stderr)"),
    )
    .arg(
        Arg::new("plot")
            .long("plot")
            .value_name("FILE.svg")
            .value_parser(value_parser!(PathBuf))
            .help("Draw throughput and p50/p99 per second as SVG"),
    )
    .arg(Arg::new("quiet").long("quiet").short('q').action(ArgAction::SetTrue).help("No progress line"))
    .arg(
        Arg::new("compression").long("compression").action(ArgAction::SetTrue).help(
            "Offer permessage-deflate (as browsers do); compressed messages are inflated before they are checked",
        ),
    )
}

/// The parameters a scenario's matches describe.
pub fn params_from(scenario: Scenario, m: &ArgMatches) -> Result<Params, BenchError> {
    let url = m.get_one::<String>("url").cloned().unwrap_or_else(|| DEFAULT_URL.to_string());
    let mut p = Params::new(scenario, url);
    let has = |id: &str| m.try_get_raw(id).ok().flatten().is_some();
    let u64_of = |id: &str| if has(id) { m.get_one::<u64>(id).copied() } else { None };
    if let Some(v) = u64_of("connections") {
        p.connections = v;
    }
    if let Some(v) = u64_of("subscribers") {
        p.subscribers = v;
    }
    if let Some(v) = u64_of("publishers") {
        p.publishers = v;
    }
    if let Some(v) = u64_of("window") {
        p.window = v;
    }
    if has("rate") {
        if let Some(v) = m.get_one::<f64>("rate") {
            p.rate = *v;
        }
    }
    if has("size") {
        if let Some(v) = m.get_one::<usize>("size") {
            p.size = *v;
        }
    }
    let duration_of = |id: &'static str| -> Result<Option<std::time::Duration>, BenchError> {
        if !has(id) {
            return Ok(None);
        }
        m.get_one::<String>(id).map(|s| parse_duration(id, s)).transpose()
    };
    if let Some(d) = duration_of("duration")? {
        p.duration = d;
    }
    if let Some(d) = duration_of("warmup")? {
        p.warmup = d;
    }
    if let Some(d) = duration_of("connect-timeout")? {
        p.connect_timeout = d;
    }
    p.insecure = m.try_get_one::<bool>("insecure").ok().flatten().copied().unwrap_or(false);
    // Only fanout and idle have the option; the others ignore the protocol.
    if let Ok(given) = m.try_get_one::<String>("protocol") {
        p.protocol = match given.map(String::as_str) {
            Some("centrifuge") => Protocol::Centrifuge,
            Some("tcp") => Protocol::Tcp,
            Some(_) => Protocol::Raw,
            None => Protocol::for_url(&p.url),
        };
    }
    if has("urls") {
        if let Some(s) = m.get_one::<String>("urls") {
            p.sub_urls = s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        }
    }
    if has("api-key") {
        p.api_key = m.get_one::<String>("api-key").cloned();
    }
    if has("source-ips") {
        if let Some(s) = m.get_one::<String>("source-ips") {
            p.source_ips = parse_source_ips(s)?;
        }
    }
    if has("server-pid") {
        p.server_pid = m.get_one::<u32>("server-pid").copied();
    }
    if let Some(n) = m.get_one::<usize>("processes") {
        p.processes = *n;
    }
    p.compression = m.get_flag("compression");
    if has("payload") {
        p.payload = match m.get_one::<String>("payload").map(String::as_str) {
            Some("json") => PayloadKind::Json,
            _ => PayloadKind::Filler,
        };
    }
    p.progress = !m.get_flag("quiet");
    p.validate()?;
    Ok(p)
}

/// Runs `ringcast bench …` with the matches of [`command`].
pub fn main(m: &ArgMatches) -> ExitCode {
    let (name, sub) = match m.subcommand() {
        Some(v) => v,
        None => return ExitCode::from(2),
    };
    raise_nofile_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringcast bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if name == "worker" {
        return match runtime.block_on(crate::worker::serve()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringcast bench worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if name == "reconnect" {
        return reconnect_main(&runtime, sub);
    }
    let Some(scenario) = Scenario::parse(name) else { return ExitCode::from(2) };
    let params = match params_from(scenario, sub) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ringcast bench: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if let Some(url) = sub.try_get_one::<String>("compare").ok().flatten() {
        let other = crate::compare::Side {
            url: url.clone(),
            server_pid: sub.get_one::<u32>("compare-pid").copied(),
            protocol: sub.try_get_one::<String>("protocol").ok().flatten().map(|_| params.protocol),
        };
        let rounds = sub.get_one::<usize>("rounds").copied().unwrap_or(3);
        return compare_main(&runtime, &params, &other, rounds, sub);
    }
    let report = match runtime.block_on(crate::run(&params)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringcast bench: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let json_path = sub.get_one::<PathBuf>("json");
    let to_stdout = json_path.is_some_and(|p| p.as_os_str() == "-");
    if to_stdout {
        eprint!("{}", report.table());
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    let mut status = ExitCode::SUCCESS;
    if let Some(path) = json_path.filter(|_| !to_stdout) {
        if let Err(e) = std::fs::write(path, report.to_json()) {
            eprintln!("ringcast bench: writing {}: {e}", path.display());
            status = ExitCode::FAILURE;
        }
    }
    if let Some(path) = sub.get_one::<PathBuf>("plot") {
        if let Err(e) = crate::plot::write_svg(&report, path) {
            eprintln!("ringcast bench: {e}");
            status = ExitCode::FAILURE;
        }
    }
    if !report.measured() {
        eprintln!(
            "ringcast bench: nothing could be measured against {} — failures: {}",
            params.url,
            report.failures.summary()
        );
        return ExitCode::FAILURE;
    }
    status
}

/// `--compare`: both servers, alternating rounds, one table.
fn compare_main(
    runtime: &tokio::runtime::Runtime,
    params: &Params,
    other: &crate::compare::Side,
    rounds: usize,
    sub: &ArgMatches,
) -> ExitCode {
    let cmp = match runtime.block_on(crate::compare::run(params, other, rounds)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringcast bench: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    print!("{}", cmp.table());
    let mut status = ExitCode::SUCCESS;
    if let Some(path) = sub.get_one::<PathBuf>("json") {
        let written = if path.as_os_str() == "-" {
            println!("{}", cmp.to_json());
            Ok(())
        } else {
            std::fs::write(path, cmp.to_json())
        };
        if let Err(e) = written {
            eprintln!("ringcast bench: writing {}: {e}", path.display());
            status = ExitCode::FAILURE;
        }
    }
    if !cmp.measured() {
        eprintln!("ringcast bench: a round measured nothing (see the table)");
        return ExitCode::FAILURE;
    }
    status
}

/// `reconnect`: clients that come back whenever the server lets them go (see [`crate::reconnect`]).
fn reconnect_command() -> Command {
    let d = ReconnectParams::new("");
    let secs = |v: std::time::Duration| format!("{}s", v.as_secs_f64());
    let dur = |name: &'static str, help: String| Arg::new(name).long(name).value_name("DURATION").help(help);
    Command::new("reconnect")
        .about("Hold N Centrifugo clients that reconnect and recover; handshakes per second over time (for upgrades and restarts)")
        .arg(
            Arg::new("url")
                .long("url")
                .value_name("ws://HOST:PORT/connection/websocket")
                .default_value("ws://127.0.0.1:8000/connection/websocket")
                .help("Centrifugo client endpoint (the channel \"bench\" needs history and allow_recovery for recovery)"),
        )
        .arg(
            Arg::new("clients")
                .long("clients")
                .value_name("N")
                .value_parser(value_parser!(u64))
                .help(format!("Clients [default: {}]", d.clients)),
        )
        .arg(
            Arg::new("window")
                .long("window")
                .value_name("N")
                .value_parser(value_parser!(u64))
                .help(format!("Handshakes in flight while the clients connect the first time [default: {}]", d.window)),
        )
        .arg(dur("duration", format!("Run time from the start, the first connections included; the publisher stops then [default: {}]", secs(d.duration))))
        .arg(dur("settle", format!("After --duration: time for clients to receive the last publication [default: {}]", secs(d.settle))))
        .arg(dur("bucket", format!("Width of one timeline bucket [default: {}]", secs(d.bucket))))
        .arg(dur("backoff-min", format!("Reconnect backoff: the first retry waits up to this (full jitter), doubling per failure [default: {}]", secs(d.backoff_min))))
        .arg(dur("backoff-max", format!("Reconnect backoff cap [default: {}]", secs(d.backoff_max))))
        .arg(dur("connect-timeout", format!("Bound on connect + upgrade + connect/subscribe replies [default: {}]", secs(d.connect_timeout))))
        .arg(Arg::new("api-key").long("api-key").value_name("KEY").help("Run a publisher over the HTTP API (POST /api/publish) with this key; without it, no publisher"))
        .arg(
            Arg::new("rate")
                .long("rate")
                .value_name("PER_SEC")
                .value_parser(value_parser!(f64))
                .help(format!("Publications per second [default: {}]", d.rate)),
        )
        .arg(
            Arg::new("size")
                .long("size")
                .value_name("BYTES")
                .value_parser(value_parser!(usize))
                .help(format!("Publication size [default: {}]", d.size)),
        )
        .arg(Arg::new("json").long("json").value_name("FILE").value_parser(value_parser!(PathBuf)).help("Write the report (timeline included) as JSON"))
        .arg(Arg::new("plot").long("plot").value_name("FILE.svg").value_parser(value_parser!(PathBuf)).help("Draw handshakes and disconnects per second as SVG"))
        .arg(Arg::new("title").long("title").value_name("TEXT").help("The plot's title [default: the URL]"))
        .arg(Arg::new("quiet").long("quiet").short('q').action(ArgAction::SetTrue).help("No progress lines"))
}

fn reconnect_params(m: &ArgMatches) -> Result<ReconnectParams, BenchError> {
    let url = m.get_one::<String>("url").cloned().unwrap_or_default();
    let mut p = ReconnectParams::new(url);
    if let Some(v) = m.get_one::<u64>("clients") {
        p.clients = *v;
    }
    if let Some(v) = m.get_one::<u64>("window") {
        p.window = *v;
    }
    for (id, slot) in [
        ("duration", &mut p.duration),
        ("settle", &mut p.settle),
        ("bucket", &mut p.bucket),
        ("backoff-min", &mut p.backoff_min),
        ("backoff-max", &mut p.backoff_max),
        ("connect-timeout", &mut p.connect_timeout),
    ] {
        if let Some(s) = m.get_one::<String>(id) {
            *slot = parse_duration(id, s)?;
        }
    }
    p.api_key = m.get_one::<String>("api-key").cloned();
    if let Some(v) = m.get_one::<f64>("rate") {
        p.rate = *v;
    }
    if let Some(v) = m.get_one::<usize>("size") {
        p.size = *v;
    }
    p.progress = !m.get_flag("quiet");
    Ok(p)
}

fn reconnect_main(runtime: &tokio::runtime::Runtime, m: &ArgMatches) -> ExitCode {
    let report = match reconnect_params(m).and_then(|p| runtime.block_on(crate::reconnect::run(&p))) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringcast bench: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    print!("{}", report.table());
    let mut status = ExitCode::SUCCESS;
    if let Some(path) = m.get_one::<PathBuf>("json") {
        if let Err(e) = std::fs::write(path, report.to_json()) {
            eprintln!("ringcast bench: writing {}: {e}", path.display());
            status = ExitCode::FAILURE;
        }
    }
    if let Some(path) = m.get_one::<PathBuf>("plot") {
        let title = m.get_one::<String>("title").cloned().unwrap_or_else(|| {
            report.params.as_ref().map(|p| format!("ringcast bench reconnect — {}", p.url)).unwrap_or_default()
        });
        if let Err(e) = crate::reconnect::write_svg(&report, &title, path) {
            eprintln!("ringcast bench: {e}");
            status = ExitCode::FAILURE;
        }
    }
    if report.initial == 0 {
        eprintln!("ringcast bench: no client could subscribe — failures: {:?}", report.failure_reasons);
        return ExitCode::FAILURE;
    }
    status
}
