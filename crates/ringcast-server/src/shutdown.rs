//! Shutdown as a small value handed to every task.
//!
//! The server sets a flag and wakes every waiter of one `Notify`. A connection holds an `OwnedNotified`
//! (created when the connection starts, so a trigger that comes later always reaches it) and checks the
//! flag once at start (for a trigger that came earlier). On shutdown a connection sends close 1001
//! (going away), waits a bounded time for the peer's close, and ends; the server waits for all of them,
//! up to `shutdown_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

#[derive(Debug, Clone)]
pub struct Shutdown {
    notify: Arc<Notify>,
    flag: Arc<AtomicBool>,
}

/// The triggering side, kept by the server.
#[derive(Debug)]
pub struct ShutdownTrigger {
    shared: Shutdown,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let shared = Shutdown { notify: Arc::new(Notify::new()), flag: Arc::new(AtomicBool::new(false)) };
    (ShutdownTrigger { shared: shared.clone() }, shared)
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.shared.flag.store(true, Ordering::SeqCst);
        self.shared.notify.notify_waiters();
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// A future that resolves at the next trigger. Create it before checking [`Self::is_shutdown`].
    pub fn notified(&self) -> OwnedNotified {
        self.notify.clone().notified_owned()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn recv(&self) {
        let notified = self.notified();
        if self.is_shutdown() {
            return;
        }
        notified.await;
    }
}
