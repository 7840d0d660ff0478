//! zdt's side of the channel: the [`Client`] that starts the proxy process
//! and starts it again when it dies, and the [`Table`], [`Counters`],
//! [`Drain`] and [`StartHandle`] that the boundary's calls become.
//!
//! Everything in force is kept here too ([`State`]): what a table was last
//! told, and every start with its sockets. Changing that copy and sending
//! the order happen under one lock, and a new child is sent the whole copy
//! under the same lock before anything else, so a child never misses an
//! order nor sees two in the wrong order.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{pair, Answer, Channel, Order, WireGate, CHANNEL_FDNAME, MAX_MESSAGE};
use crate::proxy::{Gate, Options, ProcessId, ProgramCounts, RouteSet};
use crate::spawn::{ExitStatus, SpawnSpec, Spawner};

/// First wait before starting a proxy process again after one died.
const RESPAWN_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between starts.
const RESPAWN_MAX: Duration = Duration::from_secs(5);
/// A process that served this long resets the wait to [`RESPAWN_FIRST`].
const RESPAWN_RESET: Duration = Duration::from_secs(10);
/// What a retiring proxy process gets beyond its deadline before SIGKILL.
const RETIRE_KILL_AFTER: Duration = Duration::from_secs(5);

/// The proxy process, as zdt holds it. Clones share it; the process runs
/// until [`Client::shutdown`] (or zdt's exit).
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    threads: usize,
    next: AtomicU64,
    state: Mutex<State>,
    /// How many children have taken their orders so far; [`Client::ready`]
    /// waits for the first. Sent by the keeper task.
    started: watch::Sender<u64>,
    /// Proxy processes a previous binary left that have not exited yet;
    /// drains wait for them too.
    retiring: watch::Sender<usize>,
    /// The one a previous binary left, until [`Client::ready`] retires it.
    old: Mutex<Option<Retiring>>,
    /// The running child's pid and a copy of zdt's end of its channel, for
    /// an upgrade to carry.
    carried: Mutex<Option<(u32, OwnedFd)>>,
    /// Cancelled by [`Client::shutdown`]: the keeper stops the process and
    /// starts no other.
    stop: CancellationToken,
}

/// What is in force, and the link to the child that has it.
#[derive(Debug, Default)]
struct State {
    /// To the writer task of the child now running; None between children.
    link: Option<mpsc::UnboundedSender<Packet>>,
    tables: BTreeMap<u64, TableState>,
    starts: BTreeMap<u64, StartState>,
    /// Questions asked of the running child. Dropped when it dies: the
    /// askers then see None.
    pending: HashMap<u64, oneshot::Sender<Answer>>,
}

#[derive(Debug)]
struct TableState {
    program: String,
    proxied: bool,
    draining: bool,
    /// The gate as last set; the program actor holds receivers.
    gate: watch::Sender<Gate>,
    set: RouteSet,
}

#[derive(Debug)]
struct StartState {
    table: u64,
    options: Options,
    fds: Vec<Arc<OwnedFd>>,
}

/// One message on its way to the child.
#[derive(Debug)]
struct Packet {
    bytes: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
}

impl State {
    /// Sends `order` to the running child, if any.
    fn send(&self, order: &Order, fds: Vec<Arc<OwnedFd>>) {
        let Some(link) = &self.link else { return };
        match serde_json::to_vec(order) {
            Ok(bytes) => {
                // The writer ends only with the child; then link is cleared.
                let _ = link.send(Packet { bytes, fds });
            }
            Err(e) => tracing::error!(cause = %e, "proxy channel: cannot encode an order"),
        }
    }

    /// Everything in force, to a child that has nothing yet.
    fn replay(&self) {
        for (&table, t) in &self.tables {
            self.send(
                &Order::Table {
                    table,
                    program: t.program.clone(),
                },
                Vec::new(),
            );
            self.send(
                &Order::Proxied {
                    table,
                    on: t.proxied,
                },
                Vec::new(),
            );
            self.send(
                &Order::Draining {
                    table,
                    on: t.draining,
                },
                Vec::new(),
            );
            self.send(
                &Order::Gate {
                    table,
                    gate: WireGate::from(&*t.gate.borrow()),
                },
                Vec::new(),
            );
            self.send(
                &Order::Publish {
                    table,
                    set: t.set.clone(),
                },
                Vec::new(),
            );
        }
        for (&start, s) in &self.starts {
            let order = Order::Start {
                start,
                table: s.table,
                options: s.options.clone(),
            };
            self.send(&order, s.fds.clone());
        }
    }
}

impl Client {
    /// Starts the proxy process (`threads` threads) through `spawner`, and
    /// keeps one running until [`Client::shutdown`]. `old` is the process a
    /// previous binary left, retired by [`Client::ready`].
    pub fn start(threads: usize, spawner: Spawner, old: Option<Retiring>) -> Self {
        let inner = Arc::new(Inner {
            threads,
            next: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            started: watch::channel(0).0,
            retiring: watch::channel(usize::from(old.is_some())).0,
            old: Mutex::new(old),
            carried: Mutex::new(None),
            stop: CancellationToken::new(),
        });
        tokio::spawn(keep(inner.clone(), spawner));
        Self { inner }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next(&self) -> u64 {
        self.inner.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Changes the copy in force with `update`, then sends `order`.
    fn order(&self, order: Order, fds: Vec<Arc<OwnedFd>>, update: impl FnOnce(&mut State)) {
        let mut st = self.state();
        update(&mut st);
        st.send(&order, fds);
    }

    /// Asks the running child; None if there is none or it died first.
    async fn ask(&self, make: impl FnOnce(u64) -> Order) -> Option<Answer> {
        let id = self.next();
        let rx = {
            let mut st = self.state();
            st.link.as_ref()?;
            let (tx, rx) = oneshot::channel();
            st.pending.insert(id, tx);
            st.send(&make(id), Vec::new());
            rx
        };
        rx.await.ok()
    }

    /// A new program's table.
    pub fn table(&self, program: &str) -> Table {
        let table = self.next();
        let program = program.to_string();
        self.order(
            Order::Table {
                table,
                program: program.clone(),
            },
            Vec::new(),
            |st| {
                st.tables.insert(
                    table,
                    TableState {
                        program,
                        proxied: false,
                        draining: false,
                        gate: watch::channel(Gate::Open).0,
                        set: RouteSet::default(),
                    },
                );
            },
        );
        Table {
            client: self.clone(),
            table,
        }
    }

    /// Accepts on `sockets` for `table`'s program.
    pub fn start_proxy(
        &self,
        table: &Table,
        sockets: &[Arc<OwnedFd>],
        options: Options,
    ) -> StartHandle {
        let start = self.next();
        let order = Order::Start {
            start,
            table: table.table,
            options: options.clone(),
        };
        self.order(order, sockets.to_vec(), |st| {
            st.starts.insert(
                start,
                StartState {
                    table: table.table,
                    options,
                    fds: sockets.to_vec(),
                },
            );
        });
        StartHandle {
            client: self.clone(),
            start,
        }
    }

    /// The pid of the proxy process now running and a copy of zdt's end of
    /// its channel, for an upgrade to carry: the caller holds it until the
    /// exec, so its number stays this channel's even if the process dies
    /// meanwhile. None between processes.
    pub fn carry(&self) -> Option<(u32, OwnedFd)> {
        let link = self.inner.carried.lock().unwrap_or_else(|p| p.into_inner());
        let (pid, fd) = link.as_ref()?;
        Some((*pid, fd.try_clone().ok()?))
    }

    /// The pid of the proxy process now running.
    pub fn pid(&self) -> Option<u32> {
        let link = self.inner.carried.lock().unwrap_or_else(|p| p.into_inner());
        link.as_ref().map(|(pid, _)| *pid)
    }

    /// Resolves once a proxy process has applied every order sent so far;
    /// then retires the one a previous binary left (in a task of its own,
    /// bounded by `deadline`).
    pub async fn ready(&self, deadline: Duration) {
        let mut started = self.inner.started.subscribe();
        loop {
            let _ = started.wait_for(|n| *n > 0).await;
            if self.ask(|id| Order::Sync { id }).await.is_some() {
                break;
            }
            // That child died before answering: wait for the next.
            let now = *started.borrow_and_update();
            let _ = started.wait_for(|n| *n > now).await;
        }
        let old = self
            .inner
            .old
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(old) = old {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                old.retire(deadline).await;
                inner.retiring.send_modify(|n| *n = n.saturating_sub(1));
            });
        }
    }

    /// Stops the proxy process and starts no other.
    pub fn shutdown(&self) {
        self.state().send(&Order::Shutdown, Vec::new());
        self.inner.stop.cancel();
    }
}

/// Starts the proxy process, sends it everything in force, and starts
/// another when it dies, until [`Client::shutdown`].
async fn keep(inner: Arc<Inner>, spawner: Spawner) {
    let mut wait = RESPAWN_FIRST;
    while !inner.stop.is_cancelled() {
        let began = Instant::now();
        match run_one(&inner, &spawner).await {
            Ok(exit) if inner.stop.is_cancelled() => {
                tracing::debug!(%exit, "proxy process stopped");
                return;
            }
            Ok(exit) => tracing::error!(
                %exit,
                "the proxy process ended; starting another (requests it had in flight are lost)"
            ),
            Err(e) => tracing::error!(cause = %e, "cannot start the proxy process"),
        }
        if began.elapsed() >= RESPAWN_RESET {
            wait = RESPAWN_FIRST;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = inner.stop.cancelled() => return,
        }
        wait = (wait * 2).min(RESPAWN_MAX);
    }
}

/// One proxy process, from spawn to exit.
async fn run_one(inner: &Arc<Inner>, spawner: &Spawner) -> std::io::Result<ExitStatus> {
    let (ours, theirs) = pair()?;
    let spec = SpawnSpec {
        argv: vec![
            "zdt".into(),
            "__proxy".into(),
            "--threads".into(),
            inner.threads.to_string(),
        ],
        exe: Some("/proc/self/exe".into()),
        to_zdt_stderr: true,
        fds: vec![Arc::new(theirs)],
        fdname: CHANNEL_FDNAME.into(),
        ..SpawnSpec::default()
    };
    let spawned = spawner
        .spawn(spec)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let pid = spawned.pid.as_raw() as u32;
    let carried = ours.try_clone()?;
    let chan = Arc::new(Channel::new(ours)?);
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        st.link = Some(tx);
        st.replay();
    }
    *inner.carried.lock().unwrap_or_else(|p| p.into_inner()) = Some((pid, carried));
    inner.started.send_modify(|n| *n += 1);
    tracing::info!(pid, threads = inner.threads, "proxy process started");
    let writer = tokio::spawn(write(chan.clone(), rx));
    let mut exit = spawned.exit;
    let status = tokio::select! {
        s = &mut exit => s.ok(),
        () = read(&chan, inner) => exit.await.ok(),
    };
    writer.abort();
    *inner.carried.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    st.link = None;
    st.pending.clear();
    drop(st);
    status.ok_or_else(|| std::io::Error::other("zdt is exiting"))
}

/// Sends what the link carries, in order, until the child is gone.
async fn write(chan: Arc<Channel>, mut rx: mpsc::UnboundedReceiver<Packet>) {
    while let Some(p) = rx.recv().await {
        let fds: Vec<_> = p.fds.iter().map(|f| f.as_raw_fd()).collect();
        if let Err(e) = chan.send(&p.bytes, &fds).await {
            tracing::warn!(cause = %e, "proxy channel: cannot send an order");
            if e.raw_os_error() == Some(libc::EPIPE) {
                return;
            }
        }
    }
}

/// Hands each answer to whoever asked, until the child closes its end.
async fn read(chan: &Channel, inner: &Inner) {
    let mut buf = vec![0; MAX_MESSAGE];
    loop {
        let n = match chan.recv(&mut buf).await {
            Ok(Some((n, _))) => n,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(cause = %e, "proxy channel: cannot read an answer");
                return;
            }
        };
        match serde_json::from_slice::<Answer>(&buf[..n]) {
            Ok(a) => {
                let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tx) = st.pending.remove(&a.id()) {
                    let _ = tx.send(a);
                }
            }
            Err(e) => tracing::warn!(cause = %e, "proxy channel: an answer zdt cannot read"),
        }
    }
}

/// A program's routing state in the proxy process; what it was told is
/// kept in the client's [`State`] too, where the program actor reads its
/// drain flag and gate back. Dropping it drops the table there.
#[derive(Debug)]
pub struct Table {
    client: Client,
    table: u64,
}

impl Table {
    /// An update of this table's copy in [`State`].
    fn with<'a>(&self, f: impl FnOnce(&mut TableState) + 'a) -> impl FnOnce(&mut State) + 'a {
        let table = self.table;
        move |st: &mut State| {
            if let Some(t) = st.tables.get_mut(&table) {
                f(t);
            }
        }
    }

    pub(in crate::proxy) fn set_proxied(&self, on: bool) {
        let order = Order::Proxied {
            table: self.table,
            on,
        };
        self.client
            .order(order, Vec::new(), self.with(|t| t.proxied = on));
    }

    pub(in crate::proxy) fn counters(&self) -> Counters {
        Counters {
            client: self.client.clone(),
            table: self.table,
        }
    }

    pub(in crate::proxy) fn set_draining(&self, on: bool) {
        let order = Order::Draining {
            table: self.table,
            on,
        };
        self.client
            .order(order, Vec::new(), self.with(|t| t.draining = on));
    }

    pub(in crate::proxy) fn is_draining(&self) -> bool {
        let st = self.client.state();
        st.tables.get(&self.table).is_some_and(|t| t.draining)
    }

    pub(in crate::proxy) fn set_gate(&self, gate: Gate) {
        let order = Order::Gate {
            table: self.table,
            gate: WireGate::from(&gate),
        };
        self.client.order(
            order,
            Vec::new(),
            self.with(|t| {
                t.gate.send_replace(gate);
            }),
        );
    }

    pub(in crate::proxy) fn watch_gate(&self) -> watch::Receiver<Gate> {
        let st = self.client.state();
        match st.tables.get(&self.table) {
            Some(t) => t.gate.subscribe(),
            // Not reached: the table lives as long as this handle.
            None => watch::channel(Gate::Open).1,
        }
    }

    pub(in crate::proxy) fn publish(&self, set: &RouteSet) {
        let order = Order::Publish {
            table: self.table,
            set: set.clone(),
        };
        let kept = set.clone();
        self.client
            .order(order, Vec::new(), self.with(|t| t.set = kept));
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let table = self.table;
        self.client
            .order(Order::DropTable { table }, Vec::new(), |st| {
                st.tables.remove(&table);
            });
    }
}

/// A program's counters in the proxy process.
#[derive(Clone, Debug)]
pub struct Counters {
    client: Client,
    table: u64,
}

impl Counters {
    /// Asks the proxy process. With no process running (it died, another
    /// is starting), a proxied program reads zero.
    pub(in crate::proxy) async fn read(&self) -> Option<ProgramCounts> {
        let table = self.table;
        match self.client.ask(|id| Order::Read { id, table }).await {
            Some(Answer::Counts { counts, .. }) => counts,
            _ => {
                let st = self.client.state();
                let proxied = st.tables.get(&table).is_some_and(|t| t.proxied);
                proxied.then(|| ProgramCounts {
                    stale: true,
                    ..ProgramCounts::default()
                })
            }
        }
    }

    /// Resolves once the proxy process has applied every order sent before
    /// (at once with no process: the next one is given all of them first).
    pub(in crate::proxy) async fn applied(&self) {
        self.client.ask(|id| Order::Sync { id }).await;
    }

    /// Resolves when nothing is in flight (at once with no process).
    pub(in crate::proxy) async fn wait_idle(&self) {
        let table = self.table;
        self.client.ask(|id| Order::WaitIdle { id, table }).await;
    }

    pub(in crate::proxy) fn drain(&self, process: ProcessId) -> Drain {
        let drain = self.client.next();
        let order = Order::DrainBegin {
            drain,
            table: self.table,
            process,
        };
        self.client.order(order, Vec::new(), |_| {});
        Drain {
            client: self.client.clone(),
            drain,
        }
    }
}

/// One process's drain, kept in the proxy process; dropping it ends it
/// there.
#[derive(Debug)]
pub struct Drain {
    client: Client,
    drain: u64,
}

impl Drain {
    /// Resolves when the process has nothing in flight in the proxy
    /// process, and any proxy process a previous binary left has exited.
    pub(in crate::proxy) async fn idle(&self) {
        let drain = self.drain;
        self.client.ask(|id| Order::DrainIdle { id, drain }).await;
        let mut retiring = self.client.inner.retiring.subscribe();
        let _ = retiring.wait_for(|n| *n == 0).await;
    }

    pub(in crate::proxy) async fn cut(&self) -> u64 {
        let drain = self.drain;
        match self.client.ask(|id| Order::DrainCut { id, drain }).await {
            Some(Answer::Cut { n, .. }) => n,
            _ => 0,
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        let drain = self.drain;
        self.client
            .order(Order::DrainEnd { drain }, Vec::new(), |_| {});
    }
}

/// The accept loops of one start in the proxy process; dropping it stops
/// them.
#[derive(Debug)]
pub struct StartHandle {
    client: Client,
    start: u64,
}

impl Drop for StartHandle {
    fn drop(&mut self) {
        let start = self.start;
        self.client.order(Order::Stop { start }, Vec::new(), |st| {
            st.starts.remove(&start);
        });
    }
}

/// A proxy process a previous binary left running: still serving, to be
/// retired once this binary's own proxy process takes connections.
#[derive(Debug)]
pub struct Retiring {
    /// Its pid.
    pub pid: u32,
    /// The previous binary's end of its channel.
    pub channel: OwnedFd,
    /// Its exit status, from the reaper.
    pub exit: oneshot::Receiver<ExitStatus>,
}

impl Retiring {
    /// Tells it to retire and waits for it to exit: within `deadline` and
    /// its idle grace, or SIGKILL a little after.
    pub async fn retire(self, deadline: Duration) {
        let Self { pid, channel, exit } = self;
        tracing::info!(pid, "retiring the previous proxy process");
        let asked = async {
            let chan = Channel::new(channel)?;
            let order = Order::Retire {
                id: u64::MAX,
                grace: crate::proxy::boundary::RETIRE_IDLE_GRACE,
                deadline,
            };
            let bytes = serde_json::to_vec(&order).map_err(std::io::Error::other)?;
            chan.send(&bytes, &[]).await?;
            // Answers to questions the previous binary asked come first.
            let mut buf = vec![0; MAX_MESSAGE];
            while let Some((n, _)) = chan.recv(&mut buf).await? {
                if let Ok(Answer::Retired {
                    still_open, took, ..
                }) = serde_json::from_slice(&buf[..n])
                {
                    tracing::info!(
                        pid,
                        still_open,
                        took_ms = took.as_millis() as u64,
                        "previous proxy process retired"
                    );
                    break;
                }
            }
            Ok::<_, std::io::Error>(chan)
        };
        let bound = deadline + RETIRE_KILL_AFTER;
        let chan = match tokio::time::timeout(bound, asked).await {
            Ok(Ok(chan)) => Some(chan),
            Ok(Err(e)) => {
                tracing::warn!(pid, cause = %e, "cannot reach the previous proxy process");
                None
            }
            Err(_) => None,
        };
        if tokio::time::timeout(RETIRE_KILL_AFTER, exit).await.is_err() {
            tracing::warn!(pid, "the previous proxy process did not exit; killing it");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        drop(chan);
    }
}
