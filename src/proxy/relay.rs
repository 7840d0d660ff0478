//! The proxy's HTTP/1.1 path for ordinary requests: one task per client
//! connection reads a request head, writes it (rewritten) and the body to a
//! pooled upstream connection, reads the response head and relays the
//! response body by its framing. Heads are parsed, and rewritten in the same
//! pass, and bodies followed by the codec (`codec/`); there is no header
//! map, no task per upstream connection and no channel between them: each
//! byte is read once and written once, and the only copies are of heads.
//!
//! Anything else is handed to the hyper-based path at a request boundary,
//! with the bytes read so far: HTTP/1.0, Upgrade, Expect, CONNECT, an
//! absolute-form target, hop-by-hop headers other than `Connection:
//! keep-alive/close`, and every head hyper refuses (400, 431). So the
//! protection and the rare features stay where they are tested, and this
//! path only has to be right for requests that are well formed.
//!
//! An idle client connection holds no buffer: its read buffer goes back to
//! the thread's spares while it waits for its next request, and the state of
//! a request is boxed while it runs, so the connection's task stays small.
//!
//! This file is the connection's loop (read a head, forward it, keep alive
//! or close, hand over) and zdt's own answers; `relay/forward.rs` forwards
//! one request (drain check, sending, the resend rule, 502 and 504),
//! `relay/bodies.rs` moves bodies, `relay/buffer.rs` and `relay/idle.rs`
//! keep read buffers and upstream connections between uses.

#[doc(hidden)]
pub mod fuzz;

mod bodies;
pub(super) mod buffer;
mod forward;
mod idle;

pub(crate) use idle::Idle;

use std::net::IpAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::codec::{may_end_head, parse_request, request_line_too_long, Parsed};
use super::retire::Registered;
use super::splice::SpliceIo;
use super::{framing, Shared};
use buffer::Buffer;
use forward::forward;

/// A plain-text answer of zdt's own; `headers` are added as they are.
pub(super) fn text(status: &str, body: &str, headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const CLOSE: &str = "Connection: close\r\n";

/// Moves a client connection, with its place under `max_connections`, to
/// another proxy thread (`accept::rebalance`).
pub(super) type Rebalance<S, O> = fn(S, Option<IpAddr>, Arc<Shared>, O, usize);

/// What the client connection does after a request.
enum Outcome {
    /// It may carry another request.
    KeepAlive,
    /// It is closed.
    Close,
    /// It is closed, with bytes of the request maybe still unread: they are
    /// read and dropped for a moment first, so that closing does not reset
    /// the connection before the client has read the answer.
    CloseUnread,
}

/// A client connection on this path.
struct Client<S> {
    io: S,
    /// Bytes read and not yet used: the next head, or body bytes.
    buf: Buffer,
    /// The client's address as text, for X-Forwarded-For.
    peer: Option<Box<[u8]>>,
    shared: Arc<Shared>,
}

impl<S> Client<S> {
    /// The client's address, read back from its text.
    fn peer_ip(&self) -> Option<IpAddr> {
        ip_of(self.peer.as_deref())
    }
}

/// An address from the text `IpAddr` displays as.
fn ip_of(text: Option<&[u8]>) -> Option<IpAddr> {
    std::str::from_utf8(text?).ok()?.parse().ok()
}

/// Serves a client connection: ordinary requests here, the rest handed to
/// the hyper path with the bytes already read. `open` is held until the
/// connection closes (its place under `max_connections`), or handed to
/// `rebalance` with the connection when, its first request answered and
/// kept alive, it should live on a less loaded proxy thread.
///
/// Not an `async fn`: an async fn keeps its arguments in the future beside
/// the locals they are moved into, for as long as the connection is open.
/// The async block below uses what it captures in place.
pub(super) fn serve<S, O>(
    io: S,
    peer: Option<IpAddr>,
    shared: Arc<Shared>,
    open: O,
    rebalance: Rebalance<S, O>,
) -> impl std::future::Future<Output = ()> + Send
where
    S: SpliceIo + AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
    O: Send,
{
    let mut c = Client {
        io,
        buf: Buffer::default(),
        peer: peer.map(|ip| ip.to_string().into_bytes().into_boxed_slice()),
        shared,
    };
    // `peer` is not captured: where it is needed again (rarely), it is read
    // back from `c.peer`.
    async move {
        // Woken when retiring begins or ends.
        let registered = Registered::here(c.shared.workers.conns()).await;
        // Before the first request is answered.
        let mut first = true;
        let sleep = tokio::time::sleep(c.shared.options.header_timeout);
        tokio::pin!(sleep);
        loop {
            // The header timeout runs from connect or from the previous response.
            let deadline = Instant::now() + c.shared.options.header_timeout;
            sleep.as_mut().reset(deadline);
            // Where the bytes not yet searched for the end of a head begin.
            let mut unsearched = 0;
            let (req, out) = loop {
                if c.buf.is_empty() {
                    // Idle: no buffer is held while the client thinks.
                    c.buf.release();
                    // Retiring: a next request may already be on its way, so
                    // the connection waits up to `grace` for it, then closes.
                    let retire = c.shared.workers.retire();
                    let retiring = retire.is_retiring();
                    if retiring {
                        sleep
                            .as_mut()
                            .reset(deadline.min(Instant::now() + retire.grace()));
                    }
                    tokio::select! {
                        biased;
                        r = std::future::poll_fn(|cx| c.io.poll_read_ready(cx)) => if r.is_err() { return },
                        () = &mut sleep => return,
                        () = retire.turned(retiring) => {
                            sleep.as_mut().reset(deadline);
                            continue;
                        }
                    }
                    if retiring {
                        // A head is coming: it has the whole header timeout.
                        sleep.as_mut().reset(deadline);
                    }
                } else if request_line_too_long(&c.buf) {
                    // At once, not when (if ever) the head is whole.
                    let too_long = text("414 URI Too Long", TOO_LONG, CLOSE);
                    let _ = c.io.write_all(&too_long).await;
                    let _ = c.io.shutdown().await;
                    return Box::pin(linger(c.io)).await;
                } else if unsearched == 0
                    || may_end_head(&c.buf, unsearched)
                    || c.buf.len() > c.shared.options.max_header_bytes
                {
                    // What is here first: a pipelined request may be whole.
                    // `out` is written only when the head is whole.
                    let mut out = Vec::new();
                    let options = &c.shared.options;
                    match parse_request(
                        &c.buf,
                        &mut out,
                        c.peer.as_deref(),
                        options.forward_headers,
                        options.max_header_bytes,
                    ) {
                        Parsed::Request(r) => break (r, out),
                        Parsed::Partial => {}
                        Parsed::Elsewhere => return Box::pin(elsewhere(c)).await,
                    }
                }
                unsearched = c.buf.len();
                c.buf.room();
                tokio::select! {
                    biased;
                    r = c.io.read_buf(&mut c.buf.0) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    () = &mut sleep => return,
                }
            };
            // Boxed: an idle connection then holds only what waiting needs.
            match Box::pin(forward(&mut c, req, out)).await {
                Outcome::KeepAlive if first => {
                    first = false;
                    // Nothing pipelined is left to carry over.
                    if c.buf.is_empty() && !c.shared.workers.retire().is_retiring() {
                        if let Some(there) = c.shared.workers.less_loaded() {
                            drop(registered);
                            let peer = c.peer_ip();
                            rebalance(c.io, peer, c.shared, open, there);
                            return;
                        }
                    }
                }
                Outcome::KeepAlive => {}
                // close() sends the FIN after what is still queued; a
                // shutdown() first would only cost a system call.
                Outcome::Close => return,
                Outcome::CloseUnread => {
                    let _ = c.io.shutdown().await;
                    return Box::pin(linger(c.io)).await;
                }
            }
        }
    }
}

/// Reads and drops what the client still sends, for up to a second or
/// 1 MiB, until it closes (nginx's lingering close).
async fn linger<S: AsyncRead + Unpin>(mut io: S) {
    let mut sink = vec![0u8; 16 * 1024];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => return,
            }
        }
    })
    .await;
}

/// Hands the connection to the hyper path, the bytes read so far first.
async fn elsewhere<S>(mut c: Client<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let peer = c.peer_ip();
    let gate = Arc::new(framing::Gate::default());
    let io = framing::Framing::with_prefix(
        c.io,
        std::mem::take(&mut c.buf.0),
        Some(gate.clone()),
        c.shared.options.max_header_bytes,
    );
    super::serve(TokioIo::new(io), peer, c.shared, gate).await;
}

/// Writes an answer of zdt's own (only its head to a HEAD request); `close`
/// if the connection ends after it.
async fn answer<S: AsyncWrite + Unpin>(
    c: &mut Client<S>,
    bytes: &[u8],
    head: bool,
    close: bool,
) -> Outcome {
    // "HTTP/1.1 NNN ...": counted by its class.
    if let Some(code) = bytes
        .get(9..12)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse().ok())
    {
        c.shared.traffic.stats.answered(code);
    }
    let bytes = match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) if head => &bytes[..end + 4],
        _ => bytes,
    };
    match c.io.write_all(bytes).await {
        Ok(()) if !close => Outcome::KeepAlive,
        Ok(()) => Outcome::CloseUnread,
        Err(_) => Outcome::Close,
    }
}

// zdt's own answers' bodies.
const BAD_CHUNKS: &str = "400 Bad Request: bad chunked framing\n";
const TOO_LONG: &str = "414 URI Too Long: the request line is longer than 8 KB\n";
const BODY_TIMEOUT: &str = "408 Request Timeout: no request body within body_timeout\n";
const NO_ANSWER: &str =
    "504 Gateway Timeout: the application did not answer within response_timeout\n";
const UNREACHABLE: &str = "502 Bad Gateway: no instance could be reached\n";
const FAILED: &str = "502 Bad Gateway: the application failed to answer\n";

#[cfg(test)]
mod memory {
    use std::net::IpAddr;

    use tokio::net::TcpStream;

    use super::super::accept::Open;
    use super::super::returned_size;

    /// What an idle client connection holds is its task: the serve future
    /// in tokio's task cell (a 32-byte header, 32 bytes of the scheduler's,
    /// the future, a 48-byte trailer, aligned to 128 bytes), plus the
    /// socket's registration with the reactor and the kernel's socket. With
    /// a future of at most 400 bytes the cell is 512 bytes; at 401-528 it is
    /// 640, and so on. The request's own state is boxed while a request
    /// runs; inline it was 1.5 KB and RSS with 10,000 idle connections grew
    /// by 5 MiB. The future was 696 bytes (an 896-byte cell) while `serve`
    /// was an `async fn`, which keeps its arguments beside the locals they
    /// are moved into, and waited with `ready()`, whose future is 136 bytes.
    #[test]
    fn an_idle_client_connection_holds_a_small_future() {
        let size = returned_size(super::serve::<TcpStream, Open>);
        assert!(
            size <= 400,
            "the serve future takes {size} bytes: tokio's task cell for it is \
             then more than 512 bytes"
        );
    }

    #[test]
    fn a_clients_address_is_read_back_from_its_text() {
        for ip in ["127.0.0.1", "::1", "::ffff:10.1.2.3", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().expect("an address");
            let text = ip.to_string().into_bytes();
            assert_eq!(super::ip_of(Some(&text)), Some(ip));
        }
        assert_eq!(super::ip_of(None), None);
        assert_eq!(super::ip_of(Some(b"not an address")), None);
    }
}
