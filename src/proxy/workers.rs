//! The proxy's threads (`[supervisor] proxy_threads`, by default one per
//! CPU, as nginx's `worker_processes auto`), one current-thread tokio
//! runtime each (nginx's worker model). A thread only uses CPU when it has
//! work, and with fewer threads than CPUs the machine idles while one proxy
//! thread is busy (measured: 15% idle with one thread on two cores, 2% with
//! two). Every thread accepts on every proxied socket and passes a new
//! connection to the least loaded thread when its own load is clearly
//! higher; the connection, its requests and the upstream connections they
//! use then stay on that thread, so the data path has no cross-thread
//! wake-ups and no shared connection pool.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::retire::Retire;

thread_local! {
    /// Index of the proxy thread this is, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Most proxy threads.
pub(super) const MAX: usize = 64;

/// The proxy threads of one [`super::LocalProxy`]: started on first use (a zdt
/// with no proxied program runs none), stopped by [`Workers::shutdown`].
pub(super) struct Workers {
    /// How many threads to start (`[supervisor] proxy_threads`).
    wanted: usize,
    /// Their runtimes' handles, once started; empty if not one could be.
    handles: OnceLock<Vec<Handle>>,
    /// Open client connections per thread, and the retiring state.
    conns: Arc<Conns>,
    /// Ends the threads' runtimes (and with them every task on them).
    stop: CancellationToken,
    /// The threads, joined at shutdown.
    joins: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("wanted", &self.wanted)
            .field("started", &self.handles.get().map(Vec::len))
            .finish()
    }
}

impl Workers {
    /// `n` proxy threads (1 to [`MAX`]), not started yet.
    pub(super) fn new(n: usize) -> Self {
        let wanted = n.clamp(1, MAX);
        Self {
            wanted,
            handles: OnceLock::new(),
            conns: Arc::new(Conns {
                open: (0..wanted).map(|_| AtomicUsize::new(0)).collect(),
                retire: Retire::new(wanted),
            }),
            stop: CancellationToken::new(),
            joins: Mutex::new(Vec::new()),
        }
    }

    /// Handles of the proxy threads, started on first use. Empty if not one
    /// could be started, or after shutdown.
    pub(super) fn handles(&self) -> &[Handle] {
        if self.stop.is_cancelled() {
            return &[];
        }
        self.handles.get_or_init(|| {
            let mut joins = self.joins.lock().unwrap_or_else(|p| p.into_inner());
            (0..self.wanted)
                .filter_map(|i| {
                    let (handle, join) = start(i, self.stop.clone())?;
                    joins.push(join);
                    Some(handle)
                })
                .collect()
        })
    }

    /// How many per-thread slots per-thread state needs.
    pub(super) fn count(&self) -> usize {
        self.handles().len().max(1)
    }

    /// The thread a new client connection accepted on this one should live
    /// on: this one, unless it holds clearly more open connections than the
    /// least loaded one. Every thread accepts, and whichever wakes first
    /// takes a connection, so without this a busy moment can leave one
    /// thread with most of the long-lived keep-alive connections (seen: 70%
    /// on one of two).
    pub(super) fn for_new_connection(&self) -> usize {
        let n = self.handles().len().min(self.conns.open.len());
        // On the stack: this runs for every accepted connection.
        let mut open = [0usize; MAX];
        for (count, o) in open.iter_mut().zip(&self.conns.open[..n]) {
            *count = o.load(Ordering::Relaxed);
        }
        thread_for(current(), &open[..n])
    }

    /// A proxy thread a kept-alive connection on this one should move to:
    /// one that holds clearly fewer open connections (as in
    /// [`Self::for_new_connection`]).
    pub(super) fn less_loaded(&self) -> Option<usize> {
        let there = self.for_new_connection();
        (there != current()).then_some(there)
    }

    /// Counts a client connection as open on proxy thread `thread` while
    /// the returned value lives.
    pub(super) fn open_on(&self, thread: usize) -> Open {
        let i = thread % self.conns.open.len();
        self.conns.open[i].fetch_add(1, Ordering::Relaxed);
        Open(self.conns.clone(), i)
    }

    /// The open connection counts and the retiring state.
    pub(super) fn conns(&self) -> &Arc<Conns> {
        &self.conns
    }

    /// The retiring state (see `retire.rs`).
    pub(super) fn retire(&self) -> &Retire {
        &self.conns.retire
    }

    /// Stops the threads: their runtimes end, and every task on them (accept
    /// loops, client connections, pooled upstream connections) is dropped.
    /// Waits for the threads to end. Later uses start no thread.
    pub(super) fn shutdown(&self) {
        self.stop.cancel();
        let joins = std::mem::take(&mut *self.joins.lock().unwrap_or_else(|p| p.into_inner()));
        for j in joins {
            let _ = j.join();
        }
    }
}

/// The index of the current proxy thread (0 elsewhere), for per-thread state.
pub(super) fn current() -> usize {
    INDEX.with(Cell::get).unwrap_or(0)
}

/// The thread among those with `open` connections that a connection
/// accepted on thread `me` goes to.
fn thread_for(me: usize, open: &[usize]) -> usize {
    let mine = open.get(me).copied().unwrap_or(0);
    let Some((least, &fewest)) = open.iter().enumerate().min_by_key(|&(_, n)| n) else {
        return me;
    };
    // Some slack: moving a connection costs two epoll_ctl calls and a wake-up.
    if mine > fewest + 2 + fewest / 16 {
        least
    } else {
        me
    }
}

/// The client connections of one [`super::LocalProxy`]: how many are open on
/// each proxy thread, and the retiring state that waits for them.
pub(super) struct Conns {
    /// Per proxy thread; each [`Open`] counts one.
    open: Box<[AtomicUsize]>,
    /// Woken by every [`Open`] that drops while retiring.
    pub(super) retire: Retire,
}

impl Conns {
    /// Client connections open on all threads.
    pub(super) fn open(&self) -> usize {
        self.open.iter().map(|n| n.load(Ordering::SeqCst)).sum()
    }

    /// Client connections open on proxy thread `thread`.
    #[cfg(test)]
    pub(super) fn open_at(&self, thread: usize) -> usize {
        self.open[thread].load(Ordering::SeqCst)
    }
}

/// Counts a client connection as open on a proxy thread while it lives.
pub(super) struct Open(Arc<Conns>, usize);

impl Drop for Open {
    fn drop(&mut self) {
        // SeqCst, then the retiring flag read (SeqCst): a retire that
        // began before is woken, one that begins after sees the count.
        self.0.open[self.1].fetch_sub(1, Ordering::SeqCst);
        self.0.retire.changed();
        busy();
    }
}

thread_local! {
    /// This proxy thread took a read buffer or closed a client connection
    /// since its last heartbeat.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    /// It has been quiet since its last heartbeat gave memory back.
    static SETTLED: Cell<bool> = const { Cell::new(true) };
}

/// Marks this thread busy until its next heartbeat.
pub(super) fn busy() {
    BUSY.with(|b| b.set(true));
}

/// How often a proxy thread's timer driver wakes with nothing to do.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Keeps the thread's next timer wake-up at most [`HEARTBEAT`] away. Tokio
/// wakes a runtime's driver (a write to its eventfd, and an extra return
/// from epoll_wait) whenever a timer is armed that expires before the
/// driver's next planned wake-up; every upstream connect arms one
/// (`CONNECT_TIMEOUT`, seconds away), and with only longer timers pending
/// (idle keep-alive clients' header timeout) each connect paid that wake-up:
/// measured, a third of an eventfd write per request with `php -S`, which
/// closes every connection. With this, no timeout of a second or more
/// causes one.
///
/// At each tick, a thread whose load is over (no request and no closed
/// connection in the last interval) frees its spare read buffers and has
/// the allocator return the memory it keeps free to the system: after 256
/// clients' load, the proxy process otherwise kept 4-5 MiB for good.
async fn heartbeat() {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if BUSY.with(|b| b.replace(false)) {
            SETTLED.with(|s| s.set(false));
        } else if !SETTLED.with(|s| s.replace(true)) {
            super::relay::buffer::free_spares();
            give_back_free_memory();
        }
    }
}

/// Returns the free pages of every malloc arena to the system (glibc keeps
/// freed memory in the arena of the thread that used it, and returns only
/// the top of the main heap by itself).
fn give_back_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes the arenas' locks itself; it is safe to call
    // from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts proxy thread `index`, which runs until `stop`.
fn start(index: usize, stop: CancellationToken) -> Option<(Handle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("zdt-proxy-{index}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(cause = %e, "cannot start a proxy thread");
                    return;
                }
            };
            INDEX.with(|i| i.set(Some(index)));
            if tx.send(rt.handle().clone()).is_ok() {
                rt.block_on(async {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = heartbeat() => {}
                    }
                });
            }
        });
    let join = match spawned {
        Ok(join) => join,
        Err(e) => {
            tracing::error!(cause = %e, "cannot start a proxy thread");
            return None;
        }
    };
    rx.recv().ok().map(|h| (h, join))
}

/// Idle upstream connections kept per proxy thread; more are closed.
const MAX_IDLE: usize = 512;

/// Idle connections to one upstream, one list per proxy thread, each used
/// only by its thread (so its lock is never contended). Dropping it closes
/// them. A connection idle longer than the `keep_for` it was put back with
/// (`upstream_idle_timeout`) is closed by a sweeper task of its thread, which
/// runs only while the thread's list holds a connection.
pub(super) struct IdleLists<T> {
    lists: Arc<[Mutex<IdleList<T>>]>,
}

/// One thread's idle connections, least recently used first, each with the
/// time it is closed at.
struct IdleList<T> {
    conns: Vec<(T, Instant)>,
    /// A sweeper task runs for this list.
    sweeping: bool,
}

impl<T: Send + 'static> IdleLists<T> {
    /// Empty lists for `threads` proxy threads.
    pub(super) fn new(threads: usize) -> Self {
        Self {
            lists: (0..threads.max(1))
                .map(|_| {
                    Mutex::new(IdleList {
                        conns: Vec::new(),
                        sweeping: false,
                    })
                })
                .collect(),
        }
    }

    /// Runs `f` on this thread's list.
    fn with<R>(&self, f: impl FnOnce(&mut IdleList<T>) -> R) -> Option<R> {
        let mut list = self.lists[current() % self.lists.len()].lock().ok()?;
        Some(f(&mut list))
    }

    /// The most recently used idle connection of this thread.
    pub(super) fn pop(&self) -> Option<T> {
        self.with(|l| l.conns.pop().map(|(c, _)| c)).flatten()
    }

    /// Keeps `conn` for up to `keep_for` (unless the list is full); first
    /// drops the least recently used one if `stale` says it is no longer
    /// worth keeping.
    pub(super) fn push(&self, conn: T, keep_for: Duration, stale: impl FnOnce(&T) -> bool) {
        let index = current() % self.lists.len();
        let start_sweeper = self.with(|l| {
            if l.conns.first().is_some_and(|(c, _)| stale(c)) {
                l.conns.remove(0);
            }
            if l.conns.len() < MAX_IDLE {
                l.conns.push((conn, Instant::now() + keep_for));
            }
            let start = !l.sweeping && !l.conns.is_empty();
            l.sweeping |= start;
            start
        });
        if start_sweeper == Some(true) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(sweep(Arc::downgrade(&self.lists), index));
                }
                // Not on a runtime (never on a proxy thread): the next push
                // on a runtime starts it.
                Err(_) => {
                    self.with(|l| l.sweeping = false);
                }
            }
        }
    }
}

/// Closes the connections of list `index` whose idle time is up, until the
/// list is empty or dropped (with its upstream).
async fn sweep<T: Send + 'static>(lists: Weak<[Mutex<IdleList<T>>]>, index: usize) {
    loop {
        let next = {
            let Some(lists) = lists.upgrade() else { return };
            let Ok(mut list) = lists[index].lock() else {
                return;
            };
            let now = Instant::now();
            // Dropping a connection closes it.
            list.conns.retain(|(_, until)| *until > now);
            match list.conns.iter().map(|(_, until)| *until).min() {
                Some(next) => next,
                None => {
                    list.sweeping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::thread_for;

    #[test]
    fn a_new_connection_moves_only_when_its_thread_holds_clearly_more() {
        assert_eq!(thread_for(0, &[0]), 0);
        assert_eq!(thread_for(0, &[2, 0]), 0);
        assert_eq!(thread_for(0, &[3, 0]), 1);
        assert_eq!(thread_for(1, &[40, 70, 41]), 0);
        // 64 against 61: within the slack of 2 + 1/16.
        assert_eq!(thread_for(2, &[61, 63, 64]), 2);
        assert_eq!(thread_for(2, &[61, 63, 67]), 0);
    }
}
