//! Bodies of the proxy: a response body that keeps its request counted as in
//! flight until it has been sent (or the client went away and hyper dropped
//! it), and a request body that survives an attempt that could not connect.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::pool::Lease;
use super::InflightGuard;

/// The upstream's body with the request's in-flight guard and the
/// connection it came on, given back to the pool once the body has ended.
pub(crate) struct GuardedBody {
    inner: Incoming,
    guard: InflightGuard,
    lease: Option<Lease>,
}

impl GuardedBody {
    pub(crate) fn new(inner: Incoming, guard: InflightGuard, lease: Lease) -> Self {
        let lease = if inner.is_end_stream() {
            lease.release();
            None
        } else {
            Some(lease)
        };
        Self {
            inner,
            guard,
            lease,
        }
    }
}

impl GuardedBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(cause = %e, cut = self.guard.is_cut(), "response body broke off");
                self.guard.fail();
                self.lease = None;
            }
            // The end; hyper also stops polling a body that says it has ended.
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's request body, handed to one upstream attempt at a time. It
/// moves into the attempt only when hyper first polls it, that is once a
/// connection to the upstream exists; an attempt that failed to connect
/// leaves it in place, so the request can go to another instance body and all.
pub(crate) struct ReplayBody {
    slot: Arc<Mutex<Option<Incoming>>>,
    taken: Option<Incoming>,
    hint: SizeHint,
    end: bool,
}

/// Where a request body waits until an attempt takes it.
#[derive(Clone)]
pub(crate) struct BodySlot(Arc<Mutex<Option<Incoming>>>);

impl BodySlot {
    pub(crate) fn new(body: Incoming) -> Self {
        Self(Arc::new(Mutex::new(Some(body))))
    }

    /// A body for the next attempt, unless an earlier attempt took it.
    pub(crate) fn attempt(&self) -> Option<ReplayBody> {
        let guard = self.0.lock().ok()?;
        let body = guard.as_ref()?;
        Some(ReplayBody {
            hint: body.size_hint(),
            end: body.is_end_stream(),
            slot: self.0.clone(),
            taken: None,
        })
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.taken.is_none() {
            let taken = self.slot.lock().ok().and_then(|mut s| s.take());
            self.taken = taken;
        }
        match self.taken.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}
