//! Entry points for the fuzz targets in `fuzz/` (see README.md, "Fuzzing"):
//! the code that reads what clients, operators and workers send, as it is,
//! behind small wrappers. Not a stable API; zdt itself does not use it.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Validates configuration `text` as if read from `file`, as an upgrade
/// reads it with nothing carried: an `include` pattern with wildcards
/// matches nothing (a fuzzer that wrote `include = ["/**"]` would otherwise
/// walk the whole file system); a single file named is read.
pub fn parse_config(
    text: &str,
    file: &std::path::Path,
) -> Result<crate::config::Config, crate::config::ConfigError> {
    crate::config::parse_carried(text, file, &[])
}
pub use crate::control::proto::{ErrorBody, Request, Response, MAX_REQUEST_BYTES};
pub use crate::proxy::framing_fuzz::Watcher;
pub use crate::proxy::relay_fuzz::{
    parse_request_head, Body, ChunkedBody, Head, Parsed, CHUNK_EXTENSION_MAX, CHUNK_TRAILERS_MAX,
};

/// One request line as the control server reads it.
#[derive(Debug)]
pub enum ControlLine {
    /// A line (its newline included, unless the input ended first) and what
    /// the server makes of it.
    Line(Vec<u8>, Result<Request, ErrorBody>),
    /// A blank line: skipped.
    Blank(Vec<u8>),
    /// A line longer than the limit: the server answers `too_large` and
    /// closes the connection.
    TooLarge,
}

/// The control server's reading of `input` as one connection: lines of at
/// most `max` bytes through a read buffer of `capacity` bytes, blank lines
/// skipped, each line decoded.
pub fn control_lines(input: &[u8], max: usize, capacity: usize) -> Vec<ControlLine> {
    let mut reader = tokio::io::BufReader::with_capacity(capacity.max(1), input);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    loop {
        let read = crate::control::server::read_line(&mut reader, &mut buf, max);
        // Reading a slice never waits: the first poll has the answer.
        let Poll::Ready(read) = pin!(read).poll(&mut Context::from_waker(Waker::noop())) else {
            return lines;
        };
        match read {
            Ok(Some(true)) => {
                if buf.iter().all(u8::is_ascii_whitespace) {
                    lines.push(ControlLine::Blank(buf.clone()));
                    continue;
                }
                let parsed = crate::control::server::parse(&buf);
                lines.push(ControlLine::Line(buf.clone(), parsed));
            }
            Ok(Some(false)) => {
                lines.push(ControlLine::TooLarge);
                return lines;
            }
            Ok(None) | Err(_) => return lines,
        }
    }
}
