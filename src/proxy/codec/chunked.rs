//! The chunked body follower: where a chunked body ends, byte by byte (chunk
//! data in bulk), without copying or keeping any of it.
//!
//! One state machine serves both HTTP/1 paths, under a [`Grammar`] that says
//! how strict it is: the relay reads bodies [`Strict`]ly (RFC 9112 7.1 with
//! limits, as strictly as hyper or more: what it refuses gets zdt's 400 or
//! 502), and the framing check follows the bodies hyper reads [`AsHyper`]
//! does, so it never stops watching a connection where hyper goes on.

use std::marker::PhantomData;

/// How strictly a chunked body is read. Both grammars share the shape: a
/// size line is hex digits, optional whitespace, an optional extension after
/// `;`, CRLF; data ends in CRLF; the last chunk (size 0) is followed by
/// trailer lines and an empty line, all ended by CRLF.
pub(crate) trait Grammar {
    /// Whether a size of `digits` hex digits, `size` so far, takes one more.
    fn one_more_digit(size: u64, digits: u8) -> bool;
    /// Whether `b` may be in a chunk extension (after its `;`).
    fn extension_byte(b: u8) -> bool;
    /// Longest chunk extension.
    const MAX_EXTENSION: u32;
    /// Whether `b` may be in a trailer field's name.
    fn name_byte(b: u8) -> bool;
    /// Whether `b` may be in a trailer field's value (or, when trailer lines
    /// need no name, anywhere in the line).
    fn value_byte(b: u8) -> bool;
    /// A trailer line needs no `name:` (what follows is not checked).
    const NAMELESS_TRAILERS: bool;
    /// Most trailer bytes.
    const MAX_TRAILERS: u32;
}

/// RFC 9112's grammar with limits, for the relay: at most 15 hex digits,
/// an extension of visible characters up to 4 KiB, trailer lines `name:
/// value` up to 16 KiB in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Strict;

impl Grammar for Strict {
    fn one_more_digit(_: u64, digits: u8) -> bool {
        digits < 15
    }
    fn extension_byte(b: u8) -> bool {
        is_text(b)
    }
    const MAX_EXTENSION: u32 = 4096;
    fn name_byte(b: u8) -> bool {
        is_token(b)
    }
    fn value_byte(b: u8) -> bool {
        is_text(b)
    }
    const NAMELESS_TRAILERS: bool = false;
    const MAX_TRAILERS: u32 = 16 * 1024;
}

/// What hyper's decoder (1.x, `proto/h1/decode.rs`) reads as a body, or
/// more: any number of digits whose value fits in 64 bits, an extension of
/// any bytes but CR and LF (hyper: 16 KiB per body; here per extension),
/// trailer lines of any bytes but CR, of any length (hyper bounds them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AsHyper;

impl Grammar for AsHyper {
    fn one_more_digit(size: u64, _: u8) -> bool {
        size >> 60 == 0
    }
    fn extension_byte(b: u8) -> bool {
        b != b'\n'
    }
    const MAX_EXTENSION: u32 = 16 * 1024;
    fn name_byte(_: u8) -> bool {
        false
    }
    fn value_byte(b: u8) -> bool {
        b != b'\r'
    }
    const NAMELESS_TRAILERS: bool = true;
    const MAX_TRAILERS: u32 = u32::MAX;
}

/// A character of a header field name (RFC 9110 `tchar`).
pub(crate) fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A character of a field value or extension: visible, space, tab, obs-text.
pub(crate) fn is_text(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// Where a chunked body read by `G` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In a chunk-size line: the size so far and how many digits.
    Size(u64, u8),
    /// Whitespace after the size.
    SizeWs(u64),
    /// In a chunk extension: its bytes so far.
    Ext(u64, u32),
    /// After the `\r` of a size line.
    SizeLf(u64),
    /// In chunk data: bytes left.
    Data(u64),
    /// After chunk data: its `\r`, then its `\n`.
    DataCr,
    DataLf,
    /// At the start of a trailer line or of the final empty line; each
    /// trailer state carries the trailer bytes so far.
    LineStart(u32),
    /// In a trailer field's name.
    TrailerName(u32),
    /// In a trailer field's value.
    TrailerValue(u32),
    /// After a trailer line's `\r`.
    TrailerLf(u32),
    /// After the final empty line's `\r`.
    EndLf,
    /// The body has ended.
    Done,
}

/// Follows a chunked body read by the grammar `G` to find its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunks<G> {
    state: State,
    grammar: PhantomData<G>,
}

impl<G: Grammar> Chunks<G> {
    /// At the start of a body.
    pub(crate) const START: Self = Self {
        state: State::Size(0, 0),
        grammar: PhantomData,
    };

    /// Whether the body has ended.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Follows `buf`; returns how many of its bytes belong to the body (all of
    /// them unless it ends inside `buf`), or `None` if the framing is broken.
    pub(crate) fn advance(&mut self, buf: &[u8]) -> Option<usize> {
        use State::*;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            self.state = match self.state {
                Done => return Some(i),
                Data(n) => {
                    let take = n.min((buf.len() - i) as u64);
                    // `take` is at most buf.len() - i, so it fits in usize.
                    i += take as usize;
                    self.state = if take == n { DataCr } else { Data(n - take) };
                    continue;
                }
                Size(size, digits) => match (b as char).to_digit(16) {
                    Some(d) if G::one_more_digit(size, digits) => {
                        Size(size << 4 | u64::from(d), digits.saturating_add(1))
                    }
                    Some(_) => return None,
                    None if digits == 0 => return None,
                    None => match b {
                        b'\r' => SizeLf(size),
                        b';' => Ext(size, 0),
                        b' ' | b'\t' => SizeWs(size),
                        _ => return None,
                    },
                },
                SizeWs(size) => match b {
                    b' ' | b'\t' => SizeWs(size),
                    b';' => Ext(size, 0),
                    b'\r' => SizeLf(size),
                    _ => return None,
                },
                Ext(size, _) if b == b'\r' => SizeLf(size),
                Ext(size, n) if G::extension_byte(b) && n < G::MAX_EXTENSION => Ext(size, n + 1),
                SizeLf(0) if b == b'\n' => LineStart(0),
                SizeLf(size) if b == b'\n' => Data(size),
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Self::START.state,
                LineStart(_) if b == b'\r' => EndLf,
                LineStart(n) if G::NAMELESS_TRAILERS && n < G::MAX_TRAILERS => TrailerValue(n + 1),
                LineStart(n) | TrailerName(n) if G::name_byte(b) && n < G::MAX_TRAILERS => {
                    TrailerName(n + 1)
                }
                TrailerName(n) if b == b':' => TrailerValue(n),
                TrailerValue(n) if b == b'\r' => TrailerLf(n),
                TrailerValue(n) if G::value_byte(b) && n < G::MAX_TRAILERS => TrailerValue(n + 1),
                TrailerLf(n) if b == b'\n' => LineStart(n),
                EndLf if b == b'\n' => Done,
                _ => return None,
            };
            i += 1;
        }
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Relay = Chunks<Strict>;

    #[test]
    fn a_chunked_body_is_followed_to_its_end_in_any_pieces() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n";
        let mut stream = body.to_vec();
        stream.extend_from_slice(b"GET /next");
        for step in [1, 2, 3, 7, stream.len()] {
            let mut c = Relay::START;
            let mut taken = 0;
            for piece in stream.chunks(step) {
                let k = c.advance(piece).expect("good framing");
                taken += k;
                if c.is_done() {
                    break;
                }
            }
            assert_eq!((taken, c.is_done()), (body.len(), true), "step {step}");
        }
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"1ffffffffffffffff\r\n",
            b"5\nhello",
        ] {
            let mut c = Relay::START;
            assert_eq!(c.advance(bad), None, "{bad:?}");
        }
        // Trailers beyond 16 KiB stop the body, in whatever pieces they come.
        let mut c = Relay::START;
        assert!(c.advance(b"0\r\nX-T: ").is_some());
        let long = vec![b'a'; 1024];
        let broke = (0..20).any(|_| c.advance(&long).is_none());
        assert!(broke, "17 KiB of trailer accepted");
    }

    #[test]
    fn read_as_hyper_reads_it_a_body_takes_what_hyper_takes() {
        // Leading zeros, a size of 16 digits, control bytes in an extension,
        // a trailer line of any bytes: hyper reads them; the relay does not.
        for body in [
            &b"000000000000000000005\r\nhello\r\n0\r\n\r\n"[..],
            b"5;\x01\x7f\r\nhello\r\n0000000000000000\r\n\r\n",
            b"0\r\n: no name\x01\r\n\r\n",
        ] {
            let mut c = Chunks::<AsHyper>::START;
            assert_eq!(c.advance(body), Some(body.len()), "{body:?}");
            assert!(c.is_done(), "{body:?}");
            let mut relay = Relay::START;
            assert_eq!(relay.advance(body), None, "{body:?}");
        }
        // What hyper refuses: a size over 64 bits, a bare LF, a missing CR.
        for bad in [
            &b"10000000000000000\r\n"[..],
            b"5\nhello",
            b"5;a\nb\r\n",
            b"5\r\nhelloXX",
            b"0\r\nX: 1\n",
        ] {
            let mut c = Chunks::<AsHyper>::START;
            let read = c.advance(bad);
            assert!(read.is_none() || !c.is_done(), "{bad:?}");
        }
        let mut c = Chunks::<AsHyper>::START;
        assert_eq!(c.advance(b"10000000000000000\r\n"), None);
    }
}
