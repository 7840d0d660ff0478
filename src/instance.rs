//! One task per worker process: spawn it, watch it, signal it, report on it.
//!
//! A process task is the Job of watchexec's supervisor, one level down: the
//! program actor ([`crate::program`]) decides *what* should happen (restart,
//! back off, give up); the process task only carries it out for one pid and
//! reports [`ProcEvent`]s. It ends when its process has exited and been reaped.
//!
//! Signals always go to the worker's process group (the worker is its group
//! leader), so children of the worker are stopped with it.

use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::logs::{self, LogSink};
use crate::spawn::{ExitStatus, SpawnSpec, Spawner};

/// Orders for a process task.
#[derive(Debug, Clone, Copy)]
pub enum ProcCmd {
    /// Send this signal to the process group.
    Signal(Signal),
    /// Graceful stop: `signal` to the group now, SIGKILL after `kill_after`.
    Stop {
        /// The stop signal.
        signal: Signal,
        /// Grace before SIGKILL.
        kill_after: Duration,
    },
}

/// What happened to a process.
#[derive(Debug)]
pub enum ProcEventKind {
    /// It runs, with this pid.
    Spawned {
        /// Process id (and process group id).
        pid: u32,
    },
    /// It could not be started at all; no process exists.
    SpawnFailed(String),
    /// It has been up for `startsecs`.
    Up,
    /// It exited (and was reaped). The task ends after this event.
    Exited {
        /// How it ended.
        status: Option<ExitStatus>,
        /// Whether SIGKILL had to be sent after the grace ran out.
        killed: bool,
    },
}

/// An event of the process `gen` in slot `slot`.
#[derive(Debug)]
pub struct ProcEvent {
    /// Instance number.
    pub slot: usize,
    /// Generation of the process.
    pub gen: u64,
    /// What happened.
    pub kind: ProcEventKind,
}

/// Handle to one process task.
///
/// Dropping every handle SIGKILLs the process group: a process nobody can
/// stop any more must not keep running.
#[derive(Debug)]
pub struct ProcHandle {
    /// To the process task; the task holds the receiver until the process exits.
    cmds: mpsc::UnboundedSender<ProcCmd>,
}

impl ProcHandle {
    /// Sends an order; ignored when the process has already exited.
    pub fn send(&self, cmd: ProcCmd) {
        let _ = self.cmds.send(cmd);
    }
}

/// What a process task needs to know.
pub struct ProcParams {
    /// Instance number.
    pub slot: usize,
    /// Generation.
    pub gen: u64,
    /// What to run.
    pub spec: SpawnSpec,
    /// Up this long = started.
    pub startsecs: Duration,
    /// stdout log.
    pub stdout: LogSink,
    /// stderr log.
    pub stderr: LogSink,
    /// Prefix for each output line.
    pub prefix: String,
}

/// Starts the task for one process; events go to `events`.
pub fn launch(
    spawner: Spawner,
    params: ProcParams,
    events: mpsc::UnboundedSender<ProcEvent>,
) -> ProcHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(spawner, params, events, rx));
    ProcHandle { cmds: tx }
}

fn pipe_reader(fd: std::os::fd::OwnedFd) -> Option<tokio::net::unix::pipe::Receiver> {
    match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(r) => Some(r),
        Err(err) => {
            tracing::warn!(cause = %err, "cannot read worker output");
            None
        }
    }
}

fn signal_group(pid: Pid, sig: Signal) {
    if let Err(err) = killpg(pid, sig) {
        if err != nix::errno::Errno::ESRCH {
            tracing::warn!(pid = pid.as_raw(), signal = sig.as_str(), cause = %err, "cannot signal");
        }
    }
}

async fn run(
    spawner: Spawner,
    p: ProcParams,
    events: mpsc::UnboundedSender<ProcEvent>,
    mut cmds: mpsc::UnboundedReceiver<ProcCmd>,
) {
    let send = |kind| {
        // The program actor outlives its process tasks; if it is gone, zdt is exiting.
        let _ = events.send(ProcEvent {
            slot: p.slot,
            gen: p.gen,
            kind,
        });
    };
    let spawned = match spawner.spawn(p.spec).await {
        Ok(s) => s,
        Err(err) => {
            send(ProcEventKind::SpawnFailed(err.to_string()));
            return;
        }
    };
    let pid = spawned.pid;
    send(ProcEventKind::Spawned {
        pid: pid.as_raw() as u32,
    });
    if let Some(r) = pipe_reader(spawned.stdout) {
        tokio::spawn(logs::pump(r, p.stdout.clone(), p.prefix.clone()));
    }
    if let Some(r) = spawned.stderr.and_then(pipe_reader) {
        tokio::spawn(logs::pump(r, p.stderr.clone(), p.prefix.clone()));
    }

    let mut exit = spawned.exit;
    let up = tokio::time::sleep(p.startsecs);
    tokio::pin!(up);
    let mut up_sent = false;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let mut orders_open = true;
    let status = loop {
        let kill_timer = async {
            match kill_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = &mut exit => break status.ok(),
            () = &mut up, if !up_sent => {
                up_sent = true;
                send(ProcEventKind::Up);
            }
            cmd = cmds.recv(), if orders_open => match cmd {
                Some(ProcCmd::Signal(sig)) => signal_group(pid, sig),
                Some(ProcCmd::Stop { signal, kill_after }) => {
                    signal_group(pid, signal);
                    signal_group(pid, Signal::SIGCONT);
                    let at = Instant::now() + kill_after;
                    kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                }
                None => {
                    orders_open = false;
                    signal_group(pid, Signal::SIGKILL);
                }
            },
            () = kill_timer => {
                tracing::warn!(pid = pid.as_raw(), "grace ran out; sending SIGKILL to the process group");
                killed = true;
                kill_at = None;
                signal_group(pid, Signal::SIGKILL);
            }
        }
    };
    send(ProcEventKind::Exited { status, killed });
    // The leader is gone; members of its group that got the stop signal still
    // get the rest of the grace, then SIGKILL (systemd's KillMode=control-group).
    if let Some(at) = kill_at {
        if killpg(pid, None).is_ok() {
            tokio::time::sleep_until(at).await;
            if killpg(pid, None).is_ok() {
                signal_group(pid, Signal::SIGKILL);
            }
        }
    }
}
