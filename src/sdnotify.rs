//! zdt's side of sd_notify towards its *own* service manager (systemd with
//! `Type=notify`); [`crate::notify`] is the other direction, zdt receiving
//! from its workers.
//!
//! The protocol is one datagram per message on the unix socket named by
//! `NOTIFY_SOCKET` (a path, or an abstract name written `@name`), each
//! datagram a few `KEY=VALUE` lines. What zdt sends:
//!
//! - `READY=1` with `STATUS=` once every autostart program is RUNNING or
//!   has failed to start (FATAL, BACKOFF, EXITED; the status names them), so
//!   a broken program cannot hold the unit in "activating" forever;
//! - `RELOADING=1` with `MONOTONIC_USEC=` when a reload begins, `READY=1`
//!   when its changes settled (or it was rejected);
//! - `STOPPING=1` when the shutdown begins;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, from the supervisor's loop
//!   (a supervisor that stops turning stops feeding the watchdog).
//!
//! [`Notifier::from_env`] reads the variables once, at start, and removes
//! them from zdt's environment; the spawner also leaves them out of every
//! worker's environment (each worker gets its own `NOTIFY_SOCKET` from zdt).
//! Sending never blocks and never fails zdt: the socket is non-blocking, a
//! message that cannot be sent is dropped and the first failure is logged.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::state::{InstanceState, ProgramSnapshot};

/// The variables [`Notifier::from_env`] takes (and workers never inherit).
pub const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Sends sd_notify messages to zdt's service manager; does nothing when zdt
/// was not started with `NOTIFY_SOCKET`. Cheap to clone (all clones share
/// one socket and one "failure logged" flag).
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
    /// Half of `WATCHDOG_USEC` when the watchdog is on for zdt's pid.
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Inner {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// Set after the first failed send was logged (later ones are not).
    warned: AtomicBool,
}

/// The address `NOTIFY_SOCKET` names: `@name` is abstract, anything else a
/// filesystem path.
fn address(value: &OsString) -> std::io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(value),
    }
}

/// The watchdog interval systemd asks for: half of `WATCHDOG_USEC`, when
/// `WATCHDOG_PID` is unset or names `pid`.
fn watchdog_interval(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = for_pid {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` and removes
    /// them from the environment. Call it while zdt has one thread (removing
    /// a variable races with any other thread reading the environment).
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let for_pid = std::env::var("WATCHDOG_PID").ok();
        for v in VARIABLES {
            std::env::remove_var(v);
        }
        let Some(socket) = socket else {
            return Self::default();
        };
        let opened = address(&socket).and_then(|addr| {
            let sock = UnixDatagram::unbound()?;
            sock.set_nonblocking(true)?;
            Ok((sock, addr))
        });
        match opened {
            Ok((sock, addr)) => Self {
                inner: Some(Arc::new(Inner {
                    sock,
                    addr,
                    warned: AtomicBool::new(false),
                })),
                watchdog: watchdog_interval(
                    usec.as_deref(),
                    for_pid.as_deref(),
                    std::process::id(),
                ),
            },
            Err(e) => {
                // No logger yet: zdt's stderr is still its own.
                eprintln!(
                    "warning: NOTIFY_SOCKET={}: {e}; zdt will not notify its service manager",
                    socket.to_string_lossy()
                );
                Self::default()
            }
        }
    }

    /// Whether messages go anywhere.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// How often to send `WATCHDOG=1` (None: no watchdog).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.inner.as_ref().and(self.watchdog)
    }

    /// Sends one message (newline-separated `KEY=VALUE` lines). Never
    /// blocks: a full or missing socket drops it; the first failure is logged.
    pub fn send(&self, message: &str) {
        let Some(inner) = &self.inner else {
            return;
        };
        if let Err(e) = inner.sock.send_to_addr(message.as_bytes(), &inner.addr) {
            if !inner.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(cause = %e, "cannot notify the service manager (NOTIFY_SOCKET); later failures are not logged");
            }
        } else {
            tracing::debug!(message = %message.replace('\n', " "), "notified the service manager");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `RELOADING=1` with the time it began.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping all programs");
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// A timer for the watchdog: ticks every [`Notifier::watchdog_interval`],
    /// never when there is no watchdog.
    pub fn watchdog_timer(&self) -> WatchdogTimer {
        WatchdogTimer {
            interval: self.watchdog_interval().map(|every| {
                let mut i = tokio::time::interval(every);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            }),
        }
    }
}

/// The `WATCHDOG=1` timer of a loop's `select!`.
#[derive(Debug)]
pub struct WatchdogTimer {
    interval: Option<tokio::time::Interval>,
}

impl WatchdogTimer {
    /// Completes at the next tick; never without a watchdog.
    pub async fn tick(&mut self) {
        match &mut self.interval {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Whether a program's start has settled for `READY=1`: every instance is
/// RUNNING, or failed to start (BACKOFF, FATAL), or ran and exited.
pub fn start_settled(snap: &ProgramSnapshot) -> bool {
    snap.instances.iter().all(|i| {
        matches!(
            i.state,
            InstanceState::Running
                | InstanceState::Backoff
                | InstanceState::Fatal
                | InstanceState::Exited
        )
    })
}

/// The `STATUS=` line for `programs`: "3 programs running", and the ones
/// that failed to start with their state.
pub fn summary(programs: &[ProgramSnapshot]) -> String {
    let running = programs
        .iter()
        .filter(|p| {
            p.instances
                .iter()
                .any(|i| i.state == InstanceState::Running)
        })
        .count();
    let failed: Vec<String> = programs
        .iter()
        .filter_map(|p| {
            let bad = p
                .instances
                .iter()
                .find(|i| matches!(i.state, InstanceState::Fatal | InstanceState::Backoff))?;
            Some(format!("{} ({})", p.name, bad.state))
        })
        .collect();
    let plural = if running == 1 { "" } else { "s" };
    let mut line = format!("{running} program{plural} running");
    if !failed.is_empty() {
        line.push_str(&format!("; failed to start: {}", failed.join(", ")));
    }
    line
}

/// Sends `READY=1` once every program of `starting` has settled its start
/// (see [`start_settled`]), with the [`summary`] of `all`. Ends without
/// sending if a program actor ends first (zdt is stopping).
pub async fn ready_when_started(
    notifier: Notifier,
    starting: Vec<watch::Receiver<ProgramSnapshot>>,
    all: Vec<watch::Receiver<ProgramSnapshot>>,
) {
    for mut rx in starting {
        if rx.wait_for(start_settled).await.is_err() {
            return;
        }
    }
    let snaps: Vec<ProgramSnapshot> = all.iter().map(|rx| rx.borrow().clone()).collect();
    let status = summary(&snaps);
    tracing::info!(%status, "all programs started: notifying the service manager");
    notifier.ready(&status);
}

/// `text` without line breaks (a newline would start another field).
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_only_for_our_pid() {
        assert_eq!(
            watchdog_interval(Some("200000"), None, 7),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            watchdog_interval(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(100))
        );
        assert_eq!(watchdog_interval(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn sends_datagrams_and_survives_a_missing_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            inner: Some(Arc::new(Inner {
                sock: UnixDatagram::unbound().expect("socket"),
                addr: SocketAddr::from_pathname(&path).expect("addr"),
                warned: AtomicBool::new(false),
            })),
            watchdog: None,
        };
        n.ready("1 program running\nsecond line");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(
            &buf[..len],
            b"READY=1\nSTATUS=1 program running second line"
        );
        drop(rx);
        std::fs::remove_file(&path).expect("remove");
        n.stopping();
        n.stopping();
        assert!(n
            .inner
            .as_ref()
            .is_some_and(|i| i.warned.load(Ordering::Relaxed)));
    }
}
