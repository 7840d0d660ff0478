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
