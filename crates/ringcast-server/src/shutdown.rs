//! Shutdown as a small value handed to every task.
//!
//! The server flips one `watch` channel; every connection holds a receiver (two words) and selects on
//! [`Shutdown::recv`] next to its socket. A connection that sees it sends close 1001 (going away), waits
//! a bounded time for the peer's close, and ends; the server waits for all of them, up to
//! `shutdown_timeout`.

use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side, kept by the server.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped: the server is gone, which is shutdown too.
        let _ = self.rx.wait_for(|v| *v).await;
    }
}
