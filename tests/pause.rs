//! Pause, resume and maintenance of proxy-mode programs: held requests
//! reach no worker until resume and then all succeed; a request held past
//! max-pause, or any during maintenance, gets 503 with Retry-After; both
//! survive restarts and reloads; pass-mode programs are refused.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use zdt::state::{now_ms, Hold, InstanceState::*, ProgramSnapshot};

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(20);

fn proxy_program(name: &str, port: u16, extra: &str) -> String {
    demo_program(
        name,
        &[],
        &format!("mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ http = \"/health\" }}\n{extra}"),
    )
}

/// zdt with one proxied demo program "web" on `port`, answering.
fn serving(port: u16, extra: &str) -> Daemon {
    let d = Daemon::start(&(header() + &proxy_program("web", port, extra)));
    d.wait_state("web", 0, Running, T);
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    d
}

fn program(d: &Daemon, name: &str) -> ProgramSnapshot {
    d.status()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no {name} in status"))
}

/// Waits until `n` requests are held by the pause of `name`.
fn wait_held(d: &Daemon, name: &str, n: u64) {
    wait_for(
        &format!("{n} requests held by {name}"),
        T,
        || match program(d, name).hold {
            Some(Hold::Paused { held, .. }) if held >= n => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

/// A keep-alive client connection to zdt.
struct Conn(TcpStream);

impl Conn {
    fn open(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        Conn(s)
    }

    /// One GET; the answer's head (lowercase) and body, and how long it took.
    fn get(&mut self, path: &str) -> (String, String, Duration) {
        let t0 = Instant::now();
        write!(self.0, "GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let head = head.to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .expect("content-length");
                if body.len() >= len {
                    return (head, body.to_string(), t0.elapsed());
                }
            }
            let n = self.0.read(&mut chunk).expect("read the answer");
            assert!(n > 0, "closed before a whole answer: {text:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// A 503 as every closed gate answers it.
fn assert_503(head: &str, body: &str) {
    assert_eq!(status_of(head), 503, "{head}\n\n{body}");
    assert!(head.contains("\r\nretry-after: "), "{head}");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/plain; charset=utf-8"),
        "{head}"
    );
}

#[test]
fn pause_holds_every_request_of_32_keep_alive_clients_until_resume_and_none_fails() {
    let port = free_port();
    let d = serving(port, "instances = 2\nmax_wait = \"10s\"");
    d.wait_state("web", 1, Running, T);
    // 32 keep-alive clients and 8 with a new connection per request;
    // handlers of 0, 20 and 200 ms, so requests are in flight at the pause.
    let load = Load::start(port, 32, 8, &[0, 0, 20, 200]);
    load.wait_progress("load before the pause");
    let asked = Instant::now();
    let out = d.ctl(&["pause", "web", "--max-pause", "30s"]);
    assert!(out.status.success(), "{out:?}");
    // From here no request is in flight, and none may reach a worker.
    let paused_at = now_ms();
    let took = asked.elapsed();
    let r = d.requests("web");
    assert_eq!(
        r.inflight, 0,
        "pause answered with requests in flight: {r:?}"
    );
    // Every client ends up with one request held inside zdt.
    wait_held(&d, "web", 40);
    let text = String::from_utf8_lossy(&d.ctl(&["status", "web"]).stdout).into_owned();
    assert!(text.contains("web: paused for"), "{text}");
    // Two seconds of pause: nothing is served, nothing refused, all held.
    let served = r.served;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let p = program(&d, "web");
        let r = p.requests.expect("counters");
        assert_eq!(
            (r.served, r.inflight, r.unavailable, r.failed),
            (served, 0, 0, 0),
            "a request got through or was refused during the pause"
        );
        assert!(
            matches!(p.hold, Some(Hold::Paused { held: 40, .. })),
            "{:?}",
            p.hold
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let resumed_at = now_ms();
    let out = d.ctl(&["resume", "web"]);
    assert!(out.status.success(), "{out:?}");
    load.wait_progress("load after the resume");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let through: Vec<u64> = report
        .reached_ms
        .iter()
        .copied()
        .filter(|&at| at > paused_at && at < resumed_at)
        .collect();
    assert!(
        through.is_empty(),
        "{} requests reached a worker during the pause ({paused_at}..{resumed_at}): {through:?}",
        through.len()
    );
    // The held ones were answered after the resume, not dropped.
    assert!(
        report
            .reached_ms
            .iter()
            .filter(|&&at| at >= resumed_at)
            .count()
            >= 40,
        "too few answers after the resume"
    );
    let r = d.requests("web");
    assert_eq!((r.failed, r.unavailable, r.inflight), (0, 0, 0), "{r:?}");
    assert_eq!(program(&d, "web").hold, None);
    // The pause waited for the 200 ms requests, not for max_wait.
    assert!(took < Duration::from_secs(5), "pause took {took:?}");
}

#[test]
fn a_request_held_past_max_pause_gets_503_with_retry_after() {
    let port = free_port();
    let d = serving(port, "");
    // A keep-alive connection from before the pause is held like a new one.
    let mut kept = Conn::open(port);
    assert_eq!(status_of(&kept.get("/").0), 200);
    let before = d.requests("web").unavailable;
    let out = d.ctl(&["pause", "web", "--max-pause", "1s"]);
    assert!(out.status.success(), "{out:?}");
    let fresh: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || Conn::open(port).get("/")))
        .collect();
    let (head, body, took) = kept.get("/");
    assert_503(&head, &body);
    assert!(body.contains("paused"), "{body}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "answered after {took:?}: held for max-pause?"
    );
    for t in fresh {
        let (head, body, took) = t.join().expect("join");
        assert_503(&head, &body);
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }
    let r = d.requests("web");
    assert_eq!((r.unavailable - before, r.failed), (4, 0), "{r:?}");
    assert!(
        matches!(
            program(&d, "web").hold,
            Some(Hold::Paused {
                held: 0,
                max_pause_ms: 1000,
                ..
            })
        ),
        "the pause ended by itself"
    );
    assert!(d.ctl(&["resume", "web"]).status.success());
    assert_eq!(status_of(&Conn::open(port).get("/").0), 200);
    // A --max-pause that is not a duration is a usage error.
    let out = d.ctl(&["pause", "web", "--max-pause", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(program(&d, "web").hold, None);
}

#[test]
fn maintenance_answers_503_with_its_message_across_a_reload_until_resume() {
    let port = free_port();
    let d = serving(port, "");
    let mut kept = Conn::open(port);
    assert_eq!(status_of(&kept.get("/").0), 200);
    let out = d.ctl(&["maintenance", "web", "--message", "Back at 14:00"]);
    assert!(out.status.success(), "{out:?}");
    // On a connection that was kept alive, and at once.
    let (head, body, took) = kept.get("/");
    assert_503(&head, &body);
    assert_eq!(body, "Back at 14:00");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (head, body, _) = Conn::open(port).get("/");
    assert_503(&head, &body);
    assert_eq!(body, "Back at 14:00");
    match program(&d, "web").hold {
        Some(Hold::Maintenance { message, .. }) => assert_eq!(message, "Back at 14:00"),
        other => panic!("status shows {other:?}"),
    }
    // A reload that restarts the program keeps the maintenance.
    d.write_config(&(header() + &proxy_program("web", port, "environment = { CHANGED = \"1\" }")));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("the new generation", T, || {
        let i = d.instance("web", 0);
        if i.generation >= 2 && i.state == Running {
            Ok(())
        } else {
            Err(format!("{i:?}"))
        }
    });
    let (head, body, _) = Conn::open(port).get("/");
    assert_503(&head, &body);
    assert_eq!(body, "Back at 14:00", "the reload ended the maintenance");
    assert!(d.ctl(&["resume", "web"]).status.success());
    let (head, body, _) = Conn::open(port).get("/");
    assert_eq!(status_of(&head), 200, "{body}");
    assert!(body.contains("\"generation\":2"), "{body}");
    // Without --message: a default text.
    assert!(d.ctl(&["maintenance", "web"]).status.success());
    let (head, body, _) = Conn::open(port).get("/");
    assert_503(&head, &body);
    assert!(body.contains("web is down for maintenance"), "{body}");
    assert!(d.ctl(&["resume", "web"]).status.success());
    assert_eq!(status_of(&Conn::open(port).get("/").0), 200);
}

#[test]
fn pause_and_maintenance_of_a_pass_mode_program_are_refused_with_exit_2() {
    let (pass_port, proxy_port) = (free_port(), free_port());
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "site",
                &[],
                &format!("listen = [\"tcp://127.0.0.1:{pass_port}\"]\nready = {{ notify = true }}"),
            )
            + &proxy_program("web", proxy_port, "")),
    );
    d.wait_state("site", 0, Running, T);
    d.wait_state("web", 0, Running, T);
    for args in [
        &["pause", "site"][..],
        &["maintenance", "site", "--message", "x"],
        &["resume", "site"],
    ] {
        let out = d.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            err.contains("needs mode = \"proxy\": in pass mode the app accepts connections itself"),
            "{args:?}: {err}"
        );
    }
    // `all` names a pass-mode program: refused whole, the hint names the others.
    let out = d.ctl(&["pause", "all"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zdtctl pause web"), "{err}");
    assert_eq!(program(&d, "web").hold, None, "pause all paused web");
    let (code, v) = d.ctl_json(&["pause", "site"]);
    assert_eq!(code, 2);
    assert_eq!(v["error"]["kind"], "bad_request", "{v}");
    // The pass-mode program serves on.
    assert_eq!(http_get(pass_port, "/").expect("served").0, 200);
    assert_eq!(http_get(proxy_port, "/").expect("served").0, 200);
}

#[test]
fn a_restart_while_paused_keeps_holding_and_resume_reaches_the_new_generation() {
    let port = free_port();
    let d = serving(port, "");
    assert!(d.ctl(&["pause", "web"]).status.success());
    let held = std::thread::spawn(move || Conn::open(port).get("/"));
    wait_held(&d, "web", 1);
    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}");
    let i = d.instance("web", 0);
    assert_eq!((i.generation, i.state), (2, Running), "{i:?}");
    // Still paused, still holding the request.
    assert!(
        matches!(program(&d, "web").hold, Some(Hold::Paused { held: 1, .. })),
        "{:?}",
        program(&d, "web").hold
    );
    assert!(!held.is_finished(), "the held request was answered");
    assert!(d.ctl(&["resume", "web"]).status.success());
    let (head, body, _) = held.join().expect("join");
    assert_eq!(status_of(&head), 200, "{body}");
    assert!(body.contains("\"generation\":2"), "{body}");
    let r = d.requests("web");
    assert_eq!((r.failed, r.unavailable), (0, 0), "{r:?}");
}

#[test]
fn a_paused_tcp_program_holds_new_connections_before_connecting_upstream() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "raw",
                &[],
                &format!(
                    "mode = \"proxy\"\nprotocol = \"tcp\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ tcp = true }}"
                ),
            )),
    );
    d.wait_state("raw", 0, Running, T);
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    let served = d.requests("raw").served;
    assert!(d.ctl(&["pause", "raw"]).status.success());
    let held = std::thread::spawn(move || Conn::open(port).get("/"));
    wait_held(&d, "raw", 1);
    let r = d.requests("raw");
    assert_eq!((r.inflight, r.served), (0, served), "{r:?}");
    assert!(d.ctl(&["resume", "raw"]).status.success());
    let (head, body, _) = held.join().expect("join");
    assert_eq!(status_of(&head), 200, "{body}");
    // Past max-pause a held connection is closed (TCP has no 503).
    assert!(d
        .ctl(&["pause", "raw", "--max-pause", "1s"])
        .status
        .success());
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let t0 = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert!(d.requests("raw").unavailable >= 1);
    assert!(d.ctl(&["resume", "raw"]).status.success());
    assert_eq!(http_get(port, "/").expect("served").0, 200);
}

/// A request that waits for a ready instance when the pause begins is held
/// once one is ready, not forwarded: the pause answered at zero in flight,
/// so it must not be overtaken.
#[test]
fn a_request_waiting_for_an_instance_when_the_pause_begins_is_held_once_one_is_ready() {
    let port = free_port();
    let d = serving(port, "queue_timeout = \"15s\"");
    assert!(d.ctl(&["stop", "web"]).status.success());
    let waiting = std::thread::spawn(move || Conn::open(port).get("/"));
    // It waits for an instance (queue_timeout), in no instance's count.
    wait_for("the client to connect", T, || {
        if connections_to(port) > 0 {
            Ok(())
        } else {
            Err("no connection".into())
        }
    });
    let out = d.ctl(&["pause", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert!(d.ctl(&["start", "web"]).status.success());
    // The instance is ready and routed to; the request goes back to the gate.
    wait_held(&d, "web", 1);
    let r = d.requests("web");
    assert_eq!(r.inflight, 0, "{r:?}");
    assert!(!waiting.is_finished(), "answered during the pause");
    assert!(d.ctl(&["resume", "web"]).status.success());
    let (head, body, _) = waiting.join().expect("join");
    assert_eq!(status_of(&head), 200, "{body}");
    assert!(body.contains("\"generation\":2"), "{body}");
}
