//! The admin listener: `/metrics` parses and moves, `/health` turns 503
//! before the proxy refuses anything (drain, stop, shutdown with
//! `drain_delay`), and it is read-only. Also `log_format = "json"`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zdt::state::InstanceState::*;

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(20);

/// zdt with a proxied demo program "web" (2 instances) on `port` and the
/// admin listener on `admin`, plus `extra` in `[supervisor]`.
fn serving(port: u16, admin: u16, extra: &str) -> Daemon {
    let config = format!(
        "{}admin = \"127.0.0.1:{admin}\"\n{extra}\n{}",
        header(),
        demo_program(
            "web",
            &[],
            &format!(
                "mode = \"proxy\"\ninstances = 2\nqueue_timeout = \"200ms\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nready = {{ http = \"/health\" }}\n"
            ),
        )
    );
    let d = Daemon::start(&config);
    d.wait_state("web", 1, Running, T);
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    wait_for("the admin listener to answer", T, || {
        match http_get(admin, "/health")? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    d
}

/// `/metrics`, parsed: every line must be a HELP, TYPE or sample line
/// (the parser alone skips what it does not understand).
fn scrape(admin: u16) -> prometheus_parse::Scrape {
    let (status, body) = http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    for line in body.lines() {
        assert!(
            !matches!(
                prometheus_parse::LineInfo::parse(line),
                prometheus_parse::LineInfo::Ignored
            ),
            "not Prometheus text format: {line:?}"
        );
    }
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)));
    match found.map(|x| &x.value) {
        Some(prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v)) => *v,
        Some(prometheus_parse::Value::Histogram(h)) => {
            h.iter().map(|b| b.count).fold(0.0, f64::max)
        }
        other => panic!("no sample {name} {labels:?}: {other:?}"),
    }
}

/// Every series (name and labels), to compare label sets.
fn series(s: &prometheus_parse::Scrape) -> std::collections::BTreeSet<String> {
    s.samples
        .iter()
        .map(|x| format!("{}{}", x.metric, x.labels))
        .collect()
}

#[test]
fn metrics_parse_move_with_requests_and_restarts_and_survive_a_reload() {
    let (port, admin) = (free_port(), free_port());
    let d = serving(port, admin, "");
    let before = scrape(admin);
    let web = [("program", "web")];
    let ok_before = value(
        &before,
        "zdt_proxy_requests_total",
        &[("program", "web"), ("code", "2xx")],
    );
    for i in 0..30 {
        let (status, _) = http_get(port, &format!("/distinct/path/{i}?q={i}")).expect("request");
        assert_eq!(status, 200);
    }
    let after = scrape(admin);
    let ok_after = value(
        &after,
        "zdt_proxy_requests_total",
        &[("program", "web"), ("code", "2xx")],
    );
    assert!(
        ok_after >= ok_before + 30.0,
        "2xx {ok_before} -> {ok_after}"
    );
    assert!(value(&after, "zdt_proxy_request_duration_seconds", &web) >= 30.0);
    // Thirty distinct paths add no series: no label holds a path.
    assert_eq!(
        series(&before),
        series(&after),
        "label sets changed with paths"
    );
    assert_eq!(value(&after, "zdt_program_healthy", &web), 1.0);
    assert_eq!(
        value(
            &after,
            "zdt_instance_state",
            &[("program", "web"), ("instance", "1"), ("state", "RUNNING")]
        ),
        1.0
    );
    assert!(
        value(
            &after,
            "zdt_instance_resident_memory_bytes",
            &[("program", "web"), ("instance", "0")]
        ) > 0.0
    );
    assert!(
        value(
            &after,
            "zdt_resident_memory_bytes",
            &[("process", "daemon")]
        ) > 0.0
    );
    assert!(value(&after, "zdt_open_fds", &[("process", "proxy")]) > 0.0);

    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}");
    let restarted = scrape(admin);
    assert_eq!(
        value(
            &restarted,
            "zdt_restarts_total",
            &[("program", "web"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(value(&restarted, "zdt_restart_ready_seconds", &web), 1.0);
    assert_eq!(value(&restarted, "zdt_restart_drain_seconds", &web), 1.0);
    assert_eq!(
        value(
            &restarted,
            "zdt_instance_generation",
            &[("program", "web"), ("instance", "0")]
        ),
        2.0
    );
    assert!(
        value(
            &restarted,
            "zdt_control_requests_total",
            &[("command", "restart")]
        ) >= 1.0
    );

    // A reload that changes the program restarts it; its counters stay.
    let config = std::fs::read_to_string(d.path("supervisor.toml")).expect("config");
    d.write_config(&config.replace(
        "instances = 2",
        "instances = 2\nenvironment = { CHANGED = \"1\" }",
    ));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("gen 3 to run", T, || {
        let i = d.instance("web", 1);
        if i.generation == 3 && i.state == Running {
            Ok(())
        } else {
            Err(format!("{i:?}"))
        }
    });
    let reloaded = scrape(admin);
    let ok_reloaded = value(
        &reloaded,
        "zdt_proxy_requests_total",
        &[("program", "web"), ("code", "2xx")],
    );
    assert!(
        ok_reloaded >= ok_after,
        "2xx {ok_after} -> {ok_reloaded} across a reload"
    );
    assert_eq!(
        value(
            &reloaded,
            "zdt_restarts_total",
            &[("program", "web"), ("outcome", "ok")]
        ),
        2.0
    );
    // zdt's own answers count in their class: a drained program's 503.
    let five = |s: &prometheus_parse::Scrape| {
        value(
            s,
            "zdt_proxy_requests_total",
            &[("program", "web"), ("code", "5xx")],
        )
    };
    let before = five(&reloaded);
    assert!(d.ctl(&["drain", "web"]).status.success());
    assert_eq!(http_get(port, "/").expect("request").0, 503);
    assert!(d.ctl(&["undrain", "web"]).status.success());
    assert_eq!(five(&scrape(admin)), before + 1.0);
}

/// One poller's observations: (sent, answered, status or 0 for an error).
type Seen = Arc<Mutex<Vec<(Instant, Instant, u16)>>>;

fn poll(
    port: u16,
    path: &'static str,
    stop: Arc<AtomicBool>,
) -> (Seen, std::thread::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let t = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            let status = http_get(port, path).map_or(0, |(code, _)| code);
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.push((sent, Instant::now(), status));
        }
    });
    (seen, t)
}

/// Runs `act` while health and requests are polled, until both saw a
/// refusal; then checks that no request was refused before a health
/// check that was sent later still said 200.
fn health_turns_first(d: &Daemon, port: u16, admin: u16, what: &str, act: &dyn Fn(&Daemon)) {
    let stop = Arc::new(AtomicBool::new(false));
    let (health, h) = poll(admin, "/health", stop.clone());
    let (requests, r) = poll(port, "/", stop.clone());
    wait_for("both pollers to run", T, || {
        let n = (
            health.lock().map_or(0, |v| v.len()),
            requests.lock().map_or(0, |v| v.len()),
        );
        if n.0 > 5 && n.1 > 5 {
            Ok(())
        } else {
            Err(format!("{n:?}"))
        }
    });
    act(d);
    wait_for(
        &format!("{what}: health 503 and a refused request"),
        T,
        || {
            let h = health.lock().is_ok_and(|v| v.iter().any(|x| x.2 == 503));
            let r = requests.lock().is_ok_and(|v| v.iter().any(|x| x.2 != 200));
            if h && r {
                Ok(())
            } else {
                Err(format!("health 503: {h}, refused: {r}"))
            }
        },
    );
    stop.store(true, Ordering::Relaxed);
    h.join().expect("health poller");
    r.join().expect("request poller");
    let health = health.lock().expect("health").clone();
    let requests = requests.lock().expect("requests").clone();

    let first_refused = requests
        .iter()
        .filter(|x| x.2 != 200)
        .map(|x| x.1)
        .min()
        .expect("a refused request");
    let last_healthy = health
        .iter()
        .filter(|x| x.2 == 200)
        .map(|x| x.0)
        .max()
        .expect("a healthy answer");
    assert!(
        last_healthy < first_refused,
        "{what}: a request was refused {:?} before a health check sent later said 200",
        last_healthy - first_refused
    );
    assert!(
        health.iter().all(|x| x.2 == 200 || x.2 == 503),
        "{what}: {health:?}"
    );
}

#[test]
fn health_turns_503_before_the_proxy_refuses_on_drain_and_on_stop() {
    let (port, admin) = (free_port(), free_port());
    let d = serving(port, admin, "");
    health_turns_first(&d, port, admin, "drain", &|d| {
        let out = d.ctl(&["drain", "web"]);
        assert!(out.status.success(), "{out:?}");
    });
    assert_eq!(http_get(admin, "/health/web").expect("health").0, 503);
    let out = d.ctl(&["undrain", "web"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("health 200 after undrain", T, || {
        match http_get(admin, "/health") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    health_turns_first(&d, port, admin, "stop", &|d| {
        let out = d.ctl(&["stop", "web"]);
        assert!(out.status.success(), "{out:?}");
    });
    let (status, body) = http_get(admin, "/health/web").expect("health");
    assert_eq!(status, 503);
    assert!(body.contains("no instance is RUNNING"), "{body}");
}

#[test]
fn on_sigterm_health_turns_first_and_zdt_serves_for_drain_delay_then_exits_0() {
    let (port, admin) = (free_port(), free_port());
    let mut d = serving(port, admin, "drain_delay = \"4s\"");
    let load = Load::start(port, 4, 4, &[0, 20]);
    load.wait_progress("load before SIGTERM");
    let signalled = Instant::now();
    d.signal(libc::SIGTERM);
    wait_for("health 503", Duration::from_secs(2), || {
        match http_get(admin, "/health") {
            Ok((503, body)) if body.contains("shutting down") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let turned = signalled.elapsed();
    // The delay runs: requests are still answered, none fails.
    load.wait_progress("load during drain_delay");
    let report = load.stop();
    assert!(
        signalled.elapsed() < Duration::from_millis(3800),
        "the checks took too long to say anything of the delay ({:?})",
        signalled.elapsed()
    );
    assert_eq!(
        report.failed, 0,
        "failed during drain_delay: {:?}",
        report.errors
    );
    assert!(
        turned < Duration::from_secs(2),
        "health turned after {turned:?}"
    );
    assert!(d.try_exit().is_none(), "zdt exited within drain_delay");
    let status = d.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{}", d.stderr());
    assert!(
        signalled.elapsed() >= Duration::from_secs(4),
        "zdt exited {:?} after SIGTERM, before drain_delay",
        signalled.elapsed()
    );
}

#[test]
fn the_admin_listener_is_read_only_and_answers_status() {
    let (port, admin) = (free_port(), free_port());
    let d = serving(port, admin, "");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("connect");
    use std::io::{Read, Write};
    s.write_all(
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(http_get(admin, "/restart").expect("get").0, 404);
    assert_eq!(http_get(admin, "/health/nope").expect("get").0, 404);
    assert_eq!(http_get(admin, "/health/web").expect("get").0, 200);
    let (status, body) = http_get(admin, "/status").expect("status");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let (_, ctl) = d.ctl_json(&["status"]);
    assert_eq!(v["kind"], ctl["kind"]);
    assert_eq!(v["programs"][0]["name"], "web");
    assert_eq!(
        v["programs"][0]["instances"].as_array().map(Vec::len),
        ctl["programs"][0]["instances"].as_array().map(Vec::len)
    );
    // A garbage request gets 400 and the listener serves on.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("connect");
    s.write_all(b"\x00\x01 garbage\r\n\r\n").expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(http_get(admin, "/health").expect("get").0, 200);
}

#[test]
fn json_logs_are_one_object_a_line_without_colours() {
    let (port, admin) = (free_port(), free_port());
    let d = serving(port, admin, "log_format = \"json\"");
    let out = d.ctl(&["restart", "web"]);
    assert!(out.status.success(), "{out:?}");
    let text = d.stderr();
    assert!(!text.contains('\u{1b}'), "colour codes in {text}");
    let mut with_program = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["message"].is_string() && v["level"].is_string(), "{line}");
        if v["program"] == "web" {
            with_program += 1;
        }
    }
    assert!(with_program > 3, "fields are not keys: {text}");
}

#[test]
fn health_stays_200_across_restarts_and_upgrades() {
    let (port, admin) = (free_port(), free_port());
    let d = serving(port, admin, "");
    let stop = Arc::new(AtomicBool::new(false));
    let (health, h) = poll(admin, "/health", stop.clone());
    let (web, w) = poll(admin, "/health/web", stop.clone());
    for verb in ["restart", "upgrade", "restart", "upgrade"] {
        let before = health.lock().map_or(0, |v| v.len());
        let out = if verb == "restart" {
            d.ctl(&["restart", "web"])
        } else {
            d.ctl(&["upgrade"])
        };
        assert!(out.status.success(), "{out:?}\n{}", d.stderr());
        wait_for(&format!("health checks after the {verb}"), T, || {
            let n = health.lock().map_or(0, |v| v.len());
            if n > before + 20 {
                Ok(())
            } else {
                Err(format!("{} since", n - before))
            }
        });
    }
    stop.store(true, Ordering::Relaxed);
    h.join().expect("health poller");
    w.join().expect("program health poller");
    let mut health = health.lock().expect("health").clone();
    let web = web.lock().expect("web").clone();
    assert!(web.len() > 40, "{} checks of /health/web", web.len());
    health.extend(web);
    let bad: Vec<_> = health.iter().filter(|x| x.2 != 200).collect();
    assert!(
        bad.is_empty(),
        "{} of {} checks not 200: {bad:?}",
        bad.len(),
        health.len()
    );
}

/// The line the HAProxy agent port writes.
fn agent_line(port: u16) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the agent");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut line = String::new();
    s.read_to_string(&mut line).expect("read the agent's line");
    line
}

#[test]
fn the_haproxy_agent_port_says_ready_drain_and_down() {
    let (port, admin, agent) = (free_port(), free_port(), free_port());
    let d = serving(port, admin, &format!("agent_check = \"127.0.0.1:{agent}\""));
    assert_eq!(agent_line(agent), "ready up\n");
    let out = d.ctl(&["drain", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(agent_line(agent), "drain\n");
    let out = d.ctl(&["undrain", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(agent_line(agent), "ready up\n");
    let out = d.ctl(&["stop", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(agent_line(agent), "down\n");
    let out = d.ctl(&["start", "web"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("the agent to say ready", T, || {
        match agent_line(agent).as_str() {
            "ready up\n" => Ok(()),
            other => Err(other.to_string()),
        }
    });
}

#[test]
fn a_renamed_program_is_the_one_health_asks_about() {
    let (port, admin) = (free_port(), free_port());
    let d = serving(port, admin, "");
    let config = std::fs::read_to_string(d.path("supervisor.toml")).expect("config");
    d.write_config(&config.replace("[program.web]", "[program.site]"));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("/health/site to answer 200", T, || {
        match http_get(admin, "/health/site") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(http_get(admin, "/health/web").expect("health").0, 404);
    let out = d.ctl(&["drain", "site"]);
    assert!(out.status.success(), "{out:?}");
    let (status, body) = http_get(admin, "/health").expect("health");
    assert_eq!(
        (status, body.as_str()),
        (503, "unavailable: site: draining\n")
    );
}

#[test]
fn with_drain_delay_a_drain_turns_health_first_and_refuses_only_after_the_delay() {
    let (port, admin) = (free_port(), free_port());
    let d = serving(port, admin, "drain_delay = \"2s\"");
    let asked = Instant::now();
    let drain = d.ctl_in_background(&["drain", "web"]);
    wait_for("health 503", T, || match http_get(admin, "/health") {
        Ok((503, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    // Served on while the balancer notices.
    let mut served = 0;
    while asked.elapsed() < Duration::from_millis(1500) {
        assert_eq!(http_get(port, "/").expect("request").0, 200);
        served += 1;
    }
    assert!(served > 0);
    let out = drain.join().expect("drain");
    assert!(out.status.success(), "{out:?}");
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(http_get(port, "/").expect("request").0, 503);
    // An undrain during the delay cancels the drain: nothing is refused.
    assert!(d.ctl(&["undrain", "web"]).status.success());
    let drain = d.ctl_in_background(&["drain", "web"]);
    wait_for("health 503", T, || match http_get(admin, "/health") {
        Ok((503, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert!(d.ctl(&["undrain", "web"]).status.success());
    let out = drain.join().expect("drain");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ended or replaced during drain_delay"),
        "{out:?}"
    );
    assert_eq!(http_get(port, "/").expect("request").0, 200);
    assert_eq!(http_get(admin, "/health").expect("health").0, 200);
}

/// The agent port is one socket for zdt's life: two upgrades under checks
/// refuse none of them, and every answer is `ready up`.
#[test]
fn the_agent_port_is_carried_across_upgrades_and_refuses_no_check() {
    let (port, admin, agent) = (free_port(), free_port(), free_port());
    let d = serving(port, admin, &format!("agent_check = \"127.0.0.1:{agent}\""));
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let poller = {
        let (stop, answers) = (stop.clone(), answers.clone());
        std::thread::spawn(move || {
            use std::io::Read;
            while !stop.load(Ordering::Relaxed) {
                let line = std::net::TcpStream::connect(("127.0.0.1", agent))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(T))?;
                        let mut line = String::new();
                        s.read_to_string(&mut line)?;
                        Ok(line)
                    })
                    .unwrap_or_else(|e| format!("error: {e}"));
                if let Ok(mut a) = answers.lock() {
                    a.push(line);
                }
            }
        })
    };
    for _ in 0..2 {
        let before = answers.lock().map_or(0, |a| a.len());
        let out = d.ctl(&["upgrade"]);
        assert!(out.status.success(), "{out:?}\n{}", d.stderr());
        wait_for("agent checks after the upgrade", T, || {
            let n = answers.lock().map_or(0, |a| a.len());
            if n > before + 20 {
                Ok(())
            } else {
                Err(format!("{} since", n - before))
            }
        });
    }
    stop.store(true, Ordering::Relaxed);
    poller.join().expect("agent poller");
    let answers = answers.lock().expect("answers").clone();
    let bad: Vec<_> = answers.iter().filter(|a| *a != "ready up\n").collect();
    assert!(
        bad.is_empty(),
        "{} of {}: {bad:?}",
        bad.len(),
        answers.len()
    );
}

/// A second SIGTERM during `drain_delay` ends the delay: zdt drains and
/// exits at once instead of serving on for the rest of it.
#[test]
fn a_second_sigterm_cuts_drain_delay_short() {
    let (port, admin) = (free_port(), free_port());
    let mut d = serving(port, admin, "drain_delay = \"60s\"");
    d.signal(libc::SIGTERM);
    wait_for("health 503", T, || match http_get(admin, "/health") {
        Ok((503, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert!(d.try_exit().is_none(), "zdt exited at the first SIGTERM");
    let second = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(T);
    assert!(
        second.elapsed() < Duration::from_secs(15),
        "exited {:?} after the second SIGTERM",
        second.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", d.stderr());
}
