//! `[program:x]` and `[fcgi-program:x]` → `[program.NAME]`: each option's
//! mapping, the `sh -c` wrapper for `%(process_num)s`, per-instance log
//! files, fcgi sockets as `listen` in pass mode.

use std::path::Path;

use toml::Value;

use super::{at, bad, boolean, folder_of, int, parse_env, value_now};
use crate::import::ini::{Entry, Section};
use crate::import::out::key;
use crate::import::pyformat::{self, Names, Seg};
use crate::import::{Doc, ImportError, Source, Table};

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

pub(super) fn program(
    s: &Section,
    name: &str,
    fcgi: bool,
    group: Option<&String>,
    global_env: &[(String, String, Source)],
    doc: &mut Doc,
) -> Result<Table, ImportError> {
    let (zname, renamed) = crate::import::program_name(name);
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
        match crate::import::user_usable(u) {
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
                k if k.ends_with("_syslog") => ": zdt sends a stream to a file or to syslog, not both: for syslog only, set stdout_logfile = \"syslog\" (or stderr_logfile)",
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
            t.set(&e.key, "syslog");
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
        path = crate::import::per_instance(&path);
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
        match crate::import::user_usable(user) {
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
