//! The hyper path's bodies. The response body keeps its request counted as
//! in flight until it has been sent (or the client went away and hyper
//! dropped it); the request body holds the client to `body_timeout` and
//! tells when it has ended, which starts `response_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;

use super::pool::Lease;
use super::InflightGuard;

/// The upstream's body with the request's in-flight guard and the
/// connection it came on, given back to the pool once the body has ended.
pub(crate) struct GuardedBody {
    inner: Incoming,
    guard: InflightGuard,
    lease: Option<Lease>,
    /// The request body's fate: when it failed (the client aborted its
    /// upload), an answer that breaks off is not the upstream's failure.
    request: Arc<BodyState>,
}

impl GuardedBody {
    pub(crate) fn new(
        inner: Incoming,
        guard: InflightGuard,
        lease: Lease,
        request: Arc<BodyState>,
    ) -> Self {
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
            request,
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
            Poll::Ready(Some(Err(e))) if self.request.failed() != 0 => {
                tracing::debug!(cause = %e, "response body ended: the client aborted its request body");
                self.guard.abandon();
                self.lease = None;
            }
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

/// What became of a client's request body (hyper path).
#[derive(Debug, Default)]
pub(crate) struct BodyState {
    /// All of it has been handed on.
    ended: AtomicBool,
    /// Woken when `ended` is set.
    end: Notify,
    /// 0 while it has not failed, else [`CLIENT_SILENT`] or [`CLIENT_GONE`].
    failed: AtomicU8,
}

/// The client sent nothing of it for `body_timeout`.
pub(crate) const CLIENT_SILENT: u8 = 1;
/// The client's connection ended or broke in the middle of it.
pub(crate) const CLIENT_GONE: u8 = 2;

impl BodyState {
    fn set_ended(&self) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            self.end.notify_waiters();
        }
    }

    /// Resolves once the whole body has been handed on.
    pub(crate) async fn ended(&self) {
        loop {
            let notified = self.end.notified();
            if self.ended.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// How the body failed, if it did (0 otherwise).
    pub(crate) fn failed(&self) -> u8 {
        self.failed.load(Ordering::SeqCst)
    }
}

/// The client's request body on its way upstream (hyper path). A client
/// that sends nothing for `body_timeout` while the body is wanted ends it
/// with an error; both that and the client going away are recorded in
/// [`BodyState`], so the request is answered 408 or counted as abandoned
/// instead of as the upstream's failure.
pub(crate) struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    /// Runs while a piece of the body is awaited; made at the first wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    state: Arc<BodyState>,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration) -> (Self, Arc<BodyState>) {
        let state = Arc::new(BodyState::default());
        if inner.is_end_stream() {
            state.set_ended();
        }
        let body = Self {
            inner,
            timeout,
            timer: None,
            waiting: false,
            state: state.clone(),
        };
        (body, state)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if this.inner.is_end_stream() {
                    this.state.set_ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.waiting = false;
                this.state.set_ended();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.failed.store(CLIENT_GONE, Ordering::SeqCst);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                // The clock runs from the first wait after a piece (not from
                // the piece: the upstream may have been slow to take it).
                let deadline = tokio::time::Instant::now() + this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.waiting {
                    this.waiting = true;
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.state.failed.store(CLIENT_SILENT, Ordering::SeqCst);
                    return Poll::Ready(Some(Err("no request body within body_timeout".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
