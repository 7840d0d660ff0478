//! zdt's own signals, mapped in one place to supervisor messages.
//!
//! TERM and INT: graceful shutdown (a second one: exit at once). HUP: reload.
//! USR2: upgrade in place (see [`crate::upgrade`]).
//! CHLD is not here: the [`crate::spawn::Reaper`] owns it. Nothing is done in
//! a signal handler; signal-hook only records the signal and this task turns
//! it into a message.

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use tokio::sync::mpsc;

use crate::supervisor::DaemonSignal;

/// Installs the handlers and returns the stream of daemon signals. The task
/// that feeds it ends when the receiver is dropped.
pub fn daemon_signals() -> std::io::Result<mpsc::Receiver<DaemonSignal>> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2])?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            let msg = match sig {
                SIGHUP => DaemonSignal::Reload,
                SIGUSR2 => DaemonSignal::Upgrade,
                _ => DaemonSignal::Shutdown,
            };
            tracing::info!(signal = sig, ?msg, "signal received");
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
