use super::*;
use crate::import::tests::{assert_loads, files};

fn run(name: &str, text: &str, options: &Options) -> (String, Vec<String>, tempfile::TempDir) {
    let dir = files(&[(name, text)]);
    let path = dir.path().join(name);
    let doc = import(&path, Format::of(&path), options).unwrap_or_else(|e| panic!("{e}"));
    let text = doc.render(&path);
    let notes = doc.notes.iter().map(|n| n.to_string()).collect();
    (text, notes, dir)
}

fn json(app: &str) -> (String, Vec<String>, tempfile::TempDir) {
    run(
        "p.json",
        &format!("{{\"apps\": [{app}]}}"),
        &Options::default(),
    )
}

fn has(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "want {line:?} in\n{text}");
}

#[test]
fn command_from_script_interpreter_and_args() {
    let (t, _, dir) = json(
        r#"{"name": "api", "script": "server.js", "args": "--port 3000 'a b'", "node_args": ["--max-old-space-size=512"]}"#,
    );
    has(
        &t,
        r#"command = ["node", "--max-old-space-size=512", "server.js", "--port", "3000", "a b"]"#,
    );
    assert_loads(&t, dir.path());
    let (t, _, _) = json(
        r#"{"name": "b", "script": "/usr/bin/npm", "args": ["run", "start"], "interpreter": "none"}"#,
    );
    has(&t, r#"command = ["/usr/bin/npm", "run", "start"]"#);
    let (t, _, _) = json(r#"{"name": "c", "script": "app.py", "interpreter_args": "-u"}"#);
    assert!(
        t.contains(r#"command = ["python3", "-u", "app.py"]  # PM2 runs .py with python"#),
        "{t}"
    );
    let (t, _, _) = json(r#"{"script": "bin/worker"}"#);
    has(&t, "[program.worker]");
    has(&t, r#"command = ["bin/worker"]"#);
}

#[test]
fn defaults_that_differ_from_zdts_are_written() {
    let (t, _, dir) = json(r#"{"name": "a", "script": "a.js"}"#);
    has(
        &t,
        r#"autorestart = "always"  # PM2 restarts on every exit by default"#,
    );
    has(
        &t,
        r#"stop_signal = "INT"  # PM2 stops apps with SIGINT (zdt's default is TERM)"#,
    );
    has(
        &t,
        r#"kill_timeout = "1600ms"  # PM2's default (zdt's is 10s)"#,
    );
    let base = crate::import::supervisord::folder_of(&dir.path().join("p.json"));
    has(
        &t,
        &format!(
            "directory = \"{}\"  # PM2 started the app from the process file's folder",
            base.display()
        ),
    );
}

#[test]
fn timings_restarts_and_memory() {
    let (t, _, dir) = json(
        r#"{"name": "a", "script": "a.js", "cwd": "/srv/a", "kill_timeout": 3000, "listen_timeout": 8000,
            "autorestart": false, "max_restarts": 5, "min_uptime": "5s", "restart_delay": 250,
            "max_memory_restart": "300M", "cron_restart": "0 4 * * *", "kill_signal": "SIGTERM"}"#,
    );
    has(&t, r#"directory = "/srv/a""#);
    has(
        &t,
        r#"kill_timeout = "3s"  # PM2's kill_timeout is in milliseconds"#,
    );
    has(
        &t,
        r#"ready_timeout = "8s"  # listen_timeout: a new process not ready within this is a failed start"#,
    );
    has(&t, r#"autorestart = "never""#);
    assert!(t.contains("startretries = 5  # max_restarts"), "{t}");
    has(&t, r#"startsecs = "5s"  # min_uptime"#);
    has(&t, r#"restart_delay = "250ms""#);
    has(&t, r#"max_memory = "300M""#);
    has(&t, r#"cron_restart = "0 4 * * *""#);
    has(&t, r#"stop_signal = "TERM""#);
    assert_loads(&t, dir.path());
}

#[test]
fn wait_ready_becomes_a_delay_that_says_why() {
    let (t, _, dir) =
        json(r#"{"name": "a", "script": "a.js", "wait_ready": true, "listen_timeout": 5000}"#);
    assert!(
        t.contains(
            r#"ready = { delay = "5s" }  # wait_ready: PM2 waited for process.send('ready')"#
        ),
        "{t}"
    );
    assert!(t.contains("zdt notify READY=1"), "{t}");
    assert!(!t.contains("ready_timeout"), "{t}");
    assert_loads(&t, dir.path());
}

#[test]
fn cluster_instances_and_logs() {
    let (t, notes, dir) = json(
        r#"{"name": "a", "script": "a.js", "exec_mode": "cluster", "instances": 4,
            "out_file": "./logs/out.log", "error_file": "/var/log/a.err", "log_file": "all.log",
            "env": {"PORT": 3000, "NODE_ENV": "production"}, "time": true}"#,
    );
    assert!(
        t.contains("instances = 4  # PM2 cluster mode shared one port"),
        "{t}"
    );
    let base = crate::import::supervisord::folder_of(&dir.path().join("p.json"));
    assert!(
        t.contains(&format!(
            "stdout_logfile = \"{}/logs/out-{{instance}}.log\"",
            base.display()
        )),
        "{t}"
    );
    assert!(
        t.contains("stderr_logfile = \"/var/log/a-{instance}.err\""),
        "{t}"
    );
    has(&t, r#"environment.PORT = "3000""#);
    assert!(t.contains("# PORT = 3000: for zero-downtime restarts let zdt own the port: listen = [\"tcp://0.0.0.0:3000\"]"), "{t}");
    assert!(t.contains("log_timestamps = true"), "{t}");
    assert!(notes.iter().any(|n| n.contains("log_file")), "{notes:?}");
    assert!(
        notes.iter().any(|n| n.contains("exec_mode = cluster")),
        "{notes:?}"
    );
    assert_loads(&t, dir.path());
}

#[test]
fn instances_max_and_negative() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (t, _, _) = json(r#"{"name": "a", "script": "a.js", "instances": "max"}"#);
    assert!(
        t.contains(&format!("instances = {cpus}  # instances = \"max\"")),
        "{t}"
    );
    let (t, notes, _) = json(r#"{"name": "a", "script": "a.js", "instances": -1}"#);
    let want = (cpus as i64 - 1).max(1);
    assert!(
        t.contains(&format!("instances = {want}  # instances = -1")),
        "{t}"
    );
    assert!(
        notes.iter().any(|n| n.contains("instances = -1")),
        "{notes:?}"
    );
}

#[test]
fn env_names_other_envs_or_takes_one() {
    let app = r#"{"name": "a", "script": "a.js", "env": {"A": "1", "B": "x"}, "env_production": {"A": "2"}}"#;
    let (t, notes, _) = json(app);
    has(&t, r#"environment.A = "1""#);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("env_production: not taken (zdt import --env production")),
        "{notes:?}"
    );
    let (t, notes, _) = run(
        "p.json",
        &format!("{{\"apps\": [{app}]}}"),
        &Options {
            env: Some("production".into()),
        },
    );
    has(&t, r#"environment.A = "2""#);
    has(&t, r#"environment.B = "x""#);
    assert!(notes.is_empty(), "{notes:?}");
}

#[test]
fn watch_ignore_watch_and_watch_delay_map() {
    let (t, _, dir) = json(
        r#"{"name": "a", "script": "a.js", "watch": ["src", "lib"], "ignore_watch": ["node_modules"], "watch_delay": 800}"#,
    );
    has(&t, r#"watch = ["src", "lib"]"#);
    assert!(
        t.contains(r#"watch_ignore = ["node_modules"]  # PM2 ignore_watch"#),
        "{t}"
    );
    has(&t, r#"watch_debounce = "800ms""#);
    assert_loads(&t, dir.path());
}

#[test]
fn unknown_keys_are_reported() {
    let (_, notes, _) =
        json(r#"{"name": "a", "script": "a.js", "instance_var": "ID", "vizion": false}"#);
    assert!(
        notes.iter().any(
            |n| n.contains("app \"a\": instance_var: no zdt equivalent: zdt sets ZDT_INSTANCE")
        ),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("vizion: no zdt equivalent")),
        "{notes:?}"
    );
}

#[test]
fn yaml_json5_and_js_files() {
    let (t, _, _) = run(
        "p.yml",
        "apps:\n  - name: w\n    script: w.js\n    instances: 2\n",
        &Options::default(),
    );
    has(&t, "instances = 2");
    let (t, _, _) = run(
        "p.json",
        "{ apps: [{ name: 'w', script: 'w.js' }] }",
        &Options::default(),
    );
    has(&t, "[program.w]");
    let (t, _, _) = run(
        "ecosystem.config.js",
        "const n = 1 + 1;\nmodule.exports = { apps: [{ name: 'w', script: 'w.js', instances: n, env: { HOME_DIR: __dirname } }] };\n",
        &Options::default(),
    );
    has(&t, "instances = 2");
    assert!(t.contains("environment.HOME_DIR = \"/"), "{t}");
}

#[test]
fn unreadable_files_name_the_line() {
    for (name, text, line) in [
        ("p.yml", "apps:\n  - name: [\n", Some(3)),
        ("p.json", "{\"apps\": [\n  {\"name\": \"a\",,}\n]}", Some(2)),
        (
            "e.config.js",
            "module.exports = {\n  apps: [\n};\n",
            Some(3),
        ),
        ("p.json", "{\"apps\": 3}", None),
        ("p.json", "{\"apps\": [{\"name\": \"a\"}]}", None),
    ] {
        let dir = files(&[(name, text)]);
        let path = dir.path().join(name);
        let e = import(&path, Format::of(&path), &Options::default()).expect_err(text);
        assert_eq!(e.at.line, line, "{name} {text:?}: {e}");
    }
}

#[test]
fn without_node_an_ecosystem_file_is_a_clear_error() {
    let dir = files(&[("e.config.js", "module.exports = {}\n")]);
    let e = load::evaluate_js("zdt-test-no-such-node", &dir.path().join("e.config.js"))
        .expect_err("no node");
    assert!(e.message.starts_with("node is not on PATH"), "{e}");
}
