//! One instance of a program: its state machine across processes.
//!
//! A slot outlives its processes: it keeps the instance's log sinks, its
//! restart and failure counters, and the last exit. The transitions are the
//! table below (supervisord's, plus generations):
//!
//! | from      | event                         | to                               |
//! |-----------|-------------------------------|----------------------------------|
//! | STOPPED   | start                         | STARTING                         |
//! | STARTING  | up for `startsecs`            | RUNNING                          |
//! | STARTING  | exited                        | BACKOFF, or FATAL after retries  |
//! | STARTING  | cannot exec                   | FATAL                            |
//! | BACKOFF   | backoff elapsed               | STARTING                         |
//! | RUNNING   | exited, autorestart says so   | STARTING                         |
//! | RUNNING   | exited, otherwise             | EXITED                           |
//! | any       | stop (process alive)          | STOPPING, then STOPPED           |
//! | any       | stop (no process)             | STOPPED                          |

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, Notify};

use crate::config::{AutoRestart, LogConfig, ProgramConfig};
use crate::instance::{self, ProcCmd, ProcEvent, ProcHandle, ProcParams};
use crate::logs::LogSink;
use crate::spawn::{ExitStatus, SpawnSpec, Spawner};
use crate::state::{now_ms, ExitInfo, InstanceSnapshot, InstanceState};

use super::backoff_delay;

/// What the actor must do after a process exited.
pub(super) enum AfterExit {
    /// Nothing.
    Nothing,
    /// Spawn again now.
    Restart,
    /// Spawn again after this delay (the slot is in BACKOFF).
    Backoff(Duration),
}

struct Proc {
    handle: ProcHandle,
    gen: u64,
    pid: Option<u32>,
    started_ms: Option<u64>,
    stopping: bool,
}

pub(super) struct Slot {
    index: usize,
    state: InstanceState,
    since_ms: u64,
    /// The generation of the newest process this slot started (or will start).
    gen: u64,
    proc: Option<Proc>,
    /// Start again as soon as the stopping process is gone.
    pending_start: bool,
    failures: u32,
    restarts: u32,
    started_once: bool,
    last_exit: Option<ExitInfo>,
    error: Option<String>,
    backoff_epoch: u64,
    stdout_cfg: LogConfig,
    stderr_cfg: LogConfig,
    stdout: LogSink,
    stderr: LogSink,
}

fn sink_for(cfg: &LogConfig, program: &str, index: usize, on_drop: &Arc<Notify>) -> LogSink {
    let file = cfg.file.as_ref().map(|t| {
        t.replace("{program}", program)
            .replace("{instance}", &index.to_string())
            .into()
    });
    LogSink::watched(file, cfg.max_bytes, cfg.backups, Some(on_drop.clone()))
}

fn lines_tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Slot {
    pub fn new(cfg: &ProgramConfig, index: usize, on_drop: &Arc<Notify>) -> Self {
        Self {
            index,
            state: InstanceState::Stopped,
            since_ms: now_ms(),
            gen: 0,
            proc: None,
            pending_start: false,
            failures: 0,
            restarts: 0,
            started_once: false,
            last_exit: None,
            error: None,
            backoff_epoch: 0,
            stdout: sink_for(&cfg.stdout_log, &cfg.name, index, on_drop),
            stderr: sink_for(&cfg.stderr_log, &cfg.name, index, on_drop),
            stdout_cfg: cfg.stdout_log.clone(),
            stderr_cfg: cfg.stderr_log.clone(),
        }
    }

    /// New settings: new log files if their settings changed.
    pub fn reconfigure(&mut self, cfg: &ProgramConfig, on_drop: &Arc<Notify>) {
        if cfg.stdout_log != self.stdout_cfg {
            self.stdout = sink_for(&cfg.stdout_log, &cfg.name, self.index, on_drop);
            self.stdout_cfg = cfg.stdout_log.clone();
        }
        if cfg.stderr_log != self.stderr_cfg {
            self.stderr = sink_for(&cfg.stderr_log, &cfg.name, self.index, on_drop);
            self.stderr_cfg = cfg.stderr_log.clone();
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn state(&self) -> InstanceState {
        self.state
    }

    pub fn reason(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn backoff_epoch(&self) -> u64 {
        self.backoff_epoch
    }

    /// No process is alive.
    pub fn is_idle(&self) -> bool {
        self.proc.is_none()
    }

    /// Whether the slot is meant to have a running process.
    pub fn wants_running(&self) -> bool {
        self.pending_start
            || matches!(
                self.state,
                InstanceState::Starting | InstanceState::Running | InstanceState::Backoff
            )
    }

    /// Whether an event of generation `gen` is about this slot's process.
    pub fn owns(&self, gen: u64) -> bool {
        self.proc.as_ref().is_some_and(|p| p.gen == gen)
    }

    pub fn sink(&self, stderr: bool) -> LogSink {
        if stderr {
            self.stderr.clone()
        } else {
            self.stdout.clone()
        }
    }

    /// The last `n` lines of stderr and of stdout, for failure reports.
    pub fn log_tail(&self, n: usize) -> String {
        let err = lines_tail(&self.stderr.tail(16 * 1024), n);
        let out = lines_tail(&self.stdout.tail(16 * 1024), n);
        match (err.is_empty(), out.is_empty()) {
            (true, true) => String::new(),
            (false, true) => format!("stderr:\n{err}"),
            (true, false) => format!("stdout:\n{out}"),
            (false, false) => format!("stderr:\n{err}\nstdout:\n{out}"),
        }
    }

    fn set_state(&mut self, program: &str, to: InstanceState) {
        if self.state != to {
            tracing::info!(
                program,
                instance = self.index,
                gen = self.gen,
                from = self.state.as_str(),
                to = to.as_str(),
                "state"
            );
            self.state = to;
            self.since_ms = now_ms();
        }
    }

    /// Starts a process of generation `gen` (an explicit start: counters reset).
    pub fn start(
        &mut self,
        cfg: &ProgramConfig,
        gen: u64,
        spawner: &Spawner,
        events: &mpsc::UnboundedSender<ProcEvent>,
    ) {
        self.gen = gen;
        self.failures = 0;
        self.error = None;
        self.backoff_epoch += 1;
        if self.proc.is_some() {
            // Still stopping: start as soon as it is gone.
            self.pending_start = true;
            return;
        }
        self.spawn(cfg, spawner, events);
    }

    /// Starts again after a crash or a backoff, in the same generation.
    pub fn respawn(
        &mut self,
        cfg: &ProgramConfig,
        spawner: &Spawner,
        events: &mpsc::UnboundedSender<ProcEvent>,
    ) {
        self.spawn(cfg, spawner, events);
    }

    fn spawn(
        &mut self,
        cfg: &ProgramConfig,
        spawner: &Spawner,
        events: &mpsc::UnboundedSender<ProcEvent>,
    ) {
        if self.started_once {
            self.restarts += 1;
        }
        self.started_once = true;
        self.pending_start = false;
        let mut env: Vec<(String, String)> = cfg
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("ZDT_PROGRAM".into(), cfg.name.clone()));
        env.push(("ZDT_INSTANCE".into(), self.index.to_string()));
        env.push(("ZDT_GENERATION".into(), self.gen.to_string()));
        let spec = SpawnSpec {
            argv: cfg.command.clone(),
            env,
            directory: cfg.directory.clone(),
            user: cfg.user.clone(),
            group: cfg.group.clone(),
            umask: cfg.umask,
            redirect_stderr: cfg.redirect_stderr,
        };
        let handle = instance::launch(
            spawner.clone(),
            ProcParams {
                slot: self.index,
                gen: self.gen,
                spec,
                startsecs: cfg.startsecs,
                stdout: self.stdout.clone(),
                stderr: self.stderr.clone(),
                prefix: String::new(),
            },
            events.clone(),
        );
        self.proc = Some(Proc {
            handle,
            gen: self.gen,
            pid: None,
            started_ms: None,
            stopping: false,
        });
        self.set_state(&cfg.name, InstanceState::Starting);
    }

    /// Stops the process (stop_signal, SIGKILL after kill_timeout), or just
    /// forgets a pending start or backoff.
    pub fn stop(&mut self, cfg: &ProgramConfig) {
        self.pending_start = false;
        self.backoff_epoch += 1;
        match &mut self.proc {
            Some(p) => {
                if !p.stopping {
                    p.stopping = true;
                    p.handle.send(ProcCmd::Stop {
                        signal: cfg.stop_signal,
                        kill_after: cfg.kill_timeout,
                    });
                }
                self.set_state(&cfg.name, InstanceState::Stopping);
            }
            None => self.set_state(&cfg.name, InstanceState::Stopped),
        }
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(p) = &self.proc {
            p.handle.send(ProcCmd::Signal(sig));
        }
    }

    pub fn on_spawned(&mut self, pid: u32) {
        if let Some(p) = &mut self.proc {
            p.pid = Some(pid);
            p.started_ms = Some(now_ms());
        }
    }

    pub fn on_spawn_failed(&mut self, err: String) {
        self.proc = None;
        self.error = Some(err);
        self.state = InstanceState::Fatal;
        self.since_ms = now_ms();
    }

    pub fn on_up(&mut self, program: &str) {
        let stopping = self.proc.as_ref().is_none_or(|p| p.stopping);
        if self.state == InstanceState::Starting && !stopping {
            self.failures = 0;
            self.error = None;
            self.set_state(program, InstanceState::Running);
        }
    }

    pub fn on_exited(
        &mut self,
        cfg: &ProgramConfig,
        status: Option<ExitStatus>,
        killed: bool,
    ) -> AfterExit {
        let Some(proc) = self.proc.take() else {
            return AfterExit::Nothing;
        };
        let (code, signal) = match status {
            Some(ExitStatus::Code(c)) => (Some(c), None),
            Some(ExitStatus::Signal(s)) => (None, Some(s.as_str().to_string())),
            None => (None, None),
        };
        let expected = proc.stopping || code.is_some_and(|c| cfg.exitcodes.contains(&c));
        let info = ExitInfo {
            code,
            signal,
            expected,
            at_ms: now_ms(),
        };
        tracing::info!(program = %cfg.name, instance = self.index, gen = proc.gen, exit = %info, killed, "process exited");
        self.last_exit = Some(info.clone());
        if proc.stopping {
            self.set_state(&cfg.name, InstanceState::Stopped);
            if killed {
                self.error = Some(format!(
                    "did not stop within kill_timeout ({:?}); SIGKILL sent",
                    cfg.kill_timeout
                ));
            }
            return if self.pending_start {
                AfterExit::Restart
            } else {
                AfterExit::Nothing
            };
        }
        match self.state {
            InstanceState::Starting => {
                self.failures += 1;
                if self.failures > cfg.startretries {
                    self.error = Some(format!(
                        "exited too quickly ({info}) {} times in a row; giving up",
                        self.failures
                    ));
                    self.set_state(&cfg.name, InstanceState::Fatal);
                    AfterExit::Nothing
                } else {
                    let delay = backoff_delay(self.failures);
                    self.error = Some(format!(
                        "exited too quickly ({info}); retry {} of {} in {:?}",
                        self.failures, cfg.startretries, delay
                    ));
                    self.backoff_epoch += 1;
                    self.set_state(&cfg.name, InstanceState::Backoff);
                    AfterExit::Backoff(delay)
                }
            }
            InstanceState::Running => {
                let again = match cfg.autorestart {
                    AutoRestart::Always => true,
                    AutoRestart::Unexpected => !expected,
                    AutoRestart::Never => false,
                };
                if again {
                    AfterExit::Restart
                } else {
                    self.set_state(&cfg.name, InstanceState::Exited);
                    AfterExit::Nothing
                }
            }
            _ => {
                self.set_state(&cfg.name, InstanceState::Stopped);
                AfterExit::Nothing
            }
        }
    }

    pub fn snapshot(&self, program: &str) -> InstanceSnapshot {
        InstanceSnapshot {
            program: program.to_string(),
            instance: self.index as u32,
            generation: self.gen,
            state: self.state,
            pid: self.proc.as_ref().and_then(|p| p.pid),
            since_ms: self.since_ms,
            started_ms: self.proc.as_ref().and_then(|p| p.started_ms),
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
            error: self.error.clone(),
            status_text: None,
            log_dropped_bytes: self.stdout.dropped_bytes() + self.stderr.dropped_bytes(),
        }
    }
}
