//! The root actor: owns the program actors and the configuration, answers
//! control requests, applies reloads and runs the shutdown order.
//!
//! Requests that take time (start, stop, restart, tail -f, reload) are carried
//! out in a task of their own that talks to the program actors, so the
//! supervisor loop never waits on a program: `status` is answered at once from
//! the programs' published snapshots even while a restart runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::{self, Config, ProgramConfig};
use crate::control::proto::{ErrorBody, Outcome, PidEntry, Reply};
use crate::control::{proto::Command, ControlRequest};
use crate::deploy;
use crate::listen;
use crate::program::{spawn_program, OpError, OpResult, ProgramHandle, ProgramMsg, Sockets};
use crate::sdnotify;
use crate::spawn::Spawner;
use crate::target::{self, Resolved};

/// What the supervisor loop reacts to besides control requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonSignal {
    /// SIGTERM/SIGINT: stop everything gracefully and exit (a second one: exit now).
    Shutdown,
    /// SIGHUP: reload the configuration.
    Reload,
    /// SIGUSR2: upgrade in place to the binary zdt was started from.
    Upgrade,
}

/// How long `zdtctl pause` holds one request without `--max-pause`.
pub const DEFAULT_MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(30);

struct Entry {
    handle: ProgramHandle,
    config: ProgramConfig,
}

/// The root actor's state.
pub struct Supervisor {
    config: Config,
    programs: BTreeMap<String, Entry>,
    spawner: Spawner,
    /// The proxy component every proxied program runs on.
    proxy: crate::proxy::Proxy,
    /// Every listening socket zdt owns, bound once and kept open for zdt's
    /// life (program actors hold clones while they use them). An address
    /// dropped by a reload is closed once the reload settled and the last
    /// program using it let go.
    registry: listen::Registry,
    /// Reload tasks report here when every change of theirs settled; the
    /// supervisor loop holds the receiver.
    settled_tx: mpsc::UnboundedSender<Settled>,
    settled_rx: Option<mpsc::UnboundedReceiver<Settled>>,
    /// Deploy watches, one per deploy root that has one; dropping one stops it.
    watches: BTreeMap<PathBuf, deploy::watch::WatchHandle>,
    /// Requests zdt makes of itself (a watch's deploys); the loop holds the
    /// receiver, watches hold senders.
    internal_tx: mpsc::Sender<ControlRequest>,
    internal_rx: Option<mpsc::Receiver<ControlRequest>>,
    /// zdt's own service manager (sd_notify): ready, reloading, stopping,
    /// watchdog. Does nothing when zdt was not started with NOTIFY_SOCKET.
    notifier: sdnotify::Notifier,
    /// After an upgrade: the programs as the previous binary ran them,
    /// taken by the program actors as they are created.
    carried: BTreeMap<String, crate::upgrade::CarriedProgram>,
    /// How the last upgrade went (`zdtctl version`).
    last_upgrade: Option<crate::upgrade::UpgradeRecord>,
    /// The listening control socket, which an upgrade carries.
    control_fd: Option<std::os::fd::RawFd>,
    /// The admin listener and the HAProxy agent port, which an upgrade
    /// carries too.
    admin_fd: Option<std::os::fd::RawFd>,
    agent_fd: Option<std::os::fd::RawFd>,
    /// Deploys in progress (an upgrade waits for them).
    deploys: Arc<std::sync::atomic::AtomicUsize>,
    /// Counts drains and undrains: a drain waiting out `drain_delay`
    /// refuses only if no other came since.
    drains: Arc<std::sync::atomic::AtomicU64>,
    /// Reload the file once started (an upgrade found it changed).
    reload_at_start: bool,
    /// What `/health` on the admin listener reads of the host (the admin
    /// server holds the receivers); published after every change.
    host: tokio::sync::watch::Sender<crate::admin::HostState>,
    /// The program actors' handles, for the admin listener (which holds
    /// the receivers); published after every change, so a removed
    /// program's handle is let go.
    handles: tokio::sync::watch::Sender<Arc<Vec<ProgramHandle>>>,
    /// Stops the admin listener's accepting before an upgrade's exec.
    admin_pause: crate::admin::Pause,
}

/// What the supervisor takes over from an earlier binary (see
/// [`crate::upgrade`]).
#[derive(Default)]
pub struct Resumed {
    /// The programs, with their adopted processes.
    pub programs: Vec<crate::upgrade::CarriedProgram>,
    /// The outcome of the upgrade, for `zdtctl upgrade` to read.
    pub record: Option<crate::upgrade::UpgradeRecord>,
    /// The listening control socket's fd.
    pub control_fd: Option<std::os::fd::RawFd>,
    /// The admin listener's fd, if it runs.
    pub admin_fd: Option<std::os::fd::RawFd>,
    /// The HAProxy agent port's fd, if it runs.
    pub agent_fd: Option<std::os::fd::RawFd>,
    /// The configuration file changed since the previous binary loaded
    /// it: reload once the programs are taken over.
    pub reload: bool,
}

/// A reload's changes all settled: the programs in `reverted` kept the
/// settings they had before (their change failed before it went live).
#[derive(Debug)]
struct Settled {
    reverted: Vec<Reverted>,
}

/// A program whose reload change failed and was undone.
#[derive(Debug)]
struct Reverted {
    name: String,
    /// What the program runs again.
    before: ProgramConfig,
    /// What the failed reload had set (a later reload may have replaced it).
    applied: ProgramConfig,
}

fn op_error(e: OpError) -> ErrorBody {
    let body = ErrorBody::new("failed", e.message);
    match e.log_tail {
        Some(t) if !t.is_empty() => body.with_hint(format!("last output of the worker:\n{t}")),
        _ => body,
    }
}

async fn send(replies: &mpsc::Sender<Reply>, reply: Reply) {
    // The client may be gone; the request was carried out anyway.
    let _ = replies.send(reply).await;
}

fn ok(result: Outcome) -> Reply {
    Reply::Ok { result }
}

fn err(body: ErrorBody) -> Reply {
    Reply::Error { error: body }
}

/// Counts a deploy in progress while it lives.
struct DeployRunning(Arc<std::sync::atomic::AtomicUsize>);

impl DeployRunning {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for DeployRunning {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether `new` differs from `old` in its deploy settings only.
fn only_deploy_changed(old: &ProgramConfig, new: &ProgramConfig) -> bool {
    old.deploy != new.deploy
        && ProgramConfig {
            deploy: new.deploy.clone(),
            ..old.clone()
        } == *new
}

/// `--max-pause` of `pause` and `deploy --pause`: a duration above zero,
/// [`DEFAULT_MAX_PAUSE`] when not given.
fn max_pause_of(given: Option<&str>) -> Result<std::time::Duration, ErrorBody> {
    match given.map(config::parse_duration) {
        None => Ok(DEFAULT_MAX_PAUSE),
        Some(Ok(d)) if !d.is_zero() => Ok(d),
        Some(Ok(_)) => Err(ErrorBody::new(
            "bad_request",
            "--max-pause must be longer than 0s",
        )),
        Some(Err(e)) => Err(ErrorBody::new("bad_request", e)),
    }
}

/// What a deploy task does.
enum DeployOrder {
    /// A new release.
    Deploy(deploy::run::Request),
    /// Back to a release (None: the previous good one).
    Rollback(Option<String>),
}

/// Verb of an order that acts on instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Start,
    Stop,
    Restart,
}

impl Supervisor {
    /// A supervisor for `config`; programs start with [`Supervisor::run`].
    /// `registry` holds the sockets zdt was given (empty otherwise);
    /// `notifier` tells zdt's service manager how it is doing.
    pub fn new(
        config: Config,
        spawner: Spawner,
        registry: listen::Registry,
        notifier: sdnotify::Notifier,
        proxy: crate::proxy::Proxy,
        resumed: Resumed,
    ) -> Self {
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        let (internal_tx, internal_rx) = mpsc::channel(8);
        Self {
            watches: BTreeMap::new(),
            internal_tx,
            internal_rx: Some(internal_rx),
            config,
            programs: BTreeMap::new(),
            spawner,
            registry,
            notifier,
            proxy,
            settled_tx,
            settled_rx: Some(settled_rx),
            carried: resumed
                .programs
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            last_upgrade: resumed.record,
            control_fd: resumed.control_fd,
            admin_fd: resumed.admin_fd,
            agent_fd: resumed.agent_fd,
            deploys: Arc::default(),
            drains: Arc::default(),
            reload_at_start: resumed.reload,
            host: tokio::sync::watch::Sender::new(crate::admin::HostState::default()),
            handles: tokio::sync::watch::Sender::new(Arc::default()),
            admin_pause: crate::admin::Pause::default(),
        }
    }

    /// What the admin listener reads: the host's state, the programs'
    /// handles, and the pause an upgrade uses.
    pub fn admin_view(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<crate::admin::HostState>,
        tokio::sync::watch::Receiver<Arc<Vec<ProgramHandle>>>,
        crate::admin::Pause,
    ) {
        (
            self.host.subscribe(),
            self.handles.subscribe(),
            self.admin_pause.clone(),
        )
    }

    /// Publishes the programs for the admin listener, and which ones
    /// `/health` asks about: those with `listen`.
    fn publish_listening(&self) {
        self.handles.send_if_modified(|h| {
            // A rename keeps the actor (same channel) under a new name.
            let same = h.len() == self.programs.len()
                && h.iter()
                    .zip(self.programs.values())
                    .all(|(a, b)| a.same(&b.handle) && a.name == b.handle.name);
            if !same {
                *h = Arc::new(self.programs.values().map(|e| e.handle.clone()).collect());
            }
            !same
        });
        let listening: Vec<String> = self
            .programs
            .values()
            .filter(|e| !e.config.listen.is_empty())
            .map(|e| e.config.name.clone())
            .collect();
        self.host.send_if_modified(|h| {
            let changed = h.listening != listening || !h.started;
            h.listening = listening;
            h.started = true;
            changed
        });
    }

    /// A control request once zdt is shutting down: what is still stopping
    /// can be watched (status, pid, version); anything else is refused.
    async fn while_stopping(&mut self, req: ControlRequest, shutdown_tx: &mpsc::Sender<()>) {
        match req.command {
            Command::Status { .. } | Command::Pid { .. } | Command::Version => {
                self.on_request(req, shutdown_tx);
            }
            _ => {
                let body = ErrorBody::new("failed", "zdt is shutting down");
                let _ = req.replies.send(err(body)).await;
            }
        }
    }

    /// `drain_delay`: `/health` says 503 already; serve on (status and
    /// version are answered, other requests refused) until the delay ends
    /// or a second stop signal cuts it short.
    async fn drain_delay(
        &mut self,
        requests: &mut mpsc::Receiver<ControlRequest>,
        signals: &mut mpsc::Receiver<DaemonSignal>,
        shutdown_tx: &mpsc::Sender<()>,
    ) {
        let delay = self.config.supervisor.drain_delay;
        if delay.is_zero() {
            return;
        }
        tracing::info!(
            delay = ?delay,
            "health says 503; serving on for drain_delay before the programs stop"
        );
        let end = tokio::time::sleep(delay);
        tokio::pin!(end);
        let mut watchdog = self.notifier.watchdog_timer();
        loop {
            tokio::select! {
                () = &mut end => return,
                () = watchdog.tick() => self.notifier.watchdog(),
                Some(sig) = signals.recv() => if sig == DaemonSignal::Shutdown {
                    tracing::warn!("second stop signal: drain_delay cut short");
                    return;
                },
                Some(req) = requests.recv() => self.while_stopping(req, shutdown_tx).await,
            }
        }
    }

    /// The program's sockets, binding the ones not yet owned.
    fn sockets_for(&self, cfg: &ProgramConfig) -> Sockets {
        self.registry.sockets_for(cfg).map_err(|e| {
            tracing::error!(program = %cfg.name, cause = %e, "cannot bind");
            e.to_string()
        })
    }

    fn add_program(&mut self, cfg: ProgramConfig) {
        let sockets = self.sockets_for(&cfg);
        let handle = spawn_program(
            cfg.clone(),
            sockets,
            self.spawner.clone(),
            self.registry.clone(),
            self.proxy.clone(),
            self.carried.remove(&cfg.name),
        );
        self.programs.insert(
            cfg.name.clone(),
            Entry {
                handle,
                config: cfg,
            },
        );
    }

    /// Runs until shutdown: starts the programs (lowest priority first), then
    /// serves control requests and signals; stops everything (highest priority
    /// first) before it returns.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<ControlRequest>,
        mut signals: mpsc::Receiver<DaemonSignal>,
    ) {
        // A deploy that zdt's end interrupted is reported and undone first,
        // so the programs start on a release that was live before.
        let roots: std::collections::BTreeSet<PathBuf> = self
            .config
            .programs
            .values()
            .filter_map(|p| p.deploy.as_ref().map(|d| d.root.clone()))
            .collect();
        for root in roots {
            if let Some(said) = deploy::Layout::new(&root).recover() {
                tracing::warn!(root = %root.display(), "{said}");
            }
        }
        let mut order: Vec<ProgramConfig> = self.config.programs.values().cloned().collect();
        order.sort_by_key(|p| (p.priority, p.name.clone()));
        for cfg in order {
            self.add_program(cfg);
        }
        self.sync_watches();
        if self.reload_at_start {
            tracing::info!(
                "the configuration file changed since the previous binary loaded it: reloading"
            );
            self.reload_logged();
        }
        self.publish_listening();
        self.notify_ready_when_started();
        self.proxy_ready();
        let mut watchdog = self.notifier.watchdog_timer();
        let mut internal = match self.internal_rx.take() {
            Some(rx) => rx,
            None => mpsc::channel(1).1,
        };
        // Set when a shutdown was asked for through the control socket.
        let (shutdown_tx, mut shutdown_rx) = mpsc::channel::<()>(1);
        let mut settled = match self.settled_rx.take() {
            Some(rx) => rx,
            None => mpsc::unbounded_channel().1,
        };
        loop {
            tokio::select! {
                Some(req) = requests.recv() => match req.command {
                    Command::Upgrade { binary, token } => {
                        self.upgrade(binary.map(PathBuf::from), token, req.replies).await;
                    }
                    _ => self.on_request(req, &shutdown_tx),
                },
                Some(req) = internal.recv() => self.on_request(req, &shutdown_tx),
                Some(s) = settled.recv() => self.on_settled(s),
                () = watchdog.tick() => self.notifier.watchdog(),
                sig = signals.recv() => match sig {
                    Some(DaemonSignal::Reload) => self.reload_logged(),
                    Some(DaemonSignal::Upgrade) => {
                        let (tx, mut rx) = mpsc::channel(8);
                        tokio::spawn(async move {
                            while let Some(r) = rx.recv().await {
                                if let Reply::Error { error } = r {
                                    tracing::error!("upgrade failed: {}", error.message);
                                }
                            }
                        });
                        self.upgrade(None, None, tx).await;
                    }
                    Some(DaemonSignal::Shutdown) | None => break,
                },
                Some(()) = shutdown_rx.recv() => break,
            }
            self.publish_listening();
        }
        // Health first: a load balancer stops sending before anything stops.
        self.host.send_modify(|h| h.shutting_down = true);
        self.notifier.stopping();
        self.drain_delay(&mut requests, &mut signals, &shutdown_tx)
            .await;
        tracing::info!("stopping all programs");
        self.watches.clear();
        let stopping = self.shutdown_all();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                () = &mut stopping => break,
                () = watchdog.tick() => self.notifier.watchdog(),
                sig = signals.recv() => if sig == Some(DaemonSignal::Shutdown) {
                    tracing::warn!("second stop signal: exiting now; workers are killed with zdt");
                    return;
                },
                Some(req) = requests.recv() => self.while_stopping(req, &shutdown_tx).await,
            }
        }
        tracing::info!("all programs stopped");
    }

    /// A reload nobody waits for (SIGHUP, after an upgrade): its outcome
    /// goes to the log.
    fn reload_logged(&mut self) {
        let (tx, mut rx) = mpsc::channel(8);
        self.reload(tx, false, false);
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                match r {
                    Reply::Error { error } => {
                        tracing::error!("reload rejected: {}", error.message);
                    }
                    Reply::Ok { result } => tracing::info!(?result, "reloaded"),
                    _ => {}
                }
            }
        });
    }

    /// `zdtctl upgrade` and SIGUSR2 (see [`crate::upgrade`]): returns only
    /// if the upgrade did not happen, after replying why.
    async fn upgrade(
        &mut self,
        binary: Option<PathBuf>,
        token: Option<String>,
        replies: mpsc::Sender<Reply>,
    ) {
        let begun_ms = crate::state::now_ms();
        let token = token.unwrap_or_else(|| format!("signal-{begun_ms}"));
        let why = match (binary.or_else(crate::upgrade::own_path), self.control_fd) {
            (None, _) => "the path of zdt's binary is unknown; name it with --binary".to_string(),
            (_, None) => "the control socket cannot be carried".to_string(),
            (Some(_), _) if self.deploys.load(std::sync::atomic::Ordering::SeqCst) > 0 => {
                "not now: a deploy is in progress; upgrade when it has finished".to_string()
            }
            (Some(binary), Some(control_fd)) => {
                tracing::info!(binary = %binary.display(), "upgrade asked for");
                crate::upgrade::handover::hand_over(crate::upgrade::handover::HandOver {
                    binary,
                    token: token.clone(),
                    begun_ms,
                    config: &self.config,
                    programs: self
                        .programs
                        .iter()
                        .map(|(n, e)| (n.clone(), e.handle.clone()))
                        .collect(),
                    registry: &self.registry,
                    control_fd,
                    admin_fd: self.admin_fd,
                    agent_fd: self.agent_fd,
                    admin_pause: &self.admin_pause,
                    spawner: &self.spawner,
                    proxy: &self.proxy,
                    notifier: &self.notifier,
                    progress: &replies,
                })
                .await
            }
        };
        tracing::error!("upgrade failed: {why}; the running binary serves on");
        self.last_upgrade = Some(crate::upgrade::UpgradeRecord {
            token,
            ok: false,
            from: env!("CARGO_PKG_VERSION").to_string(),
            to: env!("CARGO_PKG_VERSION").to_string(),
            ms: crate::state::now_ms().saturating_sub(begun_ms),
            error: Some(why.clone()),
        });
        send(&replies, err(ErrorBody::new("failed", why))).await;
    }

    /// Sends `READY=1` to zdt's service manager once every program that
    /// starts by itself (autostart, and deployed if it has a deploy root)
    /// is RUNNING or has failed to start.
    fn notify_ready_when_started(&self) {
        if !self.notifier.enabled() {
            return;
        }
        let starting = self
            .programs
            .values()
            .filter(|e| e.config.autostart)
            .filter(|e| {
                e.config
                    .deploy
                    .as_ref()
                    .is_none_or(|d| deploy::Release::resolve(&d.root).is_some())
            })
            .map(|e| e.handle.watch())
            .collect();
        let all = self.programs.values().map(|e| e.handle.watch()).collect();
        tokio::spawn(sdnotify::ready_when_started(
            self.notifier.clone(),
            starting,
            all,
        ));
    }

    /// Once every program has published its routes (after an upgrade: with
    /// the processes it adopted) and the proxy has them, the proxy process a
    /// previous binary left is retired, within the longest `max_wait`.
    fn proxy_ready(&self) {
        let handles: Vec<ProgramHandle> =
            self.programs.values().map(|e| e.handle.clone()).collect();
        let deadline = self
            .config
            .programs
            .values()
            .filter(|p| p.mode == config::Mode::Proxy)
            .map(|p| p.max_wait)
            .max()
            .unwrap_or(crate::proxy::RETIRE_DEADLINE);
        let proxy = self.proxy.clone();
        tokio::spawn(async move {
            let settled = handles
                .iter()
                .map(|h| h.call(|reply| ProgramMsg::Settled { reply }));
            futures_util::future::join_all(settled).await;
            proxy.ready(deadline).await;
        });
    }

    /// The `STATUS=` line for zdt's service manager.
    fn status_line(&self) -> String {
        let snaps: Vec<_> = self
            .programs
            .values()
            .map(|e| e.handle.snapshot())
            .collect();
        sdnotify::summary(&snaps)
    }

    /// Stops every program, highest priority first, each priority level
    /// waiting for the one before it.
    fn shutdown_all(&mut self) -> impl std::future::Future<Output = ()> {
        let mut levels: BTreeMap<i32, Vec<ProgramHandle>> = BTreeMap::new();
        for e in self.programs.values() {
            levels
                .entry(e.config.priority)
                .or_default()
                .push(e.handle.clone());
        }
        async move {
            for (_, handles) in levels.into_iter().rev() {
                let waits: Vec<_> = handles
                    .iter()
                    .map(|h| h.call(|reply| ProgramMsg::Shutdown { reply }))
                    .collect();
                futures_util::future::join_all(waits).await;
            }
        }
    }

    fn resolve(&self, target: &str) -> Result<Vec<Resolved>, ErrorBody> {
        target::resolve(target, &self.programs, &self.config.groups).map_err(|e| {
            ErrorBody::new("unknown_program", e.message)
                .with_hint("`zdtctl status` lists the programs")
        })
    }

    fn on_request(&mut self, req: ControlRequest, shutdown: &mpsc::Sender<()>) {
        let replies = req.replies;
        let reply_now = |r: Reply| {
            let replies = replies.clone();
            tokio::spawn(async move { send(&replies, r).await });
        };
        match req.command {
            Command::Status { target } => {
                let resolved = match target.as_deref() {
                    None => Ok(self.resolve("all").unwrap_or_default()),
                    Some(t) => self.resolve(t),
                };
                let list = match resolved {
                    Ok(list) => list,
                    Err(e) => return reply_now(err(e)),
                };
                // Each with its deploy watch; the request counters are read
                // from the proxy as the reply is made.
                let programs: Vec<_> = list
                    .iter()
                    .filter_map(|r| self.programs.get(&r.program))
                    .map(|e| {
                        let watch = e
                            .config
                            .deploy
                            .as_ref()
                            .and_then(|d| self.watches.get(&d.root))
                            .map(|w| w.state.borrow().clone());
                        (e.handle.clone(), watch)
                    })
                    .collect();
                tokio::spawn(async move {
                    let snaps = programs.into_iter().map(|(h, watch)| async move {
                        let mut snap = h.status().await;
                        snap.deploy_watch = watch;
                        snap
                    });
                    let programs = futures_util::future::join_all(snaps).await;
                    send(&replies, ok(Outcome::Status { programs })).await;
                });
            }
            Command::Pid { target } => reply_now(match self.resolve(&target) {
                Ok(list) => ok(Outcome::Pids {
                    pids: self.pids(&list),
                }),
                Err(e) => err(e),
            }),
            Command::Version => reply_now(ok(Outcome::Version {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                upgrade: self.last_upgrade.clone(),
                proxy_pid: self.proxy.remote().and_then(|c| c.pid()),
            })),
            // Taken in the loop (it waits for the upgrade).
            Command::Upgrade { .. } => reply_now(err(ErrorBody::new(
                "failed",
                "an upgrade cannot be asked for from here",
            ))),
            Command::Shutdown => {
                reply_now(ok(Outcome::ShuttingDown));
                let _ = shutdown.try_send(());
            }
            Command::Reload {
                allow_empty,
                dry_run,
            } => self.reload(replies, allow_empty, dry_run),
            Command::Deploy {
                target,
                from,
                base,
                pause,
                max_pause,
                canary,
            } => {
                let base = base.map_or_else(|| PathBuf::from("/"), PathBuf::from);
                let pause = match (pause, max_pause) {
                    (false, None) => None,
                    (false, Some(_)) => {
                        return reply_now(err(ErrorBody::new(
                            "bad_request",
                            "--max-pause needs --pause",
                        )))
                    }
                    (true, max) => match max_pause_of(max.as_deref()) {
                        Ok(d) => Some(d),
                        Err(e) => return reply_now(err(e)),
                    },
                };
                let req = deploy::run::Request {
                    from,
                    base,
                    pause,
                    canary,
                };
                self.deploy(&target, DeployOrder::Deploy(req), replies);
            }
            Command::Rollback { target, release } => {
                // A running canary is ended first; else it is a release's.
                let canary_runs = self.resolve(&target).is_ok_and(|list| {
                    list.iter()
                        .filter_map(|r| self.programs.get(&r.program))
                        .any(|e| e.handle.snapshot().canary.is_some())
                });
                let has_root = self
                    .programs
                    .get(&target)
                    .is_some_and(|e| e.config.deploy.is_some());
                if canary_runs && release.is_none() {
                    self.end_canary(&target, replies);
                } else if !has_root && release.is_none() && self.programs.contains_key(&target) {
                    reply_now(err(ErrorBody::new(
                        "failed",
                        format!("no canary running for {target}, and it has no deploy root to roll back in"),
                    )
                    .with_hint(format!("`zdtctl restart {target} --canary PERCENT` starts a canary"))));
                } else {
                    self.deploy(&target, DeployOrder::Rollback(release), replies);
                }
            }
            Command::Releases { target } => reply_now(match self.deploy_group(&target) {
                Ok(group) => ok(Outcome::Releases {
                    root: group.config.root.display().to_string(),
                    releases: deploy::run::list(&group.config),
                }),
                Err(e) => err(e),
            }),
            Command::Drain { target } => self.drain(&target, true, replies),
            Command::Undrain { target } => self.drain(&target, false, replies),
            Command::Pause { target, max_pause } => {
                let max = match max_pause_of(max_pause.as_deref()) {
                    Ok(d) => d,
                    Err(e) => return reply_now(err(e)),
                };
                let message = format!(
                    "{target}: paused; no request in flight; new requests are held until `zdtctl resume {target}` (each at most {max:?}, then 503)"
                );
                self.hold("pause", &target, message, replies, move |reply| {
                    ProgramMsg::Pause {
                        max_pause: max,
                        reply,
                    }
                });
            }
            Command::Maintenance { target, message } => {
                let done = format!(
                    "{target}: in maintenance; new requests get 503 until `zdtctl resume {target}`"
                );
                self.hold("maintenance", &target, done, replies, move |reply| {
                    ProgramMsg::Maintenance {
                        message: message.clone(),
                        reply,
                    }
                });
            }
            Command::Resume { target } => {
                let done = format!("{target}: resumed");
                self.hold("resume", &target, done, replies, |reply| {
                    ProgramMsg::Resume { reply }
                });
            }
            Command::Start { target } => self.act(Verb::Start, &target, false, replies),
            Command::Stop { target } => self.act(Verb::Stop, &target, false, replies),
            Command::Restart {
                target,
                no_wait,
                canary: None,
            } => self.act(Verb::Restart, &target, no_wait, replies),
            Command::Restart {
                target,
                canary: Some(percent),
                ..
            } => self.canary(&target, Some(percent), replies),
            Command::Promote { target } => self.canary(&target, None, replies),
            Command::Scale { target, instances } => match self.scale(&target, instances) {
                Ok(call) => {
                    tokio::spawn(finish_calls(
                        vec![(0, call)],
                        format!("{target} scaled to {instances}"),
                        replies,
                    ));
                }
                Err(e) => reply_now(err(e)),
            },
            Command::Signal { target, signal } => {
                let sig = match config::parse_signal(&signal) {
                    Ok(s) => s,
                    Err(e) => return reply_now(err(ErrorBody::new("bad_request", e))),
                };
                match self.resolve(&target) {
                    Ok(list) => {
                        let calls = self.calls(&list, move |instance, reply| ProgramMsg::Signal {
                            instance,
                            signal: sig,
                            reply,
                        });
                        tokio::spawn(finish_calls(
                            calls,
                            format!(
                                "sent SIG{} to {target}",
                                sig.as_str().trim_start_matches("SIG")
                            ),
                            replies,
                        ));
                    }
                    Err(e) => reply_now(err(e)),
                }
            }
            Command::Tail {
                target,
                stderr,
                follow,
                bytes,
                lines,
            } => match self.resolve(&target) {
                Ok(list) if list.len() == 1 => {
                    // In bounds: the guard above says there is exactly one.
                    let r = &list[0];
                    if let Some(e) = self.programs.get(&r.program) {
                        tokio::spawn(tail(
                            e.handle.clone(),
                            r.instance.unwrap_or(0),
                            stderr,
                            follow,
                            match lines {
                                Some(n) => History::Lines(n),
                                None => History::Bytes(bytes.unwrap_or(1600)),
                            },
                            replies,
                        ));
                    }
                }
                Ok(list) => reply_now(err(ErrorBody::new(
                    "bad_request",
                    format!(
                        "tail needs one program, {target:?} matches {}",
                        list.iter()
                            .map(|r| r.program.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))),
                Err(e) => reply_now(err(e)),
            },
        }
    }

    /// Starts, keeps or stops deploy watches to match the programs' deploy
    /// settings (at start and after a reload).
    fn sync_watches(&mut self) {
        let mut wanted: BTreeMap<PathBuf, (String, config::DeployConfig)> = BTreeMap::new();
        for e in self.programs.values() {
            if let Some(d) = e.config.deploy.as_ref().filter(|d| d.watch.is_some()) {
                wanted
                    .entry(d.root.clone())
                    .or_insert_with(|| (e.config.name.clone(), d.clone()));
            }
        }
        self.watches.retain(|root, w| {
            wanted
                .get(root)
                .is_some_and(|(_, d)| d.watch.as_ref() == Some(&w.watch))
        });
        for (root, (target, d)) in wanted {
            if self.watches.contains_key(&root) {
                continue;
            }
            if let Some(w) =
                deploy::watch::start(target, &d, self.spawner.clone(), self.internal_tx.clone())
            {
                self.watches.insert(root, w);
            }
        }
    }

    /// The one program `target` names (no instance, no glob matching
    /// several); the refusal says what `what` needs.
    fn one_program(&self, target: &str, what: &str) -> Result<String, ErrorBody> {
        match self.resolve(target)?.as_slice() {
            [one] if one.instance.is_none() => Ok(one.program.clone()),
            _ => Err(ErrorBody::new(
                "bad_request",
                format!("{what} on one program; {target:?} is not one program name"),
            )),
        }
    }

    /// The programs sharing the deploy root of `target` (one program).
    fn deploy_group(&self, target: &str) -> Result<deploy::run::Group, ErrorBody> {
        let name = self.one_program(target, "deploys act")?;
        let config = self
            .programs
            .get(&name)
            .and_then(|e| e.config.deploy.clone())
            .ok_or_else(|| {
                ErrorBody::new("bad_request", format!("program {name:?} has no deploy root"))
                    .with_hint(format!(
                        "add [program.{name}.deploy] with root = \"/srv/{name}\" to the config, then `zdtctl reload`"
                    ))
            })?;
        let mut members: Vec<deploy::run::Member> = self
            .programs
            .values()
            .filter(|e| {
                e.config
                    .deploy
                    .as_ref()
                    .is_some_and(|d| d.root == config.root)
            })
            .map(|e| deploy::run::Member {
                handle: e.handle.clone(),
                config: e.config.clone(),
            })
            .collect();
        members.sort_by(|a, b| {
            (a.config.priority, &a.config.name).cmp(&(b.config.priority, &b.config.name))
        });
        Ok(deploy::run::Group { config, members })
    }

    /// `deploy` and `rollback`: run in a task of their own; the reply comes
    /// when the new release serves (or nothing changed).
    fn deploy(&self, target: &str, order: DeployOrder, replies: mpsc::Sender<Reply>) {
        let group = match self.deploy_group(target) {
            Ok(g) => g,
            Err(e) => {
                tokio::spawn(async move { send(&replies, err(e)).await });
                return;
            }
        };
        let spawner = self.spawner.clone();
        let running = DeployRunning::new(&self.deploys);
        tokio::spawn(async move {
            let _running = running;
            let handles: Vec<ProgramHandle> =
                group.members.iter().map(|m| m.handle.clone()).collect();
            let mut out = deploy::run::Progress::new(Some(replies.clone()));
            let result = match order {
                DeployOrder::Deploy(req) => {
                    deploy::run::deploy(group, spawner, req, &mut out).await
                }
                DeployOrder::Rollback(to) => deploy::run::rollback(group, to, &mut out).await,
            };
            let reply = match result {
                Ok(message) => {
                    let mut reply = ok(Outcome::Done {
                        message,
                        instances: handles
                            .iter()
                            .flat_map(|h| h.snapshot().instances)
                            .collect(),
                        warnings: Vec::new(),
                    });
                    add_drain_warnings(&mut reply, &handles);
                    reply
                }
                Err(e) => err(e),
            };
            send(&replies, reply).await;
        });
    }

    /// `restart --canary percent` (Some) or `promote` (None): waits until
    /// the canary serves, or until the old generation is gone.
    fn canary(&self, target: &str, percent: Option<u8>, replies: mpsc::Sender<Reply>) {
        let list = match self.resolve(target) {
            Ok(l) => l,
            Err(e) => {
                tokio::spawn(async move { send(&replies, err(e)).await });
                return;
            }
        };
        let list = if percent.is_none() {
            self.with_canary_groups(list)
        } else {
            list
        };
        let progress = replies.clone();
        let mut calls = self.calls(&list, move |instance, reply| match percent {
            Some(p) => ProgramMsg::Restart {
                instance,
                canary: Some(p),
                progress: Some(progress.clone()),
                reply,
            },
            None => ProgramMsg::Promote {
                progress: Some(progress.clone()),
                reply,
            },
        });
        calls.sort_by_key(|(p, _)| *p);
        let handles: Vec<ProgramHandle> = calls.iter().map(|(_, c)| c.handle.clone()).collect();
        let groups = if percent.is_none() {
            self.canary_groups(&list)
        } else {
            Vec::new()
        };
        tokio::spawn(async move {
            let results = run_levels(calls).await;
            let ok_all = results.iter().all(|(_, r)| matches!(r, Some(Ok(_))));
            let mut finished = Vec::new();
            if ok_all {
                let mut out = deploy::run::Progress::new(Some(replies.clone()));
                for g in &groups {
                    finished.extend(deploy::run::finish_canary(g, true, &mut out).await);
                }
            }
            let message = match percent {
                Some(_) => handles
                    .iter()
                    .filter_map(|h| h.snapshot().canary.map(|c| canary_line(&h.name, &c)))
                    .collect::<Vec<_>>()
                    .join("\n"),
                None => handles
                    .iter()
                    .map(|h| {
                        format!(
                            "promoted {}: gen {} serves all traffic; the old generation is gone",
                            h.name,
                            h.snapshot().generation
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            let message = std::iter::once(message)
                .chain(finished)
                .collect::<Vec<_>>()
                .join("\n");
            let mut reply = collect(results, message);
            add_drain_warnings(&mut reply, &handles);
            send(&replies, reply).await;
        });
    }

    /// The deploy groups of `list` whose canary a deploy started; their
    /// other programs are part of that canary too.
    fn canary_groups(&self, list: &[Resolved]) -> Vec<deploy::run::Group> {
        let mut roots: Vec<PathBuf> = Vec::new();
        let mut groups = Vec::new();
        for r in list {
            let Some(d) = self
                .programs
                .get(&r.program)
                .and_then(|e| e.config.deploy.as_ref())
            else {
                continue;
            };
            if roots.contains(&d.root) || deploy::Layout::new(&d.root).canary().is_none() {
                continue;
            }
            roots.push(d.root.clone());
            if let Ok(g) = self.deploy_group(&r.program) {
                groups.push(g);
            }
        }
        groups
    }

    /// `list` and the other programs of the deploy canaries it touches.
    fn with_canary_groups(&self, list: Vec<Resolved>) -> Vec<Resolved> {
        let mut all = list.clone();
        for g in self.canary_groups(&list) {
            for m in g.members {
                if !all.iter().any(|r| r.program == m.config.name) {
                    all.push(Resolved {
                        program: m.config.name.clone(),
                        instance: None,
                    });
                }
            }
        }
        all
    }

    /// `rollback` of a canary: waits until the canary's generation is gone.
    fn end_canary(&self, target: &str, replies: mpsc::Sender<Reply>) {
        let list = match self.resolve(target) {
            Ok(l) => l,
            Err(e) => {
                tokio::spawn(async move { send(&replies, err(e)).await });
                return;
            }
        };
        let list = self.with_canary_groups(list);
        let progress = replies.clone();
        let mut calls = self.calls(&list, move |_, reply| ProgramMsg::EndCanary {
            progress: Some(progress.clone()),
            reply,
        });
        calls.sort_by_key(|(p, _)| *p);
        let handles: Vec<ProgramHandle> = calls.iter().map(|(_, c)| c.handle.clone()).collect();
        let message = format!("rolled back the canary of {target}: the previous generation serves all traffic; the canary is gone");
        let groups = self.canary_groups(&list);
        tokio::spawn(async move {
            let results = run_levels(calls).await;
            let mut message = message;
            if results.iter().all(|(_, r)| matches!(r, Some(Ok(_)))) {
                let mut out = deploy::run::Progress::new(Some(replies.clone()));
                for g in &groups {
                    if let Some(said) = deploy::run::finish_canary(g, false, &mut out).await {
                        message = format!("{message}\n{said}");
                    }
                }
            }
            let mut reply = collect(results, message);
            add_drain_warnings(&mut reply, &handles);
            send(&replies, reply).await;
        });
    }

    /// Proxy programs: start or end answering new requests 503.
    /// `drain` and `undrain`. With `drain_delay`, a drain first turns
    /// `/health` to 503 while the programs serve on, then refuses new
    /// requests once the delay passed (a load balancer checking health
    /// has moved the traffic by then); the reply comes when they refuse.
    /// An undrain (or another drain) during the delay cancels the rest.
    fn drain(&self, target: &str, on: bool, replies: mpsc::Sender<Reply>) {
        let list = match self.resolve(target) {
            Ok(list) => list,
            Err(e) => {
                tokio::spawn(async move { send(&replies, err(e)).await });
                return;
            }
        };
        let epoch = self
            .drains
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let delay = self.config.supervisor.drain_delay;
        let verb = if on { "draining" } else { "no longer draining" };
        let message = format!("{target}: {verb}");
        if !on || delay.is_zero() {
            let calls = self.calls(&list, move |_, reply| ProgramMsg::Drain {
                on,
                refuse: true,
                reply,
            });
            tokio::spawn(finish_calls(calls, message, replies));
            return;
        }
        let announce = self.calls(&list, move |_, reply| ProgramMsg::Drain {
            on: true,
            refuse: false,
            reply,
        });
        let refuse = self.calls(&list, move |_, reply| ProgramMsg::Drain {
            on: true,
            refuse: true,
            reply,
        });
        let drains = self.drains.clone();
        let target = target.to_string();
        tokio::spawn(async move {
            let results = run_levels(announce).await;
            if results.iter().any(|(_, r)| !matches!(r, Some(Ok(_)))) {
                send(&replies, collect(results, message)).await;
                return;
            }
            send(
                &replies,
                Reply::Progress {
                    message: format!(
                        "{target}: health says 503; new requests are served for drain_delay ({delay:?}), then refused"
                    ),
                },
            )
            .await;
            tokio::time::sleep(delay).await;
            if drains.load(std::sync::atomic::Ordering::SeqCst) != epoch {
                let e = ErrorBody::new(
                    "failed",
                    format!("{target}: the drain was ended or replaced during drain_delay"),
                );
                send(&replies, err(e)).await;
                return;
            }
            finish_calls(refuse, message, replies).await;
        });
    }

    /// Pause, maintenance, resume: proxy-mode programs only. A target that
    /// names a pass-mode program is refused whole, before anything changed.
    fn hold<F>(
        &self,
        verb: &str,
        target: &str,
        message: String,
        replies: mpsc::Sender<Reply>,
        make: F,
    ) where
        F: Fn(oneshot::Sender<OpResult>) -> ProgramMsg + Clone + Send + 'static,
    {
        let refuse = |body: ErrorBody| {
            let replies = replies.clone();
            tokio::spawn(async move { send(&replies, err(body)).await });
        };
        let list = match self.resolve(target) {
            Ok(l) => l,
            Err(e) => return refuse(e),
        };
        let (proxied, passed): (Vec<&Entry>, Vec<&Entry>) = list
            .iter()
            .filter_map(|r| self.programs.get(&r.program))
            .partition(|e| e.config.mode == config::Mode::Proxy);
        if !passed.is_empty() {
            let names = |v: &[&Entry]| {
                v.iter()
                    .map(|e| e.config.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut body = ErrorBody::new(
                "bad_request",
                format!(
                    "{verb} needs mode = \"proxy\": in pass mode the app accepts connections itself ({} in pass mode); nothing was changed",
                    names(&passed)
                ),
            );
            if !proxied.is_empty() {
                body = body.with_hint(format!(
                    "name the proxy-mode programs instead: zdtctl {verb} {}",
                    names(&proxied).replace(", ", " ")
                ));
            }
            return refuse(body);
        }
        let calls = self.calls(&list, move |_, reply| make(reply));
        tokio::spawn(finish_calls(calls, message, replies));
    }

    fn pids(&self, list: &[Resolved]) -> Vec<PidEntry> {
        list.iter()
            .filter_map(|r| {
                self.programs
                    .get(&r.program)
                    .map(|e| (r, e.handle.snapshot()))
            })
            .flat_map(|(r, snap)| {
                snap.instances
                    .into_iter()
                    .filter(move |i| r.instance.is_none_or(|n| n == i.instance))
            })
            .filter_map(|i| {
                i.pid.map(|pid| PidEntry {
                    program: i.program,
                    instance: i.instance,
                    generation: i.generation,
                    pid,
                })
            })
            .collect()
    }

    /// One call per resolved target, with the program's priority.
    fn calls<F>(&self, list: &[Resolved], make: F) -> Vec<(i32, Call)>
    where
        F: Fn(Option<u32>, oneshot::Sender<OpResult>) -> ProgramMsg + Clone + Send + 'static,
    {
        list.iter()
            .filter_map(|r| self.programs.get(&r.program))
            .zip(list.iter())
            .map(|(e, r)| {
                let make = make.clone();
                let instance = r.instance;
                (
                    e.config.priority,
                    Call {
                        handle: e.handle.clone(),
                        make: Box::new(move |reply| make(instance, reply)),
                    },
                )
            })
            .collect()
    }

    fn act(&mut self, verb: Verb, target: &str, no_wait: bool, replies: mpsc::Sender<Reply>) {
        let list = match self.resolve(target) {
            Ok(l) => l,
            Err(e) => {
                tokio::spawn(async move { send(&replies, err(e)).await });
                return;
            }
        };
        let progress = (!no_wait).then(|| replies.clone());
        let mut calls = self.calls(&list, move |instance, reply| match verb {
            Verb::Start => ProgramMsg::Start { instance, reply },
            Verb::Stop => ProgramMsg::Stop { instance, reply },
            Verb::Restart => ProgramMsg::Restart {
                instance,
                canary: None,
                progress: progress.clone(),
                reply,
            },
        });
        // Start in priority order; stop in reverse.
        calls.sort_by_key(|(p, _)| *p);
        if verb == Verb::Stop {
            calls.reverse();
        }
        let past = match verb {
            Verb::Start => "started",
            Verb::Stop => "stopped",
            Verb::Restart => "restarted",
        };
        let message = format!("{past} {target}");
        let target = target.to_string();
        let handles: Vec<ProgramHandle> = calls.iter().map(|(_, c)| c.handle.clone()).collect();
        if no_wait {
            tokio::spawn(run_levels(calls));
            tokio::spawn(async move {
                send(
                    &replies,
                    ok(Outcome::Done {
                        message: format!("{target}: {verb:?} requested (not waiting)")
                            .to_lowercase(),
                        instances: Vec::new(),
                        warnings: Vec::new(),
                    }),
                )
                .await
            });
        } else {
            tokio::spawn(async move {
                let results = run_levels(calls).await;
                let mut reply = collect(results, message);
                if verb == Verb::Restart {
                    add_drain_warnings(&mut reply, &handles);
                }
                send(&replies, reply).await;
            });
        }
    }

    /// Reads the config file again and applies the difference, or rejects the
    /// whole file and changes nothing: a file that does not parse, one with
    /// no programs (unless `allow_empty`), one naming an address that cannot
    /// be bound. A changed program whose new generation fails keeps its
    /// previous settings (see [`Supervisor::on_settled`]).
    fn reload(&mut self, replies: mpsc::Sender<Reply>, allow_empty: bool, dry_run: bool) {
        if !dry_run {
            self.notifier.reloading();
        }
        let status = self.status_line();
        let notifier = self.notifier.clone();
        let reject = |body: ErrorBody| {
            // Nothing changed: zdt is as ready as before.
            notifier.ready(&status);
            let replies = replies.clone();
            tokio::spawn(async move { send(&replies, err(body)).await });
        };
        let path: PathBuf = self.config.file.clone();
        let new = match config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                return reject(ErrorBody::new("config", e.to_string()).with_hint(format!(
                    "nothing was changed; fix the file and reload again\n{}",
                    e.render()
                )));
            }
        };
        if new.programs.is_empty() && !self.programs.is_empty() && !allow_empty {
            return reject(
                ErrorBody::new(
                    "config",
                    format!(
                        "{} has no programs: reloading it would stop all {} running program(s); nothing was changed",
                        path.display(),
                        self.programs.len()
                    ),
                )
                .with_hint("if that is what you want, run `zdtctl reload --allow-empty`"),
            );
        }
        // A program with a canary running keeps its settings until the
        // canary ends: the whole reload waits for that (nothing changes).
        let canaries: Vec<String> = self
            .programs
            .iter()
            .filter(|(name, e)| {
                new.programs.get(*name) != Some(&e.config) && e.handle.snapshot().canary.is_some()
            })
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(first) = canaries.first() {
            return reject(
                ErrorBody::new(
                    "failed",
                    format!(
                        "reload rejected: it changes or removes {}, where a canary is running; nothing was changed",
                        canaries.join(", ")
                    ),
                )
                .with_hint(format!("promote the canary (zdtctl promote {first}) or roll it back (zdtctl rollback {first}), then reload")),
            );
        }
        if dry_run {
            let diff = self.reload_diff(&new);
            tokio::spawn(async move { send(&replies, ok(diff)).await });
            return;
        }
        // Bind what this reload adds or changes; a program left as it is
        // keeps its own bind retry and does not block the others.
        let touched = new
            .programs
            .values()
            .filter(|p| self.programs.get(&p.name).is_none_or(|e| e.config != **p));
        if let Err(errors) = self.registry.bind_all(touched) {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return reject(
                ErrorBody::new(
                    "failed",
                    format!("reload rejected: {}; nothing was changed", list.join("; ")),
                )
                .with_hint("free the address or choose another one, then reload again"),
            );
        }
        if new.supervisor != self.config.supervisor {
            tracing::warn!("[supervisor] settings changed; they take effect when zdt restarts");
        }
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        let mut unchanged = Vec::new();
        // (name, (settings before, settings applied) for a change, reply)
        type Wait = (
            String,
            Option<(ProgramConfig, ProgramConfig)>,
            oneshot::Receiver<OpResult>,
        );
        let mut waits: Vec<Wait> = Vec::new();
        let old_names: Vec<String> = self.programs.keys().cloned().collect();
        let mut renamed = Vec::new();
        for name in old_names {
            if let Some(to) = self.rename_target(&name, &new, &renamed) {
                // Same sockets under a new name: the program goes on (its
                // clients, routes and counters with it) and is changed below.
                if let Some(mut e) = self.programs.remove(&name) {
                    tracing::info!(from = %name, %to, "reload: program renamed on the same sockets");
                    e.handle.name.clone_from(&to);
                    self.programs.insert(to.clone(), e);
                }
                removed.push(format!("{name} (renamed {to})"));
                renamed.push(to);
                continue;
            }
            if !new.programs.contains_key(&name) {
                if let Some(e) = self.programs.remove(&name) {
                    let (tx, rx) = oneshot::channel();
                    let h = e.handle.clone();
                    tokio::spawn(async move {
                        let _ = h.tx_send(ProgramMsg::Shutdown { reply: tx }).await;
                    });
                    waits.push((name.clone(), None, rx));
                }
                removed.push(name);
            }
        }
        let mut order: Vec<&ProgramConfig> = new.programs.values().collect();
        order.sort_by_key(|p| (p.priority, p.name.clone()));
        for cfg in order {
            match self.programs.get(&cfg.name) {
                None => {
                    self.add_program(cfg.clone());
                    added.push(cfg.name.clone());
                }
                Some(e) if only_deploy_changed(&e.config, cfg) => {
                    // New deploy settings (a watch, hooks) need no restart.
                    let h = e.handle.clone();
                    let deploy = cfg.deploy.clone();
                    tokio::spawn(async move { h.tx_send(ProgramMsg::SetDeploy { deploy }).await });
                    if let Some(e) = self.programs.get_mut(&cfg.name) {
                        e.config = cfg.clone();
                    }
                    unchanged.push(cfg.name.clone());
                }
                Some(e) if e.config != *cfg => {
                    let h = e.handle.clone();
                    let before = e.config.clone();
                    let sockets = self.sockets_for(cfg);
                    if let Some(e) = self.programs.get_mut(&cfg.name) {
                        e.config = cfg.clone();
                    }
                    let (tx, rx) = oneshot::channel();
                    let boxed = Box::new(cfg.clone());
                    tokio::spawn(async move {
                        let _ = h
                            .tx_send(ProgramMsg::Reconfigure {
                                config: boxed,
                                sockets,
                                reply: tx,
                            })
                            .await;
                    });
                    waits.push((cfg.name.clone(), Some((before, cfg.clone())), rx));
                    changed.push(cfg.name.clone());
                }
                Some(_) => unchanged.push(cfg.name.clone()),
            }
        }
        self.config = new;
        self.sync_watches();
        tracing::info!(?added, ?removed, ?changed, "configuration reloaded");
        let settled = self.settled_tx.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut reverted = Vec::new();
            for (name, change, rx) in waits {
                if let Ok(Err(e)) = rx.await {
                    failures.push(format!("{name}: {}", e.message));
                    if let (true, Some((before, applied))) = (e.kept_previous_config, change) {
                        reverted.push(Reverted {
                            name,
                            before,
                            applied,
                        });
                    }
                }
            }
            let _ = settled.send(Settled { reverted });
            let reply = if failures.is_empty() {
                ok(Outcome::Reloaded {
                    added,
                    removed,
                    changed,
                    unchanged,
                    dry_run: false,
                })
            } else {
                err(ErrorBody::new(
                    "failed",
                    format!("reloaded, but: {}", failures.join("; ")),
                ))
            };
            send(&replies, reply).await;
        });
    }

    /// What a reload to `new` would do, as `reload` reports it, with
    /// nothing changed (`zdtctl reload --dry-run`).
    fn reload_diff(&self, new: &Config) -> Outcome {
        let (mut added, mut removed, mut changed, mut unchanged) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut renamed: Vec<String> = Vec::new();
        for name in self.programs.keys() {
            if let Some(to) = self.rename_target(name, new, &renamed) {
                removed.push(format!("{name} (renamed {to})"));
                changed.push(to.clone());
                renamed.push(to);
            } else if !new.programs.contains_key(name) {
                removed.push(name.clone());
            }
        }
        for cfg in new.programs.values() {
            match self.programs.get(&cfg.name) {
                None if renamed.contains(&cfg.name) => {}
                None => added.push(cfg.name.clone()),
                Some(e) if e.config != *cfg && !only_deploy_changed(&e.config, cfg) => {
                    changed.push(cfg.name.clone());
                }
                Some(_) => unchanged.push(cfg.name.clone()),
            }
        }
        Outcome::Reloaded {
            added,
            removed,
            changed,
            unchanged,
            dry_run: true,
        }
    }

    /// `zdtctl scale`: the program's settings with the new count, applied as
    /// a reload of that one change would apply it (the actor adds or
    /// removes instances and leaves the others alone).
    fn scale(&mut self, target: &str, instances: u32) -> Result<Call, ErrorBody> {
        let name = self.one_program(target, "scale acts")?;
        if !(1..=config::MAX_INSTANCES).contains(&instances) {
            return Err(ErrorBody::new(
                "bad_request",
                format!(
                    "scale {name} {instances}: use 1 to {}",
                    config::MAX_INSTANCES
                ),
            ));
        }
        let Some(e) = self.programs.get(&name) else {
            return Err(ErrorBody::new(
                "unknown_program",
                format!("unknown program {name:?}"),
            ));
        };
        if e.handle.snapshot().canary.is_some() {
            return Err(ErrorBody::new(
                "busy",
                format!("a canary of {name} is running: promote or roll it back first"),
            ));
        }
        let mut cfg = e.config.clone();
        cfg.instances = instances;
        let sockets = self.sockets_for(&cfg);
        let handle = e.handle.clone();
        if let Some(e) = self.programs.get_mut(&name) {
            e.config = cfg.clone();
        }
        self.config.programs.insert(name, cfg.clone());
        Ok(Call {
            handle,
            make: Box::new(move |reply| ProgramMsg::Reconfigure {
                config: Box::new(cfg),
                sockets,
                reply,
            }),
        })
    }

    /// The program of `new` that `name` (absent from `new`) becomes: a new
    /// program that listens on exactly the same addresses (a rename; treated
    /// as a change, so connections and requests on those sockets are not cut).
    fn rename_target(&self, name: &str, new: &Config, taken: &[String]) -> Option<String> {
        if new.programs.contains_key(name) {
            return None;
        }
        let old = &self.programs.get(name)?.config;
        if old.listen.is_empty() {
            return None;
        }
        new.programs
            .values()
            .find(|p| {
                !self.programs.contains_key(&p.name)
                    && !taken.contains(&p.name)
                    && p.listen == old.listen
            })
            .map(|p| p.name.clone())
    }

    /// A reload settled: programs whose change failed keep their previous
    /// settings as their config (so the next reload of the same file tries
    /// the change again), and sockets no program names any more are closed.
    fn on_settled(&mut self, settled: Settled) {
        self.notifier.ready(&self.status_line());
        for r in settled.reverted {
            match self.programs.get_mut(&r.name) {
                // Unless a later reload replaced the failed settings meanwhile
                // (the program applies that one after the failure).
                Some(e) if e.config == r.applied => {
                    tracing::warn!(program = %r.name, "reload: the change failed; the previous settings stay in force");
                    e.config = r.before.clone();
                    self.config.programs.insert(r.name, r.before);
                }
                _ => {}
            }
        }
        let wanted: Vec<config::ListenAddr> = self
            .programs
            .values()
            .flat_map(|e| e.config.listen.iter().cloned())
            .collect();
        self.registry.retain(|addr| wanted.contains(addr));
    }
}

/// One order for one program, waiting to be sent.
struct Call {
    handle: ProgramHandle,
    make: Box<dyn FnOnce(oneshot::Sender<OpResult>) -> ProgramMsg + Send>,
}

/// Sends calls level by level (same priority together, in the given order of
/// levels), waiting for each level to finish before the next.
async fn run_levels(calls: Vec<(i32, Call)>) -> Vec<(String, Option<OpResult>)> {
    let mut results = Vec::new();
    let mut iter = calls.into_iter().peekable();
    while let Some((prio, first)) = iter.next() {
        let mut level = vec![first];
        while let Some((_, c)) = iter.next_if(|(p, _)| *p == prio) {
            level.push(c);
        }
        let futs = level.into_iter().map(|c| async move {
            let name = c.handle.name.clone();
            (name, c.handle.call(c.make).await)
        });
        results.extend(futures_util::future::join_all(futs).await);
    }
    results
}

async fn finish_calls(calls: Vec<(i32, Call)>, message: String, replies: mpsc::Sender<Reply>) {
    let results = run_levels(calls).await;
    send(&replies, collect(results, message)).await;
}

/// A restart's verdict names every old generation that did not drain in
/// time (SIGKILLed at max_wait, requests cut) and every socket nobody
/// accepts on: the restart succeeded, but a script should be able to tell.
fn add_drain_warnings(reply: &mut Reply, handles: &[ProgramHandle]) {
    if let Reply::Ok {
        result:
            Outcome::Done {
                instances,
                warnings,
                ..
            },
    } = reply
    {
        warnings.extend(instances.iter().filter_map(|i| {
            i.drain_warning
                .as_ref()
                .map(|w| format!("{}:{}: {w}", i.program, i.instance))
        }));
        warnings.extend(handles.iter().filter_map(|h| {
            h.snapshot()
                .socket_warning
                .map(|w| format!("{}: {w}", h.name))
        }));
    }
}

/// What `restart --canary` prints when the canary serves.
fn canary_line(name: &str, c: &crate::state::CanaryStatus) -> String {
    let sticky = match &c.header {
        Some(h) => format!("by a hash of {h}, else by the zdt_canary cookie"),
        None => "by the zdt_canary cookie".to_string(),
    };
    format!(
        "{name}: canary: gen {} serves {} % of new clients (sticky {sticky}); gen {} serves the rest\n  watch:     zdtctl status {name}\n  promote:   zdtctl promote {name}\n  roll back: zdtctl rollback {name}",
        c.canary.generation, c.percent, c.stable.generation
    )
}

fn collect(results: Vec<(String, Option<OpResult>)>, message: String) -> Reply {
    let mut instances = Vec::new();
    let mut errors = Vec::new();
    for (name, r) in results {
        match r {
            Some(Ok(mut snaps)) => instances.append(&mut snaps),
            Some(Err(e)) => errors.push(e),
            None => errors.push(OpError {
                message: format!("{name}: the program was removed while the order ran"),
                log_tail: None,
                kept_previous_config: false,
            }),
        }
    }
    match errors.len() {
        0 => ok(Outcome::Done {
            message,
            instances,
            warnings: Vec::new(),
        }),
        1 => err(op_error(errors.remove(0))),
        _ => {
            let tails: Vec<String> = errors.iter().filter_map(|e| e.log_tail.clone()).collect();
            let body = ErrorBody::new(
                "failed",
                errors
                    .iter()
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
            err(if tails.is_empty() {
                body
            } else {
                body.with_hint(tails.join("\n"))
            })
        }
    }
}

/// How much of an instance's output `tail` sends first.
#[derive(Clone, Copy, Debug)]
enum History {
    /// The last bytes.
    Bytes(usize),
    /// The last lines (a last line without its newline counts).
    Lines(usize),
}

/// The last `n` lines of `text`.
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let start = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, &b)| b == b'\n')
        .nth(n - 1)
        .map_or(0, |(i, _)| i + 1);
    &text[start..]
}

async fn tail(
    handle: ProgramHandle,
    instance: u32,
    stderr: bool,
    follow: bool,
    history: History,
    replies: mpsc::Sender<Reply>,
) {
    let sink = handle
        .call(|reply| ProgramMsg::Logs {
            instance,
            stderr,
            reply,
        })
        .await
        .flatten();
    let Some(sink) = sink else {
        let msg = format!("{} has no instance {instance}", handle.name);
        return send(&replies, err(ErrorBody::new("unknown_program", msg))).await;
    };
    // Subscribe before reading the history, so nothing falls in between.
    let mut live = sink.subscribe();
    let history = match history {
        History::Bytes(n) => String::from_utf8_lossy(&sink.tail(n)).into_owned(),
        History::Lines(n) => {
            let ring = sink.tail(usize::MAX);
            String::from_utf8_lossy(last_lines(&ring, n)).into_owned()
        }
    };
    if !follow {
        return send(&replies, ok(Outcome::Tail { data: history })).await;
    }
    if !history.is_empty() && replies.send(Reply::Log { data: history }).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            () = replies.closed() => return,
            chunk = live.recv() => match chunk {
                Ok(b) => {
                    let data = String::from_utf8_lossy(&b).into_owned();
                    if replies.send(Reply::Log { data }).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let data = format!("\n[zdt: {n} chunks skipped, the reader was too slow]\n");
                    if replies.send(Reply::Log { data }).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    let msg = format!("{} was removed", handle.name);
                    return send(&replies, ok(Outcome::Tail { data: msg })).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tail_tests {
    use super::last_lines;

    #[test]
    fn the_last_lines_with_or_without_a_final_newline() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
        assert_eq!(last_lines(b"", 3), b"");
    }
}
