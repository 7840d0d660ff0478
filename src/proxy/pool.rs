//! Upstream connections to one private address, kept per proxy thread.
//!
//! A connection is taken for one request and given back only once its
//! response body has been read to the end, so an idle connection is always
//! between requests. One the worker closed meanwhile (its keep-alive
//! timeout) hands the request back unsent, and the request goes out on
//! another connection: the keep-alive close race never reaches the client.

use std::io;
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::body::RequestBody;
use super::{workers, PrivateAddr, CONNECT_TIMEOUT};

/// The client's request as it goes upstream: its own head and body, never
/// copied.
pub(crate) type UpstreamRequest = Request<RequestBody>;

/// Why a request could not be sent.
pub(crate) enum SendError {
    /// No connection could be made: nothing reached the worker, and the
    /// request comes back whole (body included) to go elsewhere.
    Connect(io::Error, Box<UpstreamRequest>),
    /// The connection failed after the request may have reached the worker.
    Upstream(hyper::Error),
}

/// Connections to one private address.
pub(crate) struct Pool {
    addr: PrivateAddr,
    /// One list per proxy thread, each used only by its thread.
    idle: workers::IdleLists<SendRequest<RequestBody>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

/// A connection lent to one request; [`Lease::release`] gives it back.
pub(crate) struct Lease {
    sender: SendRequest<RequestBody>,
    pool: Weak<Pool>,
    /// How long it may stay idle in the pool (`upstream_idle_timeout`).
    keep_for: Duration,
}

impl Lease {
    /// The response was read to the end: the connection may serve another.
    pub(crate) fn release(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.sender, self.keep_for);
        }
    }
}

impl Pool {
    pub(crate) fn new(addr: PrivateAddr, threads: usize) -> Arc<Self> {
        Arc::new(Self {
            addr,
            idle: workers::IdleLists::new(threads),
        })
    }

    fn put(&self, sender: SendRequest<RequestBody>, keep_for: Duration) {
        if sender.is_closed() {
            return;
        }
        self.idle
            .push(sender, keep_for, |oldest| oldest.is_closed());
    }

    /// The most recently used idle connection that is still open.
    async fn idle(&self) -> Option<SendRequest<RequestBody>> {
        loop {
            let mut sender = self.idle.pop()?;
            // Normally at once: the connection finished its last response.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Sends `req` on an idle connection or a new one; the connection may
    /// stay idle in the pool for `keep_for` after.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: UpstreamRequest,
        keep_for: Duration,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        while let Some(mut sender) = self.idle().await {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lease(sender, keep_for))),
                Err(mut e) => match e.take_message() {
                    // Closed before the request was written: try another.
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Upstream(e.into_error())),
                },
            }
        }
        // Boxed: connecting is the rare path, and its state would otherwise
        // sit in every request's future (and in every client connection).
        let mut sender = match Box::pin(self.open()).await {
            Ok(s) => s,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, self.lease(sender, keep_for))),
            Err(mut e) => match e.take_message() {
                // Not written at all on a fresh connection: as good as a failed connect.
                Some(unsent) => Err(SendError::Connect(
                    io::Error::other(e.into_error()),
                    Box::new(unsent),
                )),
                None => Err(SendError::Upstream(e.into_error())),
            },
        }
    }

    /// A new connection, its driver running as a task of this thread.
    async fn open(&self) -> io::Result<SendRequest<RequestBody>> {
        let stream = self.addr.connect_within(CONNECT_TIMEOUT).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_headers(super::MAX_HEADERS)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(cause = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn lease(self: &Arc<Self>, sender: SendRequest<RequestBody>, keep_for: Duration) -> Lease {
        Lease {
            sender,
            pool: Arc::downgrade(self),
            keep_for,
        }
    }
}
