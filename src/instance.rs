//! One task per worker process: spawn it, watch it, signal it, report on it.
//!
//! A process task is the Job of watchexec's supervisor, one level down: the
//! program actor ([`crate::program`]) decides *what* should happen (restart,
//! back off, give up); the process task only carries it out for one pid and
//! reports [`ProcEvent`]s. It ends when its process has exited and been reaped.
//!
//! Signals always go to the worker's process group (the worker is its group
//! leader), so children of the worker are stopped with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Ready;
use crate::logs::{self, LogSink};
use crate::notify::NotifySocket;
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
        /// Dups of its pipes and notify socket, carried by an upgrade.
        keep: ProcFds,
    },
    /// It could not be started at all; no process exists.
    SpawnFailed(String),
    /// It could not be started for lack of fds or processes (EMFILE, ENFILE,
    /// EAGAIN); no process exists, and a later attempt may succeed.
    SpawnShortage(String),
    /// It is ready: up for `startsecs`, sent READY=1, passed its probe.
    Up,
    /// It was not ready within `ready_timeout`.
    NotReady {
        /// What was checked and what the last check saw, for operators.
        why: String,
        /// The readiness probe could not connect to the private address at
        /// all (the worker listens elsewhere, or not yet).
        unreachable: bool,
    },
    /// It sent `STATUS=` text.
    Status(String),
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

/// Dups of a process's output pipes and notify socket (close-on-exec),
/// which an upgrade hands to the next binary.
#[derive(Debug, Default)]
pub struct ProcFds {
    /// Read end of its stdout pipe.
    pub stdout: Option<std::os::fd::OwnedFd>,
    /// Read end of its stderr pipe.
    pub stderr: Option<std::os::fd::OwnedFd>,
    /// Its NOTIFY_SOCKET.
    pub notify: Option<std::os::fd::OwnedFd>,
}

/// A process of an earlier binary of this zdt (see [`crate::upgrade`]),
/// whose exit the reaper was told to expect.
#[derive(Debug)]
pub struct Adopted {
    /// Its pid.
    pub pid: u32,
    /// It was ready; if not, readiness is checked from here on (a READY=1
    /// sent meanwhile waits in the carried notify socket).
    pub ready: bool,
    /// How long ago it was spawned (its `startsecs` and `ready_timeout`
    /// count from then).
    pub age: Duration,
    /// Its exit status, from the reaper.
    pub exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    /// Its pipes and notify socket.
    pub fds: ProcFds,
}

/// Handle to one process task.
///
/// Dropping every handle SIGKILLs the process group: a process nobody can
/// stop any more must not keep running.
#[derive(Debug, Clone)]
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
    /// The program's name (recorded with the process group).
    pub program: String,
    /// What to run.
    pub spec: SpawnSpec,
    /// How readiness is decided.
    pub ready: Ready,
    /// Up this long = started (when `ready` is `Startsecs`).
    pub startsecs: Duration,
    /// Not ready within this = failed start (explicit readiness only).
    pub ready_timeout: Duration,
    /// Kill the process if it sends no WATCHDOG=1 for this long once ready.
    pub watchdog: Option<Duration>,
    /// Proxy mode: the private address, probed by http/tcp readiness.
    pub private: Option<crate::proxy::PrivateAddr>,
    /// stdout log.
    pub stdout: LogSink,
    /// stderr log.
    pub stderr: LogSink,
    /// Prefix for each output line.
    pub prefix: String,
    /// Each output line starts with its time.
    pub timestamps: bool,
}

/// Starts the task for one process; events go to `events`.
pub fn launch(
    spawner: Spawner,
    params: ProcParams,
    events: mpsc::UnboundedSender<ProcEvent>,
) -> ProcHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(spawner, params, None, events, rx));
    ProcHandle { cmds: tx }
}

/// Starts the task for a process an earlier binary of this zdt started; it
/// is watched, signalled and reported like any other from here on (its
/// readiness checked, if it was not ready yet).
pub fn adopt(
    spawner: Spawner,
    params: ProcParams,
    adopted: Adopted,
    events: mpsc::UnboundedSender<ProcEvent>,
) -> ProcHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(spawner, params, Some(adopted), events, rx));
    ProcHandle { cmds: tx }
}

/// For a process that cannot even be launched for lack of fds (no private
/// port could be found): reports [`ProcEventKind::SpawnShortage`] with `why`
/// and returns a handle to nothing.
pub fn shortage(
    slot: usize,
    gen: u64,
    why: String,
    events: &mpsc::UnboundedSender<ProcEvent>,
) -> ProcHandle {
    let _ = events.send(ProcEvent {
        slot,
        gen,
        kind: ProcEventKind::SpawnShortage(why),
    });
    // No task holds the receiver: orders to it are ignored.
    let (tx, _) = mpsc::unbounded_channel();
    ProcHandle { cmds: tx }
}

fn pipe_reader(fd: std::os::fd::OwnedFd) -> Option<logs::OutputPipe> {
    match logs::OutputPipe::new(fd) {
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

/// How long an exit report waits for the worker's last output.
const PUMP_DRAIN: Duration = Duration::from_millis(200);

/// Distinguishes notify sockets of processes of this zdt.
static NOTIFY_SEQ: AtomicU64 = AtomicU64::new(0);

/// The last failed readiness check: what it saw, and whether it could not
/// connect at all.
type ProbeSeen = tokio::sync::watch::Sender<(String, bool)>;

/// Runs the readiness command until it exits 0; its output goes to `log`.
async fn probe_until_ready(
    spawner: Spawner,
    argv: Vec<String>,
    dir: Option<std::path::PathBuf>,
    log: LogSink,
    seen: ProbeSeen,
) {
    loop {
        let spec = SpawnSpec {
            argv: argv.clone(),
            directory: dir.clone(),
            redirect_stderr: true,
            ..SpawnSpec::default()
        };
        match spawner.spawn(spec).await {
            Ok(probe) => {
                if let Some(r) = pipe_reader(probe.stdout) {
                    tokio::spawn(logs::pump(r, log.clone(), "[ready probe] ".into(), false));
                }
                match probe.exit.await {
                    Ok(ExitStatus::Code(0)) => return,
                    Ok(st) => seen.send_replace((format!("it ended with {st}"), false)),
                    Err(_) => seen.send_replace(("it was not reaped".into(), false)),
                };
            }
            Err(e) => {
                seen.send_replace((e.to_string(), false));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn run(
    spawner: Spawner,
    mut p: ProcParams,
    adopted: Option<Adopted>,
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
    let mut adopted = adopted;
    let notify = if let Some(a) = adopted.as_mut() {
        a.fds.notify.take().and_then(|fd| match NotifySocket::from_fd(fd) {
            Ok(s) => Some(s),
            Err(err) => {
                tracing::warn!(pid = a.pid, cause = %err, "cannot watch the worker's NOTIFY_SOCKET any more");
                None
            }
        })
    } else if p.ready == Ready::Notify {
        match NotifySocket::bind(NOTIFY_SEQ.fetch_add(1, Ordering::Relaxed)) {
            Ok((sock, name)) => {
                p.spec.env.push(("NOTIFY_SOCKET".into(), name));
                if let Some(w) = p.watchdog {
                    p.spec
                        .env
                        .push(("WATCHDOG_USEC".into(), w.as_micros().to_string()));
                }
                Some(sock)
            }
            Err(err) => {
                let why = format!("cannot create NOTIFY_SOCKET: {err}");
                send(if crate::fds::is_shortage(&err) {
                    ProcEventKind::SpawnShortage(why)
                } else {
                    ProcEventKind::SpawnFailed(why)
                });
                return;
            }
        }
    } else {
        None
    };
    // What was checked, for a report if the worker is not ready in time.
    let checked = match (&p.ready, &p.private) {
        (Ready::Exec(argv), _) => format!("ready command {argv:?}"),
        (Ready::Http(path), Some(a)) => format!("http probe of {a}{path}"),
        (Ready::Tcp, Some(a)) => format!("tcp probe of {a}"),
        (Ready::Notify, _) => "no READY=1 on NOTIFY_SOCKET".into(),
        _ => "readiness".into(),
    };
    let (probe_seen, probe_last) = tokio::sync::watch::channel((String::new(), false));
    let adopted_ready = adopted.as_ref().is_some_and(|a| a.ready);
    let age = adopted.as_ref().map_or(Duration::ZERO, |a| a.age);
    let probe = match &p.ready {
        _ if adopted_ready => None,
        Ready::Exec(argv) => Some(Probe::Exec(argv.clone(), p.spec.directory.clone())),
        Ready::Http(path) => p.private.clone().map(|a| Probe::Http(a, path.clone())),
        Ready::Tcp => p.private.clone().map(Probe::Tcp),
        _ => None,
    };
    let (pid, stdout, stderr, mut exit) = match adopted {
        Some(a) => (
            Pid::from_raw(a.pid as i32),
            a.fds.stdout,
            a.fds.stderr,
            a.exit,
        ),
        None => match spawner.spawn(p.spec).await {
            Ok(s) => {
                let keep = ProcFds {
                    stdout: crate::upgrade::keep(&s.stdout),
                    stderr: s.stderr.as_ref().and_then(crate::upgrade::keep),
                    notify: notify.as_ref().and_then(NotifySocket::keep),
                };
                send(ProcEventKind::Spawned {
                    pid: s.pid.as_raw() as u32,
                    keep,
                });
                (s.pid, Some(s.stdout), s.stderr, s.exit)
            }
            Err(err) if err.is_shortage() => {
                send(ProcEventKind::SpawnShortage(err.to_string()));
                return;
            }
            Err(err) => {
                send(ProcEventKind::SpawnFailed(err.to_string()));
                return;
            }
        },
    };
    // Until the task ends (and while its group has members after that), a
    // later zdt can find the group if this one is killed.
    let _recorded = crate::orphans::Recorded::new(pid.as_raw() as u32, &p.program);
    let mut pumps = Vec::new();
    if let Some(r) = stdout.and_then(pipe_reader) {
        pumps.push(tokio::spawn(logs::pump(
            r,
            p.stdout.clone(),
            p.prefix.clone(),
            p.timestamps,
        )));
    }
    if let Some(r) = stderr.and_then(pipe_reader) {
        pumps.push(tokio::spawn(logs::pump(
            r,
            p.stderr.clone(),
            p.prefix.clone(),
            p.timestamps,
        )));
    }

    let start = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    // When the process counts as ready by time alone.
    let ready_at = match p.ready {
        Ready::Startsecs => Some(start + p.startsecs),
        Ready::Delay(d) => Some(start + d),
        Ready::Notify | Ready::Exec(_) | Ready::Http(_) | Ready::Tcp => None,
    };
    let mut ready_deadline = match p.ready {
        Ready::Startsecs => None,
        _ => Some(start + p.ready_timeout),
    };
    let mut probe_task = probe.map(|probe| {
        let task = match probe {
            Probe::Exec(argv, dir) => tokio::spawn(probe_until_ready(
                spawner.clone(),
                argv,
                dir,
                p.stderr.clone(),
                probe_seen,
            )),
            Probe::Http(addr, path) => tokio::spawn(http_until_ready(addr, path, probe_seen)),
            Probe::Tcp(addr) => tokio::spawn(tcp_until_ready(addr, probe_seen)),
        };
        AbortOnDrop(task)
    });
    // An adopted process that was ready is ready (its slot says RUNNING).
    let mut up_sent = adopted_ready;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let mut orders_open = true;
    let mut buf = vec![0u8; 4096];
    // Armed once ready; pushed back by every WATCHDOG=1.
    let mut watchdog_at: Option<Instant> = p
        .watchdog
        .filter(|_| adopted_ready)
        .map(|w| Instant::now() + w);
    // Notify messages dropped because they came from outside the group.
    let mut foreign = 0u64;
    let status = loop {
        let kill_timer = sleep_until_opt(kill_at);
        let ready_timer = sleep_until_opt(ready_at.filter(|_| !up_sent));
        let not_ready_timer = sleep_until_opt(ready_deadline.filter(|_| !up_sent));
        let watchdog_timer = sleep_until_opt(watchdog_at.filter(|_| kill_at.is_none()));
        let probed = async {
            match probe_task.as_mut() {
                Some(t) => {
                    let _ = (&mut t.0).await;
                }
                None => std::future::pending().await,
            }
        };
        let datagram = async {
            match &notify {
                Some(sock) => sock.recv(&mut buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = &mut exit => break status.ok(),
            () = ready_timer => {
                up_sent = true;
                send(ProcEventKind::Up);
            }
            () = probed, if !up_sent => {
                probe_task = None;
                up_sent = true;
                send(ProcEventKind::Up);
            }
            () = not_ready_timer => {
                up_sent = true;
                let (last, unreachable) = probe_last.borrow().clone();
                let mut why = format!("not ready within ready_timeout ({:?}): {checked}", p.ready_timeout);
                if !last.is_empty() {
                    why.push_str(&format!(": {last}"));
                }
                send(ProcEventKind::NotReady { why, unreachable });
            }
            r = datagram => if let Ok(d) = r {
                if !d.sender.is_some_and(|s| s.in_group(pid)) {
                    foreign += 1;
                    if foreign == 1 {
                        tracing::warn!(
                            pid = pid.as_raw(),
                            sender_pid = d.sender.map(|s| s.pid),
                            sender_uid = d.sender.map(|s| s.uid),
                            "ignoring a notify message from a process outside the worker's process group \
                             (logged once per worker)"
                        );
                    }
                    continue;
                }
                let text = String::from_utf8_lossy(&buf[..d.len]).into_owned();
                for line in text.lines() {
                    let (key, value) = line.split_once('=').unwrap_or((line, ""));
                    match (key, value) {
                        ("READY", "1") if !up_sent => {
                            up_sent = true;
                            watchdog_at = p.watchdog.map(|w| Instant::now() + w);
                            send(ProcEventKind::Up);
                        }
                        ("STATUS", st) => {
                            send(ProcEventKind::Status(crate::notify::escape_control(st)));
                        }
                        ("WATCHDOG", "1") => {
                            watchdog_at = p.watchdog.map(|w| Instant::now() + w);
                        }
                        ("EXTEND_TIMEOUT_USEC", usec) if !up_sent => {
                            if let Ok(us) = usec.parse::<u64>() {
                                let until = Instant::now() + Duration::from_micros(us);
                                ready_deadline = ready_deadline.map(|d| d.max(until));
                            }
                        }
                        ("STOPPING", "1") => {
                            tracing::info!(pid = pid.as_raw(), "worker reports it is stopping");
                        }
                        ("MAINPID", main) => {
                            // Signals go to the whole process group, which
                            // includes any main pid the worker names.
                            tracing::debug!(pid = pid.as_raw(), mainpid = main, "worker reports its main pid");
                        }
                        _ => {}
                    }
                }
            },
            () = watchdog_timer => {
                tracing::error!(pid = pid.as_raw(), watchdog = ?p.watchdog, "no WATCHDOG=1 in time; killing the worker so it restarts");
                watchdog_at = None;
                send(ProcEventKind::Status("watchdog timeout".into()));
                signal_group(pid, Signal::SIGKILL);
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
    if foreign > 1 {
        tracing::warn!(
            pid = pid.as_raw(),
            ignored = foreign,
            "notify messages from outside the worker's process group were ignored"
        );
    }
    // Let the pumps take the last output first, so a failure report shows
    // it; bounded, since a grandchild may hold the pipes open.
    let _ = tokio::time::timeout(PUMP_DRAIN, futures_util::future::join_all(pumps)).await;
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

/// A readiness check that runs until it passes.
enum Probe {
    Exec(Vec<String>, Option<std::path::PathBuf>),
    Http(crate::proxy::PrivateAddr, String),
    Tcp(crate::proxy::PrivateAddr),
}

/// Interval between readiness probes that reached the worker.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// Shortest interval between connects to a worker that does not listen yet.
const CONNECT_PROBE_MIN: Duration = Duration::from_millis(1);

/// The pause before the next readiness probe. Until the worker listens, a
/// probe is one refused connect on loopback, a few microseconds, so it is
/// tried again after 1/50 of the time the start has taken so far (1 ms at
/// first, at most [`PROBE_EVERY`]): zdt then sees the worker listen within
/// 2% of its own start time. At a fixed 50 ms, a Node server that starts in
/// 40 ms waited 25 ms more on average, longer than the rest of the restart.
/// A worker that answered but not with 2xx is asked again every
/// [`PROBE_EVERY`], to keep probes out of its access log.
fn probe_pause(started: Instant, could_not_connect: bool) -> Duration {
    if could_not_connect {
        (started.elapsed() / 50).clamp(CONNECT_PROBE_MIN, PROBE_EVERY)
    } else {
        PROBE_EVERY
    }
}

async fn tcp_until_ready(addr: crate::proxy::PrivateAddr, seen: ProbeSeen) {
    let started = Instant::now();
    while let Err(e) = addr.connect().await {
        seen.send_replace((e.to_string(), true));
        tokio::time::sleep(probe_pause(started, true)).await;
    }
}

/// `GET path` on the private address until it answers 2xx.
async fn http_until_ready(addr: crate::proxy::PrivateAddr, path: String, seen: ProbeSeen) {
    use http_body_util::Empty;
    let started = Instant::now();
    loop {
        // Err((what it saw, could not connect)).
        let check = async {
            let stream = addr.connect().await.map_err(|e| (e.to_string(), true))?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| (e.to_string(), false))?;
            tokio::spawn(conn);
            let req = hyper::Request::get(path.as_str())
                .header(hyper::header::HOST, addr.host())
                .body(Empty::<bytes::Bytes>::new())
                .map_err(|e| (e.to_string(), false))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| (e.to_string(), false))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err((format!("answered {}", resp.status()), false))
            }
        };
        let refused = match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(())) => return,
            Ok(Err(saw)) => {
                let refused = saw.1;
                seen.send_replace(saw);
                refused
            }
            Err(_) => {
                seen.send_replace(("no answer within 2s".into(), false));
                false
            }
        };
        tokio::time::sleep(probe_pause(started, refused)).await;
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_worker_not_listening_yet_is_probed_at_a_fiftieth_of_its_start_time() {
        let started = Instant::now();
        assert_eq!(probe_pause(started, true), CONNECT_PROBE_MIN);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(probe_pause(started, true), Duration::from_millis(10));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(probe_pause(started, true), PROBE_EVERY);
        // A worker that answered, but not 2xx, is not asked more often.
        assert_eq!(probe_pause(Instant::now(), false), PROBE_EVERY);
    }
}
