//! The relay's pooled upstream connections: idle ones per upstream per
//! proxy thread, checked before reuse.

use std::io;

use crate::proxy::addr::Stream;
use crate::proxy::splice::SpliceIo;
use crate::proxy::workers;

/// Idle relay connections to one upstream, per proxy thread. Dropping it
/// (with its upstream, at the switch) closes them.
pub(crate) struct Idle(workers::IdleLists<Stream>);

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Idle")
    }
}

impl Idle {
    pub(crate) fn new(threads: usize) -> Self {
        Self(workers::IdleLists::new(threads))
    }

    /// The most recently used idle connection the worker has not closed.
    pub(super) fn take(&self) -> Option<Stream> {
        loop {
            let s = self.0.pop()?;
            if still_open(&s) {
                return Some(s);
            }
        }
    }

    /// Keeps `s` for the next request, for up to `keep_for`
    /// (`upstream_idle_timeout`). The least recently used one is checked
    /// too, so connections the worker closed while they sat at the bottom of
    /// the list do not pile up (in CLOSE_WAIT) under steady load.
    pub(super) fn put(&self, s: Stream, keep_for: std::time::Duration) {
        self.0.push(s, keep_for, |oldest| !still_open(oldest));
    }
}

/// Whether an idle upstream connection is still open: it has nothing to
/// read, so readable means closed (or a protocol error). No syscall unless
/// the reactor saw an event on it.
fn still_open(s: &Stream) -> bool {
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
