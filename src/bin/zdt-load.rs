//! zdt-load: steady HTTP load that records the outcome of every request, for
//! the restart benchmarks (bench/compare.sh, bench/soak.sh).
//!
//! CONNECTIONS clients send GET URL back to back for DURATION seconds, each on
//! one keep-alive connection (reconnecting after a failure or a
//! `Connection: close` answer) or on a new connection per request. Beside
//! them a probe opens a new connection every PROBE_MS and measures how long
//! the service could not be reached (an outage runs from the first failed
//! probe to the next good one).
//!
//! A request fails when it cannot connect, its new connection is closed or
//! reset before or after the request was written, the answer is not 2xx, or
//! no full answer came within TIMEOUT. Only a request hyper never wrote on a
//! reused keep-alive connection (the server had closed it while it sat idle)
//! is sent again on a new connection, as every HTTP client does, and is not
//! counted.
//!
//! SIGINT or SIGTERM ends the load early. Prints one `LOAD key=value ...`
//! line; `--series FILE` writes a CSV with one row per BUCKET_MS: time, good
//! answers, failures and p99 latency of the good answers in the bucket.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    /// One keep-alive connection per client.
    Keepalive,
    /// A new connection for every request (`Connection: close`).
    Close,
}

#[derive(Parser, Debug)]
#[command(version, about = "Steady HTTP load that counts every failed request")]
struct Args {
    /// http://127.0.0.1:PORT/path (loopback only).
    url: String,
    /// Seconds of load.
    #[arg(short, long, default_value_t = 20.0)]
    duration: f64,
    /// Concurrent clients.
    #[arg(short, long, default_value_t = 32)]
    connections: usize,
    #[arg(short, long, value_enum, default_value_t = Mode::Keepalive)]
    mode: Mode,
    /// Seconds without a full answer after which a request has failed.
    #[arg(short, long, default_value_t = 5.0)]
    timeout: f64,
    /// Interval of the new-connection availability probe, ms (0: no probe).
    #[arg(long, default_value_t = 20)]
    probe_ms: u64,
    /// Width of one row of the series, ms.
    #[arg(long, default_value_t = 100)]
    bucket_ms: u64,
    /// Writes the time series as CSV here.
    #[arg(long)]
    series: Option<PathBuf>,
    /// A label copied into the LOAD line.
    #[arg(long, default_value = "run")]
    label: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Failure {
    Connect,
    Broken,
    Status,
    Timeout,
}

/// One finished request: when it ended (ms since the start), how long it
/// took (µs), and how it went.
struct Sample {
    end_ms: u32,
    micros: u32,
    outcome: Result<u16, Failure>,
}

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// URLs"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let ip: std::net::IpAddr = match host {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h
            .trim_matches(['[', ']'])
            .parse()
            .map_err(|_| format!("{url}: the host must be a loopback address"))?,
    };
    if !ip.is_loopback() {
        return Err(format!("{url}: the host must be a loopback address"));
    }
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        host: format!("{host}:{port}"),
        path,
    })
}

async fn connect(t: &Target) -> Result<SendRequest<Empty<Bytes>>, Failure> {
    let stream = TcpStream::connect(t.addr)
        .await
        .map_err(|_| Failure::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Failure::Connect)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(t: &Target, close: bool) -> Request<Empty<Bytes>> {
    let mut b = Request::get(t.path.as_str()).header(header::HOST, t.host.as_str());
    if close {
        b = b.header(header::CONNECTION, "close");
    }
    // The path and host were parsed from a valid URI above.
    b.body(Empty::new()).unwrap_or_default()
}

/// Result of one exchange on `sender`: Ok(None) when the request was never
/// written (the connection had closed) and may go out again.
async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
    pids: &mut HashSet<u32>,
) -> Result<Option<u16>, Failure> {
    if sender.ready().await.is_err() {
        return Ok(None);
    }
    let resp = match sender.try_send_request(req).await {
        Ok(r) => r,
        Err(e) if e.message().is_some() => return Ok(None),
        Err(_) => return Err(Failure::Broken),
    };
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| Failure::Broken)?
        .to_bytes();
    if let Some(pid) = pid_of(&body) {
        pids.insert(pid);
    }
    if (200..300).contains(&status) {
        Ok(Some(status))
    } else {
        Err(Failure::Status)
    }
}

/// The value of a `"pid":N` field in a JSON body.
fn pid_of(body: &[u8]) -> Option<u32> {
    let key = b"\"pid\":";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: String = body[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .map(|b| *b as char)
        .collect();
    digits.parse().ok()
}

struct Clock {
    start: Instant,
    end: Instant,
    timeout: Duration,
    /// Set by SIGINT or SIGTERM: the load ends early, results are printed.
    stop: std::sync::atomic::AtomicBool,
}

impl Clock {
    fn running(&self) -> bool {
        Instant::now() < self.end && !self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn sample(&self, began: Instant, outcome: Result<u16, Failure>) -> Sample {
        let now = Instant::now();
        Sample {
            end_ms: u32::try_from(now.duration_since(self.start).as_millis()).unwrap_or(u32::MAX),
            micros: u32::try_from(now.duration_since(began).as_micros()).unwrap_or(u32::MAX),
            outcome,
        }
    }
}

async fn client(t: &Target, clock: &Clock, mode: Mode) -> (Vec<Sample>, HashSet<u32>) {
    let mut samples = Vec::new();
    let mut pids = HashSet::new();
    let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
    while clock.running() {
        let began = Instant::now();
        let one = async {
            loop {
                let (mut sender, reused) = match conn.take() {
                    Some(s) if mode == Mode::Keepalive && !s.is_closed() => (s, true),
                    _ => (connect(t).await?, false),
                };
                match exchange(&mut sender, request(t, mode == Mode::Close), &mut pids).await {
                    // An idle keep-alive connection the server had closed: the
                    // request goes out again on a new one.
                    Ok(None) if reused => continue,
                    // A new connection closed before it could carry the request.
                    Ok(None) => return Err(Failure::Broken),
                    Ok(Some(status)) => {
                        conn = Some(sender);
                        return Ok(status);
                    }
                    Err(f) => {
                        if f == Failure::Status {
                            conn = Some(sender);
                        }
                        return Err(f);
                    }
                }
            }
        };
        let outcome = match tokio::time::timeout(clock.timeout, one).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        samples.push(clock.sample(began, outcome));
    }
    (samples, pids)
}

/// New-connection GETs every `every`; returns (samples, longest outage ms, outages).
async fn probe(t: &Target, clock: &Clock, every: Duration) -> (Vec<Sample>, u64, u64) {
    let mut samples = Vec::new();
    let mut pids = HashSet::new();
    let (mut longest, mut outages) = (Duration::ZERO, 0);
    let mut down_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let began = Instant::now();
        if !clock.running() {
            break;
        }
        let one = async {
            let mut s = connect(t).await?;
            match exchange(&mut s, request(t, true), &mut pids).await? {
                Some(status) => Ok(status),
                None => Err(Failure::Broken),
            }
        };
        let outcome = match tokio::time::timeout(clock.timeout, one).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        match (&outcome, down_since) {
            (Err(_), None) => {
                down_since = Some(began);
                outages += 1;
            }
            (Ok(_), Some(since)) => {
                longest = longest.max(began.duration_since(since));
                down_since = None;
            }
            _ => {}
        }
        samples.push(clock.sample(began, outcome));
    }
    if let Some(since) = down_since {
        longest = longest.max(since.elapsed());
    }
    (
        samples,
        u64::try_from(longest.as_millis()).unwrap_or(u64::MAX),
        outages,
    )
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank: the smallest value with at least p of the samples at or below it.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1000.0
}

fn write_series(
    path: &PathBuf,
    samples: &[Sample],
    bucket_ms: u64,
    duration_ms: u64,
) -> std::io::Result<()> {
    let n = usize::try_from(duration_ms.div_ceil(bucket_ms))
        .unwrap_or(0)
        .max(1);
    let mut ok = vec![0u64; n];
    let mut failed = vec![0u64; n];
    let mut lat: Vec<Vec<u32>> = vec![Vec::new(); n];
    for s in samples {
        let i = usize::try_from(u64::from(s.end_ms) / bucket_ms)
            .unwrap_or(usize::MAX)
            .min(n - 1);
        match s.outcome {
            Ok(_) => {
                ok[i] += 1;
                lat[i].push(s.micros);
            }
            Err(_) => failed[i] += 1,
        }
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "t_s,ok_per_s,failed_per_s,p99_ms")?;
    let per_s = 1000.0 / bucket_ms as f64;
    for i in 0..n {
        lat[i].sort_unstable();
        writeln!(
            f,
            "{:.2},{:.0},{:.0},{:.3}",
            (i as u64 * bucket_ms) as f64 / 1000.0,
            ok[i] as f64 * per_s,
            failed[i] as f64 * per_s,
            percentile(&lat[i], 0.99)
        )?;
    }
    f.flush()
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let target = match parse_url(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("zdt-load: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if !(args.duration > 0.0 && args.timeout > 0.0 && args.connections > 0 && args.bucket_ms > 0) {
        eprintln!("zdt-load: duration, timeout, connections and bucket must be above 0");
        return std::process::ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zdt-load: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let start_epoch_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let start = Instant::now();
    let clock = std::sync::Arc::new(Clock {
        start,
        end: start + Duration::from_secs_f64(args.duration),
        timeout: Duration::from_secs_f64(args.timeout),
        stop: std::sync::atomic::AtomicBool::new(false),
    });
    let target = std::sync::Arc::new(target);
    let (mut samples, pids, probe) = rt.block_on(async {
        for kind in [
            tokio::signal::unix::SignalKind::interrupt(),
            tokio::signal::unix::SignalKind::terminate(),
        ] {
            if let Ok(mut sig) = tokio::signal::unix::signal(kind) {
                let c = clock.clone();
                tokio::spawn(async move {
                    sig.recv().await;
                    c.stop.store(true, std::sync::atomic::Ordering::Relaxed);
                });
            }
        }
        let clients: Vec<_> = (0..args.connections)
            .map(|_| {
                let (t, c) = (target.clone(), clock.clone());
                tokio::spawn(async move { client(&t, &c, args.mode).await })
            })
            .collect();
        let probe = (args.probe_ms > 0).then(|| {
            let (t, c) = (target.clone(), clock.clone());
            tokio::spawn(async move { probe(&t, &c, Duration::from_millis(args.probe_ms)).await })
        });
        let mut samples = Vec::new();
        let mut pids = HashSet::new();
        for c in clients {
            if let Ok((s, p)) = c.await {
                samples.extend(s);
                pids.extend(p);
            }
        }
        let probe = match probe {
            Some(p) => p.await.ok(),
            None => None,
        };
        (samples, pids, probe)
    });
    let (probe_samples, longest, outages) = probe.unwrap_or_default();
    // The load ran this long (less than asked when stopped by a signal).
    let elapsed = start.elapsed().as_secs_f64().min(args.duration);
    let probe_failed = probe_samples.iter().filter(|s| s.outcome.is_err()).count();
    let count = |f: Failure| samples.iter().filter(|s| s.outcome == Err(f)).count();
    let (connect, broken, status, timeout) = (
        count(Failure::Connect),
        count(Failure::Broken),
        count(Failure::Status),
        count(Failure::Timeout),
    );
    let mut lat: Vec<u32> = samples
        .iter()
        .filter(|s| s.outcome.is_ok())
        .map(|s| s.micros)
        .collect();
    lat.sort_unstable();
    let good = lat.len();
    let requests = samples.len();
    let failed = requests - good;
    if let Some(path) = &args.series {
        // The probe's failures are failures too.
        samples.extend(probe_samples.into_iter().filter(|s| s.outcome.is_err()));
        let ms = (elapsed * 1000.0) as u64;
        if let Err(e) = write_series(path, &samples, args.bucket_ms, ms) {
            eprintln!("zdt-load: {}: {e}", path.display());
            return std::process::ExitCode::from(2);
        }
    }
    println!(
        "LOAD label={} mode={} start_epoch_ms={start_epoch_ms} requests={} ok={good} failed={} \
         (connect={connect},broken={broken},non2xx={status},timeout={timeout}) probe_failed={probe_failed} \
         p50_ms={:.2} p99_ms={:.2} max_ms={:.2} rps={:.0} npids={} outages={outages} longest_outage_ms={longest}",
        args.label,
        match args.mode {
            Mode::Keepalive => "keepalive",
            Mode::Close => "close",
        },
        requests,
        failed + probe_failed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
        good as f64 / elapsed,
        pids.len(),
    );
    if failed + probe_failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pid_in_a_json_body() {
        assert_eq!(pid_of(br#"{"pid":4242,"generation":3}"#), Some(4242));
        assert_eq!(pid_of(br#"{"pid": 17}"#), Some(17));
        assert_eq!(pid_of(br#"{"ppid":"x"}"#), None);
        assert_eq!(pid_of(b"ok\n"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert!((percentile(&v, 0.99) - 99.0).abs() < f64::EPSILON);
        assert!((percentile(&v, 0.50) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&[7000], 0.99) - 7.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 0.99).abs() < f64::EPSILON);
    }

    #[test]
    fn only_loopback_http_targets() {
        let t = parse_url("http://127.0.0.1:8080/?sleep=20").expect("loopback");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(t.path, "/?sleep=20");
        assert!(parse_url("http://localhost/").is_ok());
        assert!(parse_url("http://[::1]:9/").is_ok());
        assert!(parse_url("http://10.1.2.3/").is_err());
        assert!(parse_url("http://example.com/").is_err());
        assert!(parse_url("https://127.0.0.1/").is_err());
    }
}
