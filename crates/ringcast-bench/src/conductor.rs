//! The coordinating side of a run: what happens once per run rather than once per process.
//!
//! The conductor samples the server (memory before and after connecting, CPU across the measured
//! window), picks the common start time once every process is connected, merges the per-second
//! intervals of all processes into the timeline, drives the progress line, and turns the merged
//! [`Tally`] into the [`Report`]. In a single-process run the worker talks to it directly
//! ([`LocalLink`]); with `--processes` the parent feeds it from the workers' pipes (`worker`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::clock::{now_ns, ns, sleep_until};
use crate::error::BenchError;
use crate::histogram::{Hist, Percentiles};
use crate::meter::Interval;
use crate::params::{Params, Scenario};
use crate::proc::{process_cpu_us, process_rss, CpuSpan};
use crate::progress::Progress;
use crate::report::{Report, Second, ServerSamples};
use crate::scenario::{Link, Tally};

/// One second, merged over processes.
#[derive(Default)]
struct Acc {
    reports: usize,
    messages: u64,
    bytes: u64,
    errors: u64,
    open: u64,
    latency: Hist,
    partial: bool,
}

pub(crate) struct Conductor {
    params: Params,
    workers: usize,
    progress: Progress,
    seconds: BTreeMap<u32, Acc>,
    preparing: Vec<(u64, u64)>,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    /// Server CPU samples, filled in by the sampler task (and by `window_closed`).
    cpu: Arc<Mutex<CpuSpan>>,
    sampler: Option<JoinHandle<()>>,
    closed: usize,
}

impl Conductor {
    /// Starts a run: samples the server's memory before any connection is opened.
    pub fn new(params: &Params, workers: usize) -> Conductor {
        let rss_before = params.server_pid.and_then(|pid| process_rss(pid).ok());
        let progress = Progress::new(params.progress, params.total_connections());
        Conductor {
            params: params.clone(),
            workers,
            progress,
            seconds: BTreeMap::new(),
            preparing: vec![(0, 0); workers],
            rss_before,
            rss_after: None,
            cpu: Arc::default(),
            sampler: None,
            closed: 0,
        }
    }

    pub fn preparing(&mut self, worker: usize, open: u64, errors: u64) {
        if let Some(slot) = self.preparing.get_mut(worker) {
            *slot = (open, errors);
        }
        let (open, errors) = self.preparing.iter().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        self.progress.connecting(open, errors);
    }

    /// Every process is connected: let the server settle, sample it, and pick the start time.
    pub async fn all_ready(&mut self, lead: Duration) -> u64 {
        if let Some(pid) = self.params.server_pid {
            if self.params.scenario == Scenario::Idle {
                self.rss_after = settled_rss(pid).await;
            }
        }
        let start = now_ns() + ns(lead);
        if let Some(pid) = self.params.server_pid {
            let warmup = if matches!(self.params.scenario, Scenario::Echo | Scenario::Fanout) {
                ns(self.params.warmup)
            } else {
                0
            };
            let (from, to) = (start + warmup, start + warmup + ns(self.params.duration));
            // A storm's window ends when the last process says so (`window_closed`), not on a clock.
            let timed_end = self.params.scenario != Scenario::Connect;
            let cpu = self.cpu.clone();
            self.sampler = Some(tokio::spawn(async move {
                sleep_until(from).await;
                let start_us = process_cpu_us(pid).ok();
                lock(&cpu).start_us = start_us;
                if timed_end {
                    sleep_until(to).await;
                    let end_us = process_cpu_us(pid).ok();
                    lock(&cpu).end_us = end_us;
                }
            }));
        }
        self.progress.started();
        start
    }

    pub fn tick(&mut self, iv: Interval) {
        let acc = self.seconds.entry(iv.second).or_default();
        acc.reports += 1;
        acc.messages += iv.messages;
        acc.bytes += iv.bytes;
        acc.errors += iv.errors;
        acc.open += iv.open;
        acc.latency.add(&iv.latency.0);
        acc.partial |= iv.partial;
        if acc.reports == self.workers && !acc.partial {
            let p99 = Percentiles::of(&acc.latency.0).map(|p| p.p99_us);
            self.progress.second(acc.open, acc.messages, p99, acc.errors);
        }
    }

    /// A process's measured window ended early; when all have, the server's CPU is sampled.
    pub fn window_closed(&mut self) {
        self.closed += 1;
        if self.closed == self.workers {
            if let Some(pid) = self.params.server_pid {
                let mut cpu = lock(&self.cpu);
                if cpu.end_us.is_none() {
                    cpu.end_us = process_cpu_us(pid).ok();
                }
            }
        }
    }

    /// Turns the merged tally into the report.
    pub async fn finish(mut self, tally: Tally) -> Result<Report, BenchError> {
        self.progress.finish();
        if let Some(sampler) = self.sampler.take() {
            // The sampler's last sample is due at the window's end, which has passed.
            let abort = sampler.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), sampler).await.is_err() {
                abort.abort();
            }
        }
        let cpu = *lock(&self.cpu);
        let timeline = self
            .seconds
            .iter()
            .map(|(&second, a)| {
                let p = Percentiles::of(&a.latency.0);
                Second {
                    second,
                    messages: a.messages,
                    bytes: a.bytes,
                    p50_us: p.as_ref().map(|p| p.p50_us),
                    p99_us: p.as_ref().map(|p| p.p99_us),
                    errors: a.errors,
                    open: a.open,
                    partial: a.partial,
                }
            })
            .collect();
        let server = ServerSamples {
            pid: self.params.server_pid,
            rss_before: self.rss_before,
            rss_after: self.rss_after,
            cpu_us: cpu.used_us(),
        };
        Ok(Report::build(&self.params, &tally, server, timeline))
    }
}

fn lock(m: &Mutex<CpuSpan>) -> std::sync::MutexGuard<'_, CpuSpan> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Samples RSS until two samples 250 ms apart agree within 0.5 % (or 5 s have passed).
async fn settled_rss(pid: u32) -> Option<u64> {
    let deadline = now_ns() + 5_000_000_000;
    let mut last = process_rss(pid).ok()?;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = process_rss(pid).ok()?;
        if now.abs_diff(last) <= (now / 200).max(64 * 1024) || now_ns() >= deadline {
            return Some(now);
        }
        last = now;
    }
}

/// The single-process link: the worker and the conductor share the process.
pub(crate) struct LocalLink<'c> {
    pub conductor: &'c mut Conductor,
}

impl Link for LocalLink<'_> {
    fn preparing(&mut self, open: u64, errors: u64) {
        self.conductor.preparing(0, open, errors);
    }

    async fn ready(&mut self, _established: u64) -> Result<u64, BenchError> {
        Ok(self.conductor.all_ready(Duration::from_millis(10)).await)
    }

    fn tick(&mut self, interval: Interval) {
        self.conductor.tick(interval);
    }

    fn window_closed(&mut self) {
        self.conductor.window_closed();
    }

    async fn published(&mut self, n: u64) -> Result<u64, BenchError> {
        Ok(n)
    }
}
