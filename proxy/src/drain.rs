//! Graceful shutdown: a signal that tells every connection to finish, and a count of
//! the connections that have not finished yet.
//!
//! Each connection task holds a [`Watch`]; the drain completes when the last one is
//! dropped. The count is the channel's sender count, so nothing has to remember to
//! decrement it.

use std::{convert::Infallible, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

/// Starts the drain; cheap to clone (admin `POST /shutdown`, signal handler).
#[derive(Clone, Debug)]
pub struct Trigger {
    tx: Arc<watch::Sender<bool>>,
}

/// The owner side: waits for the trigger and then for the connections.
#[derive(Debug)]
pub struct Signal {
    trigger: Trigger,
    done: mpsc::Receiver<Infallible>,
}

/// Held by every task that must finish before the process exits.
#[derive(Clone, Debug)]
pub struct Watch {
    rx: watch::Receiver<bool>,
    _guard: mpsc::Sender<Infallible>,
}

/// A new drain.
pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    let (guard, done) = mpsc::channel(1);
    let trigger = Trigger { tx: Arc::new(tx) };
    (Signal { trigger, done }, Watch { rx, _guard: guard })
}

// === impl Trigger ===

impl Trigger {
    /// Starts the drain (idempotent).
    pub fn start(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the drain has started.
    pub fn is_started(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the drain has started.
    pub async fn started(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

// === impl Signal ===

impl Signal {
    /// A handle that starts the drain.
    pub fn trigger(&self) -> Trigger {
        self.trigger.clone()
    }

    /// Starts the drain and waits up to `timeout` for every [`Watch`] to be dropped;
    /// `true` if they all were.
    pub async fn drain(mut self, timeout: Duration) -> bool {
        self.trigger.start();
        tokio::time::timeout(timeout, self.done.recv())
            .await
            .is_ok()
    }
}

// === impl Watch ===

impl Watch {
    /// Resolves once the drain has started.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        // An error means the signal is gone, which only happens on exit: drain too.
        let _ = rx.wait_for(|v| *v).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_watches() {
        let (signal, watch) = channel();
        let w2 = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        assert!(signal.drain(Duration::from_secs(5)).await);
        assert!(task.is_finished());
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let (signal, watch) = channel();
        let _stuck = watch;
        assert!(!signal.drain(Duration::from_millis(20)).await);
    }
}
