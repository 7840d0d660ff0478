//! Retiring, end to end: a real [`Proxy`] on a real listening socket in
//! front of a small HTTP server, with clients over real TCP.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::Retired;
use crate::config::Protocol;
use crate::proxy::table::LocalTable as RouteTable;
use crate::proxy::{
    LocalHandle as ProxyHandle, LocalProxy as Proxy, Options, PrivateAddr, ProcessId, Route,
    RouteSet,
};

/// Bound on every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(5);
/// How long a client waits to be sure it gets no answer.
const SILENCE: Duration = Duration::from_millis(300);
const GRACE: Duration = Duration::from_millis(200);
/// A deadline no test that passes reaches.
const FAR: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// An HTTP/1.1 server with keep-alive: answers `GET <path>` with
/// `hello <path>`, except `/slow`, which it reports on `arrived` and holds
/// until `release` is set.
struct Upstream {
    addr: SocketAddr,
    arrived: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
}

impl Upstream {
    async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = l.local_addr().expect("upstream address");
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let (release, release_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve_upstream(s, arrived_tx.clone(), release_rx.clone()));
            }
        });
        Self {
            addr,
            arrived,
            release,
        }
    }
}

async fn serve_upstream(
    mut s: TcpStream,
    arrived: mpsc::UnboundedSender<()>,
    mut release: watch::Receiver<bool>,
) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        if path == "/slow" {
            let _ = arrived.send(());
            if release.wait_for(|r| *r).await.is_err() {
                return;
            }
        }
        let body = format!("hello {path}");
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One answer as a client saw it.
struct Answer {
    /// The head, lowercase.
    head: String,
    body: String,
}

impl Answer {
    fn ok(&self) -> bool {
        self.head.starts_with("http/1.1 200") || self.head.starts_with("http/1.0 200")
    }

    fn closes(&self) -> bool {
        self.head.contains("\r\nconnection: close\r\n")
    }
}

/// A client connection reading answers framed by Content-Length.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let s = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect to the proxy");
        Self { s, buf: Vec::new() }
    }

    async fn get(&mut self, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        self.s
            .write_all(req.as_bytes())
            .await
            .expect("send request");
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        match self.s.read(&mut chunk).await? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// The next answer; an error if the connection ends first.
    async fn answer(&mut self) -> std::io::Result<Answer> {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while self.buf.len() < end + len {
            self.fill().await?;
        }
        let body = String::from_utf8_lossy(&self.buf[end..end + len]).into_owned();
        self.buf.drain(..end + len);
        Ok(Answer { head, body })
    }

    /// Whether the proxy closes the connection (EOF; a reset is a failure).
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            within("the end of the connection", self.s.read(&mut chunk)).await,
            Ok(0)
        )
    }
}

/// A proxy on two threads in front of an [`Upstream`]; shut down on drop.
struct Fixture {
    proxy: Proxy,
    up: Upstream,
    table: RouteTable,
    handles: Vec<ProxyHandle>,
}

impl Fixture {
    async fn new() -> Self {
        let up = Upstream::start().await;
        let proxy = Proxy::new(2);
        let table = proxy.table();
        table.publish(&RouteSet {
            routes: vec![Route {
                process: ProcessId {
                    instance: 0,
                    generation: 1,
                    serial: 1,
                },
                addr: PrivateAddr::Tcp(up.addr),
            }],
            ..RouteSet::default()
        });
        Self {
            proxy,
            up,
            table,
            handles: Vec::new(),
        }
    }

    /// Starts a proxy on a new listening socket; its address.
    fn listen(&mut self, protocol: Protocol) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("address");
        let fd = Arc::new(OwnedFd::from(l));
        let options = Options {
            queue_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            upstream_idle_timeout: Duration::from_secs(30),
            max_header_bytes: 8192,
            forward_headers: true,
            protocol,
            max_connections: Some(64),
        };
        let handle = self
            .proxy
            .start("t", &[fd], options, &self.table)
            .expect("start the proxy");
        self.handles.push(handle);
        addr
    }

    /// Starts retiring on a task; returns once it has begun.
    async fn retire(
        &self,
        grace: Duration,
        deadline: Duration,
    ) -> tokio::task::JoinHandle<Retired> {
        let mut paused = self.proxy.workers.retire().subscribe();
        let proxy = self.proxy.clone();
        let task = tokio::spawn(async move { proxy.retire(grace, deadline).await });
        within("retiring to begin", paused.wait_for(|p| *p))
            .await
            .expect("the proxy lives");
        task
    }

    /// Waits until the upstream holds a `/slow` request.
    async fn slow_arrived(&mut self) {
        within("the slow request upstream", self.up.arrived.recv())
            .await
            .expect("upstream running");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.up.release.send(true);
        self.proxy.shutdown();
    }
}

async fn resolved(task: tokio::task::JoinHandle<Retired>) -> Retired {
    within("retire to resolve", task).await.expect("retire ran")
}

#[tokio::test]
async fn an_answer_in_flight_when_retiring_begins_closes_its_connection() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Http);
    let mut c = Client::connect(addr).await;
    // Keep-alive first: the connection stays open after an answer.
    c.get("/").await;
    let a = within("first answer", c.answer()).await.expect("answer");
    assert!(a.ok() && !a.closes(), "before retiring: {}", a.head);
    c.get("/slow").await;
    f.slow_arrived().await;
    let retiring = f.retire(GRACE, FAR).await;
    assert!(!retiring.is_finished(), "resolved with a request in flight");
    f.up.release.send_replace(true);
    let a = within("the answer in flight", c.answer())
        .await
        .expect("the answer in flight is whole");
    assert!(a.ok(), "{}", a.head);
    assert_eq!(a.body, "hello /slow");
    assert!(a.closes(), "no Connection: close in {}", a.head);
    assert!(
        c.closed().await,
        "the connection stays open after its answer"
    );
    let r = resolved(retiring).await;
    assert_eq!(r.still_open, 0);
    r.commit();
}

#[tokio::test]
async fn a_next_request_within_the_grace_is_answered_then_closed() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Http);
    let mut c = Client::connect(addr).await;
    c.get("/").await;
    let a = within("first answer", c.answer()).await.expect("answer");
    assert!(a.ok() && !a.closes());
    let retiring = f.retire(GRACE, FAR).await;
    // The client's think time: its next request comes 50 ms into retiring,
    // as it may on any keep-alive connection.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.get("/next").await;
    let a = within("the next answer", c.answer())
        .await
        .expect("a request within the grace is answered, not cut");
    assert!(a.ok(), "{}", a.head);
    assert_eq!(a.body, "hello /next");
    assert!(a.closes(), "no Connection: close in {}", a.head);
    assert!(c.closed().await);
    let r = resolved(retiring).await;
    assert_eq!(r.still_open, 0);
    drop(r);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_grace_and_retiring_ends_then() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Http);
    let mut c = Client::connect(addr).await;
    c.get("/").await;
    within("first answer", c.answer()).await.expect("answer");
    let retiring = f.retire(GRACE, FAR).await;
    assert!(c.closed().await, "the idle connection is not closed");
    let r = resolved(retiring).await;
    assert_eq!(r.still_open, 0);
    assert!(r.took >= GRACE, "closed before the grace: {:?}", r.took);
    assert!(r.took < WAIT, "waited for the deadline: {:?}", r.took);
}

#[tokio::test]
async fn a_connection_busy_past_the_deadline_is_counted() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Http);
    let mut busy = Client::connect(addr).await;
    let mut idle = Client::connect(addr).await;
    idle.get("/").await;
    within("idle's answer", idle.answer())
        .await
        .expect("answer");
    busy.get("/slow").await;
    f.slow_arrived().await;
    let deadline = Duration::from_millis(400);
    let r = resolved(f.retire(Duration::from_millis(50), deadline).await).await;
    assert_eq!(r.still_open, 1, "the slow request's connection");
    assert!(r.took >= deadline, "{:?}", r.took);
    assert!(idle.closed().await);
    r.commit();
    // Still served to its end: only the exec would cut it.
    f.up.release.send_replace(true);
    let a = within("the slow answer", busy.answer())
        .await
        .expect("answer");
    assert!(a.ok() && a.closes(), "{}", a.head);
}

#[tokio::test]
async fn while_retired_new_clients_wait_in_the_backlog_until_resumed() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Http);
    let r = resolved(f.retire(GRACE, FAR).await).await;
    assert_eq!(r.still_open, 0);
    // A program started while retired does not accept either.
    let later = f.listen(Protocol::Http);
    let mut waiting = Vec::new();
    for addr in [addr, later] {
        // The kernel completes the connect: the socket is still listening.
        let mut c = Client::connect(addr).await;
        c.get("/").await;
        let silent = tokio::time::timeout(SILENCE, c.answer()).await;
        assert!(silent.is_err(), "answered while retired");
        waiting.push(c);
    }
    drop(r);
    for mut c in waiting {
        let a = within("the answer after resuming", c.answer())
            .await
            .expect("served after resuming");
        assert!(a.ok() && !a.closes(), "{}", a.head);
        // Keep-alive as usual again.
        c.get("/again").await;
        let a = within("a second answer", c.answer()).await.expect("answer");
        assert_eq!(a.body, "hello /again");
        assert!(!a.closes());
    }
}

#[tokio::test]
async fn the_hyper_path_closes_after_its_answer_in_flight() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Http);
    let mut c = Client::connect(addr).await;
    // HTTP/1.0 goes through hyper; keep-alive asked for.
    c.s.write_all(b"GET /slow HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .expect("send");
    f.slow_arrived().await;
    let retiring = f.retire(GRACE, FAR).await;
    f.up.release.send_replace(true);
    let a = within("the answer", c.answer()).await.expect("answer");
    assert!(a.ok(), "{}", a.head);
    assert!(a.closes(), "no Connection: close in {}", a.head);
    assert!(c.closed().await);
    assert_eq!(resolved(retiring).await.still_open, 0);
}

#[tokio::test]
async fn tcp_connections_are_waited_for_not_closed() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Tcp);
    let mut c = Client::connect(addr).await;
    c.get("/").await;
    within("first answer", c.answer()).await.expect("answer");
    let retiring = f.retire(Duration::from_millis(10), FAR).await;
    // Bytes still flow both ways while retiring.
    c.get("/during").await;
    let a = within("an answer while retiring", c.answer())
        .await
        .expect("the tcp connection was cut");
    assert_eq!(a.body, "hello /during");
    assert!(!retiring.is_finished(), "resolved with a connection open");
    drop(c);
    let r = resolved(retiring).await;
    assert_eq!(r.still_open, 0);
}

#[tokio::test]
async fn retirements_nest_and_the_last_one_dropped_resumes() {
    let f = Fixture::new().await;
    let retire = f.proxy.workers.retire();
    let first = resolved(f.retire(GRACE, FAR).await).await;
    let second = resolved(f.retire(GRACE, FAR).await).await;
    drop(first);
    assert!(retire.is_retiring());
    drop(second);
    assert!(!retire.is_retiring());
    // A retire future dropped before it resolves resumes too: one that
    // waits for an open tcp connection.
    let mut f = f;
    let addr = f.listen(Protocol::Tcp);
    let mut c = Client::connect(addr).await;
    c.get("/").await;
    within("an answer", c.answer()).await.expect("answer");
    let task = f.retire(GRACE, FAR).await;
    task.abort();
    assert!(task.await.is_err_and(|e| e.is_cancelled()), "resolved");
    assert!(!f.proxy.workers.retire().is_retiring());
}

/// The relay's side of moving a connection between proxy threads: a
/// kept-alive connection on a thread that holds clearly more open
/// connections than the other moves there after its first answer, and its
/// next requests are served there.
#[tokio::test]
async fn kept_alive_connections_leave_a_busy_thread_after_their_first_answer() {
    let mut f = Fixture::new().await;
    let addr = f.listen(Protocol::Http);
    let conns = f.proxy.workers.conns().clone();
    // Thread 0 holds 20 (counted, not real), thread 1 none.
    let busy: Vec<_> = (0..20).map(|_| f.proxy.workers.open_on(0)).collect();
    // Both threads accept; of 8 connections, those thread 0 accepts (all
    // but one in 256 runs) must move, those thread 1 accepts stay.
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut c = Client::connect(addr).await;
        c.get(&format!("/first{i}")).await;
        let a = within("a first answer", c.answer())
            .await
            .expect("answered");
        assert!(a.ok() && !a.closes(), "{}", a.head);
        clients.push(c);
    }
    // Each moves once its answer is written, which the client may read first.
    within("every connection on thread 1", async {
        while (conns.open_at(0), conns.open_at(1)) != (20, 8) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    for (i, c) in clients.iter_mut().enumerate() {
        c.get(&format!("/next{i}")).await;
        let a = within("an answer after the move", c.answer())
            .await
            .expect("answered");
        assert!(a.ok(), "{}", a.head);
        assert_eq!(a.body, format!("hello /next{i}"));
    }
    drop(busy);
    assert_eq!(conns.open_at(0), 0);
}
