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
    _guard: InflightGuard,
}

impl GuardedBody {
    pub(crate) fn new(inner: Incoming, guard: InflightGuard) -> Self {
        Self {
            inner,
            _guard: guard,
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
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
