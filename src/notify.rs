//! sd_notify, both sides: [`NotifySocket`], the receiving socket zdt binds
//! for each worker process (read by [`crate::instance`]), and [`send`], the
//! sending side of `zdt notify` and tests.
//!
//! # Who may notify
//!
//! A notify message moves a restart forward (`READY=1` makes zdt stop the old
//! generation), keeps a hung worker alive (`WATCHDOG=1`,
//! `EXTEND_TIMEOUT_USEC=`) and puts text in `zdtctl status` (`STATUS=`), so it
//! counts only when it comes from the worker itself or a process of its
//! process group (the worker is its group leader; a process of another
//! session cannot join that group). As systemd does, the socket has
//! `SO_PASSCRED`: the kernel attaches every sender's pid and uid, which an
//! unprivileged sender cannot forge, and zdt checks
//! `getpgid(sender pid) == worker pid`. Anything else is dropped, with one
//! warning per worker naming the sender's pid and uid (a flood cannot fill
//! the log); a count of dropped messages is logged when the worker exits.
//! `STATUS=` text has its control characters escaped ([`escape_control`])
//! before it is stored, so `zdtctl status` never prints a terminal escape.
//!
//! # Why abstract socket names
//!
//! The names (`@zdt-notify/ZDTPID/N/RANDOM`) stay in the abstract namespace:
//! they are visible in `/proc/net/unix` and anyone may send to them, but a
//! filesystem socket in a 0700 folder would not help, because a worker that
//! runs as another user (`user = "www-data"`) must be able to send too; the
//! folder would have to be open to that user, so the credential check
//! remains the real defence (systemd's `/run/systemd/notify` is
//! world-writable for the same reason). Abstract names leave no file behind
//! and have no path another user could prepare. The random part keeps
//! another user from binding the name first to make the worker's start
//! fail.
//!
//! # The exit race
//!
//! The sender must still exist when zdt reads its message, or its process
//! group cannot be checked: a `zdt notify READY=1` run from a shell script may
//! have exited and been reaped by then. Like `systemd-notify`, [`send`] waits
//! for a barrier (`BARRIER=1` with the write end of a pipe, which zdt closes
//! once it has handled every message before it); zdt closes every descriptor
//! that comes with a message.

use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr,
    UnixCredentials,
};
use nix::unistd::Pid;

/// How long [`send`] waits for zdt to have handled its message.
const BARRIER_TIMEOUT_MS: i32 = 5000;

/// Sends `message` to the notify socket `path` (a filesystem path, or an
/// abstract name written with a leading `@`), then waits (at most 5 s) until
/// the receiver has handled it, so that the sender still exists when its
/// credentials are checked.
pub fn send(path: &OsStr, message: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.connect_addr(&addr)?;
    } else {
        sock.connect(path)?;
    }
    sock.send(message.as_bytes())?;
    barrier(&sock)
}

/// systemd's `sd_notify_barrier`: sends `BARRIER=1` with the write end of a
/// pipe and waits until every copy of it is closed.
fn barrier(sock: &UnixDatagram) -> std::io::Result<()> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let fds = [write.as_raw_fd()];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(b"BARRIER=1")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    drop(write);
    let mut pfd = libc::pollfd {
        fd: read.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and its fd stays open for the call. A
    // timeout or EINTR is not an error: the message itself was sent.
    unsafe { libc::poll(&mut pfd, 1, BARRIER_TIMEOUT_MS) };
    Ok(())
}

/// Who sent a notify message, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    /// Process id (0 when the sender is in a pid namespace zdt cannot see).
    pub pid: i32,
    /// User id.
    pub uid: u32,
}

impl Sender {
    /// Whether the sender is the worker `pgid` or in its process group.
    pub fn in_group(&self, pgid: Pid) -> bool {
        // getpgid(0) would be zdt's own group: pid 0 never passes.
        self.pid > 0
            && (self.pid == pgid.as_raw()
                || nix::unistd::getpgid(Some(Pid::from_raw(self.pid))) == Ok(pgid))
    }
}

/// One received message: its length in the buffer and its sender.
#[derive(Debug)]
pub struct Datagram {
    /// Bytes written to the buffer.
    pub len: usize,
    /// None when the kernel attached no credentials (cannot happen with
    /// SO_PASSCRED set; such a message is not trusted).
    pub sender: Option<Sender>,
}

/// The receiving socket for one worker process.
#[derive(Debug)]
pub struct NotifySocket {
    sock: tokio::net::UnixDatagram,
}

/// Tries to bind this many random names before giving up.
const BIND_TRIES: u32 = 8;

impl NotifySocket {
    /// Binds a new abstract socket with SO_PASSCRED; returns it with the
    /// `NOTIFY_SOCKET` value for the worker. `seq` tells this zdt's sockets
    /// apart in `/proc/net/unix`.
    pub fn bind(seq: u64) -> std::io::Result<(NotifySocket, String)> {
        use std::os::linux::net::SocketAddrExt;
        let mut tries = 0;
        let (sock, name) = loop {
            let name = format!(
                "zdt-notify/{}/{seq}/{:016x}",
                std::process::id(),
                random_u64()?
            );
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            match UnixDatagram::bind_addr(&addr) {
                Ok(s) => break (s, name),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < BIND_TRIES => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        };
        setsockopt(&sock, sockopt::PassCred, &true)?;
        sock.set_nonblocking(true)?;
        Ok((
            NotifySocket {
                sock: tokio::net::UnixDatagram::from_std(sock)?,
            },
            format!("@{name}"),
        ))
    }

    /// A dup of the socket (close-on-exec), which an upgrade carries.
    pub fn keep(&self) -> Option<std::os::fd::OwnedFd> {
        crate::upgrade::keep(&self.sock)
    }

    /// The socket an earlier binary of this zdt bound (see [`crate::upgrade`]).
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<Self> {
        let sock = UnixDatagram::from(fd);
        sock.set_nonblocking(true)?;
        Ok(NotifySocket {
            sock: tokio::net::UnixDatagram::from_std(sock)?,
        })
    }

    /// Receives one message into `buf` (cut at its length) with its sender's
    /// credentials. Descriptors sent along (a barrier's pipe) are closed.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<Datagram> {
        self.sock
            .async_io(tokio::io::Interest::READABLE, || {
                // Room for the credentials and the most descriptors one
                // message can carry (SCM_MAX_FD), so nothing is cut off.
                let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 253]);
                let mut iov = [IoSliceMut::new(buf)];
                let msg = recvmsg::<()>(
                    self.sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                )?;
                let mut sender = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        match c {
                            ControlMessageOwned::ScmCredentials(cred) => {
                                sender = Some(Sender {
                                    pid: cred.pid(),
                                    uid: cred.uid(),
                                });
                            }
                            ControlMessageOwned::ScmRights(fds) => {
                                for fd in fds {
                                    // SAFETY: the kernel just installed this
                                    // fd for us; nothing else owns it.
                                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Ok(Datagram {
                    len: msg.bytes,
                    sender,
                })
            })
            .await
    }
}

/// 64 random bits from the kernel.
fn random_u64() -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(bytes))
}

/// `text` with every control character (C0, DEL, C1: ESC and CSI among them)
/// written as a Rust escape such as `\u{1b}`, so it prints as plain text.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape_control("\x1b[31mred\x07\u{9b}2J ok é"),
            "\\u{1b}[31mred\\u{7}\\u{9b}2J ok é"
        );
    }

    #[tokio::test]
    async fn a_message_from_another_process_group_is_told_apart() {
        let (sock, name) = NotifySocket::bind(0).expect("bind");
        let name = std::ffi::OsString::from(name);
        let sending = std::thread::spawn(move || send(&name, "READY=1"));
        let mut buf = [0u8; 64];
        let d = sock.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..d.len], b"READY=1");
        let sender = d.sender.expect("credentials");
        assert_eq!(sender.pid as u32, std::process::id());
        // This test process is a member of its own group, not of pid 1's.
        let own = nix::unistd::getpgrp();
        assert!(sender.in_group(own));
        assert!(!sender.in_group(Pid::from_raw(1)) || own == Pid::from_raw(1));
        assert!(!Sender { pid: 0, uid: 0 }.in_group(own));
        // The barrier: closed once received, so the sender returns.
        let d = sock.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..d.len], b"BARRIER=1");
        sending.join().expect("join").expect("send");
    }
}
