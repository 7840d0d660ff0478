//! Process lifecycle: states, crash loops, stop timeouts, orphans.

use std::time::{Duration, Instant};

use zdt::state::InstanceState::*;

use crate::util::*;

const T: Duration = Duration::from_secs(15);

#[test]
fn states_from_start_to_stop_and_generations() {
    let port = free_port();
    let cfg = header()
        + &demo_program(
            "web",
            &[],
            &format!("environment = {{ PORT = \"{port}\" }}\nstartsecs = \"300ms\""),
        );
    let d = Daemon::start(&cfg);
    // STARTING is visible first (startsecs has not passed yet) or already RUNNING.
    let first = d.instance("web", 0);
    assert!(matches!(first.state, Starting | Running), "{first:?}");
    let up = d.wait_state("web", 0, Running, T);
    assert_eq!(up.generation, 1);
    let pid = up.pid.expect("pid while running");
    let (code, body) = wait_for("the worker to answer", T, || http_get(port, "/"));
    assert_eq!(code, 200);
    assert!(body.contains(&format!("\"pid\":{pid}")), "{body}");

    let out = d.ctl(&["stop", "web"]);
    assert!(out.status.success(), "{out:?}");
    let st = d.instance("web", 0);
    assert_eq!(st.state, Stopped);
    assert_eq!(st.pid, None);
    assert!(!alive(pid), "worker {pid} still alive after stop");
    let exit = st.last_exit.expect("last exit recorded");
    assert!(exit.expected, "{exit:?}");

    // start blocks until RUNNING; a new generation begins.
    let out = d.ctl(&["start", "web"]);
    assert!(out.status.success(), "{out:?}");
    let st = d.instance("web", 0);
    assert_eq!(st.state, Running);
    assert_eq!(st.generation, 2);
    assert_eq!(st.restarts, 1);

    // restart (stop then start for a program without an owned socket).
    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}");
    let st = d.instance("web", 0);
    assert_eq!((st.state, st.generation), (Running, 3));
    assert_ne!(st.pid, Some(pid));
}

#[test]
fn crash_loop_reaches_fatal_after_startretries() {
    let cfg = header()
        + &demo_program(
            "crashy",
            &["--exit-after", "0", "--exit-code", "7"],
            "startsecs = \"1s\"\nstartretries = 2",
        );
    let d = Daemon::start(&cfg);
    let t0 = Instant::now();
    let st = d.wait_state("crashy", 0, Fatal, T);
    // Three failed starts: backoffs of 1 s and 2 s in between.
    assert!(
        t0.elapsed() >= Duration::from_millis(2500),
        "FATAL too early: {:?}",
        t0.elapsed()
    );
    assert_eq!(st.restarts, 2, "{st:?}");
    assert_eq!(st.last_exit.as_ref().and_then(|e| e.code), Some(7));
    assert!(
        st.error
            .as_deref()
            .unwrap_or("")
            .contains("exited too quickly"),
        "{st:?}"
    );
    // start reports the failure with exit code 1.
    let out = d.ctl(&["start", "crashy"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FATAL"),
        "{out:?}"
    );
}

#[test]
fn missing_command_is_fatal_with_the_os_error() {
    let cfg = header() + "[program.ghost]\ncommand = [\"/nonexistent/bin/app\"]\n";
    let d = Daemon::start(&cfg);
    let st = d.wait_state("ghost", 0, Fatal, T);
    let err = st.error.expect("error shown");
    assert!(
        err.contains("/nonexistent/bin/app") && err.contains("No such file"),
        "{err}"
    );
    // No crash loop of spawns: it stays FATAL with no restarts.
    assert_eq!(st.restarts, 0);
}

#[test]
fn worker_ignoring_sigterm_is_killed_after_kill_timeout() {
    let port = free_port();
    let cfg = header()
        + &demo_program(
            "stubborn",
            &["--ignore-term"],
            &format!("environment = {{ PORT = \"{port}\" }}\nstartsecs = \"0s\"\nkill_timeout = \"1500ms\""),
        );
    let d = Daemon::start(&cfg);
    let pid = d.wait_state("stubborn", 0, Running, T).pid.expect("pid");
    wait_for("the worker to listen", T, || http_get(port, "/"));
    let t0 = Instant::now();
    let out = d.ctl(&["stop", "stubborn"]);
    let took = t0.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert!(
        took >= Duration::from_millis(1400),
        "stopped after {took:?}, before kill_timeout"
    );
    assert!(took < Duration::from_millis(4000), "stop took {took:?}");
    assert!(!alive(pid));
    let st = d.instance("stubborn", 0);
    let exit = st.last_exit.expect("exit");
    assert_eq!(exit.signal.as_deref(), Some("SIGKILL"), "{exit:?}");
}

#[test]
fn crashed_worker_is_restarted_with_a_new_pid() {
    let port = free_port();
    let cfg = header()
        + &demo_program(
            "web",
            &[],
            &format!("environment = {{ PORT = \"{port}\" }}\nstartsecs = \"200ms\""),
        );
    let d = Daemon::start(&cfg);
    let pid = d.wait_state("web", 0, Running, T).pid.expect("pid");
    kill(pid, libc::SIGKILL);
    let st = wait_for("a new pid", T, || {
        let i = d.instance("web", 0);
        if i.state == Running && i.pid.is_some_and(|p| p != pid) {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    assert_eq!(st.restarts, 1);
    assert_eq!(
        st.last_exit.and_then(|e| e.signal).as_deref(),
        Some("SIGKILL")
    );
    assert_eq!(st.generation, 1, "a crash restart keeps the generation");
}

#[test]
fn no_worker_outlives_zdt_killed_with_sigkill() {
    let cfg = header()
        + &demo_program(
            "a",
            &["--port", &free_port().to_string()],
            "instances = 1\nstartsecs = \"0s\"",
        )
        + &demo_program(
            "b",
            &["--port", &free_port().to_string(), "--ignore-term"],
            "startsecs = \"0s\"",
        );
    let mut d = Daemon::start(&cfg);
    let a = d.wait_state("a", 0, Running, T).pid.expect("pid a");
    let b = d.wait_state("b", 0, Running, T).pid.expect("pid b");
    d.signal(libc::SIGKILL);
    d.wait_exit(T);
    wait_for("workers to die with zdt", T, || {
        if alive(a) || alive(b) {
            Err(format!("a alive {}, b alive {}", alive(a), alive(b)))
        } else {
            Ok(())
        }
    });
}

#[test]
fn sigterm_stops_all_programs_and_exits_zero() {
    let cfg = header()
        + &demo_program(
            "a",
            &["--port", &free_port().to_string()],
            "startsecs = \"0s\"\npriority = 1",
        )
        + &demo_program(
            "b",
            &["--port", &free_port().to_string()],
            "startsecs = \"0s\"\npriority = 2",
        );
    let mut d = Daemon::start(&cfg);
    let a = d.wait_state("a", 0, Running, T).pid.expect("pid a");
    let b = d.wait_state("b", 0, Running, T).pid.expect("pid b");
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(T);
    assert_eq!(st.code(), Some(0), "{}", d.stderr());
    assert!(!alive(a) && !alive(b));
    assert!(
        !d.path("run/zdt.sock").exists(),
        "control socket left behind"
    );
}

#[test]
fn signal_and_pid_commands() {
    let cfg = header()
        + &demo_program(
            "w",
            &["--port", &free_port().to_string()],
            "startsecs = \"0s\"\nautorestart = \"never\"",
        );
    let d = Daemon::start(&cfg);
    let pid = d.wait_state("w", 0, Running, T).pid.expect("pid");
    let out = d.ctl(&["pid", "w"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pid.to_string());
    let out = d.ctl(&["signal", "w", "KILL"]);
    assert!(out.status.success(), "{out:?}");
    let st = d.wait_state("w", 0, Exited, T);
    assert_eq!(
        st.last_exit.and_then(|e| e.signal).as_deref(),
        Some("SIGKILL")
    );
    let out = d.ctl(&["signal", "w", "NOPE"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = d.ctl(&["stop", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown program \"nosuch\" (known: w)"),
        "{out:?}"
    );
}

#[test]
fn unreachable_daemon_exits_3_and_names_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let out = std::process::Command::new(bin("zdtctl"))
        .arg("-s")
        .arg(&sock)
        .arg("status")
        .output()
        .expect("zdtctl");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&sock.display().to_string()), "{err}");
}

/// Pids of the live processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|s| {
                            let after = s.rsplit_once(')')?.1.to_string();
                            after.split_whitespace().nth(1)?.parse::<u32>().ok()
                        })
                        == Some(parent)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A second SIGTERM means exit now: while a worker ignores the first one
/// (kill_timeout far away), and while many instances are still spawning.
#[test]
fn a_second_sigterm_exits_at_once_while_stopping_or_spawning() {
    let cfg = header()
        + &demo_program(
            "stubborn",
            &["--port", &free_port().to_string(), "--ignore-term"],
            "startsecs = \"0s\"\nkill_timeout = \"120s\"",
        );
    let mut d = Daemon::start(&cfg);
    let pid = d.wait_state("stubborn", 0, Running, T).pid.expect("pid");
    d.signal(libc::SIGTERM);
    d.wait_state("stubborn", 0, Stopping, T);
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    wait_for("the worker to die with zdt", T, || {
        if alive(pid) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });

    // 500 instances that take 5 s each to listen: stopped twice right away.
    let cfg = header()
        + &demo_program(
            "many_twice_stopped",
            &["--start-delay", "5000"],
            "instances = 500\nstartsecs = \"0s\"\nready = { delay = \"10s\" }\nkill_timeout = \"60s\"\nenvironment = { PORT = \"0\" }",
        );
    let mut d = Daemon::start(&cfg);
    let zdt = d.pid();
    wait_for("workers being spawned", T, || {
        if children_of(zdt).len() > 10 {
            Ok(())
        } else {
            Err("few".into())
        }
    });
    d.signal(libc::SIGTERM);
    // Signals of one kind do not queue: the second must come after the first
    // was taken.
    wait_for("the first SIGTERM to be taken", T, || {
        if d.stderr().contains("stopping all programs") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    d.signal(libc::SIGTERM);
    // Far sooner than kill_timeout (60 s) would let a graceful stop end.
    d.wait_exit(Duration::from_secs(10));
    wait_for("no worker left", T, || {
        let left = std::fs::read_dir("/proc")
            .map(|dir| {
                dir.flatten()
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("environ"))
                            .is_ok_and(|env| env.contains("ZDT_PROGRAM=many_twice_stopped\0"))
                    })
                    .count()
            })
            .unwrap_or(0);
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} left"))
        }
    });
}

/// The shipped supervisor.toml: its demo program runs from the folder of the
/// zdt binary that reads it (`{zdt_dir}`), and `zdtctl restart web1` under
/// a client loop fails nothing, as README's "Try it" says.
#[test]
fn the_shipped_demo_config_restarts_web1_without_a_failed_request() {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/supervisor.toml"))
        .expect("the shipped supervisor.toml");
    assert!(shipped.contains("{zdt_dir}/zdt-demo"), "{shipped}");
    let port = free_port();
    let d = Daemon::start(&shipped.replace("127.0.0.1:9501", &format!("127.0.0.1:{port}")));
    d.wait_state("web1", 0, Running, T);
    let load = crate::util::load::Load::start(port, 2, 2, &[0, 20]);
    load.wait_progress("the client loop");
    let out = d.ctl(&["restart", "web1"]);
    assert!(out.status.success(), "{out:?}");
    load.wait_progress("the client loop after the restart");
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(report.generations.contains(&2), "{:?}", report.generations);
}
