//! The folders of a deploy root, and every change made to them.
//!
//! ```text
//! root/
//!   current -> releases/20261202-101500      the live release (a relative link)
//!   releases/20261202-101500/                one folder per release, RELEASE inside
//!   releases/.incoming-…/                    a release being fetched (never live)
//!   shared/                                  what `shared` paths link to
//!   .zdt/lock                                flock held while a deploy runs
//!   .zdt/deploy.json                         the running deploy (the journal)
//!   .zdt/releases/<id>.json, <id>.log        each release's state and deploy log
//! ```
//!
//! Invariants: `current` changes only by renaming a complete new link over
//! it, so it always names a whole release; a release folder gets its final
//! name only once it is fetched; the journal names the deploy that runs, so a
//! zdt killed halfway is found out at the next start ([`Layout::recover`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::now_ms;

/// What a release is, as kept in `.zdt/releases/<id>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The folder name under `releases/`.
    pub id: String,
    /// Unix time in milliseconds when the deploy began.
    pub created_ms: u64,
    /// What `--from` named (or what the watch found).
    pub source: String,
    /// For git sources: the commit id deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// How long the build hooks took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Bytes in the release folder after the build.
    #[serde(default)]
    pub size_bytes: u64,
    /// Building, ready (built, may be live) or failed.
    pub state: BuildState,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A release's own state; live and previous are derived from `current`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    /// Being fetched, built or switched to.
    Building,
    /// Built and served (or can be rolled back to).
    Ready,
    /// Its build, start or readiness failed; never live again by itself.
    Failed,
}

/// The running deploy, kept in `.zdt/deploy.json` while it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The release being deployed, once it has its id.
    pub release: Option<String>,
    /// What is deployed ("deploy from …", "rollback to …").
    pub what: String,
    /// Unix time in milliseconds when it began.
    pub started_ms: u64,
    /// The release `current` named before, if any.
    pub previous: Option<String>,
    /// Set once `current` was switched to the new release.
    pub switched: bool,
}

/// A release serving as a canary (`deploy --canary`), kept in
/// `.zdt/canary.json` until `promote` or `rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryRecord {
    /// The canary's release (what `current` names meanwhile).
    pub release: String,
    /// The release the stable generation runs, `current` after a rollback.
    pub previous: Option<String>,
    /// Unix time in milliseconds when it began.
    pub since_ms: u64,
}

/// A deploy root's folders.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

/// Holds the root's deploy lock; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// A release a process resolved at spawn: `current`'s target then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// Its id (folder name).
    pub id: String,
    /// Its absolute path, links resolved.
    pub path: PathBuf,
}

impl Release {
    /// The release `root/current` names now, or None before the first deploy.
    pub fn resolve(root: &Path) -> Option<Self> {
        let path = fs::canonicalize(root.join("current")).ok()?;
        let id = path.file_name()?.to_string_lossy().into_owned();
        Some(Self { id, path })
    }

    /// A working directory pinned to this release: `dir` under
    /// `root/current` becomes the same place under the release; any other
    /// is `filled` (`dir` with `{release}` expanded).
    pub fn pin(&self, dir: &Path, filled: String) -> PathBuf {
        let root = self.path.parent().and_then(Path::parent);
        if let Some(rest) = root.and_then(|r| dir.strip_prefix(r.join("current")).ok()) {
            return self.path.join(rest);
        }
        PathBuf::from(filled)
    }
}

/// Runs `f`, which may wait for the disk (fsync), without holding up the
/// other tasks of zdt's runtime worker it runs on.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    off_runtime(|| write_new_now(path, data))
}

fn write_new_now(path: &Path, data: &[u8]) -> io::Result<()> {
    // Written beside, then renamed: a reader sees the old or the new whole.
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    off_runtime(|| File::open(dir)?.sync_all())
}

/// Adds the path to an OS error, for the operator.
pub fn at(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Layout {
    /// The layout of `root` (nothing is read or made yet).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/releases`.
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }

    /// A release's folder.
    pub fn release(&self, id: &str) -> PathBuf {
        self.releases().join(id)
    }

    /// `root/shared`.
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    /// `root/current`.
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    fn meta_dir(&self) -> PathBuf {
        self.root.join(".zdt")
    }

    /// A release's deploy log.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.meta_dir().join("releases").join(format!("{id}.log"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.meta_dir().join("releases").join(format!("{id}.json"))
    }

    fn journal_path(&self) -> PathBuf {
        self.meta_dir().join("deploy.json")
    }

    /// Makes the folders (the root included) if they are missing.
    pub fn prepare(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.releases(),
            self.shared(),
            self.meta_dir().join("releases"),
        ] {
            fs::create_dir_all(&dir).map_err(at(&dir))?;
        }
        Ok(())
    }

    /// Takes the root's deploy lock, or says which deploy holds it.
    pub fn lock(&self) -> io::Result<Result<Lock, Option<Journal>>> {
        let path = self.meta_dir().join("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(at(&path))?;
        // SAFETY: flock on an fd we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Ok(Lock { _file: file }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(Err(self.journal()));
        }
        let e = at(&path)(e);
        Err(e)
    }

    /// The running (or interrupted) deploy.
    pub fn journal(&self) -> Option<Journal> {
        let data = fs::read(self.journal_path()).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Records the running deploy.
    pub fn write_journal(&self, j: &Journal) -> io::Result<()> {
        let data = serde_json::to_vec_pretty(j).map_err(io::Error::other)?;
        write_new(&self.journal_path(), &data).map_err(at(&self.journal_path()))
    }

    fn canary_path(&self) -> PathBuf {
        self.meta_dir().join("canary.json")
    }

    /// The release serving as a canary, if one does.
    pub fn canary(&self) -> Option<CanaryRecord> {
        let data = fs::read(self.canary_path()).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Records the canary (None: there is none any more).
    pub fn set_canary(&self, c: Option<&CanaryRecord>) -> io::Result<()> {
        match c {
            Some(c) => {
                let data = serde_json::to_vec_pretty(c).map_err(io::Error::other)?;
                write_new(&self.canary_path(), &data).map_err(at(&self.canary_path()))
            }
            None => match fs::remove_file(self.canary_path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(&self.canary_path())(e)),
                _ => Ok(()),
            },
        }
    }

    /// The deploy is over.
    pub fn clear_journal(&self) {
        let _ = fs::remove_file(self.journal_path());
    }

    /// A new release id: the UTC time, `-<short commit>` for git, and a
    /// counter if that folder exists already.
    pub fn new_id(&self, now_ms: u64, commit: Option<&str>) -> String {
        let mut base = utc_stamp(now_ms);
        if let Some(c) = commit {
            base.push('-');
            base.extend(c.chars().take(7));
        }
        let mut id = base.clone();
        let mut n = 2;
        while self.release(&id).symlink_metadata().is_ok() || self.meta_path(&id).exists() {
            id = format!("{base}-{n}");
            n += 1;
        }
        id
    }

    /// The release `current` names, if any.
    pub fn current_id(&self) -> Option<String> {
        let target = fs::read_link(self.current()).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// Points `current` at `id` (None: removes it) by renaming a new link
    /// over the old one: atomic.
    pub fn switch(&self, id: Option<&str>) -> io::Result<()> {
        let current = self.current();
        match id {
            Some(id) => {
                let tmp = self.root.join(".current.tmp");
                let _ = fs::remove_file(&tmp);
                symlink(Path::new("releases").join(id), &tmp).map_err(at(&tmp))?;
                fs::rename(&tmp, &current).map_err(at(&current))?;
            }
            None => match fs::remove_file(&current) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at(&current)(e)),
                _ => {}
            },
        }
        sync_dir(&self.root).map_err(at(&self.root))
    }

    /// A release's state, if zdt made it.
    pub fn meta(&self, id: &str) -> Option<Meta> {
        let data = fs::read(self.meta_path(id)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Saves a release's state.
    pub fn write_meta(&self, m: &Meta) -> io::Result<()> {
        let data = serde_json::to_vec_pretty(m).map_err(io::Error::other)?;
        write_new(&self.meta_path(&m.id), &data).map_err(at(&self.meta_path(&m.id)))
    }

    /// Marks a release failed with a reason (best effort: a full disk must
    /// not hide the original error).
    pub fn mark_failed(&self, id: &str, reason: &str) {
        let mut m = self.meta(id).unwrap_or_else(|| Meta {
            id: id.to_string(),
            created_ms: 0,
            source: String::new(),
            commit: None,
            build_ms: None,
            size_bytes: 0,
            state: BuildState::Failed,
            reason: None,
        });
        m.state = BuildState::Failed;
        m.reason = Some(reason.to_string());
        if let Err(e) = self.write_meta(&m) {
            tracing::warn!(release = id, cause = %e, "cannot record the failed release");
        }
    }

    /// Release ids under `releases/`, oldest first (ids sort by time).
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(self.releases())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// The newest release older than `current` that did not fail: what
    /// `rollback` goes back to.
    pub fn previous_good(&self) -> Option<String> {
        let current = self.current_id();
        self.ids()
            .into_iter()
            .rev()
            .filter(|id| current.as_deref().is_none_or(|c| id.as_str() < c))
            .find(|id| self.meta(id).is_none_or(|m| m.state == BuildState::Ready))
    }

    /// Removes a release folder and its records.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let dir = self.release(id);
        fs::remove_dir_all(&dir).map_err(at(&dir))?;
        let _ = fs::remove_file(self.meta_path(id));
        let _ = fs::remove_file(self.log_path(id));
        Ok(())
    }

    /// Removes leftovers of interrupted fetches.
    pub fn remove_incoming(&self) {
        if let Ok(rd) = fs::read_dir(self.releases()) {
            for e in rd.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(".incoming-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// After a zdt that died during a deploy: marks the interrupted release
    /// failed, and if `current` was already switched to it, switches back
    /// (it was never seen ready). Returns what was done, for the log.
    pub fn recover(&self) -> Option<String> {
        if let Some(c) = self.canary() {
            // Its generations died with zdt: start on the stable release.
            let mut said = format!(
                "the canary of release {} was interrupted (zdt stopped)",
                c.release
            );
            self.mark_failed(&c.release, "canary interrupted: zdt stopped");
            if self.current_id().as_deref() == Some(c.release.as_str()) {
                match self.switch(c.previous.as_deref()) {
                    Ok(()) => said.push_str(&format!(
                        "; current switched back to {}",
                        c.previous.as_deref().unwrap_or("(none)")
                    )),
                    Err(e) => said.push_str(&format!("; cannot switch current back: {e}")),
                }
            }
            let _ = self.set_canary(None);
            return Some(said);
        }
        let j = self.journal()?;
        // A deploy of another zdt on the same root still runs.
        let lock = self.lock().ok()?.ok()?;
        self.remove_incoming();
        let mut said = format!(
            "the {} begun at {} was interrupted (zdt stopped)",
            j.what,
            utc_stamp(j.started_ms)
        );
        if let Some(id) = j.release.as_ref().filter(|id| self.release(id).is_dir()) {
            self.mark_failed(id, "interrupted: zdt stopped during the deploy");
            said.push_str(&format!("; release {id} marked failed"));
            if j.switched && self.current_id().as_deref() == Some(id) {
                match self.switch(j.previous.as_deref()) {
                    Ok(()) => said.push_str(&format!(
                        "; current switched back to {}",
                        j.previous.as_deref().unwrap_or("(none)")
                    )),
                    Err(e) => said.push_str(&format!("; cannot switch current back: {e}")),
                }
            }
        }
        self.clear_journal();
        drop(lock);
        Some(said)
    }
}

/// `YYYYMMDD-HHMMSS` in UTC for a unix time in milliseconds.
pub fn utc_stamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// RFC 3339 UTC time for a unix time in milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let s = utc_stamp(ms);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The time now, for ids and records.
pub fn now() -> u64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        // 2026-12-02 10:15:00 UTC
        assert_eq!(utc_stamp(1_796_206_500_000), "20261202-101500");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn switch_and_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(&dir.path().join("app"));
        l.prepare().expect("prepare");
        let a = l.new_id(1_796_206_500_000, None);
        fs::create_dir(l.release(&a)).expect("mkdir");
        let b = l.new_id(1_796_206_500_000, Some("0123456789abcdef"));
        assert_eq!(b, "20261202-101500-0123456");
        let c = l.new_id(1_796_206_500_000, None);
        assert_eq!(c, "20261202-101500-2");
        fs::create_dir(l.release(&c)).expect("mkdir");
        l.switch(Some(&a)).expect("switch");
        assert_eq!(l.current_id().as_deref(), Some(a.as_str()));
        l.switch(Some(&c)).expect("switch");
        assert_eq!(l.current_id().as_deref(), Some(c.as_str()));
        assert_eq!(l.previous_good().as_deref(), Some(a.as_str()));
        let r = Release::resolve(l.root()).expect("resolve");
        assert_eq!(r.id, c);
        assert_eq!(
            r.pin(&l.root().join("current/public"), String::new()),
            fs::canonicalize(l.release(&c))
                .expect("canon")
                .join("public")
        );
        l.switch(None).expect("unswitch");
        assert!(Release::resolve(l.root()).is_none());
    }

    #[test]
    fn recover_switches_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(dir.path());
        l.prepare().expect("prepare");
        for id in ["a", "b"] {
            fs::create_dir(l.release(id)).expect("mkdir");
            l.write_meta(&Meta {
                id: id.into(),
                created_ms: 0,
                source: "x".into(),
                commit: None,
                build_ms: None,
                size_bytes: 0,
                state: BuildState::Ready,
                reason: None,
            })
            .expect("meta");
        }
        l.switch(Some("b")).expect("switch");
        l.write_journal(&Journal {
            release: Some("b".into()),
            what: "deploy from x".into(),
            started_ms: 0,
            previous: Some("a".into()),
            switched: true,
        })
        .expect("journal");
        let said = l.recover().expect("recovered");
        assert!(said.contains("switched back to a"), "{said}");
        assert_eq!(l.current_id().as_deref(), Some("a"));
        assert_eq!(l.meta("b").map(|m| m.state), Some(BuildState::Failed));
        assert!(l.journal().is_none());
        assert!(l.recover().is_none());
    }
}
