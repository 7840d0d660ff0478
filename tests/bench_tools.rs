//! The load generator behind bench/compare.sh and bench/soak.sh counts what
//! it must: nothing against a healthy server, every refused request and the
//! outage against one that dies.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::*;

/// A demo worker on its own port, outside zdt; killed on drop.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(port: u16, args: &[&str]) -> Worker {
    let child = Command::new(bin("zdt-demo"))
        .args(args)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn zdt-demo");
    let w = Worker(child);
    wait_for("the demo worker to answer", Duration::from_secs(10), || {
        http_get(port, "/").map(|_| ())
    });
    w
}

/// Runs zdt-load and returns its exit code and LOAD line.
fn load(port: u16, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("zdt-load"))
        .arg(format!("http://127.0.0.1:{port}/?sleep=5"))
        .args(args)
        .output()
        .expect("run zdt-load");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("LOAD "))
        .unwrap_or_else(|| {
            panic!(
                "no LOAD line: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string();
    (out.status.code().unwrap_or(-1), line)
}

fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split([' ', '(', ',', ')'])
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    v.split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key}={v}"))
}

#[test]
fn zdt_load_counts_no_failure_against_a_healthy_worker() {
    let port = free_port();
    let _w = worker(port, &[]);
    for mode in ["keepalive", "close"] {
        let (code, line) = load(port, &["-d", "1", "-c", "8", "-m", mode]);
        assert_eq!(code, 0, "{line}");
        assert_eq!(field(&line, "failed"), 0, "{line}");
        assert!(field(&line, "requests") > 100, "{line}");
        assert_eq!(field(&line, "npids"), 1, "{line}");
        assert_eq!(field(&line, "longest_outage_ms"), 0, "{line}");
    }
}

#[test]
fn zdt_load_counts_refused_requests_and_the_outage_of_a_dead_worker() {
    let port = free_port();
    // The worker exits 700 ms after it listens, early in the 2 s run; nothing
    // listens afterwards.
    let _w = worker(port, &["--crash-after", "700"]);
    let series = tempfile::NamedTempFile::new().expect("temp file");
    let (code, line) = load(
        port,
        &[
            "-d",
            "2",
            "-c",
            "4",
            "--series",
            &series.path().display().to_string(),
        ],
    );
    assert_eq!(code, 1, "{line}");
    assert!(field(&line, "failed") > 0, "{line}");
    assert!(field(&line, "connect") > 0, "{line}");
    // Down from about 0.7 s to the end at 2 s.
    let outage = field(&line, "longest_outage_ms");
    assert!((800..=2000).contains(&outage), "{line}");
    let csv = std::fs::read_to_string(series.path()).expect("series");
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().expect("number")).collect())
        .collect();
    assert_eq!(rows.len(), 20, "{csv}");
    assert!(
        rows[0][1] > 0.0 && rows[0][2] == 0.0,
        "first 100 ms answered: {csv}"
    );
    assert!(
        rows[19][1] == 0.0 && rows[19][2] > 0.0,
        "last 100 ms failed: {csv}"
    );
}

#[test]
fn zdt_load_counts_new_connections_closed_before_an_answer() {
    // A server that accepts and closes at once, as a dying worker's accept
    // queue does: every request fails, none is retried away.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    listener.set_nonblocking(true).expect("nonblocking");
    let server = std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => drop(conn),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    for mode in ["close", "keepalive"] {
        // A generous timeout: on a loaded machine the server thread may be
        // starved for seconds, which is not what this test is about.
        let (code, line) = load(
            port,
            &[
                "-d",
                "1",
                "-c",
                "2",
                "-m",
                mode,
                "--probe-ms",
                "0",
                "-t",
                "30",
            ],
        );
        assert_eq!(code, 1, "{line}");
        assert!(field(&line, "broken") > 0, "{line}");
        assert_eq!(field(&line, "ok"), 0, "{line}");
        assert_eq!(field(&line, "timeout"), 0, "{line}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().expect("server thread");
}
