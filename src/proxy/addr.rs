//! A worker's private address in proxy mode: a loopback port or a unix
//! socket path, and a connection to either.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where one process of one generation listens, chosen by zdt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateAddr {
    /// `127.0.0.1:PORT` (`PORT`, `{port}`).
    Tcp(SocketAddr),
    /// A unix socket path (`SOCKET`, `{socket}`).
    Unix(PathBuf),
}

impl std::fmt::Display for PrivateAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl PrivateAddr {
    /// Connects to it (TCP_NODELAY on TCP).
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Self::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Self::Unix(p) => Ok(Stream::Unix(tokio::net::UnixStream::connect(p).await?)),
        }
    }

    /// Connects and sends `first` on the new connection, giving up on the
    /// connect after `limit`; Err(bytes of `first` sent, what failed). Over
    /// TCP, `first` goes out right after connect() returned, before the
    /// reactor reports the connection writable: on loopback the handshake
    /// is done by then, and that saves a trip through the reactor and the
    /// SO_ERROR read per new upstream connection (`php -S` closes each one
    /// after its answer). When the handshake is still running, the send
    /// fails with EAGAIN, nothing was sent, and it waits as `connect` does.
    pub(crate) async fn connect_sending(
        &self,
        first: &[u8],
        limit: std::time::Duration,
    ) -> Result<Stream, (usize, io::Error)> {
        let Self::Tcp(a) = self else {
            let mut s = self.connect_within(limit).await.map_err(|e| (0, e))?;
            write_counted(&mut s, first).await?;
            return Ok(s);
        };
        let (sock, sent) = connect_and_send(a, first).map_err(|e| (0, e))?;
        let s = tokio::net::TcpStream::from_std(sock.into()).map_err(|e| (sent.unwrap_or(0), e))?;
        let done = match sent {
            Some(n) => n,
            None => {
                match tokio::time::timeout(limit, s.writable()).await {
                    Ok(r) => r.map_err(|e| (0, e))?,
                    Err(_) => return Err((0, timed_out(self))),
                }
                if let Some(e) = s.take_error().map_err(|e| (0, e))? {
                    return Err((0, e));
                }
                0
            }
        };
        let mut s = Stream::Tcp(s);
        write_counted(&mut s, &first[done..])
            .await
            .map_err(|(n, e)| (done + n, e))?;
        Ok(s)
    }

    /// Connects, giving up after `limit`.
    pub async fn connect_within(&self, limit: std::time::Duration) -> io::Result<Stream> {
        match tokio::time::timeout(limit, self.connect()).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(self)),
        }
    }

    /// The port, for a TCP address.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Tcp(a) => Some(a.port()),
            Self::Unix(_) => None,
        }
    }

    /// The `Host` a request gets when the client sent none.
    pub fn host(&self) -> hyper::header::HeaderValue {
        let fallback = hyper::header::HeaderValue::from_static("localhost");
        match self {
            // A socket address is always a valid header value.
            Self::Tcp(a) => {
                hyper::header::HeaderValue::from_str(&a.to_string()).unwrap_or(fallback)
            }
            Self::Unix(_) => fallback,
        }
    }
}

fn timed_out(addr: &PrivateAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connecting to {addr} timed out"),
    )
}

/// A non-blocking TCP connection to `a` (TCP_NODELAY) on which connect()
/// was called, and how much of `first` went out on it: `None` while the
/// handshake runs.
fn connect_and_send(a: &SocketAddr, first: &[u8]) -> io::Result<(socket2::Socket, Option<usize>)> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(*a), Type::STREAM.nonblocking(), None)?;
    sock.set_nodelay(true)?;
    match sock.connect(&(*a).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // A send during the handshake fails with EAGAIN (nothing sent); one on
    // a refused connection with its error.
    match sock.send_with_flags(first, libc::MSG_NOSIGNAL) {
        Ok(n) => Ok((sock, Some(n))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((sock, None)),
        Err(e) => Err(e),
    }
}

/// Writes all of `data`; Err(bytes written, what failed).
pub(crate) async fn write_counted(s: &mut Stream, data: &[u8]) -> Result<(), (usize, io::Error)> {
    use tokio::io::AsyncWriteExt;
    let mut done = 0;
    while done < data.len() {
        match s.write(&data[done..]).await {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// A connection to a private address.
#[derive(Debug)]
pub enum Stream {
    /// Over TCP.
    Tcp(tokio::net::TcpStream),
    /// Over a unix socket.
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

    #[tokio::test]
    async fn connect_sending_delivers_the_first_bytes_whole() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = PrivateAddr::Tcp(l.local_addr().expect("address"));
        // More than a socket buffer takes at once: the rest goes through
        // the reactor.
        let first: Vec<u8> = (0..8 << 20).map(|i| i as u8).collect();
        let reader = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            got
        });
        let s = addr.connect_sending(&first, LIMIT).await.expect("sent");
        drop(s);
        assert!(reader.await.expect("reader") == first);
    }

    #[tokio::test]
    async fn connect_sending_to_a_closed_port_fails_with_nothing_sent() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = PrivateAddr::Tcp(l.local_addr().expect("address"));
        drop(l);
        match addr.connect_sending(b"GET / HTTP/1.1\r\n\r\n", LIMIT).await {
            Err((0, e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            Err((n, e)) => panic!("{n} bytes sent before {e}"),
            Ok(_) => panic!("connected to a closed port"),
        }
    }
}
