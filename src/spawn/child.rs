//! Building the `Command` for one worker, and the code that runs between fork
//! and exec.
//!
//! Everything that allocates or may block (user lookups, path resolution, the
//! environment) happens in [`prepare`], before fork. The `pre_exec` hook only
//! makes async-signal-safe system calls: setgroups, setgid, setuid, umask, prctl,
//! getppid. The standard library resets the signal mask and SIGPIPE, puts the
//! child in its own process group and dup2s the pipes; every other fd zdt holds
//! is close-on-exec, so nothing else leaks into the worker.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::SpawnError;

/// Variables of zdt's own environment that must not reach a worker: they
/// describe zdt's sockets, not the worker's.
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// Everything needed to start one worker process.
#[derive(Clone, Debug, Default)]
pub struct SpawnSpec {
    /// argv; `argv[0]` is looked up in PATH like a shell would.
    pub argv: Vec<String>,
    /// Variables added to zdt's environment (later entries win).
    pub env: Vec<(String, String)>,
    /// Working directory; a symlink is resolved now, so the worker keeps the
    /// release it started in.
    pub directory: Option<PathBuf>,
    /// Run as this user (zdt must be root).
    pub user: Option<String>,
    /// Run with this group instead of the user's primary group.
    pub group: Option<String>,
    /// umask for the worker.
    pub umask: Option<u32>,
    /// Send stderr into the stdout pipe.
    pub redirect_stderr: bool,
}

/// A resolved user to switch to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    /// Numeric uid.
    pub uid: libc::uid_t,
    /// Numeric primary gid.
    pub gid: libc::gid_t,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
}

/// How a worker ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

impl ExitStatus {
    /// Converts a terminal wait status; None for stop/continue notices.
    pub fn from_wait(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, code) => Some(Self::Code(code)),
            WaitStatus::Signaled(_, sig, _) => Some(Self::Signal(sig)),
            _ => None,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit {c}"),
            Self::Signal(s) => write!(f, "killed by {}", s.as_str()),
        }
    }
}

pub(super) struct Prepared {
    command: Command,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    argv0: String,
}

pub(super) struct Started {
    pub pid: Pid,
    pub stdout: OwnedFd,
    pub stderr: Option<OwnedFd>,
}

fn resolve_user(user: &str, group: Option<&str>) -> Result<UserSpec, std::io::Error> {
    use nix::unistd::{getgrouplist, Group, User};
    let not_found =
        |what: &str| std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string());
    let u = User::from_name(user)?.ok_or_else(|| not_found(&format!("no user named {user:?}")))?;
    let gid = match group {
        Some(g) => {
            Group::from_name(g)?
                .ok_or_else(|| not_found(&format!("no group named {g:?}")))?
                .gid
        }
        None => u.gid,
    };
    let name =
        CString::new(user).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let groups = getgrouplist(&name, gid)?;
    Ok(UserSpec {
        uid: u.uid.as_raw(),
        gid: gid.as_raw(),
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
    })
}

fn home_of(uid: libc::uid_t) -> Option<PathBuf> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.dir)
}

/// Resolves everything that allocates or blocks, and builds the command.
pub(super) fn prepare(spec: SpawnSpec) -> Result<Prepared, SpawnError> {
    let argv0 = spec.argv.first().cloned().unwrap_or_default();
    let exec_err = |source| SpawnError::Exec {
        argv0: argv0.clone(),
        source,
    };
    let mut command = Command::new(&argv0);
    command.args(spec.argv.iter().skip(1));
    for key in SCRUBBED_ENV {
        command.env_remove(key);
    }
    if let Some(dir) = &spec.directory {
        let resolved = std::fs::canonicalize(dir).map_err(|source| SpawnError::Directory {
            dir: dir.clone(),
            source,
        })?;
        command.env("PWD", &resolved);
        command.current_dir(resolved);
    }
    let user = match &spec.user {
        Some(name) => {
            let u = resolve_user(name, spec.group.as_deref()).map_err(exec_err)?;
            command.env("USER", name).env("LOGNAME", name);
            if let Some(home) = home_of(u.uid) {
                command.env("HOME", home);
            }
            Some(u)
        }
        None => None,
    };
    for (k, v) in &spec.env {
        command.env(k, v);
    }
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| exec_err(std::io::Error::from(e)))?;
    let (stderr, err_w) = if spec.redirect_stderr {
        (None, out_w.try_clone().map_err(exec_err)?)
    } else {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| exec_err(std::io::Error::from(e)))?;
        (Some(r), w)
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .process_group(0);
    let umask = spec.umask;
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // async-signal-safe system calls on data prepared above (no allocation: the
    // groups Vec was built before fork, io::Error::last_os_error does not allocate).
    unsafe {
        command.pre_exec(move || {
            if let Some(u) = &user {
                if libc::setgroups(u.groups.len() as _, u.groups.as_ptr()) != 0
                    || libc::setgid(u.gid) != 0
                    || libc::setuid(u.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(mask) = umask {
                libc::umask(mask as libc::mode_t);
            }
            // After setuid, which clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // zdt died between fork and prctl: nobody would stop this worker.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    Ok(Prepared {
        command,
        stdout: out_r,
        stderr,
        argv0,
    })
}

impl Prepared {
    pub(super) fn spawn(mut self) -> Result<Started, SpawnError> {
        let child = self.command.spawn().map_err(|source| SpawnError::Exec {
            argv0: self.argv0.clone(),
            source,
        })?;
        // Dropping the Command closes our copies of the pipes' write ends, so the
        // read ends see EOF when the worker (and its children) close theirs. The
        // std Child is dropped without waiting: the Reaper owns the exit status.
        drop(self.command);
        Ok(Started {
            pid: Pid::from_raw(child.id() as i32),
            stdout: self.stdout,
            stderr: self.stderr,
        })
    }
}
