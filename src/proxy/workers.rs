//! The proxy's threads (`[supervisor] proxy_threads`, by default half the
//! CPUs: the workers behind the proxy need the rest), one current-thread
//! tokio runtime each (nginx's worker model). Every thread accepts on every proxied socket; a client
//! connection, its requests and the upstream connections they use then stay
//! on that thread, so the data path has no cross-thread wake-ups and no
//! shared connection pool.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

thread_local! {
    /// Index of the proxy thread this is, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

static WORKERS: OnceLock<Vec<Handle>> = OnceLock::new();

/// How many threads to start (`[supervisor] proxy_threads`).
static WANTED: AtomicUsize = AtomicUsize::new(1);

/// Sets how many proxy threads start on first use; later calls have no effect
/// once they run.
pub fn set_threads(n: usize) {
    WANTED.store(n.clamp(1, 64), Ordering::Relaxed);
}

/// Handles of the proxy threads, started on first use. Empty if not one
/// could be started.
pub(super) fn handles() -> &'static [Handle] {
    WORKERS.get_or_init(|| {
        let n = WANTED.load(Ordering::Relaxed);
        (0..n).filter_map(start).collect()
    })
}

/// The index of the current proxy thread (0 elsewhere), for per-thread state.
pub(super) fn current() -> usize {
    INDEX.with(Cell::get).unwrap_or(0)
}

/// How many per-thread slots per-thread state needs.
pub(super) fn count() -> usize {
    handles().len().max(1)
}

fn start(index: usize) -> Option<Handle> {
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
                rt.block_on(std::future::pending::<()>());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(cause = %e, "cannot start a proxy thread");
        return None;
    }
    rx.recv().ok()
}
