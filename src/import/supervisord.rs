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

mod program;

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
    let names = here_names(s);
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
                let table = program::program(s, name, fcgi, group_of.get(name), &global_env, doc)?;
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

/// The expansions a section outside the programs knows: `%(here)s`.
fn here_names(s: &Section) -> Names {
    Names {
        fixed: [("here", folder_of(&s.at.file).display().to_string())]
            .into_iter()
            .collect(),
        process_num_start: None,
    }
}

fn supervisord_section(s: &Section, doc: &mut Doc) -> Result<(), ImportError> {
    let names = here_names(s);
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
    let names = here_names(s);
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
                Some((_, group)) => doc.supervisor.set_noted(
                    "control_group",
                    group.trim(),
                    format!("chown = {}: members of the group may use zdtctl; the socket stays zdt's user's", e.value),
                ),
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

#[cfg(test)]
mod tests;
