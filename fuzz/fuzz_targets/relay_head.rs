//! The relay's request head parser, against httparse and hyper: the relay
//! path must never take a head that httparse refuses or that hyper (the
//! path it hands everything else to) would answer 400/431; what it takes
//! must mean to hyper what it means to the relay (method, target, body
//! framing); the head it writes upstream must parse again, with exactly
//! one framing and no hop-by-hop header. Never a panic.
//!
//! Input: one byte of options (forward_headers, a client address, the
//! max_header_bytes), then the bytes a client sends.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper::body::Body as _;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use zdt::fuzz::{parse_request_head, Body, Parsed};

/// Header lines hyper takes by default; heads with more are not compared
/// with hyper (zdt may raise the limit on both paths).
const HYPER_MAX_HEADERS: usize = 100;

fuzz_target!(|data: &[u8]| {
    let Some((&options, input)) = data.split_first() else {
        return;
    };
    let forward = options & 1 != 0;
    let peer: Option<&[u8]> = (options & 2 != 0).then_some(b"127.0.0.1");
    let max_header = [1024, 4096, 8192, 64 * 1024][usize::from(options >> 2) % 4];
    let parsed = parse_request_head(input, peer, forward, max_header);

    // httparse with room for any number of headers the input can hold.
    let mut headers = vec![httparse::EMPTY_HEADER; input.len() / 2 + 1];
    let mut req = httparse::Request::new(&mut headers);
    let reference = req.parse(input);
    let head = match parsed {
        Parsed::Elsewhere => return,
        Parsed::Partial => {
            assert!(
                matches!(reference, Ok(httparse::Status::Partial)),
                "relay waits for more of a head httparse reads as {reference:?}"
            );
            assert!(input.len() <= max_header);
            return;
        }
        Parsed::Request(head) => head,
    };
    let Ok(httparse::Status::Complete(len)) = reference else {
        panic!("relay took a head httparse reads as {reference:?}");
    };
    assert_eq!(head.len, len);
    assert!(len <= max_header);
    assert_eq!(req.version, Some(1));
    let method = req.method.expect("a complete head has a method");
    let target = req.path.expect("a complete head has a target");
    let header_count = req.headers.len();

    // The upstream head: parses again, same request line, one framing.
    let mut upstream = head.upstream.clone();
    upstream.extend_from_slice(b"\r\n");
    let mut up_headers = vec![httparse::EMPTY_HEADER; upstream.len() / 2 + 1];
    let mut up = httparse::Request::new(&mut up_headers);
    assert_eq!(
        up.parse(&upstream).ok(),
        Some(httparse::Status::Complete(upstream.len())),
        "upstream head {:?}",
        String::from_utf8_lossy(&upstream)
    );
    assert_eq!(up.method, Some(method));
    assert_eq!(up.path, Some(target));
    assert_eq!(&upstream[head.target.0..head.target.1], target.as_bytes());
    let (mut lengths, mut codings) = (Vec::new(), Vec::new());
    for h in up.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        assert!(
            !matches!(
                name.as_str(),
                "connection"
                    | "keep-alive"
                    | "te"
                    | "trailer"
                    | "upgrade"
                    | "proxy-connection"
                    | "expect"
            ),
            "hop-by-hop header {name} sent upstream"
        );
        match name.as_str() {
            "content-length" => lengths.push(h.value.to_vec()),
            "transfer-encoding" => codings.push(h.value.to_vec()),
            _ => {}
        }
    }
    match head.body {
        Body::Chunked => {
            assert_eq!(codings, [b"chunked".to_vec()]);
            assert!(lengths.is_empty());
        }
        Body::Length(n) => {
            assert_eq!(lengths, [n.to_string().into_bytes()]);
            assert!(codings.is_empty());
        }
        Body::Empty => {
            assert!(codings.is_empty());
            assert!(lengths.is_empty() || lengths == [b"0".to_vec()]);
        }
    }

    if header_count > HYPER_MAX_HEADERS {
        return;
    }
    match hyper_reads(input, max_header) {
        HyperSaw::Request {
            method: m,
            target: t,
            length,
        } => {
            assert_eq!(m, method, "hyper read another method");
            assert_eq!(t, target, "hyper read another target");
            let want = match head.body {
                Body::Empty => Some(0),
                Body::Length(n) => Some(n),
                Body::Chunked => None,
            };
            assert_eq!(length, want, "hyper frames the body otherwise");
        }
        HyperSaw::Refused(why) => panic!(
            "relay took a head hyper refuses ({why}): {:?}",
            String::from_utf8_lossy(&input[..len])
        ),
        HyperSaw::Unknown => {}
    }
});

enum HyperSaw {
    /// hyper called the service with this request; `length` is the body's
    /// exact size when hyper knows it.
    Request {
        method: String,
        target: String,
        length: Option<u64>,
    },
    /// hyper answered without calling the service, for this reason.
    Refused(String),
    /// hyper did not finish in time.
    Unknown,
}

/// What hyper's server, set up as zdt's hyper path is, makes of `input`
/// (the connection stays open: hyper waits for more, as from a client).
fn hyper_reads(input: &[u8], max_header: usize) -> HyperSaw {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    });
    let seen: Arc<Mutex<Option<HyperSaw>>> = Arc::default();
    let called = Arc::new(tokio::sync::Notify::new());
    let (into, call) = (seen.clone(), called.clone());
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        // The first request only: hyper may read a pipelined one at once.
        into.lock()
            .expect("not poisoned")
            .get_or_insert_with(|| HyperSaw::Request {
                method: req.method().to_string(),
                target: req.uri().to_string(),
                length: req.body().size_hint().exact(),
            });
        call.notify_one();
        std::future::ready(Ok::<_, std::convert::Infallible>(hyper::Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        )))
    });
    let ended = rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(input.len() + 64 * 1024);
        // As zdt's proxy::serve builds it (header timeout aside).
        let conn = hyper::server::conn::http1::Builder::new()
            .max_header_size(max_header)
            .max_buf_size((max_header + 16 * 1024).max(8192))
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        client
            .write_all(input)
            .await
            .expect("the pipe holds it all");
        tokio::select! {
            r = conn => Some(r),
            () = called.notified() => None,
            () = tokio::time::sleep(Duration::from_secs(5)) => None,
        }
    });
    if let Some(saw) = seen.lock().expect("not poisoned").take() {
        return saw;
    }
    match ended {
        Some(Ok(())) => HyperSaw::Refused("closed".into()),
        Some(Err(e)) => HyperSaw::Refused(e.to_string()),
        None => HyperSaw::Unknown,
    }
}
