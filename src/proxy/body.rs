//! A response body that keeps its request counted as in flight until the
//! body has been sent (or the client went away and hyper dropped it).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::InflightGuard;

/// The upstream's body with the request's in-flight guard.
pub(crate) struct GuardedBody {
    inner: Incoming,
    guard: InflightGuard,
}

impl GuardedBody {
    pub(crate) fn new(inner: Incoming, guard: InflightGuard) -> Self {
        Self { inner, guard }
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
        if let Poll::Ready(Some(Err(e))) = &polled {
            tracing::warn!(cause = %e, cut = self.guard.is_cut(), "response body broke off");
            self.guard.fail();
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
