//! Retiring ([`super::LocalProxy::retire`]): the proxy hands over before zdt
//! re-executes itself. The listening sockets cross the exec; client
//! connections cannot, so the proxy stops taking new ones and lets the ones
//! it has end at a request boundary.
//!
//! While retired:
//! - No accept loop accepts ([`Retire::accepting`] waits); the listening
//!   sockets stay open, so new clients wait in the kernel's listen backlog
//!   and the new process takes them. Proxies started meanwhile wait too.
//! - An HTTP answer whose head is not written yet says `Connection: close`
//!   and its connection closes after it (relay path: [`Closing`]; hyper
//!   path: the same header, which hyper honours).
//! - An idle keep-alive connection (no byte of a next head read) is not
//!   closed at once, as its client may be sending its next request right
//!   now: it waits up to `grace` for one, which is answered with
//!   `Connection: close`, and is closed if none comes. A partly read head
//!   counts as a request in progress. On the hyper path the connection
//!   gets hyper's `graceful_shutdown` once `grace` has passed.
//! - `protocol = "tcp"` connections and Upgrade tunnels cannot be told to
//!   end: they are waited for.
//!
//! [`retire`] resolves when no client connection is open (the per-thread
//! counts of [`super::workers::Open`]) or at the deadline, and returns a
//! [`Retired`]: dropping it resumes, [`Retired::commit`] keeps the proxy
//! retired for the exec.
//!
//! # Waking without a cost per request
//! The data path reads one flag per request ([`Retire::is_retiring`],
//! relaxed). An idle connection must still be woken when retiring begins
//! (to start its grace) or ends, without registering a waker at every
//! request: each client connection's task registers its waker once, when
//! it starts, in its proxy thread's list ([`Registered`]), and
//! [`Retire::turned`] only reads the flag. Beginning or ending a
//! retirement wakes every registered task once.
//!
//! # No connection slips past
//! An accept loop counts itself as accepting ([`Accepting`], SeqCst), then
//! reads the flag (SeqCst); retiring sets the flag (SeqCst), then reads the
//! count. So either the loop sees the flag and does not accept, or
//! [`retire`] sees it accepting and waits until it has paused. A loop
//! pauses only between accepts, after counting the connection it accepted
//! as open, so once no loop accepts, every connection accepted is counted.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::workers::{self, Conns};

/// The retiring state of one [`super::LocalProxy`], in its [`Conns`].
pub(super) struct Retire {
    /// Set while retired; read (relaxed) once per request on the data path.
    active: AtomicBool,
    /// Retirements in force: [`Retired`] values neither dropped nor
    /// committed (each [`retire`] call holds one). Retired while above 0.
    holds: Mutex<usize>,
    /// How long an idle connection waits for a next request, in ns.
    grace: AtomicU64,
    /// `true` while retired. Every accept loop holds a receiver and pauses
    /// when it changes; the sender lives as long as the proxy.
    paused: watch::Sender<bool>,
    /// Accept loops accepting now (each holds an [`Accepting`]).
    accepting: AtomicUsize,
    /// Woken while retired when a client connection closes or an accept
    /// loop pauses; [`retire`] waits on it.
    changed: Notify,
    /// Per proxy thread: the wakers of its client connections' tasks.
    wakers: Box<[Mutex<Wakers>]>,
}

impl std::fmt::Debug for Retire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retire")
            .field("active", &self.active)
            .field("accepting", &self.accepting)
            .finish()
    }
}

impl Retire {
    /// Not retired, for `threads` proxy threads.
    pub(super) fn new(threads: usize) -> Self {
        Self {
            active: AtomicBool::new(false),
            holds: Mutex::new(0),
            grace: AtomicU64::new(0),
            paused: watch::channel(false).0,
            accepting: AtomicUsize::new(0),
            changed: Notify::new(),
            wakers: (0..threads.max(1))
                .map(|_| Mutex::new(Wakers::default()))
                .collect(),
        }
    }

    /// Whether the proxy is retiring (or retired): answers close their
    /// connections. The one check on the data path.
    pub(super) fn is_retiring(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// How long an idle connection waits for a next request while retiring.
    pub(super) fn grace(&self) -> Duration {
        Duration::from_nanos(self.grace.load(Ordering::Relaxed))
    }

    /// Resolves once retiring has begun (`was` false) or ended (`was`
    /// true). Registers no waker of its own: only for a task that holds a
    /// [`Registered`], which wakes it.
    pub(super) fn turned(&self, was: bool) -> Turned<'_> {
        Turned { retire: self, was }
    }

    /// A receiver for an accept loop, to pass to [`Retire::accepting`].
    pub(super) fn subscribe(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// Resolves when an accept loop may accept, at once unless retired,
    /// counting it as accepting while the result lives. The loop must stop
    /// accepting and drop it when `paused` changes.
    pub(super) async fn accepting(&self, paused: &mut watch::Receiver<bool>) -> Accepting<'_> {
        loop {
            // Seen first, then counted, then the flag read: a retirement
            // that begins after the read is a change `paused` reports, and
            // one that began before it is seen by the read (module docs).
            paused.borrow_and_update();
            self.accepting.fetch_add(1, Ordering::SeqCst);
            let accepting = Accepting(self);
            if !self.active.load(Ordering::SeqCst) {
                return accepting;
            }
            drop(accepting);
            if paused.changed().await.is_err() {
                // The sender lives as long as the proxy: not reached.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Wakes [`retire`]'s wait: a connection closed or a loop paused.
    pub(super) fn changed(&self) {
        if self.active.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    /// Begins a retirement (one more hold if one is in force).
    fn begin(&self, grace: Duration) {
        {
            let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            *holds += 1;
            if *holds > 1 {
                return;
            }
            let ns = u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
            self.grace.store(ns, Ordering::Relaxed);
            // The flag before the watch (see `accepting`).
            self.active.store(true, Ordering::SeqCst);
            self.paused.send_replace(true);
        }
        self.wake_all();
    }

    /// Ends a hold; the last one resumes.
    fn end(&self) {
        {
            let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            *holds = holds.saturating_sub(1);
            if *holds > 0 {
                return;
            }
            self.active.store(false, Ordering::SeqCst);
            self.paused.send_replace(false);
        }
        self.wake_all();
    }

    /// Wakes every registered connection task, to see the flag again.
    fn wake_all(&self) {
        for list in self.wakers.iter() {
            let list = list.lock().unwrap_or_else(|p| p.into_inner());
            for w in list.slots.iter().flatten() {
                w.wake_by_ref();
            }
        }
    }
}

/// The future of [`Retire::turned`].
pub(super) struct Turned<'a> {
    retire: &'a Retire,
    was: bool,
}

impl Future for Turned<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        if self.retire.is_retiring() == self.was {
            // The task's [`Registered`] waker wakes it when this changes.
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// Wakers of one proxy thread's client connection tasks.
#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    /// Free places in `slots`.
    free: Vec<u32>,
}

/// A client connection task's registration in its thread's list: the task
/// is woken when retiring begins or ends. Removed when dropped.
pub(super) struct Registered {
    conns: Arc<Conns>,
    // u32: the registration is held by every idle client connection's task,
    // which stays in tokio's 512-byte task size with 8 bytes less (see
    // `relay::memory`); a thread's list holds one slot per open client
    // connection, far fewer than 2^32.
    thread: u32,
    key: u32,
}

impl Registered {
    /// Registers the task that awaits this.
    pub(super) async fn here(conns: &Arc<Conns>) -> Self {
        let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let lists = &conns.retire.wakers;
        let thread = workers::current() % lists.len();
        let mut list = lists[thread].lock().unwrap_or_else(|p| p.into_inner());
        let key = match list.free.pop() {
            Some(k) => {
                list.slots[k as usize] = Some(waker);
                k
            }
            None => {
                list.slots.push(Some(waker));
                (list.slots.len() - 1) as u32
            }
        };
        drop(list);
        Self {
            conns: conns.clone(),
            thread: thread as u32,
            key,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let lists = &self.conns.retire.wakers;
        let mut list = lists[self.thread as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = list.slots.get_mut(self.key as usize) {
            *slot = None;
            list.free.push(self.key);
        }
    }
}

/// Counts an accept loop as accepting while it lives.
pub(super) struct Accepting<'a>(&'a Retire);

impl Drop for Accepting<'_> {
    fn drop(&mut self) {
        self.0.accepting.fetch_sub(1, Ordering::SeqCst);
        self.0.changed();
    }
}

/// Whether the answer to a relayed request tells its client that the
/// connection closes: the client asked, or the proxy is retiring when the
/// answer's head is written.
pub(super) struct Closing<'a> {
    close: AtomicBool,
    retire: &'a Retire,
}

impl<'a> Closing<'a> {
    pub(super) fn new(close: bool, retire: &'a Retire) -> Self {
        Self {
            close: AtomicBool::new(close),
            retire,
        }
    }

    /// Sets whether the client asked to close.
    pub(super) fn set(&self, close: bool) {
        self.close.store(close, Ordering::Relaxed);
    }

    /// Whether the answer head written now says `Connection: close`; what
    /// it says, [`Closing::told`] says afterwards.
    pub(super) fn now(&self) -> bool {
        if self.retire.is_retiring() {
            self.close.store(true, Ordering::Relaxed);
            return true;
        }
        self.close.load(Ordering::Relaxed)
    }

    /// What the last answer head said (or the client asked, before one).
    pub(super) fn told(&self) -> bool {
        self.close.load(Ordering::Relaxed)
    }
}

/// What [`super::LocalProxy::retire`] ended with. Dropping it resumes the proxy
/// (the exec did not happen): accept loops accept again and connections
/// keep alive. [`Retired::commit`] keeps it retired (the exec follows).
#[must_use = "dropping a Retired resumes the proxy; commit() it when zdt re-executes"]
pub struct Retired {
    /// Client connections still open at the deadline: the exec cuts them.
    pub still_open: usize,
    /// How long retiring took.
    pub took: Duration,
    /// The proxy's state, to resume on drop (None once committed).
    conns: Option<Arc<Conns>>,
}

impl std::fmt::Debug for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retired")
            .field("still_open", &self.still_open)
            .field("took", &self.took)
            .field("committed", &self.conns.is_none())
            .finish()
    }
}

impl Retired {
    /// Consumes this without resuming: the proxy stays retired, as zdt
    /// re-executes itself now.
    pub fn commit(mut self) {
        self.conns = None;
        if self.still_open > 0 {
            tracing::warn!(
                still_open = self.still_open,
                "re-executing: {} client connections are cut",
                self.still_open
            );
        }
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        if let Some(conns) = self.conns.take() {
            conns.retire.end();
            tracing::info!("proxy resumed: accepting again");
        }
    }
}

/// Retires the proxy whose connections `conns` counts (see the module
/// docs and [`super::LocalProxy::retire`]).
pub(super) async fn retire(conns: &Arc<Conns>, grace: Duration, deadline: Duration) -> Retired {
    let began = Instant::now();
    let until = tokio::time::Instant::from_std(began) + deadline;
    conns.retire.begin(grace);
    // Resumes if this future is dropped before it ends.
    let mut retired = Retired {
        still_open: 0,
        took: Duration::ZERO,
        conns: Some(conns.clone()),
    };
    tracing::info!(
        ?grace,
        ?deadline,
        open = conns.open(),
        "proxy retiring: accepting paused, client connections close after their answers"
    );
    let retire = &conns.retire;
    retired.still_open = loop {
        let changed = retire.changed.notified();
        tokio::pin!(changed);
        // Enabled before the counts are read: a change after is not missed.
        changed.as_mut().enable();
        let open = conns.open();
        if open == 0 && retire.accepting.load(Ordering::SeqCst) == 0 {
            break 0;
        }
        tokio::select! {
            () = changed => {}
            () = tokio::time::sleep_until(until) => break conns.open(),
        }
    };
    retired.took = began.elapsed();
    if retired.still_open == 0 {
        tracing::info!(took = ?retired.took, "proxy retired: no client connection open");
    } else {
        tracing::warn!(
            took = ?retired.took,
            still_open = retired.still_open,
            "proxy retire deadline passed with {} client connections open",
            retired.still_open
        );
    }
    retired
}

#[cfg(test)]
mod tests;
