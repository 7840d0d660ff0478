//! `zdt import`: the sample configurations in tests/data/import (real
//! ones, see SOURCES.md there) import and pass `zdt check`; and zdt on an
//! imported supervisord.conf runs the same processes, with the same
//! environment, as supervisord on the original.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::*;

fn samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/import");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/data/import")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    all.sort();
    all
}

/// Runs `zdt import ARGS`.
fn import(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(bin("zdt"))
        .arg("import")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("zdt import")
}

/// Runs `zdt check -c FILE`: (exit code, stderr).
fn check(file: &Path) -> (i32, String) {
    let out = Command::new(bin("zdt"))
        .arg("check")
        .arg("-c")
        .arg(file)
        .output()
        .expect("zdt check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_sample_imports_and_passes_check() {
    let samples = samples();
    assert!(samples.len() >= 6, "samples: {samples:?}");
    for sample in samples {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("supervisor.toml");
        let o = import(&[sample.as_os_str(), "-o".as_ref(), out.as_os_str()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{}: {stderr}", sample.display());
        assert!(
            stderr.contains("zdt import: ") && stderr.contains(&*sample.to_string_lossy()),
            "{}: no report: {stderr}",
            sample.display()
        );
        let text = std::fs::read_to_string(&out).expect("output");
        // The supervisord sample has every program commented out.
        assert!(
            text.contains("[program.") || stderr.contains("no programs"),
            "{}: {text}",
            sample.display()
        );
        let (code, err) = check(&out);
        assert_eq!(
            code,
            0,
            "{}: zdt check refuses:\n{err}\n{text}",
            sample.display()
        );
    }
}

#[test]
fn import_prints_to_stdout_and_reports_on_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("s.conf");
    std::fs::write(
        &conf,
        "[program:a]\ncommand=/bin/sleep 1\nstdout_events_enabled=true\n",
    )
    .expect("write");
    let o = import(&[conf.as_os_str()]);
    assert_eq!(o.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stdout.contains("[program.a]\ncommand = \"/bin/sleep 1\"\n"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:3: [program:a] stdout_events_enabled: no zdt equivalent",
            conf.display()
        )),
        "{stderr}"
    );
}

#[test]
fn numbers_from_the_environment_are_read_when_importing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("s.conf");
    std::fs::write(
        &conf,
        "[program:a]\ncommand=/bin/sleep %(ENV_NAP)s\nnumprocs=%(ENV_WORKERS)s\nprocess_name=a%(process_num)s\nautostart=%(ENV_ON)s\n",
    )
    .expect("write");
    let o = Command::new(bin("zdt"))
        .arg("import")
        .arg(&conf)
        .env("WORKERS", "3")
        .env("ON", "false")
        .env("NAP", "5")
        .output()
        .expect("zdt import");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for line in [
        "command = \"/bin/sleep ${NAP}\"",
        "instances = 3",
        "autostart = false",
        "# numprocs = %(ENV_WORKERS)s: read from this environment when imported (3)",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "want {line:?} in\n{stdout}"
        );
    }
}

#[test]
fn import_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("s.conf");
    std::fs::write(&conf, "[program:a]\ncommand=/bin/sleep 1\n").expect("write");
    let out = dir.path().join("supervisor.toml");
    std::fs::write(&out, "# mine\n").expect("write");
    let o = import(&[conf.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&out).expect("read"), "# mine\n");
    let o = import(&[
        conf.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--force".as_ref(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(std::fs::read_to_string(&out)
        .expect("read")
        .contains("[program.a]"));
}

#[test]
fn an_unparsable_input_exits_2_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text, line) in [
        ("s.conf", "[program:a]\ncommand=x\nnot an option\n", ":3: "),
        ("p.yml", "apps:\n  - name: [\n", ":3: "),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).expect("write");
        let o = import(&[file.as_os_str()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: {}{line}", file.display())),
            "{name}: {stderr}"
        );
        assert!(o.stdout.is_empty());
    }
    let o = import(&[dir.path().join("missing.conf").as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
}

/// supervisord in the foreground on `conf`; killed (with its children) if
/// the test ends before it is stopped.
struct Supervisord(Option<Child>);

impl Supervisord {
    fn start(conf: &Path) -> Supervisord {
        let found = Command::new("supervisord")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "supervisord is not installed (apt-get install supervisor): this test compares zdt with it"
        );
        let log = std::fs::File::create(conf.with_extension("stderr")).expect("log");
        let child = Command::new("supervisord")
            .arg("-n")
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn supervisord");
        Supervisord(Some(child))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).expect("running")
    }

    /// SIGTERM, then waits until it and its children are gone.
    fn stop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let children = children_of(child.id());
        kill(child.id(), libc::SIGTERM);
        wait_for(
            "supervisord to stop",
            Duration::from_secs(30),
            || match child.try_wait() {
                Ok(Some(_)) => Ok(()),
                _ => Err("running".into()),
            },
        );
        wait_for(
            "supervisord's processes to end",
            Duration::from_secs(10),
            || {
                let left: Vec<&u32> = children.iter().filter(|p| alive(**p)).collect();
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{left:?}"))
                }
            },
        );
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            for pid in children_of(child.id()) {
                kill(pid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// argv of `pid`.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The variables among `keys` in `pid`'s environment.
fn environ(pid: u32, keys: &[&str]) -> BTreeMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            keys.contains(&k).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The processes `pids` run: argv and the config's variables, sorted;
/// waits until each has exec'd its command.
fn processes(
    what: &str,
    pids: &[u32],
    keys: &[&str],
    want: usize,
) -> Vec<(Vec<String>, BTreeMap<String, String>)> {
    wait_for(what, Duration::from_secs(20), || {
        let mut seen: Vec<(Vec<String>, BTreeMap<String, String>)> = pids
            .iter()
            .map(|&p| (cmdline(p), environ(p, keys)))
            .collect();
        seen.sort();
        // zdt's wrapper for %(process_num)s is `/bin/sh -c 'export ...;
        // exec ...'` until it has exec'd the command.
        let wrapper = |argv: &[String]| {
            argv.len() == 3
                && argv[..2] == ["/bin/sh", "-c"]
                && (argv[2].starts_with("exec '") || argv[2].starts_with("export "))
        };
        // supervisord's child is a copy of supervisord until it execs.
        let forked = |argv: &[String]| argv.iter().any(|a| a.ends_with("supervisord"));
        let settled = seen.len() == want
            && seen
                .iter()
                .all(|(argv, _)| !argv.is_empty() && !wrapper(argv) && !forked(argv));
        if settled {
            Ok(seen)
        } else {
            Err(format!("{seen:?}"))
        }
    })
}

#[test]
fn zdt_runs_what_supervisord_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("app.conf");
    std::fs::write(
        &conf,
        r#"; A small real supervisord configuration: its own socket, pid file and logs.
[unix_http_server]
file=%(here)s/supervisor.sock

[supervisord]
logfile=%(here)s/supervisord.log
pidfile=%(here)s/supervisord.pid
childlogdir=%(here)s
environment=GLOBAL_VAR="from supervisord"

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(here)s/supervisor.sock

[program:sleeper]
command=/bin/sleep 10%(process_num)02d
process_name=%(program_name)s_%(process_num)02d
numprocs=2
directory=%(here)s
environment=APP_ENV="prod",WORKER="w%(process_num)s",HOME_COPY="%(ENV_HOME)s",QUOTED="a b, c"
stopasgroup=true

[program:shell]
command=/bin/sh -c "sleep 2000; echo 'done %(program_name)s'"
environment=APP_ENV="shell"
stopasgroup=true
killasgroup=true
"#,
    )
    .expect("write");
    let keys = ["GLOBAL_VAR", "APP_ENV", "WORKER", "HOME_COPY", "QUOTED"];

    // supervisord on the original.
    let mut sv = Supervisord::start(&conf);
    let sv_pid = sv.pid();
    let pids = wait_for(
        "supervisord to start 3 processes",
        Duration::from_secs(20),
        || {
            let c = children_of(sv_pid);
            if c.len() == 3 {
                Ok(c)
            } else {
                let log =
                    std::fs::read_to_string(conf.with_extension("stderr")).unwrap_or_default();
                Err(format!("{c:?}; supervisord said: {log}"))
            }
        },
    );
    let expected = processes("supervisord's processes to settle", &pids, &keys, 3);
    sv.stop();

    // zdt on the import.
    let out = import(&[conf.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8(out.stdout).expect("utf-8");
    let d = Daemon::start(&toml);
    let pids = wait_for("zdt to start 3 processes", Duration::from_secs(20), || {
        let pids: Vec<u32> = d
            .status()
            .iter()
            .flat_map(|p| p.instances.iter().filter_map(|i| i.pid))
            .collect();
        if pids.len() == 3 {
            Ok(pids)
        } else {
            Err(format!("{pids:?}"))
        }
    });
    let got = processes("zdt's processes to settle", &pids, &keys, 3);
    assert_eq!(
        got, expected,
        "zdt (left) and supervisord (right) differ; the import:\n{toml}"
    );
    // What the comparison covers.
    let argvs: Vec<String> = expected.iter().map(|(a, _)| a.join(" ")).collect();
    assert_eq!(
        argvs,
        [
            "/bin/sh -c sleep 2000; echo 'done shell'",
            "/bin/sleep 1000",
            "/bin/sleep 1001"
        ]
    );
    assert_eq!(expected[1].1.get("WORKER").map(String::as_str), Some("w0"));
    assert_eq!(
        expected[2].1.get("QUOTED").map(String::as_str),
        Some("a b, c")
    );
    assert_eq!(
        expected[0].1.get("GLOBAL_VAR").map(String::as_str),
        Some("from supervisord")
    );
}
