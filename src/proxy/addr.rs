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

    /// Connects, giving up after `limit`.
    pub async fn connect_within(&self, limit: std::time::Duration) -> io::Result<Stream> {
        match tokio::time::timeout(limit, self.connect()).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {self} timed out"),
            )),
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
