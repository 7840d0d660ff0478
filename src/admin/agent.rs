//! The HAProxy agent (`[supervisor] agent_check`): a TCP port that writes
//! one line and closes, the protocol of HAProxy's `agent-check`. The line
//! follows `/health` ([`super::verdict`]):
//!
//! - `ready up`: the host serves (and leaves a DRAIN or MAINT an earlier
//!   answer set);
//! - `drain`: zdt shuts down, or a program is drained, stopping or in
//!   maintenance: HAProxy sends no new clients, open ones finish;
//! - `down`: a program with `listen` addresses has no instance RUNNING.
//!
//! HAProxy's `agent-send` text, if any, is not read: the answer is the
//! host's.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::{verdict, Admin, Verdict};

/// How long writing the line may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The line for `v`.
pub fn line(v: &Verdict) -> &'static str {
    match v {
        Verdict::Serving => "ready up\n",
        Verdict::Unavailable { drain: true, .. } => "drain\n",
        Verdict::Unavailable { drain: false, .. } | Verdict::Unknown(_) => "down\n",
    }
}

/// Answers every connection on `listener` until `stop` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, admin: Admin, stop: CancellationToken) {
    loop {
        let next = admin.pause.next(&admin.host, &stop, || listener.accept());
        let Some((accepted, active)) = next.await else {
            return;
        };
        let mut stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(cause = %e, "agent_check: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let text = line(&verdict(&admin, None));
        tokio::spawn(async move {
            let _active = active;
            let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                stream.write_all(text.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}
