//! Request heads: the framing rules both HTTP/1 paths apply to them, the
//! relay's parse that rewrites a head for the worker in one pass, and the
//! framing check's judgement of a head hyper is about to read.

use super::{length_of, name_of, push_header, Chunks, Framing, Name, STACK_HEADERS};

/// Longest request line accepted (nginx: one 8 KB header buffer); longer
/// ones get 414 on the relay path and 400 on the hyper path.
pub(crate) const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Parses a request head in `buf` with room for [`STACK_HEADERS`] on the
/// stack, or (rare) again with room for as many as the hyper path takes,
/// and hands the result to `f`.
fn with_request<'b, T>(
    buf: &'b [u8],
    f: impl FnOnce(httparse::Result<usize>, &httparse::Request<'_, 'b>) -> T,
) -> T {
    let mut headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(buf);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        let mut many = vec![httparse::EMPTY_HEADER; super::super::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut many);
        let parsed = req.parse(buf);
        return f(parsed, &req);
    }
    f(parsed, &req)
}

/// A request's framing headers, taken one at a time, as both paths judge
/// them (RFC 9112 6.3 and 3.2, stricter where a proxy in front might read
/// them otherwise). Each method says `Err` when the request is to be
/// refused: the relay then hands it to hyper, the framing check spoils it.
#[derive(Debug, Default)]
pub(crate) struct RequestCheck {
    length: Option<u64>,
    chunked: bool,
    host: bool,
}

/// A request head whose framing is ambiguous or that has no single Host.
#[derive(Debug)]
pub(crate) struct Refused;

/// How a request's body is framed, by its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// No framing header: no body.
    Empty,
    /// `Content-Length` (0 included).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl RequestCheck {
    /// A `Host`: the second one is refused.
    pub(crate) fn host(&mut self) -> Result<(), Refused> {
        if std::mem::replace(&mut self.host, true) {
            return Err(Refused);
        }
        Ok(())
    }

    /// A `Content-Length` (its value trimmed): digits only, equal to any
    /// before it (hyper: 431 for a value too large).
    pub(crate) fn content_length(&mut self, value: &[u8]) -> Result<(), Refused> {
        match length_of(value) {
            Some(n) if self.length.is_none_or(|l| l == n) => {
                self.length = Some(n);
                Ok(())
            }
            _ => Err(Refused),
        }
    }

    /// A `Transfer-Encoding` (its value trimmed): exactly `chunked`, once
    /// (hyper would take `identity, chunked` or two of them as chunked).
    pub(crate) fn transfer_encoding(&mut self, value: &[u8]) -> Result<(), Refused> {
        if self.chunked || !value.eq_ignore_ascii_case(b"chunked") {
            return Err(Refused);
        }
        self.chunked = true;
        Ok(())
    }

    /// After the last header: the body's framing. Both lengths are refused
    /// (hyper would drop the Content-Length; a proxy in front may have used
    /// it: request smuggling), and so is an HTTP/1.1 request without Host.
    pub(crate) fn body(&self, http11: bool) -> Result<BodyKind, Refused> {
        if http11 && !self.host {
            return Err(Refused);
        }
        match (self.chunked, self.length) {
            (true, Some(_)) => Err(Refused),
            (true, None) => Ok(BodyKind::Chunked),
            (false, Some(n)) => Ok(BodyKind::Length(n)),
            (false, None) => Ok(BodyKind::Empty),
        }
    }
}

/// A request head the relay forwards.
pub(crate) struct Request {
    /// Bytes of the head in the client's buffer.
    pub(crate) len: usize,
    pub(crate) body: Framing,
    /// HEAD: the response has no body whatever its headers say.
    pub(crate) head: bool,
    /// GET, HEAD or OPTIONS without a body: safe to send again when a reused
    /// upstream connection turns out to have been closed under it.
    pub(crate) resendable: bool,
    /// The client asked to close after this request.
    pub(crate) close: bool,
    /// The client sent a Host.
    pub(crate) host: bool,
    /// Where the target sits in the rewritten head.
    pub(crate) target: (usize, usize),
}

/// What the relay makes of the bytes a client sent.
pub(crate) enum Parsed {
    Request(Request),
    /// The head is not complete yet.
    Partial,
    /// Not for the relay: the hyper path answers it.
    Elsewhere,
}

/// Whether every byte of an origin-form target is one hyper's URI parser
/// (the `http` crate) takes: in the path, the URL standard's path bytes plus
/// `"`, `{` and `}`; after the first `?`, its query bytes. No `#` (hyper
/// drops a fragment) and nothing beyond ASCII. Found by fuzz/relay_head: a
/// target httparse takes and hyper refuses must go to the hyper path.
fn uri_chars_only(target: &[u8]) -> bool {
    let path_byte = |b: u8| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E | b'"' | b'{' | b'}');
    let query_byte = |b: u8| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E);
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &[][..]),
    };
    path.iter().all(|&b| path_byte(b)) && query.iter().all(|&b| query_byte(b) && b != b'#')
}

/// Parses a request head in `buf` for the relay and writes its upstream
/// form into `out` in the same pass, without the blank line that ends it
/// (Host may still be added). What the relay does not take (HTTP/1.0,
/// Upgrade, Expect, CONNECT, an absolute-form target, hop-by-hop headers
/// other than `Connection: keep-alive/close`, what [`RequestCheck`] refuses,
/// what hyper answers 400 or 431) is [`Parsed::Elsewhere`].
pub(crate) fn parse_request(
    buf: &[u8],
    out: &mut Vec<u8>,
    peer: Option<&[u8]>,
    forward: bool,
    max_header: usize,
) -> Parsed {
    with_request(buf, |parsed, req| {
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) if n <= max_header => n,
            Ok(httparse::Status::Partial) if buf.len() <= max_header => return Parsed::Partial,
            _ => return Parsed::Elsewhere,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::Elsewhere;
        };
        // hyper refuses a target with bytes beyond ASCII or that are no URI
        // characters (400, though httparse takes them) or longer than 65534
        // (414), and drops a fragment: all of that is the hyper path's.
        if method == "CONNECT"
            || !target.starts_with('/')
            || target.len() > 65534
            || !uri_chars_only(target.as_bytes())
        {
            return Parsed::Elsewhere;
        }
        out.clear();
        out.reserve(len + 128);
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        let t0 = out.len();
        out.extend_from_slice(target.as_bytes());
        let target = (t0, out.len());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut check = RequestCheck::default();
        let mut close = false;
        let mut xff: Option<&[u8]> = None;
        for h in req.headers.iter() {
            let value = h.value.trim_ascii();
            let taken = match name_of(h.name) {
                Name::Other => Ok(false),
                Name::Host => check.host().map(|()| false),
                Name::ContentLength => check.content_length(value).map(|()| true),
                Name::TransferEncoding => check.transfer_encoding(value).map(|()| true),
                Name::Connection => {
                    for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                        if token.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                            return Parsed::Elsewhere;
                        }
                    }
                    Ok(true)
                }
                Name::XForwardedFor if forward && peer.is_some() => {
                    xff = xff.or(Some(value));
                    Ok(true)
                }
                Name::XRealIp if forward && peer.is_some() => Ok(true),
                Name::XForwardedProto if forward => Ok(true),
                Name::XForwardedFor | Name::XRealIp | Name::XForwardedProto => Ok(false),
                Name::Upgrade | Name::HopByHop => return Parsed::Elsewhere,
            };
            match taken {
                // Written again below, or dropped.
                Ok(true) => {}
                Ok(false) => push_header(out, h.name.as_bytes(), h.value),
                // Refused (400) on the hyper path, or taken otherwise by it.
                Err(Refused) => return Parsed::Elsewhere,
            }
        }
        let body = match check.body(true) {
            Err(Refused) => return Parsed::Elsewhere,
            Ok(BodyKind::Chunked) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
                Framing::Chunked(Chunks::START)
            }
            Ok(BodyKind::Length(n)) => {
                out.extend_from_slice(b"Content-Length: ");
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                if n > 0 {
                    Framing::Length(n)
                } else {
                    Framing::Empty
                }
            }
            Ok(BodyKind::Empty) => Framing::Empty,
        };
        if forward {
            if let Some(ip) = peer {
                out.extend_from_slice(b"X-Forwarded-For: ");
                if let Some(prev) = xff {
                    out.extend_from_slice(prev);
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(ip);
                out.extend_from_slice(b"\r\n");
                push_header(out, b"X-Real-IP", ip);
            }
            out.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
        }
        Parsed::Request(Request {
            len,
            resendable: body == Framing::Empty && matches!(method, "GET" | "HEAD" | "OPTIONS"),
            body,
            head: method == "HEAD",
            close,
            host: true,
            target,
        })
    })
}

/// What the framing check makes of a whole request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Passed on to hyper; its body is framed so, and it asks for a tunnel
    /// (Upgrade or CONNECT) or not.
    Passed { body: BodyKind, tunnel: bool },
    /// Ambiguous framing, no single Host, or a request line too long: the
    /// head is to be spoiled.
    Refused,
    /// Not a head httparse reads, so hyper refuses it: nothing to follow.
    Unreadable,
}

/// Judges a whole request head (its final blank line included) as the
/// framing check does, by the rules the relay applies ([`RequestCheck`]),
/// whatever the HTTP/1 version.
pub(crate) fn judge_request(head: &[u8]) -> Verdict {
    with_request(head, |parsed, req| {
        match parsed {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            _ => return Verdict::Unreadable,
        }
        let (Some(method), Some(version)) = (req.method, req.version) else {
            return Verdict::Unreadable;
        };
        let mut check = RequestCheck::default();
        let mut upgrade = false;
        for h in req.headers.iter() {
            let value = h.value.trim_ascii();
            let judged = match name_of(h.name) {
                Name::Host => check.host(),
                Name::ContentLength => check.content_length(value),
                Name::TransferEncoding => check.transfer_encoding(value),
                Name::Upgrade => {
                    upgrade = true;
                    Ok(())
                }
                _ => Ok(()),
            };
            if judged.is_err() {
                return Verdict::Refused;
            }
        }
        if request_line(head).len() > MAX_REQUEST_LINE {
            return Verdict::Refused;
        }
        match check.body(version == 1) {
            Ok(body) => Verdict::Passed {
                body,
                tunnel: upgrade || method == "CONNECT",
            },
            Err(Refused) => Verdict::Refused,
        }
    })
}

/// The request line of a head, after the blank lines a head may start
/// with, without its line end.
fn request_line(head: &[u8]) -> &[u8] {
    let head = trim_leading_crlf(head);
    let line = &head[..head.iter().position(|b| *b == b'\n').unwrap_or(head.len())];
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `head` after the blank lines allowed before a request.
pub(crate) fn trim_leading_crlf(mut head: &[u8]) -> &[u8] {
    while let [b'\r' | b'\n', rest @ ..] = head {
        head = rest;
    }
    head
}

/// Whether the request line starting `buf` (after the blank lines a head
/// may start with) is longer than [`MAX_REQUEST_LINE`], whole or not.
pub(crate) fn request_line_too_long(buf: &[u8]) -> bool {
    let limit = MAX_REQUEST_LINE + 2;
    if buf.len() <= limit {
        return false;
    }
    let start = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buf.len());
    buf.len() - start > limit && !buf[start..start + limit].contains(&b'\n')
}

/// Whether the bytes of `buf` from `from` on (with the three before, where an
/// end may have begun) hold the blank line that ends a head. The relay, which
/// keeps the head's bytes, parses a head that comes in pieces again only
/// then, not at every piece: one byte at a time, parsing each time, costs the
/// square of its length.
pub(crate) fn may_end_head(buf: &[u8], from: usize) -> bool {
    buf[from.saturating_sub(3)..]
        .windows(2)
        .any(|w| w == b"\n\n" || w == b"\n\r")
}

/// Finds where a head ends in a stream read piece by piece, keeping none of
/// it (the framing check): one past the `\n` of the blank line, CRLF or
/// bare LF, that ends it.
#[derive(Debug, Default)]
pub(crate) struct HeadEnd {
    /// 1 after a `\n`, 2 after `\n\r`.
    newline: u8,
}

impl HeadEnd {
    /// Where a head ends in `buf`, following on from the pieces before.
    pub(crate) fn find(&mut self, buf: &[u8]) -> Option<usize> {
        for (i, b) in buf.iter().enumerate() {
            self.newline = match (self.newline, *b) {
                (1 | 2, b'\n') => {
                    self.newline = 0;
                    return Some(i + 1);
                }
                (_, b'\n') => 1,
                (1, b'\r') => 2,
                _ => 0,
            };
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> (Parsed, String) {
        let mut out = Vec::new();
        let p = parse_request(head.as_bytes(), &mut out, Some(b"127.0.0.1"), true, 8192);
        (p, String::from_utf8_lossy(&out).to_string())
    }

    #[test]
    fn ordinary_requests_are_rewritten_and_the_rest_go_elsewhere() {
        let (p, out) = request("GET /a?b HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n\r\n");
        let Parsed::Request(r) = p else {
            panic!("not relayed")
        };
        assert!(r.close && r.host && r.resendable && r.body == Framing::Empty);
        assert_eq!(&out[r.target.0..r.target.1], "/a?b");
        assert_eq!(out, "GET /a?b HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1, 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n");
        let (p, _) = request("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(
            p,
            Parsed::Request(Request {
                body: Framing::Chunked(_),
                resendable: false,
                host: true,
                ..
            })
        ));
        // More headers than fit on the stack are still relayed.
        let many: String = (0..150).map(|i| format!("X-{i}: {i}\r\n")).collect();
        let (p, out) = request(&format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n"));
        assert!(matches!(p, Parsed::Request(_)));
        assert!(out.contains("X-149: 149\r\n"), "{out}");
        assert!(matches!(
            request("GET / HTTP/1.1\r\nHost: h\r\n").0,
            Parsed::Partial
        ));
        for elsewhere in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n",
            // Not URI characters: hyper's to refuse (found by fuzzing).
            "GET /<a> HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /`id` HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a?x=\"y\" HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(
                matches!(request(elsewhere).0, Parsed::Elsewhere),
                "{elsewhere:?}"
            );
        }
        // What hyper takes stays on the relay: `"` and braces in a path, a
        // backquote and `|` in a query.
        for relayed in [
            "GET /a\"{b}\" HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a?b=`c`|d HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(
                matches!(request(relayed).0, Parsed::Request(_)),
                "{relayed:?}"
            );
        }
        // Longer than max_header_bytes, complete or not: hyper answers 431.
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert!(matches!(request(&big).0, Parsed::Elsewhere));
    }

    #[test]
    fn a_head_is_parsed_again_only_when_its_end_may_have_come() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n";
        let ends: Vec<usize> = (1..=head.len())
            .filter(|&n| may_end_head(&head[..n], n - 1))
            .collect();
        // Byte by byte, only the last byte can end it (and the "\n\r" of
        // the blank line's start).
        assert_eq!(ends, vec![head.len() - 1, head.len()]);
        assert!(may_end_head(b"GET / HTTP/1.1\n\n", 14));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 10));
    }

    #[test]
    fn both_paths_refuse_the_same_heads() {
        // What the relay hands to hyper for its framing, the framing check
        // refuses; what it relays, the framing check passes with the same
        // body framing.
        for head in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(request(head).0, Parsed::Elsewhere), "{head:?}");
            assert_eq!(judge_request(head.as_bytes()), Verdict::Refused, "{head:?}");
        }
        for (head, body) in [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", BodyKind::Empty),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                BodyKind::Length(5),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
                BodyKind::Chunked,
            ),
        ] {
            assert!(matches!(request(head).0, Parsed::Request(_)), "{head:?}");
            let tunnel = false;
            assert_eq!(
                judge_request(head.as_bytes()),
                Verdict::Passed { body, tunnel },
                "{head:?}"
            );
        }
        assert_eq!(
            judge_request(b"GET / HTTP/1.1\r\nHost a\r\n\r\n"),
            Verdict::Unreadable
        );
        assert_eq!(
            judge_request(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Verdict::Passed {
                body: BodyKind::Empty,
                tunnel: true
            }
        );
    }

    #[test]
    fn a_head_end_is_found_across_pieces_with_crlf_or_bare_lf() {
        let head = b"GET / HTTP/1.1\r\nHost: a\n\r\nnext";
        for step in [1, 2, 5, head.len()] {
            let mut end = HeadEnd::default();
            let mut at = 0;
            let found = head.chunks(step).find_map(|piece| {
                let found = end.find(piece).map(|k| at + k);
                at += piece.len();
                found
            });
            assert_eq!(found, Some(head.len() - 4), "step {step}");
        }
    }
}
