//! The read end of a worker's stdout or stderr pipe, read in batches.
//!
//! A server that logs a line per request (`php -S` writes three) would cost
//! zdt a wake-up, a read and a file write per line. After a read that
//! emptied the pipe, [`OutputPipe`] lets output gather there for
//! [`GATHER`] before it reads again, so that is one of each per batch.
//!
//! Sleeping is not enough by itself: once a pipe has been watched with
//! epoll, Linux wakes its watchers on every write, not only on the write
//! that makes it readable. So while output gathers, the pipe is out of the
//! runtime's epoll set, and the worker's writes wake nobody. It goes back in
//! only when a read finds the pipe empty; the first line after a quiet
//! spell is then read at once.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Sleep;

/// How long output gathers in the pipe after a read that emptied it; the
/// time stamp of a line (`timestamps = true`) is its batch's, up to this much
/// after the worker wrote it.
const GATHER: Duration = Duration::from_millis(10);

/// A non-blocking pipe read end that is in the runtime's epoll set only
/// while it waits for output (module docs).
pub struct OutputPipe {
    /// The pipe's registration while a read waits for it to become
    /// readable; `None` while output gathers. Declared before `fd`, so it is
    /// deregistered before the fd closes.
    reg: Option<AsyncFd<RawFd>>,
    /// The pause after a read that emptied the pipe.
    gather: Option<Pin<Box<Sleep>>>,
    fd: OwnedFd,
}

impl OutputPipe {
    /// Takes a pipe's read end and makes it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<OutputPipe> {
        crate::fds::set_nonblocking(fd.as_raw_fd())?;
        Ok(OutputPipe {
            reg: None,
            gather: None,
            fd,
        })
    }
}

impl AsyncRead for OutputPipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = this.gather.as_mut() {
                ready!(std::future::Future::poll(sleep.as_mut(), cx));
                this.gather = None;
            }
            let room = buf.initialize_unfilled();
            let want = room.len();
            match nix::unistd::read(this.fd.as_raw_fd(), room) {
                Ok(n) => {
                    buf.advance(n);
                    if n > 0 && n < want {
                        // The pipe is empty: let output gather, unwatched.
                        this.reg = None;
                        this.gather = Some(Box::pin(tokio::time::sleep(GATHER)));
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    let reg = match &mut this.reg {
                        Some(reg) => reg,
                        slot @ None => {
                            // Added to the epoll set, the pipe reports output
                            // that came since the read above at once.
                            // SAFETY: `fd` stays open and the same fd for as
                            // long as `reg` lives: it is never replaced, and
                            // `reg` is dropped first (field order).
                            let reg = unsafe {
                                AsyncFd::register_with_interest(
                                    this.fd.as_raw_fd(),
                                    tokio::io::Interest::READABLE,
                                )
                            };
                            slot.insert(reg.map_err(io::Error::from)?)
                        }
                    };
                    let mut guard = ready!(reg.poll_read_ready(cx))?;
                    // Readiness from before the read above is stale; the
                    // next read tells.
                    guard.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::{pump, LogSink};
    use std::io::Write;

    /// A worker that writes a line every millisecond: the pump reads the
    /// first line alone, then at most one batch per `GATHER`; every line
    /// arrives whole and in order, and the end of the output ends the pump.
    #[tokio::test]
    async fn lines_that_come_fast_are_read_in_batches() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let sink = LogSink::new(None, 0, 0);
        let mut live = sink.subscribe();
        let reader = OutputPipe::new(r).expect("pipe reader");
        let task = tokio::spawn(pump(reader, sink.clone(), "[g1] ".into(), false));
        let mut w = std::fs::File::from(w);
        w.write_all(b"first\n").expect("write");
        let first = tokio::time::timeout(Duration::from_secs(10), live.recv())
            .await
            .expect("the first line in time")
            .expect("first line");
        assert_eq!(&first[..], b"[g1] first\n");
        let started = std::time::Instant::now();
        let writer = std::thread::spawn(move || {
            for i in 0..60 {
                w.write_all(format!("line {i}\n").as_bytes())
                    .expect("write");
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        task.await.expect("pump");
        let elapsed = started.elapsed();
        let mut batches = 0;
        let mut text = Vec::new();
        while let Ok(chunk) = live.try_recv() {
            batches += 1;
            text.extend_from_slice(&chunk);
        }
        let want: String = (0..60).map(|i| format!("[g1] line {i}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&text), want);
        // A batch is read at least GATHER after the one before it.
        let most = 1 + (elapsed.as_millis() / GATHER.as_millis()) as usize;
        assert!(
            batches <= most,
            "{batches} reads for 60 lines in {elapsed:?}; at most {most} expected"
        );
    }
}
