//! The live progress line: elapsed time, connections, current rate, p99 of the last second, errors.
//!
//! It is drawn on stderr, only when both stdout and stderr are terminals (a redirected run gets the
//! final table and nothing else), and updated once per second from merged intervals, so it costs the
//! load loop nothing.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::{count, micros};

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
}

impl Progress {
    pub fn new(enabled: bool, total: u64) -> Progress {
        let on = enabled && std::io::stderr().is_terminal() && std::io::stdout().is_terminal();
        let bar = on.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner:.cyan} {elapsed:>4} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            bar.set_message("connecting");
            bar
        });
        Progress { bar, total }
    }

    pub fn connecting(&self, open: u64, errors: u64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("connecting {}/{} · errors {}", count(open), count(self.total), count(errors)));
        }
    }

    pub fn started(&self) {
        if let Some(b) = &self.bar {
            b.reset_elapsed();
            b.set_message("running");
        }
    }

    pub fn second(&self, open: u64, messages: u64, p99_us: Option<f64>, errors: u64) {
        if let Some(b) = &self.bar {
            let p99 = p99_us.map_or("-".to_string(), micros);
            b.set_message(format!(
                "conns {} · {}/s · p99 {} · errors {}",
                count(open),
                count(messages),
                p99,
                count(errors)
            ));
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
