//! `stdout_logfile = "syslog"`: each line of output as one message on the
//! local syslog socket (`/dev/log`: rsyslog, syslog-ng, or systemd-journald,
//! which files it under the tag: `journalctl -t web`).
//!
//! Like a log file, syslog never blocks zdt nor a worker: the socket is
//! non-blocking, and a message it does not take (no syslog daemon, a full
//! queue) is dropped and counted. A socket that cannot be reached is tried
//! again at most once a second.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest message sent; a longer line is cut into several.
pub const MAX_MESSAGE: usize = 8 * 1024;

/// How often a socket that could not be reached is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Facility `user` (1), severity `info` (6): as systemd files a service's
/// output.
const PRIORITY: u8 = 8 + 6;

/// One stream's syslog destination.
pub struct Syslog {
    socket_path: PathBuf,
    tag: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    socket: Option<UnixDatagram>,
    failed_at: Option<Instant>,
    /// The start of a line whose end has not come yet.
    partial: Vec<u8>,
}

impl Syslog {
    /// Lines tagged `tag` (a program's name) to the socket at `socket_path`.
    pub fn new(socket_path: PathBuf, tag: &str) -> Syslog {
        // RFC 3164 tags are at most 32 characters of letters and digits;
        // program names are letters, digits, '_', '.', '-'.
        let tag: String = tag.chars().take(32).collect();
        Syslog {
            socket_path,
            tag,
            state: Mutex::default(),
        }
    }

    /// Sends every line `data` completes; returns how many bytes were
    /// dropped (not taken by the socket).
    pub fn write(&self, data: &[u8]) -> usize {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.partial.extend_from_slice(data);
        let mut dropped = 0;
        loop {
            let end = match st.partial.iter().position(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if st.partial.len() >= MAX_MESSAGE => MAX_MESSAGE,
                None => break,
            };
            let line: Vec<u8> = st.partial.drain(..end).collect();
            if !self.send(&mut st, &line) {
                dropped += line.len();
            }
        }
        dropped
    }

    /// One message: `<PRI>Mmm dd hh:mm:ss TAG: LINE`.
    fn send(&self, st: &mut State, line: &[u8]) -> bool {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let stamp = chrono::Local::now().format("%b %e %H:%M:%S");
        let mut msg = format!("<{PRIORITY}>{stamp} {}: ", self.tag).into_bytes();
        msg.extend_from_slice(text);
        if st.socket.is_none() {
            if st.failed_at.is_some_and(|t| t.elapsed() < RETRY) {
                return false;
            }
            match connect(&self.socket_path) {
                Ok(s) => {
                    st.socket = Some(s);
                    st.failed_at = None;
                }
                Err(e) => {
                    if st.failed_at.is_none() {
                        tracing::warn!(socket = %self.socket_path.display(), cause = %e, "cannot reach syslog; dropping output");
                    }
                    st.failed_at = Some(Instant::now());
                    return false;
                }
            }
        }
        let Some(socket) = &st.socket else {
            return false;
        };
        match socket.send(&msg) {
            Ok(_) => true,
            // Full: this message is lost, the socket is fine.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => {
                // The daemon went away or restarted: connect again later.
                tracing::warn!(socket = %self.socket_path.display(), cause = %e, "syslog write failed; dropping output");
                st.socket = None;
                st.failed_at = Some(Instant::now());
                false
            }
        }
    }
}

fn connect(path: &std::path::Path) -> std::io::Result<UnixDatagram> {
    let s = UnixDatagram::unbound()?;
    s.set_nonblocking(true)?;
    s.connect(path)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A syslog daemon that does not read never holds up the worker's
    /// output (DESIGN: nothing a worker writes can block supervision): once
    /// its queue is full, lines are dropped and counted, at once.
    #[test]
    fn a_syslog_that_does_not_read_drops_and_never_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let _server = UnixDatagram::bind(&path).expect("bind");
        let s = Syslog::new(path, "web");
        let line = format!("{}\n", "x".repeat(1000));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = line.clone();
        // On a thread of its own: a blocking send would hang it, not the test.
        std::thread::spawn(move || {
            let _ = tx.send((0..10_000).map(|_| s.write(l.as_bytes())).sum::<usize>());
        });
        let dropped = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("10,000 lines written within 10 s");
        assert!(dropped > 0, "the queue never filled");
        assert_eq!(dropped % line.len(), 0, "whole lines dropped");
    }

    #[test]
    fn lines_become_messages_and_an_absent_socket_drops_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let s = Syslog::new(path.clone(), "web");
        assert_eq!(s.write(b"[gen 1:0] hello\n[gen 1:0] wor"), 0);
        assert_eq!(s.write(b"ld\r\n"), 0);
        let mut buf = [0u8; 1024];
        let mut recv = || {
            let n = server.recv(&mut buf).expect("a message");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let first = recv();
        assert!(first.starts_with("<14>"), "{first}");
        assert!(first.ends_with(" web: [gen 1:0] hello"), "{first}");
        assert!(recv().ends_with(" web: [gen 1:0] world"));
        // A line longer than MAX_MESSAGE is cut.
        assert_eq!(s.write(&vec![b'x'; MAX_MESSAGE + 10]), 0);
        assert!(recv().ends_with(&"x".repeat(100)));
        drop(server);
        std::fs::remove_file(&path).expect("rm");
        // Gone: dropped and counted (the 10 bytes left plus this line).
        assert_eq!(s.write(b"lost\n"), 15);
    }
}
