//! Canary restarts (proxy mode): `restart --canary P` starts the new
//! generation beside the old one and sends P % of new clients to it, each
//! kept on its generation by the `zdt_canary` cookie (or a hash of
//! `canary_header`); `promote` and `rollback` end it without failing a
//! request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use zdt::state::InstanceState::*;
use zdt::state::{CanaryStatus, ProgramSnapshot};

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(20);

/// zdt with "web", a proxied demo program of two instances on `port`,
/// serving generation 1.
fn serving(port: u16, extra: &str) -> Daemon {
    let d = Daemon::start(&(header()
        + &demo_program(
            "web",
            &[],
            &format!(
                "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ http = \"/health\" }}\ninstances = 2\n{extra}"
            ),
        )));
    d.wait_state("web", 0, Running, T);
    d.wait_state("web", 1, Running, T);
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    d
}

/// One answer: its status, its headers (lower-case names), the generation
/// in its body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    generation: u64,
}

impl Answer {
    /// The value of `zdt_canary` in its Set-Cookie, and the whole header.
    fn cookie(&self) -> Option<(u64, String)> {
        let (_, v) = self.headers.iter().find(|(n, _)| n == "set-cookie")?;
        let gen = v
            .strip_prefix("zdt_canary=")?
            .split(';')
            .next()?
            .parse()
            .ok()?;
        Some((gen, v.clone()))
    }
}

/// Reads one answer (Content-Length framed) from `r`.
fn read_answer(r: &mut BufReader<TcpStream>) -> Result<Answer, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l
            .split_once(':')
            .ok_or_else(|| format!("bad header {l:?}"))?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or("no content-length")?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("body {body:?}: {e}"))?;
    let generation = v["generation"].as_u64().ok_or("no generation")?;
    Ok(Answer {
        status,
        headers,
        generation,
    })
}

/// A client connection kept open across requests.
struct Client(BufReader<TcpStream>);

impl Client {
    fn new(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        Client(BufReader::new(s))
    }

    /// `GET path` with `headers` (each ending in CRLF), HTTP/1.1 (zdt's
    /// relay path) or HTTP/1.0 (handed to its hyper path).
    fn get(&mut self, path: &str, headers: &str, http10: bool) -> Answer {
        let version = if http10 {
            "HTTP/1.0\r\nConnection: keep-alive"
        } else {
            "HTTP/1.1"
        };
        write!(
            self.0.get_mut(),
            "GET {path} {version}\r\nHost: localhost\r\n{headers}\r\n"
        )
        .expect("write");
        read_answer(&mut self.0).unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e}"))
    }
}

/// One request on a new connection.
fn get(port: u16, headers: &str) -> Answer {
    Client::new(port).get("/", headers, false)
}

fn program(d: &Daemon) -> ProgramSnapshot {
    d.status()
        .into_iter()
        .find(|p| p.name == "web")
        .expect("web in status")
}

fn canary_of(d: &Daemon) -> Option<CanaryStatus> {
    program(d).canary
}

/// Pids of the live processes of generation `gen`.
fn pids_of(d: &Daemon, gen: u64) -> Vec<u32> {
    program(d)
        .instances
        .iter()
        .filter(|i| i.generation == gen)
        .filter_map(|i| i.pid)
        .collect()
}

/// Waits until `load` had 200 more requests answered.
fn progress(load: &Load, what: &str) {
    let before = load.ok_so_far();
    wait_for(what, T, || {
        if load.ok_so_far() > before + 200 {
            Ok(())
        } else {
            Err(format!("{} answered", load.ok_so_far()))
        }
    });
}

/// Requests answered per generation between two readings.
fn since(before: &BTreeMap<u64, u64>, now: &BTreeMap<u64, u64>, gen: u64) -> u64 {
    now.get(&gen).copied().unwrap_or(0) - before.get(&gen).copied().unwrap_or(0)
}

/// Starts a canary of `percent` and checks what zdtctl printed.
fn start_canary(d: &Daemon, percent: &str) {
    let out = d.ctl(&["restart", "web", "--canary", percent]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "restart --canary: {out:?}");
    for want in ["canary", "zdtctl promote web", "zdtctl rollback web"] {
        assert!(text.contains(want), "{want:?} not in {text:?}");
    }
}

/// Waits until both generations answered requests of `load` since `before`.
fn both_serve(load: &Load, before: &BTreeMap<u64, u64>) {
    wait_for("both generations to answer the load", T, || {
        let now = load.by_generation();
        if since(before, &now, 1) > 50 && since(before, &now, 2) > 50 {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    });
}

#[test]
fn canary_splits_new_clients_and_keeps_each_on_its_generation() {
    let port = free_port();
    let d = serving(port, "");
    let load = Load::start(port, 16, 16, &[0, 0, 20]);
    progress(&load, "load before the canary");
    start_canary(&d, "50");
    let before = load.by_generation();
    both_serve(&load, &before);

    // Sticky: a client's first answer sets the cookie of the generation
    // that served it; with it, 20 more requests (kept-alive and on new
    // connections, through both of zdt's HTTP paths) stay there.
    let mut sides = BTreeMap::new();
    for http10 in [false, true] {
        let mut draws = 0;
        while sides.len() < 2 + usize::from(http10) * 2 && draws < 200 {
            draws += 1;
            let mut c = Client::new(port);
            let first = c.get("/", "", http10);
            let (gen, header) = first
                .cookie()
                .expect("an answer to a new client sets the cookie");
            assert_eq!(
                gen, first.generation,
                "cookie names the generation that served"
            );
            assert_eq!(
                header,
                format!("zdt_canary={gen}; Path=/; HttpOnly; SameSite=Lax")
            );
            if sides.insert((http10, gen), ()).is_some() {
                continue;
            }
            let cookie = format!("Cookie: theme=dark; zdt_canary={gen}\r\n");
            for i in 0..20 {
                let a = if i % 2 == 0 {
                    c.get("/", &cookie, http10)
                } else {
                    Client::new(port).get("/", &cookie, http10)
                };
                assert_eq!(
                    a.generation, gen,
                    "request {i} with the cookie of gen {gen}"
                );
                assert!(
                    a.cookie().is_none(),
                    "a client with a cookie gets no new one"
                );
            }
        }
        assert_eq!(
            sides.keys().filter(|(h, _)| *h == http10).count(),
            2,
            "new clients were drawn to both generations (HTTP/1.0: {http10})"
        );
    }

    // A 5xx of the canary is counted as the canary's.
    let a = Client::new(port).get("/?status=503", "Cookie: zdt_canary=2\r\n", false);
    assert_eq!((a.status, a.generation), (503, 2));

    // Status: both generations side by side, with their counters.
    let c = canary_of(&d).expect("a canary in status --json");
    assert_eq!(c.percent, 50);
    assert_eq!((c.stable.generation, c.canary.generation), (1, 2));
    assert!(c.stable.requests > 0 && c.canary.requests > 0, "{c:?}");
    assert!(
        c.stable.p99_us.is_some() && c.canary.p99_us.is_some(),
        "{c:?}"
    );
    assert_eq!((c.stable.errors_5xx, c.canary.errors_5xx), (0, 1), "{c:?}");
    let text = String::from_utf8_lossy(&d.ctl(&["status", "web"]).stdout).into_owned();
    assert!(text.contains("web: canary: gen 2 takes 50 %"), "{text}");
    let row = |side: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(side))
            .unwrap_or_else(|| panic!("no {side} row in {text}"))
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("stable")[1], "1", "{text}");
    assert_eq!(row("canary")[1], "2", "{text}");
    assert_eq!(row("canary")[3], "1", "the canary's 5xx column: {text}");

    // A plain restart (or a second canary) waits for promote or rollback.
    for args in [
        &["restart", "web"][..],
        &["restart", "web", "--canary", "10"],
    ] {
        let out = d.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            err.contains("canary of web is running") && err.contains("zdtctl promote web"),
            "{err}"
        );
    }

    progress(&load, "load after the checks");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let r = d.requests("web");
    assert_eq!((r.failed, r.unavailable), (0, 0), "{r:?}");
}

#[test]
fn canary_promote_under_load_fails_zero_requests_and_stops_the_old_generation() {
    let port = free_port();
    let d = serving(port, "");
    let load = Load::start(port, 16, 16, &[0, 0, 20, 200]);
    progress(&load, "load before the canary");
    start_canary(&d, "30");
    both_serve(&load, &load.by_generation());
    let old = pids_of(&d, 1);
    assert_eq!(old.len(), 2, "{:?}", program(&d));

    let out = d.ctl(&["promote", "web"]);
    assert!(out.status.success(), "promote: {out:?}");
    // promote returns once the old generation is gone.
    for pid in &old {
        assert!(
            !alive(*pid),
            "gen 1 process {pid} still alive after promote"
        );
    }
    let snap = program(&d);
    assert!(snap.canary.is_none(), "{snap:?}");
    assert!(
        snap.instances
            .iter()
            .all(|i| i.generation == 2 && i.state == Running),
        "{snap:?}"
    );
    // From now on only the new generation answers.
    progress(&load, "load after promote");
    let after = load.by_generation();
    progress(&load, "more load after promote");
    let now = load.by_generation();
    assert_eq!(since(&after, &now, 1), 0, "{after:?} -> {now:?}");
    assert!(since(&after, &now, 2) > 0, "{now:?}");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let r = d.requests("web");
    assert_eq!((r.failed, r.unavailable, r.cut), (0, 0, 0), "{r:?}");
    // The cookie of the promoted generation means nothing now.
    assert!(get(port, "Cookie: zdt_canary=1\r\n").cookie().is_none());
    assert_eq!(get(port, "Cookie: zdt_canary=1\r\n").generation, 2);
}

#[test]
fn canary_rollback_under_load_fails_zero_requests_and_stops_the_canary() {
    let port = free_port();
    let d = serving(port, "");
    let load = Load::start(port, 16, 16, &[0, 0, 20, 200]);
    progress(&load, "load before the canary");
    start_canary(&d, "50");
    both_serve(&load, &load.by_generation());
    let canary = pids_of(&d, 2);
    let stable = pids_of(&d, 1);
    assert_eq!(canary.len(), 2, "{:?}", program(&d));

    // A reload that would change the program waits for the canary's end.
    let config = std::fs::read_to_string(&d.config).expect("config");
    d.write_config(&config.replace("instances = 2", "instances = 2\nmax_wait = \"9s\""));
    let out = d.ctl(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("canary is running") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(canary_of(&d).is_some(), "the canary runs on");

    let out = d.ctl(&["rollback", "web"]);
    assert!(out.status.success(), "rollback: {out:?}");
    for pid in &canary {
        assert!(
            !alive(*pid),
            "canary process {pid} still alive after rollback"
        );
    }
    let snap = program(&d);
    assert!(snap.canary.is_none(), "{snap:?}");
    let running: Vec<u32> = snap.instances.iter().filter_map(|i| i.pid).collect();
    assert_eq!(running, stable, "the old generation's processes serve on");
    progress(&load, "load after rollback");
    let after = load.by_generation();
    progress(&load, "more load after rollback");
    let now = load.by_generation();
    assert_eq!(since(&after, &now, 2), 0, "{after:?} -> {now:?}");
    assert!(since(&after, &now, 1) > 0, "{now:?}");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let r = d.requests("web");
    assert_eq!((r.failed, r.unavailable, r.cut), (0, 0, 0), "{r:?}");

    // Nothing left to roll back or promote.
    for verb in ["rollback", "promote"] {
        let out = d.ctl(&[verb, "web"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(err.contains("no canary running for web"), "{verb}: {err}");
    }
    // And the reload goes through now.
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "reload after the canary: {out:?}");
}

#[test]
fn canary_header_assigns_each_value_to_one_generation_without_a_cookie() {
    let port = free_port();
    let d = serving(port, "canary_header = \"X-User-Id\"");
    start_canary(&d, "50");
    let mut seen = BTreeMap::new();
    for user in 0..40 {
        let h = format!("X-User-Id: user-{user}\r\n");
        let first = get(port, &h);
        assert!(
            first.cookie().is_none(),
            "no cookie with the header: {:?}",
            first.headers
        );
        let mut keep = Client::new(port);
        for i in 0..5 {
            // The header wins over a cookie naming the other generation.
            let other = 3 - first.generation;
            let with_cookie = format!("{h}Cookie: zdt_canary={other}\r\n");
            assert_eq!(
                keep.get("/", &h, false).generation,
                first.generation,
                "user-{user} #{i}"
            );
            assert_eq!(
                get(port, &with_cookie).generation,
                first.generation,
                "user-{user} #{i}"
            );
            assert_eq!(
                Client::new(port).get("/", &h, true).generation,
                first.generation,
                "user-{user} #{i} (HTTP/1.0)"
            );
        }
        *seen.entry(first.generation).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "users on both generations: {seen:?}");
    // Without the header: the cookie draw.
    wait_for("a drawn client with a cookie", T, || {
        get(port, "")
            .cookie()
            .ok_or_else(|| "no Set-Cookie".to_string())
    });
    let c = canary_of(&d).expect("canary");
    assert_eq!(c.header.as_deref(), Some("X-User-Id"));
    let text = String::from_utf8_lossy(&d.ctl(&["status"]).stdout).into_owned();
    assert!(text.contains("sticky by X-User-Id hash"), "{text}");
}

#[test]
fn canary_crash_restarts_in_its_own_generation() {
    let port = free_port();
    let d = serving(port, "startsecs = \"0s\"");
    start_canary(&d, "50");
    let before = program(&d);
    let victim = before
        .instances
        .iter()
        .find(|i| i.generation == 2 && i.instance == 0)
        .expect("canary instance 0");
    kill(victim.pid.expect("pid"), libc::SIGKILL);
    let again = wait_for("the canary instance to run again", T, || {
        let p = program(&d);
        match p
            .instances
            .iter()
            .find(|i| i.generation == 2 && i.instance == 0 && i.state == Running)
        {
            Some(i) if i.pid != victim.pid && i.pid.is_some() => Ok(i.clone()),
            _ => Err(format!("{:?}", p.instances)),
        }
    });
    assert_eq!(again.restarts, victim.restarts + 1);
    assert!(canary_of(&d).is_some(), "the canary runs on");
    let stable: Vec<u32> = pids_of(&d, 1);
    assert_eq!(stable.len(), 2);
    // The canary serves its clients again.
    wait_for("the canary to answer its cookie", T, || {
        let a = get(port, "Cookie: zdt_canary=2\r\n");
        if a.generation == 2 {
            Ok(())
        } else {
            Err(format!("gen {}", a.generation))
        }
    });
    let out = d.ctl(&["promote", "web"]);
    assert!(out.status.success(), "promote: {out:?}");
}

#[test]
fn canary_is_refused_in_pass_mode() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "web",
                &[],
                &format!("listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}"),
            )),
    );
    let before = d.wait_state("web", 0, Running, T);
    let out = d.ctl(&["restart", "web", "--canary", "10"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("pass mode") && err.contains("mode = \"proxy\""),
        "{err}"
    );
    let after = d.instance("web", 0);
    assert_eq!(
        (after.pid, after.generation),
        (before.pid, before.generation)
    );
    // A percentage out of range is a usage error, before zdt is asked.
    for bad in ["0", "100"] {
        let out = d.ctl(&["restart", "web", "--canary", bad]);
        assert_eq!(out.status.code(), Some(2), "--canary {bad}: {out:?}");
    }
    // Nothing to promote.
    let out = d.ctl(&["promote", "web"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no canary running for web"));
}
