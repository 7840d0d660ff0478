//! Instance states and the snapshots that programs publish.
//!
//! Every instance is in exactly one [`InstanceState`]; the meanings follow
//! supervisord's (STARTING until `startsecs` or readiness, RUNNING when ready,
//! BACKOFF between failed starts, FATAL when `startretries` ran out). Each
//! program actor publishes a [`ProgramSnapshot`] on a `watch` channel after every
//! change; `zdtctl status --json` prints these snapshots as they are.

use serde::{Deserialize, Serialize};

/// The lifecycle state of one instance of a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceState {
    /// Not running, and not asked to run.
    Stopped,
    /// Spawned, not yet up for `startsecs` (or not yet ready).
    Starting,
    /// Up and serving.
    Running,
    /// Replaced by a newer generation; finishing its requests.
    Draining,
    /// The stop signal was sent; waiting for the process group to exit.
    Stopping,
    /// A start failed; waiting before the next try.
    Backoff,
    /// Exited on its own and will not be restarted (autorestart said so).
    Exited,
    /// Could not be started `startretries` times in a row, or cannot be spawned at all.
    Fatal,
}

impl InstanceState {
    /// The upper-case name used in status tables and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "STOPPED",
            Self::Starting => "STARTING",
            Self::Running => "RUNNING",
            Self::Draining => "DRAINING",
            Self::Stopping => "STOPPING",
            Self::Backoff => "BACKOFF",
            Self::Exited => "EXITED",
            Self::Fatal => "FATAL",
        }
    }

    /// Whether a process may be alive in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Draining | Self::Stopping
        )
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal name (e.g. "SIGKILL"), when a signal killed it.
    pub signal: Option<String>,
    /// Whether the exit was expected (asked for, or a code in `exitcodes`).
    pub expected: bool,
    /// It died of the `stop_signal` zdt sent to stop it (a server that
    /// re-raises SIGTERM after draining, as uvicorn does): a clean stop.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clean_stop: bool,
    /// Unix time in milliseconds.
    pub at_ms: u64,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.code, &self.signal) {
            (_, Some(sig)) if self.clean_stop => write!(f, "stopped by {sig}"),
            (_, Some(sig)) => write!(f, "killed by {sig}"),
            (Some(code), None) => write!(f, "exit {code}"),
            (None, None) => f.write_str("unknown"),
        }
    }
}

/// A point-in-time view of one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSnapshot {
    /// The program's name.
    pub program: String,
    /// Instance number, 0-based (supervisord's `process_num`).
    pub instance: u32,
    /// Generation this process belongs to; starts at 1, grows by one per start.
    pub generation: u64,
    /// Current state.
    pub state: InstanceState,
    /// The process id while one is alive.
    pub pid: Option<u32>,
    /// Unix time in milliseconds of the last state change.
    pub since_ms: u64,
    /// Unix time in milliseconds when the current process was spawned.
    pub started_ms: Option<u64>,
    /// How many times this instance was started after its first start.
    pub restarts: u32,
    /// How the previous process ended.
    pub last_exit: Option<ExitInfo>,
    /// Why the instance is BACKOFF or FATAL (e.g. the OS error of exec).
    pub error: Option<String>,
    /// The worker's last `STATUS=` text (sd_notify), if any.
    pub status_text: Option<String>,
    /// Log bytes that could not be written to the log files (full disk, ...).
    pub log_dropped_bytes: u64,
    /// Proxy mode: this process's request counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<RequestCounts>,
    /// How the last drain of an old generation of this instance went wrong:
    /// SIGKILLed at `max_wait` (pass mode: whatever it still held was cut) or
    /// requests cut (proxy mode). None when it drained cleanly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_warning: Option<String>,
    /// The deploy release this process runs in (its id), for programs with
    /// a deploy root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// Request counters of a proxy-mode program or of one of its processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Routed and not yet fully answered.
    pub inflight: u64,
    /// Answered by the application.
    pub served: u64,
    /// Answered 502 by zdt, or whose response broke off (the upstream failed).
    pub failed: u64,
    /// Of `failed`: requests still running when zdt stopped their process
    /// at `max_wait`.
    pub cut: u64,
    /// Answered 503 by zdt (no ready instance within queue_timeout, or
    /// draining); program totals only.
    pub unavailable: u64,
}

/// A point-in-time view of one program and its instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramSnapshot {
    /// The program's name.
    pub name: String,
    /// The newest generation started (0 before the first start).
    pub generation: u64,
    /// One entry per live or configured instance, newest generation last.
    pub instances: Vec<InstanceSnapshot>,
    /// Proxy mode: the program's request counters since zdt started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<RequestCounts>,
    /// Pass mode: a listening socket whose accept queue has stayed non-empty
    /// while the program runs (nobody accepts on the socket zdt passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_warning: Option<String>,
    /// The deploy watch of the program's deploy root, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_watch: Option<WatchState>,
    /// Proxy mode: `zdtctl pause` or `maintenance` in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// Proxy mode: a canary in progress (`zdtctl restart --canary`), with
    /// both generations' counters side by side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    /// Proxy mode: `zdtctl drain` in force (new requests get 503).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Proxy mode: the request statistics `/metrics` shows (status classes,
    /// histograms); filled by status in zdt, not part of the JSON.
    #[serde(skip)]
    pub traffic: Option<crate::proxy::TrafficStats>,
}

impl ProgramSnapshot {
    /// Whether the program serves, for `/health/PROGRAM` on the admin
    /// listener: an instance is RUNNING and no drain or maintenance is in
    /// force. Otherwise why not, in a few words.
    pub fn serving(&self) -> Result<(), &'static str> {
        if self.draining {
            return Err("draining");
        }
        if matches!(self.hold, Some(Hold::Maintenance { .. })) {
            return Err("maintenance");
        }
        if self
            .instances
            .iter()
            .any(|i| i.state == InstanceState::Running)
        {
            Ok(())
        } else {
            Err("no instance is RUNNING")
        }
    }
}

/// What `zdtctl status` shows of a watch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchState {
    /// What is watched: "git URL#BRANCH" or "upload FOLDER".
    pub source: String,
    /// Unix time in milliseconds of the last look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_ms: Option<u64>,
    /// What the last look found or did ("up to date", "deployed …",
    /// "deploy of commit … failed: …", "cannot read the branch: …").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// A pause or a maintenance of a proxy-mode program (`zdtctl resume` ends
/// either).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Hold {
    /// New requests are held until resume, each at most `max_pause_ms`.
    Paused {
        /// Unix time in milliseconds the pause began.
        since_ms: u64,
        /// How long one request may be held before it gets 503.
        max_pause_ms: u64,
        /// Requests (tcp: connections) held right now.
        held: u64,
    },
    /// New requests get 503 with `message`.
    Maintenance {
        /// Unix time in milliseconds the maintenance began.
        since_ms: u64,
        /// The body of the 503.
        message: String,
    },
}

/// A canary in progress: which generations share the traffic, how, and how
/// each is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryStatus {
    /// Share of new clients sent to the canary, 1 to 99.
    pub percent: u8,
    /// `canary_header`, when clients are assigned by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The generation that served before the canary and keeps the rest.
    pub stable: GenerationTraffic,
    /// The canary generation.
    pub canary: GenerationTraffic,
}

/// Counters of one generation, since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationTraffic {
    /// The generation.
    pub generation: u64,
    /// Requests answered (by the application or with zdt's 502/504).
    pub requests: u64,
    /// Of those, answers with a 5xx status (the application's, and zdt's
    /// 502/504 when the worker failed).
    pub errors_5xx: u64,
    /// 99th percentile of the time from routing a request to the end of
    /// its answer, in microseconds (a histogram bucket's upper bound,
    /// within 25 %); None before the first request.
    pub p99_us: Option<u64>,
}

/// Milliseconds since the Unix epoch, for snapshots.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
