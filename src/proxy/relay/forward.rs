//! Forwarding one request on the relay path: the drain check, routing and
//! sending it to an upstream (a connect error or a connection closed before
//! it took a byte is retried on another instance), reading the answer's
//! head while watching the client, the keep-alive close race (a GET, HEAD
//! or OPTIONS without a body whose reused connection ends before a byte of
//! answer is sent once more), and what a failure is answered: 502, or 504
//! past `response_timeout`.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest};

use super::bodies::{duplex, relay_body, Duplexed, Relayed};
use super::buffer::{Buffer, BUF};
use super::{answer, text, Client, Outcome, BAD_CHUNKS, CLOSE, FAILED, NO_ANSWER, UNREACHABLE};
use crate::proxy::addr::{write_counted, Stream};
use crate::proxy::canary::{Pin, RawHead};
use crate::proxy::codec::{
    add_cookie, parse_response, push_header, ParsedResponse, Request, Response,
};
use crate::proxy::retire::Closing;
use crate::proxy::splice::SpliceIo;
use crate::proxy::{
    closed_text, gate, route, unavailable_text, InflightGuard, PrivateAddr, Refused, Shared,
    Upstream, CONNECT_TIMEOUT,
};

/// A request on its way: the instance, its in-flight guard, the connection.
struct Sent {
    up: Arc<Upstream>,
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
    Closed(gate::Closed),
    /// No ready instance could be reached; nothing reached an app (502).
    Unreachable,
    /// Writing failed after the worker may have taken some of the request,
    /// which is not safe to send twice (502, counted as failed).
    Broken(Arc<Upstream>, InflightGuard, io::Error),
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
        if !tried.is_empty() {
            shared.traffic.stats.resend();
        }
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
        let cause = match Box::pin(up.addr.connect_sending(out, CONNECT_TIMEOUT)).await {
            Ok(conn) => {
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
        };
        tracing::warn!(program = %shared.program, upstream = %up.addr, %cause, "connect failed; trying another instance");
        shared.traffic.stats.connect_error();
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
pub(super) async fn forward<S>(c: &mut Client<S>, req: Request, mut out: Vec<u8>) -> Outcome
where
    S: SpliceIo + AsyncRead + AsyncWrite + Unpin,
{
    let shared = c.shared.clone();
    if shared.draining.load(Ordering::SeqCst) {
        return answer(c, &unavailable_text(&shared), req.head, true).await;
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
            return answer(c, &unavailable_text(&shared), req.head, true).await
        }
        Err(NotSent::Closed(why)) => {
            return answer(c, &closed_text(&shared, &why), req.head, true).await
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
            shared.traffic.stats.resend();
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
                    return answer(c, &closed_text(&shared, &why), req.head, true).await
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
    shared.traffic.stats.answered(resp.status);
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
pub(super) struct Log<'a> {
    pub(super) program: &'a str,
    pub(super) upstream: &'a PrivateAddr,
    /// The rewritten head, whose target is the path logged.
    pub(super) out: &'a [u8],
    pub(super) target: (usize, usize),
}

impl Log<'_> {
    pub(super) fn path(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.out[self.target.0..self.target.1])
    }

    /// Counts and logs a request that got no answer head; returns zdt's 502
    /// (504 when none came within response_timeout).
    pub(super) fn failed(&self, guard: &mut InflightGuard, failed: Failed, close: bool) -> Vec<u8> {
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

/// Why no response head came.
pub(super) struct Failed {
    cause: String,
    /// The connection ended (closed or reset) before a single byte came.
    silent: bool,
    /// No head within `response_timeout` (504, not 502).
    timed_out: bool,
}

/// Reads a response head into `rbuf`, skipping interim responses, and
/// writes its client form into `head`.
pub(super) async fn read_response<R: AsyncRead + Unpin>(
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
