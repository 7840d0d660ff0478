//! The proxy's response body: it keeps its request counted as in flight
//! until it has been sent (or the client went away and hyper dropped it).

use std::pin::Pin;
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
