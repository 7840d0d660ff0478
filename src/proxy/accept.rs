//! Accepting: one `accept_loop` per listening socket per proxy thread, the
//! `max_connections` limit, the pause when zdt is short of fds (see the
//! module docs of [`super`]) and the pause while the proxy is retired
//! (`retire.rs`), and the hand-over of a new client connection to
//! the least loaded proxy thread (`dispatch`), which serves it on the relay
//! path or, for `protocol = "tcp"`, as bytes.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{self, Either, FutureExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{relay, splice, tcp, workers, Shared};

pub(super) enum Listener {
    /// With TCP_NODELAY set on the listening socket: the connections it
    /// accepts inherit it, one setsockopt less per client connection.
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A client connection just accepted.
enum Accepted {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Self::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
            Self::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }

    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l) => l.as_raw_fd(),
        }
    }

    pub(super) fn from_fd(fd: &OwnedFd) -> std::io::Result<Self> {
        let dup = fd.try_clone()?;
        let sock = socket2::Socket::from(dup);
        sock.set_nonblocking(true)?;
        if sock.local_addr()?.as_unix().is_some() {
            let std: std::os::unix::net::UnixListener = sock.into();
            Ok(Self::Unix(tokio::net::UnixListener::from_std(std)?))
        } else {
            // The socket is zdt's; in proxy mode only zdt accepts on it.
            sock.set_nodelay(true)?;
            let std: std::net::TcpListener = sock.into();
            Ok(Self::Tcp(tokio::net::TcpListener::from_std(std)?))
        }
    }
}

/// A client connection that can move from the proxy thread that accepted it
/// to another one (deregistered from one reactor, registered with the other).
trait ClientIo:
    splice::SpliceIo
    + tokio::io::AsyncRead
    + tokio::io::AsyncWrite
    + Unpin
    + Send
    + Sync
    + Sized
    + 'static
{
    type Std: Send + 'static;
    fn into_std(self) -> std::io::Result<Self::Std>;
    fn from_std(s: Self::Std) -> std::io::Result<Self>;
}

impl ClientIo for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::TcpStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(s)
    }
}

impl ClientIo for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(s)
    }
}

/// A client connection's place under `max_connections` and its count on
/// its proxy thread, held until it closes.
pub(super) type Open = (workers::Open, OwnedSemaphorePermit);

/// Serves an accepted client connection. An HTTP connection is served on
/// this proxy thread, and moves to a less loaded one, if it must, once its
/// first request is answered and it is kept alive ([`rebalance`]): moving
/// costs two epoll_ctl calls and a wake-up of the other thread, paid in
/// vain by a connection that closes after one request (16% of them moved
/// with 32 clients opening a connection per request, and never moving at
/// accept gave 4.6% more requests/s). A `tcp` connection carries no
/// requests, so it moves now. `slot` is its place under `max_connections`,
/// held until it closes.
fn dispatch<S: ClientIo>(
    s: S,
    peer: Option<std::net::IpAddr>,
    tcp: bool,
    shared: &Arc<Shared>,
    slot: OwnedSemaphorePermit,
) {
    let there = if tcp {
        shared.workers.for_new_connection()
    } else {
        workers::current()
    };
    serve_on(s, peer, tcp, shared.clone(), slot, there);
}

/// Moves a kept-alive HTTP client connection to proxy thread `there`; its
/// count moves with it (counted there before it stops counting here, so a
/// retire waiting for none open cannot see zero in between).
fn rebalance<S: ClientIo>(
    s: S,
    peer: Option<std::net::IpAddr>,
    shared: Arc<Shared>,
    open: Open,
    there: usize,
) {
    let (here, slot) = open;
    serve_on(s, peer, false, shared, slot, there);
    drop(here);
}

/// Serves a client connection on proxy thread `there`.
fn serve_on<S: ClientIo>(
    s: S,
    peer: Option<std::net::IpAddr>,
    tcp: bool,
    shared: Arc<Shared>,
    slot: OwnedSemaphorePermit,
    there: usize,
) {
    if there == workers::current() {
        let open = (shared.workers.open_on(there), slot);
        tokio::spawn(serve_client(s, peer, tcp, shared, open));
        return;
    }
    let Some(rt) = shared.workers.handles().get(there).cloned() else {
        return;
    };
    let std = match s.into_std() {
        Ok(std) => std,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot move a client connection; closed");
            return;
        }
    };
    let open = (shared.workers.open_on(there), slot);
    rt.spawn(serve_moved::<S>(std, peer, tcp, shared, open));
}

/// [`serve_client`] for a connection accepted on another proxy thread: it
/// joins this thread's reactor first. As small as `serve_client`'s future:
/// the conversion runs in a closure the serving future replaces.
fn serve_moved<S: ClientIo>(
    std: S::Std,
    peer: Option<std::net::IpAddr>,
    tcp: bool,
    shared: Arc<Shared>,
    open: Open,
) -> impl Future<Output = ()> + Send {
    future::lazy(move |_| match S::from_std(std) {
        Ok(s) => Either::Left(serve_client(s, peer, tcp, shared, open)),
        Err(e) => {
            tracing::warn!(cause = %e, "cannot move a client connection");
            Either::Right(future::ready(()))
        }
    })
    .flatten()
}

/// A client connection's task: the relay path, or bytes for `protocol =
/// "tcp"`. Not an `async fn`: its arguments would be kept beside the future
/// they move into, in every task, for as long as the connection is open.
/// The tcp path is boxed, as its future is the larger of the two.
fn serve_client<S: ClientIo>(
    s: S,
    peer: Option<std::net::IpAddr>,
    tcp: bool,
    shared: Arc<Shared>,
    open: Open,
) -> impl Future<Output = ()> + Send {
    if tcp {
        Either::Left(Box::pin(async move {
            let _open = open;
            tcp::serve_tcp(s, shared).await;
        }))
    } else {
        Either::Right(relay::serve(s, peer, shared, open, rebalance::<S>))
    }
}

/// First pause of an accept loop short of fds; it doubles up to [`PAUSE_MAX`].
const PAUSE_MIN: Duration = Duration::from_millis(100);
/// Longest pause of an accept loop short of fds.
const PAUSE_MAX: Duration = Duration::from_secs(1);

/// Connections an accept loop accepts in a row before it lets the thread's
/// other tasks run. Bounded, so that a flood of new connections cannot keep
/// a thread from the requests of those it already holds; large, because a
/// loaded thread's turn is long. With `php -S` behind zdt at 256 clients, a
/// turn took about 6 ms (two threads polled epoll some 150 times a second
/// each), and wrk opens its 256 connections at once: 4 in a row took some
/// 30 turns to accept them, and the first requests on the last of them
/// waited 200-300 ms (wrk's maximum), while zdt's own time on any request
/// stayed under 63 ms. With 64 in a row, p99 was 38-63 ms against 55-111
/// (README's benchmark section, "What was changed").
const ACCEPT_BURST: u32 = 64;

/// Accepts client connections on one socket for one proxy thread until
/// `stop`, at most as many at once as `slots` has permits (shared by the
/// socket's loops on every thread), at most [`ACCEPT_BURST`] in a row. See
/// the module docs for when it pauses; it also pauses while the proxy is
/// retired (`retire.rs`), and accepts again when it resumes.
pub(super) async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let retire = shared.workers.retire();
    let mut paused = retire.subscribe();
    let mut acceptor = Acceptor::new(listener, &shared, slots);
    let mut burst = 0u32;
    loop {
        // Counted as accepting while this lives; waits while retired.
        let _accepting = tokio::select! {
            () = stop.cancelled() => return,
            a = retire.accepting(&mut paused) => a,
        };
        loop {
            // Retiring begins: no further accept (what is being waited for
            // is cancel-safe), and the loop pauses above.
            let (client, slot) = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                Ok(()) = paused.changed() => break,
                next = acceptor.next() => next,
            };
            acceptor.serve(client, slot);
            burst += 1;
            if burst == ACCEPT_BURST {
                burst = 0;
                tokio::task::yield_now().await;
            }
        }
    }
}

/// One accept loop's state: its listener, and when it last warned.
struct Acceptor<'a> {
    listener: Listener,
    shared: &'a Arc<Shared>,
    slots: Arc<Semaphore>,
    /// Serve clients as bytes (`protocol = "tcp"`).
    tcp: bool,
    /// Short of fds: wait this long before checking again.
    pause: Option<Duration>,
    /// When "max_connections reached" and "near the open-files limit" were
    /// last logged: at most once a minute each per loop, as both can come at
    /// every connection that closes.
    warned: Option<Instant>,
    warned_fds: Option<Instant>,
}

/// Whether a minute has passed since `at` (then it is now).
fn due(at: &mut Option<Instant>) -> bool {
    let due = at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
    if due {
        *at = Some(Instant::now());
    }
    due
}

impl<'a> Acceptor<'a> {
    fn new(listener: Listener, shared: &'a Arc<Shared>, slots: Arc<Semaphore>) -> Self {
        Self {
            listener,
            tcp: shared.options.protocol == crate::config::Protocol::Tcp,
            shared,
            slots,
            pause: None,
            warned: None,
            warned_fds: None,
        }
    }

    /// The next client, with its place under max_connections. Cancel-safe:
    /// dropped while waiting, it has accepted nothing.
    async fn next(&mut self) -> (Accepted, OwnedSemaphorePermit) {
        let shared = self.shared;
        loop {
            // A place under max_connections first: while there is none,
            // nothing is accepted and new clients wait in the backlog.
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    if due(&mut self.warned) {
                        tracing::warn!(program = %shared.program, "max_connections reached; new connections wait in the listen backlog until one closes");
                    }
                    match self.slots.clone().acquire_owned().await {
                        Ok(slot) => slot,
                        // Never closed; should it be, this loop accepts
                        // nothing more (it still ends at `stop`).
                        Err(_) => std::future::pending().await,
                    }
                }
            };
            if let Some(p) = self.pause {
                tokio::time::sleep(p).await;
                if !crate::fds::has_room(self.listener.as_raw_fd(), shared.fd_ceiling) {
                    self.pause = Some((p * 2).min(PAUSE_MAX));
                    continue;
                }
                tracing::debug!(program = %shared.program, "file descriptors free again; accepting");
                self.pause = None;
            }
            match self.listener.accept().await {
                Ok(client) => return (client, slot),
                // Running out of fds (or kernel memory) pauses; other
                // errors are the connection's own and are ignored.
                Err(e) => {
                    let short = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if short {
                        if due(&mut self.warned_fds) {
                            tracing::warn!(program = %shared.program, cause = %e, "accept failed; pausing (new connections wait in the listen backlog)");
                        }
                        self.pause = Some(PAUSE_MIN);
                    }
                }
            }
        }
    }

    /// Serves `client` (see `dispatch`). The client is served even when
    /// its fd is in the reserve; only the next accept waits.
    fn serve(&mut self, client: Accepted, slot: OwnedSemaphorePermit) {
        use std::os::fd::AsRawFd;
        let fd = match &client {
            Accepted::Tcp(s, _) => s.as_raw_fd(),
            Accepted::Unix(s) => s.as_raw_fd(),
        };
        let shared = self.shared;
        match client {
            Accepted::Tcp(s, addr) => dispatch(s, Some(addr.ip()), self.tcp, shared, slot),
            Accepted::Unix(s) => dispatch(s, None, self.tcp, shared, slot),
        }
        if fd as u64 >= shared.fd_ceiling {
            if due(&mut self.warned_fds) {
                tracing::warn!(program = %shared.program, fd_ceiling = shared.fd_ceiling, "near the open-files limit: pausing accept to keep file descriptors for the control socket and spawning (new connections wait in the listen backlog)");
            }
            self.pause = Some(PAUSE_MIN);
        }
    }
}

#[cfg(test)]
mod nodelay {
    use std::os::fd::OwnedFd;

    /// Client connections get TCP_NODELAY from the listening socket, as
    /// `serve` no longer sets it on each one.
    #[tokio::test]
    async fn accepted_client_connections_have_tcp_nodelay() {
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = std.local_addr().expect("address");
        let fd = OwnedFd::from(std);
        let l = super::Listener::from_fd(&fd).expect("listener");
        assert!(matches!(l, super::Listener::Tcp(_)));
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        match l.accept().await.expect("accept") {
            super::Accepted::Tcp(s, _) => assert!(s.nodelay().expect("nodelay")),
            super::Accepted::Unix(_) => panic!("a unix connection"),
        }
    }
}

#[cfg(test)]
mod rebalance {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;

    /// A kept-alive connection handed to another proxy thread is counted
    /// there, and no longer here, and is served there.
    #[tokio::test]
    async fn a_moved_connection_takes_its_count_and_is_served_on_its_new_thread() {
        let shared = super::super::test_shared_on(2);
        let workers = &shared.workers;
        // The test runs outside the proxy threads, as if on thread 0.
        let slot = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a free slot");
        let here = workers.open_on(0);
        let _others: Vec<_> = (0..3).map(|_| workers.open_on(0)).collect();
        // Thread 0 holds 4, thread 1 none: a connection here should move.
        assert_eq!(workers.less_loaded(), Some(1));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = tokio::net::TcpStream::connect(l.local_addr().expect("address"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        super::rebalance(s, None, shared.clone(), (here, slot), 1);
        // 3 and 1: balanced. Had the count stayed here (4 and 1) or not
        // come there (3 and 0), one would still be "clearly fewer".
        assert_eq!(workers.less_loaded(), None);
        // No routes: thread 1 answers 503 after queue_timeout.
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("send");
        let mut head = [0u8; 12];
        client.read_exact(&mut head).await.expect("an answer");
        assert_eq!(&head, b"HTTP/1.1 503");
    }
}

#[cfg(test)]
mod memory {
    use tokio::net::TcpStream;

    use super::super::returned_size;

    /// A client connection's task holds its future for as long as the
    /// connection is open, idle or not: it must be the relay path's future
    /// and little more, whichever thread accepted the connection. (An `async
    /// fn serve_client` kept its arguments beside the relay future, and the
    /// unboxed tcp path was larger still: 1000 bytes in a release build
    /// against 608.)
    #[test]
    fn a_client_connections_task_is_the_size_of_the_relay_path() {
        let serve = returned_size(super::relay::serve::<TcpStream, super::Open>);
        let here = returned_size(super::serve_client::<TcpStream>);
        let moved = returned_size(super::serve_moved::<TcpStream>);
        for (task, size) in [("accepted here", here), ("moved", moved)] {
            assert!(
                size <= serve + 16,
                "a task {task} takes {size} bytes, the relay path {serve}"
            );
        }
    }
}

#[cfg(test)]
mod burst {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;

    /// With a backlog of connections waiting, an accept loop accepts
    /// [`super::ACCEPT_BURST`] of them and lets the thread's other tasks
    /// run before it accepts more. The test's task sees the count after the
    /// loop's first turn: all of them when the loop accepted until the
    /// backlog was empty.
    #[tokio::test]
    async fn an_accept_loop_accepts_a_bounded_burst_then_lets_other_tasks_run() {
        let shared = super::super::test_shared();
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = std.local_addr().expect("address");
        // Connected (the kernel completes the handshakes) before the loop
        // accepts any.
        let n = super::ACCEPT_BURST as usize + 6;
        let _clients: Vec<_> = (0..n)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let fd = OwnedFd::from(std);
        let listener = super::Listener::from_fd(&fd).expect("listener");
        let stop = CancellationToken::new();
        let slots = Arc::new(Semaphore::new(100));
        let looping = tokio::spawn(super::accept_loop(
            listener,
            shared.clone(),
            slots,
            stop.clone(),
        ));
        let open = || shared.workers.conns().open();
        let first_turn = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::task::yield_now().await;
                if open() > 0 {
                    return open();
                }
            }
        })
        .await
        .expect("the accept loop accepted nothing within 5 s");
        assert_eq!(first_turn, super::ACCEPT_BURST as usize);
        // The rest are accepted in later turns.
        tokio::time::timeout(Duration::from_secs(5), async {
            while open() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} of {n} connections accepted after 5 s", open()));
        stop.cancel();
        looping.await.expect("the accept loop ends");
    }
}
