//! Bad configurations, each reported at its exact line and column.

use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "/srv/app/supervisor.toml";

fn bad(text: &str) -> ConfigError {
    match parse(text, Path::new(FILE)) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e,
    }
}

fn assert_bad(text: &str, line: usize, col: usize, phrase: &str) {
    let e = bad(text);
    assert_eq!((e.line, e.col), (line, col), "{text:?} -> {e}");
    assert!(
        e.message.contains(phrase),
        "{text:?}: {phrase:?} not in {:?}",
        e.message
    );
    assert!(
        e.to_string().starts_with(&format!("{FILE}:{line}:{col}: ")),
        "{e}"
    );
}

#[test]
fn unknown_keys_anywhere_are_errors() {
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\ncomand = 1\n",
        3,
        1,
        "unknown field `comand`",
    );
    assert_bad(
        "[supervisor]\ncontroll = \"x\"\n",
        2,
        1,
        "unknown field `controll`",
    );
    assert_bad(
        "[programs.web]\ncommand = [\"x\"]\n",
        1,
        2,
        "unknown field `programs`",
    );
    // The message lists the valid keys.
    assert!(bad("[program.web]\ncommand = [\"x\"]\ncomand = 1\n")
        .message
        .contains("`command`"));
}

#[test]
fn wrong_types_and_values_point_at_the_value() {
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\ninstances = \"two\"\n",
        3,
        13,
        "expected an integer",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\ninstances = 0\n",
        3,
        13,
        "use 1 to 1024",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nnumprocs = -2\n",
        3,
        12,
        "use 1 to 1024",
    );
    assert_bad("[program.web]\ncommand = []\n", 2, 11, "must not be empty");
    assert_bad(
        "[program.web]\ncommand = \"\"\n",
        2,
        11,
        "must not be empty",
    );
    assert_bad(
        "[program.web]\ncommand = \"node 'app.js\"\n",
        2,
        11,
        "unbalanced quote",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nstop_signal = \"TREM\"\n",
        3,
        15,
        "invalid signal \"TREM\"",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmax_wait = \"10 parsecs\"\n",
        3,
        12,
        "unknown unit",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nautorestart = \"sometimes\"\n",
        3,
        15,
        "\"unexpected\"",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nexitcodes = [0, 300]\n",
        3,
        17,
        "out of range",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nstartretries = -1\n",
        3,
        16,
        "",
    );
}

#[test]
fn names_logfiles_and_missing_commands() {
    assert_bad(
        "[program.\"web 1\"]\ncommand = [\"x\"]\n",
        1,
        10,
        "invalid program name",
    );
    assert_bad(
        "[program.all]\ncommand = [\"x\"]\n",
        1,
        10,
        "invalid program name",
    );
    assert_bad("[program.web]\ndirectory = \"/\"\n", 1, 1, "has no command");
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\ninstances = 2\nstdout_logfile = \"web.log\"\n",
        4,
        18,
        "{instance}",
    );
}

#[test]
fn instances_may_share_zdts_own_stdout_and_stderr() {
    let text = "[program.web]\ncommand = [\"x\"]\ninstances = 2\nstdout_logfile = \"/dev/stdout\"\nstderr_logfile = \"/dev/stderr\"\n";
    let c = parse(text, Path::new(FILE)).expect("valid");
    let web = &c.programs["web"];
    assert_eq!(web.stdout_log.file.as_deref(), Some("/dev/stdout"));
    assert_eq!(web.stderr_log.file.as_deref(), Some("/dev/stderr"));
}

#[test]
fn syntax_errors_have_positions() {
    let e = bad("[program.web]\ncommand = [\"x\"\n");
    assert_eq!(e.line, 3, "{e}");
    assert_eq!(e.message, "invalid array: expected `]`");
    let e = bad("[program.web\n");
    assert_eq!(e.line, 1, "{e}");
}

#[test]
fn user_needs_root_or_must_exist() {
    let text = "[program.web]\ncommand = [\"x\"]\nuser = \"nobody-zdt-test\"\n";
    let e = bad(text);
    assert_eq!((e.line, e.col), (3, 8), "{e}");
    if nix::unistd::geteuid().is_root() {
        assert!(e.message.contains("no user named"), "{e}");
    } else {
        assert!(e.message.contains("root"), "{e}");
    }
}

#[test]
fn defaults_and_resolution() {
    let c = parse(
        "[program.web]\ncommand = \"node 'my app.js' --port 1\"\ndirectory = \"current\"\n",
        Path::new(FILE),
    )
    .expect("valid");
    assert_eq!(c.supervisor.control, Path::new("/srv/app/run/zdt.sock"));
    assert_eq!(c.supervisor.log_dir, Path::new("/srv/app/logs"));
    assert_eq!(c.supervisor.control_mode, 0o600);
    let w = &c.programs["web"];
    assert_eq!(w.command, ["node", "my app.js", "--port", "1"]);
    assert_eq!(w.directory.as_deref(), Some(Path::new("/srv/app/current")));
    assert_eq!(w.instances, 1);
    assert!(w.autostart);
    assert_eq!(w.autorestart, AutoRestart::Unexpected);
    assert_eq!(w.exitcodes, [0]);
    assert_eq!(w.startsecs, Duration::from_secs(1));
    assert_eq!(w.startretries, 3);
    assert_eq!(w.stop_signal, Signal::SIGTERM);
    assert_eq!(w.kill_timeout, Duration::from_secs(10));
    assert_eq!(w.max_wait, Duration::from_secs(30));
    assert_eq!(w.priority, 999);
    assert_eq!(
        w.stdout_log.file.as_deref(),
        Some("/srv/app/logs/{program}-{instance}.out.log")
    );
    assert_eq!(w.stderr_log.max_bytes, 50 << 20);
    assert_eq!(w.stderr_log.backups, 10);
}

#[test]
fn every_key_is_read() {
    let text = r#"
[supervisor]
control = "/run/zdt.sock"
control_mode = "0660"
log_dir = "/var/log/zdt"
pidfile = "zdt.pid"

[program.api]
command = ["php", "-S", "127.0.0.1:8000"]
environment = { APP_ENV = "prod", WORKERS = 4, DEBUG = false }
umask = "022"
instances = 2
autostart = false
autorestart = true
exitcodes = [0, 2]
startsecs = "250ms"
startretries = 5
stopsignal = "QUIT"
kill_timeout = 7
max_wait = "1m"
priority = 5
redirect_stderr = true
stdout_logfile = "NONE"
stderr_logfile = "log/{program}.{instance}.err"
stderr_logfile_maxbytes = "1KB"
stderr_logfile_backups = 0
"#;
    let c = parse(text, Path::new(FILE)).expect("valid");
    assert_eq!(c.supervisor.control_mode, 0o660);
    assert_eq!(
        c.supervisor.pidfile.as_deref(),
        Some(Path::new("/srv/app/zdt.pid"))
    );
    let a = &c.programs["api"];
    assert_eq!(a.environment["WORKERS"], "4");
    assert_eq!(a.environment["DEBUG"], "false");
    assert_eq!(a.umask, Some(0o22));
    assert_eq!(a.instances, 2);
    assert!(!a.autostart);
    assert_eq!(a.autorestart, AutoRestart::Always);
    assert_eq!(a.exitcodes, [0, 2]);
    assert_eq!(a.startsecs, Duration::from_millis(250));
    assert_eq!(a.startretries, 5);
    assert_eq!(a.stop_signal, Signal::SIGQUIT);
    assert_eq!(a.kill_timeout, Duration::from_secs(7));
    assert_eq!(a.max_wait, Duration::from_secs(60));
    assert_eq!(a.priority, 5);
    assert!(a.redirect_stderr);
    assert_eq!(a.stdout_log.file, None);
    assert_eq!(
        a.stderr_log.file.as_deref(),
        Some("/srv/app/log/{program}.{instance}.err")
    );
    assert_eq!(a.stderr_log.max_bytes, 1024);
    assert_eq!(a.stderr_log.backups, 0);
}

#[test]
fn listen_ready_and_strategy() {
    let text = r#"
[program.web]
command = ["node", "app.js"]
listen = ["tcp://0.0.0.0:9501", "tcp://[::1]:9501", "unix://run/app.sock"]
backlog = 1024
ready = { notify = true }
ready_timeout = "5s"
strategy = "rolling"
mode = "pass"
"#;
    let c = parse(text, Path::new(FILE)).expect("valid");
    let w = &c.programs["web"];
    assert_eq!(w.listen.len(), 3);
    assert_eq!(w.listen[1].to_string(), "tcp://[::1]:9501");
    assert_eq!(
        w.listen[2],
        ListenAddr::Unix("/srv/app/run/app.sock".into())
    );
    assert_eq!(w.ready, Ready::Notify);
    assert_eq!(w.strategy, Strategy::Rolling);
    assert_eq!(w.ready_timeout, Duration::from_secs(5));
    assert_eq!(w.fdname, "web");
    assert!(w.overlaps());
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlisten = [\"0.0.0.0:80\"]\n",
        3,
        11,
        "tcp://IP:PORT",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nready = { notify = true, delay = \"1s\" }\n",
        3,
        9,
        "exactly one",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nready = { nottify = true }\n",
        3,
        11,
        "unknown field",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nstrategy = \"yolo\"\n",
        3,
        12,
        "rolling",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\n",
        3,
        8,
        "needs listen",
    );
}

#[test]
fn proxy_mode_and_its_probes() {
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmode = \"relay\"\n",
        3,
        8,
        "\"proxy\"",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:1\"]\nready = { http = \"/health\" }\n",
        4,
        9,
        "only mode = \"proxy\"",
    );
    let c = parse(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nready = { http = \"/health\" }\nqueue_timeout = \"2s\"\n",
        Path::new(FILE),
    )
    .expect("valid proxy");
    let w = &c.programs["web"];
    assert_eq!(w.mode, Mode::Proxy);
    assert_eq!(w.ready, Ready::Http("/health".into()));
    assert_eq!(w.queue_timeout, Duration::from_secs(2));
    assert!(w.overlaps());
    assert_eq!(w.header_timeout, Duration::from_secs(30));
    assert_eq!(w.max_header_bytes, 64 * 1024);
    assert!(w.forward_headers);
    assert_eq!(w.response_timeout, Duration::from_secs(60));
    assert_eq!(w.body_timeout, Duration::from_secs(60));
    assert_eq!(w.upstream_idle_timeout, Duration::from_secs(60));
    let c = parse(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nresponse_timeout = \"2s\"\nbody_timeout = \"3s\"\nupstream_idle_timeout = \"500ms\"\n",
        Path::new(FILE),
    )
    .expect("valid timeouts");
    let w = &c.programs["web"];
    assert_eq!(w.response_timeout, Duration::from_secs(2));
    assert_eq!(w.body_timeout, Duration::from_secs(3));
    assert_eq!(w.upstream_idle_timeout, Duration::from_millis(500));
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nresponse_timeout = \"0s\"\n",
        5,
        20,
        "response_timeout must be above 0",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nupstream_idle_timeout = \"soon\"\n",
        5,
        25,
        "invalid duration",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nmax_header_bytes = 100\n",
        5,
        20,
        "out of range",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nprotocol = \"udp\"\n",
        5,
        12,
        "invalid protocol \"udp\"",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:1\"]\nprotocol = \"tcp\"\n",
        4,
        12,
        "needs mode = \"proxy\"",
    );
    let c = parse(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nprotocol = \"tcp\"\n",
        Path::new(FILE),
    )
    .expect("valid tcp proxy");
    assert_eq!(c.programs["web"].protocol, Protocol::Tcp);
    assert_eq!(c.programs["web"].upstream, UpstreamKind::Tcp);
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:1\"]\nupstream = \"unix\"\n",
        4,
        12,
        "needs mode = \"proxy\"",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\nupstream = \"pipe\"\n",
        5,
        12,
        "invalid upstream \"pipe\"",
    );
}

#[test]
fn a_mode_written_as_a_decimal_integer_is_refused() {
    assert_bad(
        "[supervisor]\ncontrol_mode = 600\n",
        2,
        16,
        "control_mode = 600 is a decimal number (octal 1130)",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\numask = 22\n",
        3,
        9,
        "\"022\"",
    );
    // Octal integers, strings and zero say what they mean.
    let c = parse(
        "[supervisor]\ncontrol_mode = 0o640\n[program.web]\ncommand = [\"x\"]\numask = 0\nlisten = [\"unix:///tmp/x.sock\"]\nsocket_mode = \"0666\"\n",
        Path::new(FILE),
    )
    .expect("valid");
    assert_eq!(c.supervisor.control_mode, 0o640);
    assert_eq!(c.programs["web"].umask, Some(0));
    assert_eq!(c.programs["web"].socket_mode, 0o666);
}

#[test]
fn proxy_threads_default_to_the_cpus_and_are_bounded() {
    let c = parse("[program.web]\ncommand = [\"x\"]\n", Path::new(FILE)).expect("valid");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(c.supervisor.proxy_threads, cpus.min(64));
    let c = parse("[supervisor]\nproxy_threads = 3\n", Path::new(FILE)).expect("valid");
    assert_eq!(c.supervisor.proxy_threads, 3);
    assert_bad("[supervisor]\nproxy_threads = 0\n", 2, 17, "use 1 to 64");
}

#[test]
fn two_programs_on_one_address_and_too_many_instances_are_refused() {
    assert_bad(
        "[program.a]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:9000\"]\n[program.b]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:9001\", \"tcp://127.0.0.1:9000\"]\n",
        6,
        35,
        "already the listen address of program \"a\"",
    );
    assert_bad(
        "[program.a]\ncommand = [\"x\"]\ninstances = 100000\n",
        3,
        13,
        "instances = 100000: use 1 to 1024",
    );
    let ok = parse(
        "[program.a]\ncommand = [\"x\"]\ninstances = 1024\n",
        Path::new(FILE),
    )
    .expect("1024 instances");
    assert_eq!(ok.programs["a"].instances, 1024);
}

#[test]
fn ready_takes_a_name_and_errors_speak_in_config_keys() {
    let c = parse(
        "[program.a]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:9000\"]\nready = \"notify\"\n",
        Path::new(FILE),
    )
    .expect("ready = \"notify\"");
    assert_eq!(c.programs["a"].ready, Ready::Notify);
    assert_bad(
        "[program.a]\ncommand = [\"x\"]\nready = \"sometimes\"\n",
        3,
        9,
        "unknown ready \"sometimes\": use \"notify\", \"tcp\", or a table",
    );
    for text in [
        "[program.a]\ncommand = [\"x\"]\nready = 3\n",
        "program = 3\n",
        "[program]\na = 3\n",
        "supervisor = 3\n",
    ] {
        let e = bad(text);
        assert!(!e.message.contains("Raw"), "{text:?} -> {}", e.message);
        assert!(!e.message.contains("struct"), "{text:?} -> {}", e.message);
    }
}

#[test]
fn max_connections_is_a_positive_count_for_proxied_programs() {
    const PROXY: &str =
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\n";
    let c = parse(PROXY, Path::new(FILE)).expect("valid proxy");
    assert_eq!(c.programs["web"].max_connections, None);
    let c = parse(&format!("{PROXY}max_connections = 500\n"), Path::new(FILE)).expect("valid");
    assert_eq!(c.programs["web"].max_connections, Some(500));
    assert_bad(
        &format!("{PROXY}max_connections = 0\n"),
        5,
        19,
        "max_connections = 0: use 1 to",
    );
    assert_bad(&format!("{PROXY}max_connections = -3\n"), 5, 19, "use 1 to");
    assert_bad(
        &format!("{PROXY}max_connections = \"many\"\n"),
        5,
        19,
        "expected an integer",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:1\"]\nmax_connections = 10\n",
        4,
        19,
        "needs mode = \"proxy\"",
    );
}

#[test]
fn a_control_character_outside_a_string_is_named() {
    // toml gives no message for these; "FILE:1:10: " alone said nothing.
    assert_bad(
        "# a comment\x01\n",
        1,
        12,
        "control character U+0001 is not allowed here",
    );
    assert_bad("[supervisor]\n#\0\n", 2, 2, "U+0000");
}

#[test]
fn deploy_tables_are_checked() {
    let ok = parse(
        "[program.web]\ncommand = \"node app.js\"\ndirectory = \"/srv/web/current\"\n[program.web.deploy]\nroot = \"/srv/web\"\nshared = [\"storage/\", \".env\"]\nbuild = [[\"npm\", \"ci\"], \"npm run build\"]\nkeep_releases = 3\n[program.web.deploy.watch]\ngit = \"/srv/web.git#main\"\n\n[program.queue]\ncommand = \"node queue.js\"\n[program.queue.deploy]\nroot = \"/srv/web\"\n",
        Path::new(FILE),
    )
    .expect("valid");
    let web = ok.programs["web"].deploy.clone().expect("deploy");
    assert_eq!(web.shared, [Path::new("storage"), Path::new(".env")]);
    assert_eq!(web.build[1], ["npm", "run", "build"]);
    assert_eq!(web.keep_releases, 3);
    assert_eq!(
        web.watch,
        Some(Watch::Git {
            url: "/srv/web.git".into(),
            branch: "main".into(),
            interval: Duration::from_secs(30)
        })
    );
    // The queue worker shares the root and takes the web's settings.
    assert_eq!(ok.programs["queue"].deploy, Some(web));
    let head = "[program.web]\ncommand = \"x\"\n[program.web.deploy]\nroot = \"/srv/web\"\n";
    assert_bad(
        &format!("{head}shared = [\"../etc\"]\n"),
        5,
        11,
        "stay inside the release",
    );
    assert_bad(
        &format!("{head}shared = [\"/etc\"]\n"),
        5,
        11,
        "stay inside the release",
    );
    assert_bad(
        &format!("{head}keep_releases = 0\n"),
        5,
        17,
        "use 1 to 1000",
    );
    assert_bad(&format!("{head}build_timeout = \"0s\"\n"), 5, 17, "above 0");
    assert_bad(
        &format!("{head}rooot = \"x\"\n"),
        5,
        1,
        "unknown field `rooot`",
    );
    assert_bad(
        &format!("{head}[program.web.deploy.watch]\ngit = \"/srv/web.git\"\n"),
        6,
        7,
        "URL#BRANCH",
    );
    assert_bad(
        &format!("{head}[program.web.deploy.watch]\ninterval = \"5s\"\n"),
        5,
        1,
        "exactly one of git",
    );
    assert_bad(
        &format!("{head}build = [\"a\"]\n[program.q]\ncommand = \"y\"\n[program.q.deploy]\nroot = \"/srv/web\"\nbuild = [\"b\"]\n"),
        4,
        8,
        "set different deploy settings",
    );
}

#[test]
fn canary_header_is_an_application_header_of_a_proxied_http_program() {
    const PROXY: &str =
        "[program.web]\ncommand = [\"x\"]\nmode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:1\"]\n";
    let c = parse(PROXY, Path::new(FILE)).expect("valid proxy");
    assert_eq!(c.programs["web"].canary_header, None);
    let c = parse(
        &format!("{PROXY}canary_header = \"X-User-Id\"\n"),
        Path::new(FILE),
    )
    .expect("valid");
    assert_eq!(
        c.programs["web"].canary_header.as_deref(),
        Some("X-User-Id")
    );
    assert_bad(
        &format!("{PROXY}canary_header = \"Cookie\"\n"),
        5,
        17,
        "zdt rewrites or reads this header itself",
    );
    assert_bad(
        &format!("{PROXY}canary_header = \"X User\"\n"),
        5,
        17,
        "not a header name",
    );
    assert_bad(
        &format!("{PROXY}protocol = \"tcp\"\ncanary_header = \"X-User-Id\"\n"),
        6,
        17,
        "needs mode = \"proxy\" with protocol = \"http\"",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlisten = [\"tcp://127.0.0.1:1\"]\ncanary_header = \"X-User-Id\"\n",
        4,
        17,
        "needs mode = \"proxy\"",
    );
}

#[test]
fn the_admin_listener_takes_an_address_or_a_socket_path() {
    let c = parse("[program.web]\ncommand = [\"x\"]\n", Path::new(FILE)).expect("valid");
    assert_eq!(c.supervisor.admin, None, "off by default");
    assert_eq!(c.supervisor.drain_delay, std::time::Duration::ZERO);
    assert_eq!(c.supervisor.log_format, crate::config::LogFormat::Text);
    for (given, want) in [
        (
            "127.0.0.1:9180",
            ListenAddr::Tcp("127.0.0.1:9180".parse().expect("addr")),
        ),
        (
            "tcp://[::1]:9180",
            ListenAddr::Tcp("[::1]:9180".parse().expect("addr")),
        ),
        (
            "unix:///run/zdt/admin.sock",
            ListenAddr::Unix("/run/zdt/admin.sock".into()),
        ),
        (
            "run/admin.sock",
            ListenAddr::Unix("/srv/app/run/admin.sock".into()),
        ),
    ] {
        let text = format!("[supervisor]\nadmin = {given:?}\n");
        let c = parse(&text, Path::new(FILE)).expect("valid");
        assert_eq!(c.supervisor.admin, Some(want), "{given}");
    }
    let c = parse(
        "[supervisor]\ndrain_delay = \"5s\"\nlog_format = \"json\"\n",
        Path::new(FILE),
    )
    .expect("valid");
    assert_eq!(c.supervisor.drain_delay, std::time::Duration::from_secs(5));
    assert_eq!(c.supervisor.log_format, crate::config::LogFormat::Json);
}

#[test]
fn a_bad_admin_address_drain_delay_or_log_format_is_refused_where_it_is() {
    assert_bad(
        "[supervisor]\nadmin = \"localhost\"\n",
        2,
        9,
        "expected IP:PORT",
    );
    assert_bad(
        "[supervisor]\nadmin = \"tcp://nowhere\"\n",
        2,
        9,
        "tcp://IP:PORT",
    );
    assert_bad("[supervisor]\ndrain_delay = \"soon\"\n", 2, 15, "duration");
    assert_bad(
        "[supervisor]\nlog_format = \"xml\"\n",
        2,
        14,
        "use \"text\" or \"json\"",
    );
    assert_bad(
        "[supervisor]\nagent_check = \"9181\"\n",
        2,
        15,
        "expected IP:PORT",
    );
}

#[test]
fn limits_take_numbers_or_unlimited_and_unknown_ones_are_refused() {
    let c = parse(
        "[program.web]\ncommand = [\"x\"]\nlimits = { nofile = 65536, core = 0, fsize = \"unlimited\" }\n",
        Path::new(FILE),
    )
    .expect("valid");
    let mut limits = c.programs["web"].limits.clone();
    limits.sort();
    assert_eq!(
        limits,
        vec![
            (crate::config::Limit::Nofile, Some(65536)),
            (crate::config::Limit::Core, Some(0)),
            (crate::config::Limit::Fsize, None),
        ]
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlimits = { nofiles = 1 }\n",
        3,
        12,
        "unknown limit \"nofiles\": use one of nofile, core",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlimits = { core = -1 }\n",
        3,
        19,
        "limits.core: expected a number (0 or more) or \"unlimited\"",
    );
    assert_bad(
        "[program.web]\ncommand = [\"x\"]\nlimits = { core = \"lots\" }\n",
        3,
        19,
        "expected a number",
    );
}

#[test]
fn env_files_are_read_in_order_and_environment_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join(".env"),
        "A=from-env\nB=from-env\nexport C=\"x y\"\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("local.env"), "B=from-local\n").expect("write");
    let file = dir.path().join("supervisor.toml");
    let c = parse(
        "[program.web]\ncommand = [\"x\"]\nenv_file = [\".env\", \"local.env\"]\nenvironment = { A = \"from-config\" }\n",
        &file,
    )
    .expect("valid");
    let env = &c.programs["web"].environment;
    assert_eq!(env["A"], "from-config");
    assert_eq!(env["B"], "from-local");
    assert_eq!(env["C"], "x y");
    let c = parse(
        "[program.web]\ncommand = [\"x\"]\nenv_file = \".env\"\n",
        &file,
    )
    .expect("valid");
    assert_eq!(c.programs["web"].environment["A"], "from-env");
}

#[test]
fn a_missing_or_bad_env_file_is_an_error_that_says_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("supervisor.toml");
    let e = parse(
        "[program.web]\ncommand = [\"x\"]\nenv_file = \"nope.env\"\n",
        &file,
    )
    .expect_err("missing");
    assert_eq!((e.line, e.col), (3, 12), "{e}");
    assert!(
        e.message.contains("env_file \"nope.env\": cannot read it"),
        "{e}"
    );
    std::fs::write(dir.path().join("bad.env"), "A=1\n\nnot a line\n").expect("write");
    let e = parse(
        "[program.web]\ncommand = [\"x\"]\nenv_file = \"bad.env\"\n",
        &file,
    )
    .expect_err("bad");
    assert!(
        e.to_string().starts_with(&format!(
            "{}:3:1: expected KEY=VALUE",
            dir.path().join("bad.env").display()
        )),
        "{e}"
    );
    let e = parse(
        "[program.web]\ncommand = [\"x\"]\nenv_file = \"/dev/zero\"\n",
        &file,
    )
    .expect_err("not a file");
    assert!(e.message.contains("not a regular file"), "{e}");
}

#[test]
fn variables_are_expanded_and_later_errors_keep_the_files_columns() {
    // HOME is set for the tests; ZDT_TEST_UNSET_VAR is not.
    let home = std::env::var("HOME").expect("HOME");
    let c = parse(
        "[program.web]\ncommand = [\"node\", \"${HOME}/app.js\", \"${ZDT_TEST_UNSET_VAR:-8080}\"]\n",
        Path::new(FILE),
    )
    .expect("valid");
    assert_eq!(
        c.programs["web"].command,
        ["node".to_string(), format!("{home}/app.js"), "8080".into()]
    );
    assert!(c.text.contains("${HOME}"), "the text kept is the file's");
    assert_bad(
        "[program.web]\ncommand = [\"x\", \"${ZDT_TEST_UNSET_VAR}\"]\n",
        2,
        18,
        "environment variable ZDT_TEST_UNSET_VAR is not set",
    );
    // An error after an expansion on the same line points at the file's column.
    assert_bad(
        "[program.web]\ncommand = [\"${HOME}\"]\nstartsecs = \"soon\"\n",
        3,
        13,
        "duration",
    );
    assert_bad(
        "[program.web]\ndirectory = \"${HOME}\" ; x = 1\n",
        2,
        23,
        "",
    );
}

#[test]
fn includes_add_programs_and_groups_with_paths_relative_to_their_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("conf.d/more")).expect("mkdir");
    std::fs::write(
        d.join("conf.d/a.toml"),
        "include = [\"more/*.toml\"]\n[program.queue]\ncommand = [\"q\"]\ndirectory = \"app\"\n",
    )
    .expect("write");
    std::fs::write(
        d.join("conf.d/more/b.toml"),
        "[program.cron]\ncommand = [\"c\"]\n[group.jobs]\nprograms = [\"queue\", \"cron\"]\n",
    )
    .expect("write");
    // Not matched by *.toml: ignored.
    std::fs::write(d.join("conf.d/notes.txt"), "not toml").expect("write");
    let main = "include = [\"conf.d/*.toml\", \"conf.d/empty/*.toml\"]\n\
                [program.web]\ncommand = [\"w\"]\n\
                [group.site]\nprograms = [\"web\", \"queue\", \"web\"]\n";
    let c = parse(main, &d.join("supervisor.toml")).unwrap_or_else(|e| panic!("{}", e.render()));
    assert_eq!(
        c.programs.keys().collect::<Vec<_>>(),
        ["cron", "queue", "web"]
    );
    // Relative to conf.d/a.toml's folder, not the main file's.
    let real = std::fs::canonicalize(d).expect("canonical");
    assert_eq!(
        c.programs["queue"].directory.as_deref(),
        Some(real.join("conf.d/app").as_path())
    );
    assert_eq!(c.groups["site"], ["web", "queue"]);
    assert_eq!(c.groups["jobs"], ["queue", "cron"]);
    assert_eq!(c.included.len(), 2);
    // An upgrade re-reads the carried texts, not the disk.
    std::fs::remove_file(d.join("conf.d/more/b.toml")).expect("rm");
    let again = parse_carried(main, &d.join("supervisor.toml"), &c.included)
        .unwrap_or_else(|e| panic!("{}", e.render()));
    assert_eq!(again.programs, c.programs);
    assert_eq!(again.groups, c.groups);
    assert_eq!(again.included, c.included);
}

#[test]
fn a_bad_include_is_an_error_in_the_file_that_has_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = std::fs::canonicalize(dir.path()).expect("canonical");
    let main = d.join("supervisor.toml");
    // A missing file (no wildcard): where the include names it.
    let e = parse("include = [\"nope.toml\"]\n", &main).expect_err("missing");
    assert_eq!(
        (e.line, e.col, e.file.clone()),
        (1, 12, main.clone()),
        "{e}"
    );
    assert!(
        e.message.contains("nope.toml") && e.message.contains("cannot read it"),
        "{e}"
    );
    // A cycle: a includes b includes a.
    std::fs::write(d.join("a.toml"), "include = [\"b.toml\"]\n").expect("write");
    std::fs::write(d.join("b.toml"), "\ninclude = [\"a.toml\"]\n").expect("write");
    let e = parse("include = [\"a.toml\"]\n", &main).expect_err("cycle");
    assert_eq!(
        (e.line, e.col, e.file.clone()),
        (2, 12, d.join("b.toml")),
        "{e}"
    );
    assert!(e.message.starts_with("include cycle: "), "{e}");
    assert!(
        e.message.contains("a.toml includes") && e.message.contains("b.toml includes"),
        "{e}"
    );
    // Including the main file is a cycle too.
    std::fs::write(&main, "include = [\"supervisor.toml\"]\n").expect("write");
    let e = parse("include = [\"supervisor.toml\"]\n", &main).expect_err("self");
    assert!(e.message.starts_with("include cycle"), "{e}");
    // An error inside an included file names that file's line and column;
    // [supervisor] belongs to the main file.
    std::fs::write(
        d.join("c.toml"),
        "[program.x]\ncommand = [\"x\"]\nstartsecs = \"1 minute\"\n",
    )
    .expect("write");
    let e = parse("include = [\"c.toml\"]\n", &main).expect_err("bad value");
    assert_eq!((e.line, e.file.clone()), (3, d.join("c.toml")), "{e}");
    std::fs::write(d.join("s.toml"), "[supervisor]\nlog_dir = \"x\"\n").expect("write");
    let e = parse("include = [\"s.toml\"]\n", &main).expect_err("supervisor");
    assert_eq!((e.line, e.file.clone()), (1, d.join("s.toml")), "{e}");
    assert!(e.message.contains("unknown field `supervisor`"), "{e}");
    // A program defined in two files.
    std::fs::write(d.join("w.toml"), "[program.web]\ncommand = [\"w\"]\n").expect("write");
    let e = parse(
        "include = [\"w.toml\"]\n[program.web]\ncommand = [\"w\"]\n",
        &main,
    )
    .expect_err("twice");
    assert_eq!((e.line, e.file.clone()), (1, d.join("w.toml")), "{e}");
    assert!(
        e.message
            .contains(&format!("defined twice: first at {}:2", main.display())),
        "{e}"
    );
    // An unset variable in an included file: that file's position.
    std::fs::write(
        d.join("v.toml"),
        "[program.v]\ncommand = [\"${ZDT_TEST_UNSET_VAR}\"]\n",
    )
    .expect("write");
    let e = parse("include = [\"v.toml\"]\n", &main).expect_err("unset");
    assert_eq!(
        (e.line, e.col, e.file.clone()),
        (2, 13, d.join("v.toml")),
        "{e}"
    );
}

#[test]
fn bad_groups_are_rejected_where_they_are_written() {
    let web = "[program.web]\ncommand = [\"w\"]\n";
    assert_bad(
        &format!("{web}[group.site]\nprograms = [\"web\", \"wbe\"]\n"),
        4,
        20,
        "group \"site\": no program named \"wbe\" (programs: web)",
    );
    assert_bad(
        &format!("{web}[group.web]\nprograms = [\"web\"]\n"),
        3,
        8,
        "has the name of a program",
    );
    assert_bad(
        &format!("{web}[group.site]\nprograms = []\n"),
        3,
        8,
        "has no programs",
    );
    assert_bad(
        &format!("{web}[group.all]\nprograms = [\"web\"]\n"),
        3,
        8,
        "invalid group name",
    );
    assert_bad(
        &format!("{web}[group.site]\nprogram = [\"web\"]\n"),
        4,
        1,
        "unknown field `program`",
    );
}

#[test]
fn max_memory_takes_a_size_of_a_megabyte_or_more() {
    let web = "[program.web]\ncommand = [\"w\"]\n";
    let c = parse(
        &format!("{web}max_memory_restart = \"512M\"\n"),
        Path::new(FILE),
    )
    .expect("PM2's name and form");
    assert_eq!(c.programs["web"].max_memory, Some(512 << 20));
    assert_eq!(c.programs["web"].max_memory_for, Duration::from_secs(30));
    assert_bad(
        &format!("{web}max_memory = \"10KB\"\n"),
        3,
        14,
        "at least \"1MB\"",
    );
    assert_bad(
        &format!("{web}max_memory = \"lots\"\n"),
        3,
        14,
        "invalid size",
    );
    assert_bad(
        &format!("{web}max_memory_for = \"5 parsecs\"\n"),
        3,
        18,
        "invalid duration",
    );
}

#[test]
fn cron_restart_is_checked_where_it_is_written() {
    let web = "[program.web]\ncommand = [\"w\"]\n";
    let c = parse(
        &format!("{web}cron_restart = \"0 4 * * *\"\n"),
        Path::new(FILE),
    )
    .expect("valid");
    assert_eq!(c.programs["web"].cron_restart.as_deref(), Some("0 4 * * *"));
    assert_bad(
        &format!("{web}cron_restart = \"0 25 * * *\"\n"),
        3,
        16,
        "expected 5 fields",
    );
}

#[test]
fn env_files_are_carried_like_included_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("supervisor.toml");
    std::fs::write(dir.path().join("app.env"), "A=1\n").expect("write");
    let text = "[program.web]\ncommand = [\"w\"]\nenv_file = \"app.env\"\n";
    let c = parse(text, &main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.included,
        [(dir.path().join("app.env"), "A=1\n".to_string())]
    );
    std::fs::write(dir.path().join("app.env"), "A=2\n").expect("write");
    let carried = parse_carried(text, &main, &c.included).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(carried.programs["web"].environment["A"], "1", "what ran");
    // Nothing carried (an older binary): the disk.
    let old = parse_carried(text, &main, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(old.programs["web"].environment["A"], "2");
}
