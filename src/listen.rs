//! Listening sockets that zdt binds once and owns for its whole life.
//!
//! Sockets are opened close-on-exec (socket2 does so by default), with
//! SO_REUSEADDR, a backlog from somaxconn unless configured, IPV6_V6ONLY for
//! IPv6 addresses, and for unix sockets a file mode. Every generation of a
//! worker receives a dup of the *same* socket, so generations share one accept
//! queue and nothing queued is lost when an old generation exits (PITFALLS 1-2).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{ListenAddr, Mode, ProgramConfig, Protocol};

/// Why an address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    /// The address.
    pub addr: String,
    /// The OS error.
    pub source: std::io::Error,
}

/// The system's accept-queue limit (`net.core.somaxconn`), the default backlog.
pub fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

fn remove_stale_unix_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.file_type().is_socket() => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is accepting on this socket",
            )),
            Err(_) => std::fs::remove_file(path),
        },
    }
}

/// Whether `cfg`'s socket `addr` should hold a new connection in the kernel
/// until its first bytes arrive: only where zdt itself accepts HTTP (proxy
/// mode, `protocol = "http"`, a TCP address), where the client always
/// speaks first. A worker given the socket (pass mode) or a `tcp` proxy
/// may serve a protocol whose server speaks first.
fn defers_accept(cfg: &ProgramConfig, addr: &ListenAddr) -> bool {
    cfg.mode == Mode::Proxy && cfg.protocol == Protocol::Http && matches!(addr, ListenAddr::Tcp(_))
}

/// TCP_DEFER_ACCEPT in seconds when on: a connection that has sent nothing
/// is accepted after one SYN-ACK retransmit, about a second; one that has,
/// at once, with its request already readable: the proxy's first read
/// finds it, and a client that stays silent holds no fd meanwhile.
/// nginx's `listen ... deferred` and HAProxy's `defer-accept` set the same.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Sets TCP_DEFER_ACCEPT on a listening TCP socket zdt bound, or clears it
/// (the socket is kept across reloads that may change its program's mode).
/// A unix socket is left alone.
fn set_defer_accept(fd: &OwnedFd, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if socket2::SockRef::from(fd).local_addr()?.as_unix().is_some() {
        return Ok(());
    }
    let secs: libc::c_int = if on { DEFER_ACCEPT_SECS } else { 0 };
    // SAFETY: `secs` is a valid c_int for the duration of the call, its size
    // is passed, and the fd is open for as long as `fd` is borrowed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds and listens on `addr`.
pub fn bind(
    addr: &ListenAddr,
    backlog: Option<u32>,
    unix_mode: u32,
    unix_owner: Option<&str>,
) -> Result<OwnedFd, ListenError> {
    let err = |source| ListenError {
        addr: addr.to_string(),
        source,
    };
    let backlog = backlog.map_or_else(somaxconn, |b| b.min(i32::MAX as u32) as i32);
    let socket = match addr {
        ListenAddr::Tcp(a) => {
            let s = Socket::new(Domain::for_address(*a), Type::STREAM, None).map_err(err)?;
            s.set_reuse_address(true).map_err(err)?;
            if a.is_ipv6() {
                s.set_only_v6(true).map_err(err)?;
            }
            s.bind(&SockAddr::from(*a)).map_err(err)?;
            s
        }
        ListenAddr::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(err)?;
            }
            remove_stale_unix_socket(path).map_err(err)?;
            let s = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
            s.bind(&SockAddr::unix(path).map_err(err)?).map_err(err)?;
            // Through a descriptor, not the path: the folder may belong to
            // the service user (see crate::rundir).
            let owner = unix_owner.map(lookup_owner).transpose().map_err(err)?;
            crate::rundir::set_socket_file(path, unix_mode, owner).map_err(err)?;
            s
        }
    };
    socket.listen(backlog).map_err(err)?;
    Ok(socket.into())
}

/// Connections waiting in a listening TCP socket's accept queue (None for
/// other sockets). For a socket in LISTEN state Linux reports the queue
/// length as `tcpi_unacked` of TCP_INFO.
pub fn accept_queue_len(fd: &OwnedFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given, and
    // the fd is open for as long as `fd` is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // TCP_LISTEN is 10 in the kernel's state numbering.
    (rc == 0 && info.tcpi_state == 10).then_some(info.tcpi_unacked)
}

/// The connections waiting in the accept queue of the TCP listener on
/// `port` (IPv6 when `v6`), as their remote `address:port` in the kernel's
/// notation: the ESTABLISHED sockets of that local port that no process holds
/// yet (inode 0 in /proc/net/tcp). A connection stays there, even after its
/// client gave up, until it is accepted.
pub fn unaccepted(port: u16, v6: bool) -> Vec<String> {
    let file = if v6 {
        "/proc/net/tcp6"
    } else {
        "/proc/net/tcp"
    };
    let Ok(table) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            // 01 is ESTABLISHED.
            let peer = (*f.get(2)?).to_string();
            (local_port == port && *f.get(3)? == "01" && *f.get(9)? == "0").then_some(peer)
        })
        .collect()
}

/// Every listening socket zdt owns, by address. The supervisor and the
/// program actors hold clones: the supervisor binds what a config or a
/// reload asks for (all of a reload's new addresses before anything
/// changes) and releases what no program names any more; a program whose
/// bind failed binds again on `start`, `restart` and its retry timer. The
/// lock is held only while binding or looking up, never on the data path.
///
/// Sockets passed to zdt by its service manager ([`crate::activation`]) are
/// used instead of binding their addresses and are never closed while zdt
/// runs (`retain` does not touch them): a reload that drops an address and
/// one that brings it back find the same socket.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    owned: Arc<Mutex<BTreeMap<ListenAddr, Arc<OwnedFd>>>>,
    /// Fixed when zdt starts.
    inherited: Arc<BTreeMap<ListenAddr, Arc<OwnedFd>>>,
}

impl Registry {
    /// A registry that uses `inherited` for their addresses.
    pub fn with_inherited(inherited: BTreeMap<ListenAddr, OwnedFd>) -> Self {
        Self {
            owned: Arc::default(),
            inherited: Arc::new(
                inherited
                    .into_iter()
                    .map(|(a, fd)| (a, Arc::new(fd)))
                    .collect(),
            ),
        }
    }

    /// A registry of the sockets an earlier binary of this zdt owned
    /// (`owned`) and was given (`inherited`), see [`crate::upgrade`].
    pub fn resumed(
        owned: BTreeMap<ListenAddr, OwnedFd>,
        inherited: BTreeMap<ListenAddr, OwnedFd>,
    ) -> Self {
        let r = Self::with_inherited(inherited);
        r.lock()
            .extend(owned.into_iter().map(|(a, fd)| (a, Arc::new(fd))));
        r
    }

    /// Every socket, with whether it was inherited, for an upgrade.
    pub fn all(&self) -> Vec<(ListenAddr, Arc<OwnedFd>, bool)> {
        let owned = self.lock();
        owned
            .iter()
            .map(|(a, fd)| (a.clone(), fd.clone(), false))
            .chain(
                self.inherited
                    .iter()
                    .map(|(a, fd)| (a.clone(), fd.clone(), true)),
            )
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ListenAddr, Arc<OwnedFd>>> {
        // A panic while holding the lock cannot leave the map half-changed
        // (every change is one insert or retain), so a poisoned map is fine.
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sockets of `cfg`, binding the ones not owned yet; the first bind
    /// error otherwise.
    pub fn sockets_for(&self, cfg: &ProgramConfig) -> Result<Vec<Arc<OwnedFd>>, ListenError> {
        let mut owned = self.lock();
        let mut out = Vec::with_capacity(cfg.listen.len());
        for addr in &cfg.listen {
            let fd = match owned.get(addr) {
                Some(fd) => fd.clone(),
                // The service manager's socket keeps the options its unit
                // gave it (systemd's DeferAcceptSec=): not set, not cleared.
                None if self.inherited.contains_key(addr) => {
                    out.push(self.inherited[addr].clone());
                    continue;
                }
                None => {
                    let fd = Arc::new(bind(
                        addr,
                        cfg.backlog,
                        cfg.socket_mode,
                        cfg.socket_owner.as_deref(),
                    )?);
                    tracing::info!(program = %cfg.name, %addr, "listening");
                    owned.insert(addr.clone(), fd.clone());
                    fd
                }
            };
            set_defer_accept(&fd, defers_accept(cfg, addr)).map_err(|source| ListenError {
                addr: addr.to_string(),
                source,
            })?;
            out.push(fd);
        }
        Ok(out)
    }

    /// Binds every address of `programs` not owned yet, all or nothing: on
    /// any error the sockets this call bound are closed again and every
    /// error is returned.
    pub fn bind_all<'a>(
        &self,
        programs: impl IntoIterator<Item = &'a ProgramConfig>,
    ) -> Result<(), Vec<ListenError>> {
        let mut owned = self.lock();
        let mut fresh: BTreeMap<ListenAddr, Arc<OwnedFd>> = BTreeMap::new();
        let mut errors = Vec::new();
        for cfg in programs {
            for addr in &cfg.listen {
                if owned.contains_key(addr)
                    || fresh.contains_key(addr)
                    || self.inherited.contains_key(addr)
                {
                    continue;
                }
                match bind(
                    addr,
                    cfg.backlog,
                    cfg.socket_mode,
                    cfg.socket_owner.as_deref(),
                ) {
                    Ok(fd) => {
                        fresh.insert(addr.clone(), Arc::new(fd));
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        owned.extend(fresh);
        Ok(())
    }

    /// Closes the sockets whose address `keep` rejects (programs still
    /// using one hold their own reference until they let go).
    pub fn retain(&self, mut keep: impl FnMut(&ListenAddr) -> bool) {
        self.lock().retain(|addr, _| keep(addr));
    }
}

/// The uid and gid `owner` names (`user` or `user:group`; the group
/// defaults to the user's own).
fn lookup_owner(owner: &str) -> std::io::Result<(nix::unistd::Uid, nix::unistd::Gid)> {
    let (user, group) = owner
        .split_once(':')
        .map_or((owner, None), |(u, g)| (u, Some(g)));
    let missing = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {what} named {owner:?}"),
        )
    };
    let u = nix::unistd::User::from_name(user)?.ok_or_else(|| missing("user"))?;
    let gid = match group {
        Some(g) => {
            nix::unistd::Group::from_name(g)?
                .ok_or_else(|| missing("group"))?
                .gid
        }
        None => u.gid,
    };
    Ok((u.uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_tcp_and_reports_address_in_use() {
        let fd = bind(
            &ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr")),
            None,
            0o660,
            None,
        )
        .expect("bind");
        let sock = Socket::from(fd);
        let local = sock.local_addr().expect("local").as_socket().expect("inet");
        let again = bind(&ListenAddr::Tcp(local), None, 0o660, None).expect_err("in use");
        assert!(
            again
                .to_string()
                .starts_with(&format!("cannot listen on tcp://{local}: ")),
            "{again}"
        );
        // Accepts connections (the kernel queues them while nobody accepts).
        std::net::TcpStream::connect(local).expect("connect");
    }

    #[test]
    fn unix_socket_gets_its_mode_and_replaces_a_stale_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s/app.sock");
        let addr = ListenAddr::Unix(path.clone());
        let fd = bind(&addr, Some(16), 0o600, None).expect("bind");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        // While it is listening, a second bind is refused...
        assert!(bind(&addr, None, 0o600, None).is_err());
        drop(fd);
        // ...and once closed, the leftover file is replaced. A test thread
        // that forks at this moment holds a copy of the listener until its
        // child execs (CLOEXEC acts only then), so "closed" is waited for.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match bind(&addr, None, 0o600, None) {
                Ok(_) => break,
                Err(e)
                    if e.source.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("rebind over a stale socket: {e}"),
            }
        }
    }

    fn defer_accept_secs(fd: &OwnedFd) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut secs: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `secs` and `len` are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&mut secs as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        secs
    }

    #[test]
    fn only_an_http_proxy_defers_accept_and_a_mode_change_clears_it() {
        let program = |port: u16, extra: &str| {
            let text = format!(
                "[program.web]\ncommand = \"x\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n{extra}\n"
            );
            let cfg = crate::config::parse(&text, Path::new("/tmp/zdt-test.toml")).expect("config");
            cfg.programs.into_values().next().expect("one program")
        };
        let others = ["mode = \"pass\"", "mode = \"proxy\"\nprotocol = \"tcp\""];
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let registry = Registry::with_inherited(BTreeMap::new());
        let proxy = program(port, "mode = \"proxy\"");
        let fd = registry.sockets_for(&proxy).expect("bind").remove(0);
        // The kernel keeps the value as retransmits and reports it back in
        // seconds, rounded up: not 0 is what matters.
        assert!(defer_accept_secs(&fd) > 0);
        // The same socket, kept by a reload that makes the program pass
        // its socket to the worker, or forward bytes.
        for other in others {
            registry.sockets_for(&proxy).expect("again");
            let again = registry
                .sockets_for(&program(port, other))
                .expect("kept")
                .remove(0);
            assert!(Arc::ptr_eq(&fd, &again), "{other}: the socket was kept");
            assert_eq!(defer_accept_secs(&fd), 0, "{other}");
        }
        // A socket the service manager passed keeps what its unit set, in
        // either mode: here on, as `DeferAcceptSec=` leaves it.
        let given = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = given.local_addr().expect("address").port();
        let given = OwnedFd::from(given);
        set_defer_accept(&given, true).expect("set by the service manager");
        let addr = ListenAddr::Tcp(([127, 0, 0, 1], port).into());
        let registry = Registry::with_inherited(BTreeMap::from([(addr, given)]));
        for other in others {
            let fd = registry
                .sockets_for(&program(port, other))
                .expect("given")
                .remove(0);
            assert!(defer_accept_secs(&fd) > 0, "{other}");
        }
    }

    #[test]
    fn unix_socket_owner_is_set_when_root() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.sock");
        let _fd = bind(&ListenAddr::Unix(path.clone()), None, 0o660, Some("nobody")).expect("bind");
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("lookup")
            .expect("nobody");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").uid(),
            nobody.uid.as_raw()
        );
    }
}
