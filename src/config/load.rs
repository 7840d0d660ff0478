//! Reading supervisor.toml: raw serde types (every table denies unknown keys),
//! then validation and resolution into [`Config`].
//!
//! Single-value errors (a bad duration, signal or command) come out of serde
//! with the value's position; cross-field errors use `Spanned` positions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::deploy::{self, RawDeploy};
use super::values::{
    AutoRestartValue, CommandValue, DurationValue, EnvValue, OctalValue, SignalValue, SizeValue,
};
use super::{
    AutoRestart, Config, ConfigError, Limit, ListenAddr, LogConfig, LogFormat, Mode, ProgramConfig,
    Protocol, Ready, Strategy, SupervisorConfig, UpstreamKind,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    include: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    supervisor: RawSupervisor,
    #[serde(default)]
    program: BTreeMap<Spanned<String>, RawProgram>,
    #[serde(default)]
    group: BTreeMap<Spanned<String>, RawGroup>,
}

/// A file named by `include`: programs and groups, and more includes; the
/// `[supervisor]` table belongs to the main file only.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIncluded {
    include: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    program: BTreeMap<Spanned<String>, RawProgram>,
    #[serde(default)]
    group: BTreeMap<Spanned<String>, RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    programs: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    control: Option<String>,
    control_mode: Option<Spanned<OctalValue>>,
    control_group: Option<String>,
    log_dir: Option<String>,
    pidfile: Option<String>,
    proxy_threads: Option<Spanned<i64>>,
    proxy_process: Option<bool>,
    admin: Option<Spanned<String>>,
    agent_check: Option<Spanned<String>>,
    drain_delay: Option<DurationValue>,
    log_format: Option<Spanned<String>>,
    syslog_socket: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProgram {
    command: Option<CommandValue>,
    directory: Option<String>,
    #[serde(default)]
    environment: BTreeMap<String, EnvValue>,
    env_file: Option<Spanned<toml::Value>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    umask: Option<Spanned<OctalValue>>,
    limits: Option<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
    #[serde(alias = "numprocs")]
    instances: Option<Spanned<i64>>,
    autostart: Option<bool>,
    autorestart: Option<AutoRestartValue>,
    exitcodes: Option<Vec<Spanned<i64>>>,
    startsecs: Option<DurationValue>,
    startretries: Option<u32>,
    restart_delay: Option<DurationValue>,
    #[serde(alias = "max_memory_restart")]
    max_memory: Option<Spanned<SizeValue>>,
    max_memory_for: Option<DurationValue>,
    cron_restart: Option<Spanned<String>>,
    watch: Option<Spanned<toml::Value>>,
    watch_ignore: Option<Vec<String>>,
    watch_debounce: Option<DurationValue>,
    #[serde(alias = "stopsignal")]
    stop_signal: Option<SignalValue>,
    #[serde(alias = "stopwaitsecs")]
    kill_timeout: Option<DurationValue>,
    max_wait: Option<DurationValue>,
    priority: Option<i32>,
    redirect_stderr: Option<bool>,
    log_timestamps: Option<bool>,
    log_prefix: Option<bool>,
    stdout_logfile: Option<Spanned<String>>,
    stdout_logfile_maxbytes: Option<SizeValue>,
    stdout_logfile_backups: Option<u32>,
    stderr_logfile: Option<Spanned<String>>,
    stderr_logfile_maxbytes: Option<SizeValue>,
    stderr_logfile_backups: Option<u32>,
    listen: Option<Vec<Spanned<String>>>,
    backlog: Option<u32>,
    socket_mode: Option<Spanned<OctalValue>>,
    socket_owner: Option<Spanned<String>>,
    fdname: Option<String>,
    mode: Option<Spanned<String>>,
    ready: Option<Spanned<ReadyValue>>,
    ready_timeout: Option<DurationValue>,
    watchdog: Option<Spanned<DurationValue>>,
    strategy: Option<Spanned<String>>,
    queue_timeout: Option<DurationValue>,
    header_timeout: Option<DurationValue>,
    response_timeout: Option<Spanned<DurationValue>>,
    body_timeout: Option<Spanned<DurationValue>>,
    upstream_idle_timeout: Option<Spanned<DurationValue>>,
    max_header_bytes: Option<Spanned<SizeValue>>,
    max_connections: Option<Spanned<i64>>,
    forward_headers: Option<bool>,
    canary_header: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    deploy: Option<RawDeploy>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReady {
    notify: Option<bool>,
    delay: Option<DurationValue>,
    exec: Option<CommandValue>,
    http: Option<String>,
    tcp: Option<bool>,
}

/// `ready` as a table, or as the name of a check that needs no value
/// (`ready = "notify"`, the form `zdt run --ready notify` takes).
struct ReadyValue(RawReady);

impl<'de> Deserialize<'de> for ReadyValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ReadyValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"notify\", \"tcp\", or a table such as { http = \"/health\" }")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ReadyValue, E> {
                let mut r = RawReady::default();
                match s {
                    "notify" => r.notify = Some(true),
                    "tcp" => r.tcp = Some(true),
                    _ => {
                        return Err(E::custom(format!(
                            "unknown ready {s:?}: use \"notify\", \"tcp\", or a table: {{ notify = true }}, {{ delay = \"1s\" }}, {{ exec = [\"cmd\"] }}, {{ http = \"/health\" }}, {{ tcp = true }}"
                        )))
                    }
                }
                Ok(ReadyValue(r))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ReadyValue, A::Error> {
                RawReady::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ReadyValue)
            }
        }
        d.deserialize_any(V)
    }
}

/// The most instances a program may have: each is a process with its log
/// buffers and, in proxy mode, a private port (100,000 took gigabytes and
/// minutes to reload).
pub const MAX_INSTANCES: u32 = 1024;

/// Parses `tcp://IP:PORT` or `unix://PATH`.
fn parse_listen(s: &str, resolve: impl Fn(&str) -> PathBuf) -> Result<ListenAddr, String> {
    if let Some(addr) = s.strip_prefix("tcp://") {
        addr.parse::<std::net::SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("invalid address {s:?}: expected tcp://IP:PORT such as tcp://0.0.0.0:9501 or tcp://[::1]:9501"))
    } else if let Some(path) = s.strip_prefix("unix://") {
        if path.is_empty() {
            Err(format!(
                "invalid address {s:?}: expected unix:///path/to/socket"
            ))
        } else {
            Ok(ListenAddr::Unix(resolve(path)))
        }
    } else {
        Err(format!(
            "invalid address {s:?}: expected tcp://IP:PORT or unix:///path"
        ))
    }
}

/// The most an env_file or an included file may hold.
const MAX_ENV_FILE: u64 = 1024 * 1024;

/// How deep includes may nest.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Where the files `include` names come from: the disk, or the texts an
/// upgrade carried (so the next binary runs what the old one ran, not what
/// the files say now).
trait Files {
    /// The files `pattern` (an absolute path, maybe with `*`, `?`, `[...]`)
    /// names, in name order. A path without wildcards names itself, so that
    /// a missing file is an error; a pattern may match nothing.
    fn matches(&self, pattern: &Path) -> Result<Vec<PathBuf>, String>;
    /// The text of `path`, and the path that identifies it (symlinks
    /// resolved) for finding cycles.
    fn read(&self, path: &Path) -> Result<(PathBuf, String), String>;
}

fn has_wildcards(p: &Path) -> bool {
    p.to_string_lossy().contains(['*', '?', '['])
}

/// As a shell matches: `*` stays within one folder, and does not match a
/// leading dot.
const GLOB: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: true,
};

struct Disk;

impl Files for Disk {
    fn matches(&self, pattern: &Path) -> Result<Vec<PathBuf>, String> {
        if !has_wildcards(pattern) {
            return Ok(vec![pattern.to_path_buf()]);
        }
        let text = pattern.to_str().ok_or("the path is not UTF-8")?;
        let mut found = Vec::new();
        for entry in glob::glob_with(text, GLOB).map_err(|e| format!("bad pattern: {e}"))? {
            let path = entry.map_err(|e| format!("{}: {}", e.path().display(), e.error()))?;
            if path.is_file() {
                found.push(path);
            }
        }
        found.sort();
        Ok(found)
    }

    fn read(&self, path: &Path) -> Result<(PathBuf, String), String> {
        let text = read_env_file(path)?;
        Ok((
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            text,
        ))
    }
}

/// The included files an upgrade carried, by the paths they were read from.
struct CarriedFiles<'a>(&'a [(PathBuf, String)]);

impl Files for CarriedFiles<'_> {
    fn matches(&self, pattern: &Path) -> Result<Vec<PathBuf>, String> {
        if !has_wildcards(pattern) {
            return Ok(vec![pattern.to_path_buf()]);
        }
        let text = pattern.to_str().ok_or("the path is not UTF-8")?;
        let glob = glob::Pattern::new(text).map_err(|e| format!("bad pattern: {e}"))?;
        let mut found: Vec<PathBuf> = self
            .0
            .iter()
            .map(|(p, _)| p.clone())
            .filter(|p| glob.matches_path_with(p, GLOB))
            .collect();
        found.sort();
        Ok(found)
    }

    fn read(&self, path: &Path) -> Result<(PathBuf, String), String> {
        match self.0.iter().find(|(p, _)| p == path) {
            Some((_, text)) => Ok((
                std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
                text.clone(),
            )),
            // A binary older than the carrying of these files handed over
            // none: the disk, as it read them itself.
            None => Disk.read(path),
        }
    }
}

/// One file of the configuration: the main file or an included one, with
/// what it defines.
struct Source {
    /// The path as named (by `include`, or the main file's): errors and
    /// relative paths use it, and an upgrade finds the text by it.
    file: PathBuf,
    /// The path with symlinks resolved: what tells two files apart.
    id: PathBuf,
    /// The text as read (error positions refer to it).
    source: String,
    expanded: super::expand::Expanded,
    programs: BTreeMap<Spanned<String>, RawProgram>,
    groups: BTreeMap<Spanned<String>, RawGroup>,
}

impl Source {
    fn err_at(&self, offset: usize, message: String) -> ConfigError {
        ConfigError::at(
            self.file.clone(),
            &self.source,
            self.expanded.original(offset),
            message,
        )
    }

    /// `p`, relative to this file's folder unless absolute.
    fn resolve(&self, p: &str) -> PathBuf {
        let base = self.file.parent().unwrap_or(Path::new("/"));
        base.join(p)
    }

    /// A mode (`control_mode`, `socket_mode`, `umask`). A mode written as a
    /// bare TOML integer is read in decimal: `600` would be 0o1130. Only
    /// 0o-prefixed integers and strings say octal.
    fn octal(&self, m: Option<Spanned<OctalValue>>, key: &str) -> Result<Option<u32>, ConfigError> {
        let Some(m) = m else { return Ok(None) };
        let literal = self.expanded.text.get(m.span()).unwrap_or("").trim();
        let bare = literal.starts_with(|c: char| c.is_ascii_digit())
            && !literal.starts_with("0o")
            && m.get_ref().0 != 0;
        if bare {
            return Err(self.err_at(
                m.span().start,
                format!(
                    "{key} = {literal} is a decimal number (octal {:o}): write the mode as a string, \"0{literal}\", or as 0o{literal}",
                    m.get_ref().0
                ),
            ));
        }
        Ok(Some(m.into_inner().0))
    }
}

/// Expands `${VAR}` in `source` and parses it as TOML into `T`; errors name
/// `file`'s own lines and columns.
fn parse_toml<T: serde::de::DeserializeOwned>(
    source: &str,
    file: &Path,
) -> Result<(super::expand::Expanded, T), ConfigError> {
    let expanded = super::expand::expand(source, |name| std::env::var(name).ok())
        .map_err(|(offset, msg)| ConfigError::at(file.to_path_buf(), source, offset, msg))?;
    let text = expanded.text.as_str();
    let raw: T = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let message = match e.message().trim_end() {
            // toml says nothing about a control character in a comment.
            "" => unexpected_char(text, offset),
            m => friendly(m),
        };
        ConfigError::at(
            file.to_path_buf(),
            source,
            expanded.original(offset),
            message,
        )
    })?;
    Ok((expanded, raw))
}

/// Reads the files `include` of `from` names (and the files they include),
/// appending each to `out`. `stack` holds the files being read, the main
/// file first, to refuse a cycle.
fn read_includes(
    from: &Source,
    include: Vec<Spanned<String>>,
    stack: &mut Vec<PathBuf>,
    files: &dyn Files,
    out: &mut Vec<Source>,
) -> Result<(), ConfigError> {
    for pattern in include {
        let at = pattern.span().start;
        let full = from.resolve(pattern.get_ref());
        let paths = files
            .matches(&full)
            .map_err(|e| from.err_at(at, format!("include {:?}: {e}", pattern.get_ref())))?;
        for path in paths {
            let (id, source) = files.read(&path).map_err(|e| {
                from.err_at(
                    at,
                    format!("include {:?}: {}: {e}", pattern.get_ref(), path.display()),
                )
            })?;
            if let Some(i) = stack.iter().position(|f| *f == id) {
                let chain: Vec<String> = stack[i..]
                    .iter()
                    .chain([&id])
                    .map(|f| f.display().to_string())
                    .collect();
                return Err(from.err_at(at, format!("include cycle: {}", chain.join(" includes "))));
            }
            if out.iter().any(|s| s.id == id) {
                return Err(from.err_at(at, format!("{} is included twice", path.display())));
            }
            if stack.len() >= MAX_INCLUDE_DEPTH {
                return Err(from.err_at(
                    at,
                    format!("includes nest deeper than {MAX_INCLUDE_DEPTH} files"),
                ));
            }
            let (expanded, raw): (_, RawIncluded) = parse_toml(&source, &path)?;
            let src = Source {
                file: path.clone(),
                id: id.clone(),
                source,
                expanded,
                programs: raw.program,
                groups: raw.group,
            };
            stack.push(id);
            read_includes(&src, raw.include.unwrap_or_default(), stack, files, out)?;
            stack.pop();
            out.push(src);
        }
    }
    Ok(())
}

fn config_default_ignore() -> Vec<String> {
    super::DEFAULT_WATCH_IGNORE
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// An env_file's text: a regular file of at most [`MAX_ENV_FILE`] bytes.
fn read_env_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_ENV_FILE {
        return Err(format!("larger than {MAX_ENV_FILE} bytes"));
    }
    let mut text = String::new();
    file.take(MAX_ENV_FILE)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    Ok(text)
}

/// Parses the admin listener's address: `IP:PORT`, `tcp://IP:PORT`,
/// `unix://PATH`, or a path (absolute, or with a `/` in it).
fn parse_admin(s: &str, resolve: impl Fn(&str) -> PathBuf) -> Result<ListenAddr, String> {
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return Ok(ListenAddr::Tcp(addr));
    }
    if s.starts_with("tcp://") || s.starts_with("unix://") {
        return parse_listen(s, resolve).map_err(|e| format!("admin: {e}"));
    }
    if s.contains('/') {
        return Ok(ListenAddr::Unix(resolve(s)));
    }
    Err(format!(
        "admin = {s:?}: expected IP:PORT such as \"127.0.0.1:9180\", or a unix socket path such as \"run/admin.sock\""
    ))
}

/// Why `name` cannot be a `canary_header`, if it cannot: it must be a
/// header name the application sends as it is (zdt rewrites or drops the
/// framing, hop-by-hop and X-Forwarded-* headers, and `Cookie` carries zdt's
/// own canary cookie).
fn canary_header_problem(name: &str) -> Option<&'static str> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Some("not a header name (letters, digits and - only, as in \"X-User-Id\")");
    }
    const ZDTS: [&str; 15] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "cookie",
        "x-forwarded-for",
        "x-real-ip",
        "x-forwarded-proto",
        "proxy-authorization",
    ];
    ZDTS.iter().any(|z| z.eq_ignore_ascii_case(name)).then_some(
        "zdt rewrites or reads this header itself; use an application header such as \"X-User-Id\"",
    )
}

/// Largest `max_connections` accepted (beyond any open-files limit).
const MAX_CONNECTIONS_LIMIT: usize = 1 << 24;

/// Default `response_timeout`: nginx's `proxy_read_timeout`.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `body_timeout`: nginx's `client_body_timeout`.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `upstream_idle_timeout`: nginx's `keepalive_timeout` for upstreams.
const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default rotation size of instance logs (supervisord's).
const DEFAULT_LOG_MAX_BYTES: u64 = 50 << 20;
/// Default number of rotated log files kept (supervisord's).
const DEFAULT_LOG_BACKUPS: u32 = 10;

/// Replaces Rust type names in serde's messages with words.
pub(super) fn friendly(message: &str) -> String {
    message
        .replace('\n', ": ")
        .replace("expected i64", "expected an integer")
        .replace("expected i32", "expected an integer")
        .replace("expected u32", "expected a non-negative integer")
        .replace("expected a boolean", "expected true or false")
        .replace(
            "expected struct RawProgram",
            "expected a [program.NAME] table",
        )
        .replace(
            "expected struct RawSupervisor",
            "expected the [supervisor] table",
        )
        .replace("expected struct RawFile", "expected a configuration file")
}

/// What is wrong with the character at byte `offset` of `text`, for a
/// syntax error toml gives no message for.
fn unexpected_char(text: &str, offset: usize) -> String {
    match text.get(offset..).and_then(|rest| rest.chars().next()) {
        Some(c) if c.is_control() => format!(
            "control character U+{:04X} is not allowed here (in a string, write it as \\u{:04X})",
            u32::from(c),
            u32::from(c)
        ),
        Some(c) => format!("unexpected character {c:?}"),
        None => "unexpected end of file".to_string(),
    }
}

/// Reads the file at `path`; returns its absolute path and its text.
pub(super) fn read(path: &Path) -> Result<(PathBuf, String), ConfigError> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let text = std::fs::read_to_string(&abs).map_err(|e| {
        ConfigError::whole_file(abs.clone(), format!("cannot read the configuration: {e}"))
    })?;
    Ok((abs, text))
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let (abs, text) = read(path)?;
    parse(&text, &abs)
}

/// Validates configuration `text` read from `file` (absolute; relative paths in
/// the text are resolved against its folder). Files it includes are read
/// from the disk.
pub fn parse(source: &str, file: &Path) -> Result<Config, ConfigError> {
    parse_with(source, file, &Disk)
}

/// [`parse`] for a configuration an upgrade carried: the files it includes
/// are the texts in `included`, as the running binary read them.
pub fn parse_carried(
    source: &str,
    file: &Path,
    included: &[(PathBuf, String)],
) -> Result<Config, ConfigError> {
    parse_with(source, file, &CarriedFiles(included))
}

fn parse_with(source: &str, file: &Path, files: &dyn Files) -> Result<Config, ConfigError> {
    // Named apart: `files` is also a program's env_file list below.
    let reader = files;
    // ${VAR} and ${VAR:-default} in strings, from zdt's environment; errors
    // name the file's own lines and columns.
    let (expanded, raw): (_, RawFile) = parse_toml(source, file)?;
    let RawFile {
        include,
        supervisor: s,
        program,
        group,
    } = raw;
    let main = Source {
        file: file.to_path_buf(),
        id: std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()),
        source: source.to_string(),
        expanded,
        programs: program,
        groups: group,
    };
    let err_at = |offset: usize, msg: String| main.err_at(offset, msg);
    let resolve = |p: &str| main.resolve(p);
    let octal = |m: Option<Spanned<OctalValue>>, key: &str| main.octal(m, key);
    let supervisor = SupervisorConfig {
        control: resolve(s.control.as_deref().unwrap_or("run/zdt.sock")),
        control_mode: octal(s.control_mode, "control_mode")?.unwrap_or(0o600),
        control_group: s.control_group,
        log_dir: resolve(s.log_dir.as_deref().unwrap_or("logs")),
        pidfile: s.pidfile.as_deref().map(resolve),
        proxy_threads: match s.proxy_threads {
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(v @ 1..=64) => v,
                _ => {
                    return Err(err_at(
                        n.span().start,
                        format!("proxy_threads = {}: use 1 to 64", n.get_ref()),
                    ))
                }
            },
        },
        proxy_process: s.proxy_process.unwrap_or(true),
        admin: match s.admin {
            None => None,
            Some(a) => {
                Some(parse_admin(a.get_ref(), resolve).map_err(|m| err_at(a.span().start, m))?)
            }
        },
        agent_check: match s.agent_check {
            None => None,
            Some(a) => Some(a.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
                err_at(
                    a.span().start,
                    format!(
                        "agent_check = {:?}: expected IP:PORT such as \"0.0.0.0:9181\"",
                        a.get_ref()
                    ),
                )
            })?),
        },
        drain_delay: s.drain_delay.map_or(std::time::Duration::ZERO, |d| d.0),
        syslog_socket: resolve(s.syslog_socket.as_deref().unwrap_or("/dev/log")),
        log_format: match s.log_format {
            None => LogFormat::Text,
            Some(f) => match f.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(err_at(
                        f.span().start,
                        format!("log_format = {other:?}: use \"text\" or \"json\""),
                    ))
                }
            },
        },
    };
    let mut sources = Vec::new();
    read_includes(
        &main,
        include.unwrap_or_default(),
        &mut vec![main.id.clone()],
        files,
        &mut sources,
    )?;
    let mut included: Vec<(PathBuf, String)> = sources
        .iter()
        .map(|s| (s.file.clone(), s.source.clone()))
        .collect();
    sources.insert(0, main);
    let is_root = nix::unistd::geteuid().is_root();
    let mut programs = BTreeMap::new();
    // Where each program is defined, to refuse a second definition.
    let mut defined: BTreeMap<String, String> = BTreeMap::new();
    // Which file defines each program with a deploy table.
    let mut deploy_source: BTreeMap<String, usize> = BTreeMap::new();
    let mut groups_raw = Vec::new();
    // Which program names each listen address, to refuse a second one.
    let mut listeners: BTreeMap<ListenAddr, String> = BTreeMap::new();
    // Each program's deploy table, merged per root once all are read.
    let mut deploys = BTreeMap::new();
    for (index, src) in sources.iter_mut().enumerate() {
        let src_programs = std::mem::take(&mut src.programs);
        groups_raw.push(std::mem::take(&mut src.groups));
        let src: &Source = src;
        let text = src.expanded.text.as_str();
        let err_at = |offset: usize, msg: String| src.err_at(offset, msg);
        let resolve = |p: &str| src.resolve(p);
        let octal = |m: Option<Spanned<OctalValue>>, key: &str| src.octal(m, key);
        for (name, p) in src_programs {
            let name_ok = !name.get_ref().is_empty()
                && name.get_ref() != "all"
                && name
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !name_ok {
                return Err(err_at(
                name.span().start,
                format!(
                    "invalid program name {:?}: use letters, digits, '_', '.', '-' (and not \"all\")",
                    name.get_ref()
                ),
            ));
            }
            let here = err_at(name.span().start, String::new());
            if let Some(first) = defined.get(name.get_ref()) {
                return Err(err_at(
                    name.span().start,
                    format!(
                        "program {:?} is defined twice: first at {first}",
                        name.get_ref()
                    ),
                ));
            }
            defined.insert(
                name.get_ref().clone(),
                format!("{}:{}", here.file.display(), here.line),
            );
            let name = name.into_inner();
            let command = p.command.ok_or_else(|| {
                let at = text.find(&format!("[program.{name}]")).unwrap_or(0);
                err_at(
                    at,
                    format!(
                    "program {name:?} has no command: add command = [\"program\", \"arg\", ...]"
                ),
                )
            })?;
            let instances = match p.instances {
                None => 1,
                Some(n) => u32::try_from(*n.get_ref())
                    .ok()
                    .filter(|n| (1..=MAX_INSTANCES).contains(n))
                    .ok_or_else(|| {
                        err_at(
                            n.span().start,
                            format!("instances = {}: use 1 to {MAX_INSTANCES}", n.get_ref()),
                        )
                    })?,
            };
            for who in [&p.user, &p.group].into_iter().flatten() {
                if !is_root {
                    return Err(err_at(
                    who.span().start,
                    format!(
                        "{:?} can only be used when zdt runs as root (it runs as uid {}); remove user/group or run zdt as root",
                        who.get_ref(),
                        nix::unistd::geteuid()
                    ),
                ));
                }
            }
            if let Some(u) = &p.user {
                if nix::unistd::User::from_name(u.get_ref())
                    .ok()
                    .flatten()
                    .is_none()
                {
                    return Err(err_at(
                        u.span().start,
                        format!("no user named {:?} on this system", u.get_ref()),
                    ));
                }
            }
            if let Some(g) = &p.group {
                if nix::unistd::Group::from_name(g.get_ref())
                    .ok()
                    .flatten()
                    .is_none()
                {
                    return Err(err_at(
                        g.span().start,
                        format!("no group named {:?} on this system", g.get_ref()),
                    ));
                }
            }
            let mut exitcodes = Vec::new();
            for c in p.exitcodes.unwrap_or_else(|| vec![Spanned::new(0..0, 0)]) {
                let code = i32::try_from(*c.get_ref())
                    .ok()
                    .filter(|c| (0..=255).contains(c));
                match code {
                    Some(code) => exitcodes.push(code),
                    None => {
                        return Err(err_at(
                            c.span().start,
                            format!("exit code {} is out of range 0..=255", c.get_ref()),
                        ))
                    }
                }
            }
            let log = |file: Option<Spanned<String>>,
                       max: Option<SizeValue>,
                       backups: Option<u32>,
                       ext: &str| {
                let syslog = file
                    .as_ref()
                    .filter(|f| f.get_ref().eq_ignore_ascii_case("syslog"))
                    .map(|_| supervisor.syslog_socket.clone());
                let template = match &file {
                    Some(f) if f.get_ref().eq_ignore_ascii_case("none") => None,
                    Some(_) if syslog.is_some() => None,
                    Some(f) => Some(resolve(f.get_ref()).display().to_string()),
                    None => Some(
                        supervisor
                            .log_dir
                            .join(format!("{{program}}-{{instance}}.{ext}.log"))
                            .display()
                            .to_string(),
                    ),
                };
                if let (Some(f), Some(t)) = (&file, &template) {
                    // zdt's own stdout and stderr take every instance's lines
                    // (each prefixed with its generation and instance, never
                    // rotated): `zdt run --instances 2`, a container's log.
                    if instances > 1
                        && !t.contains("{instance}")
                        && !crate::logs::is_own_stream(Path::new(t))
                    {
                        return Err(err_at(
                        f.span().start,
                        format!("{:?} is shared by {instances} instances: add {{instance}} to the file name", f.get_ref()),
                    ));
                    }
                }
                Ok(LogConfig {
                    file: template,
                    max_bytes: max.map_or(DEFAULT_LOG_MAX_BYTES, |m| m.0),
                    backups: backups.unwrap_or(DEFAULT_LOG_BACKUPS),
                    syslog,
                })
            };
            let stdout_log = log(
                p.stdout_logfile,
                p.stdout_logfile_maxbytes,
                p.stdout_logfile_backups,
                "out",
            )?;
            let stderr_log = log(
                p.stderr_logfile,
                p.stderr_logfile_maxbytes,
                p.stderr_logfile_backups,
                "err",
            )?;
            let mut listen = Vec::new();
            for l in p.listen.unwrap_or_default() {
                let addr = parse_listen(l.get_ref(), |p| resolve(p))
                    .map_err(|m| err_at(l.span().start, m))?;
                if listen.contains(&addr) {
                    return Err(err_at(l.span().start, format!("{addr} is listed twice")));
                }
                if let Some(other) = listeners.insert(addr.clone(), name.clone()) {
                    return Err(err_at(
                    l.span().start,
                    format!("{addr} is already the listen address of program {other:?}: two programs cannot accept on one socket (use instances = N for more processes)"),
                ));
                }
                listen.push(addr);
            }
            let mode = match p
                .mode
                .as_ref()
                .map(|m| (m.get_ref().as_str(), m.span().start))
            {
                None | Some(("pass", _)) => Mode::Pass,
                Some(("proxy", at)) => {
                    if listen.is_empty() {
                        return Err(err_at(
                            at,
                            "mode = \"proxy\" needs listen addresses for zdt to accept on"
                                .to_string(),
                        ));
                    }
                    Mode::Proxy
                }
                Some((other, at)) => {
                    return Err(err_at(
                        at,
                        format!("invalid mode {other:?}: use \"pass\" or \"proxy\""),
                    ))
                }
            };
            let protocol = match p
                .protocol
                .as_ref()
                .map(|m| (m.get_ref().as_str(), m.span().start))
            {
                None | Some(("http", _)) => Protocol::Http,
                Some(("tcp", at)) => {
                    if mode != Mode::Proxy {
                        return Err(err_at(
                            at,
                            "protocol = \"tcp\" needs mode = \"proxy\"".to_string(),
                        ));
                    }
                    Protocol::Tcp
                }
                Some((other, at)) => {
                    return Err(err_at(
                        at,
                        format!("invalid protocol {other:?}: use \"http\" or \"tcp\""),
                    ))
                }
            };
            let upstream = match p.upstream.as_ref().map(|m| (m.get_ref().as_str(), m.span().start)) {
            None | Some(("tcp", _)) => UpstreamKind::Tcp,
            Some(("unix", at)) => {
                if mode != Mode::Proxy {
                    return Err(err_at(
                        at,
                        "upstream = \"unix\" needs mode = \"proxy\"".to_string(),
                    ));
                }
                UpstreamKind::Unix
            }
            Some((other, at)) => {
                return Err(err_at(
                    at,
                    format!("invalid upstream {other:?}: use \"tcp\" (a loopback port) or \"unix\" (a socket)"),
                ))
            }
        };
            let ready = match p.ready {
                None => Ready::Startsecs,
                Some(r) => {
                    let at = r.span().start;
                    let r = r.into_inner().0;
                    let ready = match (r.notify, r.delay, r.exec, r.http, r.tcp) {
                    (Some(true), None, None, None, None) => Ready::Notify,
                    (None, Some(d), None, None, None) => Ready::Delay(d.0),
                    (None, None, Some(c), None, None) => Ready::Exec(c.0),
                    (None, None, None, Some(h), None) if h.starts_with('/') => Ready::Http(h),
                    (None, None, None, None, Some(true)) => Ready::Tcp,
                    (Some(false), None, None, None, None) => Ready::Startsecs,
                    _ => {
                        return Err(err_at(
                            at,
                            "ready needs exactly one of: { notify = true }, { delay = \"1s\" }, { exec = [\"cmd\", ...] }, and in proxy mode { http = \"/health\" } or { tcp = true }".to_string(),
                        ))
                    }
                };
                    if matches!(ready, Ready::Http(_) | Ready::Tcp) && mode != Mode::Proxy {
                        return Err(err_at(
                        at,
                        "ready = { http } and { tcp } probe the worker's private address, which only mode = \"proxy\" has (on a shared socket a probe cannot tell generations apart)".to_string(),
                    ));
                    }
                    ready
                }
            };
            if let Some(o) = &p.socket_owner {
                let (user, group) = o
                    .get_ref()
                    .split_once(':')
                    .map_or((o.get_ref().as_str(), None), |(u, g)| (u, Some(g)));
                let known = nix::unistd::User::from_name(user).ok().flatten().is_some()
                    && group
                        .is_none_or(|g| nix::unistd::Group::from_name(g).ok().flatten().is_some());
                if !is_root || !known {
                    let why = if is_root {
                        "no such user or group"
                    } else {
                        "zdt must run as root to change a socket's owner"
                    };
                    return Err(err_at(
                        o.span().start,
                        format!("socket_owner {:?}: {why}", o.get_ref()),
                    ));
                }
            }
            if let Some(w) = &p.watchdog {
                if ready != Ready::Notify {
                    return Err(err_at(
                    w.span().start,
                    "watchdog needs ready = { notify = true }: WATCHDOG=1 comes over the notify socket".to_string(),
                ));
                }
            }
            let strategy = match p.strategy.as_ref().map(|s| s.get_ref().as_str()) {
                None | Some("all-at-once") => Strategy::AllAtOnce,
                Some("rolling") => Strategy::Rolling,
                Some(other) => {
                    let at = p.strategy.as_ref().map_or(0, |s| s.span().start);
                    return Err(err_at(
                        at,
                        format!("invalid strategy {other:?}: use \"all-at-once\" or \"rolling\""),
                    ));
                }
            };
            let max_header_bytes = match p.max_header_bytes {
                None => 64 * 1024,
                Some(m) => {
                    let n = m.get_ref().0;
                    if !(1024..=16 * 1024 * 1024).contains(&n) {
                        return Err(err_at(
                            m.span().start,
                            format!("max_header_bytes {n} is out of range: use 1KB to 16MB"),
                        ));
                    }
                    n as usize
                }
            };
            let max_connections = match p.max_connections {
                None => None,
                Some(m) => {
                    let n = *m.get_ref();
                    if mode != Mode::Proxy {
                        return Err(err_at(
                        m.span().start,
                        "max_connections needs mode = \"proxy\" (in pass mode the worker accepts the connections)".to_string(),
                    ));
                    }
                    match usize::try_from(n) {
                    Ok(v @ 1..=MAX_CONNECTIONS_LIMIT) => Some(v),
                    _ => {
                        return Err(err_at(
                            m.span().start,
                            format!("max_connections = {n}: use 1 to {MAX_CONNECTIONS_LIMIT} (or leave it out for a default derived from the open-files limit)"),
                        ))
                    }
                }
                }
            };
            let canary_header = match p.canary_header {
                None => None,
                Some(h) => {
                    let at = h.span().start;
                    let h = h.into_inner();
                    if mode != Mode::Proxy || protocol != Protocol::Http {
                        return Err(err_at(
                        at,
                        "canary_header needs mode = \"proxy\" with protocol = \"http\" (zdt must see each request's headers)".to_string(),
                    ));
                    }
                    if let Some(why) = canary_header_problem(&h) {
                        return Err(err_at(at, format!("canary_header {h:?}: {why}")));
                    }
                    Some(h)
                }
            };
            // A proxy timeout: above zero (zero would end every request at once).
            let timeout = |t: Option<Spanned<DurationValue>>,
                           key: &str,
                           default: Duration|
             -> Result<Duration, ConfigError> {
                match t {
                    None => Ok(default),
                    Some(t) if t.get_ref().0.is_zero() => Err(err_at(
                        t.span().start,
                        format!(
                            "{key} must be above 0 (leave it out for {}s)",
                            default.as_secs()
                        ),
                    )),
                    Some(t) => Ok(t.into_inner().0),
                }
            };
            let response_timeout = timeout(
                p.response_timeout,
                "response_timeout",
                DEFAULT_RESPONSE_TIMEOUT,
            )?;
            let body_timeout = timeout(p.body_timeout, "body_timeout", DEFAULT_BODY_TIMEOUT)?;
            let upstream_idle_timeout = timeout(
                p.upstream_idle_timeout,
                "upstream_idle_timeout",
                DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            )?;
            if let Some(d) = p.deploy {
                deploys.insert(name.clone(), deploy::parse(d, &resolve, &err_at)?);
                deploy_source.insert(name.clone(), index);
            }
            let cfg = ProgramConfig {
                name: name.clone(),
                command: command.0,
                directory: p.directory.as_deref().map(resolve),
                environment: {
                    // env_file first, in order; `environment` wins over them.
                    let mut env = BTreeMap::new();
                    if let Some(files) = p.env_file {
                        let at = files.span().start;
                        let paths: Vec<String> = match files.into_inner() {
                            toml::Value::String(s) => vec![s],
                            toml::Value::Array(a) => a
                                .into_iter()
                                .map(|v| match v {
                                    toml::Value::String(s) => Ok(s),
                                    _ => Err(err_at(
                                        at,
                                        "env_file: expected a path or a list of paths".into(),
                                    )),
                                })
                                .collect::<Result<_, _>>()?,
                            _ => {
                                return Err(err_at(
                                    at,
                                    "env_file: expected a path or a list of paths".into(),
                                ))
                            }
                        };
                        for path in paths {
                            let abs = resolve(&path);
                            let (_, text) = reader
                                .read(&abs)
                                .map_err(|e| err_at(at, format!("env_file {path:?}: {e}")))?;
                            if !included.iter().any(|(f, _)| *f == abs) {
                                included.push((abs.clone(), text.clone()));
                            }
                            let vars = super::dotenv::parse(&text).map_err(|(offset, msg)| {
                                ConfigError::at(abs.clone(), &text, offset, msg)
                            })?;
                            env.extend(vars);
                        }
                    }
                    env.extend(p.environment.into_iter().map(|(k, v)| (k, v.0)));
                    env
                },
                user: p.user.map(Spanned::into_inner),
                group: p.group.map(Spanned::into_inner),
                umask: octal(p.umask, "umask")?,
                limits: {
                    let mut out = Vec::new();
                    for (key, value) in p.limits.unwrap_or_default() {
                        let Some((limit, _)) = Limit::ALL.iter().find(|(_, k)| k == key.get_ref())
                        else {
                            let known: Vec<&str> = Limit::ALL.iter().map(|(_, k)| *k).collect();
                            return Err(err_at(
                                key.span().start,
                                format!(
                                    "unknown limit {:?}: use one of {}",
                                    key.get_ref(),
                                    known.join(", ")
                                ),
                            ));
                        };
                        let v = match value.get_ref() {
                            toml::Value::Integer(n) if *n >= 0 => Some(*n as u64),
                            toml::Value::String(s) if s == "unlimited" => None,
                            _ => {
                                return Err(err_at(
                                    value.span().start,
                                    format!(
                                        "limits.{}: expected a number (0 or more) or \"unlimited\"",
                                        key.get_ref()
                                    ),
                                ))
                            }
                        };
                        out.push((*limit, v));
                    }
                    out
                },
                instances,
                autostart: p.autostart.unwrap_or(true),
                autorestart: p.autorestart.map_or(AutoRestart::Unexpected, |a| a.0),
                exitcodes,
                startsecs: p
                    .startsecs
                    .map_or(std::time::Duration::from_secs(1), |d| d.0),
                startretries: p.startretries.unwrap_or(3),
                restart_delay: p.restart_delay.map_or(std::time::Duration::ZERO, |d| d.0),
                max_memory: match p.max_memory {
                    None => None,
                    Some(m) if m.get_ref().0 < 1 << 20 => {
                        return Err(err_at(
                            m.span().start,
                            format!(
                                "max_memory = {} bytes: use at least \"1MB\" (a size such as \"512MB\")",
                                m.get_ref().0
                            ),
                        ))
                    }
                    Some(m) => Some(m.into_inner().0),
                },
                max_memory_for: p
                    .max_memory_for
                    .map_or(std::time::Duration::from_secs(30), |d| d.0),
                watch: match p.watch {
                    None => None,
                    Some(w) => {
                        let at = w.span().start;
                        let expected = || {
                            err_at(
                                at,
                                "watch: expected true (the program's directory) or a list of paths, such as [\"src\", \"config\"]".into(),
                            )
                        };
                        let paths: Vec<PathBuf> = match w.into_inner() {
                            toml::Value::Boolean(false) => Vec::new(),
                            toml::Value::Boolean(true) => vec![p
                                .directory
                                .as_deref()
                                .map_or_else(|| resolve("."), resolve)],
                            toml::Value::Array(list) => list
                                .into_iter()
                                .map(|v| match v {
                                    toml::Value::String(s) if !s.is_empty() => Ok(resolve(&s)),
                                    _ => Err(expected()),
                                })
                                .collect::<Result<_, _>>()?,
                            _ => return Err(expected()),
                        };
                        let ignore = p.watch_ignore.clone().unwrap_or_else(|| {
                            config_default_ignore()
                        });
                        if let Some(bad) = ignore.iter().find(|i| glob::Pattern::new(i).is_err()) {
                            return Err(err_at(at, format!("watch_ignore: {bad:?} is not a valid pattern")));
                        }
                        let mut skip = vec![supervisor.log_dir.clone()];
                        skip.extend(supervisor.control.parent().map(Path::to_path_buf));
                        for log in [&stdout_log, &stderr_log] {
                            if let Some(dir) = log.file.as_deref().and_then(|f| Path::new(f).parent()) {
                                if !dir.to_string_lossy().contains('{') {
                                    skip.push(dir.to_path_buf());
                                }
                            }
                        }
                        (!paths.is_empty()).then(|| super::WatchConfig {
                            paths,
                            ignore,
                            debounce: p
                                .watch_debounce
                                .map_or(std::time::Duration::from_millis(500), |d| d.0),
                            skip,
                        })
                    }
                },
                cron_restart: match p.cron_restart {
                    None => None,
                    Some(c) => match super::cron::parse(c.get_ref()) {
                        Ok(_) => Some(c.into_inner()),
                        Err(e) => return Err(err_at(c.span().start, e)),
                    },
                },
                stop_signal: p
                    .stop_signal
                    .map_or(nix::sys::signal::Signal::SIGTERM, |s| s.0),
                kill_timeout: p
                    .kill_timeout
                    .map_or(std::time::Duration::from_secs(10), |d| d.0),
                max_wait: p
                    .max_wait
                    .map_or(std::time::Duration::from_secs(30), |d| d.0),
                priority: p.priority.unwrap_or(999),
                redirect_stderr: p.redirect_stderr.unwrap_or(false),
                log_timestamps: p.log_timestamps.unwrap_or(false),
                log_prefix: p.log_prefix.unwrap_or(true),
                stdout_log,
                stderr_log,
                listen,
                backlog: p.backlog,
                socket_mode: octal(p.socket_mode, "socket_mode")?.unwrap_or(0o660),
                socket_owner: p.socket_owner.map(Spanned::into_inner),
                fdname: p.fdname.unwrap_or_else(|| name.clone()),
                ready,
                ready_timeout: p
                    .ready_timeout
                    .map_or(std::time::Duration::from_secs(30), |d| d.0),
                strategy,
                watchdog: p.watchdog.map(|w| w.into_inner().0),
                mode,
                queue_timeout: p
                    .queue_timeout
                    .map_or(std::time::Duration::from_secs(5), |d| d.0),
                header_timeout: p
                    .header_timeout
                    .map_or(std::time::Duration::from_secs(30), |d| d.0),
                response_timeout,
                body_timeout,
                upstream_idle_timeout,
                max_header_bytes,
                max_connections,
                forward_headers: p.forward_headers.unwrap_or(true),
                canary_header,
                protocol,
                upstream,
                socket_dir: supervisor
                    .control
                    .parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                deploy: None,
            };
            programs.insert(name, cfg);
        }
    }
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (src, raw_groups) in sources.iter().zip(groups_raw) {
        for (name, g) in raw_groups {
            let at = name.span().start;
            let name = name.into_inner();
            let name_ok = !name.is_empty()
                && name != "all"
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !name_ok {
                return Err(src.err_at(
                    at,
                    format!("invalid group name {name:?}: use letters, digits, '_', '.', '-' (and not \"all\")"),
                ));
            }
            if programs.contains_key(&name) {
                return Err(src.err_at(
                    at,
                    format!("group {name:?} has the name of a program: `zdtctl restart {name}` could not tell them apart; rename one"),
                ));
            }
            if groups.contains_key(&name) {
                return Err(src.err_at(at, format!("group {name:?} is defined twice")));
            }
            if g.programs.is_empty() {
                return Err(src.err_at(
                    at,
                    format!("group {name:?} has no programs: list them, programs = [\"web\", \"worker\"]"),
                ));
            }
            let mut members: Vec<String> = Vec::new();
            for p in g.programs {
                if !programs.contains_key(p.get_ref()) {
                    let known: Vec<&str> = programs.keys().map(String::as_str).collect();
                    return Err(src.err_at(
                        p.span().start,
                        format!(
                            "group {name:?}: no program named {:?} (programs: {})",
                            p.get_ref(),
                            known.join(", ")
                        ),
                    ));
                }
                if !members.contains(p.get_ref()) {
                    members.push(p.into_inner());
                }
            }
            groups.insert(name, members);
        }
    }
    let deploy_err = |program: &str, offset: usize, msg: String| {
        let src = deploy_source.get(program).and_then(|&i| sources.get(i));
        match src {
            Some(src) => src.err_at(offset, msg),
            None => sources[0].err_at(offset, msg),
        }
    };
    for (name, d) in deploy::merge_groups(deploys, &deploy_err)? {
        if let Some(p) = programs.get_mut(&name) {
            p.deploy = Some(d);
        }
    }
    Ok(Config {
        file: file.to_path_buf(),
        supervisor,
        programs,
        groups,
        text: source.to_string(),
        included,
    })
}
