//! File descriptors: zdt's open-files limit and who may use how much of it.
//!
//! Running out of fds must cost clients some waiting, never an outage. The
//! rules:
//!
//! 1. **The soft limit is raised to the hard limit at start** ([`raise_limit`],
//!    logged). systemd starts services with 1024 soft and a hard limit in the
//!    hundreds of thousands. Workers get the soft limit zdt was started with
//!    back between fork and exec ([`worker_soft_limit`]), as systemd does for
//!    its own services: a worker using `select()` breaks above 1024.
//! 2. **The last [`reserve`] fds below the soft limit belong to zdt itself**:
//!    control clients, spawning (pipes, notify sockets, the probe for a free
//!    private port, the exec pipe), log files. The proxy never accepts a client
//!    connection into them. fds are allocated lowest first, so a client fd
//!    numbered at or above the [`proxy_ceiling`] means at least that many are
//!    open: the accept loop then stops accepting, and checks every 100 ms to
//!    1 s whether the lowest free fd is below the ceiling again ([`has_room`]).
//!    EMFILE and ENFILE on accept do the same. Meanwhile clients wait in the
//!    listen backlog (nginx's behaviour); the listener is never closed and the
//!    loop never spins. Several proxy threads may each take one connection
//!    past the ceiling before they notice; the reserve is far larger.
//! 3. **`max_connections` caps the open client connections of each proxied
//!    listener** (default [`default_max_connections`]: half of what is below
//!    the ceiling, since each client connection may also hold an upstream
//!    connection). At the cap the accept loop waits until a connection closes;
//!    clients wait in the backlog.
//! 4. **A spawn that fails for lack of fds or processes** (EMFILE, ENFILE,
//!    EAGAIN: [`is_shortage`]) is retried with backoff and never makes an
//!    instance FATAL (see `program::slot`): the worker starts once fds are
//!    free again.
//!
//! Upstream connections and control clients are not checked against the
//! ceiling: they take from the reserve when the proxy is full, and a failed
//! upstream connect is a `502`.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit zdt was started with, for workers; 0 = not raised (leave
/// the workers' limit alone).
static WORKER_SOFT: AtomicU64 = AtomicU64::new(0);

/// zdt's soft and hard RLIMIT_NOFILE now.
pub fn limits() -> std::io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((rl.rlim_cur, rl.rlim_max))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, logging what it did.
/// Returns the soft limit in force afterwards.
pub fn raise_limit() -> u64 {
    let (soft, hard) = match limits() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read the open-files limit (RLIMIT_NOFILE)");
            return 1024;
        }
    };
    if soft >= hard {
        tracing::info!(
            limit = soft,
            "open-files limit (RLIMIT_NOFILE) is {soft}, already the hard limit"
        );
        return soft;
    }
    let rl = libc::rlimit {
        rlim_cur: hard as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(soft, hard, cause = %e, "cannot raise the open-files limit to the hard limit");
        return soft;
    }
    WORKER_SOFT.store(soft, Ordering::Relaxed);
    tracing::info!(
        from = soft,
        to = hard,
        "raised the open-files limit (RLIMIT_NOFILE) from {soft} to the hard limit {hard}; workers keep {soft}"
    );
    hard
}

/// The soft limit a worker should get back, if zdt raised its own.
pub fn worker_soft_limit() -> Option<u64> {
    Some(WORKER_SOFT.load(Ordering::Relaxed)).filter(|&s| s > 0)
}

/// fds below the soft limit `limit` kept for zdt itself: an eighth, at least
/// 32, at most 4096.
pub fn reserve(limit: u64) -> u64 {
    (limit / 8).clamp(32, 4096)
}

/// The soft limit now (1024 if it cannot be read).
fn soft_limit() -> u64 {
    limits().map_or(1024, |(soft, _)| soft)
}

/// fd numbers at or above this are the reserve: the proxy stops accepting
/// when a client fd lands there.
pub fn proxy_ceiling() -> u64 {
    let limit = soft_limit();
    limit.saturating_sub(reserve(limit)).max(1)
}

/// Default `max_connections` of a proxied listener: half of the fds below
/// the ceiling (a client connection may hold an upstream connection too).
pub fn default_max_connections() -> usize {
    usize::try_from(proxy_ceiling() / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Whether the lowest free fd is below `ceiling` (found by duplicating
/// `probe`, an fd zdt holds, and closing the copy at once).
pub fn has_room(probe: RawFd, ceiling: u64) -> bool {
    // SAFETY: fcntl on an fd the caller holds; the copy is closed below.
    let dup = unsafe { libc::fcntl(probe, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return false;
    }
    // SAFETY: `dup` was just opened here and is owned by nobody else.
    unsafe { libc::close(dup) };
    (dup as u64) < ceiling
}

/// Whether an OS error means a lack of fds or processes, which goes away by
/// itself: EMFILE, ENFILE, EAGAIN.
pub fn is_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN)
    )
}

/// How long to wait before spawning again after the `n`-th spawn in a row
/// that failed for lack of fds or processes: 100 ms, doubling, at most 5 s.
pub fn shortage_retry_delay(n: u32) -> std::time::Duration {
    let ms = 100u64 << n.saturating_sub(1).min(6);
    std::time::Duration::from_millis(ms.min(5000))
}

/// Makes `fd`'s open file description non-blocking.
pub fn set_nonblocking(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_an_eighth_within_bounds() {
        assert_eq!(reserve(64), 32);
        assert_eq!(reserve(256), 32);
        assert_eq!(reserve(1024), 128);
        assert_eq!(reserve(524_288), 4096);
    }

    #[test]
    fn spawn_retries_back_off_to_five_seconds() {
        let ms: Vec<u128> = (1..=8)
            .map(|n| shortage_retry_delay(n).as_millis())
            .collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(shortage_retry_delay(0).as_millis(), 100);
    }

    #[test]
    fn shortages_are_told_from_other_errors() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::EAGAIN] {
            assert!(is_shortage(&std::io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ENOENT, libc::EACCES, libc::ENOEXEC] {
            assert!(!is_shortage(&std::io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_shortage(&std::io::Error::other("no errno")));
    }

    #[test]
    fn room_is_found_below_a_high_ceiling_and_not_below_zero() {
        let f = std::fs::File::open("/dev/null").expect("open /dev/null");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        assert!(has_room(fd, u64::MAX));
        assert!(!has_room(fd, 0));
    }
}
