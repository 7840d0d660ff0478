//! Building the `Command` for one worker, and the code that runs between fork
//! and exec.
//!
//! Everything that allocates or may block (user lookups, PATH search, argv and
//! the environment as C strings) happens in [`prepare`], before fork. The
//! `pre_exec` hook only makes async-signal-safe system calls: setrlimit,
//! setgroups, setgid, setuid, umask, prctl, getppid, fcntl, dup2, execve. It execs the
//! worker itself, after writing the child's own pid into a `LISTEN_PID=`
//! buffer reserved before fork (the systemd protocol needs the worker's pid,
//! which exists only after fork). The standard library resets the signal mask
//! and SIGPIPE, puts the child in its own process group and dup2s the pipes
//! before the hook runs; every other fd zdt holds is close-on-exec, so only
//! stdio and the listening sockets reach the worker.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
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
    /// Resource limits (`limits`), set before exec; None is unlimited.
    pub limits: Vec<(crate::config::Limit, Option<u64>)>,
    /// Send stderr into the stdout pipe.
    pub redirect_stderr: bool,
    /// Listening sockets passed as fd 3, 4, ... with LISTEN_FDS, LISTEN_PID
    /// (the child's own pid) and LISTEN_FDNAMES.
    pub fds: Vec<std::sync::Arc<OwnedFd>>,
    /// The name of every fd in LISTEN_FDNAMES.
    pub fdname: String,
    /// The file to execute, when not `argv[0]` looked up in PATH (zdt's
    /// own helper processes: `/proc/self/exe`).
    pub exe: Option<PathBuf>,
    /// stdout and stderr go to zdt's own stderr, not to pipes (zdt's own
    /// helper processes, which log as zdt does); the pipes [`super::Spawned`]
    /// returns then read end-of-file at once.
    pub to_zdt_stderr: bool,
}

/// The type `setrlimit` takes for a resource.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
type Resource = libc::__rlimit_resource_t;
/// The type `setrlimit` takes for a resource.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
type Resource = libc::c_int;

fn resource(limit: crate::config::Limit) -> Resource {
    use crate::config::Limit;
    match limit {
        Limit::Nofile => libc::RLIMIT_NOFILE,
        Limit::Core => libc::RLIMIT_CORE,
        Limit::Nproc => libc::RLIMIT_NPROC,
        Limit::Memlock => libc::RLIMIT_MEMLOCK,
        Limit::Stack => libc::RLIMIT_STACK,
        Limit::As => libc::RLIMIT_AS,
        Limit::Fsize => libc::RLIMIT_FSIZE,
        Limit::Cpu => libc::RLIMIT_CPU,
    }
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

/// Finds `argv0` like a shell would: as given if it contains a slash,
/// otherwise the first executable file of that name in `path`.
fn resolve_program(argv0: &str, path: Option<&OsStr>) -> Result<PathBuf, std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    if argv0.contains('/') {
        return Ok(PathBuf::from(argv0));
    }
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path)
        .map(|dir| dir.join(argv0))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
}

/// What the child needs to exec, built before fork so that the child only
/// patches bytes and makes system calls.
struct ExecPlan {
    path: CString,
    /// Keep the strings alive: `argv_ptrs`/`env_ptrs` point into them.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    env: Vec<Vec<u8>>,
    env_ptrs: Vec<*const libc::c_char>,
    /// Index in `env` of the `LISTEN_PID=` entry, patched with the child's pid.
    listen_pid: Option<usize>,
    /// Listening sockets, in order: they become fd 3, 4, ...
    fds: Vec<std::sync::Arc<OwnedFd>>,
    /// Scratch space for the temporary copies of `fds` (no allocation in the child).
    scratch: Vec<libc::c_int>,
}

// SAFETY: the raw pointers point into heap buffers owned by the same plan; the
// plan is moved into the pre_exec closure once and only read (or patched in
// the forked child, which has its own copy of memory).
unsafe impl Send for ExecPlan {}
unsafe impl Sync for ExecPlan {}

/// Width reserved for the pid in `LISTEN_PID=`.
const PID_DIGITS: usize = 10;

impl ExecPlan {
    /// Runs in the child: move the sockets to 3.., patch LISTEN_PID, execve.
    /// Returns only on failure.
    fn exec(&mut self) -> std::io::Error {
        let n = self.fds.len() as libc::c_int;
        for (i, fd) in self.fds.iter().enumerate() {
            // First out of the way of 3..3+n (a source may sit in that range).
            // SAFETY: fcntl on a valid fd.
            let tmp = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3 + n) };
            if tmp < 0 {
                return std::io::Error::last_os_error();
            }
            self.scratch[i] = tmp;
        }
        for i in 0..self.fds.len() {
            // dup2 clears close-on-exec on the target: only these fds survive exec.
            // SAFETY: dup2 on valid fds.
            if unsafe { libc::dup2(self.scratch[i], 3 + i as libc::c_int) } < 0 {
                return std::io::Error::last_os_error();
            }
        }
        if let Some(idx) = self.listen_pid {
            // SAFETY: getpid has no preconditions.
            let mut pid = unsafe { libc::getpid() } as u32;
            let entry = &mut self.env[idx];
            let start = b"LISTEN_PID=".len();
            let mut digits = [0u8; PID_DIGITS];
            let mut len = 0;
            loop {
                digits[len] = b'0' + (pid % 10) as u8;
                len += 1;
                pid /= 10;
                if pid == 0 || len == PID_DIGITS {
                    break;
                }
            }
            for k in 0..len {
                entry[start + k] = digits[len - 1 - k];
            }
            entry[start + len] = 0;
        }
        // SAFETY: path, argv and envp are NUL-terminated strings in arrays
        // ending with a null pointer, all built before fork.
        unsafe {
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.env_ptrs.as_ptr(),
            );
        }
        std::io::Error::last_os_error()
    }
}

fn cstring(s: impl AsRef<[u8]>) -> Result<CString, std::io::Error> {
    CString::new(s.as_ref().to_vec())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// How many bytes a worker's output pipe holds when zdt runs as root (4
/// times the default), so that output gathering there between two of the
/// log pump's reads (`logs::pipe::GATHER`) does not hold up the worker's
/// writes: 25 MB/s of logs before a write waits (6 MB/s with the default).
const OUTPUT_PIPE_BYTES: i32 = 256 * 1024;

/// A pipe for a worker's stdout or stderr (both ends close-on-exec). As root
/// it is made [`OUTPUT_PIPE_BYTES`] large. An unprivileged user's pipes count
/// against `/proc/sys/fs/pipe-user-pages-soft` (64 MiB), past which every
/// new pipe of that user, the workers' own included, gets 8 KiB: there the
/// pipe keeps its default size, so zdt does not bring that closer.
fn output_pipe() -> Result<(OwnedFd, OwnedFd), std::io::Error> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    if nix::unistd::geteuid().is_root() {
        // A refusal leaves the default size, which works, only slower.
        let _ = nix::fcntl::fcntl(
            r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_BYTES),
        );
    }
    Ok((r, w))
}

/// Resolves everything that allocates or blocks, and builds the command.
pub(super) fn prepare(spec: SpawnSpec) -> Result<Prepared, SpawnError> {
    let argv0 = spec.argv.first().cloned().unwrap_or_default();
    let exec_err = |source| SpawnError::Exec {
        argv0: argv0.clone(),
        source,
    };
    // The environment: zdt's own, less its socket variables, plus the program's.
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(k, _)| !SCRUBBED_ENV.iter().any(|s| k == *s))
        .collect();
    let mut command = Command::new(&argv0);
    if let Some(dir) = &spec.directory {
        let resolved = std::fs::canonicalize(dir).map_err(|source| SpawnError::Directory {
            dir: dir.clone(),
            source,
        })?;
        env.insert("PWD".into(), resolved.clone().into());
        command.current_dir(resolved);
    }
    let user = match &spec.user {
        Some(name) => {
            let u = resolve_user(name, spec.group.as_deref()).map_err(exec_err)?;
            env.insert("USER".into(), name.into());
            env.insert("LOGNAME".into(), name.into());
            if let Some(home) = home_of(u.uid) {
                env.insert("HOME".into(), home.into());
            }
            Some(u)
        }
        None => None,
    };
    for (k, v) in &spec.env {
        env.insert(k.into(), v.into());
    }
    if !spec.fds.is_empty() {
        let names = vec![spec.fdname.as_str(); spec.fds.len()].join(":");
        env.insert("LISTEN_FDS".into(), spec.fds.len().to_string().into());
        env.insert("LISTEN_FDNAMES".into(), names.into());
    }
    let path = match &spec.exe {
        Some(exe) => exe.clone(),
        None => resolve_program(&argv0, env.get(OsStr::new("PATH")).map(OsString::as_os_str))
            .map_err(exec_err)?,
    };
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(cstring)
        .collect::<Result<_, _>>()
        .map_err(exec_err)?;
    let mut env_bytes: Vec<Vec<u8>> = env
        .iter()
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e.push(0);
            e
        })
        .filter(|e| !e[..e.len() - 1].contains(&0))
        .collect();
    let listen_pid = (!spec.fds.is_empty()).then(|| {
        let mut e = b"LISTEN_PID=".to_vec();
        e.extend_from_slice(&[b'0'; PID_DIGITS]);
        e.push(0);
        env_bytes.push(e);
        env_bytes.len() - 1
    });
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env_bytes
        .iter()
        .map(|e| e.as_ptr().cast::<libc::c_char>())
        .collect();
    env_ptrs.push(std::ptr::null());
    let mut plan = ExecPlan {
        path: cstring(path.as_os_str().as_bytes()).map_err(exec_err)?,
        _argv: argv,
        argv_ptrs,
        env: env_bytes,
        env_ptrs,
        listen_pid,
        scratch: vec![0; spec.fds.len()],
        fds: spec.fds,
    };

    let (out_r, out_w) = output_pipe().map_err(exec_err)?;
    let (stderr, err_w) = if spec.redirect_stderr {
        (None, out_w.try_clone().map_err(exec_err)?)
    } else {
        let (r, w) = output_pipe().map_err(exec_err)?;
        (Some(r), w)
    };
    let (out_w, err_w) = if spec.to_zdt_stderr {
        drop((out_w, err_w));
        let zdt_stderr = || {
            nix::unistd::dup(2)
                .map(|fd| {
                    // SAFETY: dup just returned this fd; nothing else owns it.
                    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                })
                .map_err(|e| exec_err(std::io::Error::from(e)))
        };
        (zdt_stderr()?, zdt_stderr()?)
    } else {
        (out_w, err_w)
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .process_group(0);
    let umask = spec.umask;
    // zdt raised its own open-files limit; the worker gets the one zdt was
    // started with (see crate::fds), unless the program sets its own.
    let nofile = crate::fds::worker_soft_limit().and_then(|soft| {
        let (_, hard) = crate::fds::limits().ok()?;
        Some(libc::rlimit {
            rlim_cur: soft.min(hard) as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        })
    });
    let limits: Vec<(Resource, libc::rlimit)> = spec
        .limits
        .iter()
        .map(|&(limit, value)| {
            let v = value.map_or(libc::RLIM_INFINITY, |v| v as libc::rlim_t);
            (
                resource(limit),
                libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                },
            )
        })
        .collect();
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // async-signal-safe system calls on data prepared above; nothing allocates
    // (io::Error::last_os_error and from_raw_os_error do not allocate). The
    // standard library has already set up stdio, the process group, the working
    // directory and the signal mask when it runs; the closure then execs itself.
    unsafe {
        command.pre_exec(move || {
            if let Some(rl) = &nofile {
                if libc::setrlimit(libc::RLIMIT_NOFILE, rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Before setuid: raising a hard limit needs root.
            for (r, rl) in &limits {
                if libc::setrlimit(*r, rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
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
            Err(plan.exec())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A quarter mebibyte as root; an unprivileged user's pipes keep the
    /// default (the docs of `output_pipe`).
    #[test]
    fn a_workers_output_pipe_holds_a_quarter_mebibyte_as_root() {
        let (r, _w) = output_pipe().expect("pipe");
        let size = nix::fcntl::fcntl(r.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .expect("F_GETPIPE_SZ");
        let (plain, _w2) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let default = nix::fcntl::fcntl(plain.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .expect("F_GETPIPE_SZ");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(size, OUTPUT_PIPE_BYTES);
        } else {
            assert_eq!(size, default);
        }
    }
}
