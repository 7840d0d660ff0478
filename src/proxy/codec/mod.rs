//! zdt's HTTP/1 codec: reading request and response heads and following
//! bodies by their framing, for both of the proxy's HTTP/1 paths. The relay
//! (`relay.rs`) parses heads with it and rewrites them for the other side in
//! the same pass; the framing check (`framing.rs`) judges the heads hyper is
//! about to read by the same rules and follows their bodies with the same
//! chunk state machine, so the two paths cannot disagree on where a message
//! ends or on which framing is ambiguous.
//!
//! - `request.rs`: request heads: the framing rules both paths apply (one
//!   Content-Length, `chunked` alone and last, not both, one Host), the
//!   relay's parse and rewrite, where a head may end, the request-line limit;
//! - `response.rs`: response heads from a worker, rewritten for the client;
//! - `chunked.rs`: the chunked body follower, strict for the relay, as hyper
//!   reads bodies for the framing check.
//!
//! Nothing here reads a socket or allocates per request beyond the rewritten
//! head the caller passes in.

mod chunked;
mod request;
mod response;

pub(crate) use chunked::{AsHyper, Chunks, Grammar, Strict};
/// The framing check's tests build a request line just over it.
#[cfg(test)]
pub(crate) use request::MAX_REQUEST_LINE;
pub(crate) use request::{
    judge_request, may_end_head, parse_request, request_line_too_long, trim_leading_crlf, BodyKind,
    HeadEnd, Parsed, Request, Verdict,
};
pub(crate) use response::{add_cookie, parse_response, ParsedResponse, Response};

/// Headers in a request or response head parsed on the stack; a head with
/// more is parsed again with room for [`super::MAX_HEADERS`].
const STACK_HEADERS: usize = 100;

/// How a message body is framed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked, followed to its last chunk and trailers.
    Chunked(Chunks<Strict>),
    /// Until the upstream closes the connection (responses only).
    Close,
}

impl Framing {
    /// Follows `buf`: how many of its bytes belong to the body, and whether
    /// the body ends there. `None` if the framing is broken.
    pub(crate) fn take(&mut self, buf: &[u8]) -> Option<(usize, bool)> {
        match self {
            Self::Empty => Some((0, true)),
            Self::Length(n) => {
                let k = (*n).min(buf.len() as u64);
                *n -= k;
                // `k` is at most buf.len().
                Some((k as usize, *n == 0))
            }
            Self::Chunked(c) => {
                let k = c.advance(buf)?;
                Some((k, c.is_done()))
            }
            Self::Close => Some((buf.len(), false)),
        }
    }

    /// Whether the body has ended.
    pub(crate) fn is_done(&self) -> bool {
        match self {
            Self::Empty | Self::Length(0) => true,
            Self::Chunked(c) => c.is_done(),
            Self::Length(_) | Self::Close => false,
        }
    }
}

/// Header names zdt treats specially, by their length first.
#[derive(Clone, Copy, PartialEq)]
enum Name {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    XForwardedFor,
    XRealIp,
    XForwardedProto,
    /// Hop-by-hop, and what the relay leaves to hyper.
    Upgrade,
    /// Hop-by-hop headers other than Connection and Upgrade, and Expect.
    HopByHop,
    Other,
}

fn name_of(n: &str) -> Name {
    let is = |s: &str| n.eq_ignore_ascii_case(s);
    match n.len() {
        2 if is("te") => Name::HopByHop,
        4 if is("host") => Name::Host,
        6 if is("expect") => Name::HopByHop,
        7 if is("upgrade") => Name::Upgrade,
        7 if is("trailer") => Name::HopByHop,
        9 if is("x-real-ip") => Name::XRealIp,
        10 if is("connection") => Name::Connection,
        10 if is("keep-alive") => Name::HopByHop,
        14 if is("content-length") => Name::ContentLength,
        15 if is("x-forwarded-for") => Name::XForwardedFor,
        16 if is("proxy-connection") => Name::HopByHop,
        17 if is("transfer-encoding") => Name::TransferEncoding,
        17 if is("x-forwarded-proto") => Name::XForwardedProto,
        18 if is("proxy-authenticate") => Name::HopByHop,
        19 if is("proxy-authorization") => Name::HopByHop,
        _ => Name::Other,
    }
}

/// A Content-Length value zdt accepts: digits only, short enough that no
/// sum overflows (hyper refuses more than 2^64 - 3 with 431).
fn length_of(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Adds the header line `name: value` to a head being written.
pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_is_plain_digits_that_fit() {
        assert_eq!(length_of(b"0"), Some(0));
        assert_eq!(
            length_of(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"+1",
            b"1 ",
            b"5, 5",
            b"18446744073709551615",
            b"0x1",
        ] {
            assert_eq!(length_of(bad), None, "{bad:?}");
        }
    }
}
