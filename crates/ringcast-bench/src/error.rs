//! The one error type of the load generator: what stops a run before or instead of a report.
//!
//! A connection that is refused, times out or breaks the protocol is *not* an error here: it is a
//! [`crate::failure::Failure`], counted by kind and reported with the figures. Only problems that leave
//! nothing to report (bad flags, an unresolvable host, a worker process that died, no connection at all)
//! become a [`BenchError`], and each says what to change.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag has a value the tool cannot use; names the flag.
    #[error("--{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    /// The run ended without a single successful measurement (every connection failed, say).
    #[error("nothing could be measured: {0}")]
    NothingMeasured(String),
    /// A worker process (`--processes`) failed or spoke out of turn.
    #[error("worker process {index}: {message}")]
    Worker { index: usize, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("writing {path}: {message}")]
    Output { path: String, message: String },
}

impl BenchError {
    pub(crate) fn invalid(flag: &'static str, message: impl Into<String>) -> Self {
        BenchError::Invalid { flag, message: message.into() }
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        BenchError::Io { what: what.into(), source }
    }

    /// The process exit status for this error: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Invalid { .. } => 2,
            _ => 1,
        }
    }
}
