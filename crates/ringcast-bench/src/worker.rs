//! `--processes N`: the load split over N worker processes, coordinated over pipes.
//!
//! One process can only push so far (one runtime, one file-descriptor table, one set of ephemeral
//! ports), so the parent re-executes its own binary as `ringcast bench worker` N times. Each worker
//! gets its [`Share`] and the parameters as one JSON line on stdin, and speaks JSON lines on stdout:
//!
//! ```text
//! parent → worker   {"task":{...}}  {"go":<start ns>}  {"total_published":<n>}
//! worker → parent   {"preparing":[open,errors]}  {"ready":<n>}  {"tick":{...}}  {"published":<n>}
//!                   {"done":{...tally...}}  {"failed":"message"}
//! ```
//!
//! Workers share the parent's monotonic clock, so one start time serves all. Histograms travel in
//! HdrHistogram's V2 encoding and are merged exactly. Every wait of the parent is bounded; a worker
//! that dies or goes quiet fails the run with its index, and the rest are killed.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::mpsc;

use crate::clock::{instant_at, now_ns, ns, SECOND};
use crate::conductor::Conductor;
use crate::error::BenchError;
use crate::meter::Interval;
use crate::params::Params;
use crate::report::Report;
use crate::scenario::{run_share, split, Link, Share, Tally, DRAIN};

/// The arguments that make the `ringcast` binary run a worker (`ringcast bench worker`).
pub const WORKER_ARGS: &[&str] = &["bench", "worker"];

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToWorker {
    Task { params: Box<Params>, share: Share },
    Go(u64),
    TotalPublished(u64),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FromWorker {
    Preparing(u64, u64),
    Ready(u64),
    WindowClosed,
    Tick(Box<Interval>),
    Published(u64),
    Done(Box<Tally>),
    Failed(String),
}

/// Runs the load over `params.processes` worker processes and merges their results.
pub(crate) async fn run_processes(params: &Params) -> Result<Report, BenchError> {
    let n = params.processes;
    let exe = std::env::current_exe().map_err(|e| BenchError::io("locating the current executable", e))?;
    let shares = split(params, n);
    let mut conductor = Conductor::new(params, n);
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<FromWorker, String>)>();
    let mut stdins: Vec<ChildStdin> = Vec::with_capacity(n);
    let mut children = Vec::with_capacity(n);
    for share in shares {
        let index = share.index;
        let wfail = |message: String| BenchError::Worker { index, message };
        let mut child = Command::new(&exe)
            .args(WORKER_ARGS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| wfail(format!("cannot start {}: {e}", exe.display())))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(wfail("no pipes".into()));
        };
        send(&mut stdin, &ToWorker::Task { params: Box::new(params.clone()), share }).await.map_err(wfail)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        let msg = serde_json::from_str::<FromWorker>(&line)
                            .map_err(|e| format!("unreadable message ({e}): {}", truncate(&line)));
                        // After its result, a worker has nothing more to say: its exit is not news.
                        let last = matches!(msg, Err(_) | Ok(FromWorker::Done(_)) | Ok(FromWorker::Failed(_)));
                        if tx.send((index, msg)).is_err() || last {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send((index, Err("exited before reporting (see its messages above)".into())));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send((index, Err(format!("reading its output: {e}"))));
                        return;
                    }
                }
            }
        });
        stdins.push(stdin);
        children.push(child);
    }
    drop(tx);

    // Connecting may take a while for many connections; after that, the run's own length bounds it.
    let per_process = params.total_connections().div_ceil(n as u64);
    let connect_bound = ns(params.connect_timeout) * (2 + per_process / 256) + 30 * SECOND;
    let run_bound = ns(params.warmup) + ns(params.duration) + ns(params.connect_timeout) + 3 * ns(DRAIN) + 30 * SECOND;
    let mut deadline = now_ns() + connect_bound;
    let mut ready = 0;
    let mut published: Vec<Option<u64>> = vec![None; n];
    let mut done: Vec<Option<Tally>> = (0..n).map(|_| None).collect();
    loop {
        let (index, msg) = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return Err(BenchError::Worker { index: 0, message: "all workers are gone".into() }),
            },
            _ = tokio::time::sleep_until(instant_at(deadline)) => {
                return Err(BenchError::Worker { index: 0, message: "workers did not finish in time".into() });
            }
        };
        let wfail = |message: String| BenchError::Worker { index, message };
        match msg.map_err(wfail)? {
            FromWorker::Preparing(open, errors) => conductor.preparing(index, open, errors),
            FromWorker::Ready(_) => {
                ready += 1;
                if ready == n {
                    let start = conductor.all_ready(Duration::from_millis(200)).await;
                    for (i, stdin) in stdins.iter_mut().enumerate() {
                        send(stdin, &ToWorker::Go(start))
                            .await
                            .map_err(|m| BenchError::Worker { index: i, message: m })?;
                    }
                    deadline = start + run_bound;
                }
            }
            FromWorker::Tick(iv) => conductor.tick(*iv),
            FromWorker::WindowClosed => conductor.window_closed(),
            FromWorker::Published(p) => {
                if let Some(slot) = published.get_mut(index) {
                    *slot = Some(p);
                }
                if published.iter().all(Option::is_some) {
                    let total = published.iter().flatten().sum();
                    for (i, stdin) in stdins.iter_mut().enumerate() {
                        send(stdin, &ToWorker::TotalPublished(total))
                            .await
                            .map_err(|m| BenchError::Worker { index: i, message: m })?;
                    }
                }
            }
            FromWorker::Done(t) => {
                if let Some(slot) = done.get_mut(index) {
                    *slot = Some(*t);
                }
                if done.iter().all(Option::is_some) {
                    break;
                }
            }
            FromWorker::Failed(m) => return Err(wfail(m)),
        }
    }
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.wait()).await;
    }
    let mut merged = Tally::default();
    for t in done.iter().flatten() {
        merged.merge(t);
    }
    merged.subscribers.sort_by_key(|s| s.index);
    conductor.finish(merged).await
}

async fn send(stdin: &mut ChildStdin, msg: &ToWorker) -> Result<(), String> {
    let mut line = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stdin.write_all(&line).await.map_err(|e| format!("writing to it: {e}"))?;
    stdin.flush().await.map_err(|e| format!("writing to it: {e}"))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The worker's side of the pipe.
struct PipeLink {
    lines: tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    last_preparing: u64,
}

impl PipeLink {
    fn send(&self, msg: &FromWorker) {
        use std::io::Write;
        if let Ok(mut line) = serde_json::to_vec(msg) {
            line.push(b'\n');
            let mut out = std::io::stdout().lock();
            // If the parent is gone there is no one to tell; the next read of stdin ends the worker.
            let _ = out.write_all(&line).and_then(|()| out.flush());
        }
    }

    async fn receive(&mut self) -> Result<ToWorker, BenchError> {
        let fail = |message: String| BenchError::Worker { index: 0, message };
        match self.lines.next_line().await {
            Ok(Some(line)) => serde_json::from_str(&line).map_err(|e| fail(format!("bad message from parent: {e}"))),
            Ok(None) => Err(fail("the parent process went away".into())),
            Err(e) => Err(fail(format!("reading stdin: {e}"))),
        }
    }
}

impl Link for PipeLink {
    fn preparing(&mut self, open: u64, errors: u64) {
        let now = now_ns();
        if now - self.last_preparing >= SECOND / 4 {
            self.last_preparing = now;
            self.send(&FromWorker::Preparing(open, errors));
        }
    }

    async fn ready(&mut self, established: u64) -> Result<u64, BenchError> {
        self.send(&FromWorker::Ready(established));
        loop {
            if let ToWorker::Go(start) = self.receive().await? {
                return Ok(start);
            }
        }
    }

    fn tick(&mut self, interval: Interval) {
        self.send(&FromWorker::Tick(Box::new(interval)));
    }

    fn window_closed(&mut self) {
        self.send(&FromWorker::WindowClosed);
    }

    async fn published(&mut self, n: u64) -> Result<u64, BenchError> {
        self.send(&FromWorker::Published(n));
        loop {
            if let ToWorker::TotalPublished(total) = self.receive().await? {
                return Ok(total);
            }
        }
    }
}

/// The worker process's main: reads its task from stdin, runs it, reports on stdout.
pub(crate) async fn serve() -> Result<(), BenchError> {
    let mut link = PipeLink { lines: BufReader::new(tokio::io::stdin()).lines(), last_preparing: 0 };
    let (params, share) = match link.receive().await? {
        ToWorker::Task { params, share } => (params, share),
        other => return Err(BenchError::Worker { index: 0, message: format!("expected a task first, got {other:?}") }),
    };
    let result = async {
        let ep = crate::endpoint(&params).await?;
        run_share(&params, &ep, &share, &mut link).await
    }
    .await;
    match result {
        Ok(t) => link.send(&FromWorker::Done(Box::new(t))),
        Err(e) => link.send(&FromWorker::Failed(e.to_string())),
    }
    Ok(())
}
