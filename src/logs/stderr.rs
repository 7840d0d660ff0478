//! zdt's own log lines on stderr, written by a dedicated thread.
//!
//! stderr may be a pipe whose reader stalls (`zdt run … 2>&1 | slow`, a
//! terminal on hold). A blocking write there from a runtime thread would
//! freeze supervision, the control socket and signal handling. So lines go
//! through a queue of at most [`QUEUE_BYTES`] to one writer thread, which may
//! block alone; a line that does not fit is dropped and counted, and the
//! count is written as a note once the reader takes lines again.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of log lines waiting for stderr at most.
pub const QUEUE_BYTES: usize = 256 * 1024;

/// A handle to the stderr writer thread; cheap to clone. Give it to
/// `tracing_subscriber::fmt().with_writer(..)`. The thread lives as long as
/// the process (it may be stuck in a write nobody will ever complete).
#[derive(Clone)]
pub struct StderrLog {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a line is queued (the thread waits) and when one was
    /// written (`flush` waits).
    changed: Condvar,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Bytes dropped since the last note.
    dropped: u64,
    /// The thread is writing a line it took off the queue.
    busy: bool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // The lock is never held across a write or anything that panics; a
        // poisoned queue is still a valid queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StderrLog {
    /// Starts the writer thread.
    pub fn start() -> std::io::Result<StderrLog> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("zdt-stderr".into())
            .spawn(move || writer(&s))?;
        Ok(StderrLog { shared })
    }

    /// Queues `bytes` for stderr, or drops and counts them if the queue is
    /// full. Never blocks on stderr.
    pub fn write_bytes(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut q = self.shared.queue();
        if q.bytes + bytes.len() > QUEUE_BYTES {
            q.dropped += bytes.len() as u64;
            return;
        }
        q.bytes += bytes.len();
        q.lines.push_back(bytes.to_vec());
        drop(q);
        self.shared.changed.notify_all();
    }

    /// Waits until everything queued was written, at most `timeout`; true
    /// if it was.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.queue();
        while !q.lines.is_empty() || q.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = match self.shared.changed.wait_timeout(q, left) {
                Ok((q, _)) => q,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

fn writer(shared: &Shared) {
    let mut q = shared.queue();
    loop {
        let Some(line) = q.lines.pop_front() else {
            q = match shared.changed.wait(q) {
                Ok(q) => q,
                Err(p) => p.into_inner(),
            };
            continue;
        };
        q.bytes -= line.len();
        q.busy = true;
        let dropped = std::mem::take(&mut q.dropped);
        drop(q);
        let mut err = std::io::stderr().lock();
        if dropped > 0 {
            let _ = writeln!(
                err,
                "zdt: {dropped} bytes of zdt's log dropped: stderr was not read fast enough"
            );
        }
        // Nothing to do about a failed write to stderr.
        let _ = err.write_all(&line);
        drop(err);
        q = shared.queue();
        q.busy = false;
        shared.changed.notify_all();
    }
}

/// One event's text, queued as a whole when tracing drops the writer.
pub struct Line {
    log: StderrLog,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.log.write_bytes(&self.buf);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrLog {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            log: self.clone(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let log = StderrLog {
            shared: Arc::new(Shared {
                queue: Mutex::default(),
                changed: Condvar::new(),
            }),
        };
        // No writer thread: nothing leaves the queue.
        let line = vec![b'x'; 1000];
        for _ in 0..QUEUE_BYTES / 1000 + 5 {
            log.write_bytes(&line);
        }
        let q = log.shared.queue();
        assert!(q.bytes <= QUEUE_BYTES);
        assert_eq!(q.dropped, 5000);
        drop(q);
        assert!(!log.flush(Duration::from_millis(10)));
    }
}
