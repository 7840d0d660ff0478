//! Proxy mode: zdt accepts, routes each request to a ready instance's private
//! port, drains the old generation by its in-flight count, and answers 503
//! when nothing can serve.

use std::time::{Duration, Instant};

use zdt::state::InstanceState::*;

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(20);

fn proxy_program(name: &str, port: u16, args: &[&str], extra: &str) -> String {
    demo_program(
        name,
        args,
        &format!("mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ http = \"/health\" }}\n{extra}"),
    )
}

/// zdt with one proxied demo program, "web" on `port`, running and
/// answering through the proxy; returns the daemon and the worker's pid.
fn serving(port: u16, args: &[&str], extra: &str) -> (Daemon, u32) {
    let d = Daemon::start(&(header() + &proxy_program("web", port, args, extra)));
    let pid = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    (d, pid)
}

/// Restarts `program` `restarts` times under 64 clients (32 keep-alive, 32
/// with a new connection per request; handlers of 0, 20 and 200 ms) and
/// asserts that not one request failed and every generation served.
fn restart_under_load(d: &Daemon, program: &str, port: u16, restarts: usize) {
    restart_under(
        d,
        program,
        port,
        restarts,
        Load::start(port, 32, 32, &[0, 0, 20, 200]),
    );
}

fn restart_under(d: &Daemon, program: &str, port: u16, restarts: usize, load: Load) {
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    let wait_load = |what: &str| load.wait_progress(what);
    for i in 0..restarts {
        wait_load("load between restarts");
        let out = d.ctl(&["restart", program]);
        assert!(out.status.success(), "restart {i}: {out:?}");
    }
    wait_load("load after the last restart");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(
        report.generations.len() > restarts,
        "generations seen: {:?}",
        report.generations
    );
    let r = d.requests(program);
    assert_eq!((r.failed, r.unavailable), (0, 0), "{r:?}");
}

#[test]
fn proxy_restart_under_load_fails_zero_requests() {
    let port = free_port();
    let d = Daemon::start(&(header() + &proxy_program("web", port, &[], "instances = 2")));
    d.wait_state("web", 0, Running, T);
    d.wait_state("web", 1, Running, T);
    restart_under_load(&d, "web", port, 20);
    // Each restart counted once.
    assert_eq!(d.instance("web", 0).restarts, 20);
    // The workers listen on private ports, not on the public one.
    let pid = d.instance("web", 0).pid.expect("pid");
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let env = String::from_utf8_lossy(&env);
    let private: Vec<&str> = env.split('\0').filter(|v| v.starts_with("PORT=")).collect();
    assert_eq!(private.len(), 1);
    assert_ne!(private[0], format!("PORT={port}"));
}

#[test]
fn php_builtin_server_restarts_under_load_fail_zero_requests() {
    let php = std::process::Command::new("php").arg("-v").output();
    assert!(
        php.is_ok_and(|o| o.status.success()),
        "this test needs php-cli (apt-get install php-cli); .ci/run installs it"
    );
    let app = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/php/app.php");
    let port = free_port();
    let d = Daemon::start(&format!(
        "{}[program.php]\ncommand = [\"php\", \"-S\", \"127.0.0.1:{{port}}\", {:?}]\n\
         environment = {{ PHP_CLI_SERVER_WORKERS = \"4\" }}\nmode = \"proxy\"\n\
         listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ http = \"/health\" }}\ninstances = 2\n\
         # Longer than the wait below: only the group's stop signal ends the workers in time.\n\
         kill_timeout = \"30s\"\n",
        header(),
        app.display().to_string()
    ));
    let first: Vec<u32> = [0, 1]
        .map(|i| d.wait_state("php", i, Running, T).pid.expect("pid"))
        .to_vec();
    restart_under_load(&d, "php", port, 20);
    // php -S forks its PHP_CLI_SERVER_WORKERS; zdt signals the whole process
    // group, so no worker outlives its generation.
    for leader in first {
        wait_for("the first generation's php workers to be gone", T, || {
            // SAFETY: kill(2) with signal 0 only checks the process group.
            if unsafe { libc::kill(-(leader as i32), 0) } == 0 {
                Err(format!("process group {leader} still has processes"))
            } else {
                Ok(())
            }
        });
    }
}

#[test]
fn a_long_request_finishes_on_the_old_generation_while_new_ones_go_to_the_new() {
    let port = free_port();
    let (d, old) = serving(port, &[], "max_wait = \"10s\"");
    let long = std::thread::spawn(move || http_get(port, "/?sleep=5000"));
    d.wait_inflight("web", 1, T);
    let t0 = Instant::now();
    let restart = d.ctl_in_background(&["restart", "web"]);
    // New requests are answered by the new generation while the old one drains.
    let new_pid = wait_for("a request answered by the new generation", T, || {
        let (_, body) = http_get(port, "/")?;
        if body.contains(&format!("\"pid\":{old}")) {
            Err(body)
        } else {
            Ok(body)
        }
    });
    assert!(new_pid.contains("\"generation\":2"), "{new_pid}");
    assert!(
        alive(old),
        "old generation stopped while its request was in flight"
    );
    let (code, body) = long.join().expect("join").expect("long request");
    assert_eq!(code, 200);
    assert!(body.contains(&format!("\"pid\":{old}")), "{body}");
    let out = restart.join().expect("join");
    assert!(out.status.success(), "{out:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(4000),
        "restart returned before the old request ended"
    );
    assert!(!alive(old));
}

#[test]
fn requests_get_503_when_no_instance_can_serve() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &proxy_program(
                "web",
                port,
                &[],
                "queue_timeout = \"300ms\"\nautostart = false",
            )),
    );
    let t0 = Instant::now();
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).ok();
    use std::io::{Read, Write};
    let mut s = s;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(
        lower.contains("retry-after: 1") && lower.contains("connection: close"),
        "{resp}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "no queue_timeout wait"
    );
    // Started later, the same connection pattern is served.
    assert!(d.ctl(&["start", "web"]).status.success());
    let (code, _) = http_get(port, "/").expect("served");
    assert_eq!(code, 200);
}

#[test]
fn stop_lets_requests_in_flight_finish_and_answers_new_ones_503() {
    let port = free_port();
    // The worker ignores SIGTERM and is SIGKILLed 300 ms after it: only a
    // drain by the in-flight count lets the 1.5 s request finish.
    let (d, pid) = serving(
        port,
        &["--ignore-term"],
        "queue_timeout = \"200ms\"\nmax_wait = \"10s\"\nkill_timeout = \"300ms\"",
    );
    let long = std::thread::spawn(move || http_get(port, "/?sleep=1500"));
    d.wait_inflight("web", 1, T);
    let stop = d.ctl_in_background(&["stop", "web"]);
    let (code, _) = wait_for("new requests to be refused with 503", T, || {
        let r = http_get(port, "/")?;
        if r.0 == 503 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(code, 503);
    assert!(alive(pid), "stopped while a request was in flight");
    let (code, body) = long.join().expect("join").expect("long request");
    assert_eq!(code, 200, "{body}");
    let out = stop.join().expect("join");
    assert!(out.status.success(), "{out:?}");
    assert!(!alive(pid));
}

#[test]
fn drain_answers_new_requests_503_at_once_while_in_flight_ones_finish() {
    let port = free_port();
    let (d, _) = serving(port, &[], "queue_timeout = \"5s\"");
    let long = std::thread::spawn(move || http_get(port, "/?sleep=1500"));
    d.wait_inflight("web", 1, T);
    let out = d.ctl(&["drain", "web"]);
    assert!(out.status.success(), "{out:?}");
    let t0 = Instant::now();
    let (code, _) = http_get(port, "/").expect("answered");
    assert_eq!(code, 503);
    // At once: not after queue_timeout.
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "503 took {:?}",
        t0.elapsed()
    );
    let (code, _) = long.join().expect("join").expect("long");
    assert_eq!(code, 200, "the request in flight was cut");
    let r = d.requests("web");
    assert!(r.unavailable >= 1 && r.failed == 0, "{r:?}");
    assert!(d.ctl(&["undrain", "web"]).status.success());
    assert_eq!(http_get(port, "/").expect("served").0, 200);
    // An unknown program is an error.
    let out = d.ctl(&["drain", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_drain_stays_in_force_across_a_reload() {
    let port = free_port();
    let (d, _) = serving(port, &[], "");
    assert!(d.ctl(&["drain", "web"]).status.success());
    assert_eq!(http_get(port, "/").expect("answered").0, 503);
    // A changed program is replaced on the same sockets by the reload.
    d.write_config(
        &(header() + &proxy_program("web", port, &[], "environment = { CHANGED = \"1\" }")),
    );
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
    assert_eq!(
        http_get(port, "/").expect("answered").0,
        503,
        "the reload ended the drain"
    );
    assert!(d.ctl(&["undrain", "web"]).status.success());
    assert_eq!(http_get(port, "/").expect("served").0, 200);
}

/// Reloads that change the program replace its generation on the same
/// sockets; keep-alive clients connected before a reload must follow the live
/// routes to the new generation (they stayed on the old one's frozen table and
/// got 502 once it exited).
#[test]
fn reloads_that_change_a_proxied_program_fail_zero_requests() {
    let port = free_port();
    let (d, _) = serving(port, &[], "");
    let load = Load::start(port, 16, 4, &[0, 0, 20]);
    let wait_load = |what: &str| load.wait_progress(what);
    for i in 0..3 {
        wait_load("load before the reload");
        d.write_config(
            &(header()
                + &proxy_program(
                    "web",
                    port,
                    &[],
                    &format!("environment = {{ ROUND = \"{i}\" }}"),
                )),
        );
        let out = d.ctl(&["reload"]);
        assert!(out.status.success(), "reload {i}: {out:?}");
        wait_for("the reload's generation to serve alone", T, || {
            let s = d.status();
            let insts = &s[0].instances;
            if insts.len() == 1 && insts[0].generation == i + 2 && insts[0].state == Running {
                Ok(())
            } else {
                Err(format!("{insts:?}"))
            }
        });
    }
    wait_load("load after the last reload");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(report.generations.len() >= 4, "{:?}", report.generations);
    let r = d.requests("web");
    assert_eq!((r.failed, r.unavailable), (0, 0), "{r:?}");
}

/// Renaming a program that keeps its listen address is a change, not a
/// removal and an addition: its clients keep being served (they got 503
/// from the removed program's drain).
#[test]
fn renaming_a_proxied_program_on_the_same_address_fails_zero_requests() {
    let port = free_port();
    let (d, _) = serving(port, &[], "");
    let load = Load::start(port, 16, 4, &[0, 0, 20]);
    load.wait_progress("load before the rename");
    d.write_config(&(header() + &proxy_program("site", port, &[], "")));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("renamed site"), "{text}");
    wait_for("site alone, running", T, || {
        let s = d.status();
        match s.as_slice() {
            [p] if p.name == "site"
                && p.instances.len() == 1
                && p.instances[0].state == Running
                && p.instances[0].generation == 2 =>
            {
                Ok(())
            }
            _ => Err(format!("{s:?}")),
        }
    });
    load.wait_progress("load after the rename");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let r = d.requests("site");
    assert_eq!((r.failed, r.unavailable), (0, 0), "{r:?}");
}

#[test]
fn a_request_held_past_max_wait_is_cut_answered_502_and_counted() {
    let port = free_port();
    let (d, old) = serving(
        port,
        &["--ignore-term"],
        "max_wait = \"1s\"\nkill_timeout = \"300ms\"",
    );
    let long = std::thread::spawn(move || http_get(port, "/slow?sleep=60000"));
    d.wait_inflight("web", 1, T);
    let t0 = Instant::now();
    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "warning: web:0: gen 1 did not finish its requests within max_wait (1s): 1 request(s) in flight were cut"
        ),
        "{out:?}"
    );
    let (code, body) = long.join().expect("join").expect("long request");
    assert_eq!(code, 502, "{body}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(15),
        "cut after {waited:?}, not at max_wait + kill_timeout"
    );
    assert!(
        !alive(old),
        "the worker that ignored SIGTERM is still alive"
    );
    let r = d.requests("web");
    assert_eq!((r.failed, r.cut, r.inflight), (1, 1, 0), "{r:?}");
    // The new generation serves, and its row counts what it served.
    assert_eq!(http_get(port, "/").expect("served").0, 200);
    let row = d.instance("web", 0);
    assert_eq!(row.generation, 2);
    let counts = row.requests.expect("per-instance counters");
    assert!(counts.served >= 1 && counts.cut == 0, "{counts:?}");
    // The cut is logged with its path, and status prints the counters.
    let log = d.stderr();
    assert!(
        log.contains("request cut") && log.contains("/slow?sleep=60000"),
        "{log}"
    );
    let text = String::from_utf8_lossy(&d.ctl(&["status"]).stdout).to_string();
    assert!(
        text.contains("INFLIGHT") && text.contains("1 cut at max_wait"),
        "{text}"
    );
}

/// Sends `request` as is and returns what zdt answers until it closes the
/// connection (or 10 s passed).
fn raw_exchange(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // zdt may answer and close before reading everything: ignore write errors.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn bad_requests_are_answered_by_zdt_and_never_forwarded() {
    let port = free_port();
    let (d, _) = serving(port, &[], "max_header_bytes = \"8KB\"");
    let served = d.requests("web").served;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let answer = raw_exchange(port, big.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    refused_400(
        &d,
        port,
        &[
        // Two different lengths: which one frames the body is ambiguous.
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x1\r\n\r\nab",
        // A transfer coding that does not end in chunked cannot be framed.
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nab",
        // Both a length and chunked, in either order: which one frames the
        // body is ambiguous (request smuggling).
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        // HTTP/1.0 has no chunked coding.
        "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost a\r\n\r\n",
        ],
    );
    assert_eq!(
        d.requests("web").served,
        served,
        "the oversized head reached the worker"
    );
    assert_eq!(http_get(port, "/").expect("served").0, 200);
}

/// Each of `bad` gets zdt's 400 and none reaches the worker.
fn refused_400(d: &Daemon, port: u16, bad: &[&str]) {
    let served = d.requests("web").served;
    for bad in bad {
        let answer = raw_exchange(port, bad.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad:?} -> {answer:?}");
    }
    assert_eq!(
        d.requests("web").served,
        served,
        "a bad request reached the worker"
    );
}

#[test]
fn ambiguous_framing_is_refused_on_both_paths_and_never_forwarded() {
    let port = free_port();
    let (d, _) = serving(port, &[], "");
    let served = d.requests("web").served;
    refused_400(
        &d,
        port,
        &[
        // Only exactly "chunked" frames a body; hyper read these as chunked.
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Two Hosts, or none in HTTP/1.1 (RFC 9112 3.2).
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        // Both lengths in a head of bare-LF lines.
        "POST / HTTP/1.1\nHost: a\nContent-Length: 6\nTransfer-Encoding: chunked\n\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        // A length past what hyper takes: 400, not 431.
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n",
        ],
    );
    // Both lengths after an Upgrade request answered without 101 (the hyper
    // path follows the connection on), pipelined or not.
    let upgrade = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n";
    let smuggle = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let answer = raw_exchange(port, format!("{upgrade}{smuggle}").as_bytes());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let second = answer.find("HTTP/1.1 400").map(|i| &answer[i..]);
    assert!(
        second.is_some() && !answer.contains("smuggled"),
        "{answer:?}"
    );
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(upgrade.as_bytes()).expect("write");
        let first = read_until(&mut s, "}");
        assert!(first.starts_with("HTTP/1.1 200"), "{first:?}");
        s.write_all(smuggle.as_bytes()).expect("write");
        let answer = read_all(&mut s);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    }
    assert_eq!(
        d.requests("web").served,
        served + 2,
        "a bad request reached the worker"
    );
    // A request line over 8 KB: 414 at once, the rest never sent.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(format!("GET /{}", "a".repeat(60 * 1024)).as_bytes())
            .expect("write");
        let answer = read_all(&mut s);
        assert!(answer.starts_with("HTTP/1.1 414"), "{answer:?}");
    }
}

#[test]
fn heads_with_150_headers_are_relayed_both_ways_on_both_paths() {
    let port = free_port();
    let d = serving_raw_worker(port);
    // What nginx takes: 150 request headers (hyper's limit is 100).
    let many: String = (0..150).map(|i| format!("X-{i}: {i}\r\n")).collect();
    for version in ["1.1", "1.0"] {
        let answer = raw_exchange(
            port,
            format!("GET /echo HTTP/{version}\r\nHost: a\r\nConnection: close\r\n{many}\r\n")
                .as_bytes(),
        );
        assert!(
            answer.starts_with(&format!("HTTP/{version} 200")),
            "{answer:?}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("x-149: 149"),
            "{answer:?}"
        );
    }
    // And answers with 150 headers.
    for version in ["1.1", "1.0"] {
        let answer = raw_exchange(
            port,
            format!("GET /many HTTP/{version}\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(
            answer.starts_with(&format!("HTTP/{version} 200")),
            "{answer:?}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("x-149: 149") && answer.ends_with("many"),
            "{answer:?}"
        );
    }
    assert_eq!(d.requests("raw").failed, 0);
}

#[test]
fn a_slowloris_client_is_closed_at_the_header_timeout_while_others_are_served() {
    use std::io::{Read, Write};
    let port = free_port();
    let (_d, _) = serving(port, &[], "header_timeout = \"1s\"");
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    slow.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let t0 = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .expect("write");
    let mut served_meanwhile = 0;
    let closed_after = loop {
        assert!(t0.elapsed() < T, "the slow client was never closed");
        // One header byte at a time, as a slowloris client does.
        if slow.write_all(b"X").is_err() {
            break t0.elapsed();
        }
        let mut buf = [0u8; 256];
        match slow.read(&mut buf) {
            Ok(0) => break t0.elapsed(),
            Ok(_) => panic!("answered a request whose header never ended"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break t0.elapsed(),
        }
        if http_get(port, "/").map(|r| r.0) == Ok(200) {
            served_meanwhile += 1;
        }
    };
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed after {closed_after:?}, before header_timeout"
    );
    assert!(served_meanwhile >= 3, "others were not served meanwhile");
    // An idle keep-alive connection is closed by the same timer.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    idle.set_read_timeout(Some(T)).expect("timeout");
    let t1 = Instant::now();
    let mut out = Vec::new();
    let _ = idle.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        t1.elapsed() >= Duration::from_millis(900) && t1.elapsed() < Duration::from_secs(10),
        "idle keep-alive connection closed after {:?}",
        t1.elapsed()
    );
}

/// Reads from `s` until what was read contains `needle`; returns all of it.
fn read_until(s: &mut std::net::TcpStream, needle: &str) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match s.read(&mut buf) {
            Ok(0) => panic!(
                "closed before {needle:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading for {needle:?}: {e}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).to_string()
}

#[test]
fn an_upgrade_tunnel_survives_a_restart_until_max_wait() {
    use std::io::{Read, Write};
    let port = free_port();
    let (d, old) = serving(port, &[], "max_wait = \"2s\"\nkill_timeout = \"500ms\"");
    let mut ws = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    ws.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        .expect("write");
    let hello = read_until(&mut ws, &format!("pid {old}\n"));
    assert!(hello.starts_with("HTTP/1.1 101"), "{hello}");
    ws.write_all(b"before\n").expect("write");
    read_until(&mut ws, "before\n");
    d.wait_inflight("web", 1, T);
    let t0 = Instant::now();
    let restart = d.ctl_in_background(&["restart", "web"]);
    wait_for("a request answered by the new generation", T, || {
        let (_, body) = http_get(port, "/")?;
        if body.contains("\"generation\":2") {
            Ok(())
        } else {
            Err(body)
        }
    });
    // The tunnel still reaches the old generation after the switch.
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "switch took {:?}",
        t0.elapsed()
    );
    ws.write_all(b"after\n").expect("write");
    read_until(&mut ws, "after\n");
    // At max_wait the old generation is stopped and the tunnel ends.
    ws.set_read_timeout(Some(T)).expect("timeout");
    let mut rest = Vec::new();
    let _ = ws.read_to_end(&mut rest);
    let closed = t0.elapsed();
    assert!(
        closed >= Duration::from_millis(1900) && closed < Duration::from_secs(10),
        "tunnel closed after {closed:?}; max_wait is 2s"
    );
    let out = restart.join().expect("join");
    assert!(out.status.success(), "{out:?}");
    assert!(!alive(old));
    let r = d.requests("web");
    assert_eq!((r.cut, r.inflight), (1, 0), "{r:?}");
}

#[test]
fn tcp_proxy_moves_new_connections_and_drains_open_ones() {
    use std::io::Write;
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "raw",
                &[],
                &format!(
                    "mode = \"proxy\"\nprotocol = \"tcp\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                     ready = {{ tcp = true }}\ninstances = 2\nmax_wait = \"20s\""
                ),
            )),
    );
    d.wait_state("raw", 0, Running, T);
    d.wait_state("raw", 1, Running, T);
    // New connections under restarts: none fails.
    restart_under(&d, "raw", port, 5, Load::start(port, 0, 64, &[0, 20, 200]));
    // An open connection stays with its generation across a restart, and the
    // old generation is stopped once it closes, not at max_wait.
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let first = read_until(&mut conn, "}");
    let pid = first
        .split("\"pid\":")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse::<u32>().ok())
        .expect("pid in the answer");
    d.wait_inflight("raw", 1, T);
    let restart = d.ctl_in_background(&["restart", "raw"]);
    wait_for("new connections to reach the new generation", T, || {
        let (_, body) = http_get(port, "/")?;
        if body.contains("\"generation\":7") {
            Ok(())
        } else {
            Err(body)
        }
    });
    conn.write_all(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let again = read_until(&mut conn, "/again");
    assert!(again.contains(&format!("\"pid\":{pid}")), "{again}");
    assert!(
        alive(pid),
        "the old generation stopped with a connection open"
    );
    let closed = Instant::now();
    drop(conn);
    let out = restart.join().expect("join");
    assert!(out.status.success(), "{out:?}");
    assert!(
        closed.elapsed() < Duration::from_secs(10),
        "the old generation waited {:?} after its last connection closed",
        closed.elapsed()
    );
    let r = d.requests("raw");
    assert_eq!((r.failed, r.cut, r.inflight), (0, 0, 0), "{r:?}");
}

/// zdt's peak resident memory so far, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Downloads `size` bytes (`GET /?bytes=`) and uploads as many
/// (`Content-Length`) through the proxy at `port`, checking both arrive whole.
fn download_and_upload(port: u16, size: u64) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        s,
        "GET /?bytes={size} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) => panic!("download broke off after {got} bytes: {e}"),
        }
    }
    // The body and the response head and chunk framing around it.
    assert!(got > size, "downloaded {got} bytes");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let chunk = vec![b'u'; 256 * 1024];
    for _ in 0..size / chunk.len() as u64 {
        s.write_all(&chunk).expect("upload");
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(&format!("\"received\":{size}")), "{answer}");
}

#[test]
fn a_1_gib_upload_and_download_stream_through_in_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let port = free_port();
    let d = Daemon::start(&(header() + &proxy_program("web", port, &[], "")));
    d.wait_state("web", 0, Running, T);
    for _ in 0..20 {
        wait_for("the proxy to answer", T, || http_get(port, "/"));
    }
    let before = peak_rss_kib(d.pid());

    download_and_upload(port, GIB);

    let after = peak_rss_kib(d.pid());
    eprintln!("zdt peak RSS: {before} KiB before, {after} KiB after 2 GiB streamed");
    assert!(
        after.saturating_sub(before) < 8 * 1024,
        "zdt's peak RSS grew from {before} KiB to {after} KiB"
    );
}

#[test]
fn a_request_with_a_body_goes_to_another_instance_when_one_refuses_connections() {
    let port = free_port();
    let d = Daemon::start(
        &(header() + &proxy_program("web", port, &["--close-on-usr1"], "instances = 2")),
    );
    d.wait_state("web", 0, Running, T);
    let good = d.wait_state("web", 1, Running, T).pid.expect("pid");
    // Before any request: instance 0 has no pooled connection, so every
    // request routed to it meets a refused connect.
    assert!(d.ctl(&["signal", "web:0", "USR1"]).status.success());
    wait_for("instance 0 to refuse connections", T, || {
        let private = std::fs::read(format!(
            "/proc/{}/environ",
            d.instance("web", 0).pid.expect("pid")
        ))
        .map_err(|e| e.to_string())?;
        let private = String::from_utf8_lossy(&private);
        let port: u16 = private
            .split('\0')
            .find_map(|v| v.strip_prefix("PORT="))
            .and_then(|p| p.parse().ok())
            .ok_or("no PORT")?;
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting".to_string()),
        }
    });
    for i in 0..10 {
        let answer = raw_exchange(
            port,
            format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbody{i}")
                .as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
        assert!(answer.contains("\"received\":5"), "{answer}");
        assert!(answer.contains(&format!("\"pid\":{good}")), "{answer}");
    }
    let r = d.requests("web");
    assert_eq!((r.served, r.failed), (10, 0), "{r:?}");
    assert!(d
        .stderr()
        .contains("connect failed; trying another instance"));
}

fn private_port(pid: u32) -> u16 {
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    String::from_utf8_lossy(&env)
        .split('\0')
        .find_map(|v| v.strip_prefix("PORT="))
        .and_then(|p| p.parse().ok())
        .expect("PORT in the worker's environment")
}

#[test]
fn idle_upstream_connections_to_the_old_generation_close_at_the_switch() {
    let port = free_port();
    // The old worker ignores SIGTERM and may live 30 s more: only zdt closing
    // its pooled connections at the switch ends them before that.
    let d = Daemon::start(
        &(header() + &proxy_program("web", port, &["--ignore-term"], "kill_timeout = \"30s\"")),
    );
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    let old_port = private_port(old);
    let clients: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || http_get(port, "/?sleep=300")))
        .collect();
    for c in clients {
        assert_eq!(c.join().expect("join").expect("request").0, 200);
    }
    let pooled = connections_to(old_port);
    assert!(pooled >= 2, "{pooled} pooled connections to the worker");
    let restart = d.ctl_in_background(&["restart", "web"]);
    wait_for(
        "zdt to close its idle connections to the old generation",
        Duration::from_secs(10),
        || match connections_to(old_port) {
            0 => Ok(()),
            n => Err(format!("{n} still open")),
        },
    );
    assert!(
        alive(old),
        "the old worker is gone: the test proves nothing"
    );
    assert_eq!(http_get(port, "/").expect("served").0, 200);
    // The restart is still waiting for the old worker; the fixture ends both.
    drop(restart);
}

#[test]
fn idle_upstream_connections_close_after_upstream_idle_timeout() {
    let port = free_port();
    let (_d, pid) = serving(port, &[], "upstream_idle_timeout = \"1s\"");
    let private = private_port(pid);
    // A burst on both paths: HTTP/1.1 (zdt's relay) and HTTP/1.0 (hyper's
    // client pool); each request holds its upstream connection for 300 ms,
    // so the burst needs several.
    let clients: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    http_get(port, "/?sleep=300").map(|r| r.0)
                } else {
                    let a = raw_exchange(port, b"GET /?sleep=300 HTTP/1.0\r\nHost: a\r\n\r\n");
                    Ok(if a.starts_with("HTTP/1.0 200") {
                        200
                    } else {
                        0
                    })
                }
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().expect("join"), Ok(200));
    }
    let pooled = connections_to(private);
    assert!(pooled >= 4, "{pooled} pooled connections to the worker");
    // Closed by zdt after the idle timeout (the worker keeps them forever).
    wait_for(
        "zdt to close its idle upstream connections",
        Duration::from_secs(10),
        || match connections_to(private) {
            0 => Ok(()),
            n => Err(format!("{n} still open")),
        },
    );
    assert_eq!(http_get(port, "/").expect("served").0, 200);
}

/// Writes `head` on a new connection, waits until zdt has the request in
/// flight, writes `rest` (if any) and returns the connection.
fn in_flight(d: &Daemon, port: u16, head: &[u8], rest: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let inflight = d.requests("web").inflight;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    s.write_all(head).expect("write");
    d.wait_inflight("web", inflight + 1, T);
    if !rest.is_empty() {
        s.write_all(rest).expect("write");
    }
    s
}

fn read_all(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

#[test]
fn a_worker_that_never_answers_gets_504_after_response_timeout() {
    let port = free_port();
    let (d, _) = serving(port, &[], "response_timeout = \"1s\"");
    let before = d.requests("web");
    // The relay path, the request whole at once.
    let t0 = Instant::now();
    let a = raw_exchange(
        port,
        b"GET /?sleep=60000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(a.starts_with("HTTP/1.1 504"), "{a:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    // The relay path, the body still coming when the request went out: the
    // timeout runs from its last byte.
    let mut s = in_flight(
        &d,
        port,
        b"POST /?sleep=60000 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab",
        b"cd",
    );
    let a = read_all(&mut s);
    assert!(a.starts_with("HTTP/1.1 504"), "{a:?}");
    // The hyper path (HTTP/1.0).
    let a = raw_exchange(port, b"GET /?sleep=60000 HTTP/1.0\r\nHost: a\r\n\r\n");
    assert!(a.starts_with("HTTP/1.0 504"), "{a:?}");
    let after = d.requests("web");
    assert_eq!(
        (after.failed, after.served, after.inflight),
        (before.failed + 3, before.served, 0),
        "{after:?}"
    );
    assert_eq!(http_get(port, "/").expect("served").0, 200);
}

#[test]
fn a_client_that_stops_sending_its_body_gets_408_after_body_timeout() {
    let port = free_port();
    let (d, _) = serving(port, &[], "body_timeout = \"1s\"");
    let before = d.requests("web");
    for (head, status) in [
        // The relay path and the hyper path (HTTP/1.0).
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
            "HTTP/1.1 408",
        ),
        (
            "POST / HTTP/1.0\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
            "HTTP/1.0 408",
        ),
    ] {
        let t0 = Instant::now();
        let mut s = in_flight(&d, port, head.as_bytes(), b"");
        let a = read_all(&mut s);
        assert!(a.starts_with(status), "{head:?} -> {a:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
    }
    // The client's fault: neither served nor failed.
    let after = d.requests("web");
    assert_eq!(
        (after.failed, after.served, after.inflight),
        (before.failed, before.served, 0),
        "{after:?}"
    );
}

#[test]
fn an_upload_its_client_abandons_counts_as_neither_served_nor_failed() {
    let port = free_port();
    let (d, _) = serving(port, &[], "");
    let before = d.requests("web");
    for version in ["1.1", "1.0"] {
        let head = format!("POST /up HTTP/{version}\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n");
        let s = in_flight(&d, port, head.as_bytes(), &[b'x'; 1000]);
        drop(s);
        d.wait_inflight("web", 0, T);
    }
    let after = d.requests("web");
    assert_eq!(
        (after.failed, after.served),
        (before.failed, before.served),
        "an abandoned upload counted: {after:?}"
    );
    assert_eq!(http_get(port, "/").expect("served").0, 200);
}

#[test]
fn an_upload_abandoned_while_its_answer_streams_is_not_a_failure() {
    use std::io::Write;
    let port = free_port();
    let d = serving_raw_worker(port);
    // The worker answers at once and echoes the body as it reads it; the
    // client aborts its upload in the middle, on both paths.
    for version in ["1.1", "1.0"] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(
            format!("POST /stream HTTP/{version}\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
                .as_bytes(),
        )
        .expect("head");
        s.write_all(&[b'x'; 100_000]).expect("part of the body");
        let head = read_until(&mut s, "\r\n\r\n");
        assert!(head.starts_with(&format!("HTTP/{version} 200")), "{head:?}");
        drop(s);
        wait_for("the request to end", T, || {
            match d.requests("raw").inflight {
                0 => Ok(()),
                n => Err(format!("{n} in flight")),
            }
        });
    }
    let r = d.requests("raw");
    assert_eq!(r.failed, 0, "an abandoned upload counted as failed: {r:?}");
}

#[test]
fn http_1_0_chunked_uploads_and_100_continue_pass_through() {
    use std::io::Write;
    let port = free_port();
    let (_d, _) = serving(port, &[], "");
    // HTTP/1.0: answered, then closed (raw_exchange reads to the close).
    let answer = raw_exchange(port, b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.contains("\"path\":\"/old\""), "{answer}");
    // A chunked upload reaches the worker whole.
    let answer = raw_exchange(
        port,
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"received\":11"), "{answer}");
    // Expect: 100-continue: zdt says continue, then the body goes through.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .expect("write");
    let interim = read_until(&mut s, "\r\n\r\n");
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(b"hello").expect("write body");
    let answer = read_until(&mut s, "}");
    assert!(answer.contains("\"received\":5"), "{answer}");
    // And the connection stays open for the next request (keep-alive).
    s.write_all(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let next = read_until(&mut s, "\"path\":\"/next\"");
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
}

#[test]
fn workers_can_listen_on_unix_sockets_zdt_names() {
    let port = free_port();
    let d = Daemon::start(
        &(header() + &proxy_program("web", port, &[], "instances = 2\nupstream = \"unix\"")),
    );
    let first = d.wait_state("web", 0, Running, T).pid.expect("pid");
    d.wait_state("web", 1, Running, T);
    let env =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{first}/environ")).expect("environ"))
            .to_string();
    let socket = env
        .split('\0')
        .find_map(|v| v.strip_prefix("SOCKET="))
        .expect("SOCKET in the worker's environment")
        .to_string();
    assert!(!env.split('\0').any(|v| v.starts_with("PORT=")), "{env}");
    assert_eq!(
        std::path::Path::new(&socket),
        d.path("run/web.0.1.sock"),
        "sockets go beside the control socket"
    );
    restart_under_load(&d, "web", port, 5);
    // The old generations' socket files went with them.
    wait_for(
        "the first generation's socket file to be removed",
        T,
        || {
            if std::path::Path::new(&socket).exists() {
                Err(format!("{socket} still exists"))
            } else {
                Ok(())
            }
        },
    );
    assert!(d.path("run/web.0.6.sock").exists());
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

#[test]
fn tcp_proxy_moves_large_transfers_whole_and_leaks_no_descriptors() {
    const SIZE: u64 = 256 << 20;
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
    let fds = fd_count(d.pid());
    download_and_upload(port, SIZE);
    // Pipes and sockets of finished connections are closed.
    wait_for("zdt's descriptors to return to where they were", T, || {
        let now = fd_count(d.pid());
        if now <= fds {
            Ok(())
        } else {
            Err(format!("{now} open, {fds} before"))
        }
    });
    assert_eq!(d.requests("raw").inflight, 0);
}

#[test]
fn sigterm_to_zdt_drains_proxied_requests_before_it_exits() {
    let port = free_port();
    // The worker ignores SIGTERM and is SIGKILLed 300 ms after it: only a
    // drain by the in-flight count lets the 1.5 s request finish.
    let (mut d, pid) = serving(
        port,
        &["--ignore-term"],
        "queue_timeout = \"200ms\"\nmax_wait = \"10s\"\nkill_timeout = \"300ms\"",
    );
    let long = std::thread::spawn(move || http_get(port, "/?sleep=1500"));
    d.wait_inflight("web", 1, T);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let (code, body) = long.join().expect("join").expect("long request");
    assert_eq!(code, 200, "{body}");
    let status = d.wait_exit(T);
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "exited before the drain"
    );
    assert!(!alive(pid));
}

#[test]
fn several_proxy_threads_keep_restarts_at_zero_failures() {
    // The default is one per CPU (two on a 2-core CI machine); this runs
    // accept loops and upstream pools on three threads at once, with new
    // connections passed to the least loaded thread.
    let port = free_port();
    let config = header().replace("[supervisor]\n", "[supervisor]\nproxy_threads = 3\n")
        + &proxy_program("web", port, &[], "instances = 2");
    let d = Daemon::start(&config);
    d.wait_state("web", 0, Running, T);
    d.wait_state("web", 1, Running, T);
    // They run in zdt's proxy process (`proxy_process`, the default).
    let proxy = d.proxy_pid(T);
    wait_for("3 proxy threads", T, || {
        let threads = std::fs::read_dir(format!("/proc/{proxy}/task"))
            .map_err(|e| e.to_string())?
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("zdt-proxy"))
            .count();
        (threads == 3)
            .then_some(())
            .ok_or(format!("{threads} running"))
    });
    restart_under_load(&d, "web", port, 5);
    // Each thread carried some of the 64 clients: each used CPU time.
    for task in std::fs::read_dir(format!("/proc/{proxy}/task")).expect("tasks") {
        let task = task.expect("task").path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !comm.starts_with("zdt-proxy") {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).expect("stat");
        // utime and stime: fields 14 and 15, counted after the ")" of comm.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let ticks: u64 = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum();
        assert!(ticks > 0, "{} served nothing", comm.trim());
    }
}

#[test]
fn a_request_to_an_instance_that_refuses_connections_goes_to_another() {
    // One of two running instances stops listening (and drops its
    // connections), so every request routed to it must connect and is
    // refused before a byte went out: each goes to the other instance.
    let port = free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/util/raw_worker.py");
    let d = Daemon::start(&format!(
        "{}[program.raw]\ncommand = [\"python3\", {:?}]\nmode = \"proxy\"\ninstances = 2\n\
         listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ tcp = true }}\n",
        header(),
        script.display().to_string()
    ));
    d.wait_state("raw", 0, Running, T);
    d.wait_state("raw", 1, Running, T);
    wait_for("the proxy to answer", T, || http_get(port, "/echo"));
    let (code, body) = http_get(port, "/deaf").expect("an answer");
    assert_eq!((code, body.as_str()), (200, "deaf"));
    for i in 0..20 {
        let (code, body) = http_get(port, "/echo").expect("an answer");
        assert_eq!(code, 200, "request {i}: {body}");
    }
    // The deaf instance was tried (routing takes turns), and skipped.
    let log = d.stderr();
    assert!(
        log.contains("connect failed; trying another instance"),
        "{log}"
    );
}

/// zdt proxying `tests/util/raw_worker.py` as "raw" on `port`, answering.
fn serving_raw_worker(port: u16) -> Daemon {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/util/raw_worker.py");
    let d = Daemon::start(&format!(
        "{}[program.raw]\ncommand = [\"python3\", {:?}]\nmode = \"proxy\"\n\
         listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ tcp = true }}\n",
        header(),
        script.display().to_string()
    ));
    d.wait_state("raw", 0, Running, T);
    wait_for("the proxy to answer", T, || http_get(port, "/echo"));
    d
}

/// One response read off a client connection: status line, headers (names
/// lowercased), body (chunked decoded) and trailers.
struct Answer {
    status: String,
    headers: Vec<(String, String)>,
    body: String,
    trailers: Vec<String>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn read_answer(r: &mut std::io::BufReader<std::net::TcpStream>, head: bool) -> Answer {
    use std::io::{BufRead, Read};
    let line = |r: &mut std::io::BufReader<std::net::TcpStream>| {
        let mut l = String::new();
        r.read_line(&mut l).expect("read a line");
        assert!(!l.is_empty(), "connection closed");
        l.trim_end().to_string()
    };
    let status = line(r);
    let mut headers = Vec::new();
    loop {
        let h = line(r);
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').expect("a header line");
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut a = Answer {
        status,
        headers,
        body: String::new(),
        trailers: Vec::new(),
    };
    if head {
        return a;
    }
    if a.header("transfer-encoding")
        .is_some_and(|v| v.ends_with("chunked"))
    {
        loop {
            let size = usize::from_str_radix(&line(r), 16).expect("chunk size");
            if size == 0 {
                loop {
                    let t = line(r);
                    if t.is_empty() {
                        break;
                    }
                    a.trailers.push(t);
                }
                break;
            }
            let mut data = vec![0; size + 2];
            r.read_exact(&mut data).expect("chunk");
            a.body.push_str(&String::from_utf8_lossy(&data[..size]));
        }
    } else {
        let n: usize = a
            .header("content-length")
            .expect("a length")
            .parse()
            .expect("length");
        let mut data = vec![0; n];
        r.read_exact(&mut data).expect("body");
        a.body = String::from_utf8_lossy(&data).to_string();
    }
    a
}

#[test]
fn the_relay_rewrites_heads_frames_every_body_and_keeps_the_client_connection() {
    use std::io::Write;
    let port = free_port();
    let d = serving_raw_worker(port);
    let served = d.requests("raw").served;
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = std::io::BufReader::new(s);
    let mut ask = |req: &str, head: bool| {
        w.write_all(req.as_bytes()).expect("write");
        read_answer(&mut r, head)
    };

    // Forwarded headers: the client's chain extended, its own X-Real-IP
    // replaced; hop-by-hop headers not forwarded.
    let a = ask("GET /echo HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nX-Real-IP: spoofed\r\nConnection: keep-alive\r\n\r\n", false);
    assert!(a.status.starts_with("HTTP/1.1 200"), "{}", a.status);
    for line in [
        "Host: a\n",
        "X-Forwarded-For: 10.0.0.1, 127.0.0.1\n",
        "X-Real-IP: 127.0.0.1\n",
        "X-Forwarded-Proto: http\n",
    ] {
        assert!(a.body.contains(line), "{line:?} not in {:?}", a.body);
    }
    assert!(
        !a.body.contains("spoofed") && !a.body.contains("Connection"),
        "{:?}",
        a.body
    );
    // Bodies, by length (zero too) and chunked with a trailer.
    let a = ask(
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        false,
    );
    assert!(
        a.body.ends_with("body=hello") && a.body.contains("Content-Length: 5"),
        "{:?}",
        a.body
    );
    let a = ask(
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        false,
    );
    assert!(
        a.body.contains("Content-Length: 0") && a.body.ends_with("body="),
        "{:?}",
        a.body
    );
    let a = ask("POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Up: 1\r\n\r\n", false);
    assert!(a.body.ends_with("body=hello world"), "{:?}", a.body);
    // A body ended by the worker closing its connection reaches the client
    // chunked, and the client's connection stays open.
    let a = ask("GET /eof HTTP/1.1\r\nHost: a\r\n\r\n", false);
    assert_eq!(
        a.header("transfer-encoding"),
        Some("chunked"),
        "{:?}",
        a.headers
    );
    assert_eq!(a.body, "close-delimited");
    assert_eq!(a.header("connection"), None, "{:?}", a.headers);
    // Also when it comes in pieces, with pauses before more and before the
    // close.
    let a = ask("GET /eof-pieces HTTP/1.1\r\nHost: a\r\n\r\n", false);
    assert_eq!(a.header("transfer-encoding"), Some("chunked"));
    assert_eq!(a.body, "first,second,third");
    // A chunked body and its trailer pass through.
    let a = ask("GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n", false);
    assert_eq!(
        (a.body.as_str(), a.trailers.clone()),
        ("hello world", vec!["X-T: 1".to_string()])
    );
    // Hop-by-hop response headers, and those Connection names, stay behind.
    let a = ask("GET /hop HTTP/1.1\r\nHost: a\r\n\r\n", false);
    assert_eq!(a.header("x-kept"), Some("1"), "{:?}", a.headers);
    for gone in ["x-secret", "keep-alive", "connection"] {
        assert_eq!(a.header(gone), None, "{gone} in {:?}", a.headers);
    }
    // An interim response is dropped; the final one follows.
    let a = ask("GET /early HTTP/1.1\r\nHost: a\r\n\r\n", false);
    assert!(
        a.status.starts_with("HTTP/1.1 200") && a.body == "later",
        "{} {:?}",
        a.status,
        a.body
    );
    // HEAD: a length but no body; the connection goes on.
    let a = ask("HEAD /echo HTTP/1.1\r\nHost: a\r\n\r\n", true);
    assert!(a.status.starts_with("HTTP/1.1 200") && a.header("content-length").is_some());
    // zdt's own answer to HEAD has no body (the worker closed without one),
    // a broken chunked answer is a 502, and the connection goes on.
    let a = ask("HEAD /die HTTP/1.1\r\nHost: a\r\n\r\n", true);
    assert!(a.status.starts_with("HTTP/1.1 502"), "{}", a.status);
    let a = ask("GET /badchunk HTTP/1.1\r\nHost: a\r\n\r\n", false);
    assert!(a.status.starts_with("HTTP/1.1 502"), "{}", a.status);
    // Two requests in one write: two answers, in order.
    let a = ask(
        "GET /echo?1 HTTP/1.1\r\nHost: one\r\n\r\nGET /echo?2 HTTP/1.1\r\nHost: two\r\n\r\n",
        false,
    );
    assert!(a.body.contains("Host: one"), "{:?}", a.body);
    let b = read_answer(&mut r, false);
    assert!(b.body.contains("Host: two"), "{:?}", b.body);
    assert_eq!(d.requests("raw").served, served + 12);
    assert_eq!(d.requests("raw").failed, 2);
}

#[test]
fn a_worker_answering_before_it_reads_an_upload_is_relayed_at_once() {
    use std::io::Write;
    let port = free_port();
    let _d = serving_raw_worker(port);
    // 64 MiB: far more than the socket buffers between client, zdt and worker.
    let size = 64u64 << 20;
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let uploader = std::thread::spawn(move || {
        let _ = w.write_all(
            format!("POST /early413 HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n")
                .as_bytes(),
        );
        let chunk = vec![b'u'; 1 << 20];
        let mut sent = 0;
        while sent < size && w.write_all(&chunk).is_ok() {
            sent += chunk.len() as u64;
        }
        sent
    });
    let mut r = std::io::BufReader::new(s);
    let a = read_answer(&mut r, false);
    assert!(
        a.status.starts_with("HTTP/1.1 413") && a.body == "big",
        "{} {:?}",
        a.status,
        a.body
    );
    assert_eq!(a.header("connection"), Some("close"), "{:?}", a.headers);
    // zdt closes the connection: the upload stops with an error, well short.
    let sent = uploader.join().expect("join");
    assert!(sent < size, "the whole upload went through: {sent}");
}

#[test]
fn a_worker_closing_keep_alive_connections_unannounced_fails_no_request() {
    use std::io::Write;
    let port = free_port();
    let d = serving_raw_worker(port);
    // Every connection zdt reuses was closed by the worker after its last
    // answer, without Connection: close.
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = std::io::BufReader::new(s);
    for i in 0..200 {
        w.write_all(format!("GET /silent HTTP/1.1\r\nHost: a\r\nX-N: {i}\r\n\r\n").as_bytes())
            .expect("write");
        let a = read_answer(&mut r, false);
        assert!(
            a.status.starts_with("HTTP/1.1 200") && a.body == "silent",
            "request {i}: {} {:?}",
            a.status,
            a.body
        );
    }
    assert_eq!(d.requests("raw").failed, 0);
}

#[test]
fn a_client_that_goes_away_ends_its_request_in_flight() {
    use std::io::Write;
    let port = free_port();
    let (d, _) = serving(port, &[], "");
    let before = d.requests("web");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /?sleep=30000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    d.wait_inflight("web", 1, T);
    drop(s);
    // Long before the worker would answer: a drain or restart need not wait.
    d.wait_inflight("web", 0, Duration::from_secs(10));
    let after = d.requests("web");
    assert_eq!(
        (after.served, after.failed),
        (before.served, before.failed),
        "an abandoned request counts as neither served nor failed"
    );
    assert_eq!(http_get(port, "/").expect("served").0, 200);
}

#[test]
fn a_worker_that_answers_while_the_body_still_comes_gets_all_of_it() {
    use std::io::{Read, Write};
    let port = free_port();
    let d = serving_raw_worker(port);
    let size: usize = 8 << 20;
    // A 103 before the worker reads the body: the body keeps going, and the
    // final answer comes on a connection that stays open.
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let uploader = std::thread::spawn(move || {
        w.write_all(
            format!("POST /hint HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
        )
        .expect("head");
        w.write_all(&vec![b'u'; size]).expect("body");
        w
    });
    let mut r = std::io::BufReader::new(s);
    let a = read_answer(&mut r, false);
    assert!(a.status.starts_with("HTTP/1.1 200"), "{}", a.status);
    assert_eq!(a.body, format!("received {size}"));
    let mut w = uploader.join().expect("join");
    w.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    assert!(read_answer(&mut r, false)
        .status
        .starts_with("HTTP/1.1 200"));
    // An echo that streams each piece back as it reads it: it needs zdt to
    // read its answer while the body still goes to it.
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let uploader = std::thread::spawn(move || {
        w.write_all(
            format!("POST /stream HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n")
                .as_bytes(),
        )
        .expect("head");
        w.write_all(&vec![b'e'; size]).expect("body");
    });
    let mut r = std::io::BufReader::new(s);
    let a = read_answer(&mut r, false);
    assert!(a.status.starts_with("HTTP/1.1 200"), "{}", a.status);
    assert_eq!(a.body.len(), size);
    uploader.join().expect("join");
    // Its answer began before the body was whole: the connection closes.
    assert_eq!(a.header("connection"), Some("close"), "{:?}", a.headers);
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(d.requests("raw").failed, 0);
}
