//! Worker output: files under log_dir, rotation, tail and tail -f.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use zdt::state::{InstanceSnapshot, InstanceState::*, ProgramSnapshot};

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

/// Runs zdtctl with `args`; fails the test if it has not answered within
/// `T` (zdt frozen) instead of hanging with it.
fn ctl_within(args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("zdtctl"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    output_within(&mut cmd, T)
        .unwrap_or_else(|| panic!("zdtctl {args:?} got no answer within {T:?}: zdt is frozen"))
}

/// `zdtctl --json status` on `socket`, within `T`.
fn status_within(socket: &Path) -> Vec<ProgramSnapshot> {
    let sock = socket.display().to_string();
    let out = ctl_within(&["-s", &sock, "--json", "status"]);
    assert!(out.status.success(), "status failed: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    serde_json::from_value(v["programs"].clone()).expect("status JSON")
}

fn instance_within(socket: &Path, program: &str) -> InstanceSnapshot {
    status_within(socket)
        .into_iter()
        .find(|p| p.name == program)
        .and_then(|p| p.instances.into_iter().next())
        .unwrap_or_else(|| panic!("no {program} in status"))
}

/// Kills a child we started if the test ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Output that nobody reads must not freeze zdt: status answers, a killed
/// worker is respawned, SIGTERM ends zdt, and the lost bytes are counted.
#[test]
fn a_log_fifo_nobody_reads_does_not_freeze_zdt() {
    let fifo_dir = tempfile::tempdir().expect("tempdir");
    let fifo = fifo_dir.path().join("web.out");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // Held open and never read: the pipe fills, as with a stuck `cat`.
    let _stalled_reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO");
    let port = free_port();
    let mut d = Daemon::start(
        &(header()
            + &demo_program(
                "web",
                &["--port", &port.to_string(), "--spam", "4000000"],
                &format!(
                    "startsecs = \"0s\"\nstdout_logfile = {:?}",
                    fifo.display().to_string()
                ),
            )),
    );
    let sock = d.path("run/zdt.sock");
    let first = wait_for("web to run", T, || {
        let i = instance_within(&sock, "web");
        match i.pid {
            Some(pid) if i.state == Running => Ok(pid),
            _ => Err(format!("{i:?}")),
        }
    });
    kill(first, libc::SIGKILL);
    wait_for("a new worker after kill -9", T, || {
        let i = instance_within(&sock, "web");
        if i.state == Running && i.pid.is_some_and(|p| p != first) {
            Ok(())
        } else {
            Err(format!("{i:?}"))
        }
    });
    assert!(!alive(first), "the killed worker is left a zombie");
    let i = wait_for("dropped log bytes in status", T, || {
        let i = instance_within(&sock, "web");
        if i.log_dropped_bytes > 0 {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    // At most what both workers wrote to stdout.
    assert!(i.log_dropped_bytes <= 8_000_000, "{i:?}");
    d.signal(libc::SIGTERM);
    d.wait_exit(T);
}

/// `zdt run` with its stdout and stderr to pipes nobody reads keeps
/// supervising and obeys SIGTERM.
#[test]
fn zdt_run_into_pipes_nobody_reads_does_not_freeze() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = Command::new(bin("zdt"))
        .args(["run", "--listen", &format!("tcp://127.0.0.1:{port}"), "--"])
        .arg(bin("zdt-demo"))
        .args(["--spam", "4000000"])
        .env("XDG_RUNTIME_DIR", dir.path())
        .stdin(Stdio::null())
        // Never read by this test.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("zdt run");
    let mut zdt = KillOnDrop(child);
    let sock = dir
        .path()
        .join("zdt")
        .join(format!("run-{}.sock", zdt.0.id()));
    wait_for("the control socket", T, || {
        sock.exists().then_some(()).ok_or_else(|| "not yet".into())
    });
    wait_for("dropped log bytes in status", T, || {
        let i = instance_within(&sock, "app");
        if i.state == Running && i.log_dropped_bytes > 0 {
            Ok(())
        } else {
            Err(format!("{i:?}"))
        }
    });
    wait_for("the worker to answer", T, || http_get(port, "/"));
    kill(zdt.0.id(), libc::SIGTERM);
    wait_for("zdt to exit after SIGTERM", T, || {
        match zdt.0.try_wait().expect("try_wait") {
            Some(st) => Ok(st),
            None => Err("running".into()),
        }
    });
}

#[test]
fn lines_can_carry_their_time_and_drop_the_generation_prefix() {
    let d = Daemon::start(
        &(header()
            + "[program.stamped]\ncommand = [\"sh\", \"-c\", \"echo one; echo two; exec sleep 1000\"]\nstartsecs = \"0s\"\nlog_timestamps = true\n\n[program.bare]\ncommand = [\"sh\", \"-c\", \"echo '{\\\"msg\\\":1}'; exec sleep 1000\"]\nstartsecs = \"0s\"\nlog_prefix = false\n"),
    );
    let stamped = wait_for("two stamped lines", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(d.path("logs/stamped-0.out.log")).unwrap_or_default();
        if text.lines().count() >= 2 {
            Ok(text)
        } else {
            Err(text)
        }
    });
    for (line, want) in stamped.lines().zip(["[gen 1:0] one", "[gen 1:0] two"]) {
        let (time, rest) = line.split_once(' ').expect("a time first");
        assert_eq!(rest, want, "{stamped}");
        assert!(
            time.starts_with("20") && time.ends_with('Z') && time.len() == 24,
            "{time}"
        );
    }
    let bare = wait_for("the JSON line", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(d.path("logs/bare-0.out.log")).unwrap_or_default();
        if text.ends_with('\n') {
            Ok(text)
        } else {
            Err(text)
        }
    });
    assert_eq!(bare, "{\"msg\":1}\n");
}

#[test]
fn tail_n_counts_lines_and_c_counts_bytes() {
    let d = Daemon::start(
        &(header()
            + "[program.lines]\ncommand = [\"sh\", \"-c\", \"for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line$i; done; exec sleep 1000\"]\nstartsecs = \"0s\"\nlog_prefix = false\n"),
    );
    wait_for("twelve lines", T, || {
        let out = d.ctl(&["tail", "-n", "100", "lines"]);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        if s.lines().count() == 12 {
            Ok(())
        } else {
            Err(s)
        }
    });
    let out = d.ctl(&["tail", "-n", "3", "lines"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line10\nline11\nline12\n"
    );
    let out = d.ctl(&["tail", "lines"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        10,
        "10 lines by default"
    );
    let out = d.ctl(&["tail", "--bytes", "7", "lines"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line12\n");
}

/// `zdtctl logs` interleaves every instance's stdout and stderr of several
/// programs, each line prefixed with where it came from; `tail NAME` of a
/// program with several instances prefixes its lines the same way, `tail
/// NAME:N` stays plain; `logs` follows new output until its reader goes.
#[test]
fn logs_and_tail_prefix_lines_from_several_instances_and_follow() {
    let prog = |name: &str, n: u32| {
        format!(
            "[program.{name}]\ncommand = [\"sh\", \"-c\", \"echo {name} says hello from $ZDT_INSTANCE; \
             echo {name} oops $ZDT_INSTANCE >&2; exec sleep 1000\"]\n\
             startsecs = \"0s\"\nlog_prefix = false\ninstances = {n}\n"
        )
    };
    let d = Daemon::start(&(header() + &prog("a", 2) + &prog("b", 1)));
    let expected = [
        "a:0     | a says hello from 0",
        "a:0 err | a oops 0",
        "a:1     | a says hello from 1",
        "a:1 err | a oops 1",
        "b:0     | b says hello from 0",
        "b:0 err | b oops 0",
    ];
    let text = wait_for("every line in logs", T, || {
        let out = d.ctl(&["logs", "--no-follow"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && expected.iter().all(|l| text.lines().any(|t| t == *l)) {
            Ok(text)
        } else {
            Err(format!("{out:?}"))
        }
    });
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(
        !text.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
    let out = d.ctl(&["logs", "--no-follow", "--err", "b"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b:0 err | b oops 0\n");
    let out = d.ctl(&["tail", "a"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a:0 | a says hello from 0\na:1 | a says hello from 1\n"
    );
    let out = d.ctl(&["tail", "a:1"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a says hello from 1\n"
    );
    let out = d.ctl(&["logs", "--no-follow", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // Following: the last line of each stream, then a restart's new output.
    let mut follower = std::process::Command::new(bin("zdtctl"))
        .args([
            "-c",
            &d.path("supervisor.toml").display().to_string(),
            "logs",
            "-n",
            "1",
            "a",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn zdtctl logs");
    let stdout = follower.stdout.take().expect("stdout");
    let guard = KillOnDrop(follower);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + T;
    let count = |seen: &[String], line: &str| seen.iter().filter(|l| *l == line).count();
    let mut restarted = false;
    while count(&seen, "a:1     | a says hello from 1") < 2
        || count(&seen, "a:0 err | a oops 0") < 2
    {
        // Each stream printed its history: all four are connected.
        if !restarted && seen.len() >= 4 {
            assert!(d.ctl(&["restart", "a"]).status.success());
            restarted = true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "lines seen: {seen:?}");
        if let Ok(line) = rx.recv_timeout(left) {
            seen.push(line);
        }
    }
    drop(guard);
}

/// `status --watch --count 2`: two tables a second apart, one row per
/// instance with its memory, its process count and (second table) its CPU
/// and request rate from zdt's counters; it ends by itself.
#[test]
fn status_watch_shows_memory_cpu_and_request_rates() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "web",
                &[],
                &format!(
                    "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                     ready = {{ http = \"/health\" }}\ninstances = 2"
                ),
            )),
    );
    let pids = [0, 1].map(|i| d.wait_state("web", i, Running, T).pid.expect("pid"));
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    let load = crate::util::load::Load::start(port, 4, 0, &[0]);
    load.wait_progress("load before watching");
    let out = d.ctl(&["status", "--watch", "--interval", "1s", "--count", "2"]);
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let tables: Vec<&str> = text.split("zdt status every 1s").skip(1).collect();
    assert_eq!(tables.len(), 2, "{text}");
    assert!(
        !text.contains('\x1b'),
        "no screen codes when not a terminal"
    );
    let header = tables[1].lines().nth(1).unwrap_or("");
    assert!(
        header.split_whitespace().eq([
            "PROGRAM", "INST", "GEN", "STATE", "PID", "CPU%", "MEM", "PROCS", "REQ/S", "INFLIGHT",
            "RESTARTS"
        ]),
        "{header}"
    );
    for (i, pid) in pids.iter().enumerate() {
        let row: Vec<&str> = tables[1]
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no row of pid {pid}: {text}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[..4], ["web", &i.to_string(), "1", "RUNNING"], "{row:?}");
        assert!(row[5].parse::<f64>().is_ok(), "CPU%: {row:?}");
        assert!(row[6].ends_with('M'), "MEM: {row:?}");
        assert_eq!(row[7], "1", "PROCS: {row:?}");
        assert!(row[8].parse::<f64>().is_ok(), "REQ/S: {row:?}");
    }
    // Under load, requests per second summed over the instances is above 0.
    let rate: f64 = tables[1]
        .lines()
        .filter_map(|l| l.split_whitespace().nth(8)?.parse::<f64>().ok())
        .sum();
    assert!(rate > 0.0, "{text}");
}

/// `stdout_logfile = "syslog"`: each line is one message on the syslog
/// socket, tagged with the program's name; `tail` still reads the output.
#[test]
fn syslog_target_sends_each_line_as_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("log");
    let server = std::os::unix::net::UnixDatagram::bind(&socket).expect("bind");
    server.set_read_timeout(Some(T)).expect("read timeout");
    let cfg = format!(
        "[supervisor]\ncontrol = \"run/zdt.sock\"\nlog_dir = \"logs\"\nsyslog_socket = {:?}\n\n\
         [program.web]\ncommand = [\"sh\", \"-c\", \"echo out line; echo err line >&2; exec sleep 1000\"]\n\
         startsecs = \"0s\"\nstdout_logfile = \"syslog\"\nstderr_logfile = \"SYSLOG\"\n",
        socket.display().to_string()
    );
    let d = Daemon::start(&cfg);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 2 {
        let n = server
            .recv(&mut buf)
            .expect("a syslog message within the deadline");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got.sort();
    assert!(
        got[0].starts_with("<14>") && got[0].ends_with(" web: [gen 1:0] err line"),
        "{got:?}"
    );
    assert!(
        got[1].starts_with("<14>") && got[1].ends_with(" web: [gen 1:0] out line"),
        "{got:?}"
    );
    assert!(!d.path("logs/web-0.out.log").exists(), "no file");
    let out = d.ctl(&["tail", "web"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[gen 1:0] out line\n");
}
