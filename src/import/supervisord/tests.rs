use std::path::Path;

use super::*;
use crate::import::tests::{assert_loads, files};

/// Imports `main` from `list` and renders it; returns the text, the
/// notes as strings, and the folder.
fn run(list: &[(&str, &str)]) -> (String, Vec<String>, tempfile::TempDir) {
    let dir = files(list);
    let main = dir.path().join(list[0].0);
    let doc = import(&main).unwrap_or_else(|e| panic!("{e}"));
    let text = doc.render(&main);
    let notes = doc.notes.iter().map(|n| n.to_string()).collect();
    (text, notes, dir)
}

fn program_text(text: &str, name: &str) -> String {
    let head = format!("[program.{name}]\n");
    let start = text
        .find(&head)
        .unwrap_or_else(|| panic!("no {head} in {text}"));
    let rest = &text[start + head.len()..];
    rest[..rest.find("\n[").unwrap_or(rest.len())].to_string()
}

#[test]
fn every_program_key_maps() {
    let (text, notes, dir) = run(&[(
        "s.conf",
        "[program:web]\ncommand=/bin/cat -n\ndirectory=/tmp\numask=022\npriority=5\nautostart=false\nautorestart=unexpected\nexitcodes=0,2\nstartsecs=3\nstartretries=7\nstopsignal=quit\nstopwaitsecs=20\nredirect_stderr=true\nstdout_logfile=/tmp/w.log\nstdout_logfile_maxbytes=1mb\nstdout_logfile_backups=4\nenvironment=A=\"x, y\",B=2\n",
    )]);
    let p = program_text(&text, "web");
    for line in [
        "command = \"/bin/cat -n\"",
        "directory = \"/tmp\"",
        "umask = \"022\"",
        "priority = 5",
        "autostart = false",
        "autorestart = \"unexpected\"",
        "exitcodes = [0, 2]",
        "startsecs = \"3s\"",
        "startretries = 7",
        "stop_signal = \"QUIT\"",
        "kill_timeout = \"20s\"",
        "redirect_stderr = true",
        "stdout_logfile = \"/tmp/w.log\"",
        "stdout_logfile_maxbytes = \"1MB\"",
        "stdout_logfile_backups = 4",
        "environment.A = \"x, y\"",
        "environment.B = \"2\"",
    ] {
        assert!(p.lines().any(|l| l == line), "want {line:?} in\n{p}");
    }
    assert!(notes.is_empty(), "{notes:?}");
    assert_loads(&text, dir.path());
}

#[test]
fn autorestart_true_false_unexpected() {
    for (v, want) in [
        ("true", "always"),
        ("false", "never"),
        ("unexpected", "unexpected"),
    ] {
        let (text, _, _) = run(&[(
            "s.conf",
            &format!("[program:a]\ncommand=x\nautorestart={v}\n"),
        )]);
        assert!(
            text.contains(&format!("autorestart = \"{want}\"")),
            "{v}: {text}"
        );
    }
}

#[test]
fn numprocs_and_process_num() {
    let (text, _, dir) = run(&[(
        "s.conf",
        "[program:w]\ncommand=/bin/sleep 10%(process_num)02d\nprocess_name=%(program_name)s_%(process_num)02d\nnumprocs=3\nstdout_logfile=/tmp/w-%(process_num)s.log\nstderr_logfile=/tmp/w.err\nenvironment=N=\"%(process_num)d\",P=\"%(program_name)s\"\n",
    )]);
    let p = program_text(&text, "w");
    assert!(p.contains("instances = 3"), "{p}");
    assert!(
        p.contains(r#"command = ["/bin/sh", "-c", "#) && p.contains("$ZDT_INSTANCE"),
        "{p}"
    );
    assert!(
        p.contains(
            "# process_name = %(program_name)s_%(process_num)02d: zdt names instances w:0 to w:2"
        ),
        "{p}"
    );
    assert!(
        p.contains("stdout_logfile = \"/tmp/w-{instance}.log\"\n"),
        "{p}"
    );
    assert!(
        p.contains(
            "stderr_logfile = \"/tmp/w-{instance}.err\"  # was /tmp/w.err, shared by 3 processes"
        ),
        "{p}"
    );
    assert!(p.contains("environment.P = \"w\""), "{p}");
    assert!(!p.contains("environment.N"), "N is set by sh: {p}");
    assert_loads(&text, dir.path());
}

#[test]
fn the_sh_wrapper_gives_each_instance_its_number() {
    let (text, _, _) = run(&[(
        "s.conf",
        "[program:w]\ncommand=/bin/echo a%(process_num)03d '%(ENV_HOME)s' 'it''s ${x}'\nnumprocs_start=5\nnumprocs=2\nenvironment=N=\"n%(process_num)s\"\n",
    )]);
    let config = crate::config::parse(&text, Path::new("/tmp/supervisor.toml")).expect("parses");
    let argv = &config.programs["w"].command;
    assert_eq!(argv[..2], ["/bin/sh", "-c"]);
    // Run the script as an instance would: ZDT_INSTANCE=1 → 6.
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(argv[2].replace("exec '/bin/echo'", "exec '/bin/echo' \"$N\""))
        .env("ZDT_INSTANCE", "1")
        .output()
        .expect("sh");
    let home = std::env::var("HOME").unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("n6 a006 {home} its ${{x}}\n")
    );
}

#[test]
fn expansions_here_group_env() {
    let (text, _, dir) = run(&[(
        "s.conf",
        "[group:g]\nprograms=a\n[program:a]\ncommand=/bin/x %(here)s %(group_name)s %(program_name)s %(numprocs)d 100%%\nstdout_logfile=%(ENV_HOME)s/a.log\n",
    )]);
    let here = std::fs::canonicalize(dir.path()).expect("canon");
    assert!(
        text.contains(&format!(
            "command = \"/bin/x {} g a 1 100%\"",
            here.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("stdout_logfile = \"${HOME}/a.log\""),
        "{text}"
    );
    assert!(text.contains("[group.g]\nprograms = [\"a\"]"), "{text}");
    assert_loads(&text, dir.path());
}

#[test]
fn supervisord_environment_reaches_every_program() {
    let (text, _, _) = run(&[(
        "s.conf",
        "[supervisord]\nenvironment=A=\"1\",B=\"2\"\n[program:a]\ncommand=x\nenvironment=B=\"3\"\n",
    )]);
    assert!(
        text.contains("environment.A = \"1\"  # from [supervisord] environment"),
        "{text}"
    );
    assert!(text.contains("environment.B = \"3\"\n"), "{text}");
    assert!(!text.contains("environment.B = \"2\""), "{text}");
}

#[test]
fn supervisor_table_and_reported_sections() {
    let (text, notes, dir) = run(&[(
        "s.conf",
        "[unix_http_server]\nfile=%(here)s/s.sock\nchmod=0770\nchown=nobody:nogroup\npassword=x\n[supervisord]\nchildlogdir=/var/log/x\npidfile=/run/x.pid\nlogfile=/var/log/s.log\nminfds=4096\n[inet_http_server]\nport=:9001\n[supervisorctl]\n[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory=x\n[eventlistener:e]\ncommand=x\n[ctlplugin:x]\n[program:a]\ncommand=x\nstdout_syslog=true\nserverurl=AUTO\n",
    )]);
    let here = std::fs::canonicalize(dir.path()).expect("canon");
    assert!(
        text.contains(&format!("control = \"{}/s.sock\"", here.display())),
        "{text}"
    );
    assert!(text.contains("control_mode = \"0770\"\n"), "{text}");
    assert!(text.contains("control_group = \"nogroup\""), "{text}");
    assert!(text.contains("log_dir = \"/var/log/x\""), "{text}");
    assert!(text.contains("pidfile = \"/run/x.pid\"\n"), "{text}");
    let all = notes.join("\n");
    for (line, word) in [
        (5, "password"),
        (9, "logfile"),
        (10, "minfds"),
        (11, "inet_http_server"),
        (13, "supervisorctl"),
        (14, "rpcinterface"),
        (16, "eventlistener"),
        (18, "ctlplugin"),
        (21, "stdout_syslog"),
        (22, "serverurl"),
    ] {
        let at = format!("s.conf:{line}: ");
        assert!(
            notes.iter().any(|n| n.contains(&at) && n.contains(word)),
            "want {word} at {at} in\n{all}"
        );
    }
}

#[test]
fn stopasgroup_and_killasgroup_are_noted() {
    let (text, _, _) = run(&[(
        "s.conf",
        "[program:a]\ncommand=x\nstopasgroup=false\nkillasgroup=true\n",
    )]);
    assert!(text.contains("# stopasgroup = false: zdt always sends stop_signal and SIGKILL to the whole process group (supervisord signalled the main process only)"), "{text}");
    assert!(
        text.contains("# killasgroup = true: zdt always sends"),
        "{text}"
    );
}

#[test]
fn a_user_that_cannot_be_used_is_commented_out() {
    let (text, _, dir) = run(&[("s.conf", "[program:a]\ncommand=x\nuser=zdt-no-such-user\n")]);
    assert!(text.contains("# user = \"zdt-no-such-user\"  # "), "{text}");
    assert_loads(&text, dir.path());
}

#[test]
fn fcgi_sockets_become_listen_in_pass_mode() {
    let (text, notes, dir) = run(&[(
        "s.conf",
        "[fcgi-program:php]\ncommand=/usr/bin/php-cgi\nsocket=tcp://localhost:9000\nsocket_backlog=128\nsocket_mode=0660\n[fcgi-program:u]\ncommand=/x\nsocket=unix:///tmp/%(program_name)s.sock\n[fcgi-program:h]\ncommand=/x\nsocket=tcp://example.org:9002\n",
    )]);
    let php = program_text(&text, "php");
    assert!(php.contains("listen = [\"tcp://127.0.0.1:9000\"]  # localhost as 127.0.0.1; supervisord gave the socket as fd 0"), "{php}");
    assert!(php.contains("mode = \"pass\""), "{php}");
    assert!(php.contains("backlog = 128"), "{php}");
    assert!(php.contains("socket_mode = \"0660\""), "{php}");
    assert!(program_text(&text, "u").contains("listen = [\"unix:///tmp/u.sock\"]"));
    assert!(program_text(&text, "h").contains("# listen = [\"tcp://example.org:9002\"]"));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("s.conf:11:") && n.contains("IP addresses")),
        "{notes:?}"
    );
    assert_loads(&text, dir.path());
}

#[test]
fn includes_are_read_relative_to_the_including_file() {
    let (text, notes, dir) = run(&[
        (
            "etc/s.conf",
            "[include]\nfiles = conf.d/*.conf missing/*.conf\n[program:main]\ncommand=x\n",
        ),
        (
            "etc/conf.d/a.conf",
            "[program:a]\ncommand=a\n[include]\nfiles=../more/b.ini\n",
        ),
        ("etc/conf.d/.hidden.conf", "[program:hidden]\ncommand=h\n"),
        ("etc/more/b.ini", "[program:b]\ncommand=b\n"),
    ]);
    for p in ["main", "a", "b"] {
        assert!(text.contains(&format!("[program.{p}]")), "{p}: {text}");
    }
    assert!(!text.contains("hidden"), "{text}");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("s.conf:2:") && n.contains("no file matches")),
        "{notes:?}"
    );
    assert_loads(&text, dir.path());
}

#[test]
fn an_include_cycle_is_an_error() {
    let dir = files(&[
        ("a.conf", "[include]\nfiles=b.conf\n"),
        (
            "b.conf",
            "[program:x]\ncommand=x\n\n[include]\nfiles = a.conf\n",
        ),
    ]);
    let e = import(&dir.path().join("a.conf")).expect_err("cycle");
    assert!(e.to_string().contains("b.conf:5: [include] cycle: "), "{e}");
    assert!(
        e.message.contains("a.conf → ") && e.message.ends_with("a.conf"),
        "{e}"
    );
}

#[test]
fn bad_values_name_file_and_line() {
    for (text, line, word) in [
        ("[program:a]\ncommand=x\nnumprocs=two\n", 3, "integer"),
        ("[program:a]\ncommand=x\nnumprocs=0\n", 3, "1 to 1024"),
        (
            "[program:a]\ncommand=x\nautostart=maybe\n",
            3,
            "true or false",
        ),
        ("[program:a]\ncommand=x\nstopsignal=TREM\n", 3, "TREM"),
        ("[program:a]\ncommand=x %(nope)s\n", 2, "cannot be expanded"),
        (
            "[program:a]\ncommand=x\nenvironment=A=\"1\n",
            3,
            "unclosed quote",
        ),
        ("[program:a]\ncommand='x\n", 2, "does not split"),
        ("[program:a]\ndirectory=/x\n", 1, "no command"),
        (
            "[program:a]\ncommand=x\nthis is not ini\n",
            3,
            "expected key = value",
        ),
    ] {
        let dir = files(&[("s.conf", text)]);
        let e = import(&dir.path().join("s.conf")).expect_err(text);
        assert!(
            e.to_string().contains(&format!("s.conf:{line}: ")) && e.message.contains(word),
            "{text:?}: {e}"
        );
    }
    let e = import(Path::new("/nonexistent/zdt/s.conf")).expect_err("missing");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/zdt/s.conf: cannot read"),
        "{e}"
    );
}

#[test]
fn environment_syntax() {
    assert_eq!(
        parse_env("A=\"1,2\", B='x y',C=plain ,D=").expect("ok"),
        [
            ("A".to_string(), "1,2".to_string()),
            ("B".to_string(), "x y".to_string()),
            ("C".to_string(), "plain".to_string()),
            ("D".to_string(), String::new()),
        ]
    );
    assert!(parse_env("novalue").is_err());
}

#[test]
fn a_number_from_an_unset_variable_is_an_error() {
    let dir = files(&[(
        "s.conf",
        "[program:a]\ncommand=x\nnumprocs=%(ENV_ZDT_IMPORT_TEST_UNSET)s\n",
    )]);
    let e = import(&dir.path().join("s.conf")).expect_err("unset");
    assert!(
        e.to_string().contains("s.conf:3: ")
            && e.message.contains("ZDT_IMPORT_TEST_UNSET is not set"),
        "{e}"
    );
}

#[test]
fn a_syslog_logfile_stays_syslog() {
    let (t, notes, dir) = run(&[(
        "s.conf",
        "[program:a]\ncommand=/bin/sleep 1\nstdout_logfile=syslog\nstderr_logfile=SYSLOG\n",
    )]);
    let a = program_text(&t, "a");
    assert!(a.contains("stdout_logfile = \"syslog\"\n"), "{a}");
    assert!(a.contains("stderr_logfile = \"syslog\"\n"), "{a}");
    assert!(notes.iter().all(|n| !n.contains("syslog")), "{notes:?}");
    assert_loads(&t, dir.path());
}
