//! The relay's request head parser and chunked body follower (the codec's),
//! as they are,
//! behind wrappers the fuzz targets (fuzz/) can call. Nothing here is used
//! by zdt itself.

use crate::proxy::codec::{parse_request, Chunks, Framing, Grammar, Parsed as Inner, Strict};

/// Longest chunk extension the follower takes.
pub const CHUNK_EXTENSION_MAX: usize = Strict::MAX_EXTENSION as usize;

/// Most trailer bytes (names and values) the follower takes.
pub const CHUNK_TRAILERS_MAX: usize = Strict::MAX_TRAILERS as usize;

/// How the relay frames a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// No body.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// A request head the relay path forwards.
#[derive(Debug)]
pub struct Head {
    /// Bytes of the head in the input.
    pub len: usize,
    /// The head as sent upstream, without its final blank line.
    pub upstream: Vec<u8>,
    /// The request body's framing.
    pub body: Body,
    /// HEAD request.
    pub head: bool,
    /// Safe to send again on a reused connection.
    pub resendable: bool,
    /// The client asked to close.
    pub close: bool,
    /// The client sent a Host.
    pub host: bool,
    /// Where the target sits in `upstream`.
    pub target: (usize, usize),
}

/// What the relay makes of the bytes a client sent.
#[derive(Debug)]
pub enum Parsed {
    /// Forwarded by the relay path.
    Request(Head),
    /// Not a whole head yet.
    Partial,
    /// Handed to the hyper path.
    Elsewhere,
}

/// `parse_request` on `buf`.
pub fn parse_request_head(
    buf: &[u8],
    peer: Option<&[u8]>,
    forward: bool,
    max_header: usize,
) -> Parsed {
    let mut upstream = Vec::new();
    match parse_request(buf, &mut upstream, peer, forward, max_header) {
        Inner::Request(r) => Parsed::Request(Head {
            len: r.len,
            body: match r.body {
                Framing::Length(n) => Body::Length(n),
                Framing::Chunked(_) => Body::Chunked,
                Framing::Empty | Framing::Close => Body::Empty,
            },
            head: r.head,
            resendable: r.resendable,
            close: r.close,
            host: r.host,
            target: r.target,
            upstream,
        }),
        Inner::Partial => Parsed::Partial,
        Inner::Elsewhere => Parsed::Elsewhere,
    }
}

/// Follows a chunked body from its first byte.
#[derive(Debug)]
pub struct ChunkedBody(Chunks<Strict>);

impl Default for ChunkedBody {
    fn default() -> Self {
        Self(Chunks::START)
    }
}

impl ChunkedBody {
    /// How many bytes of `buf` belong to the body, or `None` if its framing
    /// is broken.
    pub fn advance(&mut self, buf: &[u8]) -> Option<usize> {
        self.0.advance(buf)
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }
}
