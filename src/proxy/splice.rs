//! `protocol = "tcp"`: the bytes of a connection go from socket to socket.
//! Small messages are copied through a buffer (one read, one write); once a
//! read fills the buffer the direction carries bulk data and switches to
//! splice(2) through a pipe, so the bytes are no longer copied into zdt
//! (bench: +30% on 4 MB bodies; for small messages the pipe costs more
//! than the copy).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::task::{Context, Poll};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;

use super::addr::Stream;

/// Most bytes moved by one splice call (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

/// The copy buffer; a read that fills it switches the direction to splice.
const COPY: usize = 16 * 1024;

/// A tokio socket that splice can read from and write to.
pub(super) trait SpliceIo {
    /// Its file descriptor.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Waits until it may be read or written.
    fn ready(&self, interest: Interest)
        -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Polls until it may be read. Unlike [`SpliceIo::ready`] this keeps no
    /// state in the caller's future (the waker goes to the socket's one
    /// reader slot), so an idle connection's task stays small; only one
    /// task may wait to read the socket this way, as with `poll_read`.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Runs `f`, clearing readiness when it would block.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// A non-blocking read.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// A non-blocking write.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

macro_rules! splice_io {
    ($t:ty) => {
        impl SpliceIo for $t {
            fn fd(&self) -> BorrowedFd<'_> {
                self.as_fd()
            }
            async fn ready(&self, interest: Interest) -> io::Result<()> {
                <$t>::ready(self, interest).await.map(|_| ())
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
        }
    };
}

splice_io!(tokio::net::TcpStream);
splice_io!(tokio::net::UnixStream);

impl SpliceIo for Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
    async fn ready(&self, interest: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.ready(interest).await.map(|_| ()),
            Self::Unix(s) => s.ready(interest).await.map(|_| ()),
        }
    }
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(s) => s.poll_read_ready(cx),
            Self::Unix(s) => s.poll_read_ready(cx),
        }
    }
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            Self::Tcp(s) => s.try_io(interest, f),
            Self::Unix(s) => s.try_io(interest, f),
        }
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_read(buf),
            Self::Unix(s) => s.try_read(buf),
        }
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.try_write(buf),
            Self::Unix(s) => s.try_write(buf),
        }
    }
}

/// Moves bytes from `src` to `dst` until `src` ends, then shuts down the
/// writing side of `dst`. Returns how many bytes went through.
pub(super) async fn pump<A: SpliceIo, B: SpliceIo>(src: &A, dst: &B) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; COPY];
    loop {
        src.ready(Interest::READABLE).await?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n]).await?;
        total += n as u64;
        if n == buf.len() {
            total += splice_all(src, dst).await?;
            break;
        }
    }
    let _ = nix::sys::socket::shutdown(dst.fd().as_raw_fd(), nix::sys::socket::Shutdown::Write);
    Ok(total)
}

async fn write_all<B: SpliceIo>(dst: &B, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.ready(Interest::WRITABLE).await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The rest of the direction, through a pipe.
async fn splice_all<A: SpliceIo, B: SpliceIo>(src: &A, dst: &B) -> io::Result<u64> {
    let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let (mut in_pipe, mut total) = (0usize, 0u64);
    loop {
        if in_pipe == 0 {
            src.ready(Interest::READABLE).await?;
            // The pipe is empty, so "would block" can only mean the socket.
            let moved = src.try_io(Interest::READABLE, || {
                splice(src.fd(), None, &pipe_w, None, CHUNK, flags).map_err(io::Error::from)
            });
            match moved {
                Ok(0) => return Ok(total),
                Ok(n) => in_pipe = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        dst.ready(Interest::WRITABLE).await?;
        // The pipe holds data, so "would block" can only mean the socket.
        let moved = dst.try_io(Interest::WRITABLE, || {
            splice(&pipe_r, None, dst.fd(), None, in_pipe, flags).map_err(io::Error::from)
        });
        match moved {
            Ok(n) => {
                in_pipe -= n;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
