//! The proxy in a process of its own: `zdt __proxy`, a child of zdt that
//! runs the proxy component ([`super::LocalProxy`]) and takes the boundary's
//! calls as messages over one channel.
//!
//! Why a process: a client connection in the middle of a request cannot
//! cross zdt's exec (an upgrade). With the proxy in a child, the exec
//! leaves it serving; the new binary starts a proxy of its own on the same
//! listening sockets (both accept from one queue), and only then retires
//! the old child, which stops accepting, closes each client connection
//! after its current answer (`Connection: close`), and exits once none is
//! open (bounded by the longest `max_wait`).
//!
//! # The channel
//!
//! A `SOCK_SEQPACKET` socket pair: one message per packet, JSON, listening
//! sockets attached as `SCM_RIGHTS`. The child gets its end as fd 3 with
//! `LISTEN_FDS=1` (the socket-activation protocol zdt already speaks).
//! zdt sends [`Order`]s; the child answers the ones that carry an `id` with
//! an [`Answer`] of the same id, in any order (a wait answers when its
//! count reaches zero). The child handles orders one at a time in the order
//! sent, so the gate-then-wait order a pause relies on (`gate.rs`) holds
//! across the channel.
//!
//! # Failure
//!
//! If the child dies, zdt starts another and sends it everything in force
//! (tables, drain flags, gates, routes, listening sockets), so proxying
//! resumes; requests that were in flight in the dead child are lost with
//! it and every wait on them resolves (nothing is in flight any more).
//! Counters start again from zero. If zdt dies, the child is killed
//! (PR_SET_PDEATHSIG) as any worker.

mod client;
mod server;

pub use client::{Client, Counters, Drain, Retiring, StartHandle, Table};
pub use server::run as serve;

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{Gate, Options, ProcessId, ProgramCounts, RouteSet};

/// The fd name the child's channel end carries in `LISTEN_FDNAMES`.
pub const CHANNEL_FDNAME: &str = "zdt-proxy";

/// Largest message either side sends or takes (a route set of a program
/// with hundreds of instances is a few tens of KiB).
const MAX_MESSAGE: usize = 1 << 20;

/// Most listening sockets one message carries.
const MAX_FDS: usize = 64;

/// What zdt tells the proxy process. `table`, `start` and `drain` number
/// objects zdt made; `id` numbers a question, answered once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Order {
    /// A new program's table, empty.
    Table {
        table: u64,
        program: String,
    },
    /// The program is gone: drop its table.
    DropTable {
        table: u64,
    },
    Proxied {
        table: u64,
        on: bool,
    },
    Draining {
        table: u64,
        on: bool,
    },
    Gate {
        table: u64,
        gate: WireGate,
    },
    Publish {
        table: u64,
        set: RouteSet,
    },
    /// Accept on the sockets attached, for `table`'s program.
    Start {
        start: u64,
        table: u64,
        options: Options,
    },
    /// Stop accepting for that start.
    Stop {
        start: u64,
    },
    /// Answered with [`Answer::Counts`].
    Read {
        id: u64,
        table: u64,
    },
    /// Answered with [`Answer::Done`] once nothing is in flight.
    WaitIdle {
        id: u64,
        table: u64,
    },
    /// Keep counting `process` for a drain from now on.
    DrainBegin {
        drain: u64,
        table: u64,
        process: ProcessId,
    },
    /// Answered with [`Answer::Done`] once the drained process is idle.
    DrainIdle {
        id: u64,
        drain: u64,
    },
    /// Answered with [`Answer::Cut`].
    DrainCut {
        id: u64,
        drain: u64,
    },
    DrainEnd {
        drain: u64,
    },
    /// Answered with [`Answer::Done`] once every order before it is applied.
    Sync {
        id: u64,
    },
    /// Hand over to another proxy process: answered with
    /// [`Answer::Retired`], then the process exits.
    Retire {
        id: u64,
        grace: Duration,
        deadline: Duration,
    },
    /// Stop everything and exit.
    Shutdown,
}

/// What the proxy process answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Answer {
    Done {
        id: u64,
    },
    Counts {
        id: u64,
        counts: Option<ProgramCounts>,
    },
    Cut {
        id: u64,
        n: u64,
    },
    Retired {
        id: u64,
        still_open: usize,
        took: Duration,
    },
}

impl Answer {
    fn id(&self) -> u64 {
        match self {
            Self::Done { id }
            | Self::Counts { id, .. }
            | Self::Cut { id, .. }
            | Self::Retired { id, .. } => *id,
        }
    }
}

/// A [`Gate`] as it crosses the channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum WireGate {
    Open,
    Paused { since_ms: u64, max: Duration },
    Maintenance { since_ms: u64, message: String },
}

impl From<&Gate> for WireGate {
    fn from(g: &Gate) -> Self {
        match g {
            Gate::Open => Self::Open,
            Gate::Paused { since_ms, max } => Self::Paused {
                since_ms: *since_ms,
                max: *max,
            },
            Gate::Maintenance { since_ms, message } => Self::Maintenance {
                since_ms: *since_ms,
                message: message.to_string(),
            },
        }
    }
}

impl From<WireGate> for Gate {
    fn from(g: WireGate) -> Self {
        match g {
            WireGate::Open => Self::Open,
            WireGate::Paused { since_ms, max } => Self::Paused { since_ms, max },
            WireGate::Maintenance { since_ms, message } => Self::Maintenance {
                since_ms,
                message: message.into(),
            },
        }
    }
}

/// The proxy process's end of the channel, passed as fd 3 with
/// `LISTEN_FDS=1`, `LISTEN_PID` its pid and `LISTEN_FDNAMES=zdt-proxy`;
/// the variables are removed. An error says what is missing: `zdt
/// __proxy` is started by zdt, not by hand.
pub fn take_channel() -> Result<OwnedFd, String> {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let (fds, pid, names) = (var("LISTEN_FDS"), var("LISTEN_PID"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    if fds != "1" || names != CHANNEL_FDNAME || pid != std::process::id().to_string() {
        return Err(format!(
            "no proxy channel (LISTEN_FDS={fds:?} LISTEN_FDNAMES={names:?}): `zdt __proxy` is started by zdt itself"
        ));
    }
    let kind = nix::sys::socket::getsockopt(&unsafe_fd_3(), nix::sys::socket::sockopt::SockType)
        .map_err(|e| format!("fd 3 is not the proxy channel: {e}"))?;
    if kind != SockType::SeqPacket {
        return Err("fd 3 is not the proxy channel (not a SOCK_SEQPACKET socket)".into());
    }
    // SAFETY: fd 3 was passed for this process to take (checked above: the
    // variables name this pid and one fd) and is taken here once.
    Ok(unsafe { OwnedFd::from_raw_fd(3) })
}

/// Fd 3, borrowed, for the check in [`take_channel`].
fn unsafe_fd_3() -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only called after LISTEN_FDS said fd 3 is open in this
    // process; it is not closed while borrowed (take_channel owns it next).
    unsafe { std::os::fd::BorrowedFd::borrow_raw(3) }
}

/// A connected socket pair for a channel, both ends close-on-exec.
fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    Ok((a, b))
}

/// One end of a channel, on the runtime it was made on.
#[derive(Debug)]
struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// Takes `fd` (non-blocking from here on).
    fn new(fd: OwnedFd) -> std::io::Result<Self> {
        crate::fds::set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: an OwnedFd is a valid open fd that stays open, and is the
        // same fd, for as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Self { fd })
    }

    /// Sends one message with `fds` attached.
    async fn send(&self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(std::io::Error::other(format!(
                "message of {} bytes and {} fds is over the channel's bound",
                bytes.len(),
                fds.len()
            )));
        }
        let iov = [IoSlice::new(bytes)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map(drop)
                    .map_err(std::io::Error::from)
            })
            .await
    }

    /// The next message and the fds attached to it; None once the other
    /// end is closed.
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<(usize, Vec<OwnedFd>)>> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
                let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(buf)];
                let msg = recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )?;
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(got) = c {
                        // SAFETY: the kernel just installed these fds in this
                        // process for this message; nothing else owns them.
                        fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                if msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
                {
                    return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
                }
                Ok((msg.bytes, fds))
            })
            .await
            .map(|(n, fds)| (n > 0 || !fds.is_empty()).then_some((n, fds)))
    }
}

#[cfg(test)]
mod tests;
