//! Response heads from a worker, for the relay: their framing, and the
//! client's form of them written in the same pass.

use super::{length_of, name_of, push_header, Chunks, Framing, Name, STACK_HEADERS};

/// Longest response head accepted from a worker (hyper's client: ~400 KB).
const MAX_RESPONSE_HEAD: usize = 400 * 1024;

/// A response head from a worker.
pub(crate) struct Response {
    /// Bytes of the head in the upstream buffer.
    pub(crate) len: usize,
    /// Its status code.
    pub(crate) status: u16,
    pub(crate) body: Framing,
    /// The upstream connection may serve another request after this one.
    pub(crate) reusable: bool,
}

pub(crate) enum ParsedResponse {
    Response(Response),
    /// An interim (1xx) response of this many bytes: skipped.
    Interim(usize),
    Partial,
    Bad(&'static str),
}

/// Whether a Transfer-Encoding value ends in `chunked`.
fn ends_chunked(v: &[u8]) -> bool {
    v.rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Parses a response head in `buf` and writes the client's form of it into
/// `out`, with the blank line.
pub(crate) fn parse_response(
    buf: &[u8],
    out: &mut Vec<u8>,
    head: bool,
    close: bool,
) -> ParsedResponse {
    let mut headers = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut many;
    let mut resp = httparse::Response::new(&mut headers);
    let mut parsed = resp.parse(buf);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        // Rare: parsed again with room for as many as nginx passes on.
        many = vec![httparse::EMPTY_HEADER; super::super::MAX_HEADERS];
        resp = httparse::Response::new(&mut many);
        parsed = resp.parse(buf);
    }
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => {
            return ParsedResponse::Partial
        }
        Ok(httparse::Status::Partial) => return ParsedResponse::Bad("response head too large"),
        Err(_) => return ParsedResponse::Bad("malformed response head"),
    };
    let (Some(version), Some(code)) = (resp.version, resp.code) else {
        return ParsedResponse::Bad("malformed response head");
    };
    match code {
        101 => return ParsedResponse::Bad("101 to a request without Upgrade"),
        100..=199 => return ParsedResponse::Interim(len),
        _ => {}
    }
    // First the headers that decide how the rest is treated.
    let (mut length, mut te, mut upstream_close) = (None, None::<&[u8]>, version == 0);
    let mut named = false;
    for h in resp.headers.iter() {
        let value = h.value.trim_ascii();
        match name_of(h.name) {
            Name::ContentLength => match length_of(value) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return ParsedResponse::Bad("bad Content-Length"),
            },
            Name::TransferEncoding if te.is_none() => te = Some(value),
            Name::TransferEncoding => return ParsedResponse::Bad("Transfer-Encoding twice"),
            Name::Connection => {
                for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        upstream_close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        named = true;
                    }
                }
            }
            _ => {}
        }
    }
    let body = if head || code == 204 || code == 304 {
        Framing::Empty
    } else {
        match (te, length) {
            (Some(v), _) if ends_chunked(v) => Framing::Chunked(Chunks::START),
            (Some(_), _) | (None, None) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
        }
    };
    out.clear();
    out.reserve(len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let connection_names: Vec<&[u8]> = if named {
        resp.headers
            .iter()
            .filter(|h| name_of(h.name) == Name::Connection)
            .flat_map(|h| h.value.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .collect()
    } else {
        Vec::new()
    };
    for h in resp.headers.iter() {
        match name_of(h.name) {
            Name::Connection | Name::Upgrade | Name::HopByHop | Name::TransferEncoding => continue,
            // A length beside a transfer coding is not the message's length.
            Name::ContentLength if te.is_some() => continue,
            // The framing headers are zdt's to keep, whatever Connection names.
            Name::ContentLength => push_header(out, h.name.as_bytes(), h.value),
            _ if named
                && connection_names
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(h.name.as_bytes())) =>
            {
                continue
            }
            _ => push_header(out, h.name.as_bytes(), h.value),
        }
    }
    match (te, body) {
        (Some(v), Framing::Chunked(_)) => push_header(out, b"Transfer-Encoding", v),
        // Re-framed as chunked, so the client connection outlives the
        // response (and a client that closes still gets a framed body).
        (Some(v), Framing::Close) => {
            out.extend_from_slice(b"Transfer-Encoding: ");
            out.extend_from_slice(v);
            out.extend_from_slice(b", chunked\r\n");
        }
        (None, Framing::Close) => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        _ => {}
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    ParsedResponse::Response(Response {
        len,
        status: code,
        body,
        reusable: !upstream_close && body != Framing::Close,
    })
}

/// Adds `Set-Cookie: cookie` to a response head in its client form (which
/// ends with the blank line).
pub(crate) fn add_cookie(head: &mut Vec<u8>, cookie: Option<String>) {
    if let Some(c) = cookie {
        head.truncate(head.len().saturating_sub(2));
        push_header(head, b"Set-Cookie", c.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(head: &str, head_request: bool, close: bool) -> (Response, String) {
        let mut out = Vec::new();
        match parse_response(head.as_bytes(), &mut out, head_request, close) {
            ParsedResponse::Response(r) => (r, String::from_utf8_lossy(&out).to_string()),
            _ => panic!("{head:?} not parsed"),
        }
    }

    #[test]
    fn responses_are_framed_by_their_headers_and_lose_hop_by_hop_ones() {
        let (r, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\nKeep-Alive: 5\r\n\r\n", false, false);
        assert!(r.reusable && r.body == Framing::Length(3));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n");
        let (r, out) = response("HTTP/1.0 200 OK\r\n\r\n", false, true);
        assert!(!r.reusable && r.body == Framing::Close);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
            false,
        );
        assert!(r.reusable && matches!(r.body, Framing::Chunked(_)));
        let (r, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false);
        assert_eq!(r.body, Framing::Empty);
        let (r, _) = response("HTTP/1.1 304 Not Modified\r\n\r\n", false, false);
        assert!(r.reusable && r.body == Framing::Empty);
        let (r, _) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
            false,
        );
        assert!(!r.reusable);
        let mut out = Vec::new();
        assert!(matches!(
            parse_response(b"HTTP/1.1 103 Early\r\n\r\n", &mut out, false, false),
            ParsedResponse::Interim(22)
        ));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 101 Switching\r\n\r\n",
            "nonsense\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_response(bad.as_bytes(), &mut out, false, false),
                    ParsedResponse::Bad(_)
                ),
                "{bad:?}"
            );
        }
    }
}
