//! `zdtctl upgrade` and SIGUSR2: zdt replaces its own binary in place.
//!
//! HAProxy's master model: zdt writes its state ([`state::Carried`]:
//! programs, instances, pids, generations, private ports, readiness,
//! restart counters, and its listening, control, log-pipe and notify fds by
//! name) to a memfd, clears close-on-exec on what must survive, and
//! execve()s the new binary from the spawner thread, the thread that forked
//! every worker. The pid stays the same: workers stay zdt's children (their
//! PR_SET_PDEATHSIG does not fire: the forking thread does not exit, it
//! becomes the new image's main thread), PID 1 stays PID 1, and listening
//! sockets never close, so clients queue in their backlogs for the moment
//! no one accepts.
//!
//! ```text
//!  old binary                                   new binary (same pid)
//!  1 precheck: NEW __upgrade-check --state F    reads ZDT_UPGRADE_STATE,
//!    (reads the state, parses the config)       adopts the sockets, the
//!  2 freeze every program actor (refused while  control socket and every
//!    a restart, deploy, canary or pause runs)   process (the reaper is told
//!  3 proxy: stop accepting, every client        their pids before it reaps),
//!    connection closes after its answer         then serves; `zdtctl upgrade`
//!  4 memfd + execve(NEW) on the spawner thread  reads the outcome by token
//!     └ execve failed: thaw, resume, exit 1        └ cannot use the state:
//!                                                    fexecve(OLD fd) with it
//! ```
//!
//! The old binary is kept open as an fd from start ([`remember_start`]), so
//! a fallback works even when the file on disk was replaced or removed.

pub mod handover;
pub mod state;

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use state::{Carried, CarriedProc, CarriedProgram, CarriedProxy, CarriedSlot, StateError};

/// The state memfd's fd number.
pub const STATE_VAR: &str = "ZDT_UPGRADE_STATE";
/// The old binary's fd number, for the fallback.
pub const FALLBACK_VAR: &str = "ZDT_UPGRADE_FALLBACK";
/// Set by a new binary that fell back: why the upgrade failed.
pub const FAILED_VAR: &str = "ZDT_UPGRADE_FAILED";
/// Makes the new binary refuse the carried state (tests of the fallback).
pub const REFUSE_VAR: &str = "ZDT_UPGRADE_REFUSE";

/// The hand-over's own variables: taken by the binary they are meant for.
const HAND_OVER: [&str; 4] = [STATE_VAR, FALLBACK_VAR, FAILED_VAR, REFUSE_VAR];

/// Variables zdt's service manager meant for the first start only.
const FIRST_START: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// Whether `key` is never passed on to the next binary.
fn dropped(key: &std::ffi::OsStr) -> bool {
    HAND_OVER.iter().chain(&FIRST_START).any(|d| key == *d)
}

/// How zdt was started: what the next binary is started with.
struct Start {
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// The path the running binary was started from.
    exe: Option<PathBuf>,
    /// The running binary itself, open (the fallback of the next upgrade).
    binary: Option<std::fs::File>,
}

static START: OnceLock<Start> = OnceLock::new();

/// Records argv, the environment and the running binary. Call first thing
/// in main, while zdt has one thread and before anything edits its
/// environment.
pub fn remember_start() {
    let binary = std::fs::File::open("/proc/self/exe").ok();
    let _ = START.set(Start {
        argv: std::env::args_os().collect(),
        env: std::env::vars_os().filter(|(k, _)| !dropped(k)).collect(),
        exe: std::env::current_exe().ok(),
        binary,
    });
}

/// The path `zdtctl upgrade` execs without `--binary`: the one zdt was
/// started from (a package manager replaces the file there).
pub fn own_path() -> Option<PathBuf> {
    let exe = START.get()?.exe.clone()?;
    // A replaced file shows as "PATH (deleted)" in /proc/self/exe.
    let s = exe.to_string_lossy();
    match s.strip_suffix(" (deleted)") {
        Some(p) => Some(PathBuf::from(p)),
        None => Some(exe),
    }
}

/// The outcome of the last upgrade, as `zdtctl version --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The token of the `zdtctl upgrade` that asked for it.
    pub token: String,
    /// Whether the new binary runs.
    pub ok: bool,
    /// Version before.
    pub from: String,
    /// Version now.
    pub to: String,
    /// From the request to the new binary serving, ms.
    pub ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the daemon finds in its environment at start.
pub enum Found {
    /// A normal start.
    Nothing,
    /// An upgrade's state, to adopt.
    State {
        /// The state.
        carried: Box<Carried>,
        /// The configuration it runs.
        config: Box<crate::config::Config>,
        /// Set when this is the old binary again after a failed upgrade.
        failed: Option<String>,
    },
}

fn fd_var(name: &str) -> Option<RawFd> {
    std::env::var(name).ok()?.parse().ok()
}

/// Reads the hand-over variables (removing them: nothing started later
/// sees them). On a state this binary cannot use, falls back to the old
/// binary with the same state and never returns; if that is impossible
/// too, returns the error (zdt then exits, and its workers with it).
pub fn take_from_env() -> Result<Found, String> {
    let Some(state_fd) = fd_var(STATE_VAR) else {
        return Ok(Found::Nothing);
    };
    let fallback = fd_var(FALLBACK_VAR);
    let failed = std::env::var(FAILED_VAR).ok();
    let refuse = std::env::var_os(REFUSE_VAR).is_some();
    let read = || -> Result<(Carried, crate::config::Config), StateError> {
        if refuse {
            return Err(StateError::Refused);
        }
        let Some(fd) = state::take_fd(state_fd) else {
            return Err(StateError::Read(std::io::Error::from_raw_os_error(
                libc::EBADF,
            )));
        };
        let file = std::fs::File::from(fd);
        let read = Carried::read_running(&file);
        // Kept open for a fallback to read again; marked close-on-exec.
        std::mem::forget(file);
        let (carried, mut config) = read?;
        // `[supervisor]` as the file says now (zdt starts afresh, so its
        // own settings can change here, not by a reload), except the
        // control socket, which is carried; the programs as they run (a
        // changed file is then applied to them by a reload).
        if let Ok(disk) = crate::config::load(&carried.config_file) {
            let control = config.supervisor.control.clone();
            config.supervisor = disk.supervisor;
            config.supervisor.control = control;
        }
        Ok((carried, config))
    };
    match read() {
        Ok((carried, config)) => {
            for v in HAND_OVER {
                std::env::remove_var(v);
            }
            if let Some(fd) = fallback {
                // Not needed any more: close the old binary.
                drop(state::take_fd(fd));
            }
            let _ = nix::unistd::close(state_fd);
            Ok(Found::State {
                carried: Box::new(carried),
                config: Box::new(config),
                failed,
            })
        }
        Err(e) => {
            let why = format!("the new binary cannot take over: {e}");
            if failed.is_some() {
                return Err(format!("{why} (and this is already the fallback)"));
            }
            let Some(fd) = fallback else {
                return Err(why);
            };
            eprintln!("zdt: {why}; going back to the old binary");
            Err(fall_back(fd, state_fd, &why))
        }
    }
}

/// Execs the old binary (`binary`, an fd) with the state at `state_fd` and
/// the reason; returns only if that fails, with the error.
fn fall_back(binary: RawFd, state_fd: RawFd, why: &str) -> String {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let _ = fcntl(state_fd, FcntlArg::F_SETFD(FdFlag::empty()));
    let argv = cstrings(std::env::args_os());
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k != REFUSE_VAR && k != FAILED_VAR && k != FALLBACK_VAR)
        .collect();
    env.push((FAILED_VAR.into(), why.into()));
    let env = cstrings(env.into_iter().map(|(k, v)| {
        let mut kv = k;
        kv.push("=");
        kv.push(v);
        kv
    }));
    // `binary` was carried for exactly this; fexecve only returns on failure.
    match nix::unistd::fexecve(binary, &argv, &env) {
        Err(e) => format!("{why}; the old binary could not be executed again either: {e}"),
        Ok(never) => match never {},
    }
}

fn cstrings(items: impl IntoIterator<Item = OsString>) -> Vec<CString> {
    items
        .into_iter()
        .filter_map(|s| CString::new(s.as_bytes()).ok())
        .collect()
}

/// What the spawner thread runs to exec the new binary.
pub struct Exec {
    /// The new binary.
    pub path: CString,
    /// zdt's argv, as it was started.
    pub argv: Vec<CString>,
    /// zdt's environment as it was started, plus the hand-over variables.
    pub env: Vec<CString>,
    /// Fds to clear close-on-exec on just before the exec (and mark again
    /// if it fails).
    pub keep: Vec<RawFd>,
}

impl Exec {
    /// Execs; returns only on failure, with every fd close-on-exec again.
    pub fn run(self) -> std::io::Error {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        for &fd in &self.keep {
            let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()));
        }
        let err = match nix::unistd::execve(&self.path, &self.argv, &self.env) {
            Err(e) => std::io::Error::from(e),
            Ok(never) => match never {},
        };
        for &fd in &self.keep {
            let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        }
        err
    }
}

/// Writes `carried` to a new memfd.
pub fn write_state(carried: &Carried) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create(
        c"zdt-upgrade-state",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut file = std::fs::File::from(fd);
    let bytes = serde_json::to_vec(carried).map_err(std::io::Error::other)?;
    file.write_all(&bytes)?;
    Ok(file)
}

/// The exec of `binary` with the state in `memfd`.
pub fn exec_for(binary: &Path, memfd: &std::fs::File, keep: Vec<RawFd>) -> Result<Exec, String> {
    let start = START.get().ok_or("zdt did not record how it was started")?;
    let path = CString::new(binary.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", binary.display()))?;
    let mut env: Vec<OsString> = start
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect();
    env.push(format!("{STATE_VAR}={}", memfd.as_raw_fd()).into());
    let mut keep = keep;
    keep.push(memfd.as_raw_fd());
    if let Some(old) = &start.binary {
        env.push(format!("{FALLBACK_VAR}={}", old.as_raw_fd()).into());
        keep.push(old.as_raw_fd());
    }
    Ok(Exec {
        path,
        argv: cstrings(start.argv.iter().cloned()),
        env: cstrings(env),
        keep,
    })
}

/// How long the new binary's check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `binary __upgrade-check --state PATH` (PATH: the state memfd as
/// /proc/PID/fd/N): it must exit 0 and print its version.
pub async fn precheck(
    spawner: &crate::spawn::Spawner,
    binary: &Path,
    memfd: &std::fs::File,
) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let state = format!("/proc/{}/fd/{}", std::process::id(), memfd.as_raw_fd());
    let spec = crate::spawn::SpawnSpec {
        argv: vec![
            binary.to_string_lossy().into_owned(),
            "__upgrade-check".into(),
            "--state".into(),
            state,
        ],
        redirect_stderr: true,
        ..crate::spawn::SpawnSpec::default()
    };
    let child = spawner
        .spawn(spec)
        .await
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let pid = child.pid;
    let mut out = Vec::new();
    let read = async {
        if let Ok(r) = tokio::net::unix::pipe::Receiver::from_owned_fd(child.stdout) {
            let _ = r.take(64 * 1024).read_to_end(&mut out).await;
        }
        child.exit.await
    };
    let status = match tokio::time::timeout(CHECK_TIMEOUT, read).await {
        Ok(s) => s,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(format!(
                "{} __upgrade-check did not finish within {CHECK_TIMEOUT:?}",
                binary.display()
            ));
        }
    };
    let text = String::from_utf8_lossy(&out).trim().to_string();
    match status {
        Ok(crate::spawn::ExitStatus::Code(0)) if text.starts_with("zdt ") => Ok(text),
        Ok(st) => Err(format!(
            "{} is not a zdt that can take over (its check ended with {st}){}",
            binary.display(),
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        )),
        Err(_) => Err(format!("{}: its check was not reaped", binary.display())),
    }
}

/// `zdt __upgrade-check --state PATH`: whether this binary can take over
/// from the state at PATH. Prints its version and exits 0, or says why not
/// and exits 1.
pub fn check(state_path: &Path) -> std::process::ExitCode {
    let result = std::fs::File::open(state_path)
        .map_err(|e| format!("cannot open {}: {e}", state_path.display()))
        .and_then(|f| Carried::read_running(&f).map_err(|e| e.to_string()));
    match result {
        Ok(_) => {
            println!(
                "zdt {} (state format {})",
                env!("CARGO_PKG_VERSION"),
                state::FORMAT
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Whether `pid` is a live (or unreaped) child of this process.
pub fn is_own_child(pid: u32) -> bool {
    crate::orphans::parent_of(pid) == Some(std::process::id())
}

/// Keeps `fd` open (as an owned dup) for the next upgrade.
pub fn keep(fd: &impl std::os::fd::AsFd) -> Option<OwnedFd> {
    fd.as_fd().try_clone_to_owned().ok()
}

/// What a new binary takes over, its fds owned again.
pub struct Resuming {
    /// The listening control socket.
    pub control: Option<OwnedFd>,
    /// The admin listener.
    pub admin: Option<OwnedFd>,
    /// The HAProxy agent port.
    pub agent: Option<OwnedFd>,
    /// Listening sockets zdt bound.
    pub owned: std::collections::BTreeMap<crate::config::ListenAddr, OwnedFd>,
    /// Listening sockets zdt's service manager gave it.
    pub inherited: std::collections::BTreeMap<crate::config::ListenAddr, OwnedFd>,
    /// What the supervisor takes.
    pub supervisor: crate::supervisor::Resumed,
    /// The previous binary's proxy process, serving until this binary's
    /// own proxy takes over.
    pub proxy: Option<crate::proxy::Retiring>,
}

/// Takes every fd and process the state names. Call before the reaper
/// runs: each carried pid is registered with it here, so its exit status
/// goes to its process task. A pid that is no longer a child of this
/// process is adopted as already exited (it was reaped just before the
/// exec), and its instance starts again.
pub fn resume(carried: Carried, failed: Option<String>, reaper: &crate::spawn::Reaper) -> Resuming {
    let mut owned = std::collections::BTreeMap::new();
    let mut inherited = std::collections::BTreeMap::new();
    for s in carried.sockets {
        let Some(fd) = state::take_fd(s.fd) else {
            tracing::error!(addr = ?s.addr, fd = s.fd, "a carried listening socket is not open; it is bound again");
            continue;
        };
        let into = if s.inherited {
            &mut inherited
        } else {
            &mut owned
        };
        into.insert(s.addr.into(), fd);
    }
    let mut programs = carried.programs;
    for p in &mut programs {
        for slot in &mut p.slots {
            let Some(cp) = slot.proc.as_mut() else {
                continue;
            };
            let fds = crate::instance::ProcFds {
                stdout: cp.stdout_fd.and_then(state::take_fd),
                stderr: cp.stderr_fd.and_then(state::take_fd),
                notify: cp.notify_fd.and_then(state::take_fd),
            };
            let exit = if is_own_child(cp.pid) {
                reaper.expect(cp.pid)
            } else {
                tracing::warn!(program = %p.name, pid = cp.pid, "a carried process is gone");
                // The sender dropped: the task sees an exit of unknown status.
                tokio::sync::oneshot::channel().1
            };
            let age = cp.started_ms.map_or(Duration::ZERO, |t| {
                Duration::from_millis(crate::state::now_ms().saturating_sub(t))
            });
            cp.adopted = Some(crate::instance::Adopted {
                pid: cp.pid,
                ready: cp.ready,
                age,
                exit,
                fds,
            });
        }
    }
    let reload = crate::config::load(&carried.config_file)
        .map(|disk| disk.text != carried.config_text || disk.included != carried.config_included)
        .unwrap_or(false);
    let record = UpgradeRecord {
        token: carried.token,
        ok: failed.is_none(),
        from: carried.from_version,
        to: env!("CARGO_PKG_VERSION").to_string(),
        ms: crate::state::now_ms().saturating_sub(carried.begun_ms),
        error: failed,
    };
    let control = state::take_fd(carried.control_fd);
    let admin = carried.admin_fd.and_then(state::take_fd);
    let agent = carried.agent_fd.and_then(state::take_fd);
    let proxy = carried.proxy.and_then(|p| {
        let Some(channel) = state::take_fd(p.channel_fd) else {
            tracing::error!(
                pid = p.pid,
                "the previous proxy process's channel is not open"
            );
            return None;
        };
        let exit = if is_own_child(p.pid) {
            reaper.expect(p.pid)
        } else {
            tokio::sync::oneshot::channel().1
        };
        Some(crate::proxy::Retiring {
            pid: p.pid,
            channel,
            exit,
        })
    });
    Resuming {
        proxy,
        supervisor: crate::supervisor::Resumed {
            programs,
            record: Some(record),
            control_fd: None,
            admin_fd: None,
            agent_fd: None,
            reload,
        },
        control,
        admin,
        agent,
        owned,
        inherited,
    }
}
