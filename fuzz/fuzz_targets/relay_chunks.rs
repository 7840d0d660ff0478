//! The relay's chunked body follower against the reference decoder: fed in
//! any pieces, it must end exactly where the body ends, refuse exactly what
//! the grammar refuses, and never panic.
//!
//! Input: one byte choosing the read sizes, then the body.
#![no_main]

mod common;

use common::{decode_chunked, pieces, Chunked};
use libfuzzer_sys::fuzz_target;
use zdt::fuzz::{ChunkedBody, CHUNK_EXTENSION_MAX, CHUNK_TRAILERS_MAX};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let want = decode_chunked(body, 15, CHUNK_EXTENSION_MAX, CHUNK_TRAILERS_MAX);
    let mut follower = ChunkedBody::default();
    let mut got = Chunked::Incomplete;
    let mut bad_read = 0..0;
    for piece in pieces(body.len(), seed) {
        let start = piece.start;
        match follower.advance(&body[piece.clone()]) {
            None => {
                got = Chunked::Bad(start);
                bad_read = piece;
                break;
            }
            Some(n) => {
                assert!(n <= piece.len(), "took {n} of {} bytes", piece.len());
                if follower.is_done() {
                    got = Chunked::Done(start + n);
                    break;
                }
                assert_eq!(n, piece.len(), "stopped early without ending the body");
            }
        }
    }
    match (&want, &got) {
        // The follower says only in which read the framing broke.
        (Chunked::Bad(at), Chunked::Bad(_)) => {
            assert!(
                bad_read.contains(at),
                "bad byte at {at}, refused in read {bad_read:?}"
            )
        }
        _ => assert_eq!(want, got, "reference vs follower"),
    }
});
