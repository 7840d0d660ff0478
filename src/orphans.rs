//! Workers' process groups left behind by a zdt that was killed.
//!
//! `PR_SET_PDEATHSIG` takes a worker down with zdt, but not what the worker
//! forked: php -S's workers, or a daemon forked by a pass-mode worker, which
//! may still hold the listening socket, so the next zdt finds the port in use.
//! Every worker leads its own process group, so zdt records each group it
//! creates in a state file beside the control socket (`<control>.pgroups`),
//! one line per group: the pgid, the leader's start time (field 22 of
//! `/proc/PID/stat`, so a reused pid is not taken for the worker) and the
//! program. A zdt that starts on the same control path reads the file its
//! predecessor left, SIGKILLs every recorded group that still has a process
//! (the leader with the recorded start time, or any member started no earlier
//! than it), waits briefly for them to go, and starts a new file.
//!
//! The file is written with `O_NOFOLLOW`, mode 0600, through a new temporary
//! file renamed over it; it is read only when it is a regular file owned by
//! zdt's user and writable by nobody else, and only for the same boot.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

/// The state file for the zdt whose control socket is `control`.
pub fn state_path(control: &Path) -> PathBuf {
    let mut name = control.as_os_str().to_owned();
    name.push(".pgroups");
    PathBuf::from(name)
}

/// First line of the file.
const HEADER: &str = "# zdt: process groups of its workers (pgid starttime program)";

/// Bound on waiting for killed groups to disappear.
const SWEEP_WAIT: Duration = Duration::from_secs(3);

/// A recorded group.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    pgid: u32,
    start_time: u64,
    program: String,
}

/// What `/proc/PID/stat` says about a process: (state, pgrp, start time).
fn proc_stat(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields[1] is field 4, ppid.
    stat_fields(&text)?.get(1)?.parse().ok()
}

/// The fields of a `/proc/PID/stat` line from field 3 (state) on: the
/// command name before them may hold spaces and parentheses, so they are
/// counted after the last ')'.
pub(crate) fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// Parses a `/proc/PID/stat` line: (state, pgrp, start time).
fn parse_stat(text: &str) -> Option<(char, u32, u64)> {
    let fields = stat_fields(text)?;
    // fields[0] is field 3 (state); pgrp is field 5, starttime field 22.
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, pgrp, start))
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn render(boot: &str, entries: &[Entry]) -> String {
    let mut out = format!("{HEADER}\nboot {boot}\n");
    for e in entries {
        out.push_str(&format!("{} {} {}\n", e.pgid, e.start_time, e.program));
    }
    out
}

/// The entries of a state file, if it was written in boot `boot`.
fn parse(text: &str, boot: &str) -> Vec<Entry> {
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    if lines.next().and_then(|l| l.strip_prefix("boot ")) != Some(boot) {
        return Vec::new();
    }
    lines
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let pgid: u32 = it.next()?.parse().ok()?;
            let start_time = it.next()?.parse().ok()?;
            // pgid 0 or 1 would signal zdt's own group or init's.
            (pgid > 1).then(|| Entry {
                pgid,
                start_time,
                program: it.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Reads the state file, refusing one that is not a regular file of ours
/// that only we can write (it names process groups to kill).
fn read_state(path: &Path) -> std::io::Result<Option<String>> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0
    {
        return Err(std::io::Error::other(
            "not a regular file owned by zdt's user and writable only by it",
        ));
    }
    std::io::read_to_string(file).map(Some)
}

/// Writes the state file: a new temporary file (O_EXCL, O_NOFOLLOW, 0600)
/// renamed over the old one.
fn write_state(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Pids of live (not zombie) processes in process group `pgid` that started
/// no earlier than `since`.
fn members(pgid: u32, since: u64) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            proc_stat(pid)
                .is_some_and(|(state, pgrp, start)| pgrp == pgid && state != 'Z' && start >= since)
        })
        .collect()
}

/// Whether the recorded group still has processes of the worker's: its
/// leader with the recorded start time, or members started after it.
fn still_there(e: &Entry) -> bool {
    match proc_stat(e.pgid) {
        Some((state, pgrp, start)) if pgrp == e.pgid && start == e.start_time => {
            state != 'Z' || !members(e.pgid, e.start_time).is_empty()
        }
        // The pid is another process now: Linux gives out a pid only when
        // no process group of that number is left, so the worker's is gone.
        Some(_) => false,
        // The leader is gone: members of its group may remain.
        None => !members(e.pgid, e.start_time).is_empty(),
    }
}

/// Kills the process groups a previous zdt recorded in `path` and left
/// alive; waits (bounded) until they are gone. Call after the control socket
/// is bound (so no live zdt owns the file) and before binding listen sockets.
/// Returns how many groups were killed.
pub async fn sweep(path: &Path) -> usize {
    let text = match read_state(path) {
        Ok(Some(t)) => t,
        Ok(None) => return 0,
        Err(e) => {
            tracing::warn!(file = %path.display(), cause = %e, "not reading the process groups a previous zdt left");
            return 0;
        }
    };
    let left: Vec<Entry> = parse(&text, &boot_id())
        .into_iter()
        .filter(still_there)
        .collect();
    for e in &left {
        tracing::warn!(program = %e.program, pgid = e.pgid, "killing a process group left by a previous zdt (it was killed before it could stop its workers)");
        if let Err(err) = killpg(Pid::from_raw(e.pgid as i32), Signal::SIGKILL) {
            tracing::warn!(pgid = e.pgid, cause = %err, "cannot kill a leftover process group");
        }
    }
    let deadline = tokio::time::Instant::now() + SWEEP_WAIT;
    while left.iter().any(still_there) {
        if tokio::time::Instant::now() > deadline {
            tracing::warn!("leftover process groups still there after SIGKILL; going on");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    left.len()
}

enum Msg {
    Add(Entry),
    Forget(u32),
    /// zdt is exiting cleanly: remove the file if no group is left; the
    /// sender is dropped once that is done (or the file written).
    Close(tokio::sync::oneshot::Sender<()>),
}

/// How long a clean exit waits for ended workers' groups to be gone
/// before it leaves the state file for the next zdt.
const CLOSE_WAIT: Duration = Duration::from_millis(800);

static RECORDER: OnceLock<mpsc::UnboundedSender<Msg>> = OnceLock::new();

/// Starts recording workers' groups in `path` (rewritten at once: call after
/// [`sweep`]). Once per process; later calls are ignored.
pub fn start_recorder(path: PathBuf) {
    let (tx, rx) = mpsc::unbounded_channel();
    if RECORDER.set(tx).is_ok() {
        // A thread of its own: it scans /proc and writes a file, which must
        // not hold a runtime thread.
        let spawned = std::thread::Builder::new()
            .name("zdt-pgroups".into())
            .spawn(move || record_loop(path, rx));
        if let Err(e) = spawned {
            tracing::warn!(cause = %e, "cannot start the process-group recorder; a zdt killed with SIGKILL may leave workers' children running");
        }
    }
}

fn record_loop(path: PathBuf, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let boot = boot_id();
    // pgid → (entry, its worker task has ended).
    let mut groups: BTreeMap<u32, (Entry, bool)> = BTreeMap::new();
    let mut failed = false;
    let mut closing: Option<tokio::sync::oneshot::Sender<()>> = None;
    loop {
        // Groups whose worker ended stay listed while members remain.
        groups.retain(|_, (e, ended)| !*ended || still_there(e));
        if closing.is_some() {
            // A group just signalled may take a moment to be gone (a
            // member dying, a zombie waiting for its reaper): wait a
            // little before leaving the file for the next zdt.
            let until = std::time::Instant::now() + CLOSE_WAIT;
            while !groups.is_empty() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
                groups.retain(|_, (e, ended)| !*ended || still_there(e));
            }
        }
        if closing.is_some() && groups.is_empty() {
            let _ = std::fs::remove_file(&path);
            return;
        }
        let entries: Vec<Entry> = groups.values().map(|(e, _)| e.clone()).collect();
        match write_state(&path, &render(&boot, &entries)) {
            Ok(()) => failed = false,
            Err(e) if !failed => {
                failed = true;
                tracing::warn!(file = %path.display(), cause = %e, "cannot record workers' process groups; a zdt killed with SIGKILL may leave their children running");
            }
            Err(_) => {}
        }
        // Some group outlived its worker: the file stays for the next zdt.
        drop(closing.take());
        let Some(msg) = rx.blocking_recv() else {
            return;
        };
        let mut apply = |msg| match msg {
            Msg::Add(e) => {
                groups.insert(e.pgid, (e, false));
            }
            Msg::Forget(pgid) => {
                if let Some((_, ended)) = groups.get_mut(&pgid) {
                    *ended = true;
                }
            }
            Msg::Close(done) => closing = Some(done),
        };
        apply(msg);
        // One write for a burst of spawns and exits.
        while let Ok(msg) = rx.try_recv() {
            apply(msg);
        }
    }
}

/// zdt is exiting and has stopped its programs: the state file is removed
/// once no recorded group is left (at once, usually).
pub async fn close() {
    if let Some(tx) = RECORDER.get() {
        let (done, wait) = tokio::sync::oneshot::channel();
        if tx.send(Msg::Close(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }
}

/// A worker's group, recorded while its task runs (dropped: forgotten once
/// the group is empty). Does nothing when no recorder runs.
pub struct Recorded(Option<u32>);

impl Recorded {
    /// Records the group led by `pid` for `program`.
    pub fn new(pid: u32, program: &str) -> Self {
        let Some(tx) = RECORDER.get() else {
            return Self(None);
        };
        let Some((_, _, start_time)) = proc_stat(pid) else {
            // Already gone: nothing of it to find later.
            return Self(None);
        };
        let _ = tx.send(Msg::Add(Entry {
            pgid: pid,
            start_time,
            program: program.to_string(),
        }));
        Self(Some(pid))
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let (Some(pgid), Some(tx)) = (self.0, RECORDER.get()) {
            let _ = tx.send(Msg::Forget(pgid));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let line = "4242 (we) ird (name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 4242, 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_stat_is_read() {
        let me = std::process::id();
        let (state, _, start) = proc_stat(me).expect("own stat");
        assert_ne!(state, 'Z');
        assert!(start > 0);
    }

    #[test]
    fn state_file_round_trips_for_the_same_boot_only() {
        let entries = vec![
            Entry {
                pgid: 100,
                start_time: 5,
                program: "web".into(),
            },
            Entry {
                pgid: 200,
                start_time: 7,
                program: "a b".into(),
            },
        ];
        let text = render("b1", &entries);
        assert_eq!(parse(&text, "b1"), entries);
        assert!(parse(&text, "b2").is_empty());
        // Never zdt's own group (0) or init's (1).
        assert!(parse("boot b1\n0 1 x\n1 1 y\n", "b1").is_empty());
    }

    #[test]
    fn state_file_is_private_and_not_followed_through_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zdt.sock.pgroups");
        write_state(&path, "boot x\n").expect("write");
        let mode = std::fs::metadata(&path).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            read_state(&path).expect("read").as_deref(),
            Some("boot x\n")
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(read_state(&link).is_err());
        assert_eq!(read_state(&dir.path().join("none")).expect("absent"), None);
    }
}
