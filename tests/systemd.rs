//! zdt under systemd: sd_notify to its own service manager (READY=1 once
//! its programs are up, RELOADING=1/READY=1 around a reload, STOPPING=1,
//! WATCHDOG=1) and socket activation of zdt itself (LISTEN_FDS), with the
//! promise that a stop and start of zdt fails no connection while the
//! service manager keeps the socket open.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use zdt::state::InstanceState::*;

use crate::util::*;

const T: Duration = Duration::from_secs(20);

/// The test's end of NOTIFY_SOCKET: every datagram zdt sent, in order.
struct NotifyEnd {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    /// WATCHDOG=1 messages seen so far (they are not returned by `next`).
    watchdogs: usize,
}

impl NotifyEnd {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifyEnd {
            sock,
            path,
            _dir: dir,
            watchdogs: 0,
        }
    }

    /// The next message other than WATCHDOG=1, within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("timeout");
            let n = self.sock.recv(&mut buf).ok()?;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg == "WATCHDOG=1" {
                self.watchdogs += 1;
                continue;
            }
            return Some(msg);
        }
    }

    /// The next message, which must have `line` among its lines.
    fn expect(&mut self, line: &str, d: &Daemon) -> String {
        let msg = self.next(T).unwrap_or_else(|| {
            panic!(
                "no message with {line} within {T:?}; zdt stderr:\n{}",
                d.stderr()
            )
        });
        assert!(
            msg.lines().any(|l| l == line),
            "expected {line}, got {msg:?}"
        );
        msg
    }
}

fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    String::from_utf8_lossy(&raw)
        .split('\0')
        .map(String::from)
        .collect()
}

fn web(port: u16, args: &[&str], extra: &str) -> String {
    demo_program(
        "web",
        args,
        &format!("listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\n{extra}"),
    )
}

#[test]
fn zdt_notifies_ready_reloading_stopping_and_the_watchdog() {
    let port = free_port();
    let mut m = NotifyEnd::new();
    // The worker takes 700 ms to be ready: READY=1 must wait for it.
    let config = header()
        + &web(port, &["--start-delay", "700"], "")
        + "[program.idle]\ncommand = [\"sleep\", \"1000\"]\nstartsecs = \"0s\"\n";
    let notify_socket = m.path.display().to_string();
    let mut d = Daemon::start_with(
        &config,
        Manager::new(
            &[
                ("NOTIFY_SOCKET", &notify_socket),
                ("WATCHDOG_USEC", "200000"),
            ],
            None,
        ),
    );
    let ready = m.expect("READY=1", &d);
    // Read at once: had zdt sent READY=1 before the worker was up, web
    // would still be STARTING here.
    let web0 = d.instance("web", 0);
    assert_eq!(web0.state, Running, "READY=1 came before web was up");
    assert_eq!(d.instance("idle", 0).state, Running);
    assert!(
        ready.lines().any(|l| l == "STATUS=2 programs running"),
        "{ready:?}"
    );
    assert_eq!(http_get(port, "/").map(|r| r.0), Ok(200));

    // Workers see neither zdt's NOTIFY_SOCKET nor its watchdog.
    for pid in [web0.pid, d.instance("idle", 0).pid] {
        let env = environ(pid.expect("pid"));
        assert!(
            !env.iter()
                .any(|v| v.contains(&notify_socket) || v.starts_with("WATCHDOG_")),
            "a worker inherited zdt's variables: {env:?}"
        );
    }
    // web has a NOTIFY_SOCKET of its own (from zdt, for its readiness).
    assert!(environ(web0.pid.expect("pid"))
        .iter()
        .any(|v| v.starts_with("NOTIFY_SOCKET=@zdt-notify")));

    // A reload that changes web: RELOADING=1, then READY=1 once the new
    // generation serves.
    d.write_config(&config.replace("--start-delay\", \"700\"", "--start-delay\", \"300\""));
    let ctl = d.ctl_in_background(&["reload"]);
    let reloading = m.expect("RELOADING=1", &d);
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")
            && l["MONOTONIC_USEC=".len()..].parse::<u64>().is_ok()),
        "{reloading:?}"
    );
    m.expect("READY=1", &d);
    let now = d.instance("web", 0);
    assert_eq!(
        (now.generation, now.state),
        (web0.generation + 1, Running),
        "READY=1 came before the reload settled"
    );
    let out = ctl.join().expect("zdtctl");
    assert!(out.status.success(), "{out:?}");

    // The watchdog (every 100 ms) kept coming meanwhile.
    let seen = m.watchdogs;
    assert!(seen >= 5, "only {seen} WATCHDOG=1 so far");
    wait_for("more WATCHDOG=1", T, || {
        let _ = m.next(Duration::from_millis(50));
        if m.watchdogs >= seen + 3 {
            Ok(())
        } else {
            Err(format!("{} WATCHDOG=1", m.watchdogs))
        }
    });

    d.signal(libc::SIGTERM);
    m.expect("STOPPING=1", &d);
    assert!(d.wait_exit(T).success());
}

#[test]
fn zdt_without_a_manager_socket_keeps_running() {
    let port = free_port();
    // The socket is named but nobody listens there: zdt logs it once and
    // goes on serving.
    let mut d = Daemon::start_with(
        &(header() + &web(port, &[], "")),
        Manager::new(
            &[
                ("NOTIFY_SOCKET", "/nonexistent/notify"),
                ("WATCHDOG_USEC", "20000"),
            ],
            None,
        ),
    );
    d.wait_state("web", 0, Running, T);
    assert_eq!(http_get(port, "/").map(|r| r.0), Ok(200));
    wait_for("the failure to be logged", T, || {
        let e = d.stderr();
        e.contains("cannot notify the service manager")
            .then_some(())
            .ok_or(e)
    });
    // Many watchdog ticks later, still one line.
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        d.stderr()
            .matches("cannot notify the service manager")
            .count(),
        1
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(T).success());
}

/// Sends a GET on `s` and reads the whole answer: its status.
fn answer(mut s: TcpStream) -> Result<u16, String> {
    s.set_read_timeout(Some(T)).ok();
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad answer {text:?}"))
}

#[test]
fn a_stop_and_start_of_zdt_fails_no_connection_when_the_manager_holds_the_socket() {
    // The test plays systemd's socket unit: it owns the listening socket
    // and passes it to each zdt as fd 3.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut d = Daemon::start_with(
        &(header() + &web(port, &[], "")),
        Manager::new(
            &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "web")],
            Some(listener.as_raw_fd()),
        ),
    );
    d.wait_state("web", 0, Running, T);
    assert_eq!(http_get(port, "/").map(|r| r.0), Ok(200));
    assert!(
        d.stderr()
            .contains("using a listening socket passed by the service manager"),
        "{}",
        d.stderr()
    );
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let worker = d.instance("web", 0).pid.expect("pid");
        d.signal(sig);
        d.wait_exit(T);
        wait_for("the worker to be gone", T, || {
            if alive(worker) {
                Err(format!("{worker} alive"))
            } else {
                Ok(())
            }
        });
        // Nobody accepts now; the kernel queues these.
        let clients: Vec<TcpStream> = (0..8)
            .map(|_| {
                let mut s =
                    TcpStream::connect(("127.0.0.1", port)).expect("connect while zdt is stopped");
                write!(
                    s,
                    "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                .expect("send");
                s
            })
            .collect();
        d.start_again();
        for (i, c) in clients.into_iter().enumerate() {
            assert_eq!(
                answer(c),
                Ok(200),
                "queued connection {i} after signal {sig}"
            );
        }
    }
}

/// The inodes of the sockets `pid` has open.
fn socket_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| t.starts_with("socket:"))
        .collect()
}

#[test]
fn a_passed_socket_that_matches_nothing_is_closed_with_a_warning() {
    let stray = TcpListener::bind("127.0.0.1:0").expect("bind");
    let stray_addr = stray.local_addr().expect("addr");
    // "socket:[INODE]", the same in every process that holds it.
    let ino = std::fs::read_link(format!("/proc/self/fd/{}", stray.as_raw_fd()))
        .expect("link")
        .display()
        .to_string();
    let port = free_port();
    let mut d = Daemon::start_with(
        &(header() + &web(port, &[], "")),
        Manager::new(
            &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "stray")],
            Some(stray.as_raw_fd()),
        ),
    );
    // web's own address is bound by zdt as usual.
    d.wait_state("web", 0, Running, T);
    assert_eq!(http_get(port, "/").map(|r| r.0), Ok(200));
    let warning = format!("fd 3 (name stray) on tcp://{stray_addr}");
    assert!(d.stderr().contains(&warning), "{}", d.stderr());
    assert!(
        !socket_inodes(d.pid()).contains(&ino),
        "zdt kept the stray socket {ino}"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(T).success());
}

#[test]
fn a_passed_fd_that_is_not_a_listening_socket_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, header() + &web(free_port(), &[], "")).expect("config");
    let file = std::fs::File::create(dir.path().join("plain")).expect("file");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let unlistened = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("tcp socket");
    for (fd, why) in [
        (file.as_raw_fd(), "is not a socket"),
        (udp.as_raw_fd(), "is not a stream socket"),
        (unlistened.as_raw_fd(), "is not listening"),
    ] {
        let mut cmd = Manager::new(&[("LISTEN_FDS", "1")], Some(fd))
            .command(&["-c".as_ref(), config.as_os_str()]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let out = output_within(&mut cmd, T).expect("zdt exits at once");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("fd 3 passed in LISTEN_FDS {why}")),
            "{stderr}"
        );
    }
}

#[test]
fn a_program_that_cannot_start_does_not_hold_back_ready() {
    let port = free_port();
    let mut m = NotifyEnd::new();
    let notify_socket = m.path.display().to_string();
    let config = header()
        + &web(port, &[], "")
        + "[program.bad]\ncommand = [\"false\"]\nstartsecs = \"1s\"\nstartretries = 1\n";
    let d = Daemon::start_with(
        &config,
        Manager::new(&[("NOTIFY_SOCKET", &notify_socket)], None),
    );
    let ready = m.expect("READY=1", &d);
    assert_eq!(d.instance("web", 0).state, Running);
    assert!(
        matches!(d.instance("bad", 0).state, Backoff | Fatal),
        "{:?}",
        d.instance("bad", 0)
    );
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=1 program running; failed to start: bad (")),
        "{ready:?}"
    );
}
