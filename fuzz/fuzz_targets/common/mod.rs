//! What the fuzz targets share: piece sizes for feeding a stream in reads,
//! and a reference chunked-body decoder written from the grammar (RFC 9112
//! 7.1) with the relay's limits, independent of the code under test.
#![allow(dead_code)]

/// Splits `len` bytes into reads whose sizes follow from `seed` (1 to 64
/// bytes, or everything at once for seed 0).
pub fn pieces(len: usize, seed: u8) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut x = u32::from(seed);
    while at < len {
        let n = if seed == 0 {
            len
        } else {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            1 + (x >> 16) as usize % 64
        };
        let end = (at + n).min(len);
        out.push(at..end);
        at = end;
    }
    out
}

/// How a chunked body reads.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunked {
    /// The body ends after this many bytes (the final CRLF included).
    Done(usize),
    /// Every byte is a valid start of a body that has not ended.
    Incomplete,
    /// The byte at this offset cannot be part of a chunked body.
    Bad(usize),
}

enum Stop {
    Incomplete,
    Bad(usize),
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Result<u8, Stop> {
        self.b.get(self.i).copied().ok_or(Stop::Incomplete)
    }
    fn expect(&mut self, want: u8) -> Result<(), Stop> {
        if self.peek()? == want {
            self.i += 1;
            Ok(())
        } else {
            Err(Stop::Bad(self.i))
        }
    }
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Field value and extension characters: HTAB, SP, VCHAR, obs-text.
fn text(b: u8) -> bool {
    b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80
}

/// Decodes a chunked body: `chunk-size [ws] [";" ext] CRLF data CRLF` ...
/// `0 CRLF *(trailer CRLF) CRLF`; at most `max_digits` hex digits, an
/// extension of at most `max_ext` bytes after its `;`, and trailer names
/// and values of at most `max_trailers` bytes in all.
pub fn decode_chunked(b: &[u8], max_digits: usize, max_ext: usize, max_trailers: usize) -> Chunked {
    let mut c = Cursor { b, i: 0 };
    match body(&mut c, max_digits, max_ext, max_trailers) {
        Ok(()) => Chunked::Done(c.i),
        Err(Stop::Incomplete) => Chunked::Incomplete,
        Err(Stop::Bad(at)) => Chunked::Bad(at),
    }
}

fn body(
    c: &mut Cursor<'_>,
    max_digits: usize,
    max_ext: usize,
    max_trailers: usize,
) -> Result<(), Stop> {
    loop {
        // chunk-size
        let mut size: u64 = 0;
        let mut digits = 0;
        while let Some(d) = (c.peek()? as char).to_digit(16) {
            if digits == max_digits {
                return Err(Stop::Bad(c.i));
            }
            size = size * 16 + u64::from(d);
            digits += 1;
            c.i += 1;
        }
        if digits == 0 {
            return Err(Stop::Bad(c.i));
        }
        while matches!(c.peek()?, b' ' | b'\t') {
            c.i += 1;
        }
        if c.peek()? == b';' {
            c.i += 1;
            let mut n = 0;
            while c.peek()? != b'\r' {
                if !text(c.peek()?) || n == max_ext {
                    return Err(Stop::Bad(c.i));
                }
                n += 1;
                c.i += 1;
            }
        }
        c.expect(b'\r')?;
        c.expect(b'\n')?;
        if size == 0 {
            break;
        }
        let left = (c.b.len() - c.i) as u64;
        if left < size {
            return Err(Stop::Incomplete);
        }
        c.i += size as usize;
        c.expect(b'\r')?;
        c.expect(b'\n')?;
    }
    // trailer section
    let mut used = 0;
    loop {
        if c.peek()? == b'\r' {
            c.i += 1;
            return c.expect(b'\n');
        }
        let start = c.i;
        while c.peek()? != b':' {
            if !tchar(c.peek()?) || used == max_trailers {
                return Err(Stop::Bad(c.i));
            }
            used += 1;
            c.i += 1;
        }
        if c.i == start {
            return Err(Stop::Bad(c.i));
        }
        c.i += 1;
        while c.peek()? != b'\r' {
            if !text(c.peek()?) || used == max_trailers {
                return Err(Stop::Bad(c.i));
            }
            used += 1;
            c.i += 1;
        }
        c.i += 1;
        c.expect(b'\n')?;
    }
}
