//! Crash loops and failed starts: backoff, FATAL, the cause kept, clean
//! stops by the stop signal, and workers' children left by a killed zdt.

use std::time::Duration;

use zdt::state::InstanceState::*;

use crate::util::*;

const T: Duration = Duration::from_secs(30);

/// A worker that is ready at once and crashes 300 ms later is a failed start
/// (it exited within `startsecs` of being ready): it backs off and ends FATAL
/// after `startretries`, instead of being restarted 3 times a second forever.
#[test]
fn crash_soon_after_ready_backs_off_and_ends_fatal() {
    let port = free_port();
    let cfg = header()
        + &demo_program(
            "flaky",
            &["--crash-after", "300"],
            &format!(
                "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                 ready = {{ http = \"/health\" }}\nstartsecs = \"1s\"\nstartretries = 3"
            ),
        );
    let d = Daemon::start(&cfg);
    // Backoffs of 1, 2 and 4 s: FATAL after about 8.5 s; without backoff
    // the restarts would pass any bound long before.
    let st = wait_for("flaky:0 to be FATAL", T, || {
        let i = d.instance("flaky", 0);
        assert!(i.restarts <= 3, "restarted more than startretries: {i:?}");
        if i.state == Fatal {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    assert_eq!(st.restarts, 3, "{st:?}");
    assert_eq!(st.pid, None);
    let err = st.error.unwrap_or_default();
    assert!(
        err.contains("after it was ready")
            && err.contains("startsecs")
            && err.contains("4 failed starts"),
        "{err}"
    );
    // Nothing routes to it: the proxy answers 503, not 502.
    let (code, _) = http_get(port, "/").expect("the proxy answers");
    assert_eq!(code, 503);
}

/// A proxy worker that never listens where zdt told it to: the failure names
/// the address probed and how to fix it, and FATAL keeps that cause instead of
/// "exited too quickly (killed by SIGTERM)".
///
/// The private address is a unix socket, which only the worker can create: a
/// private TCP port is free when zdt picks it, so a listener of another test
/// could take it during `ready_timeout` and answer the probe. The TCP form of
/// the hint is covered by `program::slot`'s unit tests.
#[test]
fn not_ready_proxy_worker_keeps_the_probe_failure_as_its_cause() {
    let port = free_port();
    let cfg = header()
        + &format!(
            "[program.lost]\ncommand = [\"sleep\", \"300\"]\nmode = \"proxy\"\n\
             upstream = \"unix\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
             ready = {{ http = \"/health\" }}\nready_timeout = \"1s\"\nstartretries = 1\n\
             kill_timeout = \"2s\"\n"
        );
    let d = Daemon::start(&cfg);
    let st = d.wait_state("lost", 0, Fatal, T);
    let err = st.error.unwrap_or_default();
    assert!(
        err.starts_with("not ready within ready_timeout (1s): http probe of ")
            && err.contains("/health")
            && err.contains("{socket}")
            && err.contains("$SOCKET")
            && err.contains("2 failed starts in a row"),
        "{err}"
    );
    assert!(!err.contains("exited too quickly"), "{err}");
    // zdtctl start reports the same cause.
    let out = d.ctl(&["start", "lost"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("not ready within ready_timeout"), "{text}");
}

/// A worker that dies of the stop signal zdt sent (as uvicorn does when it
/// re-raises SIGTERM; `sleep` simply does not handle it) stopped cleanly; it
/// was not "killed by SIGTERM".
#[test]
fn death_by_the_stop_signal_zdt_sent_is_a_clean_stop() {
    let cfg = header() + "[program.nap]\ncommand = [\"sleep\", \"300\"]\nstartsecs = \"0s\"\n";
    let d = Daemon::start(&cfg);
    let pid = d.wait_state("nap", 0, Running, T).pid.expect("pid");
    let (code, v) = d.ctl_json(&["stop", "nap"]);
    assert_eq!(code, 0, "{v}");
    assert!(!alive(pid));
    let exit = d.instance("nap", 0).last_exit.expect("last exit");
    assert_eq!(exit.signal.as_deref(), Some("SIGTERM"), "{exit:?}");
    assert!(exit.clean_stop && exit.expected, "{exit:?}");
    assert_eq!(exit.to_string(), "stopped by SIGTERM");
    let out = d.ctl(&["status", "nap"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stopped by SIGTERM"), "{text}");
    assert!(!text.contains("killed by"), "{text}");

    // The same signal sent by someone else, not as a stop, is a kill.
    d.ctl(&["start", "nap"]);
    let pid = d.wait_state("nap", 0, Running, T).pid.expect("pid");
    kill(pid, libc::SIGTERM);
    let st = wait_for("the kill to be recorded", T, || {
        let i = d.instance("nap", 0);
        match &i.last_exit {
            Some(e) if e.at_ms > exit.at_ms => Ok(i),
            _ => Err(format!("{i:?}")),
        }
    });
    let e = st.last_exit.expect("last exit");
    assert!(!e.clean_stop, "{e:?}");
    assert_eq!(e.to_string(), "killed by SIGTERM");
}

/// SIGKILLs a pid when dropped (a process the test made, should it fail).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0, libc::SIGKILL);
    }
}

/// A pass-mode worker's child (in the worker's process group, holding the
/// listening socket) outlives `kill -9` of zdt; the next zdt on the same
/// config kills it from the state file and serves on the port again.
#[test]
fn next_zdt_kills_worker_children_left_by_a_killed_zdt() {
    let port = free_port();
    let mut d = Daemon::start(&header());
    let pidfile = d.path("grandchild.pid");
    let script = format!(
        "sleep 120 & echo $! > {}; exec {}",
        pidfile.display(),
        bin("zdt-demo").display()
    );
    d.write_config(
        &(header()
            + &format!(
                "[program.web]\ncommand = [\"sh\", \"-c\", {script:?}]\n\
                 listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\n"
            )),
    );
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let worker = d.wait_state("web", 0, Running, T).pid.expect("pid");
    let grandchild: u32 = wait_for("the grandchild's pid", T, || {
        std::fs::read_to_string(&pidfile)
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())
    });
    let _cleanup = KillOnDrop(grandchild);
    assert!(alive(grandchild));

    d.signal(libc::SIGKILL);
    d.wait_exit(T);
    wait_for("the worker to die with zdt", T, || {
        if alive(worker) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });
    // PDEATHSIG reaches only the worker: its child lives on with the socket.
    assert!(alive(grandchild), "the grandchild died with zdt");

    d.start_again();
    wait_for("the leftover grandchild to be killed", T, || {
        if alive(grandchild) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });
    let st = d.wait_state("web", 0, Running, T);
    let pid = st.pid.expect("pid");
    let (code, body) = wait_for("the service to answer", T, || http_get(port, "/"));
    assert_eq!(code, 200);
    assert!(body.contains(&format!("\"pid\":{pid}")), "{body}");
    assert!(
        d.stderr().contains("left by a previous zdt"),
        "the kill is logged"
    );
    // The new zdt records its own worker; a clean exit removes the file.
    let file = d.path("run/zdt.sock.pgroups");
    // (Written by the recorder's thread after the spawn: wait for it.)
    wait_for("the new worker's group in the state file", T, || {
        let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
        if text.contains(&format!("\n{pid} ")) && text.contains(" web\n") {
            Ok(())
        } else {
            Err(text)
        }
    });
    d.signal(libc::SIGTERM);
    d.wait_exit(T);
    assert!(!file.exists(), "state file left after a clean exit");
}

/// `restart_delay`: a worker that held past `startsecs` and then crashed is
/// started again after the delay, in BACKOFF meanwhile, and never FATAL
/// however often it crashes.
#[test]
fn a_crash_is_restarted_after_restart_delay() {
    let cfg = header()
        + &demo_program(
            "crashy",
            &["--crash-after", "400", "--port", "0"],
            "startsecs = \"100ms\"\nstartretries = 0\nrestart_delay = \"1500ms\"\n",
        );
    let d = Daemon::start(&cfg);
    let first = d.wait_state("crashy", 0, Running, T);
    let waiting = wait_for("crashy:0 to wait out restart_delay", T, || {
        let i = d.instance("crashy", 0);
        if i.state == Backoff {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    let why = waiting.error.clone().unwrap_or_default();
    assert!(
        why.contains("restart_delay") && why.contains("exit 3"),
        "{why}"
    );
    let second = wait_for("crashy:0 to run again", T, || {
        let i = d.instance("crashy", 0);
        if i.state == Running && i.restarts >= 1 {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    let exited = waiting.last_exit.expect("last exit").at_ms;
    let started = second.started_ms.expect("started");
    assert!(
        started >= exited + 1500,
        "started {} ms after the crash",
        started - exited
    );
    assert_ne!(second.pid, first.pid);
    // Crashes of a process that held are not failed starts: never FATAL,
    // even with startretries = 0.
    wait_for("a second restart", T, || {
        let i = d.instance("crashy", 0);
        assert_ne!(i.state, Fatal, "{i:?}");
        if i.restarts >= 2 {
            Ok(())
        } else {
            Err(format!("{i:?}"))
        }
    });
}
