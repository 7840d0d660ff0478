//! The control server's request decoding: NDJSON lines of bounded length
//! read through a buffer of any size, each decoded. Lines must partition
//! the input, none longer than the limit; a decoded request must survive a
//! round trip; reply lines (what zdtctl decodes) must decode or fail
//! cleanly. Never a panic.
//!
//! Input: one byte for the line limit, one for the read buffer's size,
//! then the bytes a client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zdt::fuzz::{control_lines, ControlLine, Request, Response, MAX_REQUEST_BYTES};

fuzz_target!(|data: &[u8]| {
    let [limit, capacity, input @ ..] = data else {
        return;
    };
    // Small limits reach the too-long path; 255 stands for the real one.
    let max = if *limit == 255 {
        MAX_REQUEST_BYTES
    } else {
        usize::from(*limit) + 1
    };
    let capacity = usize::from(*capacity) + 1;
    let mut at = 0;
    let lines = control_lines(input, max, capacity);
    for (k, line) in lines.iter().enumerate() {
        let bytes = match line {
            ControlLine::TooLarge => {
                assert_eq!(k, lines.len() - 1, "a line after a refused one");
                let rest = &input[at..];
                let end = rest
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(rest.len(), |i| i + 1);
                assert!(end > max, "a line of {end} bytes refused with limit {max}");
                return;
            }
            ControlLine::Blank(bytes) => bytes,
            ControlLine::Line(bytes, parsed) => {
                if let Ok(req) = parsed {
                    let again: Request = serde_json::from_slice(
                        &serde_json::to_vec(req).expect("a request serializes"),
                    )
                    .expect("a request decodes after encoding");
                    assert_eq!(&again, req);
                }
                if let Ok(resp) = serde_json::from_slice::<Response>(bytes) {
                    let again: Response = serde_json::from_slice(
                        &serde_json::to_vec(&resp).expect("a reply serializes"),
                    )
                    .expect("a reply decodes after encoding");
                    assert_eq!(again, resp);
                }
                bytes
            }
        };
        assert!(
            bytes.len() <= max,
            "a line of {} bytes with limit {max}",
            bytes.len()
        );
        assert_eq!(
            bytes.as_slice(),
            &input[at..at + bytes.len()],
            "lines do not partition the input"
        );
        at += bytes.len();
        let last = k == lines.len() - 1;
        assert!(
            bytes.ends_with(b"\n") || (last && at == input.len()),
            "a line cut short"
        );
    }
    assert_eq!(at, input.len(), "input left unread");
});
