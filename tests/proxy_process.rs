//! The proxy in a process of its own (`[supervisor] proxy_process`, the
//! default): a request in flight crosses an upgrade of zdt, a killed proxy
//! process is replaced, and in-process mode still upgrades.

use std::time::{Duration, Instant};

use zdt::state::InstanceState::Running;

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(20);

fn proxied(port: u16, supervisor: &str) -> String {
    header().replace("[supervisor]\n", &format!("[supervisor]\n{supervisor}"))
        + &demo_program(
            "web",
            &[],
            &format!(
                "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ http = \"/health\" }}\nmax_wait = \"20s\"\n"
            ),
        )
}

/// zdt with "web" proxied on `port`, running and answering; the daemon and
/// the worker's pid.
fn serving(port: u16, supervisor: &str) -> (Daemon, u32) {
    let d = Daemon::start(&proxied(port, supervisor));
    let worker = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    (d, worker)
}

fn upgrade(d: &Daemon) {
    let out = d.ctl(&["upgrade"]);
    assert!(
        out.status.success(),
        "upgrade failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
}

#[test]
fn a_request_in_flight_crosses_an_upgrade_and_the_old_proxy_process_exits_after_it() {
    let port = free_port();
    let (d, worker) = serving(port, "");
    let old = d.proxy_pid(T);
    // A request the worker answers in 3 s, and keep-alive clients around it.
    let slow = std::thread::spawn(move || {
        let t0 = Instant::now();
        (http_get(port, "/slow?sleep=3000"), t0.elapsed())
    });
    d.wait_inflight("web", 1, T);
    let load = Load::start(port, 8, 8, &[0, 5]);
    load.wait_progress("load before the upgrade");
    let t0 = Instant::now();
    upgrade(&d);
    let upgraded_in = t0.elapsed();
    let (answer, took) = slow.join().expect("slow client");
    let (code, body) = answer.expect("the slow request crossed the upgrade");
    assert_eq!(code, 200, "{body}");
    assert!(
        upgraded_in < took,
        "the upgrade ({upgraded_in:?}) did not wait for the request ({took:?})"
    );
    // A new proxy process serves; the old one exits once its request is done.
    let new = wait_for("a new proxy process", T, || {
        proxy_children_of(d.pid())
            .into_iter()
            .find(|&p| p != old)
            .ok_or_else(|| "the proxy process was not replaced".to_string())
    });
    wait_for("the old proxy process to exit", T, || {
        if alive(old) {
            Err(format!("{old} still runs"))
        } else {
            Ok(())
        }
    });
    load.wait_progress("load after the upgrade");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert_eq!(d.instance("web", 0).pid, Some(worker), "the worker changed");
    assert!(
        d.stderr().contains("previous proxy process retired"),
        "{}",
        d.stderr()
    );
    // The proxy process the new binary forked dies with zdt, as a worker
    // does (PR_SET_PDEATHSIG, from the thread that lives as long as zdt).
    let mut d = d;
    d.signal(libc::SIGKILL);
    d.wait_exit(T);
    wait_for("the proxy process to die with zdt", T, || {
        if alive(new) {
            Err(format!("{new} still runs"))
        } else {
            Ok(())
        }
    });
}

#[test]
fn a_killed_proxy_process_is_replaced_and_serving_goes_on() {
    let port = free_port();
    let (d, worker) = serving(port, "");
    let first = d.proxy_pid(T);
    // Signals meant for zdt (`pkill zdt`) leave it alone: zdt stops it.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2] {
        kill(first, sig);
    }
    let (code, _) = http_get(port, "/").expect("served after the signals");
    assert_eq!(code, 200);
    assert_eq!(proxy_children_of(d.pid()), vec![first], "{}", d.stderr());
    kill(first, libc::SIGKILL);
    let second = wait_for("another proxy process", T, || {
        let now = proxy_children_of(d.pid());
        match now[..] {
            [p] if p != first => Ok(p),
            _ => Err(format!("{now:?}")),
        }
    });
    // Routes and sockets were sent to it again: it serves the same worker.
    let (code, _) = wait_for("the new proxy process to answer", T, || http_get(port, "/"));
    assert_eq!(code, 200);
    assert_eq!(d.instance("web", 0).pid, Some(worker), "the worker changed");
    assert!(
        d.stderr()
            .contains("the proxy process ended; starting another"),
        "{}",
        d.stderr()
    );
    // Drains go through the new one: a restart under load fails nothing.
    let load = Load::start(port, 8, 8, &[0, 5]);
    load.wait_progress("load before the restart");
    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}\n{}", d.stderr());
    load.wait_progress("load after the restart");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert_eq!(proxy_children_of(d.pid()), vec![second]);
    let (code, version) = d.ctl_json(&["version"]);
    assert_eq!(code, 0, "{version}");
    assert_eq!(
        version["proxy_pid"].as_u64(),
        Some(u64::from(second)),
        "{version}"
    );
    assert!(
        d.requests("web").served > 0,
        "counters read from the new process"
    );
}

#[test]
fn in_process_mode_has_no_proxy_process_and_still_upgrades_without_failures() {
    let port = free_port();
    let (d, _) = serving(port, "proxy_process = false\n");
    assert_eq!(proxy_child_of(d.pid()), None, "a proxy process runs");
    let (_, version) = d.ctl_json(&["version"]);
    assert!(version.get("proxy_pid").is_none(), "{version}");
    let load = Load::start(port, 8, 8, &[0, 5]);
    for _ in 0..3 {
        load.wait_progress("load between upgrades");
        upgrade(&d);
    }
    load.wait_progress("load after the upgrades");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert_eq!(proxy_child_of(d.pid()), None, "a proxy process runs");
    // zdt itself closed its client connections before each exec.
    assert_eq!(
        d.stderr()
            .matches("proxy retiring: accepting paused")
            .count(),
        3,
        "{}",
        d.stderr()
    );
}

#[test]
fn zdt_proxy_run_by_hand_says_it_is_started_by_zdt() {
    let out = std::process::Command::new(bin("zdt"))
        .arg("__proxy")
        .output()
        .expect("run zdt __proxy");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("started by zdt itself"), "{stderr}");
}
