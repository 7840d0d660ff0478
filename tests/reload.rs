//! Reload (SIGHUP and `zdtctl reload`): apply the difference, or reject the
//! whole file and change nothing.

use std::time::Duration;

use zdt::state::InstanceState::*;

use crate::util::*;

const T: Duration = Duration::from_secs(15);

fn prog(name: &str, port: u16, extra: &str) -> String {
    demo_program(
        name,
        &["--port", &port.to_string()],
        &format!("startsecs = \"0s\"\n{extra}"),
    )
}

#[test]
fn reload_adds_removes_and_changes_programs() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let keep = prog("keep", pa, "");
    let d = Daemon::start(&(header() + &keep + &prog("gone", pb, "") + &prog("changed", pc, "")));
    let keep_pid = d.wait_state("keep", 0, Running, T).pid;
    let gone_pid = d.wait_state("gone", 0, Running, T).pid.expect("pid");
    let changed_pid = d.wait_state("changed", 0, Running, T).pid;

    let pn = free_port();
    d.write_config(
        &(header()
            + &keep
            + &prog("changed", pc, "environment = { FLAVOUR = \"new\" }")
            + &prog("new", pn, "")),
    );
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("added new"), "{text}");
    assert!(text.contains("removed gone"), "{text}");
    assert!(text.contains("changed changed"), "{text}");
    assert!(text.contains("unchanged keep"), "{text}");

    let names: Vec<String> = d.status().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["changed", "keep", "new"]);
    assert_eq!(
        d.instance("keep", 0).pid,
        keep_pid,
        "unchanged program was touched"
    );
    let c = d.wait_state("changed", 0, Running, T);
    assert_ne!(c.pid, changed_pid, "changed program was not restarted");
    d.wait_state("new", 0, Running, T);
    wait_for("the removed program's worker to exit", T, || {
        if alive(gone_pid) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });
}

#[test]
fn invalid_reload_is_rejected_whole_and_nothing_changes() {
    let (pa, pb) = (free_port(), free_port());
    let good = header() + &prog("a", pa, "") + &prog("b", pb, "");
    let d = Daemon::start(&good);
    let before: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| d.wait_state(n, 0, Running, T).pid)
        .collect();
    // One valid change (a removed) and one error: nothing may be applied.
    d.write_config(&(header() + &prog("b", pb, "stop_signal = \"NOPE\"")));
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("supervisor.toml:") && err.contains("NOPE"),
        "{err}"
    );
    let after: Vec<_> = ["a", "b"].iter().map(|n| d.instance(n, 0).pid).collect();
    assert_eq!(before, after);
    // SIGHUP with the bad file: also rejected, zdt keeps running.
    d.signal(libc::SIGHUP);
    wait_for("the rejection in zdt's log", T, || {
        if d.stderr().contains("reload rejected") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let after: Vec<_> = ["a", "b"].iter().map(|n| d.instance(n, 0).pid).collect();
    assert_eq!(before, after);
}

#[test]
fn sighup_applies_a_valid_change() {
    let pa = free_port();
    let d = Daemon::start(&(header() + &prog("a", pa, "")));
    d.wait_state("a", 0, Running, T);
    let pb = free_port();
    d.write_config(&(header() + &prog("a", pa, "") + &prog("b", pb, "")));
    d.signal(libc::SIGHUP);
    wait_for("b to appear", T, || {
        if d.status().iter().any(|p| p.name == "b") {
            Ok(())
        } else {
            Err("absent".into())
        }
    });
    d.wait_state("b", 0, Running, T);
}

/// A pass-mode demo program on `port` (zdt owns the socket).
fn owned(name: &str, port: u16, args: &[&str], extra: &str) -> String {
    demo_program(
        name,
        args,
        &format!("listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\nstartsecs = \"0s\"\n{extra}"),
    )
}

#[test]
fn a_reload_moving_listen_to_an_address_in_use_is_rejected_and_changes_nothing() {
    let (p1, p2) = (free_port(), free_port());
    let d = Daemon::start(&(header() + &owned("web", p1, &[], "")));
    let pid = d.wait_state("web", 0, Running, T).pid;
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", p2)).expect("bind squatter");
    // Also a new program, which must not be added either.
    let p3 = free_port();
    d.write_config(&(header() + &owned("web", p2, &[], "") + &owned("new", p3, &[], "")));
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("127.0.0.1:{p2}")) && text.contains("nothing was changed"),
        "{text}"
    );
    let names: Vec<String> = d.status().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["web"]);
    let i = d.instance("web", 0);
    assert_eq!((i.pid, i.state, i.generation), (pid, Running, 1));
    assert_eq!(http_get(p1, "/").expect("old port serves").0, 200);
    // The new program's address was not kept bound by the rejected reload.
    std::net::TcpListener::bind(("127.0.0.1", p3)).expect("p3 released");
}

#[test]
fn a_config_with_no_programs_is_rejected_unless_allowed() {
    let p = free_port();
    let d = Daemon::start(&(header() + &prog("a", p, "")));
    let pid = d.wait_state("a", 0, Running, T).pid;
    d.write_config(&header());
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no programs") && text.contains("--allow-empty"),
        "{text}"
    );
    // SIGHUP with the empty file: rejected the same way.
    d.signal(libc::SIGHUP);
    wait_for("the rejection in zdt's log", T, || {
        if d.stderr().contains("has no programs") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(d.instance("a", 0).pid, pid);
    // `zdt check` warns about it.
    let check = std::process::Command::new(bin("zdt"))
        .args(["check", "-c"])
        .arg(&d.config)
        .output()
        .expect("zdt check");
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("no programs"),
        "{check:?}"
    );
    // Asked for explicitly, it stops everything.
    let out = d.ctl(&["reload", "--allow-empty"]);
    assert!(out.status.success(), "{out:?}");
    assert!(d.status().is_empty());
    wait_for("the worker to exit", T, || match pid {
        Some(p) if alive(p) => Err("alive".into()),
        _ => Ok(()),
    });
}

#[test]
fn a_failed_reload_leaves_the_program_with_its_previous_settings() {
    let p = free_port();
    let d = Daemon::start(&(header() + &owned("web", p, &[], "")));
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    // The new command never gets ready: the reload's restart fails.
    d.write_config(&(header() + &owned("web", p, &["--never-ready"], "ready_timeout = \"1s\"")));
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("previous settings"), "{text}");
    assert_eq!(d.instance("web", 0).pid, Some(old));
    // The old worker crashes: it comes back as it was (ready), not with the
    // rejected command (which would never be ready).
    kill(old, libc::SIGKILL);
    wait_for("a respawn with the previous settings", T, || {
        let i = d.instance("web", 0);
        match (i.pid, i.state) {
            (Some(pid), Running) if pid != old => Ok(()),
            _ => Err(format!("{i:?}")),
        }
    });
    assert_eq!(http_get(p, "/").expect("serves").0, 200);
    // The same file reloaded again tries the change again (it is still a
    // change against the settings in force), and fails again.
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn a_bind_error_is_retried_once_the_address_is_free() {
    let (p1, p2) = (free_port(), free_port());
    let squat1 = std::net::TcpListener::bind(("127.0.0.1", p1)).expect("bind");
    let squat2 = std::net::TcpListener::bind(("127.0.0.1", p2)).expect("bind");
    let d = Daemon::start(
        &(header() + &owned("auto", p1, &[], "") + &owned("manual", p2, &[], "autostart = false")),
    );
    d.wait_state("auto", 0, Fatal, T);
    // Started by hand while the address is taken: fails with the reason.
    let out = d.ctl(&["start", "manual"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen on"),
        "{out:?}"
    );
    drop(squat1);
    drop(squat2);
    // autostart: bound and started by the retry, no command needed.
    d.wait_state("auto", 0, Running, T);
    assert_eq!(http_get(p1, "/").expect("serves").0, 200);
    // By hand: the next start binds again.
    let out = d.ctl(&["start", "manual"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(http_get(p2, "/").expect("serves").0, 200);
}
