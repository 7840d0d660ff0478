//! Spawning workers and collecting their exit statuses.
//!
//! Two traps shape this module (see DESIGN.md, "Traps in the implementation"):
//!
//! - `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits. All
//!   children are therefore forked by one thread, zdt's main thread, which
//!   lives as long as zdt (the tokio runtime runs on others).
//! - zdt reaps with `waitpid(-1)` (it may be PID 1 and inherit orphans), which
//!   would steal exit statuses from any other waiter. All reaping happens in one
//!   place, [`Reaper`], which hands each status to the instance that owns the pid
//!   and reaps the rest.
//!
//! The spawner holds the reaper's table lock while it forks, so a child that
//! exits at once cannot be reaped before its pid is registered, and the failed
//! `exec` that the standard library reaps itself cannot race the reaper.

mod child;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

pub use child::{ExitStatus, SpawnSpec, UserSpec};

/// Why a worker could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// fork or exec failed: the command does not exist, is not executable, ...
    #[error("cannot run {argv0:?}: {source}")]
    Exec {
        /// The program that was to be run.
        argv0: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The working directory cannot be used.
    #[error("working directory {dir}: {source}")]
    Directory {
        /// The configured directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// zdt is shutting down; the spawner thread is gone.
    #[error("the spawner thread has stopped")]
    SpawnerGone,
}

impl SpawnError {
    /// Whether it failed for lack of fds or processes (EMFILE, ENFILE,
    /// EAGAIN), which a later attempt may not meet.
    pub fn is_shortage(&self) -> bool {
        match self {
            Self::Exec { source, .. } | Self::Directory { source, .. } => {
                crate::fds::is_shortage(source)
            }
            Self::SpawnerGone => false,
        }
    }
}

/// A freshly spawned worker.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid, which is also its process group id.
    pub pid: Pid,
    /// Read end of its stdout pipe.
    pub stdout: OwnedFd,
    /// Read end of its stderr pipe (None when stderr goes to stdout).
    pub stderr: Option<OwnedFd>,
    /// Resolves once with the exit status. The [`Reaper`] holds the sender;
    /// it is dropped without a value only if zdt is exiting.
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// Pids whose exit statuses somebody waits for.
type ExitTable = Arc<Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>>;

enum Job {
    Spawn {
        spec: SpawnSpec,
        reply: oneshot::Sender<Result<Spawned, SpawnError>>,
    },
    /// End the loop: zdt is exiting.
    Stop,
    /// Replace zdt's image (an upgrade); the reply comes only on failure.
    Exec {
        exec: crate::upgrade::Exec,
        reply: oneshot::Sender<std::io::Error>,
    },
}

/// Handle to the spawner thread. Cheap to clone.
#[derive(Clone)]
pub struct Spawner {
    /// To the spawner thread, which exits when every handle is dropped.
    jobs: std::sync::mpsc::Sender<Job>,
}

/// Collects exit statuses of all children (and orphans, when zdt is PID 1).
#[derive(Clone)]
pub struct Reaper {
    table: ExitTable,
}

/// The spawner's loop, to run on zdt's main thread ([`Forker::run`]).
pub struct Forker {
    jobs: std::sync::mpsc::Receiver<Job>,
    table: ExitTable,
}

/// The spawner's handle with the reaper that goes with it, and the loop
/// that forks, which the caller runs on the main thread. Call once, early.
///
/// The main thread, because an upgrade execs from the forking thread (see
/// [`crate::upgrade`]): the exec'ing thread becomes the new image's main
/// thread, so only if it was the main thread all along does the new binary
/// fork from the same thread as the old one, and a second upgrade keep
/// the first one's workers (PR_SET_PDEATHSIG fires when their forking
/// thread ends, and exec ends every thread but the caller).
pub fn start() -> (Spawner, Reaper, Forker) {
    let table: ExitTable = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    (
        Spawner { jobs: tx },
        Reaper {
            table: table.clone(),
        },
        Forker { jobs: rx, table },
    )
}

impl Forker {
    /// Forks (and execs, for an upgrade) until every [`Spawner`] handle is
    /// gone, which happens as zdt exits. This thread must outlive every
    /// worker: the kernel sends PR_SET_PDEATHSIG when the forking thread
    /// ends.
    pub fn run(self) {
        while let Ok(job) = self.jobs.recv() {
            match job {
                Job::Spawn { spec, reply } => {
                    let result = spawn_registered(spec, &self.table);
                    // The requester may have given up; the child is then reaped as an orphan.
                    let _ = reply.send(result);
                }
                // From this thread (see above); the reaper's lock is held so
                // that no status is taken from the table meanwhile.
                Job::Exec { exec, reply } => {
                    let guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
                    let err = exec.run();
                    drop(guard);
                    let _ = reply.send(err);
                }
                Job::Stop => return,
            }
        }
    }
}

fn spawn_registered(spec: SpawnSpec, table: &ExitTable) -> Result<Spawned, SpawnError> {
    let prepared = child::prepare(spec)?;
    let (tx, rx) = oneshot::channel();
    // Held across fork: see the module docs.
    let mut guard = table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let out = prepared.spawn()?;
    guard.insert(out.pid.as_raw(), tx);
    drop(guard);
    Ok(Spawned {
        pid: out.pid,
        stdout: out.stdout,
        stderr: out.stderr,
        exit: rx,
    })
}

impl Spawner {
    /// Spawns a worker on the spawner thread.
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<Spawned, SpawnError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Spawn { spec, reply })
            .map_err(|_| SpawnError::SpawnerGone)?;
        rx.await.map_err(|_| SpawnError::SpawnerGone)?
    }

    /// Ends [`Forker::run`]: every program has stopped and zdt exits.
    pub fn stop(&self) {
        let _ = self.jobs.send(Job::Stop);
    }

    /// Replaces zdt's image with `exec` from the spawner thread; returns
    /// only if the exec failed, with why.
    pub async fn exec(&self, exec: crate::upgrade::Exec) -> std::io::Error {
        let (reply, rx) = oneshot::channel();
        if self.jobs.send(Job::Exec { exec, reply }).is_err() {
            return std::io::Error::other("the spawner thread has stopped");
        }
        rx.await
            .unwrap_or_else(|_| std::io::Error::other("the spawner thread has stopped"))
    }
}

impl Reaper {
    /// The exit status of `pid`, a child this process has from before an
    /// upgrade. Call before [`Reaper::run`] starts, so that no status is
    /// reaped unclaimed.
    pub fn expect(&self, pid: u32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(pid as i32, tx);
        rx
    }

    /// Reaps every child that has exited, delivering statuses to their owners.
    /// Returns how many orphans (pids nobody waited for) were reaped.
    pub fn reap(&self) -> usize {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut orphans = 0;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let Some(exit) = ExitStatus::from_wait(status) else {
                        continue;
                    };
                    match table.remove(&pid.as_raw()) {
                        // The owner may be gone already; nothing else to do.
                        Some(tx) => drop(tx.send(exit)),
                        None => {
                            orphans += 1;
                            tracing::debug!(pid = pid.as_raw(), %exit, "reaped orphan");
                        }
                    }
                }
            }
        }
        orphans
    }

    /// Runs forever: reaps on every SIGCHLD. Spawn this once on the runtime.
    pub async fn run(self) {
        use futures_util::StreamExt;
        let mut signals = match signal_hook_tokio::Signals::new([signal_hook::consts::SIGCHLD]) {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(cause = %err, "cannot watch SIGCHLD; exits will not be seen");
                return;
            }
        };
        // Children may have exited before the handler was installed.
        self.reap();
        while signals.next().await.is_some() {
            self.reap();
        }
    }
}
