//! Instance output: log files with size rotation, an in-memory ring for
//! `zdtctl tail`, and live followers for `tail -f`.
//!
//! Logging must never stop a worker: a [`LogSink`] write never blocks on a
//! follower and never fails. When the file cannot be written (full disk,
//! permissions, removed directory) the bytes are dropped and counted; the next
//! write tries again. A log file removed or renamed by someone else is noticed
//! (inode check, at most once a second) and opened anew.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::broadcast;

/// Bytes of recent output kept in memory per stream.
pub const RING_BYTES: usize = 64 * 1024;

/// How often the file's identity is checked against its path.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

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
}

struct OpenFile {
    file: File,
    size: u64,
    inode: u64,
    checked: Instant,
}

fn open(path: &Path) -> std::io::Result<OpenFile> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().create(true).append(true).open(path)?;
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
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    if backups == 0 {
        return File::create(path).map(drop);
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
        LogSink {
            inner: Arc::new(Inner {
                path: file,
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
            if let Err(err) = self.write_file(&mut st, path, data) {
                st.file = None;
                let before = self
                    .inner
                    .dropped
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if before == 0 {
                    tracing::warn!(file = %path.display(), cause = %err, "cannot write log; dropping output");
                }
                if let Some(n) = &self.inner.on_drop {
                    n.notify_one();
                }
            }
        }
    }

    fn write_file(&self, st: &mut State, path: &Path, mut data: &[u8]) -> std::io::Result<()> {
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
                return Ok(());
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
            f.file.write_all(&data[..take])?;
            f.size += take as u64;
            data = &data[take..];
            if !data.is_empty() {
                st.file = None;
                rotate(path, self.inner.backups)?;
            }
        }
        Ok(())
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

/// Copies `reader` into `sink` until EOF, putting `prefix` at the start of
/// every line. Memory stays bounded whatever the line lengths.
pub async fn pump<R: AsyncRead + Unpin>(mut reader: R, sink: LogSink, prefix: String) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(buf.len() + 256);
    let mut at_line_start = true;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if prefix.is_empty() {
            sink.write(&buf[..n]);
            continue;
        }
        out.clear();
        for &b in &buf[..n] {
            if at_line_start {
                out.extend_from_slice(prefix.as_bytes());
            }
            out.push(b);
            at_line_start = b == b'\n';
        }
        sink.write(&out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
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

    #[tokio::test]
    async fn pump_prefixes_lines_across_reads_and_followers_see_output() {
        let s = LogSink::new(None, 0, 0);
        let mut live = s.subscribe();
        let (mut w, r) = tokio::io::duplex(64);
        let task = tokio::spawn(pump(r, s.clone(), "[g1] ".into()));
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
}
