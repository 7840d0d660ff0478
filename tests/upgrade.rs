//! `zdtctl upgrade` and SIGUSR2: zdt replaces its own binary in place. The
//! pid stays, workers keep running (pass mode: untouched), and no request
//! fails; an upgrade to something that cannot take over leaves the old
//! binary serving with the same state.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use zdt::state::InstanceState::Running;

use crate::util::{bin, free_port, header, http_get, load::Load, wait_for, Daemon, Manager};

const T: Duration = Duration::from_secs(20);

/// (program, instance) → pid of every instance.
fn pids(d: &Daemon) -> BTreeMap<(String, u32), u32> {
    d.status()
        .into_iter()
        .flat_map(|p| {
            let name = p.name.clone();
            p.instances
                .into_iter()
                .map(move |i| ((name.clone(), i.instance), i.pid.unwrap_or(0)))
        })
        .collect()
}

/// The pid zdt reports for itself.
fn zdt_pid(d: &Daemon) -> u64 {
    let (code, v) = d.ctl_json(&["version"]);
    assert_eq!(code, 0, "{v}");
    v["pid"].as_u64().expect("pid")
}

fn upgrade_ok(d: &Daemon, args: &[&str]) {
    let mut all = vec!["upgrade"];
    all.extend_from_slice(args);
    let out = d.ctl(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "upgrade failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    assert!(stdout.contains("upgraded: zdt "), "{stdout}");
}

/// A config running the demo worker as NAME with `args`, on `port` (pass
/// mode, ready = notify), plus `extra` keys.
fn notify_demo(name: &str, port: u16, args: &[&str], extra: &str) -> String {
    header()
        + &crate::util::demo_program(
            name,
            args,
            &format!("listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\n{extra}"),
        )
}

fn node_script() -> String {
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is needed for this test (.ci/run installs it)"
    );
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/node/server.js")
        .display()
        .to_string()
}

/// `n` upgrades under keep-alive and new-connection clients: zero failed
/// requests, the same zdt pid and the same worker pids.
fn upgrades_under_load(d: &Daemon, port: u16, n: usize) -> crate::util::load::LoadReport {
    wait_for("the service to answer", T, || http_get(port, "/"));
    let pid = zdt_pid(d);
    let workers = pids(d);
    let load = Load::start(port, 16, 16, &[0, 0, 5, 50]);
    for _ in 0..n {
        load.wait_progress("load between upgrades");
        upgrade_ok(d, &[]);
    }
    load.wait_progress("load after the last upgrade");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert_eq!(zdt_pid(d), pid, "zdt's pid changed");
    assert_eq!(pids(d), workers, "a worker was replaced");
    report
}

#[test]
fn pass_mode_upgrades_under_load_keep_the_workers_and_fail_zero_requests() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.node]\ncommand = [\"node\", {:?}]\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                 ready = {{ notify = true }}\ninstances = 2\nenvironment = {{ ZDT_BIN = {:?} }}\n",
                node_script(),
                bin("zdt").display().to_string()
            )),
    );
    d.wait_state("node", 0, Running, T);
    d.wait_state("node", 1, Running, T);
    let before: std::collections::BTreeSet<u64> = pids(&d).values().map(|&p| p as u64).collect();
    let report = upgrades_under_load(&d, port, 20);
    // The workers from before answered everything.
    assert!(report.pids.is_subset(&before), "{:?}", report.pids);
    // Still supervised: a restart and a crash are handled by the new binary.
    let out = d.ctl(&["restart", "node"]);
    assert!(out.status.success(), "{out:?}");
    let pid = d.wait_state("node", 0, Running, T).pid.expect("pid");
    crate::util::kill(pid, libc::SIGKILL);
    wait_for("the crashed worker to be replaced", T, || {
        let i = d.instance("node", 0);
        match i.pid {
            Some(p) if p != pid && i.state == Running => Ok(()),
            _ => Err(format!("{i:?}")),
        }
    });
}

#[test]
fn proxy_mode_upgrades_under_load_fail_zero_requests_with_node_and_php() {
    let php = std::process::Command::new("php").arg("-v").output();
    assert!(
        php.is_ok_and(|o| o.status.success()),
        "this test needs php-cli; .ci/run installs it"
    );
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/php/app.php");
    let (node_port, php_port) = (free_port(), free_port());
    let d = Daemon::start(&format!(
        "{}[program.node]\ncommand = [\"node\", {:?}]\nmode = \"proxy\"\n\
         listen = [\"tcp://127.0.0.1:{node_port}\"]\nready = {{ http = \"/\" }}\ninstances = 2\n\n\
         [program.php]\ncommand = [\"php\", \"-S\", \"127.0.0.1:{{port}}\", {:?}]\n\
         environment = {{ PHP_CLI_SERVER_WORKERS = \"4\" }}\nmode = \"proxy\"\n\
         listen = [\"tcp://127.0.0.1:{php_port}\"]\nready = {{ http = \"/health\" }}\n",
        header(),
        node_script(),
        app.display().to_string()
    ));
    for (program, n) in [("node", 2), ("php", 1)] {
        for i in 0..n {
            d.wait_state(program, i, Running, T);
        }
    }
    upgrades_under_load(&d, node_port, 20);
    upgrades_under_load(&d, php_port, 20);
    for program in ["node", "php"] {
        let r = d.requests(program);
        assert_eq!((r.failed, r.unavailable), (0, 0), "{program}: {r:?}");
    }
}

#[test]
fn an_upgrade_applies_a_changed_configuration_file_without_touching_unchanged_programs() {
    let (port, port2) = (free_port(), free_port());
    let web = crate::util::demo_program(
        "web",
        &[],
        &format!("listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\n"),
    );
    let d = Daemon::start(&(header() + &web));
    let pid = d.wait_state("web", 0, Running, T).pid;
    let api = crate::util::demo_program(
        "api",
        &[],
        &format!("listen = [\"tcp://127.0.0.1:{port2}\"]\nready = {{ notify = true }}\n"),
    );
    d.write_config(&(header() + &web + &api));
    upgrade_ok(&d, &[]);
    d.wait_state("api", 0, Running, T);
    assert_eq!(http_get(port2, "/").map(|r| r.0), Ok(200));
    assert_eq!(
        d.instance("web", 0).pid,
        pid,
        "an unchanged program was restarted"
    );
    // The status text of the adopted worker came along.
    assert!(
        d.instance("web", 0)
            .status_text
            .is_some_and(|s| s.contains("serving")),
        "{:?}",
        d.instance("web", 0)
    );
}

#[test]
fn an_instance_still_starting_is_carried_and_its_readiness_checked_by_the_new_binary() {
    let port = free_port();
    let d = Daemon::start(&notify_demo(
        "web",
        port,
        &["--start-delay", "3000"],
        "ready_timeout = \"20s\"\n",
    ));
    let starting = d.wait_state("web", 0, zdt::state::InstanceState::Starting, T);
    upgrade_ok(&d, &[]);
    let after = d.instance("web", 0);
    assert_eq!(
        after.state,
        zdt::state::InstanceState::Starting,
        "{after:?}"
    );
    // Its READY=1 reaches the new binary: same process, now RUNNING.
    let running = d.wait_state("web", 0, Running, T);
    assert_eq!(running.pid, starting.pid);
    assert_eq!(running.restarts, 0);
    assert_eq!(http_get(port, "/").map(|r| r.0), Ok(200));
}

#[test]
fn after_upgrades_the_workers_still_die_with_zdt() {
    // `old` is forked by the first binary and adopted twice; `new` by the
    // second binary and adopted once. PR_SET_PDEATHSIG ties each to the
    // thread that forked it: both must end when zdt is killed.
    let (p1, p2) = (free_port(), free_port());
    let mut d = Daemon::start(
        &(notify_demo("old", p1, &[], "")
            + &crate::util::demo_program(
                "new",
                &[],
                &format!("listen = [\"tcp://127.0.0.1:{p2}\"]\nready = {{ notify = true }}\n"),
            )),
    );
    let old = d.wait_state("old", 0, Running, T).pid.expect("pid");
    upgrade_ok(&d, &[]);
    let out = d.ctl(&["restart", "new"]);
    assert!(out.status.success(), "{out:?}");
    let new = d.wait_state("new", 0, Running, T).pid.expect("pid");
    upgrade_ok(&d, &[]);
    assert_eq!(d.instance("old", 0).pid, Some(old));
    assert_eq!(d.instance("new", 0).pid, Some(new));
    d.signal(libc::SIGKILL);
    d.wait_exit(T);
    for pid in [old, new] {
        wait_for("the worker to die with zdt", T, || {
            if crate::util::alive(pid) {
                Err(format!("{pid} still runs"))
            } else {
                Ok(())
            }
        });
    }
}

#[test]
fn sigusr2_upgrades_in_place() {
    let port = free_port();
    let d = Daemon::start(&notify_demo("web", port, &[], ""));
    let pid = d.wait_state("web", 0, Running, T).pid;
    d.signal(libc::SIGUSR2);
    wait_for("the upgrade's record", T, || {
        let (_, v) = d.ctl_json(&["version"]);
        match v["upgrade"]["ok"].as_bool() {
            Some(true)
                if v["upgrade"]["token"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("signal-")) =>
            {
                Ok(())
            }
            _ => Err(v.to_string()),
        }
    });
    assert_eq!(d.instance("web", 0).pid, pid);
    assert_eq!(http_get(port, "/").map(|r| r.0), Ok(200));
}

/// A new binary that cannot take over: `zdtctl upgrade` exits 1 with
/// `expect` in its output, and the old binary serves on with the same
/// state (pids, generations) and still obeys.
fn refused(binary: &Path, expect: &str) {
    let port = free_port();
    let d = Daemon::start(&notify_demo("web", port, &[], "instances = 2\n"));
    d.wait_state("web", 0, Running, T);
    d.wait_state("web", 1, Running, T);
    let (pid, workers) = (zdt_pid(&d), pids(&d));
    let load = Load::start(port, 8, 8, &[0, 5]);
    load.wait_progress("load before the upgrade");
    let out = d.ctl(&["upgrade", "--binary", &binary.display().to_string()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(expect), "expected {expect:?} in: {text}");
    load.wait_progress("load after the failed upgrade");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert_eq!(zdt_pid(&d), pid);
    assert_eq!(pids(&d), workers);
    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(d.instance("web", 0).generation, 2);
}

fn script(dir: &Path, name: &str, body: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

#[test]
fn an_upgrade_to_a_binary_that_exits_at_once_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = script(
        dir.path(),
        "zdt-broken",
        "#!/bin/sh\necho broken\nexit 3\n",
        0o755,
    );
    refused(
        &b,
        "is not a zdt that can take over (its check ended with exit 3): broken",
    );
}

#[test]
fn an_upgrade_to_a_file_that_is_not_executable_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = script(dir.path(), "zdt-plain", "not a program\n", 0o644);
    refused(&b, "Permission denied");
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_read_the_state_falls_back_to_the_old_one() {
    // It passes the check, then refuses the state once executed: it execs
    // the old binary again (kept open as an fd), which resumes the same state.
    let dir = tempfile::tempdir().expect("tempdir");
    let b = script(
        dir.path(),
        "zdt-refuses",
        &format!(
            "#!/bin/sh\nZDT_UPGRADE_REFUSE=1 exec {:?} \"$@\"\n",
            bin("zdt").display().to_string()
        ),
        0o755,
    );
    refused(&b, "the carried state was refused");
}

#[test]
fn an_upgrade_is_refused_while_a_restart_runs() {
    let port = free_port();
    let d = Daemon::start(&notify_demo(
        "web",
        port,
        &["--start-delay", "3000"],
        "ready_timeout = \"20s\"\n",
    ));
    d.wait_state("web", 0, Running, T);
    let restart = d.ctl_in_background(&["restart", "web"]);
    wait_for("the restart to start a new generation", T, || {
        let s = d.status();
        if s[0].generation == 2 {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    });
    let out = d.ctl(&["upgrade"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not now: web"), "{err}");
    assert!(restart.join().expect("restart").status.success());
    upgrade_ok(&d, &[]);
}

#[test]
fn as_pid_1_of_a_pid_namespace_zdt_stays_pid_1_and_keeps_its_workers() {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount-proc", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: unshare --pid is not permitted here");
        return;
    }
    let port = free_port();
    let manager = Manager {
        wrap: ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
            .map(String::from)
            .to_vec(),
        ..Manager::default()
    };
    let d = Daemon::start_with(
        &(header()
            + &format!(
                "[program.node]\ncommand = [\"node\", {:?}]\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                 ready = {{ notify = true }}\ninstances = 2\nenvironment = {{ ZDT_BIN = {:?} }}\n",
                node_script(),
                bin("zdt").display().to_string()
            )),
        manager,
    );
    d.wait_state("node", 0, Running, T);
    d.wait_state("node", 1, Running, T);
    assert_eq!(zdt_pid(&d), 1, "zdt is not PID 1 in its namespace");
    upgrades_under_load(&d, port, 3);
    assert_eq!(zdt_pid(&d), 1);
}

/// A program scaled by `zdtctl scale` keeps its count and its processes
/// across an upgrade (the file still says 1 instance), and so do programs
/// from an included file. (A file edited before the upgrade is applied
/// after it by a reload, which would bring the count back to the file's.)
#[test]
fn an_upgrade_keeps_a_scaled_count_and_included_programs() {
    let port = free_port();
    let d = Daemon::start(&notify_demo("web", port, &[], ""));
    d.wait_state("web", 0, Running, T);
    std::fs::write(
        d.path("more.toml"),
        "[program.nap]\ncommand = [\"sleep\", \"300\"]\nstartsecs = \"0s\"\n",
    )
    .expect("write");
    d.write_config(&format!(
        "include = [\"more.toml\"]\n{}",
        notify_demo("web", port, &[], "")
    ));
    assert!(d.ctl(&["reload"]).status.success());
    d.wait_state("nap", 0, Running, T);
    let (code, v) = d.ctl_json(&["scale", "web", "2"]);
    assert_eq!(code, 0, "{v}");
    d.wait_state("web", 1, Running, T);
    let before = pids(&d);
    assert_eq!(before.len(), 3, "{before:?}");
    upgrade_ok(&d, &[]);
    assert_eq!(pids(&d), before, "every process carried, none restarted");
    assert_eq!(http_get(port, "/").expect("serves").0, 200);
}

/// An env_file changed on disk before an upgrade is a changed file like any
/// other: the new binary runs what the old one read, then applies the change
/// by a reload (a new process with the new value), as `zdtctl reload` would
/// have.
#[test]
fn an_env_file_changed_before_an_upgrade_is_applied_after_it() {
    let port = free_port();
    let d = Daemon::start(&notify_demo("web", port, &[], ""));
    std::fs::write(d.path("app.env"), "RELEASE=one\n").expect("write");
    d.write_config(&notify_demo("web", port, &[], "env_file = \"app.env\""));
    assert!(d.ctl(&["reload"]).status.success());
    let environ = |pid: u32| std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let has = |pid: u32, v: &[u8]| environ(pid).split(|b| *b == 0).any(|e| e == v);
    let first = wait_for("a worker with RELEASE=one", T, || {
        match d.instance("web", 0).pid {
            Some(pid) if has(pid, b"RELEASE=one") => Ok(pid),
            other => Err(format!("{other:?}")),
        }
    });
    std::fs::write(d.path("app.env"), "RELEASE=two\n").expect("write");
    upgrade_ok(&d, &[]);
    let second = wait_for("a worker with RELEASE=two after the upgrade", T, || match d
        .instance("web", 0)
    {
        i if i.state == Running && i.pid.is_some_and(|p| has(p, b"RELEASE=two")) => {
            Ok(i.pid.unwrap_or(0))
        }
        i => Err(format!("{i:?}")),
    });
    assert_ne!(first, second);
    assert_eq!(http_get(port, "/").expect("serves").0, 200);
}
