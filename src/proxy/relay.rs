//! The proxy's HTTP/1.1 path for ordinary requests: one task per client
//! connection reads a request head, writes it (rewritten) and the body to a
//! pooled upstream connection, reads the response head and relays the
//! response body by its framing. There is no second codec, no header map,
//! no task per upstream connection and no channel between them: each byte
//! is read once and written once, and the only copies are of heads.
//!
//! Anything else is handed to the hyper-based path at a request boundary,
//! with the bytes read so far: HTTP/1.0, Upgrade, Expect, CONNECT, an
//! absolute-form target, hop-by-hop headers other than `Connection:
//! keep-alive/close`, and every head hyper refuses (400, 431). So the
//! protection and the rare features stay where they are tested, and this
//! path only has to be right for requests that are well formed.
//!
//! An idle client connection holds no buffer: its read buffer goes back to
//! the thread's spares while it waits for its next request, and the state of
//! a request is boxed while it runs, so the connection's task stays small.

#[doc(hidden)]
pub mod fuzz;

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::time::Instant;

use super::addr::Stream;
use super::canary::{Pin, RawHead};
use super::codec::{
    add_cookie, may_end_head, parse_request, parse_response, push_header, request_line_too_long,
    Framing, Parsed, ParsedResponse, Request, Response,
};
use super::retire::{Closing, Registered};
use super::splice::SpliceIo;
use super::{
    framing, route, workers, InflightGuard, PrivateAddr, Refused, Shared, CONNECT_TIMEOUT,
};

/// Size of the read buffers, for requests and for responses.
const BUF: usize = 16 * 1024;

/// Spare read buffers kept per proxy thread.
const SPARE_MAX: usize = 64;

thread_local! {
    /// Read buffers between uses. Taking a buffer for each request and
    /// freeing it after made glibc give the pages back and fault them in
    /// again: 0.28 page faults per request, nginx none.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read buffer from this thread's spares, given back when dropped.
#[derive(Default)]
struct Buffer(BytesMut);

impl Buffer {
    fn take() -> Self {
        let spare = SPARE.with(|s| s.borrow_mut().pop());
        Self(spare.unwrap_or_else(|| BytesMut::with_capacity(BUF)))
    }

    /// Room for a read, from the spares if it holds no memory yet.
    fn room(&mut self) {
        if self.0.capacity() == 0 {
            *self = Self::take();
        }
        self.0.reserve(BUF);
    }

    /// Gives the memory back to the spares; the buffer is empty after.
    fn release(&mut self) {
        if self.0.capacity() == 0 {
            return;
        }
        let mut b = std::mem::take(&mut self.0);
        b.clear();
        // After clear, reserve only moves the start back: no allocation.
        b.reserve(BUF);
        if b.capacity() == BUF {
            SPARE.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < SPARE_MAX {
                    s.push(b);
                }
            });
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::ops::Deref for Buffer {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.0
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.0
    }
}

/// Idle relay connections to one upstream, per proxy thread. Dropping it
/// (with its upstream, at the switch) closes them.
pub(crate) struct Idle(workers::IdleLists<Stream>);

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Idle")
    }
}

impl Idle {
    pub(crate) fn new(threads: usize) -> Self {
        Self(workers::IdleLists::new(threads))
    }

    /// The most recently used idle connection the worker has not closed.
    fn take(&self) -> Option<Stream> {
        loop {
            let s = self.0.pop()?;
            if still_open(&s) {
                return Some(s);
            }
        }
    }

    /// Keeps `s` for the next request, for up to `keep_for`
    /// (`upstream_idle_timeout`). The least recently used one is checked
    /// too, so connections the worker closed while they sat at the bottom of
    /// the list do not pile up (in CLOSE_WAIT) under steady load.
    fn put(&self, s: Stream, keep_for: std::time::Duration) {
        self.0.push(s, keep_for, |oldest| !still_open(oldest));
    }
}

/// Whether an idle upstream connection is still open: it has nothing to
/// read, so readable means closed (or a protocol error). No syscall unless
/// the reactor saw an event on it.
fn still_open(s: &Stream) -> bool {
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// A plain-text answer of zdt's own; `headers` are added as they are.
pub(super) fn text(status: &str, body: &str, headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const CLOSE: &str = "Connection: close\r\n";

/// What the client connection does after a request.
enum Outcome {
    /// It may carry another request.
    KeepAlive,
    /// It is closed.
    Close,
    /// It is closed, with bytes of the request maybe still unread: they are
    /// read and dropped for a moment first, so that closing does not reset
    /// the connection before the client has read the answer.
    CloseUnread,
}

/// A client connection on this path.
struct Client<S> {
    io: S,
    /// Bytes read and not yet used: the next head, or body bytes.
    buf: Buffer,
    /// The client's address as text, for X-Forwarded-For.
    peer: Option<Box<[u8]>>,
    shared: Arc<Shared>,
}

/// Serves a client connection: ordinary requests here, the rest handed to
/// the hyper path with the bytes already read.
pub(super) async fn serve<S>(io: S, peer: Option<IpAddr>, shared: Arc<Shared>)
where
    S: SpliceIo + AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let mut c = Client {
        io,
        buf: Buffer::default(),
        peer: peer.map(|ip| ip.to_string().into_bytes().into_boxed_slice()),
        shared,
    };
    // Woken when retiring begins or ends.
    let _registered = Registered::here(c.shared.workers.conns()).await;
    let timeout = c.shared.options.header_timeout;
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(sleep);
    loop {
        // The header timeout runs from connect or from the previous response.
        let deadline = Instant::now() + timeout;
        sleep.as_mut().reset(deadline);
        let mut out = Vec::new();
        // Where the bytes not yet searched for the end of a head begin.
        let mut unsearched = 0;
        let req = loop {
            if c.buf.is_empty() {
                // Idle: no buffer is held while the client thinks.
                c.buf.release();
                // Retiring: a next request may already be on its way, so
                // the connection waits up to `grace` for it, then closes.
                let retire = c.shared.workers.retire();
                let retiring = retire.is_retiring();
                if retiring {
                    sleep
                        .as_mut()
                        .reset(deadline.min(Instant::now() + retire.grace()));
                }
                tokio::select! {
                    biased;
                    r = c.io.ready(Interest::READABLE) => if r.is_err() { return },
                    () = &mut sleep => return,
                    () = retire.turned(retiring) => {
                        sleep.as_mut().reset(deadline);
                        continue;
                    }
                }
                if retiring {
                    // A head is coming: it has the whole header timeout.
                    sleep.as_mut().reset(deadline);
                }
            } else if request_line_too_long(&c.buf) {
                // At once, not when (if ever) the head is whole.
                let too_long = text("414 URI Too Long", TOO_LONG, CLOSE);
                let _ = c.io.write_all(&too_long).await;
                let _ = c.io.shutdown().await;
                return Box::pin(linger(c.io)).await;
            } else if unsearched == 0
                || may_end_head(&c.buf, unsearched)
                || c.buf.len() > c.shared.options.max_header_bytes
            {
                // What is here first: a pipelined request may be whole.
                let options = &c.shared.options;
                match parse_request(
                    &c.buf,
                    &mut out,
                    c.peer.as_deref(),
                    options.forward_headers,
                    options.max_header_bytes,
                ) {
                    Parsed::Request(r) => break r,
                    Parsed::Partial => {}
                    Parsed::Elsewhere => return Box::pin(elsewhere(c, peer)).await,
                }
            }
            unsearched = c.buf.len();
            c.buf.room();
            tokio::select! {
                biased;
                r = c.io.read_buf(&mut c.buf.0) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = &mut sleep => return,
            }
        };
        // Boxed: an idle connection then holds only what waiting needs.
        match Box::pin(forward(&mut c, req, out)).await {
            Outcome::KeepAlive => {}
            Outcome::Close => {
                let _ = c.io.shutdown().await;
                return;
            }
            Outcome::CloseUnread => {
                let _ = c.io.shutdown().await;
                return Box::pin(linger(c.io)).await;
            }
        }
    }
}

/// Reads and drops what the client still sends, for up to a second or
/// 1 MiB, until it closes (nginx's lingering close).
async fn linger<S: AsyncRead + Unpin>(mut io: S) {
    let mut sink = vec![0u8; 16 * 1024];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => return,
            }
        }
    })
    .await;
}

/// Hands the connection to the hyper path, the bytes read so far first.
async fn elsewhere<S>(mut c: Client<S>, peer: Option<IpAddr>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let gate = Arc::new(framing::Gate::default());
    let io = framing::Framing::with_prefix(
        c.io,
        std::mem::take(&mut c.buf.0),
        Some(gate.clone()),
        c.shared.options.max_header_bytes,
    );
    super::serve(TokioIo::new(io), peer, c.shared, gate).await;
}

/// Writes an answer of zdt's own (only its head to a HEAD request); `close`
/// if the connection ends after it.
async fn answer<S: AsyncWrite + Unpin>(
    c: &mut Client<S>,
    bytes: &[u8],
    head: bool,
    close: bool,
) -> Outcome {
    let bytes = match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) if head => &bytes[..end + 4],
        _ => bytes,
    };
    match c.io.write_all(bytes).await {
        Ok(()) if !close => Outcome::KeepAlive,
        Ok(()) => Outcome::CloseUnread,
        Err(_) => Outcome::Close,
    }
}

/// A request on its way: the instance, its in-flight guard, the connection.
struct Sent {
    up: Arc<super::Upstream>,
    guard: InflightGuard,
    conn: Stream,
    /// The connection served an earlier request.
    reused: bool,
}

/// Why a request could not be sent.
enum NotSent {
    /// No instance became ready within queue_timeout (503).
    NoInstance,
    /// The gate turned it away: held past max-pause, or maintenance (503).
    Closed(super::gate::Closed),
    /// No ready instance could be reached; nothing reached an app (502).
    Unreachable,
    /// Writing failed after the worker may have taken some of the request,
    /// which is not safe to send twice (502, counted as failed).
    Broken(Arc<super::Upstream>, InflightGuard, io::Error),
}

/// Writes all of `data`; on failure says how many bytes the kernel took.
async fn write_counted(s: &mut Stream, data: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < data.len() {
        match s.write(&data[done..]).await {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// Sends the request head in `out` (rebuilt for each instance from `mark`:
/// Host if the client sent none, the blank line, then the body bytes `pre`)
/// to the least loaded ready instance, on an idle connection unless `fresh`.
/// An idle connection the worker closed meanwhile fails before it takes a
/// byte, and the next is tried; an instance that cannot be connected to, or
/// whose new connection fails before it takes a byte, is skipped (added to
/// `tried`). A request safe to send twice is also retried after a partial
/// write.
#[allow(clippy::too_many_arguments)]
async fn send(
    shared: &Shared,
    req: &Request,
    out: &mut Vec<u8>,
    mark: usize,
    pre: &[u8],
    tried: &mut Vec<PrivateAddr>,
    fresh: bool,
    pin: &mut Pin,
) -> Result<Sent, NotSent> {
    loop {
        let (up, guard) = match route(shared, tried, pin, &RawHead(&out[..mark])).await {
            Ok(routed) => routed,
            Err(Refused::Closed(why)) => return Err(NotSent::Closed(why)),
            Err(Refused::NoInstance) if tried.is_empty() => return Err(NotSent::NoInstance),
            Err(Refused::NoInstance) => return Err(NotSent::Unreachable),
        };
        out.truncate(mark);
        if !req.host {
            push_header(out, b"Host", up.authority.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(pre);
        while let Some(mut conn) = if fresh { None } else { up.idle.take() } {
            match write_counted(&mut conn, out).await {
                Ok(()) => {
                    return Ok(Sent {
                        up,
                        guard,
                        conn,
                        reused: true,
                    })
                }
                Err((0, _)) => {}
                Err(_) if req.resendable => {}
                Err((_, e)) => return Err(NotSent::Broken(up, guard, e)),
            }
        }
        let cause = match Box::pin(up.addr.connect_within(CONNECT_TIMEOUT)).await {
            Ok(mut conn) => match write_counted(&mut conn, out).await {
                Ok(()) => {
                    return Ok(Sent {
                        up,
                        guard,
                        conn,
                        reused: false,
                    })
                }
                Err((0, e)) => e,
                Err((_, e)) if req.resendable => e,
                Err((_, e)) => return Err(NotSent::Broken(up, guard, e)),
            },
            Err(e) => e,
        };
        tracing::warn!(program = %shared.program, upstream = %up.addr, %cause, "connect failed; trying another instance");
        guard.discard();
        tried.push(up.addr.clone());
    }
}

/// Peeks at a socket: `Ok(0)` at its end, `Ok(1)` with bytes to read,
/// `WouldBlock` (readiness cleared) with nothing yet.
fn peek<S: SpliceIo>(s: &S) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let fd = s.fd().as_raw_fd();
    s.try_io(Interest::READABLE, || {
        let mut b = 0u8;
        // SAFETY: recv into one valid byte of our own, on a socket we own.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    })
}

/// Resolves once the client has closed its connection (or it broke); never
/// while the client is there, sending more requests or not.
async fn client_gone<S: SpliceIo>(s: &S) {
    loop {
        if s.ready(Interest::READABLE).await.is_err() {
            return;
        }
        match peek(s) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // A pipelined request: the client is there.
            Ok(n) if n > 0 => return std::future::pending().await,
            _ => return,
        }
    }
}

/// Forwards one request (its head rewritten in `out`) and relays its answer.
async fn forward<S>(c: &mut Client<S>, req: Request, mut out: Vec<u8>) -> Outcome
where
    S: SpliceIo + AsyncRead + AsyncWrite + Unpin,
{
    let shared = c.shared.clone();
    if shared.draining.load(Ordering::SeqCst) {
        return answer(c, &super::unavailable_text(&shared), req.head, true).await;
    }
    c.buf.advance(req.len);
    let mut body = req.body;
    // Body bytes already read go out with the head.
    let Some((pre, body_done)) = body.take(&c.buf) else {
        let bad = text("400 Bad Request", BAD_CHUNKS, CLOSE);
        return answer(c, &bad, req.head, true).await;
    };
    let mark = out.len();
    let mut tried: Vec<PrivateAddr> = Vec::new();
    let mut pin = Pin::default();
    let sent = send(
        &shared,
        &req,
        &mut out,
        mark,
        &c.buf[..pre],
        &mut tried,
        false,
        &mut pin,
    )
    .await;
    let Sent {
        mut up,
        mut guard,
        conn: mut upstream,
        reused,
    } = match sent {
        Ok(s) => s,
        Err(NotSent::NoInstance) => {
            return answer(c, &super::unavailable_text(&shared), req.head, true).await
        }
        Err(NotSent::Closed(why)) => {
            return answer(c, &super::closed_text(&shared, &why), req.head, true).await
        }
        Err(NotSent::Unreachable) => {
            let bad = text("502 Bad Gateway", UNREACHABLE, CLOSE);
            return answer(c, &bad, req.head, true).await;
        }
        Err(NotSent::Broken(up, mut guard, cause)) => {
            guard.fail();
            let path = String::from_utf8_lossy(&out[req.target.0..req.target.1]).into_owned();
            tracing::warn!(program = %shared.program, upstream = %up.addr, %path, %cause, "upstream failed; answered 502");
            let bad = text("502 Bad Gateway", FAILED, CLOSE);
            return answer(c, &bad, req.head, true).await;
        }
    };
    c.buf.advance(pre);
    let mut rbuf = Buffer::take();
    if !body_done {
        let whole = duplex(
            c,
            &shared.options,
            &mut upstream,
            &mut rbuf,
            &req,
            body,
            &mut guard,
            &shared.program,
            &up.addr,
            &out,
            pin.set_cookie(&up),
        )
        .await;
        return match whole {
            Some(Duplexed {
                reusable,
                body_whole,
                close,
            }) => {
                if reusable {
                    up.idle.put(upstream, shared.options.upstream_idle_timeout);
                }
                drop(guard);
                match (close, body_whole) {
                    (false, _) => Outcome::KeepAlive,
                    (true, true) => Outcome::Close,
                    (true, false) => Outcome::CloseUnread,
                }
            }
            None => Outcome::Close,
        };
    }
    // The whole request is with the worker: read its answer's head, while
    // watching the client. One that goes away meanwhile ends the request:
    // the worker's connection is closed, so it may stop, and a drain does
    // not wait for it (nginx's 499).
    let close = Closing::new(req.close, shared.workers.retire());
    let mut head = Vec::new();
    let mut resp = match head_unless_gone(
        &mut upstream,
        &mut rbuf,
        &mut head,
        &req,
        &close,
        &c.io,
        shared.options.response_timeout,
    )
    .await
    {
        Some(r) => r,
        None => {
            abandoned(&shared.program, &up.addr, &out, req.target, guard);
            return Outcome::Close;
        }
    };
    if let Err(Failed { silent: true, .. }) = resp {
        // The keep-alive close race: the worker closed this idle connection
        // as the request went out on it, and said nothing. A request that is
        // safe to send twice goes out once more, on a new connection.
        if reused && req.resendable && !guard.is_cut() {
            tracing::debug!(program = %shared.program, upstream = %up.addr, "a reused connection was closed under a request; sending it again");
            guard.discard();
            match send(
                &shared,
                &req,
                &mut out,
                mark,
                &[],
                &mut tried,
                true,
                &mut pin,
            )
            .await
            {
                Ok(s) => {
                    (up, guard, upstream) = (s.up, s.guard, s.conn);
                    let again = head_unless_gone(
                        &mut upstream,
                        &mut rbuf,
                        &mut head,
                        &req,
                        &close,
                        &c.io,
                        shared.options.response_timeout,
                    );
                    match again.await {
                        Some(r) => resp = r,
                        None => {
                            abandoned(&shared.program, &up.addr, &out, req.target, guard);
                            return Outcome::Close;
                        }
                    }
                }
                Err(NotSent::NoInstance | NotSent::Unreachable) => {
                    let bad = text("502 Bad Gateway", UNREACHABLE, CLOSE);
                    return answer(c, &bad, req.head, true).await;
                }
                Err(NotSent::Closed(why)) => {
                    return answer(c, &super::closed_text(&shared, &why), req.head, true).await
                }
                Err(NotSent::Broken(u, g, cause)) => {
                    (up, guard) = (u, g);
                    resp = Err(Failed {
                        cause: cause.to_string(),
                        silent: false,
                        timed_out: false,
                    });
                }
            }
        }
    }
    let log = Log {
        program: &shared.program,
        upstream: &up.addr,
        out: &out,
        target: req.target,
    };
    let resp = match resp {
        Ok(r) => r,
        Err(failed) => {
            let close = close.now();
            let bad = log.failed(&mut guard, failed, close);
            return answer(c, &bad, req.head, close).await;
        }
    };
    guard.status(resp.status);
    add_cookie(&mut head, pin.set_cookie(&up));
    rbuf.advance(resp.len);
    match relay_body(
        &mut upstream,
        &mut c.io,
        &mut rbuf,
        head,
        resp.body,
        &mut guard,
        &log,
    )
    .await
    {
        Relayed::Whole => {}
        Relayed::NothingSent(bad) => return answer(c, &bad, req.head, req.close).await,
        Relayed::Broken => return Outcome::Close,
    }
    // Extra bytes after the answer: the worker broke the framing.
    if resp.reusable && rbuf.is_empty() {
        up.idle.put(upstream, shared.options.upstream_idle_timeout);
    }
    drop(guard);
    match (close.told(), req.close) {
        (false, _) => Outcome::KeepAlive,
        (true, true) => Outcome::Close,
        // Closed because the proxy retires: a client that pipelined its
        // next request must not get a reset in place of this answer.
        (true, false) => Outcome::CloseUnread,
    }
}

/// Reads the answer's head as [`read_response`] does, unless the client goes
/// away first (`None`); fails as timed out after `response_timeout`.
async fn head_unless_gone<S: SpliceIo>(
    upstream: &mut Stream,
    rbuf: &mut Buffer,
    head: &mut Vec<u8>,
    req: &Request,
    close: &Closing<'_>,
    client: &S,
    response_timeout: std::time::Duration,
) -> Option<Result<Response, Failed>> {
    tokio::select! {
        biased;
        r = read_response(upstream, &mut rbuf.0, head, req.head, close) => Some(r),
        () = client_gone(client) => None,
        () = tokio::time::sleep(response_timeout) => Some(Err(Failed {
            cause: "no answer within response_timeout".into(),
            silent: false,
            timed_out: true,
        })),
    }
}

/// Ends a request whose client went away before the answer.
fn abandoned(
    program: &str,
    upstream: &PrivateAddr,
    out: &[u8],
    target: (usize, usize),
    guard: InflightGuard,
) {
    let path = String::from_utf8_lossy(&out[target.0..target.1]);
    tracing::debug!(%program, %upstream, %path, "the client closed before the answer; request abandoned");
    guard.discard();
}

/// What the log lines of a request name.
struct Log<'a> {
    program: &'a str,
    upstream: &'a PrivateAddr,
    /// The rewritten head, whose target is the path logged.
    out: &'a [u8],
    target: (usize, usize),
}

impl Log<'_> {
    fn path(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.out[self.target.0..self.target.1])
    }

    /// Counts and logs a request that got no answer head; returns zdt's 502
    /// (504 when none came within response_timeout).
    fn failed(&self, guard: &mut InflightGuard, failed: Failed, close: bool) -> Vec<u8> {
        guard.fail();
        let (program, upstream, path) = (self.program, self.upstream, self.path());
        if failed.timed_out {
            tracing::warn!(%program, %upstream, %path, "no answer within response_timeout; answered 504");
            return text(
                "504 Gateway Timeout",
                NO_ANSWER,
                if close { CLOSE } else { "" },
            );
        }
        if guard.is_cut() {
            tracing::warn!(%program, %upstream, %path, "request cut: the instance was stopped at max_wait; answered 502");
        } else {
            tracing::warn!(%program, %upstream, %path, cause = %failed.cause, "upstream failed; answered 502");
        }
        text("502 Bad Gateway", FAILED, if close { CLOSE } else { "" })
    }
}

/// How relaying an answer's body ended.
enum Relayed {
    /// All of it reached the client.
    Whole,
    /// It broke before a byte reached the client: this 502 is to be sent.
    NothingSent(Vec<u8>),
    /// It broke off (counted and logged), or the client went away: close.
    Broken,
}

/// Relays an answer: `pending` (its head) and the body framed by `framing`,
/// from what is in `rbuf` and what `up` sends. Small pieces join the head
/// (or each other) in one write; bulk data is written from the read buffer.
async fn relay_body<R, W>(
    up: &mut R,
    client: &mut W,
    rbuf: &mut Buffer,
    mut pending: Vec<u8>,
    mut framing: Framing,
    guard: &mut InflightGuard,
    log: &Log<'_>,
) -> Relayed
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let rechunk = framing == Framing::Close;
    let mut ended = framing.is_done();
    let mut first = true;
    loop {
        let Some((k, done)) = framing.take(rbuf) else {
            let (program, upstream, path) = (log.program, log.upstream, log.path());
            tracing::warn!(%program, %upstream, %path, "response body broke off: bad chunked framing");
            guard.fail();
            if first {
                return Relayed::NothingSent(text("502 Bad Gateway", FAILED, ""));
            }
            return Relayed::Broken;
        };
        first = false;
        ended |= done;
        let data = &rbuf[..k];
        let written = if rechunk {
            if k > 0 {
                pending.extend_from_slice(format!("{k:x}\r\n").as_bytes());
                pending.extend_from_slice(data);
                pending.extend_from_slice(b"\r\n");
            }
            if ended {
                pending.extend_from_slice(b"0\r\n\r\n");
            }
            client.write_all(&pending).await
        } else if pending.len() + k <= BUF {
            pending.extend_from_slice(data);
            client.write_all(&pending).await
        } else {
            match client.write_all(&pending).await {
                Ok(()) => client.write_all(data).await,
                e => e,
            }
        };
        if written.is_err() {
            // The client went away; the worker's answer counts as served.
            return Relayed::Broken;
        }
        pending.clear();
        rbuf.advance(k);
        if ended {
            return Relayed::Whole;
        }
        rbuf.clear();
        rbuf.room();
        match up.read_buf(&mut rbuf.0).await {
            Ok(n) if n > 0 => {}
            // A body framed by the connection's end has ended, unless zdt
            // cut the worker at max_wait.
            Ok(_) if framing == Framing::Close && !guard.is_cut() => ended = true,
            r => {
                let cause = r.err().map(|e| e.to_string());
                let (program, upstream, path) = (log.program, log.upstream, log.path());
                tracing::warn!(%program, %upstream, %path, ?cause, cut = guard.is_cut(), "response body broke off");
                guard.fail();
                return Relayed::Broken;
            }
        }
    }
}

/// How a request whose body was still coming ended.
struct Duplexed {
    /// The upstream connection is at a message boundary.
    reusable: bool,
    /// The whole request body went to the worker.
    body_whole: bool,
    /// The client connection ends after the answer (its head said so).
    close: bool,
}

/// Why forwarding a request body stopped.
enum BodyEnd {
    /// The client closed or broke its connection mid-body.
    ClientGone,
    /// The client sent nothing for `body_timeout`.
    ClientSilent,
    /// The client's chunked framing is broken.
    BadChunks,
    /// The worker stopped taking the body (it closed, or answered and left).
    WorkerGone,
    /// The worker took no body byte for `response_timeout`.
    WorkerStalled,
    /// The body was whole and no answer head came within `response_timeout`.
    NoAnswer,
}

/// Moves the rest of a request body from the client to the worker; waits
/// up to `body_timeout` for each piece from the client and up to
/// `response_timeout` for the worker to take it.
async fn forward_body<R, W>(
    client: &mut R,
    up: &mut W,
    buf: &mut Buffer,
    body: &mut Framing,
    options: &super::Options,
) -> Result<(), BodyEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::time::timeout;
    while !body.is_done() {
        buf.clear();
        buf.room();
        match timeout(options.body_timeout, client.read_buf(&mut buf.0)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(BodyEnd::ClientGone),
            Err(_) => return Err(BodyEnd::ClientSilent),
        }
        let (k, _) = body.take(buf).ok_or(BodyEnd::BadChunks)?;
        match timeout(options.response_timeout, up.write_all(&buf[..k])).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(BodyEnd::WorkerGone),
            Err(_) => return Err(BodyEnd::WorkerStalled),
        }
        buf.advance(k);
    }
    Ok(())
}

/// A request whose body is still coming: the body goes to the worker while
/// its answer comes back, both at once, as a worker may answer before it
/// has read all of the body (a 413, an echo, a 103 first). Returns `None`
/// when the request ended without a whole answer (counted and logged).
#[allow(clippy::too_many_arguments)]
async fn duplex<S>(
    c: &mut Client<S>,
    options: &super::Options,
    upstream: &mut Stream,
    rbuf: &mut Buffer,
    req: &Request,
    mut body: Framing,
    guard: &mut InflightGuard,
    program: &str,
    addr: &PrivateAddr,
    out: &[u8],
    cookie: Option<String>,
) -> Option<Duplexed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let log = Log {
        program,
        upstream: addr,
        out,
        target: req.target,
    };
    // The answer says Connection: close unless the body was whole by the
    // time its head was written.
    let close = Closing::new(true, c.shared.workers.retire());
    // Set once an answer head came: from then on bytes may reach the client.
    let answering_began = AtomicBool::new(false);
    let (mut cr, mut cw) = tokio::io::split(&mut c.io);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let answered = {
        let sending = forward_body(&mut cr, &mut uw, &mut c.buf, &mut body, options);
        let answering = async {
            let mut head = Vec::new();
            let resp = match read_response(&mut ur, &mut rbuf.0, &mut head, req.head, &close).await
            {
                Ok(r) => r,
                Err(failed) => return Err(log.failed(guard, failed, true)),
            };
            answering_began.store(true, Ordering::Relaxed);
            guard.status(resp.status);
            add_cookie(&mut head, cookie);
            rbuf.advance(resp.len);
            // What the head told the client.
            let told_close = close.told();
            match relay_body(&mut ur, &mut cw, rbuf, head, resp.body, guard, &log).await {
                Relayed::Whole => Ok(Some((resp.reusable, told_close))),
                Relayed::NothingSent(bad) => Err(bad),
                Relayed::Broken => Ok(None),
            }
        };
        // response_timeout, from the moment the body is whole (polled only then).
        let no_answer = tokio::time::sleep(options.response_timeout);
        tokio::pin!(sending, answering, no_answer);
        let mut sent = false;
        let began = || answering_began.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                r = &mut sending, if !sent => {
                    match r {
                        Ok(()) => close.set(req.close),
                        // The answer, if any, tells the rest.
                        Err(BodyEnd::WorkerGone) => {}
                        Err(BodyEnd::WorkerStalled) if began() => {}
                        Err(end) => break Err(end),
                    }
                    sent = true;
                    no_answer
                        .as_mut()
                        .reset(Instant::now() + options.response_timeout);
                }
                r = &mut answering => break Ok(r),
                () = &mut no_answer, if sent => if !began() {
                    break Err(BodyEnd::NoAnswer);
                },
            }
        }
    };
    let answered = match answered {
        Ok(a) => a,
        Err(end) => {
            let path = log.path();
            let began = answering_began.load(Ordering::Relaxed);
            let reply = match end {
                BodyEnd::BadChunks => {
                    tracing::debug!(%program, %path, "bad chunked framing in the request body");
                    guard.fail();
                    None
                }
                // The client's doing, not the worker's (nginx's 499): neither
                // served nor failed.
                BodyEnd::ClientGone => {
                    tracing::debug!(%program, %path, "client closed during the request body");
                    guard.abandon();
                    None
                }
                BodyEnd::ClientSilent => {
                    tracing::info!(%program, %path, "client sent no request body for body_timeout; answered 408");
                    guard.abandon();
                    Some(text("408 Request Timeout", BODY_TIMEOUT, CLOSE))
                }
                BodyEnd::WorkerStalled | BodyEnd::NoAnswer | BodyEnd::WorkerGone => {
                    tracing::warn!(%program, upstream = %addr, %path, "no answer within response_timeout; answered 504");
                    guard.fail();
                    Some(text("504 Gateway Timeout", NO_ANSWER, CLOSE))
                }
            };
            if let Some(reply) = reply.filter(|_| !began) {
                let _ = cw.write_all(&reply).await;
            }
            return None;
        }
    };
    let body_whole = body.is_done();
    let (reusable, told_close) = match answered {
        Ok(Some(a)) => a,
        Ok(None) => return None,
        Err(bad) => {
            // No byte of an answer went out: zdt's 502, then the close.
            let _ = cw.write_all(&bad).await;
            return Some(Duplexed {
                reusable: false,
                body_whole,
                close: true,
            });
        }
    };
    Some(Duplexed {
        reusable: reusable && rbuf.is_empty() && body_whole,
        body_whole,
        close: told_close || !body_whole,
    })
}

const BAD_CHUNKS: &str = "400 Bad Request: bad chunked framing\n";
const TOO_LONG: &str = "414 URI Too Long: the request line is longer than 8 KB\n";
const BODY_TIMEOUT: &str = "408 Request Timeout: no request body within body_timeout\n";
const NO_ANSWER: &str =
    "504 Gateway Timeout: the application did not answer within response_timeout\n";
const UNREACHABLE: &str = "502 Bad Gateway: no instance could be reached\n";
const FAILED: &str = "502 Bad Gateway: the application failed to answer\n";

/// Why no response head came.
struct Failed {
    cause: String,
    /// The connection ended (closed or reset) before a single byte came.
    silent: bool,
    /// No head within `response_timeout` (504, not 502).
    timed_out: bool,
}

/// Reads a response head into `rbuf`, skipping interim responses, and
/// writes its client form into `head`.
async fn read_response<R: AsyncRead + Unpin>(
    upstream: &mut R,
    rbuf: &mut BytesMut,
    head: &mut Vec<u8>,
    head_request: bool,
    close: &Closing<'_>,
) -> Result<Response, Failed> {
    let mut received = false;
    loop {
        let cause = match upstream.read_buf(rbuf).await {
            Ok(0) => "connection closed before the response".to_string(),
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        };
        if !cause.is_empty() {
            return Err(Failed {
                cause,
                silent: !received,
                timed_out: false,
            });
        }
        received = true;
        loop {
            match parse_response(rbuf, head, head_request, close.now()) {
                ParsedResponse::Response(r) => return Ok(r),
                ParsedResponse::Interim(n) => rbuf.advance(n),
                ParsedResponse::Partial => break,
                ParsedResponse::Bad(why) => {
                    return Err(Failed {
                        cause: why.into(),
                        silent: false,
                        timed_out: false,
                    })
                }
            }
            if rbuf.is_empty() {
                break;
            }
        }
        rbuf.reserve(BUF);
    }
}

#[cfg(test)]
mod memory {
    /// What an idle client connection holds is its task: the serve future
    /// (plus tokio's task header and registration, and the kernel's socket).
    /// The request's own state is boxed while a request runs; inline it was
    /// 1.5 KB and RSS with 10,000 idle connections grew by 5 MiB.
    #[tokio::test]
    async fn an_idle_client_connection_holds_a_small_future() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("address");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let serving = super::serve(client, None, super::super::test_shared());
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 768, "the serve future takes {size} bytes");
    }
}
