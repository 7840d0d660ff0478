//! supervisor.toml: the types zdt runs from, and loading them.
//!
//! CONTRACT (kept by the loader in this module): [`load`] reads and validates
//! the whole file before anything is applied; every error names file, line,
//! column and what was expected ([`ConfigError`]); unknown keys are errors;
//! relative paths are made absolute against the config file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use deploy::{DeployConfig, Watch};
pub use error::ConfigError;
pub use load::{load, parse, parse_carried, MAX_INSTANCES};
pub use values::{parse_duration, parse_octal, parse_signal, parse_size};

pub mod cron;
mod deploy;
mod dotenv;
pub mod error;
mod expand;
mod load;
#[cfg(test)]
mod tests;
mod values;

/// The control socket named by the file at `path`, read leniently: only
/// `[supervisor].control` has to be valid, so `zdtctl reload` can still reach
/// zdt after an edit broke some other part of the file.
pub fn control_socket(path: &Path) -> Result<PathBuf, ConfigError> {
    let (abs, text) = load::read(path)?;
    // ${VAR} from zdtctl's own environment; an unset one elsewhere in the
    // file does not stop zdtctl from finding the socket.
    let text = expand::expand(&text, |n| std::env::var(n).ok()).map_or(text, |e| e.text);
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::at(abs.clone(), &text, offset, load::friendly(e.message()))
    })?;
    let control = table
        .get("supervisor")
        .and_then(|s| s.get("control"))
        .and_then(|c| c.as_str())
        .unwrap_or("run/zdt.sock");
    let base = abs.parent().unwrap_or(Path::new("/"));
    Ok(base.join(control))
}

/// Finds the configuration file: `explicit`, then `$ZDT_CONFIG`, then
/// `./supervisor.toml`, then `/etc/zdt/supervisor.toml`.
pub fn find_config(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ZDT_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        PathBuf::from("supervisor.toml"),
        PathBuf::from("/etc/zdt/supervisor.toml"),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| {
            ConfigError::whole_file(
                PathBuf::from("supervisor.toml"),
                "no configuration found (tried -c, $ZDT_CONFIG, ./supervisor.toml, /etc/zdt/supervisor.toml); pass one with -c FILE",
            )
        })
}

/// The whole configuration, validated, with absolute paths.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The absolute path of the file this was read from.
    pub file: PathBuf,
    /// The `[supervisor]` table.
    pub supervisor: SupervisorConfig,
    /// The `[program.NAME]` tables, by name, from this file and the files
    /// it includes.
    pub programs: BTreeMap<String, ProgramConfig>,
    /// The `[group.NAME]` tables: each group's programs, in the order given.
    pub groups: BTreeMap<String, Vec<String>>,
    /// The text it was parsed from (an upgrade hands it to the next binary).
    pub text: String,
    /// The other files read with it, `include`d files and `env_file`s,
    /// each with its text, in the order they were read (an upgrade hands
    /// them over with `text`, so the next binary runs what this one read,
    /// and a reload after it sees what changed on disk).
    pub included: Vec<(PathBuf, String)>,
}

/// The `[supervisor]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct SupervisorConfig {
    /// Control socket path. Default: `run/zdt.sock` beside the config file.
    pub control: PathBuf,
    /// Mode of the control socket file. Default 0o600.
    pub control_mode: u32,
    /// A group whose members may use the control socket (name), if any.
    pub control_group: Option<String>,
    /// Where instance logs go. Default: `logs` beside the config file.
    pub log_dir: PathBuf,
    /// Write zdt's pid here, if set.
    pub pidfile: Option<PathBuf>,
    /// Threads of the proxy (proxy mode). Default: one per CPU (at most 64).
    pub proxy_threads: usize,
    /// Run the proxy in a process of its own (`zdt __proxy`), so that
    /// upgrading zdt closes no client connection. Default true.
    pub proxy_process: bool,
    /// The admin listener (`/health`, `/metrics`, `/status`): a TCP
    /// address or a unix socket. Off when None (the default).
    pub admin: Option<ListenAddr>,
    /// The HAProxy agent-check port (`ready up`, `drain`, `down`). Off when
    /// None (the default).
    pub agent_check: Option<std::net::SocketAddr>,
    /// On SIGTERM (and `zdtctl shutdown`): how long `/health` says 503
    /// while zdt goes on serving, before the programs drain, so that a
    /// load balancer's check notices first. Default 0.
    pub drain_delay: std::time::Duration,
    /// The format of zdt's own log on stderr. Default text.
    pub log_format: LogFormat,
    /// Where `stdout_logfile = "syslog"` sends lines. Default `/dev/log`.
    pub syslog_socket: PathBuf,
}

/// The format of zdt's own log (`[supervisor] log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object a line, the tracing fields as keys.
    Json,
}

/// A resource limit a program may set (`limits = { nofile = 65536 }`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    /// RLIMIT_NOFILE: open files.
    Nofile,
    /// RLIMIT_CORE: core file size, bytes.
    Core,
    /// RLIMIT_NPROC: processes of the user.
    Nproc,
    /// RLIMIT_MEMLOCK: locked memory, bytes.
    Memlock,
    /// RLIMIT_STACK: stack size, bytes.
    Stack,
    /// RLIMIT_AS: address space, bytes.
    As,
    /// RLIMIT_FSIZE: file size, bytes.
    Fsize,
    /// RLIMIT_CPU: CPU time, seconds.
    Cpu,
}

impl Limit {
    /// Every limit, with its key in the file.
    pub const ALL: [(Limit, &'static str); 8] = [
        (Limit::Nofile, "nofile"),
        (Limit::Core, "core"),
        (Limit::Nproc, "nproc"),
        (Limit::Memlock, "memlock"),
        (Limit::Stack, "stack"),
        (Limit::As, "as"),
        (Limit::Fsize, "fsize"),
        (Limit::Cpu, "cpu"),
    ];

    /// Its key in the file.
    pub fn key(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(l, _)| *l == self)
            .map_or("?", |(_, k)| k)
    }
}

/// When an exited instance is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoRestart {
    /// Always.
    Always,
    /// Only when the exit code is not in `exitcodes` (or a signal killed it).
    Unexpected,
    /// Never.
    Never,
}

/// Where one output stream of an instance goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// File path template, absolute. May contain `{program}` and `{instance}`;
    /// None means no file (`"NONE"` in the config): only the in-memory ring.
    /// Default: `{log_dir}/{program}-{instance}.out.log` / `.err.log`.
    pub file: Option<String>,
    /// Rotate when the file reaches this size; 0 = never. Default 50 MiB.
    pub max_bytes: u64,
    /// How many rotated files to keep. Default 10.
    pub backups: u32,
    /// `"syslog"` in the config: each line goes as one message to this
    /// syslog socket (`[supervisor] syslog_socket`, `/dev/log` by
    /// default), tagged with the program's name, instead of a file.
    pub syslog: Option<PathBuf>,
}

/// `watch`: what to watch and what to leave alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// Files and folders (absolute), folders watched with all they hold.
    pub paths: Vec<PathBuf>,
    /// Names (shell patterns) of files and folders whose changes do not
    /// count, matched against every part of a changed path.
    pub ignore: Vec<String>,
    /// A restart waits until nothing changed for this long.
    pub debounce: Duration,
    /// Folders zdt itself writes to (logs, sockets): never count.
    pub skip: Vec<PathBuf>,
}

/// `watch_ignore` by default: version control, dependencies, editors' and
/// logs' files.
pub const DEFAULT_WATCH_IGNORE: [&str; 7] = [
    ".git",
    "node_modules",
    "vendor",
    "*.log",
    "*.swp",
    "*~",
    ".#*",
];

/// An address zdt binds and owns for a program.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    /// `tcp://IP:PORT` (IPv6 as `tcp://[::1]:PORT`).
    Tcp(std::net::SocketAddr),
    /// `unix:///abs/path` (or a path relative to the config file).
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// How a worker tells zdt it is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// No explicit readiness: up for `startsecs` = ready (supervisord).
    Startsecs,
    /// sd_notify: the worker sends `READY=1` to `$NOTIFY_SOCKET`.
    Notify,
    /// Ready this long after it was spawned.
    Delay(Duration),
    /// Ready when this command exits 0 (run repeatedly until then).
    Exec(Vec<String>),
    /// Proxy mode: ready when `GET path` on the private address answers 2xx.
    Http(String),
    /// Proxy mode: ready when the private address accepts a connection.
    Tcp,
}

/// How a worker is put behind the sockets zdt owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Socket activation: the worker accepts on fd 3...
    Pass,
    /// zdt accepts and forwards HTTP to the worker's private port.
    Proxy,
}

/// What the proxy forwards (proxy mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, request by request.
    Http,
    /// Bytes, connection by connection.
    Tcp,
}

/// Where a proxied worker listens (proxy mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    /// A free loopback port: `PORT`, `{port}`.
    Tcp,
    /// A unix socket zdt names: `SOCKET`, `{socket}`.
    Unix,
}

/// How a restart replaces the instances of a program that owns sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Start every new instance, wait for all to be ready, then stop the old ones.
    AllAtOnce,
    /// One instance at a time: each new one ready before its old one is stopped.
    Rolling,
}

/// A signal, validated at load time.
pub type Signal = nix::sys::signal::Signal;

/// One `[program.NAME]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramConfig {
    /// The table's name.
    pub name: String,
    /// argv; never empty. A string in the file is split like a shell would.
    pub command: Vec<String>,
    /// Working directory (absolute), if set. A symlink is resolved at each spawn.
    pub directory: Option<PathBuf>,
    /// Extra environment variables.
    pub environment: BTreeMap<String, String>,
    /// Run as this user (only when zdt runs as root).
    pub user: Option<String>,
    /// Run with this group (only when zdt runs as root). Default: the user's group.
    pub group: Option<String>,
    /// umask for the worker, if set ("022" octal string or integer in the file).
    pub umask: Option<u32>,
    /// Resource limits set on the worker before exec (soft and hard alike,
    /// as systemd's `LimitNOFILE=` does); None is "unlimited".
    pub limits: Vec<(Limit, Option<u64>)>,
    /// How many copies run (supervisord numprocs). Default 1, at least 1.
    pub instances: u32,
    /// Start when zdt starts. Default true.
    pub autostart: bool,
    /// Default `Unexpected`.
    pub autorestart: AutoRestart,
    /// Expected exit codes. Default `[0]`.
    pub exitcodes: Vec<i32>,
    /// Up this long = started successfully. Default 1s.
    pub startsecs: Duration,
    /// Failed starts in a row before FATAL. Default 3.
    pub startretries: u32,
    /// How long a crashed worker waits before it is started again (PM2's
    /// `restart_delay`); a failed start waits the longer of this and its
    /// backoff. Default 0.
    pub restart_delay: Duration,
    /// Restart an instance (without downtime, where it has `listen`) once
    /// its process group's resident memory has stayed above this many bytes
    /// for `max_memory_for` (PM2's `max_memory_restart`). Default none.
    pub max_memory: Option<u64>,
    /// How long the memory must stay above `max_memory`. Default 30 s.
    pub max_memory_for: Duration,
    /// A cron schedule (5 fields, or 6 with seconds first) in zdt's local
    /// time: the program is restarted as `zdtctl restart NAME` would at each
    /// time it names (PM2's `cron_restart`). Default none.
    pub cron_restart: Option<String>,
    /// Restart the program (without downtime where it has `listen`) when a
    /// file under these paths changes (PM2's `watch`, for development).
    pub watch: Option<WatchConfig>,
    /// Signal for a graceful stop. Default TERM.
    pub stop_signal: Signal,
    /// After stop_signal, wait this long before SIGKILL. Default 10s.
    pub kill_timeout: Duration,
    /// Drain bound for zero-downtime restarts. Default 30s.
    pub max_wait: Duration,
    /// Lower starts first and stops last. Default 999.
    pub priority: i32,
    /// Output to the stderr log too (supervisord redirect_stderr). Default false.
    pub redirect_stderr: bool,
    /// Start each captured line with its time (RFC 3339, UTC, ms). Default
    /// false.
    pub log_timestamps: bool,
    /// Start each captured line with `[gen G:I] `. Default true; false for
    /// apps that write JSON lines.
    pub log_prefix: bool,
    /// stdout log.
    pub stdout_log: LogConfig,
    /// stderr log.
    pub stderr_log: LogConfig,
    /// Sockets zdt binds and passes to every generation (pass mode).
    pub listen: Vec<ListenAddr>,
    /// listen(2) backlog; default: the system's somaxconn.
    pub backlog: Option<u32>,
    /// Mode of unix listening sockets. Default 0o660.
    pub socket_mode: u32,
    /// Owner of unix listening sockets, `user` or `user:group` (root only).
    pub socket_owner: Option<String>,
    /// `LISTEN_FDNAMES` entry for every socket. Default: the program name.
    pub fdname: String,
    /// Readiness check.
    pub ready: Ready,
    /// A new process not ready within this is a failed start. Default 30s.
    pub ready_timeout: Duration,
    /// With `ready = { notify = true }`: a ready worker must send `WATCHDOG=1`
    /// at least this often, or it is killed and restarted. None: no watchdog.
    pub watchdog: Option<Duration>,
    /// Restart strategy when the program owns sockets. Default all-at-once.
    pub strategy: Strategy,
    /// pass or proxy. Default pass.
    pub mode: Mode,
    /// Proxy mode: how long a request waits for a ready instance before 503.
    pub queue_timeout: Duration,
    /// Proxy mode: a client must send a request's whole header within this
    /// time after connecting or after its previous response (so it also
    /// closes idle keep-alive connections). Default 30s.
    pub header_timeout: Duration,
    /// Proxy mode: a request fully sent to a worker must get its answer's
    /// head within this, or the client gets 504 (counted as failed). Only
    /// the wait for the head: a streamed answer may pause longer. Default 60s.
    pub response_timeout: Duration,
    /// Proxy mode: a client that sends nothing of its request body for this
    /// long gets 408 and is closed. Default 60s.
    pub body_timeout: Duration,
    /// Proxy mode: zdt's pooled connections to a worker idle this long are
    /// closed. Default 60s.
    pub upstream_idle_timeout: Duration,
    /// Proxy mode: larger request headers are answered 431. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Proxy mode: open client connections per listening socket; at the cap
    /// zdt stops accepting until one closes. None: derived from the
    /// open-files limit when the proxy starts
    /// ([`crate::fds::default_max_connections`]).
    pub max_connections: Option<usize>,
    /// Proxy mode: add X-Forwarded-For, X-Real-IP, X-Forwarded-Proto. Default true.
    pub forward_headers: bool,
    /// Proxy mode, during a canary (`zdtctl restart --canary`): requests
    /// carrying this header are assigned to a generation by a stable hash
    /// of its value instead of the `zdt_canary` cookie. None: cookie only.
    pub canary_header: Option<String>,
    /// Proxy mode: http (default) or tcp.
    pub protocol: Protocol,
    /// Proxy mode: the worker listens on a loopback port (default) or a unix socket.
    pub upstream: UpstreamKind,
    /// Where zdt puts the workers' unix sockets: the control socket's directory.
    pub socket_dir: PathBuf,
    /// Releases: `zdtctl deploy` fills `root/releases/<id>` and switches
    /// `root/current`; each generation runs in the release it resolved.
    pub deploy: Option<DeployConfig>,
}

impl ProgramConfig {
    /// Whether a restart can overlap generations: only when zdt owns the
    /// sockets (otherwise the new process could not bind the old one's port).
    pub fn overlaps(&self) -> bool {
        self.mode == Mode::Proxy || !self.listen.is_empty()
    }
}
