//! Instance output: log files with size rotation, an in-memory ring for
//! `zdtctl tail`, and live followers for `tail -f`.
//!
//! Logging must never stop a worker nor zdt: a [`LogSink`] write never blocks
//! on a follower nor on the file, and never fails. When the file cannot be
//! written (full disk, permissions, removed directory) the bytes are dropped
//! and counted; the next write tries again. A log file removed or renamed by
//! someone else is noticed (inode check, at most once a second) and opened
//! anew.
//!
//! The file is opened with `O_NONBLOCK`, so a FIFO, a pipe (`/dev/stdout` of
//! `zdt run`) or a terminal whose reader stalls makes a write return early
//! instead of freezing a runtime thread (and with it status, restarts and
//! signals). What the file does not take waits in a buffer of
//! [`PENDING_BYTES`], retried by the next write or by [`pump`]'s timer; what
//! does not fit there is dropped and counted. A FIFO nobody has open for
//! reading cannot be opened at all (`ENXIO`): its output is dropped and the
//! open is tried again at the next write, so a reader that comes later gets
//! the output from then on. Regular files are not affected by `O_NONBLOCK`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::broadcast;

mod pipe;
mod stderr;
mod syslog;
pub use pipe::OutputPipe;
pub use stderr::StderrLog;
pub use syslog::Syslog;

/// Bytes of recent output kept in memory per stream.
pub const RING_BYTES: usize = 64 * 1024;

/// How often the file's identity is checked against its path.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// Bytes kept for a file (pipe, FIFO) that does not take them right now.
pub const PENDING_BYTES: usize = 64 * 1024;

/// How soon [`pump`] retries bytes a stalled file did not take, when the
/// worker writes nothing new.
const PENDING_RETRY: Duration = Duration::from_millis(200);

/// How long bytes a stalled file did not take are retried after the worker's
/// output ended (later output retries them too).
const PENDING_LINGER: Duration = Duration::from_secs(10);

/// Where one output stream of one instance goes. Cheap to clone; all clones
/// share the file, ring and followers.
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink")
            .field("file", &self.inner.path)
            .finish()
    }
}

struct Inner {
    path: Option<PathBuf>,
    /// Lines go to syslog instead of a file.
    syslog: Option<Syslog>,
    max_bytes: u64,
    backups: u32,
    state: Mutex<State>,
    dropped: AtomicU64,
    /// Followers (tail -f) hold receivers; a slow one lags and loses chunks.
    live: broadcast::Sender<Bytes>,
    /// Poked when bytes are dropped, so the owner can publish the new count.
    on_drop: Option<Arc<tokio::sync::Notify>>,
}

#[derive(Default)]
struct State {
    ring: VecDeque<u8>,
    file: Option<OpenFile>,
    /// Bytes for the file it did not take yet (at most [`PENDING_BYTES`]).
    pending: Vec<u8>,
}

struct OpenFile {
    file: File,
    size: u64,
    inode: u64,
    checked: Instant,
}

/// The descriptors of zdt's own output, which are symlinks by nature and
/// live in folders no other user can write.
pub(crate) fn is_own_stream(path: &Path) -> bool {
    path == Path::new("/dev/stdout")
        || path == Path::new("/dev/stderr")
        || path.starts_with("/dev/fd")
        || path.starts_with("/proc/self/fd")
}

/// Open flags for a log file: never wait, never follow a final symlink
/// (but zdt's own /dev/stdout and /dev/stderr).
fn log_flags(path: &Path) -> i32 {
    if is_own_stream(path) {
        libc::O_NONBLOCK
    } else {
        libc::O_NONBLOCK | libc::O_NOFOLLOW
    }
}

fn open(path: &Path) -> std::io::Result<OpenFile> {
    // zdt opens log files as root in folders that may belong to the
    // service's user (`/var/log/app` owned by www-data): a symlink planted
    // there must not make zdt append to, or truncate, a file of its choosing.
    if !is_own_stream(path) {
        crate::rundir::check_links(path).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
        })?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // O_NONBLOCK: neither the open (a FIFO without reader) nor a write (a
    // full pipe) may wait; see the module docs.
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(log_flags(path))
        .open(path)?;
    let meta = file.metadata()?;
    Ok(OpenFile {
        size: meta.len(),
        inode: meta.ino(),
        file,
        checked: Instant::now(),
    })
}

/// `f.N-1` → `f.N`, …, `f` → `f.1`, keeping `backups` files; 0 backups truncates.
fn rotate(path: &Path, backups: u32) -> std::io::Result<()> {
    // Never rename or truncate what is not a regular file (/dev/stdout, a FIFO).
    // (symlink_metadata: a symlink is not a regular file, and renames below
    // move links, never what they point to.)
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    if backups == 0 {
        return OpenOptions::new()
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map(drop);
    }
    for n in (1..backups).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

impl LogSink {
    /// A sink writing to `file` (None: memory only), rotating at `max_bytes`
    /// (0: never) and keeping `backups` rotated files.
    pub fn new(file: Option<PathBuf>, max_bytes: u64, backups: u32) -> LogSink {
        Self::watched(file, max_bytes, backups, None)
    }

    /// Like [`LogSink::new`], and pokes `on_drop` whenever bytes are dropped.
    pub fn watched(
        file: Option<PathBuf>,
        max_bytes: u64,
        backups: u32,
        on_drop: Option<Arc<tokio::sync::Notify>>,
    ) -> LogSink {
        Self::with_syslog(file, None, max_bytes, backups, on_drop)
    }

    /// Like [`LogSink::watched`]; lines go to `syslog` (when given) rather
    /// than to a file.
    pub fn with_syslog(
        file: Option<PathBuf>,
        syslog: Option<Syslog>,
        max_bytes: u64,
        backups: u32,
        on_drop: Option<Arc<tokio::sync::Notify>>,
    ) -> LogSink {
        LogSink {
            inner: Arc::new(Inner {
                path: file,
                syslog,
                max_bytes,
                backups,
                state: Mutex::default(),
                dropped: AtomicU64::new(0),
                live: broadcast::channel(256).0,
                on_drop,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes half-written.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `data`: ring, followers, file. Never fails.
    pub fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // No followers is not an error.
        let _ = self.inner.live.send(Bytes::copy_from_slice(data));
        let mut st = self.state();
        let keep = data.len().min(RING_BYTES);
        let overflow = (st.ring.len() + keep).saturating_sub(RING_BYTES);
        st.ring.drain(..overflow);
        st.ring.extend(&data[data.len() - keep..]);
        if let Some(path) = &self.inner.path {
            self.to_file(&mut st, path, data);
        }
        drop(st);
        if let Some(syslog) = &self.inner.syslog {
            let dropped = syslog.write(data);
            if dropped > 0 {
                self.inner
                    .dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                if let Some(n) = &self.inner.on_drop {
                    n.notify_one();
                }
            }
        }
    }

    /// Writes what waits and then `data` to the file, keeps what the file
    /// does not take now (up to [`PENDING_BYTES`]), drops and counts the rest.
    fn to_file(&self, st: &mut State, path: &Path, data: &[u8]) {
        let mut dropped = 0;
        let mut failure = None;
        if !st.pending.is_empty() {
            let pending = std::mem::take(&mut st.pending);
            match self.write_file(st, path, &pending) {
                Ok(n) => {
                    let mut pending = pending;
                    pending.drain(..n);
                    st.pending = pending;
                }
                Err(err) => {
                    dropped += pending.len();
                    failure = Some(err);
                }
            }
        }
        // Only after all earlier bytes, so that the order is kept.
        let rest = if !st.pending.is_empty() || failure.is_some() {
            data
        } else {
            match self.write_file(st, path, data) {
                Ok(n) => &data[n..],
                Err(err) => {
                    failure = Some(err);
                    data
                }
            }
        };
        if failure.is_some() {
            st.file = None;
            dropped += rest.len();
        } else {
            let keep = rest.len().min(PENDING_BYTES - st.pending.len());
            st.pending.extend_from_slice(&rest[..keep]);
            dropped += rest.len() - keep;
        }
        if dropped == 0 {
            return;
        }
        let before = self
            .inner
            .dropped
            .fetch_add(dropped as u64, Ordering::Relaxed);
        if before == 0 {
            match &failure {
                Some(err) => {
                    tracing::warn!(file = %path.display(), cause = %err, "cannot write log; dropping output")
                }
                None => {
                    tracing::warn!(file = %path.display(), "log reader does not keep up; dropping output")
                }
            }
        }
        if let Some(n) = &self.inner.on_drop {
            n.notify_one();
        }
    }

    /// Retries the bytes the file did not take yet; true if some still wait.
    pub fn flush(&self) -> bool {
        let mut st = self.state();
        if st.pending.is_empty() {
            return false;
        }
        if let Some(path) = &self.inner.path {
            self.to_file(&mut st, path, &[]);
        }
        !st.pending.is_empty()
    }

    /// Whether bytes wait for the file to take them.
    pub fn has_pending(&self) -> bool {
        !self.state().pending.is_empty()
    }

    /// Writes `data` to the file with rotation; returns how many bytes the
    /// file took: all of them, or fewer when it would block (a full pipe).
    fn write_file(&self, st: &mut State, path: &Path, mut data: &[u8]) -> std::io::Result<usize> {
        let total = data.len();
        if let Some(f) = &mut st.file {
            if f.checked.elapsed() >= REOPEN_CHECK {
                f.checked = Instant::now();
                let same = std::fs::metadata(path).is_ok_and(|m| m.ino() == f.inode);
                if !same {
                    st.file = None;
                }
            }
        }
        let max = self.inner.max_bytes;
        while !data.is_empty() {
            if st.file.is_none() {
                st.file = Some(open(path)?);
            }
            let Some(f) = st.file.as_mut() else {
                return Ok(total - data.len());
            };
            let room = if max == 0 {
                data.len()
            } else {
                max.saturating_sub(f.size) as usize
            };
            if room == 0 {
                st.file = None;
                rotate(path, self.inner.backups)?;
                continue;
            }
            // Fill the file up to max_bytes, ending at a line break when one
            // fits; a line that does not fit starts the next file, unless the
            // file is empty (then the line itself is longer than max_bytes).
            let take = if room >= data.len() {
                data.len()
            } else {
                match data[..room].iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    None if f.size > 0 => 0,
                    None => room,
                }
            };
            if take == 0 {
                st.file = None;
                rotate(path, self.inner.backups)?;
                continue;
            }
            let mut chunk = &data[..take];
            while !chunk.is_empty() {
                match f.file.write(chunk) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        f.size += n as u64;
                        chunk = &chunk[n..];
                        data = &data[n..];
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Ok(total - data.len());
                    }
                    Err(e) => return Err(e),
                }
            }
            if !data.is_empty() {
                st.file = None;
                rotate(path, self.inner.backups)?;
            }
        }
        Ok(total)
    }

    /// Bytes that could not be written to the file.
    pub fn dropped_bytes(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// The last `max_bytes` bytes of output kept in memory.
    pub fn tail(&self, max_bytes: usize) -> Vec<u8> {
        let st = self.state();
        let skip = st.ring.len().saturating_sub(max_bytes);
        st.ring.iter().skip(skip).copied().collect()
    }

    /// Live output from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        self.inner.live.subscribe()
    }
}

/// How long the start of a line waits for its end before it is written as
/// it is (a prompt, a progress dot). Meanwhile the lines of another process
/// writing to the same log (the other generation, during a restart) cannot
/// cut it in two.
const PARTIAL_WAIT: Duration = Duration::from_millis(100);

/// A line longer than this is written in parts.
const PARTIAL_MAX: usize = 16 * 1024;

/// The bytes [`pump`] reads at a time. Each instance's two pumps keep their
/// buffers for the instance's life, so this stays small; output beyond it
/// takes one more read.
const READ_BYTES: usize = 16 * 1024;

/// Lines on their way from a pump to its sink: the time (`timestamps`:
/// RFC 3339, UTC, milliseconds) and `prefix` at the start of each.
struct Lines {
    prefix: String,
    timestamps: bool,
    at_line_start: bool,
    out: Vec<u8>,
}

impl Lines {
    fn write(&mut self, sink: &LogSink, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.prefix.is_empty() && !self.timestamps {
            sink.write(data);
            self.at_line_start = data.ends_with(b"\n");
            return;
        }
        self.out.clear();
        // One time for the lines of one write: they came together.
        let stamp = self.timestamps.then(|| line_time(crate::state::now_ms()));
        for line in data.split_inclusive(|&b| b == b'\n') {
            if self.at_line_start {
                if let Some(t) = &stamp {
                    self.out.extend_from_slice(t.as_bytes());
                    self.out.push(b' ');
                }
                self.out.extend_from_slice(self.prefix.as_bytes());
            }
            self.out.extend_from_slice(line);
            self.at_line_start = line.ends_with(b"\n");
        }
        sink.write(&self.out);
    }
}

/// Copies `reader` into `sink` until EOF, putting the time (`timestamps`:
/// RFC 3339, UTC, milliseconds) and `prefix` at the start of every line.
/// Whole lines are written: the start of a line waits up to
/// `PARTIAL_WAIT` (100 ms) for its end (or until it is `PARTIAL_MAX` long), so
/// that another process's lines written to the same sink meanwhile do not
/// split it. Memory stays bounded whatever the line lengths. While the
/// sink's file leaves bytes waiting (a stalled pipe), they are retried every
/// `PENDING_RETRY` (200 ms) even when the worker is quiet, and for
/// `PENDING_LINGER` (10 s) after its output ended. A worker's pipe is read
/// through an [`OutputPipe`], which batches output that comes fast.
pub async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    sink: LogSink,
    prefix: String,
    timestamps: bool,
) {
    let mut buf = vec![0u8; READ_BYTES];
    let mut lines = Lines {
        prefix,
        timestamps,
        at_line_start: true,
        out: Vec::with_capacity(buf.len() + 256),
    };
    // The start of a line whose end has not come yet.
    let mut held: Vec<u8> = Vec::new();
    loop {
        let wait = if !held.is_empty() {
            Some(PARTIAL_WAIT)
        } else if sink.has_pending() {
            Some(PENDING_RETRY)
        } else {
            None
        };
        let read = match wait {
            // A read is cancel-safe: nothing is lost when the timer wins.
            Some(wait) => match tokio::time::timeout(wait, reader.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    lines.write(&sink, &held);
                    held.clear();
                    sink.flush();
                    continue;
                }
            },
            None => reader.read(&mut buf).await,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                lines.write(&sink, &held);
                if sink.has_pending() {
                    tokio::spawn(linger(sink));
                }
                return;
            }
            Ok(n) => n,
        };
        let data = &buf[..n];
        match data.iter().rposition(|&b| b == b'\n') {
            Some(end) if held.is_empty() => {
                lines.write(&sink, &data[..=end]);
                held.extend_from_slice(&data[end + 1..]);
            }
            Some(end) => {
                held.extend_from_slice(&data[..=end]);
                lines.write(&sink, &held);
                held.clear();
                held.extend_from_slice(&data[end + 1..]);
            }
            None => held.extend_from_slice(data),
        }
        if held.len() >= PARTIAL_MAX {
            lines.write(&sink, &held);
            held.clear();
        }
    }
}

/// `2026-12-07T11:05:04.123Z`: RFC 3339, UTC, with milliseconds.
pub fn line_time(ms: u64) -> String {
    let s = crate::deploy::layout::rfc3339(ms);
    let seconds = s.trim_end_matches('Z');
    format!("{seconds}.{:03}Z", ms % 1000)
}

/// Retries the bytes `sink`'s file has not taken, for at most
/// [`PENDING_LINGER`].
async fn linger(sink: LogSink) {
    let until = tokio::time::Instant::now() + PENDING_LINGER;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(PENDING_RETRY).await;
        if !sink.flush() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// Two processes writing to one log (the generations of a restart):
    /// the start of a line waits for its end, so the other's line written
    /// meanwhile does not cut it; a line that never ends is written after
    /// PARTIAL_WAIT.
    #[tokio::test(start_paused = true)]
    async fn a_line_written_in_two_parts_stays_whole_beside_another_writer() {
        use tokio::io::AsyncWriteExt;
        let sink = LogSink::new(None, 0, 0);
        let (mut a, a_read) = tokio::io::duplex(1024);
        let (mut b, b_read) = tokio::io::duplex(1024);
        let pa = tokio::spawn(pump(a_read, sink.clone(), "[a] ".into(), false));
        let pb = tokio::spawn(pump(b_read, sink.clone(), "[b] ".into(), false));
        let until = |text: &'static str| {
            let sink = sink.clone();
            async move {
                // Yields only: the paused clock does not move meanwhile.
                for _ in 0..100_000 {
                    if String::from_utf8_lossy(&sink.tail(usize::MAX)).contains(text) {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                panic!(
                    "{text:?} never came: {:?}",
                    String::from_utf8_lossy(&sink.tail(usize::MAX))
                );
            }
        };
        a.write_all(b"abc").await.expect("write");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        b.write_all(b"other\n").await.expect("write");
        until("[b] other\n").await;
        a.write_all(b"def\n").await.expect("write");
        until("abcdef").await;
        assert_eq!(
            String::from_utf8_lossy(&sink.tail(usize::MAX)),
            "[b] other\n[a] abcdef\n"
        );
        // A prompt without its newline is written once PARTIAL_WAIT passed.
        a.write_all(b"> ").await.expect("write");
        tokio::time::sleep(PARTIAL_WAIT * 2).await;
        assert!(String::from_utf8_lossy(&sink.tail(usize::MAX)).ends_with("[a] > "));
        drop((a, b));
        let _ = (pa.await, pb.await);
    }

    #[test]
    fn ring_is_bounded_and_tail_returns_the_end() {
        let s = LogSink::new(None, 0, 0);
        s.write(&vec![b'a'; RING_BYTES]);
        s.write(b"end");
        let t = s.tail(usize::MAX);
        assert_eq!(t.len(), RING_BYTES);
        assert!(t.ends_with(b"aend"));
        assert_eq!(s.tail(3), b"end");
    }

    #[test]
    fn rotation_keeps_the_configured_backups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("sub/app.log");
        let s = LogSink::new(Some(f.clone()), 10, 2);
        for chunk in ["aaaaaaaa\n", "bbbbbbbb\n", "cccccccc\n", "dddddddd\n"] {
            s.write(chunk.as_bytes());
        }
        assert_eq!(read(&f), "dddddddd\n");
        assert_eq!(read(&dir.path().join("sub/app.log.1")), "cccccccc\n");
        assert_eq!(read(&dir.path().join("sub/app.log.2")), "bbbbbbbb\n");
        assert!(!dir.path().join("sub/app.log.3").exists());
        assert_eq!(s.dropped_bytes(), 0);
    }

    #[test]
    fn a_write_larger_than_max_bytes_is_split_across_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("app.log");
        let s = LogSink::new(Some(f.clone()), 10, 3);
        s.write(b"aaaa\nbbbb\ncccccccccccccc\n");
        assert_eq!(read(&f), "cccc\n");
        assert_eq!(read(&dir.path().join("app.log.1")), "cccccccccc");
        assert_eq!(read(&dir.path().join("app.log.2")), "aaaa\nbbbb\n");
    }

    #[test]
    fn zero_backups_truncates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("app.log");
        let s = LogSink::new(Some(f.clone()), 10, 0);
        s.write(b"aaaaaaaa\n");
        s.write(b"bbbbbbbb\n");
        assert_eq!(read(&f), "bbbbbbbb\n");
        assert!(!dir.path().join("app.log.1").exists());
    }

    #[test]
    fn unwritable_file_counts_dropped_bytes_and_keeps_the_ring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").expect("write");
        // A directory cannot be created under a regular file.
        let s = LogSink::new(Some(blocker.join("app.log")), 0, 0);
        s.write(b"hello\n");
        s.write(b"again\n");
        assert_eq!(s.dropped_bytes(), 12);
        assert_eq!(s.tail(100), b"hello\nagain\n");
    }

    #[test]
    fn removed_file_is_reopened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("app.log");
        let s = LogSink::new(Some(f.clone()), 0, 0);
        s.write(b"one\n");
        std::fs::remove_file(&f).expect("remove");
        {
            let mut st = s.state();
            if let Some(of) = st.file.as_mut() {
                of.checked = Instant::now() - REOPEN_CHECK;
            }
        }
        s.write(b"two\n");
        assert_eq!(read(&f), "two\n");
    }

    /// Runs `f` on a thread; fails the test if it does not finish in time
    /// (a blocking log write would hang it for ever).
    fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a log write blocked (no answer within 10 s)")
    }

    fn fifo(dir: &Path) -> PathBuf {
        let f = dir.join("app.fifo");
        nix::unistd::mkfifo(&f, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        f
    }

    fn open_reader(f: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(f)
            .expect("open the FIFO for reading")
    }

    #[test]
    fn fifo_without_reader_drops_and_is_opened_once_a_reader_comes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fifo(dir.path());
        let s = LogSink::new(Some(f.clone()), 0, 0);
        let s2 = s.clone();
        within_deadline(move || s2.write(b"nobody reads this\n"));
        assert_eq!(s.dropped_bytes(), 18);
        assert_eq!(s.tail(100), b"nobody reads this\n");
        let mut reader = open_reader(&f);
        let s2 = s.clone();
        within_deadline(move || s2.write(b"now someone does\n"));
        let mut got = String::new();
        use std::io::Read;
        reader.read_to_string(&mut got).ok();
        assert_eq!(got, "now someone does\n");
        assert_eq!(s.dropped_bytes(), 18);
    }

    #[test]
    fn stalled_fifo_reader_never_blocks_and_gets_the_rest_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fifo(dir.path());
        let mut reader = open_reader(&f);
        let s = LogSink::new(Some(f), 0, 0);
        // Far more than the pipe (64 KiB) and the pending buffer hold.
        let line: Vec<u8> = (0..100u8)
            .map(|i| b'a' + i % 26)
            .chain(std::iter::once(b'\n'))
            .collect();
        let lines = 4096;
        let s2 = s.clone();
        within_deadline(move || {
            for _ in 0..lines {
                s2.write(&line);
            }
        });
        let dropped = s.dropped_bytes();
        assert!(dropped > 0, "nothing dropped");
        assert!(s.has_pending());
        // The reader wakes up: what the pipe holds, then what waited.
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut waiting = true;
        loop {
            match reader.read(&mut buf) {
                Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                // The pipe is empty: pass on what waited, then read the last.
                _ if waiting => waiting = s.flush(),
                _ => break,
            }
        }
        assert_eq!(got.len() as u64 + dropped, 101 * lines as u64);
        assert!(!s.has_pending());
        // What arrived is whole lines, in order: the first bytes were kept,
        // the last ones dropped.
        assert!(got.len() >= PENDING_BYTES);
        assert!(got.chunks(101).all(|c| c[0] == b'a'));
    }

    #[tokio::test]
    async fn pump_passes_on_waiting_bytes_when_the_reader_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fifo(dir.path());
        let mut reader = open_reader(&f);
        let s = LogSink::new(Some(f), 0, 0);
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(pump(r, s.clone(), String::new(), false));
        use tokio::io::AsyncWriteExt;
        let total = 256 * 1024;
        w.write_all(&vec![b'x'; total]).await.expect("write");
        tokio::time::timeout(Duration::from_secs(10), async {
            while !s.has_pending() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("bytes waiting for the stalled FIFO");
        // The worker writes nothing more; the reader drains the pipe and the
        // pump's timer passes on what waited.
        use std::io::Read;
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got as u64 + s.dropped_bytes() < total as u64 {
            assert!(Instant::now() < deadline, "waiting bytes never came");
            match reader.read(&mut buf) {
                Ok(n @ 1..) => got += n,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        assert!(got > 64 * 1024, "only the pipe's bytes came: {got}");
        assert!(!s.has_pending());
        drop(w);
        task.await.expect("pump");
    }

    #[tokio::test]
    async fn pump_prefixes_lines_across_reads_and_followers_see_output() {
        let s = LogSink::new(None, 0, 0);
        let mut live = s.subscribe();
        let (mut w, r) = tokio::io::duplex(64);
        let task = tokio::spawn(pump(r, s.clone(), "[g1] ".into(), false));
        use tokio::io::AsyncWriteExt;
        w.write_all(b"hel").await.expect("write");
        w.flush().await.expect("flush");
        let first = live.recv().await.expect("live chunk");
        assert_eq!(&first[..], b"[g1] hel");
        w.write_all(b"lo\nwor").await.expect("write");
        w.write_all(b"ld\n").await.expect("write");
        drop(w);
        task.await.expect("pump");
        assert_eq!(s.tail(100), b"[g1] hello\n[g1] world\n");
    }

    #[test]
    fn line_times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(line_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(line_time(1_796_641_504_123), "2026-12-07T11:05:04.123Z");
    }

    #[tokio::test]
    async fn pump_puts_the_time_before_the_prefix_of_every_line() {
        let s = LogSink::new(None, 0, 0);
        let (mut w, r) = tokio::io::duplex(64);
        let task = tokio::spawn(pump(r, s.clone(), "[g1] ".into(), true));
        use tokio::io::AsyncWriteExt;
        w.write_all(b"a\nb\n").await.expect("write");
        drop(w);
        task.await.expect("pump");
        let text = String::from_utf8(s.tail(200)).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        for (line, want) in lines.iter().zip(["[g1] a", "[g1] b"]) {
            let (time, rest) = line.split_once(' ').expect("a time first");
            assert_eq!(rest, want);
            assert!(
                time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
                "{time}"
            );
        }
    }
}
