//! One actor per program: its instances, generations, and every start, stop
//! and restart of them.
//!
//! The actor owns a `Slot` per configured instance. Each slot has at
//! most one current process (a task in [`crate::instance`]) and is in one
//! [`InstanceState`]. Orders come in as [`ProgramMsg`]s, each with a `oneshot`
//! reply that resolves when the order has been carried out or has failed; the
//! actor keeps pending orders as `Op`s and checks them after every change.
//! After every change it publishes a [`ProgramSnapshot`] on a `watch` channel,
//! which `zdtctl status` reads without a round trip to the actor.
//!
//! Generations: every start of stopped instances (start, restart, reload)
//! begins a new generation of the program; a crashed instance restarted by
//! `autorestart` keeps its generation and counts a restart.
//!
//! Backoff: a process that exits before `startsecs` (counted from when it
//! became ready, with explicit readiness) is a failed start; after
//! the n-th failure in a row the slot waits `min(1s * 2^(n-1), 60s)` in
//! BACKOFF, and after more than `startretries` failures it is FATAL. A command
//! that cannot be executed at all is FATAL at once; one that cannot be
//! spawned for lack of fds or processes (EMFILE, ENFILE, EAGAIN) is retried
//! in BACKOFF (100 ms doubling to 5 s) for as long as that lasts, never FATAL.

mod canary;
mod files;
mod ops;
mod slot;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::{self, ProgramConfig};
use crate::control::proto::Reply;
use crate::instance::{ProcEvent, ProcEventKind};
use crate::logs::LogSink;
use crate::spawn::Spawner;
use crate::state::{InstanceSnapshot, InstanceState, ProgramSnapshot};

use ops::{Op, OpKind};
use slot::{Slot, SpawnCtx};

/// Why an order failed, with the worker's last output when it helps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError {
    /// What failed.
    pub message: String,
    /// The last lines the worker wrote, if the failure is the worker's.
    pub log_tail: Option<String>,
    /// A reload's change failed and the program runs on with the settings
    /// it had before (the supervisor keeps those as the program's config).
    pub kept_previous_config: bool,
}

impl OpError {
    fn plain(message: String) -> Self {
        Self {
            message,
            log_tail: None,
            kept_previous_config: false,
        }
    }
}

/// The answer to an order: the affected instances as they are now.
pub type OpResult = Result<Vec<InstanceSnapshot>, OpError>;

/// Orders for a program actor.
#[derive(Debug)]
pub enum ProgramMsg {
    /// Start the stopped instances (`instance` None = all); replies when RUNNING.
    Start {
        /// One instance, or all.
        instance: Option<u32>,
        /// Resolves when done.
        reply: oneshot::Sender<OpResult>,
    },
    /// Stop instances; replies when their processes are gone.
    Stop {
        /// One instance, or all.
        instance: Option<u32>,
        /// Resolves when done.
        reply: oneshot::Sender<OpResult>,
    },
    /// Restart instances; replies when the new processes run. With
    /// `canary` (proxy mode, all instances): the new generation starts and
    /// gets ready as in a zero-downtime restart, then takes that percentage
    /// of new clients beside the old one; replies once it serves. End it
    /// with [`ProgramMsg::Promote`] or [`ProgramMsg::EndCanary`].
    Restart {
        /// One instance, or all.
        instance: Option<u32>,
        /// Canary share of new clients, 1 to 99; None: a full restart.
        canary: Option<u8>,
        /// Progress lines for the client, if it wants them.
        progress: Option<mpsc::Sender<Reply>>,
        /// Resolves when done.
        reply: oneshot::Sender<OpResult>,
    },
    /// Replies once the actor has taken every message before this one (it
    /// has published its routes; after an upgrade, with the processes it
    /// adopted).
    Settled {
        /// Resolves with nothing.
        reply: oneshot::Sender<()>,
    },
    /// A canary's generation takes all traffic; the old generation drains
    /// and stops as after a restart. Replies when it is gone; an error when
    /// no canary runs or one of its instances is not RUNNING.
    Promote {
        /// Progress lines for the client, if it wants them.
        progress: Option<mpsc::Sender<Reply>>,
        /// Resolves when the old generation is gone.
        reply: oneshot::Sender<OpResult>,
    },
    /// Rolls a canary back: the old generation takes all traffic again and
    /// the canary's drains and stops. Replies when it is gone; an error when
    /// no canary runs.
    EndCanary {
        /// Progress lines for the client, if it wants them.
        progress: Option<mpsc::Sender<Reply>>,
        /// Resolves when the canary generation is gone.
        reply: oneshot::Sender<OpResult>,
    },
    /// Send a signal to the process groups of running instances.
    Signal {
        /// One instance, or all.
        instance: Option<u32>,
        /// The signal.
        signal: Signal,
        /// Resolves at once.
        reply: oneshot::Sender<OpResult>,
    },
    /// The log sink of one instance, for `tail`.
    Logs {
        /// Which instance.
        instance: u32,
        /// stderr instead of stdout.
        stderr: bool,
        /// The sink, or None if there is no such instance.
        reply: oneshot::Sender<Option<LogSink>>,
    },
    /// New settings (from a reload): restart with them if running.
    Reconfigure {
        /// The new settings.
        config: Box<ProgramConfig>,
        /// The sockets of the new settings, or why they cannot be bound.
        sockets: Sockets,
        /// Resolves when the program runs with them.
        reply: oneshot::Sender<OpResult>,
    },
    /// Proxy mode: start (true) or end (false) a drain.
    Drain {
        /// Start or end.
        on: bool,
        /// With `on`: refuse new requests now (true), or only say 503 on
        /// `/health` and serve on (false: the first half of a drain with
        /// `drain_delay`).
        refuse: bool,
        /// Resolves at once; an error when the program is not in proxy mode.
        reply: oneshot::Sender<OpResult>,
    },
    /// Proxy mode: hold new requests (each at most `max_pause`, then 503)
    /// until [`ProgramMsg::Resume`]. Replies once no request is in flight
    /// (the app is idle: what `deploy --pause` waits for before migrations),
    /// or with an error when some still were after `max_wait`, or when a
    /// resume or maintenance ended the pause first; the pause stays in force
    /// unless that happened.
    Pause {
        /// How long one request may be held.
        max_pause: Duration,
        /// Resolves when in flight reached 0 (or failed, see above).
        reply: oneshot::Sender<OpResult>,
    },
    /// Proxy mode: answer new requests 503 with `message` (a default when
    /// None) until [`ProgramMsg::Resume`].
    Maintenance {
        /// The 503's body.
        message: Option<String>,
        /// Resolves at once.
        reply: oneshot::Sender<OpResult>,
    },
    /// Proxy mode: end a pause (held requests go on) or a maintenance.
    Resume {
        /// Resolves at once.
        reply: oneshot::Sender<OpResult>,
    },
    /// New deploy settings, all a reload changed: taken as they are, no
    /// restart (the next process resolves its release with them).
    SetDeploy {
        /// The settings.
        deploy: Option<config::DeployConfig>,
    },
    /// Stop everything, then end the actor.
    Shutdown {
        /// Resolves when every process is gone.
        reply: oneshot::Sender<OpResult>,
    },
    /// An upgrade: reply with the program as the next binary takes it
    /// over, then do nothing until `thaw` resolves (the exec failed); or
    /// reply why it cannot be carried now.
    Freeze {
        /// The program, or why not now.
        reply: oneshot::Sender<Result<crate::upgrade::CarriedProgram, String>>,
        /// Resolves (or is dropped) if the upgrade did not happen.
        thaw: oneshot::Receiver<()>,
    },
}

/// A program's listening sockets (owned by zdt, shared with the actor), or why
/// they could not be bound.
pub type Sockets = Result<Vec<Arc<OwnedFd>>, String>;

/// Builds the spawn context from the actor's fields (a macro, so the borrow
/// of the slots stays disjoint from these).
macro_rules! ctx {
    ($p:expr, $ports:expr) => {
        SpawnCtx {
            cfg: &$p.config,
            spawner: &$p.spawner,
            events: &$p.events_tx,
            sockets: &$p.sockets,
            ports_in_use: $ports,
            counters: &$p.counters,
            pins: &$p.pins,
        }
    };
}

/// Cheap handle to a program actor.
#[derive(Clone, Debug)]
pub struct ProgramHandle {
    /// The program's name.
    pub name: String,
    /// To the actor. When every handle is dropped the actor stops its processes
    /// and ends.
    tx: mpsc::Sender<ProgramMsg>,
    /// The latest snapshot, published by the actor after every change.
    snapshot: watch::Receiver<ProgramSnapshot>,
    /// Request counters (proxy mode), read live into status snapshots.
    counters: crate::proxy::Counters,
}

impl ProgramHandle {
    /// Whether both handles reach the same actor.
    pub fn same(&self, other: &ProgramHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> ProgramSnapshot {
        self.snapshot.borrow().clone()
    }

    /// The latest snapshot with the request counters as they are now (proxy
    /// mode), for status.
    pub async fn status(&self) -> ProgramSnapshot {
        let counts = self.counters.read().await;
        let mut snap = self.snapshot();
        if let Some(counts) = counts {
            snap.requests = Some(counts.totals);
            snap.traffic = (!counts.stale).then(|| counts.stats.clone());
            for i in &mut snap.instances {
                i.requests = counts.of(i.instance, i.generation);
            }
            if let Some(crate::state::Hold::Paused { held, .. }) = &mut snap.hold {
                *held = counts.held;
            }
            if let Some(c) = &mut snap.canary {
                for g in [&mut c.stable, &mut c.canary] {
                    if let Some(n) = counts.of_gen(g.generation) {
                        (g.requests, g.errors_5xx, g.p99_us) = (n.requests, n.errors_5xx, n.p99_us);
                    }
                }
            }
        }
        snap
    }

    /// A receiver that sees every new snapshot.
    pub fn watch(&self) -> watch::Receiver<ProgramSnapshot> {
        self.snapshot.clone()
    }

    /// Sends an order; false if the actor has ended.
    pub async fn tx_send(&self, msg: ProgramMsg) -> bool {
        self.tx.send(msg).await.is_ok()
    }

    /// Sends an order built around a fresh reply channel and waits for the
    /// reply; None if the actor has ended.
    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> ProgramMsg) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// Starts the actor for one program. It starts its instances at once when
/// `autostart` is set.
pub fn spawn_program(
    config: ProgramConfig,
    sockets: Sockets,
    spawner: Spawner,
    registry: crate::listen::Registry,
    proxy: crate::proxy::Proxy,
    carried: Option<crate::upgrade::CarriedProgram>,
) -> ProgramHandle {
    let (tx, rx) = mpsc::channel(64);
    let name = config.name.clone();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (snapshot_tx, snapshot) = watch::channel(ProgramSnapshot {
        name: name.clone(),
        generation: 0,
        instances: Vec::new(),
        requests: None,
        socket_warning: None,
        deploy_watch: None,
        hold: None,
        canary: None,
        draining: false,
        traffic: None,
    });
    let routes = proxy.table(&name);
    let counters = routes.counters();
    let mut actor = Program {
        counters: counters.clone(),
        pins: Default::default(),
        slots: Vec::new(),
        generation: 0,
        ops: Vec::new(),
        spawner,
        events_tx,
        snapshot: snapshot_tx,
        log_drops: Arc::new(Notify::new()),
        sockets: Vec::new(),
        bind_error: None,
        registry,
        bind_retry: None,
        queued_ticks: Vec::new(),
        socket_warning: None,
        queued: None,
        proxy: None,
        proxy_rt: proxy,
        routes,
        canary: None,
        drain_announced: false,
        memory_over: std::collections::HashMap::new(),
        cron: None,
        watch: None,
        watch_failed: None,
        watch_due: None,
        config,
    };
    let cfg = actor.config.clone();
    actor.set_sockets(sockets, &cfg);
    actor.resize_slots();
    // Backoff timer tasks hold senders; the actor holds the receiver.
    let (timer_tx, timers) = mpsc::unbounded_channel::<BackoffDone>();
    // After an upgrade the processes are adopted before the handle is
    // returned: the first snapshot anyone reads shows them (health stays
    // 200 across the upgrade).
    let adopting = carried.is_some();
    if let Some(c) = carried {
        actor.adopt(c, &timer_tx);
    }
    actor.publish();
    tokio::spawn(actor.run(rx, events_rx, adopting, (timer_tx, timers)));
    ProgramHandle {
        name,
        tx,
        snapshot,
        counters,
    }
}

/// A backoff of slot `slot` ended; `epoch` tells stale timers apart.
#[derive(Debug)]
struct BackoffDone {
    slot: usize,
    epoch: u64,
    /// A slot of the canary generation (see [`CanaryRun`]).
    canary: bool,
}

impl BackoffDone {
    /// Sends this to the actor's `timers` after `delay`.
    fn after(self, delay: Duration, timers: &mpsc::UnboundedSender<BackoffDone>) {
        let timers = timers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = timers.send(self);
        });
    }
}

/// A canary in progress: the new generation serves `percent` % of new
/// clients beside the old one. Each instance of the canary has a slot of
/// its own here, with the whole state machine (a crash restarts it in its
/// own generation); the program's `slots` keep the old generation. Promote
/// and rollback move the losing generation's processes into the winning
/// slots' draining lists, where they finish their requests and stop.
struct CanaryRun {
    gen: u64,
    stable_gen: u64,
    percent: u8,
    /// One per instance, each with its instance number (`Slot::index`).
    slots: Vec<Slot>,
}

struct Program {
    config: ProgramConfig,
    slots: Vec<Slot>,
    /// The newest generation started.
    generation: u64,
    /// Pending orders, checked after every change.
    ops: Vec<Op>,
    spawner: Spawner,
    /// Process tasks send their events here; the actor holds the receiver.
    events_tx: mpsc::UnboundedSender<ProcEvent>,
    /// Snapshot for status readers, who hold receivers.
    snapshot: watch::Sender<ProgramSnapshot>,
    /// Poked by the log sinks when they drop bytes: publish the new counts.
    log_drops: Arc<Notify>,
    /// The listening sockets every generation gets (shared with the supervisor,
    /// which keeps them open for zdt's life).
    sockets: Vec<Arc<OwnedFd>>,
    /// Why the sockets could not be bound: starts fail with it (after
    /// trying again).
    bind_error: Option<String>,
    /// Where sockets are bound again after a bind error.
    registry: crate::listen::Registry,
    /// With `autostart`, a failed bind is tried again at this time; the
    /// count is the number of tries so far (for the backoff).
    bind_retry: Option<(tokio::time::Instant, u32)>,
    /// Pass mode: per socket, the connections waiting in its accept queue
    /// while an instance was RUNNING, each with the number of checks in a
    /// row that found it there.
    queued_ticks: Vec<Vec<(String, u32)>>,
    /// Set when one socket's queue stayed non-empty (see [`QUEUE_CHECKS`]).
    socket_warning: Option<String>,
    /// Proxy mode: the component accepting on the sockets; routes are
    /// published to it after every change.
    proxy: Option<crate::proxy::ProxyHandle>,
    /// The daemon's proxy component, which runs this program's proxy.
    proxy_rt: crate::proxy::Proxy,
    /// Proxy mode: the routes (plain data in; the proxy builds its
    /// upstreams from them), drain flag and gate every proxy of this
    /// program reads, kept across reloads that replace the proxy.
    routes: crate::proxy::RouteTable,
    /// The program's request counters (proxy mode), read from the proxy.
    counters: crate::proxy::Counters,
    /// The deploy release of each recent generation.
    pins: slot::ReleasePins,
    /// A reload that arrived during a restart, applied when it is over.
    queued: Option<(Box<ProgramConfig>, Sockets, oneshot::Sender<OpResult>)>,
    /// Proxy mode: a canary in progress.
    canary: Option<CanaryRun>,
    /// A drain was asked for: `/health` says 503 (the proxy refuses only
    /// once `drain_delay` passed, see the supervisor's drain).
    drain_announced: bool,
    /// `max_memory`: each instance whose process group was last seen above
    /// it, with that process's pid and since when it has been above.
    memory_over: std::collections::HashMap<usize, (u32, std::time::Instant)>,
    /// `cron_restart`: the schedule in force, when it next fires (None
    /// when it has just fired), and the local time that fired last.
    cron: Option<CronState>,
    /// `watch`: the file watch in force.
    watch: Option<files::Watch>,
    /// A `watch` setting that could not be started (said once, tried
    /// again when the setting changes).
    watch_failed: Option<config::WatchConfig>,
    /// Changes seen and not yet acted on: the restart waits for quiet.
    watch_due: Option<WatchDue>,
}

/// Changes a `watch` saw, waiting for the debounce time to pass quietly.
struct WatchDue {
    /// When the restart begins unless another change comes.
    at: tokio::time::Instant,
    /// The first change: the wait never grows past ten debounce times from it.
    first_at: tokio::time::Instant,
    first: std::path::PathBuf,
    count: usize,
}

/// How often pass-mode accept queues are looked at (the queue's length, a
/// getsockopt; only when it is not empty, which connections wait).
const QUEUE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Checks in a row one connection must be found waiting before it is
/// reported (5 s: the queue is first in, first out, so that long without a
/// single accept; a pause of a busy worker, a GC or a starved CPU, stays
/// well below). A busy worker takes queued connections in turn; one that
/// never accepts leaves the same ones there (Linux keeps even a connection
/// its client closed queued until it is accepted).
const QUEUE_CHECKS: u32 = 5;
/// A `cron_restart` schedule at work.
struct CronState {
    text: String,
    next: Option<(tokio::time::Instant, chrono::DateTime<chrono::Local>)>,
    fired: Option<chrono::DateTime<chrono::Local>>,
    /// The schedule names no time to come (said once).
    over: bool,
}

/// How often the memory of a program with `max_memory` is read (a scan of
/// `/proc`, a few milliseconds).
const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Resolves at `at`, never when None.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Backoff before the next start after `failures` failed starts in a row.
pub fn backoff_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(60))
}

impl Program {
    /// Private ports held by live processes (proxy mode).
    fn ports_in_use(&self) -> Vec<u16> {
        self.all_slots().flat_map(Slot::ports).collect()
    }

    /// The program's slots, then the canary's.
    fn all_slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .chain(self.canary.iter().flat_map(|c| c.slots.iter()))
    }

    fn set_sockets(&mut self, sockets: Sockets, cfg: &ProgramConfig) {
        match sockets {
            Ok(s) => {
                self.sockets = s;
                self.bind_error = None;
            }
            Err(e) => {
                self.sockets = Vec::new();
                self.bind_error = Some(e);
            }
        }
        // A new proxy for new sockets; connections of the old one finish,
        // routed by the same live table. A drain in force stays in force:
        // only `undrain` ends it.
        self.proxy = None;
        self.routes.set_proxied(cfg.mode == config::Mode::Proxy);
        if cfg.mode != config::Mode::Proxy {
            // Nothing of a pass-mode program goes through zdt to hold.
            self.routes.set_gate(crate::proxy::Gate::Open);
        }
        if cfg.mode == config::Mode::Proxy && self.bind_error.is_none() {
            match self.proxy_rt.start(
                &cfg.name,
                &self.sockets,
                crate::proxy::Options::of(cfg),
                &self.routes,
            ) {
                Ok(p) => self.proxy = Some(p),
                Err(e) => self.bind_error = Some(format!("cannot accept on the sockets: {e}")),
            }
        }
    }

    async fn run(
        mut self,
        mut orders: mpsc::Receiver<ProgramMsg>,
        mut events: mpsc::UnboundedReceiver<ProcEvent>,
        adopting: bool,
        (timer_tx, mut timers): (
            mpsc::UnboundedSender<BackoffDone>,
            mpsc::UnboundedReceiver<BackoffDone>,
        ),
    ) {
        let mut shutting_down = false;
        let undeployed = self
            .config
            .deploy
            .as_ref()
            .filter(|d| crate::deploy::Release::resolve(&d.root).is_none());
        if adopting {
            // Its processes run already.
        } else if let Some(d) = undeployed {
            tracing::info!(
                program = %self.config.name,
                root = %d.root.display(),
                "no release deployed yet: the program starts with the first `zdtctl deploy`"
            );
        } else if self.config.autostart {
            self.start_slots(None);
        }
        self.publish();
        let mut queue_check = tokio::time::interval(QUEUE_CHECK_EVERY);
        queue_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (watch_tx, mut watch_rx) = mpsc::unbounded_channel();
        let mut memory_check = tokio::time::interval(MEMORY_CHECK_EVERY);
        memory_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.schedule_cron();
            self.sync_watch(&watch_tx);
            let watch_at = self.watch_due.as_ref().map(|d| d.at);
            let cron_at = self.cron.as_ref().and_then(|c| c.next).map(|(at, _)| at);
            let retry_at = self.bind_retry.map(|(at, _)| at);
            let watch_queue = self.config.mode == config::Mode::Pass && !self.sockets.is_empty();
            tokio::select! {
                _ = queue_check.tick(), if watch_queue => self.check_accept_queues(),
                _ = memory_check.tick(), if self.config.max_memory.is_some() && !shutting_down => {
                    self.check_memory();
                }
                () = sleep_until_some(retry_at), if !shutting_down => self.on_bind_retry(),
                () = sleep_until_some(cron_at), if !shutting_down => self.on_cron(),
                Some(path) = watch_rx.recv() => self.on_change(path),
                () = sleep_until_some(watch_at), if !shutting_down => self.on_watch_due(),
                msg = orders.recv(), if !shutting_down => match msg {
                    Some(ProgramMsg::Shutdown { reply }) => {
                        shutting_down = true;
                        self.fail_pending("zdt is shutting down");
                        let slots = self.stop_slots(None);
                        self.ops.push(Op::new(OpKind::Stop, slots, reply, None));
                    }
                    Some(ProgramMsg::Freeze { reply, thaw }) => match self.carry() {
                        Ok(c) => {
                            let _ = reply.send(Ok(c));
                            // Nothing changes until the exec, or until the
                            // upgrade gives up; events wait in their queues.
                            let _ = thaw.await;
                        }
                        Err(e) => drop(reply.send(Err(e))),
                    },
                    Some(msg) => self.handle(msg),
                    None => {
                        shutting_down = true;
                        self.fail_pending("the program was removed");
                        self.stop_slots(None);
                    }
                },
                Some(ev) = events.recv() => self.on_event(ev, &timer_tx),
                Some(t) = timers.recv() => self.on_backoff_done(t),
                () = self.log_drops.notified() => {}
            }
            self.check_ops();
            self.trim_slots();
            if self.restart_busy().is_none() {
                if let Some((config, sockets, reply)) = self.queued.take() {
                    self.reconfigure(config, sockets, reply);
                    self.check_ops();
                }
            }
            self.publish();
            if shutting_down && self.ops.is_empty() && self.slots.iter().all(Slot::is_idle) {
                break;
            }
        }
        tracing::debug!(program = %self.config.name, "program actor ended");
    }

    /// Works out when `cron_restart` next fires, when the schedule is new
    /// (at start, after a reload) or has just fired.
    fn schedule_cron(&mut self) {
        let Some(text) = self.config.cron_restart.clone() else {
            self.cron = None;
            return;
        };
        let fired = match &self.cron {
            Some(c) if c.text == text && (c.next.is_some() || c.over) => return,
            Some(c) if c.text == text => c.fired,
            _ => None,
        };
        let next = config::cron::parse(&text)
            .ok()
            .and_then(|s| s.until_next_after(fired));
        match &next {
            Some((wait, at)) => tracing::info!(
                program = %self.config.name,
                "cron_restart {text:?}: next restart at {} (in {}s)",
                at.format("%Y-%m-%d %H:%M:%S %:z"),
                wait.as_secs()
            ),
            None => {
                tracing::warn!(program = %self.config.name, "cron_restart {text:?} names no time to come")
            }
        }
        self.cron = Some(CronState {
            text,
            over: next.is_none(),
            next: next.map(|(wait, at)| (tokio::time::Instant::now() + wait, at)),
            fired,
        });
    }

    /// Starts, replaces or ends the file watch when `watch` is new, changed
    /// or gone.
    fn sync_watch(&mut self, tx: &mpsc::UnboundedSender<std::path::PathBuf>) {
        let wanted = self.config.watch.as_ref();
        if self.watch.as_ref().map(|w| &w.config) == wanted
            || (wanted.is_some() && self.watch_failed.as_ref() == wanted)
        {
            return;
        }
        self.watch = None;
        self.watch_due = None;
        self.watch_failed = None;
        if let Some(cfg) = wanted {
            match files::start(&self.config.name, cfg, tx.clone()) {
                Ok(w) => self.watch = Some(w),
                Err(e) => {
                    tracing::warn!(program = %self.config.name, "watch: {e}");
                    self.watch_failed = Some(cfg.clone());
                }
            }
        }
    }

    /// A watched file changed: the restart waits until nothing has changed
    /// for the debounce time (at most ten of them after the first change).
    fn on_change(&mut self, path: std::path::PathBuf) {
        let Some(w) = &mut self.watch else { return };
        // A new folder under a watched one: watched too.
        if path.is_dir() {
            w.add(&path);
        }
        let debounce = w.config.debounce;
        let now = tokio::time::Instant::now();
        match &mut self.watch_due {
            Some(d) => {
                d.count += 1;
                d.at = (now + debounce).min(d.first_at + debounce * 10);
            }
            None => {
                self.watch_due = Some(WatchDue {
                    at: now + debounce,
                    first_at: now,
                    first: path,
                    count: 1,
                })
            }
        }
    }

    /// The watched files have been quiet for the debounce time: restart as
    /// `zdtctl restart` would (once a running restart is over).
    fn on_watch_due(&mut self) {
        let Some(due) = self.watch_due.take() else {
            return;
        };
        let name = self.config.name.clone();
        if !self.slots.iter().any(Slot::wants_running) {
            tracing::info!(program = %name, "watch: files changed; the program is not running");
            return;
        }
        if self.restart_busy().is_some() {
            let debounce = self
                .watch
                .as_ref()
                .map_or(Duration::from_millis(500), |w| w.config.debounce);
            self.watch_due = Some(WatchDue {
                at: tokio::time::Instant::now() + debounce,
                ..due
            });
            return;
        }
        tracing::info!(
            program = %name,
            changes = due.count,
            first = %due.first.display(),
            "watch: files changed; restarting"
        );
        let (reply, done) = oneshot::channel();
        self.begin_restart(None, None, None, reply);
        tokio::spawn(async move {
            if let Ok(Err(e)) = done.await {
                tracing::warn!(program = %name, "watch: the restart failed: {}", e.message);
            }
        });
    }

    /// `cron_restart` fired: restarts every instance as `zdtctl restart`
    /// would, unless the program is stopped or another restart runs.
    fn on_cron(&mut self) {
        // Fired: the next time is worked out on the next turn of the loop.
        if let Some(c) = &mut self.cron {
            c.fired = c.next.take().map(|(_, at)| at);
        }
        let name = self.config.name.clone();
        if !self.slots.iter().any(Slot::wants_running) {
            tracing::info!(program = %name, "cron_restart: not running; nothing to restart");
            return;
        }
        if let Some(e) = self.restart_busy() {
            tracing::warn!(program = %name, "cron_restart skipped: {}", e.message);
            return;
        }
        tracing::info!(program = %name, "cron_restart: restarting");
        let (reply, done) = oneshot::channel();
        self.begin_restart(None, None, None, reply);
        tokio::spawn(async move {
            if let Ok(Err(e)) = done.await {
                tracing::warn!(program = %name, "cron_restart failed: {}", e.message);
            }
        });
    }

    /// `max_memory`: restarts the first instance whose process group has
    /// stayed above it for `max_memory_for` (one at a time, and not while
    /// another restart runs; a zero-downtime one where the program owns
    /// sockets).
    fn check_memory(&mut self) {
        let Some(max) = self.config.max_memory else {
            return;
        };
        if self.restart_busy().is_some() || self.canary.is_some() {
            return;
        }
        let usage = crate::admin::procstat::groups_recent(MEMORY_CHECK_EVERY / 2);
        let now = std::time::Instant::now();
        let mut due = None;
        for slot in &self.slots {
            let i = slot.index();
            let rss = match (slot.pid(), slot.state()) {
                (Some(pid), InstanceState::Running) => usage.get(&pid).map(|u| (pid, u.rss_bytes)),
                _ => None,
            };
            let Some((pid, rss)) = rss.filter(|&(_, rss)| rss > max) else {
                self.memory_over.remove(&i);
                continue;
            };
            let since = match self.memory_over.get(&i) {
                Some(&(p, since)) if p == pid => since,
                _ => {
                    tracing::info!(
                        program = %self.config.name,
                        instance = i,
                        pid,
                        rss_mb = rss >> 20,
                        max_mb = max >> 20,
                        "memory above max_memory; restarting if it stays above for {:?}",
                        self.config.max_memory_for
                    );
                    self.memory_over.insert(i, (pid, now));
                    now
                }
            };
            if due.is_none() && now.duration_since(since) >= self.config.max_memory_for {
                due = Some((i, pid, rss));
            }
        }
        let Some((i, pid, rss)) = due else {
            return;
        };
        self.memory_over.remove(&i);
        let name = self.config.name.clone();
        tracing::warn!(
            program = %name,
            instance = i,
            pid,
            rss_mb = rss >> 20,
            max_mb = max >> 20,
            "restarting: the process group's memory ({} MiB) stayed above max_memory ({} MiB) for {:?}",
            rss >> 20,
            max >> 20,
            self.config.max_memory_for
        );
        let (reply, done) = oneshot::channel();
        self.begin_restart(u32::try_from(i).ok(), None, None, reply);
        tokio::spawn(async move {
            if let Ok(Err(e)) = done.await {
                tracing::warn!(program = %name, instance = i, "restart for max_memory failed: {}", e.message);
            }
        });
    }

    /// The program as an upgrade carries it, or why it cannot be carried
    /// now: an order, a canary or a pause is in progress, or a process is
    /// starting or stopping.
    fn carry(&self) -> Result<crate::upgrade::CarriedProgram, String> {
        let name = &self.config.name;
        if self.canary.is_some() {
            return Err(format!(
                "{name}: a canary runs; promote or roll it back first"
            ));
        }
        if !self.ops.is_empty() || self.queued.is_some() {
            return Err(format!(
                "{name}: a start, stop, restart or reload of it is in progress"
            ));
        }
        if self.hold().is_some() {
            return Err(format!(
                "{name} is paused or in maintenance; `zdtctl resume {name}` first"
            ));
        }
        let slots = self
            .slots
            .iter()
            .map(Slot::carry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(crate::upgrade::CarriedProgram {
            name: name.clone(),
            generation: self.generation,
            drained: self.routes.is_draining(),
            pins: self
                .pins
                .borrow()
                .iter()
                .map(|(g, r)| (*g, r.id.clone(), r.path.clone()))
                .collect(),
            slots,
        })
    }

    /// Takes over the program's processes from an earlier binary of this
    /// zdt (see [`crate::upgrade`]).
    fn adopt(
        &mut self,
        carried: crate::upgrade::CarriedProgram,
        timers: &mpsc::UnboundedSender<BackoffDone>,
    ) {
        self.generation = carried.generation;
        if carried.drained {
            self.routes.set_draining(true);
        }
        *self.pins.borrow_mut() = carried
            .pins
            .into_iter()
            .map(|(g, id, path)| (g, crate::deploy::Release { id, path }))
            .collect();
        let ports: Vec<u16> = carried
            .slots
            .iter()
            .filter_map(|s| s.proc.as_ref()?.private_port)
            .collect();
        for c in carried.slots {
            let index = c.index;
            let ctx = ctx!(self, &ports);
            let Some(slot) = self.slots.get_mut(index) else {
                tracing::warn!(program = %self.config.name, instance = index, "a carried instance the configuration does not have");
                continue;
            };
            if let Some(delay) = slot.adopt(&ctx, c) {
                BackoffDone {
                    slot: index,
                    epoch: slot.backoff_epoch(),
                    canary: false,
                }
                .after(delay, timers);
            }
        }
        tracing::info!(program = %self.config.name, generation = self.generation, "taken over from the previous binary");
    }

    /// Pass mode: a socket whose accept queue stays non-empty while an
    /// instance runs has nobody accepting on it (a worker that bound its own
    /// socket: gunicorn --reuse-port, a hard-coded port). zdt cannot see
    /// requests in pass mode, but it can see that.
    fn check_accept_queues(&mut self) {
        let running = self
            .slots
            .iter()
            .any(|s| s.state() == InstanceState::Running);
        self.queued_ticks.resize_with(self.sockets.len(), Vec::new);
        let mut warning = None;
        for (i, fd) in self.sockets.iter().enumerate() {
            let waiting = &mut self.queued_ticks[i];
            let queued = crate::listen::accept_queue_len(fd).unwrap_or(0);
            let Some(config::ListenAddr::Tcp(addr)) = self.config.listen.get(i) else {
                continue;
            };
            if !running || queued == 0 {
                waiting.clear();
                continue;
            }
            // Which connections wait, and for how many checks: a busy worker
            // takes them in turn, one nobody accepts on leaves them there.
            let now = crate::listen::unaccepted(addr.port(), addr.is_ipv6());
            waiting.retain(|(peer, _)| now.contains(peer));
            for peer in now {
                match waiting.iter_mut().find(|(p, _)| *p == peer) {
                    Some((_, ticks)) => *ticks += 1,
                    None => waiting.push((peer, 1)),
                }
            }
            let oldest = waiting.iter().map(|(_, t)| *t).max().unwrap_or(0);
            if oldest >= QUEUE_CHECKS && warning.is_none() {
                warning = Some(format!(
                    "tcp://{addr}: {queued} connection(s) waiting in the accept queue, one of them for {}s, while the program runs: is the worker accepting on the socket zdt passes (fd 3, LISTEN_FDS)? A server that binds its own socket (gunicorn --reuse-port, a fixed port) never sees them",
                    (QUEUE_CHECK_EVERY * oldest).as_secs()
                ));
            }
        }
        if warning.is_some() && self.socket_warning.is_none() {
            tracing::warn!(program = %self.config.name, "{}", warning.as_deref().unwrap_or_default());
        }
        self.socket_warning = warning;
    }

    /// A new generation took over: the accept queues are judged afresh (the
    /// old generation's warning is not the new one's).
    fn forget_queue_checks(&mut self) {
        self.queued_ticks.clear();
        self.socket_warning = None;
    }

    /// With a bind error and `autostart`, tries the bind again after a
    /// backoff (`tries` so far).
    fn schedule_bind_retry(&mut self, tries: u32) {
        self.bind_retry = match (&self.bind_error, self.config.autostart) {
            (Some(e), true) => {
                let delay = backoff_delay(tries + 1);
                tracing::warn!(program = %self.config.name, cause = %e, retry_in = ?delay, "cannot bind; trying again");
                Some((tokio::time::Instant::now() + delay, tries + 1))
            }
            _ => None,
        };
    }

    fn on_bind_retry(&mut self) {
        let tries = self.bind_retry.take().map_or(0, |(_, n)| n);
        if !self.config.autostart {
            // A reload turned autostart off meanwhile.
            return;
        }
        if self.rebind() {
            tracing::info!(program = %self.config.name, tries, "bound after a bind error; starting");
            self.start_slots(None);
        } else {
            self.schedule_bind_retry(tries);
        }
    }

    /// After a bind error, binds the sockets again; whether they are bound.
    fn rebind(&mut self) -> bool {
        if self.bind_error.is_none() {
            return true;
        }
        let sockets = self
            .registry
            .sockets_for(&self.config)
            .map_err(|e| e.to_string());
        let cfg = self.config.clone();
        self.set_sockets(sockets, &cfg);
        self.bind_error.is_none()
    }

    fn handle(&mut self, msg: ProgramMsg) {
        match msg {
            // Taken in the actor's loop, which waits while frozen.
            ProgramMsg::Freeze { reply, .. } => {
                drop(reply.send(Err("not frozen from here".into())));
            }
            ProgramMsg::Start { instance, reply } => match self.select(instance) {
                Ok(_) if self.canary.is_some() => drop(reply.send(Err(self.canary_running()))),
                Ok(slots) => {
                    self.supersede(&slots, "start");
                    let slots = self.start_slots(instance);
                    self.ops.push(Op::new(OpKind::Start, slots, reply, None));
                }
                Err(e) => drop(reply.send(Err(e))),
            },
            ProgramMsg::Stop { instance, reply } => match self.select(instance) {
                Ok(slots) => {
                    self.bind_retry = None;
                    self.supersede(&slots, "stop");
                    let slots = self.stop_slots(instance);
                    self.ops.push(Op::new(OpKind::Stop, slots, reply, None));
                }
                Err(e) => drop(reply.send(Err(e))),
            },
            ProgramMsg::Restart {
                instance,
                canary: None,
                progress,
                reply,
            } => self.begin_restart(instance, None, progress, reply),
            ProgramMsg::Restart {
                instance,
                canary: Some(percent),
                progress,
                reply,
            } => self.begin_canary(instance, percent, progress, reply),
            ProgramMsg::Promote { progress, reply } => self.end_canary(true, progress, reply),
            ProgramMsg::EndCanary { progress, reply } => self.end_canary(false, progress, reply),
            ProgramMsg::Reconfigure {
                config,
                sockets,
                reply,
            } => self.reconfigure(config, sockets, reply),
            ProgramMsg::Signal {
                instance,
                signal,
                reply,
            } => {
                let result = self.select(instance).map(|slots| {
                    for &i in &slots {
                        self.slots[i].signal(signal);
                    }
                    // Both generations of a canary.
                    for s in self.canary.iter().flat_map(|c| &c.slots) {
                        if slots.contains(&s.index()) {
                            s.signal(signal);
                        }
                    }
                    self.snapshots_of(&slots)
                });
                let _ = reply.send(result);
            }
            ProgramMsg::Logs {
                instance,
                stderr,
                reply,
            } => {
                let sink = self.slots.get(instance as usize).map(|s| s.sink(stderr));
                let _ = reply.send(sink);
            }
            ProgramMsg::SetDeploy { deploy } => self.config.deploy = deploy,
            ProgramMsg::Settled { reply } => {
                let _ = reply.send(());
            }
            ProgramMsg::Drain { on, refuse, reply } => {
                let result = match &self.proxy {
                    Some(_) => {
                        // Health turns 503 before the proxy answers 503.
                        self.drain_announced = on;
                        if on {
                            self.snapshot.send_modify(|s| s.draining = true);
                        }
                        if refuse || !on {
                            self.routes.set_draining(on);
                        }
                        self.publish();
                        tracing::info!(program = %self.config.name, draining = on, refusing = on && refuse, "drain");
                        Ok(self.snapshots_of(&(0..self.slots.len()).collect::<Vec<_>>()))
                    }
                    None => Err(OpError::plain(format!(
                        "{} is not in proxy mode: zdt does not see its requests, so it cannot drain them (set mode = \"proxy\")",
                        self.config.name
                    ))),
                };
                self.reply_when_applied(reply, result);
            }
            ProgramMsg::Pause { max_pause, reply } => self.pause(max_pause, reply),
            ProgramMsg::Maintenance { message, reply } => {
                let result = self.not_proxied("maintenance").map(|()| {
                    let message = message.unwrap_or_else(|| {
                        format!(
                            "503 Service Unavailable: {} is down for maintenance; please try again later\n",
                            self.config.name
                        )
                    });
                    tracing::info!(program = %self.config.name, %message, "maintenance");
                    let since_ms = crate::state::now_ms();
                    // Health turns 503 before the proxy answers 503.
                    self.snapshot.send_modify(|s| {
                        s.hold = Some(crate::state::Hold::Maintenance {
                            since_ms,
                            message: message.clone(),
                        });
                    });
                    self.routes.set_gate(crate::proxy::Gate::Maintenance {
                        since_ms,
                        message: message.into(),
                    });
                    self.all_snapshots()
                });
                self.reply_when_applied(reply, result);
            }
            ProgramMsg::Resume { reply } => {
                let result = self.not_proxied("resume").map(|()| {
                    if self.routes.gate() != crate::proxy::Gate::Open {
                        let (name, counters) = (self.config.name.clone(), self.counters.clone());
                        tokio::spawn(async move {
                            let held = counters.held().await;
                            tracing::info!(program = %name, held, "resume");
                        });
                    }
                    self.routes.set_gate(crate::proxy::Gate::Open);
                    self.all_snapshots()
                });
                self.reply_when_applied(reply, result);
            }
            ProgramMsg::Shutdown { reply } => {
                // Handled in run(); kept total for the compiler.
                let _ = reply.send(Err(OpError::plain("already shutting down".into())));
            }
        }
    }

    /// Replies once the proxy has applied what this order changed (the drain
    /// flag, the gate): with the proxy in its own process that is a round
    /// trip, and the client must not see the old gate after the reply.
    fn reply_when_applied(&self, reply: oneshot::Sender<OpResult>, result: OpResult) {
        let counters = self.counters.clone();
        tokio::spawn(async move {
            counters.applied().await;
            let _ = reply.send(result);
        });
    }

    /// Pause and maintenance hold requests in zdt's proxy: an error naming
    /// the mode for a pass-mode program.
    fn not_proxied(&self, verb: &str) -> Result<(), OpError> {
        if self.config.mode == config::Mode::Proxy {
            return Ok(());
        }
        Err(OpError::plain(format!(
            "{}: {verb} needs mode = \"proxy\": in pass mode the app accepts connections itself",
            self.config.name
        )))
    }

    fn all_snapshots(&self) -> Vec<InstanceSnapshot> {
        self.snapshots_of(&(0..self.slots.len()).collect::<Vec<_>>())
    }

    /// Closes the gate to new requests, then replies once none is in
    /// flight, within `max_wait` (a task of its own: the actor goes on).
    fn pause(&mut self, max_pause: Duration, reply: oneshot::Sender<OpResult>) {
        if let Err(e) = self.not_proxied("pause") {
            let _ = reply.send(Err(e));
            return;
        }
        // A pause in force keeps its start; a new max applies to requests
        // held from now on.
        let since_ms = match self.routes.gate() {
            crate::proxy::Gate::Paused { since_ms, .. } => since_ms,
            _ => crate::state::now_ms(),
        };
        let gate = crate::proxy::Gate::Paused {
            since_ms,
            max: max_pause,
        };
        // The gate first: from here on no request starts (proxy/gate.rs).
        self.routes.set_gate(gate);
        tracing::info!(program = %self.config.name, ?max_pause, "pause");
        let counters = self.counters.clone();
        let mut changes = self.routes.watch_gate();
        let max_wait = self.config.max_wait;
        let name = self.config.name.clone();
        let snaps = self.all_snapshots();
        tokio::spawn(async move {
            let ended = async {
                let _ = changes
                    .wait_for(|g| !matches!(g, crate::proxy::Gate::Paused { .. }))
                    .await;
            };
            let result = tokio::select! {
                () = counters.wait_idle() => Ok(snaps),
                () = ended => Err(OpError::plain(format!(
                    "{name}: the pause was ended (resume or maintenance) before the requests in flight finished"
                ))),
                () = tokio::time::sleep(max_wait) => {
                    let inflight = counters.inflight().await;
                    Err(OpError::plain(format!(
                        "{name}: paused, but {inflight} request(s) still in flight after max_wait ({max_wait:?}); new requests are held until `zdtctl resume {name}`"
                    )))
                }
            };
            if let Err(e) = &result {
                tracing::warn!(program = %name, cause = %e.message, "pause did not reach zero requests in flight");
            }
            let _ = reply.send(result);
        });
    }

    /// The pause or maintenance in force, for the snapshot (the held count
    /// is read live by [`ProgramHandle::status`]).
    fn hold(&self) -> Option<crate::state::Hold> {
        match self.routes.gate() {
            crate::proxy::Gate::Open => None,
            crate::proxy::Gate::Paused { since_ms, max } => Some(crate::state::Hold::Paused {
                since_ms,
                max_pause_ms: max.as_millis() as u64,
                held: 0,
            }),
            crate::proxy::Gate::Maintenance { since_ms, message } => {
                Some(crate::state::Hold::Maintenance {
                    since_ms,
                    message: message.to_string(),
                })
            }
        }
    }

    /// A newer order wins: pending orders on the same slots fail with a reason.
    fn supersede(&mut self, slots: &[usize], verb: &str) {
        let (gone, kept): (Vec<Op>, Vec<Op>) =
            self.ops.drain(..).partition(|op| op.overlaps(slots));
        self.ops = kept;
        for op in gone {
            op.finish(Err(OpError::plain(format!(
                "{}: interrupted by a later {verb}",
                self.config.name
            ))));
        }
    }

    /// Fails every pending order (their clients get the reason).
    fn fail_pending(&mut self, why: &str) {
        if let Some((_, _, reply)) = self.queued.take() {
            let _ = reply.send(Err(OpError::plain(why.to_string())));
        }
        for op in self.ops.drain(..) {
            op.finish(Err(OpError::plain(why.to_string())));
        }
    }

    /// The slots an order names, or an error listing the valid instances.
    fn select(&self, instance: Option<u32>) -> Result<Vec<usize>, OpError> {
        // Instances being removed (beyond `instances`) take no orders.
        let n = self.slots.len().min(self.config.instances as usize);
        match instance {
            None => Ok((0..n).collect()),
            Some(i) if (i as usize) < n => Ok(vec![i as usize]),
            Some(i) => Err(OpError::plain(format!(
                "{} has no instance {i} (instances: 0 to {})",
                self.config.name,
                n.saturating_sub(1)
            ))),
        }
    }

    /// New settings from a reload (or `zdtctl scale`). A change of the
    /// instance count alone adds or removes instances; a program that owns
    /// sockets is replaced without downtime (after its count changed, when
    /// that changed too); otherwise stop, then start.
    fn reconfigure(
        &mut self,
        config: Box<ProgramConfig>,
        sockets: Sockets,
        reply: oneshot::Sender<OpResult>,
    ) {
        if self.canary.is_some() {
            // The supervisor refuses such a reload whole; this is for one
            // that raced with the start of the canary. Its settings are
            // not applied: the program keeps its previous ones.
            let mut e = self.canary_running();
            e.message = format!("{}; the new settings were not applied", e.message);
            e.kept_previous_config = true;
            let _ = reply.send(Err(e));
            return;
        }
        if self.restart_busy().is_some() {
            // Applied when the running restart is over; a newer reload wins.
            if let Some((_, _, older)) = self.queued.replace((config, sockets, reply)) {
                let _ = older.send(Err(OpError::plain(format!(
                    "{}: superseded by a newer reload",
                    self.config.name
                ))));
            }
            return;
        }
        if *config == self.config && sockets.is_ok() {
            // `zdtctl scale` to the count it has: nothing to do.
            let all: Vec<usize> = (0..self.slots.len()).collect();
            let _ = reply.send(Ok(self.snapshots_of(&all)));
            return;
        }
        let running = self.slots.iter().any(Slot::wants_running);
        let mut same_but_count = (*config).clone();
        same_but_count.instances = self.config.instances;
        if !running && sockets.is_ok() && same_but_count == self.config {
            // A stopped program: the new count, and nothing started.
            self.config.instances = config.instances;
            self.resize_slots();
            let all: Vec<usize> = (0..self.slots.len()).collect();
            let _ = reply.send(Ok(self.snapshots_of(&all)));
            return;
        }
        if running && sockets.is_ok() && config.instances != self.config.instances {
            if same_but_count == self.config {
                // Only the count changed (`zdtctl scale`, or a reload that
                // changed nothing else): add or remove instances, leave the
                // others alone.
                return self.begin_scale(config.instances, reply);
            }
            if config.overlaps() && self.config.overlaps() {
                // First the count, with the settings in force; then the
                // other changes, without downtime, once it is done.
                let (ignored, _) = oneshot::channel();
                self.begin_scale(config.instances, ignored);
                self.queued = Some((config, sockets, reply));
                return;
            }
        }
        let overlap = running
            && sockets.is_ok()
            && config.overlaps()
            && self.config.overlaps()
            && config.instances == self.config.instances;
        // A rename (same sockets, new name) is not undone: the supervisor
        // already knows the program by its new name.
        let previous = (overlap && config.name == self.config.name).then(|| {
            Box::new(ops::Previous {
                config: self.config.clone(),
                sockets: self.sockets.clone(),
            })
        });
        self.set_sockets(sockets, &config);
        if self.bind_error.is_none() || !config.autostart {
            self.bind_retry = None;
        }
        if overlap {
            self.config = *config;
            self.resize_slots();
            self.begin_replace(None, None, reply, previous, None);
        } else {
            self.begin_restart(None, Some(config), None, reply);
        }
    }

    /// Changes the number of instances to `to` while the others run on: new
    /// instances start in the current generation; the surplus ones (the
    /// highest) stop as `zdtctl stop NAME:N` stops one (proxy mode: out of
    /// the routes first, their requests finish) and are then dropped.
    fn begin_scale(&mut self, to: u32, reply: oneshot::Sender<OpResult>) {
        let (from, to) = (self.slots.len(), to as usize);
        tracing::info!(program = %self.config.name, from, to, "scaling");
        self.config.instances = to as u32;
        if to > from {
            for index in from..to {
                self.slots
                    .push(Slot::new(&self.config, index, &self.log_drops));
            }
            for index in from..to {
                if let Some(err) = &self.bind_error {
                    self.slots[index].fail(&self.config.name, err.clone());
                    continue;
                }
                let ports = self.ports_in_use();
                self.slots[index].start(&ctx!(self, &ports), self.generation);
            }
        } else {
            for index in to..from {
                self.slots[index].stop(&self.config);
            }
        }
        let (lo, hi) = (from.min(to), from.max(to));
        self.ops.push(Op::new(
            OpKind::Scale { grow: to > from },
            (lo..hi).collect(),
            reply,
            None,
        ));
    }

    /// A shrinking scale: true once the removed instances are gone (see
    /// [`Program::trim_slots`]); one started again meanwhile is stopped.
    fn finish_shrink(&mut self, slots: &[usize]) -> bool {
        for &i in slots {
            if let Some(slot) = self.slots.get_mut(i) {
                if slot.wants_running() {
                    slot.stop(&self.config);
                }
            }
        }
        self.trim_slots();
        slots
            .iter()
            .all(|&i| self.slots.get(i).is_none_or(Slot::is_idle))
    }

    /// Drops the slots beyond `instances` that have no process left.
    fn trim_slots(&mut self) {
        let want = self.config.instances as usize;
        while self.slots.len() > want && self.slots.last().is_some_and(Slot::is_idle) {
            self.slots.pop();
        }
        self.memory_over.retain(|&i, _| i < self.slots.len());
    }

    /// Instances beyond `instances` still stopping (a scale or a reload
    /// that lowered the count): they are not counted as the program's, and
    /// another change of the count waits for them.
    fn leaving(&self) -> bool {
        self.slots.len() > self.config.instances as usize
    }

    /// The refusal of an order that would change instances during a canary.
    fn canary_running(&self) -> OpError {
        let name = &self.config.name;
        let (gen, pct) = self.canary.as_ref().map_or((0, 0), |c| (c.gen, c.percent));
        OpError::plain(format!(
            "a canary of {name} is running (gen {gen} takes {pct} % of new clients): promote it (zdtctl promote {name}) or roll it back (zdtctl rollback {name}) first"
        ))
    }

    fn restart_busy(&self) -> Option<OpError> {
        if self.canary.is_some() {
            return Some(self.canary_running());
        }
        if self.leaving() {
            return Some(OpError::plain(format!(
                "instances of {} removed by a change of instances are still stopping; try again when they are gone",
                self.config.name
            )));
        }
        self.ops
            .iter()
            .any(|op| {
                matches!(
                    op.kind,
                    OpKind::Restart { .. } | OpKind::Replace { .. } | OpKind::Scale { .. }
                )
            })
            .then(|| {
                OpError::plain(format!(
                    "a restart of {} is already in progress; try again when it has finished",
                    self.config.name
                ))
            })
    }

    /// Zero-downtime restart: start a new generation beside the running one
    /// on the same sockets; switch when it is ready; then stop the old one.
    fn begin_replace(
        &mut self,
        instance: Option<u32>,
        progress: Option<mpsc::Sender<Reply>>,
        reply: oneshot::Sender<OpResult>,
        previous: Option<Box<ops::Previous>>,
        canary: Option<u8>,
    ) {
        if let Some(e) = self.restart_busy() {
            let _ = reply.send(Err(e));
            return;
        }
        let slots = match self.select(instance) {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if !self.rebind() {
            let err = self.bind_error.clone().unwrap_or_default();
            let _ = reply.send(Err(OpError::plain(err)));
            return;
        }
        self.supersede(&slots, "restart");
        let old = slots
            .iter()
            .map(|&i| self.slots[i].current_gen())
            .max()
            .unwrap_or(self.generation);
        self.generation += 1;
        let gen = self.generation;
        // A canary starts all its instances at once: none switches alone.
        let rolling = self.config.strategy == config::Strategy::Rolling && canary.is_none();
        let first = if rolling { &slots[..1] } else { &slots[..] };
        for &i in first {
            let ports = self.ports_in_use();
            self.slots[i].begin_replace(&ctx!(self, &ports), gen);
        }
        let op = Op::new(
            OpKind::Replace {
                gen,
                rolling,
                todo: slots.clone(),
                started: std::time::Instant::now(),
                switched: None,
                previous,
                canary,
            },
            slots,
            reply,
            progress,
        );
        op.progress(format!(
            "{}: starting gen {gen} beside gen {old}{}",
            self.config.name,
            match canary {
                Some(pct) => format!(" as a canary for {pct} % of new clients"),
                None if rolling => ", one instance at a time".to_string(),
                None => String::new(),
            }
        ));
        self.ops.push(op);
    }

    /// Records that traffic just moved to the new generation of op `index`.
    fn mark_switched(&mut self, index: usize) {
        if let OpKind::Replace { switched, .. } = &mut self.ops[index].kind {
            *switched = Some(std::time::Instant::now());
        }
    }

    /// Advances a zero-downtime restart; Some(result) when it is over.
    fn step_replace(&mut self, index: usize) -> Option<OpResult> {
        let OpKind::Replace {
            gen,
            rolling,
            todo,
            started,
            canary,
            ..
        } = &self.ops[index].kind
        else {
            return None;
        };
        let (gen, rolling, started, mut todo, canary) =
            (*gen, *rolling, *started, todo.clone(), *canary);
        let slots = self.ops[index].slots.clone();
        let name = self.config.name.clone();
        // A candidate failed: kill every candidate, keep the old generation.
        let failed = slots.iter().find_map(|&s| {
            let slot = &mut self.slots[s];
            let why = slot.take_next_failure().or_else(|| {
                (todo.contains(&s)
                    && matches!(slot.state(), InstanceState::Fatal | InstanceState::Exited))
                .then(|| format!("{name}:{s} is {}", slot.state()))
            })?;
            Some((s, why))
        });
        if let Some((s, why)) = failed {
            for &t in &slots {
                self.slots[t].abort_replace(&self.config);
            }
            // The generation number is not taken back: the aborted
            // candidates are still being stopped under it, and the next
            // start must not be mistaken for them.
            let switched = slots.len() - todo.len();
            let mut kept = if switched == 0 {
                "the old generation keeps serving".to_string()
            } else {
                format!("{switched} instance(s) already switched stay on gen {gen}; the others keep serving")
            };
            // A reload's change is undone, so a crash of an old worker
            // respawns it as it was, not as rejected. (With `rolling`, the
            // instances already switched run the new settings until they
            // next restart; every start from now on uses the previous ones.)
            let previous = match &mut self.ops[index].kind {
                OpKind::Replace { previous, .. } => previous.take(),
                _ => None,
            };
            let reverted = previous.is_some();
            if let Some(prev) = previous {
                let ops::Previous { config, sockets } = *prev;
                self.set_sockets(Ok(sockets), &config);
                self.config = config;
                self.resize_slots();
                kept.push_str(if switched == 0 {
                    " with its previous settings"
                } else {
                    " until they next restart; the program keeps its previous settings"
                });
            }
            crate::metrics::global().restart_done(&name, false);
            return Some(Err(OpError {
                message: format!("{name}: restart failed: {why}; {kept}"),
                log_tail: Some(self.slots[s].log_tail(20)),
                kept_previous_config: reverted,
            }));
        }
        let ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0);
        let metrics = crate::metrics::global();
        if rolling {
            if let Some(&s) = todo.first() {
                if self.slots[s].ready_to_switch() {
                    self.slots[s].switch(&self.config);
                    self.forget_queue_checks();
                    self.mark_switched(index);
                    todo.remove(0);
                    metrics.restart_ready(&name, started.elapsed().as_secs_f64());
                    if todo.is_empty() {
                        metrics.restart_switched(&name, started.elapsed().as_secs_f64());
                    }
                    self.ops[index].progress(format!(
                        "{name}:{s}: gen {gen} ready in {ms} ms; old generation stopping"
                    ));
                    if let Some(&n) = todo.first() {
                        let ports = self.ports_in_use();
                        self.slots[n].begin_replace(&ctx!(self, &ports), gen);
                    }
                }
            }
        } else if let Some(percent) = canary
            .filter(|_| !todo.is_empty() && todo.iter().all(|&s| self.slots[s].ready_to_switch()))
        {
            metrics.restart_ready(&name, started.elapsed().as_secs_f64());
            return Some(self.start_canary(index, gen, percent, &todo, &ms));
        } else if !todo.is_empty() && todo.iter().all(|&s| self.slots[s].ready_to_switch()) {
            let old = todo
                .iter()
                .map(|&s| self.slots[s].current_gen())
                .max()
                .unwrap_or(0);
            for &s in &todo {
                self.slots[s].switch(&self.config);
            }
            self.forget_queue_checks();
            self.mark_switched(index);
            metrics.restart_ready(&name, started.elapsed().as_secs_f64());
            metrics.restart_switched(&name, started.elapsed().as_secs_f64());
            self.ops[index].progress(format!(
                "{name}: gen {gen}: {n}/{n} ready in {ms} ms; gen {old}: stopping",
                n = todo.len()
            ));
            todo.clear();
        }
        if let OpKind::Replace { todo: t, .. } = &mut self.ops[index].kind {
            t.clone_from(&todo);
        }
        if todo.is_empty() && slots.iter().all(|&s| !self.slots[s].is_draining()) {
            let drained = match &self.ops[index].kind {
                OpKind::Replace {
                    switched: Some(t), ..
                } => {
                    metrics.restart_drained(&name, t.elapsed().as_secs_f64());
                    format!("{} ms after the switch, ", t.elapsed().as_millis())
                }
                _ => String::new(),
            };
            metrics.restart_done(&name, true);
            self.ops[index].progress(format!(
                "{name}: old generation gone {drained}{} ms after the restart began",
                started.elapsed().as_millis()
            ));
            for &s in &slots {
                if let Some(w) = self.slots[s].drain_warning() {
                    self.ops[index].progress(format!("{name}:{s}: warning: {w}"));
                }
            }
            return Some(Ok(self.snapshots_of(&slots)));
        }
        None
    }

    fn begin_restart(
        &mut self,
        instance: Option<u32>,
        new_config: Option<Box<ProgramConfig>>,
        progress: Option<mpsc::Sender<Reply>>,
        reply: oneshot::Sender<OpResult>,
    ) {
        if new_config.is_none()
            && self.config.overlaps()
            && self.slots.iter().any(Slot::wants_running)
        {
            return self.begin_replace(instance, progress, reply, None, None);
        }
        if let Some(e) = self.restart_busy() {
            let _ = reply.send(Err(e));
            return;
        }
        match self.select(instance) {
            Ok(slots) => self.supersede(&slots, "restart"),
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        }
        // A reload of a program that is not running only swaps the settings.
        if new_config.is_some() && !self.slots.iter().any(Slot::wants_running) {
            if let Some(cfg) = new_config {
                self.config = *cfg;
            }
            self.resize_slots();
            let slots = if self.config.autostart {
                self.start_slots(None)
            } else {
                Vec::new()
            };
            self.ops
                .push(Op::new(OpKind::Start, slots, reply, progress));
            return;
        }
        let scope = if new_config.is_some() { None } else { instance };
        let slots = self.stop_slots(scope);
        let op = Op::new(
            OpKind::Restart {
                starting: false,
                new_config,
                instance: scope,
            },
            slots,
            reply,
            progress,
        );
        op.progress(format!(
            "{}: stopping gen {}",
            self.config.name, self.generation
        ));
        self.ops.push(op);
    }

    fn resize_slots(&mut self) {
        let want = self.config.instances as usize;
        // Only idle slots are ever removed (dropping a process's handle
        // would kill it): one that still has a process is stopped and
        // dropped once it has none (`trim_slots`).
        for slot in self.slots.iter_mut().skip(want) {
            if !slot.is_idle() {
                slot.stop(&self.config);
            }
        }
        self.trim_slots();
        for slot in &mut self.slots {
            slot.reconfigure(&self.config, &self.log_drops);
        }
        while self.slots.len() < want {
            let index = self.slots.len();
            self.slots
                .push(Slot::new(&self.config, index, &self.log_drops));
        }
    }

    /// Starts the named slots that are not running, in a new generation;
    /// returns the slots selected.
    fn start_slots(&mut self, instance: Option<u32>) -> Vec<usize> {
        let selected = self.select(instance).unwrap_or_default();
        if selected.iter().any(|&i| !self.slots[i].wants_running()) {
            self.generation += 1;
            self.forget_queue_checks();
            if !self.rebind() && self.bind_retry.is_none() {
                self.schedule_bind_retry(0);
            }
        }
        for &i in &selected {
            if !self.slots[i].wants_running() {
                if let Some(err) = &self.bind_error {
                    self.slots[i].fail(&self.config.name, err.clone());
                    continue;
                }
                let ports = self.ports_in_use();
                self.slots[i].start(&ctx!(self, &ports), self.generation);
            }
        }
        selected
    }

    fn stop_slots(&mut self, instance: Option<u32>) -> Vec<usize> {
        // A stop ends a canary: both generations stop (the canary's drains
        // in the program's slots, so the stop waits for it too).
        if let Some(c) = self.canary.take() {
            tracing::info!(program = %self.config.name, gen = c.gen, "stop: the canary ends with the rest");
            for s in c.slots {
                let i = s.index();
                self.slots[i].absorb(s, &self.config);
            }
        }
        let selected = self.select(instance).unwrap_or_default();
        for &i in &selected {
            self.slots[i].stop(&self.config);
        }
        selected
    }

    fn on_event(&mut self, ev: ProcEvent, timers: &mpsc::UnboundedSender<BackoffDone>) {
        // An event of a canary process goes to the canary's slot.
        let in_canary = self.canary.as_ref().is_some_and(|c| {
            c.slots
                .iter()
                .any(|s| s.index() == ev.slot && s.role(ev.gen).is_some())
        });
        let slot = if in_canary {
            self.canary
                .as_mut()
                .and_then(|c| c.slots.iter_mut().find(|s| s.index() == ev.slot))
        } else {
            self.slots.get_mut(ev.slot)
        };
        let Some(slot) = slot else {
            return;
        };
        let Some(role) = slot.role(ev.gen) else {
            return;
        };
        let cfg = &self.config;
        match role {
            slot::Role::Next => return slot.on_next_event(cfg, ev.kind),
            slot::Role::Draining => return slot.on_draining_event(cfg, ev.gen, ev.kind),
            slot::Role::Current => {}
        }
        let later = |delay: Duration, epoch: u64| {
            BackoffDone {
                slot: ev.slot,
                epoch,
                canary: in_canary,
            }
            .after(delay, timers);
        };
        match ev.kind {
            ProcEventKind::Spawned { pid, keep } => slot.on_spawned(pid, keep),
            ProcEventKind::SpawnFailed(err) => {
                tracing::error!(program = %cfg.name, instance = ev.slot, cause = %err, "cannot start; FATAL");
                slot.on_spawn_failed(err);
            }
            ProcEventKind::SpawnShortage(err) => {
                let Some(delay) = slot.on_spawn_shortage(&cfg.name, &err) else {
                    return;
                };
                tracing::warn!(program = %cfg.name, instance = ev.slot, cause = %err, retry_in = ?delay, "cannot start for lack of file descriptors or processes; retrying");
                later(delay, slot.backoff_epoch());
            }
            ProcEventKind::Up => slot.on_up(&cfg.name),
            ProcEventKind::NotReady { why, unreachable } => {
                slot.on_not_ready(cfg, why, unreachable)
            }
            ProcEventKind::Status(text) => slot.on_status(text),
            ProcEventKind::Exited { status, killed } => match slot.on_exited(cfg, status, killed) {
                slot::AfterExit::Backoff(delay) => later(delay, slot.backoff_epoch()),
                slot::AfterExit::Restart => self.respawn(ev.slot, in_canary),
                slot::AfterExit::Nothing => {}
            },
        }
    }

    /// Spawns the process of slot `index` again, in its generation (of the
    /// canary's slots when `canary`).
    fn respawn(&mut self, index: usize, canary: bool) {
        let ports = self.ports_in_use();
        let ctx = ctx!(self, &ports);
        let slot = if canary {
            self.canary
                .as_mut()
                .and_then(|c| c.slots.iter_mut().find(|s| s.index() == index))
        } else {
            self.slots.get_mut(index)
        };
        if let Some(s) = slot {
            s.respawn(&ctx);
        }
    }

    fn on_backoff_done(&mut self, t: BackoffDone) {
        let slot = if t.canary {
            self.canary
                .as_ref()
                .and_then(|c| c.slots.iter().find(|s| s.index() == t.slot))
        } else {
            self.slots.get(t.slot)
        };
        if slot.is_some_and(|s| s.state() == InstanceState::Backoff && s.backoff_epoch() == t.epoch)
        {
            self.respawn(t.slot, t.canary);
        }
    }

    fn check_ops(&mut self) {
        let mut i = 0;
        while i < self.ops.len() {
            if matches!(self.ops[i].kind, OpKind::Replace { .. }) {
                match self.step_replace(i) {
                    Some(result) => self.ops.remove(i).finish(result),
                    None => i += 1,
                }
                continue;
            }
            if matches!(self.ops[i].kind, OpKind::Scale { grow: false }) {
                let slots = self.ops[i].slots.clone();
                if self.finish_shrink(&slots) {
                    let op = self.ops.remove(i);
                    let rows = self.snapshots_of(&(0..self.slots.len()).collect::<Vec<_>>());
                    op.finish(Ok(rows));
                } else {
                    i += 1;
                }
                continue;
            }
            let states: Vec<(InstanceState, bool)> = self.ops[i]
                .slots
                .iter()
                .filter_map(|&s| self.slots.get(s).map(|s| (s.state(), s.is_idle())))
                .collect();
            let stopped_for_restart = matches!(
                self.ops[i].kind,
                OpKind::Restart {
                    starting: false,
                    ..
                }
            ) && states.iter().all(|&(_, idle)| idle);
            if stopped_for_restart {
                // Check the same order again: the start may already have
                // failed (no event would come to re-check it).
                self.restart_phase_two(i);
                continue;
            }
            match ops::verdict(&self.ops[i].kind, &states) {
                None => i += 1,
                Some(ok) => {
                    let op = self.ops.remove(i);
                    let result = if ok {
                        Ok(self.snapshots_of(&op.slots))
                    } else {
                        Err(self.failure_of(&op.slots))
                    };
                    op.finish(result);
                }
            }
        }
    }

    /// Every process of a restart is gone: apply new settings, start again.
    fn restart_phase_two(&mut self, index: usize) {
        let (new_config, instance) = match &mut self.ops[index].kind {
            OpKind::Restart {
                starting,
                new_config,
                instance,
            } => {
                *starting = true;
                (new_config.take(), *instance)
            }
            _ => return,
        };
        if let Some(cfg) = new_config {
            self.config = *cfg;
            self.resize_slots();
        }
        let slots = self.start_slots(instance);
        let msg = format!("{}: starting gen {}", self.config.name, self.generation);
        let op = &mut self.ops[index];
        op.slots = slots;
        op.progress(msg);
    }

    fn failure_of(&self, slots: &[usize]) -> OpError {
        let bad = slots
            .iter()
            .filter_map(|&i| self.slots.get(i))
            .find(|s| s.state() != InstanceState::Running);
        match bad {
            Some(s) => OpError {
                message: format!(
                    "{}:{} is {}{}",
                    self.config.name,
                    s.index(),
                    s.state(),
                    s.reason().map(|r| format!(" ({r})")).unwrap_or_default()
                ),
                log_tail: Some(s.log_tail(20)),
                kept_previous_config: false,
            },
            None => OpError::plain(format!(
                "{} did not reach the requested state",
                self.config.name
            )),
        }
    }

    fn snapshots_of(&self, slots: &[usize]) -> Vec<InstanceSnapshot> {
        slots
            .iter()
            .filter_map(|&i| self.slots.get(i))
            .map(|s| s.snapshot(&self.config.name))
            .collect()
    }

    /// Publishes the routes and the snapshot. When the program stops
    /// serving (its health goes 503), the snapshot goes first, so that the
    /// admin listener's health turns before the proxy refuses a request;
    /// otherwise the routes go first, so that health turns 200 only once
    /// the proxy has an instance to send to.
    fn publish(&self) {
        let routes = crate::proxy::RouteSet {
            routes: self.slots.iter().filter_map(Slot::route).collect(),
            canary: self.canary_routes(),
            counted: self.all_slots().flat_map(Slot::counted).collect(),
        };
        let new = ProgramSnapshot {
            requests: None,
            name: self.config.name.clone(),
            generation: self.generation,
            instances: self
                .all_slots()
                .flat_map(|s| s.snapshots(&self.config.name))
                .collect(),
            socket_warning: self.socket_warning.clone(),
            deploy_watch: None,
            hold: self.hold(),
            canary: self.canary_status(),
            draining: self.drain_announced || self.routes.is_draining(),
            traffic: None,
        };
        let health_first = self.snapshot.borrow().serving().is_ok() && new.serving().is_err();
        if !health_first {
            self.routes.publish(&routes);
        }
        self.snapshot.send_if_modified(|snap| {
            let changed = *snap != new;
            *snap = new;
            changed
        });
        if health_first {
            self.routes.publish(&routes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_delay(0), Duration::from_secs(1));
    }
}
