//! supervisord.conf → supervisor.toml.
//!
//! Reads the file and what its `[include] files` name (globs relative to
//! the including file's folder; a cycle is an error), expands supervisord's
//! `%(name)s` per section, and maps each section: `[program:x]` and
//! `[fcgi-program:x]` to `[program.x]`, `[group:x]` to `[group.x]`, what
//! has a meaning of `[supervisord]` and `[unix_http_server]` to
//! `[supervisor]`; the rest is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use toml::Value;

use super::ini::{self, Entry, Section};
use super::out::key;
use super::pyformat::{self, Names, Seg};
use super::{Doc, ImportError, Source, Table};

/// The largest file read (a config, not a log).
const MAX_FILE: u64 = 4 << 20;

/// Imports the supervisord configuration at `path`.
pub(crate) fn import(path: &Path) -> Result<Doc, ImportError> {
    let mut doc = Doc::new();
    let mut sections = Vec::new();
    load(path, None, &mut Vec::new(), &mut sections, &mut doc)?;
    map(&sections, &mut doc)?;
    Ok(doc)
}

/// Reads a file of at most [`MAX_FILE`] bytes; `from` is the include that
/// named it.
pub(crate) fn read(path: &Path, from: Option<&Source>) -> Result<String, ImportError> {
    let at = from.cloned().unwrap_or_else(|| Source::file(path));
    let cannot =
        |e: String| ImportError::new(at.clone(), format!("cannot read {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| cannot(e.to_string()))?;
    if !meta.is_file() {
        return Err(cannot("not a regular file".into()));
    }
    if meta.len() > MAX_FILE {
        return Err(cannot(format!("larger than {MAX_FILE} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| cannot(e.to_string()))?;
    String::from_utf8(bytes).map_err(|_| cannot("not UTF-8 text".into()))
}

/// The folder of `file`, absolute.
pub(crate) fn folder_of(file: &Path) -> PathBuf {
    let dir = file.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Reads `path` and, depth first, the files its `[include]` names.
fn load(
    path: &Path,
    from: Option<&Source>,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<Section>,
    doc: &mut Doc,
) -> Result<(), ImportError> {
    let text = read(path, from)?;
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    stack.push(canon);
    let here = folder_of(path);
    for section in ini::parse(&text, path)? {
        if section.name != "include" {
            out.push(section);
            continue;
        }
        for e in &section.entries {
            let at = Source::at(path, e.line);
            if e.key != "files" {
                doc.note(
                    at,
                    format!("[include] {} has no meaning (only files)", e.key),
                );
                continue;
            }
            let names = Names {
                fixed: [("here", here.display().to_string())].into_iter().collect(),
                process_num_start: None,
            };
            for pattern in e.value.split_whitespace() {
                let segs = pyformat::expand(pattern, &names)
                    .map_err(|m| ImportError::new(at.clone(), format!("[include] files: {m}")))?;
                let pattern: String = segs
                    .iter()
                    .map(|s| match s {
                        Seg::Lit(l) => l.clone(),
                        Seg::Env(v) => std::env::var(v).unwrap_or_default(),
                        Seg::Num { .. } => String::new(),
                    })
                    .collect();
                let full = here.join(&pattern);
                let options = glob::MatchOptions {
                    require_literal_leading_dot: true,
                    ..glob::MatchOptions::new()
                };
                let matches = glob::glob_with(&full.to_string_lossy(), options).map_err(|e| {
                    ImportError::new(
                        at.clone(),
                        format!("[include] files: bad pattern {pattern:?}: {e}"),
                    )
                })?;
                let mut files: Vec<PathBuf> = matches.flatten().filter(|p| p.is_file()).collect();
                files.sort();
                if files.is_empty() {
                    doc.note(
                        at.clone(),
                        format!(
                            "[include] no file matches {} (supervisord skips it too)",
                            full.display()
                        ),
                    );
                }
                for f in files {
                    let canon = std::fs::canonicalize(&f).unwrap_or_else(|_| f.clone());
                    if let Some(first) = stack.iter().position(|p| *p == canon) {
                        let chain: Vec<String> = stack[first..]
                            .iter()
                            .chain(std::iter::once(&canon))
                            .map(|p| p.display().to_string())
                            .collect();
                        return Err(ImportError::new(
                            at.clone(),
                            format!("[include] cycle: {}", chain.join(" → ")),
                        ));
                    }
                    load(&f, Some(&at), stack, out, doc)?;
                }
            }
        }
    }
    stack.pop();
    Ok(())
}

/// An option's place.
fn at(s: &Section, e: &Entry) -> Source {
    Source::at(&s.at.file, e.line)
}

/// An error about an option's value.
fn bad(s: &Section, e: &Entry, what: &str) -> ImportError {
    ImportError::new(
        at(s, e),
        format!("[{}] {} = {:?}: {what}", s.name, e.key, e.value),
    )
}

/// A value that must be a number or a boolean in zdt's file: its
/// `%(ENV_X)s` are read from this environment now (zdt's `${X}` works in
/// strings only).
fn value_now(s: &Section, e: &Entry) -> Result<String, ImportError> {
    if !e.value.contains("%(") {
        return Ok(e.value.trim().to_string());
    }
    let names = Names {
        fixed: [("here", folder_of(&s.at.file).display().to_string())]
            .into_iter()
            .collect(),
        process_num_start: None,
    };
    let segs = pyformat::expand(&e.value, &names).map_err(|m| bad(s, e, &m))?;
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Lit(l) => out.push_str(&l),
            Seg::Env(v) => out.push_str(&std::env::var(&v).map_err(|_| {
                bad(s, e, &format!("{v} is not set in this environment: it is read when importing, as zdt needs a number or true/false here"))
            })?),
            Seg::Num { .. } => return Err(bad(s, e, "%(process_num) cannot be used here")),
        }
    }
    Ok(out.trim().to_string())
}

fn int(s: &Section, e: &Entry) -> Result<i64, ImportError> {
    value_now(s, e)?
        .parse()
        .map_err(|_| bad(s, e, "expected an integer"))
}

fn boolean(s: &Section, e: &Entry) -> Result<bool, ImportError> {
    match value_now(s, e)?.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(bad(s, e, "expected true or false")),
    }
}

/// supervisord's section kinds.
fn kind(name: &str) -> (&str, &str) {
    name.split_once(':').unwrap_or((name, ""))
}

fn map(sections: &[Section], doc: &mut Doc) -> Result<(), ImportError> {
    // [supervisord] environment reaches every program; a program's group
    // is its %(group_name)s.
    let mut global_env: Vec<(String, String, Source)> = Vec::new();
    let mut group_of: BTreeMap<String, String> = BTreeMap::new();
    for s in sections {
        match kind(&s.name) {
            ("supervisord", _) => {
                if let Some(e) = s.get("environment") {
                    for (k, v) in parse_env(&e.value).map_err(|m| bad(s, e, &m))? {
                        global_env.push((k, v, at(s, e)));
                    }
                }
            }
            ("group", g) => {
                if let Some(e) = s.get("programs") {
                    for p in e.value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        group_of.insert(p.to_string(), g.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    for s in sections {
        match kind(&s.name) {
            ("supervisord", _) => supervisord_section(s, doc)?,
            ("unix_http_server", _) => unix_http_server(s, doc),
            ("program", name) | ("fcgi-program", name) => {
                let fcgi = s.name.starts_with("fcgi-");
                let table = program(s, name, fcgi, group_of.get(name), &global_env, doc)?;
                if !seen.insert(table.header.clone()) {
                    doc.note(s.at.clone(), format!("[{}] is defined again: the last one is kept", s.name));
                    doc.programs.retain(|t| t.header != table.header);
                }
                doc.programs.push(table);
            }
            ("group", name) => group(s, name, doc),
            ("inet_http_server", _) => doc.note(
                s.at.clone(),
                "[inet_http_server]: zdtctl speaks to zdt over a unix socket only; for read-only HTTP (/health, /metrics, /status) see [supervisor] admin",
            ),
            ("supervisorctl", _) => doc.note(
                s.at.clone(),
                "[supervisorctl]: not needed, zdtctl finds the control socket from the config (-c) or takes -s SOCKET",
            ),
            ("rpcinterface", _) => doc.note(
                s.at.clone(),
                format!("[{}]: not needed, zdtctl has its own protocol (no XML-RPC)", s.name),
            ),
            ("eventlistener", _) => doc.note(
                s.at.clone(),
                format!("[{}]: zdt has no event listeners (zdtctl status --json, the admin listener's /status and /metrics report states instead)", s.name),
            ),
            _ => doc.note(
                s.at.clone(),
                format!("[{}]: unknown section, not mapped", s.name),
            ),
        }
    }
    Ok(())
}

/// Parses supervisord's `KEY="val",KEY2=val2` (quotes as the shell's).
pub(crate) fn parse_env(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("expected KEY=value, found {key:?}"));
        }
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err("a value without a KEY=".into());
        }
        let mut value = String::new();
        let mut quote: Option<char> = None;
        while let Some(&c) = chars.peek() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => value.push(c),
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c == ',' => break,
                None => value.push(c),
            }
            chars.next();
        }
        if quote.is_some() {
            return Err(format!("unclosed quote in the value of {key}"));
        }
        out.push((key, value.trim().to_string()));
    }
}

fn supervisord_section(s: &Section, doc: &mut Doc) -> Result<(), ImportError> {
    let names = Names {
        fixed: [("here", folder_of(&s.at.file).display().to_string())]
            .into_iter()
            .collect(),
        process_num_start: None,
    };
    for e in &s.entries {
        let expanded = || -> Result<String, ImportError> {
            let segs = pyformat::expand(&e.value, &names).map_err(|m| bad(s, e, &m))?;
            pyformat::zdt_string(&segs).ok_or_else(|| bad(s, e, "cannot be expanded"))
        };
        match e.key.as_str() {
            "childlogdir" => doc.supervisor.set_noted(
                "log_dir",
                expanded()?,
                "childlogdir: every program's default log files go here",
            ),
            "pidfile" => doc.supervisor.set("pidfile", expanded()?),
            "environment" => {} // into every program (see map)
            "nodaemon" => {
                if !boolean(s, e)? {
                    doc.note(at(s, e), "nodaemon = false: zdt never daemonizes; run it under a service manager (contrib/zdt.service)");
                }
            }
            "logfile" | "logfile_maxbytes" | "logfile_backups" => doc.note(
                at(s, e),
                format!("[supervisord] {}: zdt writes its own log to stderr (the journal under systemd; [supervisor] log_format = \"json\" for machines)", e.key),
            ),
            "loglevel" => doc.note(
                at(s, e),
                format!("[supervisord] loglevel = {}: set ZDT_LOG (error, warn, info, debug) in zdt's environment", e.value),
            ),
            "minfds" => doc.note(
                at(s, e),
                "[supervisord] minfds: zdt raises its own open-files limit at start; a worker's is set per program with limits = { nofile = N }",
            ),
            other => doc.note(
                at(s, e),
                format!("[supervisord] {other}: no zdt equivalent"),
            ),
        }
    }
    Ok(())
}

fn unix_http_server(s: &Section, doc: &mut Doc) {
    let names = Names {
        fixed: [("here", folder_of(&s.at.file).display().to_string())]
            .into_iter()
            .collect(),
        process_num_start: None,
    };
    for e in &s.entries {
        match e.key.as_str() {
            "file" => match pyformat::expand(&e.value, &names)
                .ok()
                .and_then(|segs| pyformat::zdt_string(&segs))
            {
                Some(f) => doc.supervisor.set_noted(
                    "control",
                    f,
                    "[unix_http_server] file: zdtctl's socket (zdtctl -c this file finds it)",
                ),
                None => doc.note(at(s, e), format!("[unix_http_server] file = {:?}: cannot be expanded", e.value)),
            },
            "chmod" => match crate::config::parse_octal(&e.value) {
                Ok(m) => doc.supervisor.set("control_mode", format!("0{m:o}")),
                Err(m) => doc.note(at(s, e), format!("[unix_http_server] chmod: {m}")),
            },
            "chown" => match e.value.split_once(':') {
                Some((user, group)) => {
                    doc.supervisor.set_noted(
                        "control_group",
                        group.trim(),
                        format!("chown = {}: members of the group may use zdtctl; the socket stays zdt's user's", e.value),
                    );
                    let _ = user;
                }
                None => doc.note(
                    at(s, e),
                    format!("[unix_http_server] chown = {}: zdt's socket belongs to zdt's user; give other users a group with control_group", e.value),
                ),
            },
            "username" | "password" => doc.note(
                at(s, e),
                format!("[unix_http_server] {}: zdt checks who connects by uid (SO_PEERCRED), not a password", e.key),
            ),
            other => doc.note(at(s, e), format!("[unix_http_server] {other}: no zdt equivalent")),
        }
    }
}

fn group(s: &Section, name: &str, doc: &mut Doc) {
    let (zname, renamed) = super::program_name(name);
    let mut t = Table::new(format!("group.{}", key(&zname)));
    if renamed {
        t.comment(format!(
            "group {name:?} is renamed {zname:?}: zdt takes letters, digits, '_', '.', '-'"
        ));
    }
    for e in &s.entries {
        match e.key.as_str() {
            "programs" => {
                let list: Vec<Value> = e
                    .value
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| Value::String(super::program_name(p).0))
                    .collect();
                t.set("programs", Value::Array(list));
            }
            "priority" => doc.note(
                at(s, e),
                format!(
                    "[{}] priority: zdt orders programs, not groups (set priority on each program)",
                    s.name
                ),
            ),
            other => doc.note(at(s, e), format!("[{}] {other}: no zdt equivalent", s.name)),
        }
    }
    doc.groups.push(t);
}

/// A size in supervisord's form ("50MB", "1KB", bytes) for zdt.
fn size(s: &Section, e: &Entry) -> Result<Value, ImportError> {
    let v = e.value.trim().to_ascii_uppercase();
    crate::config::parse_size(&v).map_err(|m| bad(s, e, &m))?;
    Ok(match v.parse::<i64>() {
        Ok(n) => Value::Integer(n),
        Err(_) => Value::String(v),
    })
}

/// Keys of `[program:x]` this module maps (the rest is reported).
const PROGRAM_KEYS: &[&str] = &[
    "command",
    "process_name",
    "numprocs",
    "numprocs_start",
    "directory",
    "user",
    "umask",
    "environment",
    "priority",
    "autostart",
    "autorestart",
    "exitcodes",
    "startsecs",
    "startretries",
    "stopsignal",
    "stopwaitsecs",
    "stopasgroup",
    "killasgroup",
    "redirect_stderr",
    "stdout_logfile",
    "stdout_logfile_maxbytes",
    "stdout_logfile_backups",
    "stderr_logfile",
    "stderr_logfile_maxbytes",
    "stderr_logfile_backups",
    "socket",
    "socket_backlog",
    "socket_owner",
    "socket_mode",
];

fn program(
    s: &Section,
    name: &str,
    fcgi: bool,
    group: Option<&String>,
    global_env: &[(String, String, Source)],
    doc: &mut Doc,
) -> Result<Table, ImportError> {
    let (zname, renamed) = super::program_name(name);
    let mut t = Table::program(&zname);
    if renamed {
        t.comment(format!("program {name:?} is renamed {zname:?}: zdt takes letters, digits, '_', '.', '-' (and not \"all\")"));
    }
    let numprocs = match s.get("numprocs") {
        None => 1,
        Some(e) => match int(s, e)? {
            n @ 1..=1024 => n,
            _ => return Err(bad(s, e, "use 1 to 1024")),
        },
    };
    let start = match s.get("numprocs_start") {
        None => 0,
        Some(e) => u32::try_from(int(s, e)?).map_err(|_| bad(s, e, "must not be negative"))?,
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let names = Names {
        fixed: [
            ("program_name", name.to_string()),
            (
                "group_name",
                group.cloned().unwrap_or_else(|| name.to_string()),
            ),
            ("here", folder_of(&s.at.file).display().to_string()),
            ("host_node_name", host),
            ("numprocs", numprocs.to_string()),
        ]
        .into_iter()
        .collect(),
        process_num_start: Some(start),
    };
    let expand = |e: &Entry| pyformat::expand(&e.value, &names).map_err(|m| bad(s, e, &m));
    let plain = |e: &Entry| -> Result<String, ImportError> {
        pyformat::zdt_string(&expand(e)?)
            .ok_or_else(|| bad(s, e, "%(process_num)s has no zdt equivalent here"))
    };

    // The environment: [supervisord]'s, then the program's over it.
    let mut env: Vec<(String, Vec<Seg>, Option<&'static str>)> = Vec::new();
    for (k, v, from) in global_env {
        let segs = pyformat::expand(v, &names).map_err(|m| {
            ImportError::new(from.clone(), format!("[supervisord] environment: {m}"))
        })?;
        env.push((k.clone(), segs, Some("from [supervisord] environment")));
    }
    if let Some(e) = s.get("environment") {
        for (k, v) in parse_env(&e.value).map_err(|m| bad(s, e, &m))? {
            let segs = pyformat::expand(&v, &names).map_err(|m| bad(s, e, &m))?;
            env.retain(|(old, _, _)| *old != k);
            env.push((k, segs, None));
        }
    }
    let per_instance_env = env.iter().any(|(_, v, _)| pyformat::has_num(v));

    let Some(cmd) = s.get("command") else {
        return Err(ImportError::new(
            s.at.clone(),
            format!("[{}] has no command (supervisord refuses it too)", s.name),
        ));
    };
    let segs = expand(cmd)?;
    if pyformat::has_num(&segs) || per_instance_env {
        let pairs: Vec<(String, Vec<Seg>)> = env
            .iter()
            .filter(|(_, v, _)| pyformat::has_num(v))
            .map(|(k, v, _)| (k.clone(), v.clone()))
            .collect();
        let argv = pyformat::sh_command(&segs, &pairs)
            .ok_or_else(|| bad(s, cmd, "does not split into arguments (an unclosed quote?)"))?;
        t.set_noted(
            "command",
            Value::Array(argv.into_iter().map(Value::String).collect()),
            "%(process_num)s: sh gives each instance its number from $ZDT_INSTANCE (from 0), then execs the command (same pid, same argv)",
        );
    } else {
        let text = pyformat::zdt_string(&segs).unwrap_or_default();
        if shlex::split(&text).is_none_or(|a| a.is_empty()) {
            return Err(bad(
                s,
                cmd,
                "does not split into arguments (an unclosed quote?)",
            ));
        }
        t.set("command", text);
    }
    if let Some(e) = s.get("process_name") {
        if e.value.trim() != "%(program_name)s" {
            t.comment(format!(
                "process_name = {}: zdt names instances {zname}:0 to {zname}:{} (zdtctl status)",
                e.value,
                numprocs - 1
            ));
        }
    }
    if numprocs > 1 {
        t.set("instances", numprocs);
    }
    if start > 0 {
        t.comment(format!(
            "numprocs_start = {start}: zdt numbers instances from 0 ($ZDT_INSTANCE); the command adds {start}"
        ));
    }
    if let Some(e) = s.get("directory") {
        t.set("directory", plain(e)?);
    }
    if let Some(e) = s.get("user") {
        let u = e.value.trim();
        match super::user_usable(u) {
            Ok(()) => t.set("user", u),
            Err(why) => t.disabled(
                "user",
                u,
                format!("{why}: uncomment where zdt runs as root"),
            ),
        }
    }
    if let Some(e) = s.get("umask") {
        let m = crate::config::parse_octal(&e.value).map_err(|m| bad(s, e, &m))?;
        t.set("umask", format!("{m:03o}"));
    }
    for (k, segs, note) in &env {
        if pyformat::has_num(segs) {
            continue; // set by the sh wrapper
        }
        let v = pyformat::zdt_string(segs).unwrap_or_default();
        let line = format!("environment.{}", key(k));
        match note {
            Some(n) => t.set_noted(&line, v, *n),
            None => t.set(&line, v),
        }
    }
    if let Some(e) = s.get("priority") {
        t.set("priority", int(s, e)?);
    }
    if let Some(e) = s.get("autostart") {
        t.set("autostart", boolean(s, e)?);
    }
    if let Some(e) = s.get("autorestart") {
        let v = match e.value.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => "always",
            "false" | "no" | "off" | "0" => "never",
            "unexpected" => "unexpected",
            _ => return Err(bad(s, e, "expected true, false or unexpected")),
        };
        t.set("autorestart", v);
    }
    if let Some(e) = s.get("exitcodes") {
        let codes = e
            .value
            .split(',')
            .map(|c| c.trim().parse::<i64>().map(Value::Integer))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad(s, e, "expected exit codes such as 0,2"))?;
        t.set("exitcodes", Value::Array(codes));
    }
    if let Some(e) = s.get("startsecs") {
        t.set("startsecs", format!("{}s", int(s, e)?));
    }
    if let Some(e) = s.get("startretries") {
        t.set("startretries", int(s, e)?);
    }
    if let Some(e) = s.get("stopsignal") {
        let sig = crate::config::parse_signal(&e.value).map_err(|m| bad(s, e, &m))?;
        t.set("stop_signal", sig.as_str().trim_start_matches("SIG"));
    }
    if let Some(e) = s.get("stopwaitsecs") {
        t.set("kill_timeout", format!("{}s", int(s, e)?));
    }
    for k in ["stopasgroup", "killasgroup"] {
        if let Some(e) = s.get(k) {
            let v = boolean(s, e)?;
            t.comment(format!(
                "{k} = {v}: zdt always sends stop_signal and SIGKILL to the whole process group{}",
                if v {
                    " (as here)"
                } else {
                    " (supervisord signalled the main process only)"
                }
            ));
        }
    }
    let redirect = match s.get("redirect_stderr") {
        None => false,
        Some(e) => {
            let v = boolean(s, e)?;
            t.set("redirect_stderr", v);
            v
        }
    };
    for stream in ["stdout", "stderr"] {
        if stream == "stderr" && redirect {
            for k in [
                "stderr_logfile",
                "stderr_logfile_maxbytes",
                "stderr_logfile_backups",
            ] {
                if let Some(e) = s.get(k) {
                    doc.note(
                        at(s, e),
                        format!(
                            "[{}] {k}: ignored with redirect_stderr = true (by supervisord too)",
                            s.name
                        ),
                    );
                }
            }
            continue;
        }
        let file_key = format!("{stream}_logfile");
        if let Some(e) = s.get(&file_key) {
            log_file(s, e, &mut t, numprocs, &expand, doc)?;
        }
        if let Some(e) = s.get(&format!("{stream}_logfile_maxbytes")) {
            t.set(&format!("{stream}_logfile_maxbytes"), size(s, e)?);
        }
        if let Some(e) = s.get(&format!("{stream}_logfile_backups")) {
            t.set(&format!("{stream}_logfile_backups"), int(s, e)?);
        }
    }
    if fcgi {
        fcgi_socket(s, &mut t, &plain, doc)?;
    }
    for e in &s.entries {
        let now = [
            "numprocs",
            "numprocs_start",
            "priority",
            "autostart",
            "startsecs",
            "startretries",
            "stopwaitsecs",
            "stdout_logfile_backups",
            "stderr_logfile_backups",
            "redirect_stderr",
            "socket_backlog",
        ];
        if now.contains(&e.key.as_str()) && e.value.contains("%(") {
            t.comment(format!(
                "{} = {}: read from this environment when imported ({})",
                e.key,
                e.value,
                value_now(s, e)?
            ));
        }
    }
    for e in &s.entries {
        if !PROGRAM_KEYS.contains(&e.key.as_str()) {
            let hint = match e.key.as_str() {
                k if k.ends_with("_syslog") => ": no syslog target yet; use the log files or run zdt under systemd",
                k if k.ends_with("_capture_maxbytes") || k.ends_with("_events_enabled") => ": zdt has no event listeners",
                "serverurl" => ": zdt sets ZDT_PROGRAM, ZDT_INSTANCE, ZDT_GENERATION instead of SUPERVISOR_* variables",
                _ => "",
            };
            doc.note(
                at(s, e),
                format!("[{}] {}: no zdt equivalent{hint}", s.name, e.key),
            );
        }
    }
    Ok(t)
}

/// `stdout_logfile`/`stderr_logfile`: AUTO is zdt's default, NONE is
/// NONE, a path gets `{instance}` when several instances would share it.
fn log_file(
    s: &Section,
    e: &Entry,
    t: &mut Table,
    numprocs: i64,
    expand: &dyn Fn(&Entry) -> Result<Vec<Seg>, ImportError>,
    doc: &mut Doc,
) -> Result<(), ImportError> {
    let v = e.value.trim();
    match v.to_ascii_uppercase().as_str() {
        "AUTO" => return Ok(()),
        "NONE" => {
            t.set(&e.key, "NONE");
            return Ok(());
        }
        "SYSLOG" => {
            doc.note(
                at(s, e),
                format!(
                    "[{}] {} = syslog: no syslog target yet; zdt's default files are used",
                    s.name, e.key
                ),
            );
            return Ok(());
        }
        _ => {}
    }
    let segs = expand(e)?;
    let Some(mut path) = pyformat::log_template(&segs) else {
        doc.note(at(s, e), format!("[{}] {} = {v}: a padded or offset %(process_num) has no zdt equivalent; zdt's default files are used", s.name, e.key));
        return Ok(());
    };
    if numprocs > 1 && !path.contains("{instance}") && !crate::logs::is_own_stream(Path::new(&path))
    {
        let p = Path::new(&path);
        path = match (p.file_stem(), p.extension()) {
            (Some(stem), Some(ext)) => p
                .with_file_name(format!(
                    "{}-{{instance}}.{}",
                    stem.to_string_lossy(),
                    ext.to_string_lossy()
                ))
                .display()
                .to_string(),
            _ => format!("{path}-{{instance}}"),
        };
        t.set_noted(
            &e.key,
            path,
            format!("was {v}, shared by {numprocs} processes: zdt writes one file per instance"),
        );
    } else {
        t.set(&e.key, path);
    }
    Ok(())
}

/// `[fcgi-program:x] socket` → `listen` (pass mode), with its owner, mode
/// and backlog.
fn fcgi_socket(
    s: &Section,
    t: &mut Table,
    plain: &dyn Fn(&Entry) -> Result<String, ImportError>,
    doc: &mut Doc,
) -> Result<(), ImportError> {
    let Some(e) = s.get("socket") else {
        return Err(ImportError::new(
            s.at.clone(),
            format!("[{}] has no socket (supervisord refuses it too)", s.name),
        ));
    };
    let v = plain(e)?;
    let fd_note = "supervisord gave the socket as fd 0 (FastCGI); zdt passes it as fd 3 with LISTEN_FDS (socket activation): the program must accept on fd 3, or be started through a wrapper that moves it";
    let addr = if let Some(rest) = v.strip_prefix("tcp://") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad(s, e, "expected tcp://HOST:PORT"))?;
        let port: u16 = port.parse().map_err(|_| bad(s, e, "bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host {
            "localhost" => Some((
                format!("tcp://127.0.0.1:{port}"),
                Some("localhost as 127.0.0.1"),
            )),
            "" | "*" => Some((format!("tcp://0.0.0.0:{port}"), Some("every address"))),
            h if h.parse::<std::net::IpAddr>().is_ok() => {
                let ip: std::net::IpAddr = h.parse().map_err(|_| bad(s, e, "bad address"))?;
                Some((
                    format!("tcp://{}", std::net::SocketAddr::new(ip, port)),
                    None,
                ))
            }
            _ => None,
        }
    } else if v.starts_with("unix://") {
        Some((v.clone(), None))
    } else {
        return Err(bad(s, e, "expected tcp://HOST:PORT or unix:///path"));
    };
    match addr {
        Some((a, extra)) => {
            let note = match extra {
                Some(x) => format!("{x}; {fd_note}"),
                None => fd_note.to_string(),
            };
            t.set_noted("listen", Value::Array(vec![Value::String(a)]), note);
            t.set("mode", "pass");
        }
        None => {
            t.disabled(
                "listen",
                Value::Array(vec![Value::String(v.clone())]),
                "zdt binds IP addresses, not host names: write the address",
            );
            doc.note(
                at(s, e),
                format!(
                    "[{}] socket = {v}: zdt binds IP addresses only; listen is left commented out",
                    s.name
                ),
            );
        }
    }
    if let Some(e) = s.get("socket_backlog") {
        t.set("backlog", int(s, e)?);
    }
    if let Some(e) = s.get("socket_mode") {
        let m = crate::config::parse_octal(&e.value).map_err(|m| bad(s, e, &m))?;
        t.set("socket_mode", format!("0{m:o}"));
    }
    if let Some(e) = s.get("socket_owner") {
        let o = e.value.trim();
        let user = o.split(':').next().unwrap_or(o);
        match super::user_usable(user) {
            Ok(()) => t.set("socket_owner", o),
            Err(why) => t.disabled(
                "socket_owner",
                o,
                format!("{why}: uncomment where zdt runs as root"),
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
