//! Socket activation of zdt itself: listening sockets zdt's own service
//! manager (a systemd `.socket` unit) opened and passed to zdt with the
//! systemd protocol (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, fds 3,
//! 4, …). [`take_from_env`] validates them (as listenfd does: each must be a
//! listening `SOCK_STREAM` socket), takes each exactly once and clears the
//! variables; [`assign`] matches them to the programs' `listen` entries.
//! The [`crate::listen::Registry`] then owns a matched socket like one it
//! bound, except that it is never closed while zdt runs: systemd keeps its
//! own copy open even while zdt is stopped, so connections made then wait
//! in the kernel's queue.
//!
//! An inherited socket keeps the options systemd gave it (`Backlog=`,
//! `SocketMode=`, …): a program's `backlog`, `socket_mode` and
//! `socket_owner` apply only to addresses zdt binds itself.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use socket2::Socket;

use crate::config::{Config, ListenAddr};

/// The first fd of the systemd protocol.
const FIRST_FD: RawFd = 3;

/// The variables [`take_from_env`] reads and clears.
pub const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Why the passed sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` is not a number.
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    /// A passed fd is not a listening stream socket.
    #[error("fd {fd} passed in LISTEN_FDS{name} {why}; pass listening stream sockets only (ListenStream= in the socket unit)")]
    NotAListener {
        /// The fd.
        fd: RawFd,
        /// ` (name NAME)` when it has one.
        name: String,
        /// What it is instead.
        why: String,
    },
}

/// One socket zdt was given.
#[derive(Debug)]
pub struct InheritedFd {
    /// The fd number it came as (for messages).
    pub fd: RawFd,
    /// Its `LISTEN_FDNAMES` entry, if any.
    pub name: Option<String>,
    /// Its local address.
    pub addr: Option<ListenAddr>,
    /// The socket, now zdt's.
    pub socket: OwnedFd,
}

impl std::fmt::Display for InheritedFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fd {}", self.fd)?;
        if let Some(n) = &self.name {
            write!(f, " (name {n})")?;
        }
        match &self.addr {
            Some(a) => write!(f, " on {a}"),
            None => f.write_str(" on an unnamed socket"),
        }
    }
}

/// Checks that `fd` is a listening stream socket; returns its local address.
pub(crate) fn validate(fd: RawFd) -> Result<Option<ListenAddr>, String> {
    let stat = nix::sys::stat::fstat(fd).map_err(|e| format!("is not open ({e})"))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err("is not a socket".into());
    }
    // SAFETY: `fd` is open (fstat said so); ManuallyDrop keeps the borrowed
    // socket from closing it, which only the caller may do.
    let sock = std::mem::ManuallyDrop::new(unsafe { Socket::from_raw_fd(fd) });
    let ty = sock.r#type().map_err(|e| format!("has no type ({e})"))?;
    if ty != socket2::Type::STREAM {
        return Err("is not a stream socket".into());
    }
    if !sock
        .is_listener()
        .map_err(|e| format!("cannot be read ({e})"))?
    {
        return Err("is not listening".into());
    }
    let local = sock
        .local_addr()
        .map_err(|e| format!("has no address ({e})"))?;
    Ok(match (local.as_socket(), local.as_pathname()) {
        (Some(a), _) => Some(ListenAddr::Tcp(a)),
        (None, Some(p)) => Some(ListenAddr::Unix(PathBuf::from(p))),
        _ => None,
    })
}

/// Takes the sockets passed with `LISTEN_FDS` when `LISTEN_PID` is zdt's
/// pid, and clears the variables either way (so no worker sees them). Call
/// it while zdt has one thread. Every passed fd is checked first; if one is
/// not a listening stream socket none is taken (they stay open,
/// close-on-exec) and the error names it.
pub fn take_from_env() -> Result<Vec<InheritedFd>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for v in VARIABLES {
        std::env::remove_var(v);
    }
    let for_us = pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    let Some(count) = count.filter(|_| for_us) else {
        return Ok(Vec::new());
    };
    let n: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|&n| (0..=4096).contains(&n))
        .ok_or(ActivationError::BadCount(count.clone()))?;
    let names: Vec<Option<String>> = match names {
        Some(list) => list
            .split(':')
            .map(|s| Some(s.to_string()).filter(|s| !s.is_empty() && s != "unknown"))
            .collect(),
        None => Vec::new(),
    };
    let name_of = |i: usize| names.get(i).cloned().flatten();
    let mut checked = Vec::new();
    for i in 0..n {
        let fd = FIRST_FD + i;
        let name = name_of(i as usize);
        let addr = validate(fd).map_err(|why| ActivationError::NotAListener {
            fd,
            name: name
                .as_ref()
                .map(|n| format!(" (name {n})"))
                .unwrap_or_default(),
            why,
        })?;
        checked.push((fd, name, addr));
    }
    Ok(checked
        .into_iter()
        .map(|(fd, name, addr)| {
            // Close-on-exec: a worker gets only the dup zdt passes it.
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            InheritedFd {
                fd,
                name,
                addr,
                // SAFETY: the fd is open, and this is the one place that
                // takes it (the variables are cleared above).
                socket: unsafe { OwnedFd::from_raw_fd(fd) },
            }
        })
        .collect())
}

/// Matches `fds` to the `listen` entries of `config`: an fd whose name is a
/// program's `fdname` or name goes to that program's entry with its address
/// (or, if none has it, to the program's first entry of the same kind, tcp
/// or unix, that no fd took yet); any other fd goes to the entry whose
/// address is the fd's local address. Returns the matches and the fds that
/// match nothing.
pub fn assign(
    fds: Vec<InheritedFd>,
    config: &Config,
) -> (BTreeMap<ListenAddr, OwnedFd>, Vec<InheritedFd>) {
    let mut taken: BTreeMap<ListenAddr, OwnedFd> = BTreeMap::new();
    let mut unmatched = Vec::new();
    let same_kind = |a: &ListenAddr, b: &Option<ListenAddr>| {
        matches!(
            (a, b),
            (ListenAddr::Tcp(_), Some(ListenAddr::Tcp(_)))
                | (ListenAddr::Unix(_), Some(ListenAddr::Unix(_)))
        )
    };
    for fd in fds {
        let by_name = fd.name.as_ref().and_then(|name| {
            let p = config
                .programs
                .values()
                .find(|p| &p.fdname == name || &p.name == name)?;
            p.listen
                .iter()
                .find(|a| Some(*a) == fd.addr.as_ref() && !taken.contains_key(*a))
                .or_else(|| {
                    p.listen
                        .iter()
                        .find(|a| same_kind(a, &fd.addr) && !taken.contains_key(*a))
                })
                .cloned()
        });
        let by_addr = || {
            let addr = fd.addr.as_ref()?;
            config
                .programs
                .values()
                .flat_map(|p| p.listen.iter())
                .find(|a| *a == addr && !taken.contains_key(*a))
                .cloned()
        };
        match by_name.or_else(by_addr) {
            Some(addr) => {
                tracing::info!(fd = fd.fd, name = ?fd.name, %addr, "using a listening socket passed by the service manager");
                taken.insert(addr, fd.socket);
            }
            None => unmatched.push(fd),
        }
    }
    (taken, unmatched)
}

/// The fd numbers of `fds`, for a log line.
pub fn describe(fds: &[InheritedFd]) -> String {
    fds.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(addr: &str) -> (InheritedFd, ListenAddr) {
        let a: std::net::SocketAddr = addr.parse().expect("addr");
        let fd = crate::listen::bind(&ListenAddr::Tcp(a), None, 0o660, None).expect("bind");
        let local = Socket::from(fd.try_clone().expect("dup"))
            .local_addr()
            .expect("local")
            .as_socket()
            .expect("inet");
        let addr = ListenAddr::Tcp(local);
        (
            InheritedFd {
                fd: 3,
                name: None,
                addr: Some(addr.clone()),
                socket: fd,
            },
            addr,
        )
    }

    #[test]
    fn matches_by_name_then_by_address_and_returns_the_rest() {
        let (mut named, named_addr) = listener("127.0.0.1:0");
        named.name = Some("front".into());
        let (by_addr, by_addr_addr) = listener("127.0.0.1:0");
        let (mut stray, _) = listener("127.0.0.1:0");
        stray.name = Some("nobody".into());
        // "web" names another address than the socket's: its tcp entry
        // takes the socket anyway (systemd's address wins).
        let config = crate::config::parse(
            &format!(
                "[supervisor]\ncontrol = \"zdt.sock\"\n\
                 [program.web]\ncommand = [\"x\"]\nfdname = \"front\"\nlisten = [\"tcp://127.0.0.1:1\"]\n\
                 [program.api]\ncommand = [\"x\"]\nlisten = [\"{by_addr_addr}\"]\n"
            ),
            std::path::Path::new("/tmp/supervisor.toml"),
        )
        .expect("config");
        let (taken, unmatched) = assign(vec![named, by_addr, stray], &config);
        let keys: Vec<String> = taken.keys().map(ToString::to_string).collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(
            keys.contains(&"tcp://127.0.0.1:1".to_string()),
            "{keys:?} ({named_addr})"
        );
        assert!(keys.contains(&by_addr_addr.to_string()), "{keys:?}");
        assert_eq!(unmatched.len(), 1);
        assert_eq!(unmatched[0].name.as_deref(), Some("nobody"));
    }
}
