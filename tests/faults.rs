//! Faults from outside zdt: running out of file descriptors. zdt is started
//! with a low RLIMIT_NOFILE so that a few hundred connections reach it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use zdt::state::InstanceState::*;

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(20);

fn proxied(port: u16, extra: &str) -> String {
    header()
        + &demo_program(
            "web",
            &[],
            &format!(
                "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ http = \"/health\" }}\n{extra}"
            ),
        )
}

/// Runs `zdtctl ARGS`; None if it has not finished within `limit` (it is
/// then killed).
fn ctl_within(d: &Daemon, args: &[&str], limit: Duration) -> Option<Output> {
    let mut cmd = Command::new(bin("zdtctl"));
    cmd.arg("-c")
        .arg(&d.config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    output_within(&mut cmd, limit)
}

/// How many fds process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// (soft, hard) "Max open files" of process `pid`.
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut nums = line["Max open files".len()..]
        .split_whitespace()
        .map(|n| n.parse::<u64>().expect("a number"));
    (nums.next().expect("soft"), nums.next().expect("hard"))
}

/// Waits until zdt's stderr contains `text`.
fn wait_log(d: &Daemon, text: &str) {
    wait_for(&format!("{text:?} in zdt's log"), T, || {
        if d.stderr().contains(text) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
}

/// zdt at RLIMIT_NOFILE 256 and 400 idle clients: more than it may accept.
/// The control socket still answers, a worker killed meanwhile is started
/// again (not FATAL), and once the clients leave every request is served.
fn idle_clients_beyond_the_limit(supervisor: &str, extra: &str) {
    let port = free_port();
    let config =
        proxied(port, extra).replace("[supervisor]\n", &format!("[supervisor]\n{supervisor}"));
    let d = Daemon::start_with_nofile(&config, Some((256, 256)));
    let pid = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    let clients: Vec<TcpStream> = (0..400)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connect client {i}: {e}"))
        })
        .collect();
    // zdt's proxy process (or zdt, proxying in-process) took as many of
    // them as it will.
    let proxy = proxy_child_of(d.pid());
    wait_for("zdt to hold 100 client connections", T, || {
        let n = open_fds(d.pid()) + proxy.map_or(0, open_fds);
        if n >= 100 {
            Ok(())
        } else {
            Err(format!("{n} fds open"))
        }
    });
    let out = ctl_within(&d, &["status"], Duration::from_secs(5))
        .expect("zdtctl status did not answer within 5 s with the proxy full");
    assert!(out.status.success(), "status: {out:?}");

    kill(pid, libc::SIGKILL);
    let respawned = wait_for("web:0 to run again with a new pid", T, || {
        let i = d.instance("web", 0);
        assert_ne!(i.state, Fatal, "worker went FATAL: {i:?}");
        match i.pid {
            Some(p) if p != pid && i.state == Running => Ok(i),
            _ => Err(format!("{i:?}")),
        }
    });
    assert!(respawned.error.is_none(), "{respawned:?}");

    drop(clients);
    wait_for("the proxy to serve again", T, || {
        match http_get(port, "/") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn idle_clients_beyond_the_fd_limit_leave_control_and_respawn_working() {
    // The proxy process holds the clients; zdt's control and spawning have
    // fds of their own.
    idle_clients_beyond_the_limit("", "");
}

#[test]
fn a_high_max_connections_still_leaves_fds_for_control_and_respawn() {
    // The cap does not protect here: the reserve below the fd limit does,
    // with the proxy in zdt's own process sharing its fds.
    idle_clients_beyond_the_limit("proxy_process = false\n", "max_connections = 100000");
}

/// A worker that dies while zdt has no fd left (its control socket holds
/// them all) cannot be spawned again at once: it is retried, not FATAL,
/// and runs once fds are free.
#[test]
fn a_spawn_out_of_fds_is_retried_until_fds_are_free() {
    let port = free_port();
    let d = Daemon::start_with_nofile(&proxied(port, ""), Some((128, 128)));
    let pid = d.wait_state("web", 0, Running, T).pid.expect("pid");
    let control = d.path("run/zdt.sock");
    // More than zdt can take: the rest wait in the control socket's backlog.
    let clients: Vec<UnixStream> = (0..160)
        .map(|i| {
            UnixStream::connect(&control)
                .unwrap_or_else(|e| panic!("connect control client {i}: {e}"))
        })
        .collect();
    wait_log(&d, "control socket accept failed");
    kill(pid, libc::SIGKILL);
    // Either way zdt says what happened to the respawn, on stderr.
    wait_for("the respawn to fail for lack of fds", T, || {
        let log = d.stderr();
        if log.contains("cannot start for lack of file descriptors")
            || log.contains("cannot start; FATAL")
        {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    drop(clients);
    let i = wait_for("web:0 to run again", Duration::from_secs(30), || {
        let i = d.instance("web", 0);
        assert_ne!(i.state, Fatal, "worker went FATAL: {i:?}");
        match i.pid {
            Some(p) if p != pid && i.state == Running => Ok(i),
            _ => Err(format!("{i:?}")),
        }
    });
    assert!(i.error.is_none(), "{i:?}");
    wait_for("the proxy to serve again", T, || {
        match http_get(port, "/") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// zdt started with soft 256 and hard 4096 runs with 4096; its workers get
/// 256, the limit zdt was started with.
#[test]
fn the_soft_open_files_limit_is_raised_to_the_hard_limit() {
    let port = free_port();
    let d = Daemon::start_with_nofile(&proxied(port, ""), Some((256, 4096)));
    let worker = d.wait_state("web", 0, Running, T).pid.expect("pid");
    assert_eq!(nofile_of(d.pid()), (4096, 4096), "zdt's limit");
    assert_eq!(nofile_of(worker), (256, 4096), "the worker's limit");
    assert!(
        d.stderr().contains("raised the open-files limit"),
        "not logged:\n{}",
        d.stderr()
    );
}

/// Reads one HTTP/1.1 response with a Content-Length: (status, body).
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A keep-alive client that has been served once.
fn served_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let (status, _) = read_response(&mut s).expect("response");
    assert_eq!(status, 200);
    s
}

/// At `max_connections` zdt stops accepting: a further client waits (it is
/// neither refused nor reset) and is served once an earlier one closes.
#[test]
fn max_connections_makes_accept_wait_not_fail() {
    max_connections_hold(false);
}

/// A reload replaces the program's proxy: connections opened before it still
/// count against the same limit.
#[test]
fn max_connections_counts_connections_from_before_a_reload() {
    max_connections_hold(true);
}

fn max_connections_hold(reload_between: bool) {
    let port = free_port();
    let d = Daemon::start(&proxied(port, "max_connections = 2"));
    d.wait_state("web", 0, Running, T);
    let first = served_client(port);
    let second = served_client(port);
    if reload_between {
        d.write_config(&proxied(
            port,
            "max_connections = 2\nenvironment = { ROUND = \"2\" }",
        ));
        let out = d.ctl(&["reload"]);
        assert!(out.status.success(), "{out:?}");
    }
    let mut third = TcpStream::connect(("127.0.0.1", port)).expect("connect the third");
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    // Not served while two are open: never, so a second shows it.
    third
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    match third.read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the third client was answered above max_connections: {other:?}"),
    }
    drop(first);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (status, _) = read_response(&mut third).expect("the third client's response");
    assert_eq!(status, 200);
    drop((second, third));
    wait_for("a new client to be served", T, || {
        match http_get(port, "/") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// zdt started under `ulimit -n 1024` (hard 16384, as systemd gives
/// services) raises its own limit and holds 5,000 keep-alive clients at
/// once in proxy mode, each served.
#[test]
fn under_ulimit_n_1024_zdt_serves_5000_concurrent_clients() {
    // The test opens the 5,000 client sockets itself.
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write to and read from `rl` only.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        if rl.rlim_cur < 6000 {
            rl.rlim_cur = rl.rlim_max.min(20_000);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
        }
    }
    let hard = rl.rlim_max.min(16_384);
    if rl.rlim_cur < 6000 || hard < 6000 {
        eprintln!(
            "SKIPPED: the test needs 6,000 fds and its hard limit is {}",
            rl.rlim_max
        );
        return;
    }
    let port = free_port();
    let d = Daemon::start_with_nofile(&proxied(port, ""), Some((1024, hard)));
    d.wait_state("web", 0, Running, T);
    assert_eq!(nofile_of(d.pid()), (hard, hard), "zdt's limit");
    let mut clients: Vec<TcpStream> = (0..5000).map(|_| served_client(port)).collect();
    // All 5,000 still open: every 500th is served again.
    for (i, c) in clients.iter_mut().enumerate().step_by(500) {
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("write");
        let (status, _) = read_response(c).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(status, 200, "client {i}");
    }
}

/// A worker whose memory stays above `max_memory` for `max_memory_for` is
/// replaced without a failed request; the other instance is left alone,
/// and the log gives the figure.
#[test]
fn a_worker_above_max_memory_is_replaced_with_zero_failed_requests() {
    let port = free_port();
    let d = Daemon::start(&proxied(
        port,
        "instances = 2\nmax_memory = \"64MB\"\nmax_memory_for = \"2s\"",
    ));
    let pids = [0, 1].map(|i| d.wait_state("web", i, Running, T).pid.expect("pid"));
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    let load = Load::start(port, 8, 2, &[0, 0, 20]);
    load.wait_progress("load before the growth");
    // The answer does not say which instance grew: the one restarted is it.
    let grew_at = std::time::Instant::now();
    let (code, body) = http_get(port, "/alloc?mb=100").expect("alloc");
    assert_eq!(code, 200, "{body}");
    let (replaced, kept) = wait_for("the grown worker to be replaced", T, || {
        let now = [0, 1].map(|i| d.instance("web", i));
        match (now[0].pid != Some(pids[0]), now[1].pid != Some(pids[1])) {
            (true, false) if now[0].state == Running => Ok((0usize, 1usize)),
            (false, true) if now[1].state == Running => Ok((1, 0)),
            _ => Err(format!("{now:?}")),
        }
    });
    assert!(
        grew_at.elapsed() >= Duration::from_secs(2),
        "replaced before max_memory_for"
    );
    wait_for("the grown worker to drain and exit", T, || {
        if alive(pids[replaced]) {
            Err(format!("pid {} alive", pids[replaced]))
        } else {
            Ok(())
        }
    });
    assert_eq!(d.instance("web", kept as u32).pid, Some(pids[kept]));
    load.wait_progress("load after the replacement");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let log = d.stderr();
    assert!(
        log.contains("stayed above max_memory (64 MiB) for 2s"),
        "{log}"
    );
}

/// `cron_restart` restarts the program on its schedule (here every 2 s,
/// with seconds) without a failed request.
#[test]
fn cron_restart_restarts_on_schedule_with_zero_failed_requests() {
    let port = free_port();
    let d = Daemon::start(&proxied(port, "cron_restart = \"*/2 * * * * *\""));
    let first = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    let load = Load::start(port, 8, 2, &[0, 0, 20]);
    load.wait_progress("load before the schedule");
    let restarted = wait_for("two scheduled restarts", T, || {
        let i = d.instance("web", 0);
        if i.restarts >= 2 && i.state == Running {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    assert_ne!(restarted.pid, Some(first));
    load.wait_progress("load after the restarts");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(report.generations.len() >= 2, "{:?}", report.generations);
    let log = d.stderr();
    assert!(log.contains("cron_restart: restarting"), "{log}");
}
