//! Moving message bodies on the relay path: an answer's body to the client
//! by its framing (re-chunked when it ends with the connection), and a
//! request body still coming while its answer comes back, both at once.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Buf;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::buffer::{Buffer, BUF};
use super::forward::{read_response, Log};
use super::{text, Client, BODY_TIMEOUT, CLOSE, FAILED, NO_ANSWER};
use crate::proxy::addr::Stream;
use crate::proxy::codec::{add_cookie, Framing, Request};
use crate::proxy::retire::Closing;
use crate::proxy::{InflightGuard, Options, PrivateAddr};

/// How relaying an answer's body ended.
pub(super) enum Relayed {
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
pub(super) async fn relay_body<R, W>(
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
        // Set when the read after this write is already done: its result.
        let mut next = None;
        // Whether `rbuf` was emptied for that read.
        let mut consumed = false;
        let written = if rechunk {
            if k > 0 {
                pending.extend_from_slice(format!("{k:x}\r\n").as_bytes());
                pending.extend_from_slice(data);
                pending.extend_from_slice(b"\r\n");
            }
            if !ended {
                // A worker that ends its answer with its connection has
                // mostly closed it by now (php -S): its end, taken without
                // waiting, lets the last chunk go out in this same write.
                // `data` is copied into `pending`: the buffer is free.
                rbuf.clear();
                rbuf.room();
                consumed = true;
                match up.read_buf(&mut rbuf.0).now_or_never() {
                    Some(Ok(0)) if !guard.is_cut() => ended = true,
                    Some(r) => next = Some(r),
                    None => {}
                }
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
        if !consumed {
            rbuf.advance(k);
        }
        if ended {
            return Relayed::Whole;
        }
        let read = match next {
            Some(r) => r,
            None if consumed => up.read_buf(&mut rbuf.0).await,
            None => {
                rbuf.clear();
                rbuf.room();
                up.read_buf(&mut rbuf.0).await
            }
        };
        match read {
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
pub(super) struct Duplexed {
    /// The upstream connection is at a message boundary.
    pub(super) reusable: bool,
    /// The whole request body went to the worker.
    pub(super) body_whole: bool,
    /// The client connection ends after the answer (its head said so).
    pub(super) close: bool,
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
    options: &Options,
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
pub(super) async fn duplex<S>(
    c: &mut Client<S>,
    options: &Options,
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
    let stats = &c.shared.traffic;
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
            stats.stats.answered(resp.status);
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
