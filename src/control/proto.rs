//! The control protocol: one JSON object per line in each direction.
//!
//! A request is `{"version":1,"cmd":"restart","target":"web1",...}`. The daemon
//! answers with one or more lines `{"version":1,"type":...}`: any number of
//! `progress` or `log` lines, then exactly one `ok` or `error` line, after which
//! the request is finished (the connection may carry another request).

use serde::{Deserialize, Serialize};

use crate::state::{InstanceSnapshot, ProgramSnapshot};

/// The protocol version spoken by this build. Requests with another version are
/// answered with an error of kind `version`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line the daemon accepts, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

/// The commands `zdtctl` can send. `target` is a program name, `name:N` for one
/// instance, `all`, or a glob such as `web*` or `web:*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Snapshots of the matching programs (all when `target` is None).
    Status {
        /// Which programs; None means all.
        #[serde(default)]
        target: Option<String>,
    },
    /// Start stopped instances; replies when they are RUNNING (or failed).
    Start {
        /// Which programs.
        target: String,
    },
    /// Stop instances (stop signal, then SIGKILL after kill_timeout).
    Stop {
        /// Which programs.
        target: String,
    },
    /// Restart instances; replies when the new generation runs and the old is gone.
    Restart {
        /// Which programs.
        target: String,
        /// Reply as soon as the restart was accepted.
        #[serde(default)]
        no_wait: bool,
        /// Proxy mode: start the new generation as a canary for this
        /// percentage (1 to 99) of new clients, beside the old one; replies
        /// once it serves. End it with `promote` or `rollback`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<u8>,
    },
    /// A canary's generation takes all traffic; the old one drains and
    /// stops. Replies when it is gone.
    Promote {
        /// Which programs.
        target: String,
    },
    /// Send a signal to every instance's process group.
    Signal {
        /// Which programs.
        target: String,
        /// Signal name or number: "HUP", "SIGUSR1", "10".
        signal: String,
    },
    /// Change a program's number of instances while it runs: new ones
    /// start, surplus ones stop (proxy mode: out of the routes first), the
    /// others are left alone. Lasts until a reload applies the file's count.
    Scale {
        /// One program.
        target: String,
        /// The new count, 1 to [`crate::config::MAX_INSTANCES`].
        instances: u32,
    },
    /// The pids of the matching instances.
    Pid {
        /// Which programs.
        target: String,
    },
    /// The last lines of an instance's output; with `follow`, keep streaming.
    Tail {
        /// Which program (or `name:N`).
        target: String,
        /// stderr instead of stdout.
        #[serde(default)]
        stderr: bool,
        /// Keep the request open and stream new output as `log` replies.
        #[serde(default)]
        follow: bool,
        /// How many bytes of history to send first (default 1600, like supervisorctl).
        #[serde(default)]
        bytes: Option<usize>,
        /// How many lines of history to send first, instead of `bytes`
        /// (as far back as the in-memory ring reaches).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lines: Option<usize>,
    },
    /// Proxy mode: answer new requests 503 at once (in-flight ones finish),
    /// so an outer load balancer moves traffic away.
    Drain {
        /// Which programs.
        target: String,
    },
    /// End a drain.
    Undrain {
        /// Which programs.
        target: String,
    },
    /// Proxy mode: hold new requests inside zdt (in-flight ones finish)
    /// until `resume`; replies once none is in flight.
    Pause {
        /// Which programs.
        target: String,
        /// How long one request may be held before it gets 503 ("30s" when
        /// None).
        #[serde(default)]
        max_pause: Option<String>,
    },
    /// Proxy mode: end a pause (held requests go on) or a maintenance.
    Resume {
        /// Which programs.
        target: String,
    },
    /// Proxy mode: answer new requests 503 with a message until `resume`.
    Maintenance {
        /// Which programs.
        target: String,
        /// The 503's body (text/plain); a default one when None.
        #[serde(default)]
        message: Option<String>,
    },
    /// Read the configuration file again and apply the difference.
    Reload {
        /// Accept a file with no programs (which stops them all).
        #[serde(default)]
        allow_empty: bool,
        /// Only say what a reload would add, remove and restart
        /// (supervisord's `reread`); change nothing.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dry_run: bool,
    },
    /// Deploy a new release to the program's deploy root: fetch, build,
    /// switch `current`, restart every program on the root.
    Deploy {
        /// The program (any program of the root).
        target: String,
        /// A folder, an archive, or `git+URL#REF`.
        from: String,
        /// The client's working directory, for a relative `from`.
        #[serde(default)]
        base: Option<String>,
        /// Hold new requests (proxy mode) while the migrate hooks run and
        /// the new release starts.
        #[serde(default)]
        pause: bool,
        /// With `pause`: how long one request may be held ("30s" by default).
        #[serde(default)]
        max_pause: Option<String>,
        /// Serve the new release to this share (1-99 %) of new clients
        /// beside the old one, until `promote` or `rollback`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<u8>,
    },
    /// The releases of the program's deploy root.
    Releases {
        /// The program.
        target: String,
    },
    /// Without `release`, while a canary runs: roll the canary back (the
    /// old generation takes all traffic again, the canary's drains and
    /// stops). Otherwise go back to an earlier release of the program's
    /// deploy root (default: the previous good one).
    Rollback {
        /// The program.
        target: String,
        /// The release id.
        #[serde(default)]
        release: Option<String>,
    },
    /// Stop everything and exit.
    Shutdown,
    /// Replace zdt's binary in place: same pid, workers and sockets kept.
    /// The old binary answers until it execs; the outcome is then read with
    /// `version` (its `upgrade` record carries `token`).
    Upgrade {
        /// The new binary (absolute); default: the path zdt was started from.
        #[serde(default)]
        binary: Option<String>,
        /// Chosen by the client, to find the outcome by.
        #[serde(default)]
        token: Option<String>,
    },
    /// The daemon's version.
    Version,
}

impl Command {
    /// The command's `cmd`, e.g. `"restart"` (a metric label).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Status { .. } => "status",
            Self::Start { .. } => "start",
            Self::Stop { .. } => "stop",
            Self::Restart { .. } => "restart",
            Self::Promote { .. } => "promote",
            Self::Signal { .. } => "signal",
            Self::Scale { .. } => "scale",
            Self::Pid { .. } => "pid",
            Self::Tail { .. } => "tail",
            Self::Drain { .. } => "drain",
            Self::Undrain { .. } => "undrain",
            Self::Pause { .. } => "pause",
            Self::Resume { .. } => "resume",
            Self::Maintenance { .. } => "maintenance",
            Self::Reload { .. } => "reload",
            Self::Deploy { .. } => "deploy",
            Self::Releases { .. } => "releases",
            Self::Rollback { .. } => "rollback",
            Self::Shutdown => "shutdown",
            Self::Upgrade { .. } => "upgrade",
            Self::Version => "version",
        }
    }
}

/// One reply line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Always [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The reply.
    #[serde(flatten)]
    pub reply: Reply,
}

/// What a reply line says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// A human progress line ("gen 4 ready in 812 ms"). More lines follow.
    Progress {
        /// The text.
        message: String,
    },
    /// A chunk of worker output (tail). More lines follow.
    Log {
        /// The text (lossy UTF-8).
        data: String,
    },
    /// The request succeeded. Last line of the request.
    Ok {
        /// What it produced.
        result: Outcome,
    },
    /// The request failed. Last line of the request.
    Error {
        /// Why.
        error: ErrorBody,
    },
}

/// A successful result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// For `status`.
    Status {
        /// The matching programs.
        programs: Vec<ProgramSnapshot>,
    },
    /// For start/stop/restart/signal: what was done, and the instances after it.
    Done {
        /// One line for humans.
        message: String,
        /// The affected instances as they are now.
        instances: Vec<InstanceSnapshot>,
        /// Restart: what went wrong without failing it, e.g. an old
        /// generation SIGKILLed at `max_wait` (`zdtctl restart --strict`
        /// exits 1 when there is any).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
    },
    /// For `pid`.
    Pids {
        /// `(program, instance, pid)` for each live instance.
        pids: Vec<PidEntry>,
    },
    /// For `reload`.
    Reloaded {
        /// Programs started.
        added: Vec<String>,
        /// Programs stopped and forgotten.
        removed: Vec<String>,
        /// Programs restarted with their new settings.
        changed: Vec<String>,
        /// Programs left as they were.
        unchanged: Vec<String>,
        /// Nothing was applied: what a reload would do (`--dry-run`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dry_run: bool,
    },
    /// For `tail` without follow: the history.
    Tail {
        /// The text (lossy UTF-8).
        data: String,
    },
    /// For `version`.
    Version {
        /// The daemon's version (Cargo package version).
        version: String,
        /// The daemon's pid.
        pid: u32,
        /// How the last upgrade went, if there was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upgrade: Option<crate::upgrade::UpgradeRecord>,
        /// The pid of zdt's proxy process (`proxy_process`), while one runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proxy_pid: Option<u32>,
    },
    /// For `shutdown`: the daemon is stopping.
    ShuttingDown,
    /// For `releases`.
    Releases {
        /// The deploy root.
        root: String,
        /// Oldest first.
        releases: Vec<ReleaseRow>,
    },
}

/// One release, for `zdtctl releases`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRow {
    /// Its id (folder name under `releases/`).
    pub id: String,
    /// `live`, `previous` (what `rollback` goes back to), `ready`,
    /// `failed`, or `building` (a deploy runs).
    pub state: String,
    /// Unix time in milliseconds when its deploy began.
    pub created_ms: Option<u64>,
    /// What it was deployed from.
    pub source: Option<String>,
    /// The git commit, for git sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// How long its build hooks took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Bytes in its folder after the build.
    pub size_bytes: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One live instance's pid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidEntry {
    /// Program name.
    pub program: String,
    /// Instance number.
    pub instance: u32,
    /// Generation.
    pub generation: u64,
    /// Process id.
    pub pid: u32,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable kind: `bad_request`, `too_large`, `version`,
    /// `unknown_program`, `permission`, `failed`, `config`, `busy`.
    pub kind: String,
    /// What went wrong, for humans.
    pub message: String,
    /// What to do about it, when we know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl ErrorBody {
    /// An error without a hint.
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_string(),
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl Reply {
    /// Whether this reply ends its request.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Ok { .. } | Self::Error { .. })
    }
}
