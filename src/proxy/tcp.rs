//! The tcp path (`protocol = "tcp"`): a client connection forwarded as
//! bytes (copied, then spliced) to one instance.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::answers::closed_message;
use super::route::{route, Refused};
use super::{canary, splice, PrivateAddr, Shared, CONNECT_TIMEOUT};

/// `protocol = "tcp"`: forwards one client connection, as bytes, to the
/// least loaded ready instance. The connection counts as in flight until
/// it closes. With no instance ready within `queue_timeout` (or while
/// draining) the client connection is closed: TCP has no 503.
pub(super) async fn serve_tcp<S: splice::SpliceIo>(client: S, shared: Arc<Shared>) {
    if shared.draining.load(Ordering::SeqCst) {
        shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut tried: Vec<PrivateAddr> = Vec::new();
    let mut pin = canary::Pin::default();
    let (upstream, mut guard) = loop {
        // Counted from before the connect, so a drain cannot miss it.
        let (up, guard) = match route(&shared, &tried, &mut pin, &canary::NoKeys).await {
            Ok(routed) => routed,
            Err(Refused::Closed(why)) => {
                let (why, _) = closed_message(&shared, &why);
                tracing::info!(program = %shared.program, why = why.trim_end(), "gate closed; connection closed");
                return;
            }
            Err(Refused::NoInstance) if tried.is_empty() => {
                shared.traffic.unavailable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(program = %shared.program, "no ready instance within queue_timeout; connection closed");
                return;
            }
            Err(Refused::NoInstance) => {
                tracing::warn!(program = %shared.program, "no instance could be reached; connection closed");
                return;
            }
        };
        // Nothing was sent yet: a connect failure is always safe to retry.
        match up.addr.connect_within(CONNECT_TIMEOUT).await {
            Ok(s) => break (s, guard),
            Err(e) => {
                shared.traffic.stats.connect_error();
                tracing::warn!(program = %shared.program, upstream = %up.addr, cause = %e, "connect failed; trying another instance")
            }
        }
        guard.discard();
        tried.push(up.addr.clone());
    };
    // Until the upstream side ends; the client ending its side is passed on
    // as a half-close.
    let up = async {
        let _ = splice::pump(&client, &upstream).await;
        std::future::pending::<()>().await;
    };
    let copied = tokio::select! {
        r = splice::pump(&upstream, &client) => r,
        () = up => Ok(0),
    };
    if guard.is_cut() {
        tracing::warn!(program = %shared.program, "connection cut: the instance was stopped at max_wait");
        guard.fail();
    } else if let Err(e) = copied {
        tracing::debug!(program = %shared.program, cause = %e, "connection ended with an error");
    }
}
