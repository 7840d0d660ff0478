//! PM2 process files → supervisor.toml: `ecosystem.config.js` (evaluated
//! by node, which must be on PATH), JSON, and YAML.
//!
//! PM2 gives no line numbers once a file is evaluated, so notes name the
//! file and the app.

use std::path::Path;

use serde_json::Value as Json;
use toml::Value;

use super::out::key;
use super::{Doc, Format, ImportError, Options, Source, Table};

mod load;
mod values;

use values::{cpus, duration, env_value, interpreter_for, join, millis, words};

/// Imports the PM2 file at `path`.
pub(crate) fn import(path: &Path, format: Format, options: &Options) -> Result<Doc, ImportError> {
    let value = load::read(path, format)?;
    let apps = load::apps(&value).ok_or_else(|| {
        ImportError::new(
            Source::file(path),
            "no apps: expected { apps: [...] }, a list of apps, or one app with a script",
        )
    })?;
    let mut doc = Doc::new();
    if let Some(obj) = value.as_object() {
        for k in obj.keys().filter(|k| *k != "apps") {
            doc.note(
                Source::file(path),
                format!("{k}: not mapped (zdtctl deploy takes releases, see README \"Deploys\")"),
            );
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, app) in apps.iter().enumerate() {
        let t = map_app(app, i, path, options, &mut doc)?;
        if !names.insert(t.header.clone()) {
            doc.note(
                Source::file(path),
                format!("{} is defined twice: the last one is kept", t.header),
            );
            doc.programs.retain(|p| p.header != t.header);
        }
        doc.programs.push(t);
    }
    Ok(doc)
}

/// Keys of an app this module maps (the rest is reported).
const APP_KEYS: &[&str] = &[
    "name",
    "script",
    "args",
    "interpreter",
    "interpreter_args",
    "node_args",
    "exec_interpreter",
    "cwd",
    "env",
    "instances",
    "exec_mode",
    "max_memory_restart",
    "cron_restart",
    "wait_ready",
    "listen_timeout",
    "kill_timeout",
    "autorestart",
    "max_restarts",
    "min_uptime",
    "restart_delay",
    "out_file",
    "output",
    "error_file",
    "error",
    "log_file",
    "log",
    "merge_logs",
    "combine_logs",
    "watch",
    "ignore_watch",
    "watch_delay",
    "time",
    "log_date_format",
    "stop_exit_codes",
    "user",
    "uid",
    "gid",
    "treekill",
    "autostart",
    "port",
    "kill_signal",
];

fn map_app(
    app: &Json,
    index: usize,
    file: &Path,
    options: &Options,
    doc: &mut Doc,
) -> Result<Table, ImportError> {
    let here = Source::file(file);
    let obj = app
        .as_object()
        .ok_or_else(|| ImportError::new(here.clone(), format!("app {index} is not an object")))?;
    let str_of = |k: &str| obj.get(k).and_then(Json::as_str);
    let Some(script) = str_of("script") else {
        return Err(ImportError::new(here, format!("app {index} has no script")));
    };
    let raw_name = str_of("name").map(str::to_string).unwrap_or_else(|| {
        Path::new(script)
            .file_stem()
            .map_or("app".into(), |s| s.to_string_lossy().into_owned())
    });
    let (name, renamed) = super::program_name(&raw_name);
    let mut t = Table::program(&name);
    let app_at = |msg: String| (here.clone(), format!("app {raw_name:?}: {msg}"));
    let note = |doc: &mut Doc, msg: String| {
        let (a, m) = app_at(msg);
        doc.note(a, m);
    };
    if renamed {
        t.comment(format!(
            "app {raw_name:?} is renamed {name:?}: zdt takes letters, digits, '_', '.', '-'"
        ));
    }
    let bad = |k: &str, what: &str| {
        ImportError::new(here.clone(), format!("app {raw_name:?}: {k}: {what}"))
    };

    // argv: interpreter, its args, script, args.
    let interpreter = str_of("interpreter").or_else(|| str_of("exec_interpreter"));
    let mut argv: Vec<String> = Vec::new();
    let mut cmd_note = None;
    match interpreter {
        Some("none") => {}
        Some(i) => argv.push(i.to_string()),
        None => {
            if let Some(i) = interpreter_for(script) {
                argv.push(i.to_string());
                if i == "python3" {
                    cmd_note = Some("PM2 runs .py with python: python3 here".to_string());
                }
            }
        }
    }
    for k in ["interpreter_args", "node_args"] {
        if let Some(v) = obj.get(k) {
            if argv.is_empty() {
                note(doc, format!("{k}: no interpreter runs, so it is not used"));
                continue;
            }
            argv.extend(words(v).ok_or_else(|| bad(k, "expected a string or a list"))?);
        }
    }
    argv.push(script.to_string());
    if let Some(v) = obj.get("args") {
        argv.extend(words(v).ok_or_else(|| bad("args", "expected a string or a list"))?);
    }
    let argv: Vec<Value> = argv
        .into_iter()
        .map(|a| Value::String(super::pyformat::escape(&a)))
        .collect();
    match cmd_note {
        Some(n) => t.set_noted("command", Value::Array(argv), n),
        None => t.set("command", Value::Array(argv)),
    }

    let base = super::supervisord::folder_of(file);
    match str_of("cwd") {
        Some(c) if Path::new(c).is_absolute() => t.set("directory", super::pyformat::escape(c)),
        Some(c) => t.set_noted(
            "directory",
            super::pyformat::escape(&join(&base, c)),
            format!("cwd = {c:?}, from the process file's folder"),
        ),
        None => t.set_noted(
            "directory",
            super::pyformat::escape(&base.display().to_string()),
            "PM2 started the app from the process file's folder",
        ),
    }
    if let Some(u) = str_of("user").or_else(|| str_of("uid")) {
        match super::user_usable(u) {
            Ok(()) => t.set("user", u),
            Err(why) => t.disabled(
                "user",
                u,
                format!("{why}: uncomment where zdt runs as root"),
            ),
        }
    }
    if let Some(g) = str_of("gid") {
        t.disabled(
            "group",
            g,
            "PM2 gid: uncomment where zdt runs as root and the group exists",
        );
    }

    // The environment: env, then env_NAME with --env NAME.
    let mut env: Vec<(String, String)> = Vec::new();
    let add_env =
        |v: &Json, what: &str, env: &mut Vec<(String, String)>| -> Result<(), ImportError> {
            let Some(map) = v.as_object() else {
                return Err(bad(what, "expected an object"));
            };
            for (k, v) in map {
                let v = env_value(v)
                    .ok_or_else(|| bad(what, &format!("{k}: expected a string or a number")))?;
                env.retain(|(old, _)| old != k);
                env.push((k.clone(), v));
            }
            Ok(())
        };
    if let Some(v) = obj.get("env") {
        add_env(v, "env", &mut env)?;
    }
    if let Some(p) = obj.get("port").and_then(env_value) {
        env.push(("PORT".into(), p));
    }
    let mut other_envs = Vec::new();
    for (k, v) in obj {
        if let Some(which) = k.strip_prefix("env_") {
            if options.env.as_deref() == Some(which) {
                add_env(v, k, &mut env)?;
            } else {
                other_envs.push(which.to_string());
            }
        }
    }
    if let Some(wanted) = &options.env {
        if !obj.contains_key(&format!("env_{wanted}")) {
            note(doc, format!("--env {wanted}: the app has no env_{wanted}"));
        }
    }
    for which in &other_envs {
        note(
            doc,
            format!("env_{which}: not taken (zdt import --env {which} takes it over env)"),
        );
    }
    for (k, v) in &env {
        t.set(
            &format!("environment.{}", key(k)),
            super::pyformat::escape(v),
        );
    }

    // Instances and cluster mode.
    let cluster = matches!(str_of("exec_mode"), Some("cluster" | "cluster_mode"));
    let cluster_note = "PM2 cluster mode shared one port through Node's cluster module; zdt runs separate processes: give them a socket with listen (mode pass, fd 3) or mode = \"proxy\"";
    let instances: i64 = match obj.get("instances") {
        None => 1,
        Some(v) => {
            let (n, why) = match v {
                Json::String(s) if s == "max" => (
                    cpus(),
                    Some(format!(
                        "instances = \"max\": {} CPUs on this machine",
                        cpus()
                    )),
                ),
                Json::Number(_) | Json::String(_) => {
                    let n = v
                        .as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                        .ok_or_else(|| bad("instances", "expected a number or \"max\""))?;
                    match n {
                        0 => (
                            cpus(),
                            Some(format!("instances = 0: {} CPUs on this machine", cpus())),
                        ),
                        n if n < 0 => {
                            let m = (cpus() + n).max(1);
                            note(
                                doc,
                                format!(
                                    "instances = {n}: CPUs less {}; {m} here, fixed in the file",
                                    -n
                                ),
                            );
                            (
                                m,
                                Some(format!(
                                    "instances = {n}: CPUs less {} ({m} on this machine)",
                                    -n
                                )),
                            )
                        }
                        n => (n.min(1024), None),
                    }
                }
                _ => return Err(bad("instances", "expected a number or \"max\"")),
            };
            match (why, cluster) {
                (Some(w), true) => t.set_noted("instances", n, format!("{w}; {cluster_note}")),
                (Some(w), false) => t.set_noted("instances", n, w),
                (None, true) => t.set_noted("instances", n, cluster_note),
                (None, false) if n > 1 => t.set("instances", n),
                (None, false) => {}
            }
            n
        }
    };
    if cluster {
        if !t.lines.iter().any(|l| l.key == "instances") {
            t.comment(format!("exec_mode = cluster: {cluster_note}"));
        }
        note(
            doc,
            "exec_mode = cluster: zdt is not Node's cluster module (see the comment in the output)"
                .into(),
        );
    }
    if let Some((_, port)) = env.iter().find(|(k, _)| k == "PORT") {
        t.comment(format!(
            "PORT = {port}: for zero-downtime restarts let zdt own the port: listen = [\"tcp://0.0.0.0:{port}\"] with mode = \"proxy\" (the app listens on the PORT zdt gives it), or mode = \"pass\" if it can accept on fd 3"
        ));
    }

    if let Some(v) = obj.get("max_memory_restart") {
        let m = match v {
            Json::String(s) => s.trim().to_string(),
            Json::Number(n) => n.to_string(),
            _ => {
                return Err(bad(
                    "max_memory_restart",
                    "expected a size such as \"512M\"",
                ))
            }
        };
        t.set("max_memory", m);
    }
    if let Some(v) = obj.get("cron_restart") {
        match v.as_str() {
            Some(c) => t.set("cron_restart", c.trim()),
            None => note(doc, "cron_restart: not a string, not mapped".into()),
        }
    }

    // Readiness.
    let listen_timeout = obj.get("listen_timeout").and_then(millis);
    if obj.get("wait_ready").and_then(Json::as_bool) == Some(true) {
        let wait = listen_timeout.unwrap_or(3000);
        let mut r = toml::Table::new();
        r.insert("delay".into(), Value::String(duration(wait)));
        t.set_noted(
            "ready",
            Value::Table(r),
            format!("wait_ready: PM2 waited for process.send('ready') or listen_timeout ({}); zdt cannot see that message, so this waits listen_timeout. Better: run `zdt notify READY=1` from the app when it listens and use ready = {{ notify = true }}", duration(wait)),
        );
        if wait > 30_000 {
            t.set("ready_timeout", duration(wait + 30_000));
        }
    } else if let Some(ms) = listen_timeout {
        t.set_noted(
            "ready_timeout",
            duration(ms),
            "listen_timeout: a new process not ready within this is a failed start",
        );
    }
    match obj.get("kill_signal").and_then(Json::as_str) {
        Some(sig) => {
            let sig = crate::config::parse_signal(sig).map_err(|m| bad("kill_signal", &m))?;
            t.set("stop_signal", sig.as_str().trim_start_matches("SIG"));
        }
        None => t.set_noted(
            "stop_signal",
            "INT",
            "PM2 stops apps with SIGINT (zdt's default is TERM)",
        ),
    }
    match obj.get("kill_timeout").and_then(millis) {
        Some(ms) => t.set_noted(
            "kill_timeout",
            duration(ms),
            "PM2's kill_timeout is in milliseconds",
        ),
        None => t.set_noted("kill_timeout", "1600ms", "PM2's default (zdt's is 10s)"),
    }
    match obj.get("autorestart").and_then(Json::as_bool) {
        Some(false) => t.set("autorestart", "never"),
        Some(true) => t.set("autorestart", "always"),
        None => t.set_noted(
            "autorestart",
            "always",
            "PM2 restarts on every exit by default",
        ),
    }
    if let Some(codes) = obj.get("stop_exit_codes") {
        let list: Vec<Value> = match codes {
            Json::Array(a) => a
                .iter()
                .filter_map(Json::as_i64)
                .map(Value::Integer)
                .collect(),
            Json::Number(n) => n.as_i64().map(Value::Integer).into_iter().collect(),
            _ => Vec::new(),
        };
        if obj.get("autorestart").and_then(Json::as_bool) != Some(false) {
            t.set_noted(
                "autorestart",
                "unexpected",
                "stop_exit_codes: these exits are not restarted",
            );
        }
        t.set("exitcodes", Value::Array(list));
    }
    if let Some(n) = obj.get("max_restarts").and_then(Json::as_i64) {
        t.set_noted(
            "startretries",
            n.max(0),
            "max_restarts: PM2 counts restarts within min_uptime; zdt counts failed starts in a row before FATAL",
        );
    }
    if let Some(ms) = obj.get("min_uptime").and_then(millis) {
        t.set_noted("startsecs", duration(ms), "min_uptime");
    }
    if let Some(ms) = obj.get("restart_delay").and_then(millis) {
        t.set("restart_delay", duration(ms));
    }
    if let Some(false) = obj.get("autostart").and_then(Json::as_bool) {
        t.set("autostart", false);
    }

    // Logs.
    let merged = obj
        .get("merge_logs")
        .or_else(|| obj.get("combine_logs"))
        .and_then(Json::as_bool)
        == Some(true);
    for (keys, zkey) in [
        (["out_file", "output"], "stdout_logfile"),
        (["error_file", "error"], "stderr_logfile"),
    ] {
        let Some(v) = keys.iter().find_map(|k| str_of(k)) else {
            continue;
        };
        if v == "/dev/null" {
            t.set_noted(
                zkey,
                "NONE",
                format!("{v}: no file (zdtctl tail still works)"),
            );
            continue;
        }
        let abs = if Path::new(v).is_absolute() {
            v.to_string()
        } else {
            join(&base, v)
        };
        let abs = super::pyformat::escape(&abs);
        if instances > 1 {
            let with = super::per_instance(&abs);
            let why = if merged {
                "merge_logs: zdt writes one file per instance (every line starts with [gen G:I])"
            } else {
                "PM2 added -ID to each instance's file; zdt's {instance} counts from 0"
            };
            t.set_noted(zkey, with, why);
        } else {
            t.set(zkey, abs);
        }
    }
    if let Some(v) = str_of("log_file").or_else(|| str_of("log")) {
        note(doc, format!("log_file = {v}: zdt has no combined file beside out and err; redirect_stderr = true puts both in the stdout log"));
    }
    if obj.get("time").and_then(Json::as_bool) == Some(true) || obj.contains_key("log_date_format")
    {
        t.set_noted(
            "log_timestamps",
            true,
            "time/log_date_format: RFC 3339 in UTC, the format cannot be chosen",
        );
    }
    if obj.contains_key("treekill") {
        t.comment("treekill: zdt always signals the whole process group");
    }

    if let Some(w) = obj.get("watch") {
        let paths: Vec<Value> = match w {
            Json::Bool(true) => vec![Value::String(".".into())],
            Json::String(s) => vec![Value::String(s.clone())],
            Json::Array(a) => a
                .iter()
                .filter_map(Json::as_str)
                .map(|s| Value::String(s.into()))
                .collect(),
            _ => Vec::new(),
        };
        if !paths.is_empty() {
            t.set("watch", Value::Array(paths));
            if let Some(Json::Array(ignore)) = obj.get("ignore_watch") {
                let names: Vec<Value> = ignore
                    .iter()
                    .filter_map(Json::as_str)
                    .map(|s| Value::String(s.into()))
                    .collect();
                t.set_noted(
                    "watch_ignore",
                    Value::Array(names),
                    "PM2 ignore_watch (chokidar patterns); zdt matches shell patterns against each part of a path, and this list replaces its default (.git, node_modules, vendor, *.log, editor files)",
                );
            }
            if let Some(ms) = obj.get("watch_delay").and_then(Json::as_u64) {
                t.set("watch_debounce", Value::String(format!("{ms}ms")));
            }
        }
    }

    for k in obj.keys() {
        if !APP_KEYS.contains(&k.as_str()) && !k.starts_with("env_") {
            let hint = match k.as_str() {
                "exp_backoff_restart_delay" => {
                    ": zdt backs off failed starts itself; restart_delay sets a fixed delay"
                }
                "instance_var" | "increment_var" => {
                    ": zdt sets ZDT_INSTANCE (from 0) in each instance"
                }
                "namespace" => ": zdt has [group.NAME] programs = [...]",
                "shutdown_with_message" => ": zdt stops with stop_signal",
                "pid_file" => ": zdtctl pid NAME prints the pids",
                _ => "",
            };
            note(doc, format!("{k}: no zdt equivalent{hint}"));
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests;
