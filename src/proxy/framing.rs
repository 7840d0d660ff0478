//! Refuses requests whose length is ambiguous before hyper reads them.
//!
//! hyper reads a request with both `Content-Length` and `Transfer-Encoding`
//! as chunked and drops the length (RFC 9112 6.3 allows that); zdt refuses
//! it instead, as a proxy in front may have framed it by the length
//! (request smuggling). A [`Framing`] reader follows the client's byte
//! stream (heads, then bodies by their length or chunks) and, when a head
//! carries both, turns the final byte of the blank line ending it into one
//! no header line may hold, so hyper answers 400 and the request goes
//! nowhere. What it cannot follow (an upgrade, CONNECT, a head hyper will
//! refuse anyway) ends the watching for that connection.

#[doc(hidden)]
pub mod fuzz;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head or chunk-size line followed; longer ones stop the watching
/// (hyper answers 431 for a head over max_header_bytes).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, PartialEq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Collecting a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Collecting trailer lines until a blank one.
    Trailers,
    /// Not following any more (upgrade, CONNECT, something unexpected).
    Off,
}

/// A client stream, followed request by request.
pub(super) struct Framing<S> {
    inner: S,
    state: State,
    /// The bytes of the head or line being collected.
    line: Vec<u8>,
    /// Bytes already read from `inner` (by the relay path), read first.
    prefix: bytes::BytesMut,
}

impl<S> Framing<S> {
    #[cfg(test)]
    pub(super) fn new(inner: S) -> Self {
        Self::with_prefix(inner, bytes::BytesMut::new())
    }

    /// Follows `inner`, whose first bytes `prefix` were read already.
    pub(super) fn with_prefix(inner: S, prefix: bytes::BytesMut) -> Self {
        Self {
            inner,
            state: State::Head,
            line: Vec::new(),
            prefix,
        }
    }

    /// Follows the bytes just read; may change the last byte of a head.
    fn feed(&mut self, mut buf: &mut [u8]) {
        while !buf.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(n) => {
                    let take = n.min(buf.len() as u64);
                    buf = &mut buf[take as usize..];
                    self.state = if n == take {
                        State::Head
                    } else {
                        State::Body(n - take)
                    };
                }
                State::ChunkData(n) => {
                    let take = n.min(buf.len() as u64);
                    buf = &mut buf[take as usize..];
                    self.state = if n == take {
                        // The CRLF after the data ends the size line collector's
                        // first line: skip it as an empty line.
                        self.line.clear();
                        State::ChunkSize
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let end = match self.state {
                        State::Head => find(&self.line, buf, b"\r\n\r\n"),
                        _ => find(&self.line, buf, b"\n"),
                    };
                    let Some(end) = end else {
                        self.line.extend_from_slice(buf);
                        if self.line.len() > MAX_LINE {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let (done, rest) = std::mem::take(&mut buf).split_at_mut(end);
                    if self.line.is_empty() {
                        // All of it in this read: no copy.
                        let (line, last) = done.split_at_mut(end - 1);
                        self.state = next_state(&self.state, line, &mut last[0]);
                    } else {
                        self.line.extend_from_slice(done);
                        self.on_line(&mut done[end - 1]);
                    }
                    buf = rest;
                }
            }
        }
    }

    /// A complete head or line is in `self.line`; `last` is its final byte
    /// (`\n`) in the buffer hyper is about to read.
    fn on_line(&mut self, last: &mut u8) {
        let n = self.line.len().saturating_sub(1);
        self.state = next_state(&self.state, &self.line[..n], last);
        // Keeps its capacity for the next head.
        self.line.clear();
    }
}

/// What follows a complete head or line: `line` is all of it but its final
/// `\n`, which is `last` (in the buffer hyper reads, so it can be spoiled).
fn next_state(state: &State, line: &[u8], last: &mut u8) -> State {
    match state {
        State::Head => {
            // Blank lines between requests are allowed before a head.
            let head = trim_leading_crlf(line);
            if head.is_empty() {
                State::Head
            } else {
                on_head(head, last)
            }
        }
        State::ChunkSize => {
            let size = line
                .split(|b| *b == b';')
                .next()
                .map(|s| String::from_utf8_lossy(s).trim().to_string())
                .unwrap_or_default();
            if size.is_empty() {
                // The CRLF that closes a chunk's data.
                State::ChunkSize
            } else {
                match u64::from_str_radix(&size, 16) {
                    Ok(0) => State::Trailers,
                    Ok(n) => State::ChunkData(n),
                    Err(_) => State::Off,
                }
            }
        }
        State::Trailers if trim_leading_crlf(line).is_empty() => State::Head,
        State::Trailers => State::Trailers,
        _ => State::Off,
    }
}

fn on_head(head: &[u8], last: &mut u8) -> State {
    let (mut length, mut chunked, mut upgrade) = (None, false, false);
    let mut lines = head.split(|b| *b == b'\n');
    let connect = lines.next().is_some_and(|l| l.starts_with(b"CONNECT "));
    for line in lines {
        if line.iter().all(|b| *b == b'\r') {
            continue;
        }
        // Not a header line: hyper refuses the head; nothing more to follow.
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return State::Off;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if length.is_some() && chunked {
        // "\r\n\r\n" becomes "\r\n\r\x01": a line hyper refuses with 400.
        *last = 0x01;
        return State::Off;
    }
    if upgrade || connect {
        return State::Off;
    }
    match (chunked, length) {
        (true, _) => State::ChunkSize,
        (false, Some(Some(n))) if n > 0 => State::Body(n),
        (false, Some(None)) => State::Off,
        _ => State::Head,
    }
}

/// Where `pattern` ends in `held` + `buf`, as an index into `buf` one past
/// the end of the pattern.
fn find(held: &[u8], buf: &[u8], pattern: &[u8]) -> Option<usize> {
    // A pattern that starts in `held`: its tail joined to the start of `buf`.
    let tail = held.len().min(pattern.len() - 1);
    let window = buf.len().min(pattern.len() - 1);
    let mut joined = [0u8; 8];
    joined[..tail].copy_from_slice(&held[held.len() - tail..]);
    joined[tail..tail + window].copy_from_slice(&buf[..window]);
    if let Some(i) = joined[..tail + window]
        .windows(pattern.len())
        .position(|w| w == pattern)
    {
        return Some(i + pattern.len() - tail);
    }
    buf.windows(pattern.len())
        .position(|w| w == pattern)
        .map(|i| i + pattern.len())
}

fn trim_leading_crlf(mut head: &[u8]) -> &[u8] {
    while let [b'\r' | b'\n', rest @ ..] = head {
        head = rest;
    }
    head
}

impl<S: AsyncRead + Unpin> AsyncRead for Framing<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = if this.prefix.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            bytes::Buf::advance(&mut this.prefix, n);
            Poll::Ready(Ok(()))
        };
        if let Poll::Ready(Ok(())) = polled {
            if this.state != State::Off {
                let fresh = &mut buf.filled_mut()[before..];
                this.feed(fresh);
            }
        }
        polled
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
}
