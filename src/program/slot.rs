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
//! | RUNNING   | exited within `startsecs` of ready, restart due | BACKOFF, or FATAL after retries |
//! | STARTING  | cannot exec                   | FATAL                            |
//! | STARTING  | out of fds/processes at spawn | BACKOFF, retried (never FATAL)   |
//! | BACKOFF   | backoff elapsed               | STARTING                         |
//! | RUNNING   | exited, autorestart says so   | STARTING                         |
//! | RUNNING   | exited, otherwise             | EXITED                           |
//! | any       | stop (process alive)          | STOPPING, then STOPPED           |
//! | any       | stop (no process)             | STOPPED                          |
//!
//! A start counts as failed until the process has been up `startsecs` after
//! it became ready (with `ready = startsecs`, ready means up `startsecs`): a
//! worker that passes its readiness check and crashes soon after backs off
//! like one that never got ready. A process that held that long and then
//! exits resets the count of failed starts.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::{AutoRestart, LogConfig, Mode, ProgramConfig, Ready, UpstreamKind};
use crate::instance::{self, ProcCmd, ProcEvent, ProcEventKind, ProcFds, ProcHandle, ProcParams};
use crate::logs::LogSink;
use crate::proxy::{Counters, PrivateAddr, ProcessId, Route};
use crate::spawn::{ExitStatus, SpawnSpec, Spawner};
use crate::state::{now_ms, ExitInfo, InstanceSnapshot, InstanceState};

use super::backoff_delay;

/// Which process of a slot an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// The current process.
    Current,
    /// The candidate of a zero-downtime restart.
    Next,
    /// An old generation that is stopping.
    Draining,
}

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
    /// Which process it is, for the proxy's routes and counters.
    id: ProcessId,
    /// Proxy mode: its private address and the program's counters, for its
    /// whole life (its requests are counted while it lives).
    private: Option<(PrivateAddr, Counters)>,
    /// Proxy mode: whether requests may be routed to it (when RUNNING).
    /// Cleared when it starts to drain: the proxy then lets go of its
    /// upstream, whose idle connections close once no request holds them.
    routable: bool,
    /// Proxy mode with `upstream = "unix"`: the socket file, removed with the process.
    socket_path: Option<std::path::PathBuf>,
    gen: u64,
    pid: Option<u32>,
    started_ms: Option<u64>,
    stopping: bool,
    ready: bool,
    /// When it became ready (the event arrived), for the `startsecs` rule.
    ready_at: Option<Instant>,
    /// Why its start failed, when zdt decided it (not ready in time); its
    /// exit then counts as a failed start for this reason.
    failure: Option<String>,
    /// The deploy release it runs in (its id), when the program has a deploy root.
    release: Option<String>,
    /// Its pipes and notify socket, for an upgrade to carry.
    keep: ProcFds,
    /// Proxy mode: requests still in flight when its drain reached
    /// `max_wait` (set by the drain task before it stops the process).
    cut: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The serial of the next process zdt starts or adopts ([`ProcessId`]).
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What a slot needs to spawn a process.
pub(super) struct SpawnCtx<'a> {
    pub cfg: &'a ProgramConfig,
    pub spawner: &'a Spawner,
    pub events: &'a mpsc::UnboundedSender<ProcEvent>,
    pub sockets: &'a [Arc<OwnedFd>],
    /// Private ports of live processes (proxy mode), never handed out twice.
    pub ports_in_use: &'a [u16],
    /// The program's request counters (proxy mode), which drains wait on.
    pub counters: &'a Counters,
    /// The release each recent generation runs in (programs with a deploy
    /// root): a process respawned after a crash keeps its generation's.
    pub pins: &'a ReleasePins,
}

/// Generation → deploy release, newest generations only.
pub(super) type ReleasePins = std::cell::RefCell<Vec<(u64, crate::deploy::Release)>>;

/// How many generations' releases are remembered.
const PINNED_GENERATIONS: usize = 8;

/// The release of generation `gen`: the one it started in, or what
/// `root/current` names now for a generation's first process.
fn release_of(ctx: &SpawnCtx<'_>, gen: u64) -> Option<crate::deploy::Release> {
    let root = &ctx.cfg.deploy.as_ref()?.root;
    let mut pins = ctx.pins.borrow_mut();
    if let Some((_, r)) = pins.iter().find(|(g, _)| *g == gen) {
        return Some(r.clone());
    }
    let r = crate::deploy::Release::resolve(root)?;
    pins.push((gen, r.clone()));
    pins.sort_by_key(|(g, _)| std::cmp::Reverse(*g));
    pins.truncate(PINNED_GENERATIONS);
    Some(r)
}

/// Stops a process: in proxy mode once its requests in flight are done (or
/// `max_wait` passed), at once otherwise; SIGKILL after `kill_timeout`.
fn drain_then_stop(p: &mut Proc, cfg: &ProgramConfig) {
    let (signal, kill_after) = (cfg.stop_signal, cfg.kill_timeout);
    p.routable = false;
    let Some((_, counters)) = &p.private else {
        p.handle.send(ProcCmd::Stop { signal, kill_after });
        return;
    };
    let (drain, handle, max_wait) = (counters.drain(p.id), p.handle.clone(), cfg.max_wait);
    let cut = p.cut.clone();
    tokio::spawn(async move {
        if tokio::time::timeout(max_wait, drain.idle()).await.is_err() {
            let inflight = drain.cut().await;
            cut.store(inflight, std::sync::atomic::Ordering::SeqCst);
            tracing::warn!(
                inflight,
                "max_wait passed with requests in flight; stopping anyway (they will be cut)"
            );
        }
        handle.send(ProcCmd::Stop { signal, kill_after });
    });
}

/// Whether a process that became ready at `ready_at` and exited at `exited`
/// made a successful start: ready, then up `startsecs` more (with `ready =
/// startsecs` being ready already means up `startsecs`).
fn start_held(
    ready: &Ready,
    startsecs: Duration,
    ready_at: Option<Instant>,
    exited: Instant,
) -> bool {
    match ready_at {
        None => false,
        Some(_) if *ready == Ready::Startsecs => true,
        Some(at) => exited.saturating_duration_since(at) >= startsecs,
    }
}

/// Whether a process zdt was stopping ended by the very stop signal zdt sent
/// (and not by the SIGKILL after the grace): a clean stop, not a kill.
fn is_clean_stop(cfg: &ProgramConfig, status: Option<ExitStatus>, killed: bool) -> bool {
    !killed && status == Some(ExitStatus::Signal(cfg.stop_signal))
}

/// A readiness failure, with a hint when a proxy worker could not be reached
/// on the private address zdt gave it.
fn with_hint(cfg: &ProgramConfig, why: String, unreachable: bool) -> String {
    if !unreachable || cfg.mode != Mode::Proxy {
        return why;
    }
    let how = match cfg.upstream {
        UpstreamKind::Tcp => "{port} in command or environment, or $PORT",
        UpstreamKind::Unix => "{socket} in command or environment, or $SOCKET",
    };
    format!(
        "{why} (in proxy mode the worker must listen on the private address zdt gives it: {how})"
    )
}

/// A free loopback port not held by another generation.
fn private_port(in_use: &[u16]) -> Option<u16> {
    (0..20).find_map(|_| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        (!in_use.contains(&port)).then_some(port)
    })
}

pub(super) struct Slot {
    index: usize,
    state: InstanceState,
    since_ms: u64,
    /// The generation of the newest process this slot started (or will start).
    gen: u64,
    proc: Option<Proc>,
    /// The candidate of a zero-downtime restart: a newer generation starting
    /// beside `proc`, on the same sockets.
    next: Option<Proc>,
    /// Why the candidate failed (exited, not ready in time, cannot spawn).
    next_failed: Option<String>,
    /// Older generations told to stop, not yet exited.
    draining: Vec<Proc>,
    /// Start again as soon as the stopping process is gone.
    pending_start: bool,
    failures: u32,
    /// Spawns in a row that failed for lack of fds or processes.
    shortages: u32,
    /// Why the first of the current run of failed starts failed.
    first_failure: Option<String>,
    restarts: u32,
    started_once: bool,
    last_exit: Option<ExitInfo>,
    error: Option<String>,
    status_text: Option<String>,
    /// How the last drain of an old generation went wrong, if it did.
    drain_warning: Option<String>,
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
    let syslog = cfg
        .syslog
        .clone()
        .map(|socket| crate::logs::Syslog::new(socket, program));
    LogSink::with_syslog(
        file,
        syslog,
        cfg.max_bytes,
        cfg.backups,
        Some(on_drop.clone()),
    )
}

fn lines_tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Slot {
    pub fn new(cfg: &ProgramConfig, index: usize, on_drop: &Arc<Notify>) -> Self {
        Self::with_logs(
            index,
            (
                sink_for(&cfg.stdout_log, &cfg.name, index, on_drop),
                cfg.stdout_log.clone(),
            ),
            (
                sink_for(&cfg.stderr_log, &cfg.name, index, on_drop),
                cfg.stderr_log.clone(),
            ),
        )
    }

    /// A slot with no process yet, writing to these log sinks.
    fn with_logs(index: usize, stdout: (LogSink, LogConfig), stderr: (LogSink, LogConfig)) -> Self {
        Self {
            index,
            state: InstanceState::Stopped,
            since_ms: now_ms(),
            gen: 0,
            proc: None,
            next: None,
            next_failed: None,
            draining: Vec::new(),
            pending_start: false,
            failures: 0,
            shortages: 0,
            first_failure: None,
            restarts: 0,
            started_once: false,
            last_exit: None,
            error: None,
            status_text: None,
            drain_warning: None,
            backoff_epoch: 0,
            stdout: stdout.0,
            stderr: stderr.0,
            stdout_cfg: stdout.1,
            stderr_cfg: stderr.1,
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

    /// The pid of its current process, if it has one.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(|p| p.pid)
    }

    pub fn reason(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn backoff_epoch(&self) -> u64 {
        self.backoff_epoch
    }

    /// No process is alive.
    pub fn is_idle(&self) -> bool {
        self.proc.is_none() && self.next.is_none() && self.draining.is_empty()
    }

    /// Proxy mode: the route to the current process if it is RUNNING.
    pub fn route(&self) -> Option<Route> {
        if self.state != InstanceState::Running {
            return None;
        }
        let p = self.proc.as_ref().filter(|p| p.routable)?;
        p.private.as_ref().map(|(addr, _)| Route {
            process: p.id,
            addr: addr.clone(),
        })
    }

    /// Private ports held by this slot's live processes.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.proc
            .iter()
            .chain(&self.next)
            .chain(&self.draining)
            .filter_map(|p| p.private.as_ref().and_then(|(addr, _)| addr.port()))
    }

    /// Generation of the current process (0 if none).
    pub fn current_gen(&self) -> u64 {
        self.proc.as_ref().map_or(0, |p| p.gen)
    }

    /// Old generations still stopping.
    pub fn is_draining(&self) -> bool {
        !self.draining.is_empty()
    }

    /// Which of this slot's processes an event of generation `gen` is about.
    pub fn role(&self, gen: u64) -> Option<Role> {
        if self.proc.as_ref().is_some_and(|p| p.gen == gen) {
            Some(Role::Current)
        } else if self.next.as_ref().is_some_and(|p| p.gen == gen) {
            Some(Role::Next)
        } else if self.draining.iter().any(|p| p.gen == gen) {
            Some(Role::Draining)
        } else {
            None
        }
    }

    /// Whether the slot may switch to its candidate: the candidate is ready,
    /// or there is none and the current process runs.
    pub fn ready_to_switch(&self) -> bool {
        match &self.next {
            Some(n) => n.ready,
            None => self.state == InstanceState::Running,
        }
    }

    /// Why the candidate failed, once.
    pub fn take_next_failure(&mut self) -> Option<String> {
        self.next_failed.take()
    }

    /// Zero-downtime restart, step 1: start generation `gen` beside the
    /// current process (or as the current one if none runs).
    pub fn begin_replace(&mut self, ctx: &SpawnCtx<'_>, gen: u64) {
        self.next_failed = None;
        if self.proc.is_none() || self.pending_start {
            self.start(ctx, gen);
            return;
        }
        if self.next.is_some() {
            return;
        }
        self.gen = gen;
        let next = self.launch(ctx, gen);
        tracing::info!(program = %ctx.cfg.name, instance = self.index, gen, "starting the new generation beside the running one");
        self.next = Some(next);
    }

    /// Step 2: the candidate becomes current; the old process is told to stop
    /// and is SIGKILLed if still alive after `max_wait`.
    pub fn switch(&mut self, cfg: &ProgramConfig) {
        let Some(next) = self.next.take() else {
            return;
        };
        if let Some(mut old) = self.proc.replace(next) {
            old.stopping = true;
            self.drain_warning = None;
            match &old.private {
                // Proxy: no new requests reach it (the routes changed with this
                // switch): drain by its in-flight count, then stop it.
                Some(_) => drain_then_stop(&mut old, cfg),
                // Pass: the app drains itself after the stop signal.
                None => old.handle.send(ProcCmd::Stop {
                    signal: cfg.stop_signal,
                    kill_after: cfg.max_wait,
                }),
            }
            tracing::info!(program = %cfg.name, instance = self.index, gen = old.gen, "draining the old generation");
            self.draining.push(old);
        }
        // (launch() counted the restart when it started the candidate.)
        self.failures = 0;
        self.first_failure = None;
        self.error = None;
        self.set_state(&cfg.name, InstanceState::Running);
    }

    /// A canary: the ready candidate leaves this slot and becomes the
    /// current process of a slot of its own (same instance number, same log
    /// files), which serves beside this one with the whole state machine
    /// (a crash restarts it in its own generation). This slot goes back to
    /// its current process's generation.
    pub fn split_canary(&mut self, cfg: &ProgramConfig) -> Option<Slot> {
        let next = self.next.take().filter(|n| n.ready)?;
        if let Some(p) = &self.proc {
            self.gen = p.gen;
        }
        // launch() counted the candidate's start as this slot's restart;
        // it is the canary slot's (which keeps the count), not this one's.
        let restarts = self.restarts;
        self.restarts = self.restarts.saturating_sub(1);
        tracing::info!(program = %cfg.name, instance = self.index, gen = next.gen, "canary serving beside the running generation");
        Some(Slot {
            state: InstanceState::Running,
            gen: next.gen,
            proc: Some(next),
            restarts,
            started_once: true,
            ..Slot::with_logs(
                self.index,
                (self.stdout.clone(), self.stdout_cfg.clone()),
                (self.stderr.clone(), self.stderr_cfg.clone()),
            )
        })
    }

    /// The end of a canary: `other`'s processes (the generation that loses
    /// the traffic) drain here, as an old generation does after a switch:
    /// out of the routes now, stopped once their requests are done.
    pub fn absorb(&mut self, mut other: Slot, cfg: &ProgramConfig) {
        other.backoff_epoch += 1;
        for mut p in other.proc.take().into_iter().chain(other.next.take()) {
            if !p.stopping {
                p.stopping = true;
                drain_then_stop(&mut p, cfg);
            }
            tracing::info!(program = %cfg.name, instance = self.index, gen = p.gen, "draining the generation that lost the canary");
            self.draining.push(p);
        }
        self.draining.append(&mut other.draining);
    }

    /// A failed restart: stop the candidate, keep the current process. The
    /// candidate gets the graceful stop, not SIGKILL: on a shared socket it may
    /// already have accepted connections, which it should answer.
    pub fn abort_replace(&mut self, cfg: &ProgramConfig) {
        if let Some(mut next) = self.next.take() {
            next.stopping = true;
            next.handle.send(ProcCmd::Stop {
                signal: cfg.stop_signal,
                kill_after: cfg.kill_timeout,
            });
            self.draining.push(next);
        }
        if let Some(p) = &self.proc {
            self.gen = p.gen;
        }
    }

    /// An event about the candidate.
    pub fn on_next_event(&mut self, cfg: &ProgramConfig, kind: ProcEventKind) {
        let Some(next) = self.next.as_mut() else {
            return;
        };
        let gen = next.gen;
        match kind {
            ProcEventKind::Spawned { pid, keep } => {
                next.pid = Some(pid);
                next.started_ms = Some(now_ms());
                next.keep = keep;
            }
            ProcEventKind::Up => {
                next.ready = true;
                next.ready_at = Some(Instant::now());
            }
            ProcEventKind::Status(text) => self.status_text = Some(text),
            ProcEventKind::SpawnFailed(err) | ProcEventKind::SpawnShortage(err) => {
                self.next = None;
                self.next_failed = Some(format!("gen {gen} cannot start: {err}"));
            }
            ProcEventKind::NotReady { why, unreachable } => {
                self.next_failed = Some(format!(
                    "gen {gen} was {}",
                    with_hint(cfg, why, unreachable)
                ));
                self.abort_replace(cfg);
            }
            ProcEventKind::Exited { status, .. } => {
                self.next = None;
                let how = status.map_or("unknown".to_string(), |s| s.to_string());
                self.next_failed = Some(format!("gen {gen} exited ({how}) before it was ready"));
            }
        }
    }

    /// An event about an old generation that is stopping.
    pub fn on_draining_event(&mut self, cfg: &ProgramConfig, gen: u64, kind: ProcEventKind) {
        let Some(pos) = self.draining.iter().position(|p| p.gen == gen) else {
            return;
        };
        match kind {
            ProcEventKind::Spawned { pid, .. } => self.draining[pos].pid = Some(pid),
            ProcEventKind::Exited { status, killed } => {
                let old = self.draining.remove(pos);
                let how = match status {
                    _ if is_clean_stop(cfg, status, killed) => {
                        format!("stopped by {}", cfg.stop_signal.as_str())
                    }
                    Some(s) => s.to_string(),
                    None => "unknown".to_string(),
                };
                // Requests in flight when its drain ran out of time are cut
                // by its stop, whether their failure was counted yet or not.
                let cut = old.cut.load(std::sync::atomic::Ordering::SeqCst);
                if killed || cut > 0 {
                    crate::metrics::global().drain_cut_short(&cfg.name, killed, cut);
                    let text = match &old.private {
                        // Pass: SIGKILL came at max_wait.
                        None => format!(
                            "gen {} did not exit within max_wait ({:?}) and was SIGKILLed: connections it still held were cut",
                            old.gen, cfg.max_wait
                        ),
                        Some(_) => format!(
                            "gen {} did not finish its requests within max_wait ({:?}): {cut} request(s) in flight were cut{}",
                            old.gen,
                            cfg.max_wait,
                            if killed {
                                format!("; SIGKILLed after kill_timeout ({:?})", cfg.kill_timeout)
                            } else {
                                String::new()
                            }
                        ),
                    };
                    tracing::warn!(program = %cfg.name, instance = self.index, gen = old.gen, exit = %how, "{text}");
                    self.drain_warning = Some(text);
                } else {
                    tracing::info!(program = %cfg.name, instance = self.index, gen = old.gen, exit = %how, "old generation exited");
                }
            }
            _ => {}
        }
    }

    /// How the last drain of an old generation went wrong, if it did.
    pub fn drain_warning(&self) -> Option<&str> {
        self.drain_warning.as_deref()
    }

    /// Whether the slot is meant to have a running process.
    pub fn wants_running(&self) -> bool {
        self.pending_start
            || matches!(
                self.state,
                InstanceState::Starting | InstanceState::Running | InstanceState::Backoff
            )
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
    pub fn start(&mut self, ctx: &SpawnCtx<'_>, gen: u64) {
        self.gen = gen;
        self.failures = 0;
        self.first_failure = None;
        self.error = None;
        self.backoff_epoch += 1;
        if self.proc.is_some() {
            // Still stopping: start as soon as it is gone.
            self.pending_start = true;
            return;
        }
        self.spawn(ctx);
    }

    /// Starts again after a crash or a backoff, in the same generation.
    pub fn respawn(&mut self, ctx: &SpawnCtx<'_>) {
        self.spawn(ctx);
    }

    fn spawn(&mut self, ctx: &SpawnCtx<'_>) {
        let proc = self.launch(ctx, self.gen);
        self.proc = Some(proc);
        self.set_state(&ctx.cfg.name, InstanceState::Starting);
    }

    /// What the process task of a process of generation `gen` needs.
    fn params(
        &self,
        cfg: &ProgramConfig,
        gen: u64,
        spec: SpawnSpec,
        private: Option<PrivateAddr>,
    ) -> ProcParams {
        ProcParams {
            slot: self.index,
            gen,
            program: cfg.name.clone(),
            spec,
            ready: cfg.ready.clone(),
            startsecs: cfg.startsecs,
            ready_timeout: cfg.ready_timeout,
            watchdog: cfg.watchdog,
            private,
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            prefix: if cfg.log_prefix {
                format!("[gen {gen}:{}] ", self.index)
            } else {
                String::new()
            },
            timestamps: cfg.log_timestamps,
        }
    }

    /// Starts a process of generation `gen` for this slot and returns it.
    fn launch(&mut self, ctx: &SpawnCtx<'_>, gen: u64) -> Proc {
        let cfg = ctx.cfg;
        let proxied = cfg.mode == Mode::Proxy;
        let private = match (proxied, cfg.upstream) {
            (false, _) => None,
            (true, UpstreamKind::Tcp) => private_port(ctx.ports_in_use)
                .map(|p| PrivateAddr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], p)))),
            (true, UpstreamKind::Unix) => {
                let path = cfg
                    .socket_dir
                    .join(format!("{}.{}.{gen}.sock", cfg.name, self.index));
                // A leftover of an earlier zdt would make the worker's bind fail.
                let _ = std::fs::remove_file(&path);
                Some(PrivateAddr::Unix(path))
            }
        };
        // The release this process runs in, resolved once: a draining
        // generation keeps reading its own files after `current` switched.
        let release = release_of(ctx, gen);
        // The folder of zdt's own binary: the demo worker beside it, built
        // by the same `cargo build`, whichever the profile.
        let zdt_dir = crate::upgrade::own_path()
            .and_then(|p| p.parent().map(|d| d.to_string_lossy().into_owned()))
            .unwrap_or_else(|| ".".into());
        let fill = |s: &String| {
            let s = s.replace("{zdt_dir}", &zdt_dir);
            let s = match &private {
                Some(PrivateAddr::Tcp(a)) => s.replace("{port}", &a.port().to_string()),
                Some(PrivateAddr::Unix(p)) => s.replace("{socket}", &p.to_string_lossy()),
                None => s,
            };
            match &release {
                Some(r) => s.replace("{release}", &r.path.to_string_lossy()),
                None => s,
            }
        };
        let directory = match (&cfg.directory, &release) {
            (Some(dir), Some(r)) => Some(r.pin(dir, fill(&dir.to_string_lossy().into_owned()))),
            (dir, _) => dir.clone(),
        };
        if self.started_once {
            self.restarts += 1;
        }
        self.started_once = true;
        self.pending_start = false;
        self.status_text = None;
        let mut env: Vec<(String, String)> = cfg
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), fill(v)))
            .collect();
        match &private {
            Some(PrivateAddr::Tcp(a)) => env.push(("PORT".into(), a.port().to_string())),
            Some(PrivateAddr::Unix(p)) => {
                env.push(("SOCKET".into(), p.to_string_lossy().into_owned()));
            }
            None => {}
        }
        env.push(("ZDT_PROGRAM".into(), cfg.name.clone()));
        env.push(("ZDT_INSTANCE".into(), self.index.to_string()));
        env.push(("ZDT_GENERATION".into(), gen.to_string()));
        if let Some(r) = &release {
            env.push(("ZDT_RELEASE".into(), r.id.clone()));
            env.push((
                "ZDT_RELEASE_DIR".into(),
                r.path.to_string_lossy().into_owned(),
            ));
        }
        let spec = SpawnSpec {
            argv: cfg.command.iter().map(fill).collect(),
            env,
            directory,
            user: cfg.user.clone(),
            group: cfg.group.clone(),
            umask: cfg.umask,
            limits: cfg.limits.clone(),
            redirect_stderr: cfg.redirect_stderr,
            // In proxy mode the worker binds its private port; the owned
            // sockets stay with zdt.
            fds: if proxied {
                Vec::new()
            } else {
                ctx.sockets.to_vec()
            },
            fdname: cfg.fdname.clone(),
            ..SpawnSpec::default()
        };
        let handle = if proxied && private.is_none() {
            // The probe for a free port could not be bound: out of fds, most likely.
            instance::shortage(
                self.index,
                gen,
                "no free loopback port could be found for the private address".into(),
                ctx.events,
            )
        } else {
            instance::launch(
                ctx.spawner.clone(),
                self.params(cfg, gen, spec, private.clone()),
                ctx.events.clone(),
            )
        };
        let socket_path = match &private {
            Some(PrivateAddr::Unix(p)) => Some(p.clone()),
            _ => None,
        };
        Proc {
            id: self.process_id(gen),
            routable: private.is_some(),
            private: private.map(|a| (a, ctx.counters.clone())),
            socket_path,
            handle,
            gen,
            pid: None,
            started_ms: None,
            stopping: false,
            ready: false,
            ready_at: None,
            failure: None,
            release: release.map(|r| r.id),
            keep: ProcFds::default(),
            cut: Arc::default(),
        }
    }

    /// Stops the process (stop_signal, SIGKILL after kill_timeout), or just
    /// forgets a pending start or backoff.
    pub fn stop(&mut self, cfg: &ProgramConfig) {
        self.pending_start = false;
        self.backoff_epoch += 1;
        if let Some(mut next) = self.next.take() {
            next.stopping = true;
            next.handle.send(ProcCmd::Stop {
                signal: cfg.stop_signal,
                kill_after: cfg.kill_timeout,
            });
            self.draining.push(next);
        }
        match &mut self.proc {
            Some(p) => {
                if !p.stopping {
                    p.stopping = true;
                    // Proxy: it leaves the routes as it leaves RUNNING; its
                    // requests finish (up to max_wait) before the stop signal.
                    drain_then_stop(p, cfg);
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

    pub fn on_spawned(&mut self, pid: u32, keep: ProcFds) {
        self.shortages = 0;
        if let Some(p) = &mut self.proc {
            p.pid = Some(pid);
            p.started_ms = Some(now_ms());
            p.keep = keep;
        }
    }

    /// The slot as an upgrade carries it, or why it cannot be carried now
    /// (a process is starting, switching or stopping).
    pub fn carry(&self) -> Result<crate::upgrade::CarriedSlot, String> {
        use std::os::fd::AsRawFd;
        let busy = |what: &str| Err(format!("instance {} is {what}", self.index));
        if self.next.is_some() {
            return busy("starting a new generation");
        }
        if !self.draining.is_empty() {
            return busy("draining an old generation");
        }
        if self.pending_start {
            return busy("about to start");
        }
        let carried_state = matches!(
            self.state,
            InstanceState::Running
                | InstanceState::Starting
                | InstanceState::Stopped
                | InstanceState::Exited
                | InstanceState::Fatal
                | InstanceState::Backoff
        );
        if !carried_state {
            return busy(self.state.as_str());
        }
        let live = matches!(self.state, InstanceState::Running | InstanceState::Starting);
        let proc = match &self.proc {
            None => None,
            Some(p) if live && !p.stopping && p.failure.is_none() => {
                let Some(pid) = p.pid else {
                    return busy("starting");
                };
                let raw = |fd: &Option<OwnedFd>| fd.as_ref().map(AsRawFd::as_raw_fd);
                Some(crate::upgrade::CarriedProc {
                    pid,
                    ready: self.state == InstanceState::Running,
                    gen: p.gen,
                    private_port: p.private.as_ref().and_then(|(addr, _)| addr.port()),
                    socket_path: p.socket_path.clone(),
                    started_ms: p.started_ms,
                    stdout_fd: raw(&p.keep.stdout),
                    stderr_fd: raw(&p.keep.stderr),
                    notify_fd: raw(&p.keep.notify),
                    release: p.release.clone(),
                    adopted: None,
                })
            }
            Some(_) => return busy("stopping"),
        };
        Ok(crate::upgrade::CarriedSlot {
            index: self.index,
            state: self.state,
            since_ms: self.since_ms,
            last_exit: self.last_exit.clone(),
            gen: self.gen,
            restarts: self.restarts,
            failures: self.failures,
            started_once: self.started_once,
            error: self.error.clone(),
            status: self.status_text.clone(),
            proc,
        })
    }

    /// Takes over what an earlier binary of this zdt ran in this slot (see
    /// [`crate::upgrade`]). Returns the backoff still due when it was
    /// backing off.
    pub fn adopt(
        &mut self,
        ctx: &SpawnCtx<'_>,
        carried: crate::upgrade::CarriedSlot,
    ) -> Option<Duration> {
        let cfg = ctx.cfg;
        self.gen = carried.gen;
        self.restarts = carried.restarts;
        self.failures = carried.failures;
        self.started_once = carried.started_once;
        self.error = carried.error;
        self.status_text = carried.status;
        let Some(mut cp) = carried.proc else {
            self.set_state(&cfg.name, carried.state);
            return (carried.state == InstanceState::Backoff).then(|| backoff_delay(self.failures));
        };
        let Some(adopted) = cp.adopted.take() else {
            // The daemon adopts every carried process before the actors
            // start; one without is gone: start it again.
            self.set_state(&cfg.name, InstanceState::Backoff);
            return Some(Duration::ZERO);
        };
        let private = match (cp.private_port, &cp.socket_path) {
            (Some(port), _) => Some(PrivateAddr::Tcp(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                port,
            )))),
            (None, Some(path)) => Some(PrivateAddr::Unix(path.clone())),
            (None, None) => None,
        };
        // Dups for the next upgrade; the originals go to the process task.
        let keep = ProcFds {
            stdout: adopted.fds.stdout.as_ref().and_then(crate::upgrade::keep),
            stderr: adopted.fds.stderr.as_ref().and_then(crate::upgrade::keep),
            notify: adopted.fds.notify.as_ref().and_then(crate::upgrade::keep),
        };
        let handle = instance::adopt(
            ctx.spawner.clone(),
            self.params(cfg, cp.gen, SpawnSpec::default(), private.clone()),
            adopted,
            ctx.events.clone(),
        );
        self.proc = Some(Proc {
            id: self.process_id(cp.gen),
            routable: private.is_some(),
            private: private.map(|a| (a, ctx.counters.clone())),
            socket_path: cp.socket_path,
            handle,
            gen: cp.gen,
            pid: Some(cp.pid),
            started_ms: cp.started_ms,
            stopping: false,
            ready: cp.ready,
            // Held long ago, as far as the `startsecs` rule is concerned.
            ready_at: Instant::now()
                .checked_sub(cfg.startsecs)
                .filter(|_| cp.ready),
            failure: None,
            release: cp.release,
            keep,
            cut: Arc::default(),
        });
        self.set_state(
            &cfg.name,
            if cp.ready {
                InstanceState::Running
            } else {
                InstanceState::Starting
            },
        );
        self.since_ms = carried.since_ms;
        None
    }

    /// The current process was not ready in time: kill it; its exit counts
    /// as a failed start, for this reason.
    pub fn on_not_ready(&mut self, cfg: &ProgramConfig, why: String, unreachable: bool) {
        if let Some(p) = &mut self.proc {
            let why = with_hint(cfg, why, unreachable);
            tracing::warn!(program = %cfg.name, instance = self.index, cause = %why, "failed start; stopping the worker");
            p.failure = Some(why);
            p.handle.send(ProcCmd::Stop {
                signal: cfg.stop_signal,
                kill_after: cfg.kill_timeout,
            });
        }
    }

    /// The worker's STATUS= text.
    pub fn on_status(&mut self, text: String) {
        self.status_text = Some(text);
    }

    /// Marks the slot FATAL without a process (its sockets cannot be bound).
    pub fn fail(&mut self, program: &str, err: String) {
        self.error = Some(err);
        self.set_state(program, InstanceState::Fatal);
    }

    pub fn on_spawn_failed(&mut self, err: String) {
        self.proc = None;
        self.error = Some(err);
        self.state = InstanceState::Fatal;
        self.since_ms = now_ms();
    }

    /// The current process could not be spawned for lack of fds or
    /// processes: BACKOFF, and the caller retries after the returned delay
    /// (None: it was being stopped anyway). Never FATAL: the shortage ends
    /// when connections or processes do.
    pub fn on_spawn_shortage(&mut self, program: &str, err: &str) -> Option<Duration> {
        let stopping = self.proc.take().is_some_and(|p| p.stopping);
        if stopping && !self.pending_start {
            self.set_state(program, InstanceState::Stopped);
            return None;
        }
        self.shortages = self.shortages.saturating_add(1);
        let delay = crate::fds::shortage_retry_delay(self.shortages);
        self.error = Some(format!(
            "cannot start for lack of file descriptors or processes ({err}); retry {} in {delay:?}",
            self.shortages
        ));
        self.backoff_epoch += 1;
        self.set_state(program, InstanceState::Backoff);
        Some(delay)
    }

    /// The current process is ready. The count of failed starts stays until
    /// it has held for `startsecs` (see [`start_held`]).
    pub fn on_up(&mut self, program: &str) {
        let Some(p) = self.proc.as_mut() else {
            return;
        };
        if self.state == InstanceState::Starting && !p.stopping {
            p.ready_at = Some(Instant::now());
            self.error = None;
            self.set_state(program, InstanceState::Running);
        }
    }

    /// Counts a failed start for `cause`: BACKOFF, or FATAL after
    /// `startretries` (keeping the first cause of the run).
    fn failed_start(&mut self, cfg: &ProgramConfig, cause: String) -> AfterExit {
        self.failures += 1;
        let first = self.first_failure.get_or_insert_with(|| cause.clone());
        if self.failures > cfg.startretries {
            let mut why = format!(
                "{first}; {} failed starts in a row, giving up",
                self.failures
            );
            if *first != cause {
                why.push_str(&format!(" (last: {cause})"));
            }
            tracing::error!(program = %cfg.name, instance = self.index, cause = %why, "FATAL");
            self.error = Some(why);
            self.set_state(&cfg.name, InstanceState::Fatal);
            AfterExit::Nothing
        } else {
            let delay = backoff_delay(self.failures).max(cfg.restart_delay);
            tracing::warn!(program = %cfg.name, instance = self.index, %cause, failures = self.failures, ?delay, "failed start; backing off");
            self.error = Some(format!(
                "{cause}; retry {} of {} in {:?}",
                self.failures, cfg.startretries, delay
            ));
            self.backoff_epoch += 1;
            self.set_state(&cfg.name, InstanceState::Backoff);
            AfterExit::Backoff(delay)
        }
    }

    pub fn on_exited(
        &mut self,
        cfg: &ProgramConfig,
        status: Option<ExitStatus>,
        killed: bool,
    ) -> AfterExit {
        let Some(mut proc) = self.proc.take() else {
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
            clean_stop: proc.stopping && is_clean_stop(cfg, status, killed),
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
                let cause = proc
                    .failure
                    .take()
                    .unwrap_or_else(|| format!("exited too quickly ({info})"));
                self.failed_start(cfg, cause)
            }
            InstanceState::Running => {
                let again = match cfg.autorestart {
                    AutoRestart::Always => true,
                    AutoRestart::Unexpected => !expected,
                    AutoRestart::Never => false,
                };
                let now = Instant::now();
                if again && !start_held(&cfg.ready, cfg.startsecs, proc.ready_at, now) {
                    let after = proc
                        .ready_at
                        .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                    self.failed_start(
                        cfg,
                        format!(
                            "exited {} ms after it was ready ({info}), less than startsecs ({:?})",
                            after.as_millis(),
                            cfg.startsecs
                        ),
                    )
                } else if again && !cfg.restart_delay.is_zero() {
                    // It held: a crash of a started process, restarted
                    // after restart_delay (BACKOFF meanwhile, no failure).
                    self.failures = 0;
                    self.first_failure = None;
                    let delay = cfg.restart_delay;
                    tracing::info!(program = %cfg.name, instance = self.index, ?delay, "restarting after restart_delay");
                    self.error = Some(format!(
                        "exited ({info}); restarting in {delay:?} (restart_delay)"
                    ));
                    self.backoff_epoch += 1;
                    self.set_state(&cfg.name, InstanceState::Backoff);
                    AfterExit::Backoff(delay)
                } else if again {
                    // It held: a crash of a started process, restarted at once.
                    self.failures = 0;
                    self.first_failure = None;
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

    /// Each of its processes with a private address (proxy mode): their
    /// requests are counted.
    pub fn counted(&self) -> impl Iterator<Item = ProcessId> + '_ {
        self.proc
            .iter()
            .chain(self.next.iter())
            .chain(self.draining.iter())
            .filter(|p| p.private.is_some())
            .map(|p| p.id)
    }

    /// A new process's id: this instance, generation `gen`, the next serial.
    fn process_id(&self, gen: u64) -> ProcessId {
        ProcessId {
            instance: self.index as u32,
            generation: gen,
            serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The slot's row, then one row per candidate or draining process.
    pub fn snapshots(&self, program: &str) -> Vec<InstanceSnapshot> {
        let mut rows = vec![self.snapshot(program)];
        let extra = self
            .next
            .iter()
            .map(|p| {
                (
                    p,
                    if p.ready {
                        InstanceState::Running
                    } else {
                        InstanceState::Starting
                    },
                )
            })
            .chain(self.draining.iter().map(|p| (p, InstanceState::Draining)));
        for (p, state) in extra {
            rows.push(InstanceSnapshot {
                program: program.to_string(),
                instance: self.index as u32,
                generation: p.gen,
                state,
                pid: p.pid,
                since_ms: p.started_ms.unwrap_or(self.since_ms),
                started_ms: p.started_ms,
                restarts: self.restarts,
                last_exit: None,
                error: None,
                status_text: None,
                log_dropped_bytes: 0,
                requests: None,
                drain_warning: None,
                release: p.release.clone(),
            });
        }
        rows
    }

    pub fn snapshot(&self, program: &str) -> InstanceSnapshot {
        InstanceSnapshot {
            program: program.to_string(),
            instance: self.index as u32,
            // The running process's own generation: while a new one starts
            // beside it (its own row), this row is still the old one.
            generation: self.proc.as_ref().map_or(self.gen, |p| p.gen),
            state: self.state,
            pid: self.pid(),
            since_ms: self.since_ms,
            started_ms: self.proc.as_ref().and_then(|p| p.started_ms),
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
            error: self.error.clone(),
            status_text: self.status_text.clone(),
            log_dropped_bytes: self.stdout.dropped_bytes() + self.stderr.dropped_bytes(),
            requests: None,
            drain_warning: self.drain_warning.clone(),
            release: self.proc.as_ref().and_then(|p| p.release.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECS: Duration = Duration::from_secs(1);

    fn program(extra: &str) -> ProgramConfig {
        let text =
            format!("[program.w]\ncommand = [\"w\"]\nlisten = [\"tcp://127.0.0.1:8080\"]\n{extra}");
        let mut cfg = crate::config::parse(&text, std::path::Path::new("/zdt.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        cfg.programs.remove("w").expect("the program just parsed")
    }

    #[test]
    fn an_unreachable_proxy_worker_is_told_where_to_listen() {
        let tcp = program("mode = \"proxy\"\n");
        let hint = with_hint(&tcp, "refused".into(), true);
        assert!(hint.starts_with("refused (") && hint.contains("{port}") && hint.contains("$PORT"));
        let unix = program("mode = \"proxy\"\nupstream = \"unix\"\n");
        let hint = with_hint(&unix, "refused".into(), true);
        assert!(
            hint.contains("{socket}") && hint.contains("$SOCKET"),
            "{hint}"
        );
        // Reachable, or in pass mode (the worker gets the socket): no hint.
        assert_eq!(with_hint(&tcp, "500".into(), false), "500");
        assert_eq!(with_hint(&program(""), "refused".into(), true), "refused");
    }

    #[test]
    fn never_ready_is_a_failed_start() {
        let now = Instant::now();
        assert!(!start_held(&Ready::Startsecs, SECS, None, now));
        assert!(!start_held(&Ready::Tcp, SECS, None, now));
    }

    #[test]
    fn ready_by_startsecs_has_held_already() {
        // Ready here means up for startsecs since spawn.
        let at = Instant::now();
        assert!(start_held(&Ready::Startsecs, SECS, Some(at), at));
    }

    #[test]
    fn explicit_readiness_must_hold_startsecs_after_ready() {
        let at = Instant::now();
        let soon = at + Duration::from_millis(300);
        let later = at + Duration::from_millis(1000);
        for ready in [Ready::Notify, Ready::Tcp, Ready::Http("/".into())] {
            assert!(!start_held(&ready, SECS, Some(at), soon), "{ready:?}");
            assert!(start_held(&ready, SECS, Some(at), later), "{ready:?}");
        }
        assert!(start_held(&Ready::Notify, Duration::ZERO, Some(at), at));
    }
}
