//! Pause and maintenance: the gate every new request (HTTP) or connection
//! (`protocol = "tcp"`) of a program passes before it is routed.
//!
//! The program actor sets the gate (`zdtctl pause`, `resume`, `maintenance`)
//! through its [`super::RouteTable`]; the proxy's connection tasks read it:
//! - [`Gate::Open`]: requests go on.
//! - [`Gate::Paused`]: requests are held, each a parked future waiting on the
//!   gate's `watch` (counted in `Traffic::held`), until the gate opens; then
//!   they go on, each connection's in its order. One held longer than the
//!   pause's `max` gets `503` (a tcp connection is closed). A held request
//!   keeps its client connection, which counts against `max_connections`.
//! - [`Gate::Maintenance`]: `503` with the operator's message.
//!
//! The data path never waits on an actor and never polls: it reads an atomic
//! flag, and only when that says "closed" the `watch`.
//!
//! `zdtctl pause` answers once no request is in flight, so no request may
//! slip past a pause after that. A request counts itself in flight (SeqCst)
//! and then checks the flag again (SeqCst); the actor publishes the gate, sets
//! the flag (SeqCst) and only then reads the in-flight counts. So either the
//! pause sees the request in flight and waits for it, or the request sees the
//! pause and goes back to wait at the gate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// What a program's gate lets through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Everything.
    Open,
    /// Nothing for now: new requests wait, each up to `max`.
    Paused {
        /// Unix time in milliseconds the pause began.
        since_ms: u64,
        /// How long one request may be held; then it gets 503.
        max: Duration,
    },
    /// Nothing: new requests get 503 with `message` as their body.
    Maintenance {
        /// Unix time in milliseconds the maintenance began.
        since_ms: u64,
        /// The body of the 503 (text/plain).
        message: Arc<str>,
    },
}

/// Why the gate turned a request away.
#[derive(Clone, Debug)]
pub(super) enum Closed {
    /// Held for the pause's whole `max` without a resume.
    PauseExpired(Duration),
    /// In maintenance, with this message.
    Maintenance(Arc<str>),
}

/// The writing end, in the program's [`super::RouteTable`] (its only owner:
/// the program actor). Dropping it opens every held request's way: they go on
/// and find whatever routes are left.
#[derive(Debug)]
pub(super) struct GateTx {
    /// The gate; every proxy's [`GateRx`] holds a receiver.
    gate: watch::Sender<Gate>,
    /// Set while the gate is not [`Gate::Open`], after the `watch` says so.
    closed: Arc<AtomicBool>,
}

impl GateTx {
    pub(super) fn new() -> Self {
        Self {
            gate: watch::channel(Gate::Open).0,
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets the gate: the `watch` first, then the flag (see the module docs).
    pub(super) fn set(&self, gate: Gate) {
        let closed = gate != Gate::Open;
        self.gate.send_replace(gate);
        self.closed.store(closed, Ordering::SeqCst);
    }

    pub(super) fn get(&self) -> Gate {
        self.gate.borrow().clone()
    }

    pub(super) fn watch(&self) -> watch::Receiver<Gate> {
        self.gate.subscribe()
    }

    pub(super) fn subscribe(&self) -> GateRx {
        GateRx {
            gate: self.gate.subscribe(),
            closed: self.closed.clone(),
        }
    }
}

/// The reading end, in each proxy's shared state.
#[derive(Debug)]
pub(super) struct GateRx {
    gate: watch::Receiver<Gate>,
    closed: Arc<AtomicBool>,
}

impl GateRx {
    /// Resolves when a request may go on (at once when the gate is open),
    /// or says why it may not. `held` counts the requests waiting here.
    pub(super) async fn admit(&self, held: &AtomicU64) -> Result<(), Closed> {
        if !self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Boxed: holding is the rare path; its timer stays out of every request.
        Box::pin(self.hold(held)).await
    }

    /// Whether a request counted in flight must go back to the gate: a pause
    /// or a maintenance began since it was admitted.
    pub(super) fn shut(&self) -> bool {
        self.closed.load(Ordering::SeqCst) && *self.gate.borrow() != Gate::Open
    }

    async fn hold(&self, held: &AtomicU64) -> Result<(), Closed> {
        let mut rx = self.gate.clone();
        let max = match &*rx.borrow_and_update() {
            Gate::Open => return Ok(()),
            Gate::Maintenance { message, .. } => return Err(Closed::Maintenance(message.clone())),
            Gate::Paused { max, .. } => *max,
        };
        let _held = Held::new(held);
        let waited =
            tokio::time::timeout(max, rx.wait_for(|g| !matches!(g, Gate::Paused { .. }))).await;
        match waited {
            Err(_) => Err(Closed::PauseExpired(max)),
            Ok(Ok(g)) => match &*g {
                Gate::Maintenance { message, .. } => Err(Closed::Maintenance(message.clone())),
                _ => Ok(()),
            },
            // The program is gone: on to whatever routes are left (503).
            Ok(Err(_)) => Ok(()),
        }
    }
}

/// Counts one held request while it lives.
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test(start_paused = true)]
    async fn a_paused_gate_holds_until_resume_and_counts_what_it_holds() {
        let tx = GateTx::new();
        let rx = tx.subscribe();
        let held = AtomicU64::new(0);
        assert!(rx.admit(&held).await.is_ok());
        tx.set(Gate::Paused {
            since_ms: 0,
            max: Duration::from_secs(30),
        });
        assert!(rx.shut());
        let waiting = rx.admit(&held);
        tokio::pin!(waiting);
        // Not through yet, and counted as held.
        assert!(waiting.as_mut().now_or_never().is_none());
        assert_eq!(held.load(Ordering::Relaxed), 1);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(waiting.as_mut().now_or_never().is_none());
        tx.set(Gate::Open);
        assert!(waiting.await.is_ok());
        assert_eq!(held.load(Ordering::Relaxed), 0);
        assert!(!rx.shut());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_held_past_max_is_refused() {
        let tx = GateTx::new();
        let rx = tx.subscribe();
        let held = AtomicU64::new(0);
        tx.set(Gate::Paused {
            since_ms: 0,
            max: Duration::from_secs(1),
        });
        let r = rx.admit(&held).await;
        assert!(matches!(r, Err(Closed::PauseExpired(d)) if d == Duration::from_secs(1)));
        assert_eq!(held.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn maintenance_refuses_at_once_and_ends_a_pause_with_its_message() {
        let tx = GateTx::new();
        let rx = tx.subscribe();
        let held = AtomicU64::new(0);
        tx.set(Gate::Paused {
            since_ms: 0,
            max: Duration::from_secs(30),
        });
        let waiting = rx.admit(&held);
        tokio::pin!(waiting);
        assert!(waiting.as_mut().now_or_never().is_none());
        tx.set(Gate::Maintenance {
            since_ms: 0,
            message: "back soon".into(),
        });
        assert!(matches!(waiting.await, Err(Closed::Maintenance(m)) if &*m == "back soon"));
        assert!(matches!(rx.admit(&held).await, Err(Closed::Maintenance(_))));
    }
}
