//! A concurrent HTTP/1.1 load client for restart tests: real sockets, every
//! request checked, every failure counted with its cause.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the clients saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests answered 200 with a body that names its pid.
    pub ok: u64,
    /// Everything else, with its cause (first few kept).
    pub failed: u64,
    /// Causes of the first failures.
    pub errors: Vec<String>,
    /// Distinct worker pids that answered.
    pub pids: BTreeSet<u64>,
    /// Distinct generations that answered.
    pub generations: BTreeSet<u64>,
    /// Answers by the `version` text in the body, for apps that name theirs
    /// (deploy tests).
    pub versions: BTreeMap<String, u64>,
    /// When each answered request reached its worker (Unix ms; zdt-demo's
    /// `at`), to tell whether any got through while zdt held requests.
    pub reached_ms: Vec<u64>,
    /// Requests answered, per generation.
    pub by_generation: BTreeMap<u64, u64>,
}

/// Clients running until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Set by [`Load::hold`]: no client begins another request.
    hold: Arc<AtomicBool>,
    /// Requests begun (counted before the first byte goes out) and not yet
    /// recorded in the report.
    outstanding: Arc<AtomicU64>,
    report: Arc<Mutex<LoadReport>>,
    threads: Vec<JoinHandle<()>>,
}

struct Conn {
    reader: BufReader<TcpStream>,
}

fn connect(port: u16) -> Result<Conn, String> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.set_nodelay(true).ok();
    Ok(Conn {
        reader: BufReader::new(s),
    })
}

/// One request on `conn`; returns (body, server asked to close).
fn request(conn: &mut Conn, path: &str, close: bool) -> Result<(String, bool), String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    );
    conn.reader
        .get_mut()
        .write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    conn.reader
        .read_line(&mut line)
        .map_err(|e| format!("read status: {e}"))?;
    if line.is_empty() {
        return Err("connection closed before the response".into());
    }
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("status line {:?}", line.trim_end()));
    }
    let mut len = None;
    let mut chunked = false;
    let mut server_close = false;
    loop {
        line.clear();
        conn.reader
            .read_line(&mut line)
            .map_err(|e| format!("read header: {e}"))?;
        let h = line.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        }
        if h == "transfer-encoding: chunked" {
            chunked = true;
        }
        if h == "connection: close" {
            server_close = true;
        }
    }
    let body = if chunked {
        read_chunked(&mut conn.reader)?
    } else {
        let len = len.ok_or("no content-length")?;
        let mut body = vec![0; len];
        conn.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        body
    };
    Ok((String::from_utf8_lossy(&body).into_owned(), server_close))
}

/// Reads a chunked body (no trailers expected).
fn read_chunked(r: &mut BufReader<TcpStream>) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)
            .map_err(|e| format!("read chunk size: {e}"))?;
        let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk)
            .map_err(|e| format!("read chunk: {e}"))?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

fn field(body: &str, key: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get(key)?.as_u64()
}

fn text_field(body: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(v.get(key)?.as_str()?.to_string())
}

impl Load {
    /// Starts `keepalive` clients that reuse connections and `fresh` clients
    /// that open one per request, each asking `GET /?sleep=N` with N cycling
    /// through `sleeps_ms`.
    pub fn start(port: u16, keepalive: usize, fresh: usize, sleeps_ms: &[u64]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let outstanding = Arc::new(AtomicU64::new(0));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let mut threads = Vec::new();
        for i in 0..keepalive + fresh {
            let keep = i < keepalive;
            let (stop, report) = (stop.clone(), report.clone());
            let (hold, outstanding) = (hold.clone(), outstanding.clone());
            let sleeps: Vec<u64> = sleeps_ms.to_vec();
            threads.push(std::thread::spawn(move || {
                let mut conn: Option<Conn> = None;
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    // Counted before the hold is looked at (both SeqCst): a
                    // request that begins after hold() returned is already
                    // in `outstanding` by then, or never begins.
                    outstanding.fetch_add(1, Ordering::SeqCst);
                    if hold.load(Ordering::SeqCst) {
                        outstanding.fetch_sub(1, Ordering::SeqCst);
                        break;
                    }
                    n += 1;
                    let path = format!("/?sleep={}", sleeps[n % sleeps.len()]);
                    let result = (|| {
                        if conn.is_none() {
                            conn = Some(connect(port)?);
                        }
                        let c = conn.as_mut().ok_or("no connection")?;
                        request(c, &path, !keep)
                    })();
                    let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok((body, server_close)) => {
                            match (field(&body, "pid"), field(&body, "generation")) {
                                (Some(pid), Some(gen)) => {
                                    r.ok += 1;
                                    r.pids.insert(pid);
                                    r.generations.insert(gen);
                                    if let Some(v) = text_field(&body, "version") {
                                        *r.versions.entry(v).or_default() += 1;
                                    }
                                    if let Some(at) = field(&body, "at") {
                                        r.reached_ms.push(at);
                                    }
                                    *r.by_generation.entry(gen).or_default() += 1;
                                }
                                _ => {
                                    r.failed += 1;
                                    if r.errors.len() < 20 {
                                        r.errors.push(format!("bad body {body:?}"));
                                    }
                                }
                            }
                            if server_close || !keep {
                                conn = None;
                            }
                        }
                        Err(e) => {
                            r.failed += 1;
                            if r.errors.len() < 20 {
                                r.errors.push(format!(
                                    "{} client: {e}",
                                    if keep { "keep-alive" } else { "new-connection" }
                                ));
                            }
                            conn = None;
                        }
                    }
                    drop(r);
                    outstanding.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        Load {
            stop,
            hold,
            outstanding,
            report,
            threads,
        }
    }

    /// Lets each client finish the request it is in and begin no other
    /// (until [`Load::stop`], which returns the report as usual). Once this
    /// returns, the requests [`Load::outstanding`] counts are all the
    /// requests that will ever still be sent.
    pub fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Requests begun and not yet answered (or failed).
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn ok_so_far(&self) -> u64 {
        self.report.lock().map(|r| r.ok).unwrap_or(0)
    }

    /// Waits until 200 more requests were answered (panics after 20 s,
    /// naming `what`).
    pub fn wait_progress(&self, what: &str) {
        let before = self.ok_so_far();
        super::wait_for(what, Duration::from_secs(20), || {
            let now = self.ok_so_far();
            if now > before + 200 {
                Ok(())
            } else {
                Err(format!("{} answered since", now - before))
            }
        });
    }

    /// Requests answered so far, per `version` in the body.
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.report
            .lock()
            .map(|r| r.versions.clone())
            .unwrap_or_default()
    }

    /// Requests answered so far, per generation.
    pub fn by_generation(&self) -> BTreeMap<u64, u64> {
        self.report
            .lock()
            .map(|r| r.by_generation.clone())
            .unwrap_or_default()
    }

    /// Stops the clients (each finishes its request) and returns the report.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        Arc::try_unwrap(self.report)
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default()
    }
}
