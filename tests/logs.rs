//! Worker output: files under log_dir, rotation, tail and tail -f.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use zdt::state::InstanceState::*;

use crate::util::*;

const T: Duration = Duration::from_secs(15);

#[test]
fn output_goes_to_files_and_tail() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "web",
                &[
                    "--port",
                    &port.to_string(),
                    "--stderr-line",
                    "hello on stderr",
                ],
                "startsecs = \"0s\"",
            )),
    );
    d.wait_state("web", 0, Running, T);
    wait_for("stderr line in the log file", T, || {
        let s = std::fs::read_to_string(d.path("logs/web-0.err.log")).unwrap_or_default();
        if s.contains("[gen 1:0] hello on stderr") {
            Ok(())
        } else {
            Err(s)
        }
    });
    wait_for("stdout in tail", T, || {
        let out = d.ctl(&["tail", "web"]);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        if s.contains("listening on") {
            Ok(())
        } else {
            Err(s)
        }
    });
    let out = d.ctl(&["tail", "--stderr", "web"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello on stderr"));
}

#[test]
fn logs_rotate_by_size_keeping_backups() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "web",
                &["--port", &port.to_string()],
                "startsecs = \"0s\"\nstdout_logfile_maxbytes = \"4KB\"\nstdout_logfile_backups = 2",
            )),
    );
    d.wait_state("web", 0, Running, T);
    wait_for("the worker to answer", T, || http_get(port, "/"));
    for _ in 0..10 {
        let (code, _) = http_get(port, "/log?n=50&stream=stdout").expect("log request");
        assert_eq!(code, 200);
    }
    let base = d.path("logs/web-0.out.log");
    wait_for("rotated files", T, || {
        let ok = base.exists()
            && d.path("logs/web-0.out.log.1").exists()
            && d.path("logs/web-0.out.log.2").exists();
        if ok {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert!(
        !d.path("logs/web-0.out.log.3").exists(),
        "more backups than configured"
    );
    for f in [
        "logs/web-0.out.log",
        "logs/web-0.out.log.1",
        "logs/web-0.out.log.2",
    ] {
        // The pump may be rotating right now (between the rename and the new
        // file); only the lookup is retried, the bound must always hold.
        let len = wait_for(f, T, || {
            std::fs::metadata(d.path(f))
                .map(|m| m.len())
                .map_err(|e| e.to_string())
        });
        assert!(len <= 4096, "{f} is {len} bytes");
    }
}

#[test]
fn tail_follow_streams_new_output() {
    let port = free_port();
    let d = Daemon::start(
        &(header() + &demo_program("web", &["--port", &port.to_string()], "startsecs = \"0s\"")),
    );
    d.wait_state("web", 0, Running, T);
    wait_for("the worker to answer", T, || http_get(port, "/"));
    let mut child = Command::new(bin("zdtctl"))
        .arg("-c")
        .arg(&d.config)
        .args(["tail", "-f", "web"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tail -f");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Output produced after tail -f started must arrive.
    let found = wait_for("a new line through tail -f", T, || {
        http_get(port, "/log?n=1&stream=stdout")?;
        while let Ok(line) = rx.try_recv() {
            if line.contains("log line") {
                return Ok(line);
            }
        }
        Err("nothing yet".into())
    });
    assert!(!found.is_empty());
    let _ = child.kill();
    let _ = child.wait();
    // zdt is still fine after the follower went away.
    assert!(d.ctl(&["status"]).status.success());
}
