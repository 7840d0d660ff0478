//! Refuses requests whose framing is ambiguous before hyper reads them.
//!
//! hyper reads a request with both `Content-Length` and `Transfer-Encoding`
//! as chunked and drops the length (RFC 9112 6.3 allows that); zdt refuses
//! it instead, as a proxy in front may have framed it by the length
//! (request smuggling). So it does a `Transfer-Encoding` other than exactly
//! `chunked` (hyper takes `identity, chunked` or two of them as chunked), a
//! `Content-Length` that is not plain digits or too large (hyper: 431), two
//! `Host`s, none in HTTP/1.1 (RFC 9112 3.2), and a request line over
//! [`MAX_REQUEST_LINE`](super::codec::MAX_REQUEST_LINE): the codec's rules
//! (`codec/`), the ones the relay applies.
//!
//! A [`Framing`] reader follows the client's byte stream as hyper reads it:
//! heads, ended by CRLF or bare LF lines and parsed by httparse as hyper
//! parses them, then bodies by their length, or by their chunks with the
//! codec's follower read as hyper's decoder reads them. When a head is
//! refused, it turns the final byte of the blank line ending it into one no
//! header line may hold, so hyper answers 400 and the request goes nowhere.
//!
//! After an `Upgrade` or `CONNECT` request the bytes that follow are a
//! tunnel's if the answer switches protocols, or the next request if not:
//! the reader holds them back until the handler has answered it (through
//! the connection's [`Gate`]), then stops watching or goes on. What it
//! cannot follow (a head longer than hyper takes, a head or a chunked body
//! hyper refuses) ends the watching for that connection: hyper reads no
//! further on it either.

#[doc(hidden)]
pub mod fuzz;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head followed when no bound is given (tests and fuzzing).
const MAX_LINE: usize = 1 << 20;

use super::codec::{judge_request, trim_leading_crlf, AsHyper, BodyKind, Chunks, HeadEnd, Verdict};

/// What a refused head's last byte becomes: "\n\r\n" or "\n\n" then ends
/// in a byte no header line may hold, and hyper answers 400.
const SPOILED: u8 = 0x01;

#[derive(Debug, PartialEq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Following a chunked body as hyper reads it.
    Chunked(Chunks<AsHyper>),
    /// Not following any more (tunnel, a refused head, something unexpected).
    Off,
}

/// How the hyper path's handler answered the connection's Upgrade and
/// CONNECT requests, for the [`Framing`] reader of that connection.
#[derive(Debug, Default)]
pub(super) struct Gate {
    /// Upgrade and CONNECT requests answered so far.
    decided: AtomicU64,
    /// One of them became a tunnel: the connection carries bytes now.
    tunnel: AtomicBool,
    /// The reader, waiting for a decision.
    waker: Mutex<Option<Waker>>,
}

impl Gate {
    /// An Upgrade or CONNECT request was answered, with a tunnel or not.
    pub(super) fn decide(&self, tunnel: bool) {
        if tunnel {
            self.tunnel.store(true, Ordering::SeqCst);
        }
        self.decided.fetch_add(1, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }
}

/// A client stream, followed request by request.
pub(super) struct Framing<S> {
    inner: S,
    state: State,
    /// The bytes of the head being collected, when it came in pieces.
    line: Vec<u8>,
    /// Bytes already read from `inner` (by the relay path, or held back
    /// after an Upgrade request), read first.
    prefix: bytes::BytesMut,
    /// Where the search for a head's end is.
    head_end: HeadEnd,
    /// Longest head followed (hyper refuses longer ones: 431).
    max_head: usize,
    /// Upgrade and CONNECT heads passed on. Reading waits at the next
    /// request boundary until the gate has decided as many.
    upgrades: u64,
    /// None: an Upgrade or CONNECT request ends the watching.
    gate: Option<Arc<Gate>>,
}

impl<S> Framing<S> {
    #[cfg(test)]
    pub(super) fn new(inner: S) -> Self {
        Self::with_prefix(inner, bytes::BytesMut::new(), None, MAX_LINE)
    }

    /// Follows `inner`, whose first bytes `prefix` were read already; heads
    /// longer than `max_head` are hyper's to refuse.
    pub(super) fn with_prefix(
        inner: S,
        prefix: bytes::BytesMut,
        gate: Option<Arc<Gate>>,
        max_head: usize,
    ) -> Self {
        Self {
            inner,
            state: State::Head,
            line: Vec::new(),
            prefix,
            head_end: HeadEnd::default(),
            max_head,
            upgrades: 0,
            gate,
        }
    }

    /// Whether reading waits for the answer to an Upgrade or CONNECT
    /// request (its tunnel or the next request come next).
    fn waiting(&self) -> bool {
        self.state == State::Head
            && self
                .gate
                .as_ref()
                .is_some_and(|g| self.upgrades > g.decided.load(Ordering::SeqCst))
    }

    /// Whether reading has to wait for the gate; registers `cx` if so.
    fn blocked(&mut self, cx: &Context<'_>) -> bool {
        let Some(gate) = self.gate.clone() else {
            return false;
        };
        for _ in 0..2 {
            if self.state == State::Off {
                return false;
            }
            if gate.tunnel.load(Ordering::SeqCst) {
                self.state = State::Off;
                return false;
            }
            if !self.waiting() {
                return false;
            }
            // Registered, then checked once more: a decision that came
            // meanwhile is seen.
            if let Ok(mut w) = gate.waker.lock() {
                *w = Some(cx.waker().clone());
            }
        }
        true
    }

    /// Follows the bytes just read; may change the last byte of a head.
    /// Returns how many of them may be passed on: all, unless reading has
    /// to wait for the answer to an Upgrade request first.
    fn feed(&mut self, buf: &mut [u8]) -> usize {
        let total = buf.len();
        let mut pos = 0;
        while pos < total {
            if self.waiting() {
                return pos;
            }
            let rest = &mut buf[pos..];
            match self.state {
                State::Off => return total,
                State::Body(n) => {
                    let take = n.min(rest.len() as u64);
                    // At most rest.len(): fits in usize.
                    pos += take as usize;
                    self.state = if n == take {
                        State::Head
                    } else {
                        State::Body(n - take)
                    };
                }
                State::Chunked(mut chunks) => {
                    // Framing hyper refuses: it reads no further.
                    let Some(k) = chunks.advance(rest) else {
                        self.state = State::Off;
                        return total;
                    };
                    pos += k;
                    self.state = if chunks.is_done() {
                        State::Head
                    } else {
                        State::Chunked(chunks)
                    };
                }
                State::Head => {
                    let Some(end) = self.head_end.find(rest) else {
                        self.line.extend_from_slice(rest);
                        if self.line.len() > self.max_head {
                            self.state = State::Off;
                        }
                        return total;
                    };
                    let verdict = if self.line.is_empty() {
                        // All of it in this read: no copy.
                        judge(&rest[..end])
                    } else {
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(&rest[..end]);
                        let verdict = judge(&line);
                        // Keeps its capacity for the next head.
                        line.clear();
                        self.line = line;
                        verdict
                    };
                    self.on_head(verdict, &mut rest[end - 1]);
                    pos += end;
                }
            }
        }
        total
    }

    /// What follows a complete head judged `verdict`; `last` is its final
    /// `\n` (in the buffer hyper reads, so it can be spoiled).
    fn on_head(&mut self, verdict: Option<Verdict>, last: &mut u8) {
        self.state = match verdict {
            // Blank lines between requests are allowed before a head.
            None => State::Head,
            // Not a head hyper reads: it refuses it; nothing more to follow.
            Some(Verdict::Unreadable) => State::Off,
            Some(Verdict::Refused) => {
                *last = SPOILED;
                State::Off
            }
            Some(Verdict::Passed { body, tunnel }) => {
                let next = match body {
                    BodyKind::Chunked => State::Chunked(Chunks::START),
                    BodyKind::Length(n) if n > 0 => State::Body(n),
                    BodyKind::Length(_) | BodyKind::Empty => State::Head,
                };
                match (tunnel, &self.gate) {
                    (false, _) => next,
                    (true, Some(_)) => {
                        self.upgrades += 1;
                        next
                    }
                    (true, None) => State::Off,
                }
            }
        };
    }
}

/// The codec's judgement of a whole head (its final `\n` included); `None`
/// for the blank lines allowed between requests.
fn judge(head: &[u8]) -> Option<Verdict> {
    (!trim_leading_crlf(head).is_empty()).then(|| judge_request(head))
}

impl<S: AsyncRead + Unpin> AsyncRead for Framing<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.blocked(cx) {
                return Poll::Pending;
            }
            let before = buf.filled().len();
            if !this.prefix.is_empty() {
                let n = this.prefix.len().min(buf.remaining());
                buf.put_slice(&this.prefix[..n]);
                let k = if this.state == State::Off {
                    n
                } else {
                    this.feed(&mut buf.filled_mut()[before..])
                };
                // What is not passed on stays first in the prefix.
                bytes::Buf::advance(&mut this.prefix, k);
                buf.set_filled(before + k);
                if k == 0 && n > 0 {
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = polled {
                if this.state != State::Off {
                    let n = buf.filled().len() - before;
                    let k = this.feed(&mut buf.filled_mut()[before..]);
                    if k < n {
                        this.prefix.extend_from_slice(&buf.filled()[before + k..]);
                        buf.set_filled(before + k);
                        if k == 0 {
                            continue;
                        }
                    }
                }
            }
            return polled;
        }
    }
}
impl<S: AsyncWrite + Unpin> AsyncWrite for Framing<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::MAX_REQUEST_LINE;
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes; returns it as hyper would read it.
    fn run(stream: &[u8], step: usize) -> Vec<u8> {
        let mut f = Framing::new(());
        let mut out = stream.to_vec();
        for piece in out.chunks_mut(step) {
            f.feed(piece);
        }
        out
    }

    const SMUGGLE: &[u8] = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn a_head_with_both_lengths_is_spoiled_at_its_end_in_any_order() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: a\r\ncontent-length: 5\r\n\r\n"[..],
        ] {
            for step in [1, 3, 7, head.len()] {
                let out = run(head, step);
                assert_eq!(&out[..out.len() - 1], &head[..head.len() - 1]);
                assert_eq!(out[out.len() - 1], 0x01, "step {step}");
            }
        }
    }

    #[test]
    fn bodies_that_look_like_heads_are_skipped_by_their_framing() {
        let mut stream = Vec::new();
        // A body of exactly the length given, holding header-like text.
        stream.extend_from_slice(
            format!(
                "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                SMUGGLE.len()
            )
            .as_bytes(),
        );
        stream.extend_from_slice(SMUGGLE);
        // A chunked body holding the same text, with an extension and a trailer.
        stream.extend_from_slice(
            b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        stream.extend_from_slice(format!("{:x};x=y\r\n", SMUGGLE.len()).as_bytes());
        stream.extend_from_slice(SMUGGLE);
        stream.extend_from_slice(b"\r\n0\r\nX-Trailer: 1\r\n\r\n");
        stream.extend_from_slice(b"\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n");
        let clean = stream.len();
        // Then the ambiguous one.
        stream.extend_from_slice(b"POST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        for step in [1, 2, 5, 64, stream.len()] {
            let out = run(&stream, step);
            assert_eq!(
                &out[..clean],
                &stream[..clean],
                "step {step}: a body was taken for a head"
            );
            assert_eq!(out[out.len() - 1], 0x01, "step {step}");
            assert_eq!(&out[clean..out.len() - 1], &stream[clean..stream.len() - 1]);
        }
    }

    #[test]
    fn upgrades_and_unparsable_heads_stop_the_watching() {
        let mut stream =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
                .to_vec();
        stream.extend_from_slice(SMUGGLE);
        assert_eq!(run(&stream, 4), stream);
        let bad = b"GET / HTTP/1.1\r\nHost a\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(run(bad, 3), bad.to_vec());
    }
    #[test]
    fn ambiguous_and_malformed_framing_is_spoiled_with_crlf_or_bare_lf_lines() {
        let long_line = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_REQUEST_LINE)
        );
        let mut refused = vec![
            "POST / HTTP/1.1\nHost: a\nContent-Length: 5\nTransfer-Encoding: chunked\n\n".to_string(),
            "POST / HTTP/1.1\r\nHost: a\nContent-Length: 5\r\nTransfer-Encoding: chunked\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            "GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n".into(),
            "GET / HTTP/1.1\r\n\r\n".into(),
        ];
        refused.push(long_line);
        for head in &refused {
            for step in [1, 2, 5, head.len()] {
                let out = run(head.as_bytes(), step);
                assert_eq!(out[out.len() - 1], 0x01, "{head:?} step {step}");
            }
        }
        for head in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert_eq!(run(head.as_bytes(), 3), head.as_bytes(), "{head:?}");
        }
        // A bare-LF head's body is skipped by its length, and the next head
        // is followed.
        let mut stream = b"POST / HTTP/1.1\nHost: a\nContent-Length: 5\n\n".to_vec();
        stream.extend_from_slice(b"\n\n\n\n");
        stream.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
        let out = run(&stream, 4);
        assert_eq!(&out[..out.len() - 1], &stream[..stream.len() - 1]);
        assert_eq!(out[out.len() - 1], 0x01);
    }

    #[test]
    fn what_follows_an_upgrade_request_waits_for_its_answer() {
        let gate = Arc::new(Gate::default());
        let mut f = Framing::with_prefix((), bytes::BytesMut::new(), Some(gate.clone()), MAX_LINE);
        let upgrade =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let mut stream = upgrade.to_vec();
        stream.extend_from_slice(SMUGGLE_REQUEST);
        // Passed on up to the end of the Upgrade request, then held back.
        assert_eq!(f.feed(&mut stream.clone()), upgrade.len());
        assert!(f.waiting());
        assert_eq!(f.feed(&mut SMUGGLE_REQUEST.to_vec()), 0);
        // Not a tunnel: the next request is followed (and refused).
        gate.decide(false);
        assert!(!f.waiting());
        let mut next = SMUGGLE_REQUEST.to_vec();
        assert_eq!(f.feed(&mut next), next.len());
        assert_eq!(next[next.len() - 1], 0x01);
        // A tunnel: what follows is passed on as it is.
        let gate = Arc::new(Gate::default());
        let mut f = Framing::with_prefix((), bytes::BytesMut::new(), Some(gate.clone()), MAX_LINE);
        assert_eq!(f.feed(&mut stream.clone()), upgrade.len());
        gate.decide(true);
        assert!(!f.blocked(&Context::from_waker(Waker::noop())));
        let mut tunnel = SMUGGLE_REQUEST.to_vec();
        assert_eq!(f.feed(&mut tunnel), tunnel.len());
        assert_eq!(tunnel, SMUGGLE_REQUEST);
    }

    #[test]
    fn a_chunked_body_ends_where_hyper_ends_it() {
        // hyper's decoder takes a bare LF inside a trailer line as a byte of
        // it: these trailers end at the first CRLF CRLF, so "POST /x" is no
        // head to hyper and the ambiguous request after it is one.
        let mut stream =
            b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        stream.extend_from_slice(b"0\r\nX: a\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\n");
        stream.extend_from_slice(b"Content-Length: 100\r\n\r\n");
        stream.extend_from_slice(SMUGGLE_REQUEST);
        for step in [1, 3, stream.len()] {
            let out = run(&stream, step);
            assert_eq!(&out[..out.len() - 1], &stream[..stream.len() - 1]);
            assert_eq!(out[out.len() - 1], 0x01, "step {step}");
        }
        // Chunk sizes with more leading zeros than the relay takes, and
        // control bytes in an extension: hyper reads them, and so the reader
        // follows them to the next head.
        let mut stream =
            b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        stream.extend_from_slice(b"00000000000000000001;\x01\r\nx\r\n0\r\n\r\n");
        stream.extend_from_slice(SMUGGLE_REQUEST);
        let out = run(&stream, 2);
        assert_eq!(out[out.len() - 1], 0x01);
    }

    const SMUGGLE_REQUEST: &[u8] =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
}
