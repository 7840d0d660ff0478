//! Pass mode (socket activation): the socket zdt owns reaches every
//! generation as fd 3, and restarts under load fail zero requests.

use std::time::{Duration, Instant};

use zdt::state::InstanceState::*;

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(20);

fn pass_program(name: &str, port: u16, args: &[&str], extra: &str) -> String {
    demo_program(
        name,
        args,
        &format!("listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\n{extra}"),
    )
}

fn fds_of(pid: u32) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?.display().to_string();
            Some((n, target))
        })
        .collect();
    v.sort();
    v
}

fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    String::from_utf8_lossy(&raw)
        .split('\0')
        .map(String::from)
        .collect()
}

#[test]
fn worker_gets_exactly_stdio_and_the_listening_socket() {
    let (p1, p2) = (free_port(), free_port());
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.app]\ncommand = [\"sleep\", \"1000\"]\nlisten = [\"tcp://127.0.0.1:{p1}\", \"tcp://[::1]:{p2}\"]\nfdname = \"web\"\nstartsecs = \"0s\"\n"
            )),
    );
    let pid = d.wait_state("app", 0, Running, T).pid.expect("pid");
    let fds = fds_of(pid);
    let nums: Vec<u32> = fds.iter().map(|f| f.0).collect();
    assert_eq!(nums, [0, 1, 2, 3, 4], "leaked fds: {fds:?}");
    assert!(
        fds[3].1.starts_with("socket:") && fds[4].1.starts_with("socket:"),
        "{fds:?}"
    );
    let env = environ(pid);
    for want in [
        "LISTEN_FDS=2".to_string(),
        format!("LISTEN_PID={pid}"),
        "LISTEN_FDNAMES=web:web".to_string(),
    ] {
        assert!(env.contains(&want), "{want} missing from {env:?}");
    }
    // The kernel queues connections on the owned socket even though nobody accepts.
    std::net::TcpStream::connect(("127.0.0.1", p1)).expect("queued connect");
    std::net::TcpStream::connect(("::1", p2)).expect("queued connect v6");
}

#[test]
fn restart_under_load_fails_zero_requests() {
    let port = free_port();
    let d = Daemon::start(
        &(header() + &pass_program("web", port, &[], "instances = 2\nmax_wait = \"10s\"")),
    );
    d.wait_state("web", 0, Running, T);
    d.wait_state("web", 1, Running, T);
    wait_for("the service to answer", T, || http_get(port, "/"));
    let load = Load::start(port, 16, 16, &[0, 5, 20, 50]);
    wait_for("load to flow", T, || {
        if load.ok_so_far() > 50 {
            Ok(())
        } else {
            Err("slow".into())
        }
    });
    for i in 0..10 {
        // Let a few hundred requests through between restarts.
        let before = load.ok_so_far();
        wait_for("load between restarts", T, || {
            if load.ok_so_far() > before + 300 {
                Ok(())
            } else {
                Err("slow".into())
            }
        });
        let out = d.ctl(&["restart", "web"]);
        assert!(out.status.success(), "restart {i}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("ready in") && text.contains("old generation gone"),
            "{text}"
        );
    }
    let before = load.ok_so_far();
    wait_for("load after the last restart", T, || {
        if load.ok_so_far() > before + 50 {
            Ok(())
        } else {
            Err("slow".into())
        }
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(report.ok > 3000, "only {} requests", report.ok);
    // 11 generations answered (1 and the 10 restarts), 2 instances each.
    assert!(
        report.generations.len() >= 10,
        "generations seen: {:?}",
        report.generations
    );
    assert!(report.pids.len() >= 20, "pids seen: {}", report.pids.len());
    let snap = d.status();
    assert_eq!(snap[0].generation, 11);
    assert!(
        snap[0]
            .instances
            .iter()
            .all(|i| i.state == Running && i.generation == 11),
        "{snap:?}"
    );
}

#[test]
fn a_new_generation_that_is_never_ready_leaves_the_old_one_serving() {
    let port = free_port();
    let d = Daemon::start(&header());
    let flag = d.path("bad-release");
    let flag_s = flag.display().to_string();
    d.write_config(
        &(header()
            + &pass_program(
                "web",
                port,
                &["--unready-if", &flag_s],
                "ready_timeout = \"1s\"",
            )),
    );
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the service to answer", T, || http_get(port, "/"));
    std::fs::write(&flag, "").expect("flag");
    let load = Load::start(port, 4, 4, &[0, 10]);
    let t0 = Instant::now();
    let out = d.ctl(&["restart", "web"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not ready within ready_timeout"), "{err}");
    assert!(err.contains("keeps serving"), "{err}");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let st = d.instance("web", 0);
    assert_eq!((st.state, st.pid), (Running, Some(old)));
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    // The candidate is stopped; on a shared socket it may have answered what
    // it accepted meanwhile (pass mode cannot tell generations apart), but
    // once it is gone only the old worker answers.
    wait_for("a single process", T, || {
        let n = d.status()[0].instances.len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    });
    for _ in 0..10 {
        let (_, body) = http_get(port, "/").expect("served");
        assert!(body.contains(&format!("\"pid\":{old}")), "{body}");
    }
}

#[test]
fn a_new_generation_that_exits_at_once_leaves_the_old_one_serving() {
    let port = free_port();
    let d = Daemon::start(&header());
    let flag = d.path("bad-release");
    let flag_s = flag.display().to_string();
    d.write_config(&(header() + &pass_program("web", port, &["--crash-if", &flag_s], "")));
    assert!(d.ctl(&["reload"]).status.success());
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the service to answer", T, || http_get(port, "/"));
    std::fs::write(&flag, "").expect("flag");
    let load = Load::start(port, 4, 4, &[0, 10]);
    let out = d.ctl(&["restart", "web"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited (exit 1) before it was ready"), "{err}");
    // The worker's last output is shown.
    assert!(err.contains("failing at start on purpose"), "{err}");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert_eq!(d.instance("web", 0).pid, Some(old));
    // After the fix, the restart goes through.
    std::fs::remove_file(&flag).expect("rm");
    assert!(d.ctl(&["restart", "web"]).status.success());
    assert_ne!(d.instance("web", 0).pid, Some(old));
}

#[test]
fn an_old_worker_ignoring_sigterm_is_killed_at_max_wait() {
    let port = free_port();
    let d = Daemon::start(
        &(header() + &pass_program("web", port, &["--ignore-term"], "max_wait = \"1500ms\"")),
    );
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the service to answer", T, || http_get(port, "/"));
    let t0 = Instant::now();
    let out = d.ctl(&["restart", "web"]);
    let took = t0.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert!(!alive(old), "old worker still alive");
    assert!(
        took >= Duration::from_millis(1500),
        "old generation gone after {took:?}, before max_wait"
    );
    assert!(took < Duration::from_millis(6000), "restart took {took:?}");
    wait_for("the kill at max_wait to be logged", T, || {
        if d.stderr().contains("did not exit within max_wait") {
            Ok(())
        } else {
            Err("not logged".into())
        }
    });
    // Said to the operator too, not only in the log: a warning line, the
    // status table, --json, and --strict exits 1.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: web:0: gen 1 did not exit within max_wait"),
        "{out:?}"
    );
    let status = d.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("last drain: gen 1"),
        "{status:?}"
    );
    let (code, body) = http_get(port, "/").expect("served by the new generation");
    assert_eq!(code, 200);
    assert!(body.contains("\"generation\":2"), "{body}");
    let out = d.ctl(&["--json", "restart", "--strict", "web"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json outcome");
    let w = v["warnings"][0].as_str().unwrap_or_default();
    assert!(w.contains("gen 2 did not exit within max_wait"), "{v}");
}

#[test]
fn a_clean_restart_passes_strict() {
    let port = free_port();
    let d = Daemon::start(&(header() + &pass_program("web", port, &[], "")));
    d.wait_state("web", 0, Running, T);
    let out = d.ctl(&["restart", "--strict", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{out:?}"
    );
}

#[test]
fn rolling_restart_replaces_one_instance_at_a_time() {
    let port = free_port();
    let d = Daemon::start(
        &(header() + &pass_program("web", port, &[], "instances = 3\nstrategy = \"rolling\"")),
    );
    for i in 0..3 {
        d.wait_state("web", i, Running, T);
    }
    let load = Load::start(port, 4, 4, &[0, 10]);
    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 0..3 {
        assert!(text.contains(&format!("web:{i}: gen 2 ready in")), "{text}");
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(d.status()[0]
        .instances
        .iter()
        .all(|i| i.generation == 2 && i.state == Running));
}

#[test]
fn a_crashed_worker_leaves_connections_queued_for_its_successor() {
    let port = free_port();
    let d = Daemon::start(&(header() + &pass_program("web", port, &[], "startsecs = \"0s\"")));
    let pid = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the service to answer", T, || http_get(port, "/"));
    kill(pid, libc::SIGKILL);
    // Connecting right away never gets a refusal: the socket is zdt's.
    let (code, body) = http_get(port, "/").expect("answered by the restarted worker");
    assert_eq!(code, 200);
    assert!(!body.contains(&format!("\"pid\":{pid}")), "{body}");
}

#[test]
fn restart_of_a_real_node_server_under_load_fails_zero_requests() {
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is needed for this test (.ci/run installs it)"
    );
    let port = free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/node/server.js");
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.node]\ncommand = [\"node\", {:?}]\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\ninstances = 2\nenvironment = {{ ZDT_BIN = {:?} }}\n",
                script.display().to_string(),
                bin("zdt").display().to_string()
            )),
    );
    d.wait_state("node", 0, Running, T);
    d.wait_state("node", 1, Running, T);
    let load = Load::start(port, 16, 16, &[0, 5, 20, 50]);
    for i in 0..10 {
        let before = load.ok_so_far();
        wait_for("load between restarts", T, || {
            if load.ok_so_far() > before + 300 {
                Ok(())
            } else {
                Err("slow".into())
            }
        });
        let out = d.ctl(&["restart", "node"]);
        assert!(out.status.success(), "restart {i}: {out:?}");
    }
    let before = load.ok_so_far();
    wait_for("load after the last restart", T, || {
        if load.ok_so_far() > before + 300 {
            Ok(())
        } else {
            Err("slow".into())
        }
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(
        report.generations.len() >= 5,
        "generations seen: {:?}",
        report.generations
    );
}

#[test]
fn zdt_run_supervises_one_command_without_a_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut child = std::process::Command::new(bin("zdt"))
        .args([
            "run",
            "--listen",
            &format!("tcp://127.0.0.1:{port}"),
            "--ready",
            "notify",
            "--max-wait",
            "5s",
            "--",
        ])
        .arg(bin("zdt-demo"))
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("zdt run");
    let sock = dir
        .path()
        .join("zdt")
        .join(format!("run-{}.sock", child.id()));
    let ctl = |args: &[&str]| {
        std::process::Command::new(bin("zdtctl"))
            .arg("-s")
            .arg(&sock)
            .args(args)
            .output()
            .expect("zdtctl")
    };
    wait_for("zdt run to serve", T, || http_get(port, "/"));
    let load = Load::start(port, 4, 4, &[0, 10]);
    let out = ctl(&["restart", "app"]);
    assert!(out.status.success(), "{out:?}");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(ctl(&["shutdown"]).status.success());
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(0));
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(
        err.contains(&format!("control socket {}", sock.display())),
        "{err}"
    );
}

#[test]
fn a_missed_watchdog_kills_and_restarts_the_worker() {
    let zdt = bin("zdt").display().to_string();
    let silent = format!("{zdt:?} notify READY=1; exec sleep 1000");
    let pinging = format!(
        "{zdt:?} notify READY=1; while true; do {zdt:?} notify WATCHDOG=1; sleep 0.1; done"
    );
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.silent]\ncommand = [\"sh\", \"-c\", {silent:?}]\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\nwatchdog = \"500ms\"\n\n[program.pinging]\ncommand = [\"sh\", \"-c\", {pinging:?}]\nready = {{ notify = true }}\nwatchdog = \"500ms\"\n"
            )),
    );
    let first = d.wait_state("silent", 0, Running, T).pid.expect("pid");
    let steady = d.wait_state("pinging", 0, Running, T).pid.expect("pid");
    let st = wait_for("the silent worker to be replaced", T, || {
        let i = d.instance("silent", 0);
        if i.state == Running && i.pid.is_some_and(|p| p != first) {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    assert_eq!(
        st.last_exit.and_then(|e| e.signal).as_deref(),
        Some("SIGKILL")
    );
    assert!(!alive(first));
    // The worker that pings keeps its pid all along.
    let p = d.instance("pinging", 0);
    assert_eq!(
        (p.state, p.pid, p.restarts),
        (Running, Some(steady), 0),
        "{p:?}"
    );
}

#[test]
fn a_bind_error_names_the_address_and_other_programs_run() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let d = Daemon::start(
        &(header()
            + &format!("[program.blocked]\ncommand = [\"sleep\", \"1000\"]\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\n")
            + "[program.fine]\ncommand = [\"sleep\", \"1000\"]\nstartsecs = \"0s\"\n"),
    );
    let st = d.wait_state("blocked", 0, Fatal, T);
    let err = st.error.expect("error");
    assert!(
        err.contains(&format!("cannot listen on tcp://127.0.0.1:{port}")) && err.contains("in use"),
        "{err}"
    );
    d.wait_state("fine", 0, Running, T);
    let out = d.ctl(&["restart", "blocked"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn reload_of_a_changed_pass_program_replaces_it_without_downtime() {
    let port = free_port();
    let base = header() + &pass_program("web", port, &[], "instances = 2");
    let d = Daemon::start(&base);
    d.wait_state("web", 0, Running, T);
    d.wait_state("web", 1, Running, T);
    let load = Load::start(port, 8, 8, &[0, 20]);
    wait_for("load to flow", T, || {
        if load.ok_so_far() > 100 {
            Ok(())
        } else {
            Err("slow".into())
        }
    });
    d.write_config(
        &(header()
            + &pass_program(
                "web",
                port,
                &[],
                "instances = 2\nenvironment = { RELEASE = \"2\" }",
            )),
    );
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("changed web"),
        "{out:?}"
    );
    let before = load.ok_so_far();
    wait_for("load after the reload", T, || {
        if load.ok_so_far() > before + 100 {
            Ok(())
        } else {
            Err("slow".into())
        }
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let pid = d.instance("web", 0).pid.expect("pid");
    let env = environ(pid);
    assert!(
        env.contains(&"RELEASE=2".to_string()),
        "new settings not applied"
    );
    assert_eq!(d.status()[0].generation, 2);
}

#[test]
fn a_second_restart_while_one_runs_is_refused_and_unix_sockets_work() {
    let d = Daemon::start(&header());
    let sock = d.path("run/app.sock");
    d.write_config(
        &(header()
            + &demo_program(
                "web",
                &["--start-delay", "800"],
                "listen = [\"unix://run/app.sock\"]\nsocket_mode = \"0600\"\nready = { notify = true }",
            )),
    );
    assert!(d.ctl(&["reload"]).status.success());
    d.wait_state("web", 0, Running, T);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let first = d.ctl(&["restart", "--no-wait", "web"]);
    assert!(first.status.success(), "{first:?}");
    let second = d.ctl(&["restart", "web"]);
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already in progress"),
        "{second:?}"
    );
    wait_for("the first restart to finish", T, || {
        let snap = d.status();
        let i = &snap[0].instances;
        if i.len() == 1 && i[0].generation == 2 && i[0].state == Running {
            Ok(())
        } else {
            Err(format!("{i:?}"))
        }
    });
}

#[test]
fn a_reload_during_a_restart_is_applied_after_it() {
    let port = free_port();
    let prog =
        |extra: &str| header() + &pass_program("web", port, &["--start-delay", "600"], extra);
    let d = Daemon::start(&prog(""));
    d.wait_state("web", 0, Running, T);
    assert!(d.ctl(&["restart", "--no-wait", "web"]).status.success());
    d.write_config(&prog("environment = { RELEASE = \"3\" }"));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let st = d.wait_state("web", 0, Running, T);
    assert_eq!(
        st.generation, 3,
        "the reload ran as its own restart after the first"
    );
    let env = environ(st.pid.expect("pid"));
    assert!(
        env.contains(&"RELEASE=3".to_string()),
        "queued settings not applied"
    );
}

/// A worker that never accepts on the socket zdt passed (it bound its own,
/// as gunicorn --reuse-port does): zdt shows RUNNING, but connections pile
/// up in the queue; status, the log and the restart's verdict say so.
#[test]
fn a_socket_nobody_accepts_on_is_reported() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.web]\ncommand = [\"sh\", \"-c\", \"trap '' TERM; sleep 1000\"]\nlisten = [\"tcp://127.0.0.1:{port}\"]\nstartsecs = \"0s\"\nmax_wait = \"9s\"\n"
            )),
    );
    d.wait_state("web", 0, Running, T);
    // The kernel completes the handshake and queues it; nobody accepts.
    let _waiting = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let warning = wait_for("the socket warning", T, || {
        d.status()[0]
            .socket_warning
            .clone()
            .ok_or_else(|| "none yet".to_string())
    });
    assert!(
        warning.contains(&format!("tcp://127.0.0.1:{port}")) && warning.contains("LISTEN_FDS"),
        "{warning}"
    );
    let text = String::from_utf8_lossy(&d.ctl(&["status"]).stdout).to_string();
    assert!(text.contains("web: warning: "), "{text}");
    assert!(d.stderr().contains("waiting in the accept queue"));
    // The new generation does not accept either: judged afresh, it is
    // caught while the old one drains (it ignores TERM until max_wait).
    let out = d.ctl(&["restart", "--strict", "web"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting in the accept queue"),
        "{out:?}"
    );
}

/// The other way round: gen 1 never accepts, gen 2 does. The restart's
/// verdict is about gen 2, so `--strict` passes.
#[test]
fn a_restart_that_fixes_the_socket_passes_strict() {
    let port = free_port();
    let flag = tempfile::tempdir().expect("tempdir");
    let fixed = flag.path().join("fixed");
    let demo = bin("zdt-demo").display().to_string();
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.web]\ncommand = [\"sh\", \"-c\", \"if [ -e {} ]; then exec {demo}; else exec sleep 1000; fi\"]\nlisten = [\"tcp://127.0.0.1:{port}\"]\nstartsecs = \"0s\"\nmax_wait = \"2s\"\n",
                fixed.display()
            )),
    );
    d.wait_state("web", 0, Running, T);
    let _waiting = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    wait_for("the socket warning", T, || {
        d.status()[0]
            .socket_warning
            .clone()
            .ok_or_else(|| "none yet".to_string())
    });
    std::fs::write(&fixed, "").expect("flag");
    let out = d.ctl(&["restart", "--strict", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert!(d.status()[0].socket_warning.is_none());
}

/// A worker that accepts, but slower than clients come (one connection at a
/// time, 20 ms each, 16 clients): its queue is never empty, yet it is served
/// from. That is a busy worker, not a socket nobody accepts on: no warning.
#[test]
fn a_busy_worker_with_a_full_queue_is_not_reported() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let port = free_port();
    let script = "import socket,time\ns=socket.socket(fileno=3)\nwhile True:\n c,_=s.accept()\n c.recv(65536)\n time.sleep(0.02)\n c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok')\n c.close()\n";
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.web]\ncommand = [\"python3\", \"-c\", {script:?}]\nlisten = [\"tcp://127.0.0.1:{port}\"]\nstartsecs = \"0s\"\n"
            )),
    );
    d.wait_state("web", 0, Running, T);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                    let mut buf = Vec::new();
                    if c.read_to_end(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Watch for longer than the warning needs (one connection waiting 5 s),
    // while the queue is full and being served.
    let t0 = Instant::now();
    let mut max_queue_seen = 0;
    while t0.elapsed() < Duration::from_secs(7) {
        let s = d.status();
        assert!(
            s[0].socket_warning.is_none(),
            "a busy worker was reported: {:?}",
            s[0].socket_warning
        );
        max_queue_seen = max_queue_seen.max(queue_len(port));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    assert!(
        served.load(Ordering::Relaxed) > 50,
        "the worker served too little"
    );
    assert!(
        max_queue_seen > 0,
        "the queue was never full: the test shows nothing"
    );
}

/// Connections waiting in the accept queue of the listener on `port`
/// (`ss`'s Recv-Q for a listening socket, read from /proc/net/tcp).
fn queue_len(port: u16) -> u32 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            // State 0A is LISTEN; tx_queue:rx_queue, rx is the accept queue.
            (local_port == port && *f.get(3)? == "0A")
                .then(|| u32::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok())
                .flatten()
        })
        .max()
        .unwrap_or(0)
}

/// While a new generation starts beside the old one, each row of status
/// names its own process's generation (the old row said N+1 with the old pid).
#[test]
fn status_during_a_restart_shows_each_process_with_its_generation() {
    let port = free_port();
    let d = Daemon::start(&(header() + &pass_program("web", port, &["--start-delay", "1500"], "")));
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    let restart = d.ctl_in_background(&["restart", "web"]);
    let rows = wait_for("two rows while the new generation starts", T, || {
        let rows = d.status()[0].instances.clone();
        if rows.len() == 2 {
            Ok(rows)
        } else {
            Err(format!("{rows:?}"))
        }
    });
    let running = rows
        .iter()
        .find(|r| r.pid == Some(old))
        .expect("the old row");
    assert_eq!(running.generation, 1, "{rows:?}");
    assert!(
        rows.iter().any(|r| r.generation == 2 && r.pid != Some(old)),
        "{rows:?}"
    );
    assert!(restart.join().expect("join").status.success());
}
