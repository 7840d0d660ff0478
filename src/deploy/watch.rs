//! Deploy watches: zdt deploys by itself when a git branch moves or an
//! archive lands in an upload folder (workflows 2 and 3 of CONTEXT.md,
//! without a deployer living inside the app it deploys).
//!
//! A watch is a task of the supervisor's, one per deploy root. It asks for
//! a deploy the way `zdtctl deploy` does, through the supervisor's request
//! channel, so a deploy it starts is locked, logged and undone like any
//! other. What failed once is not tried again: a broken commit or archive
//! does not become a deploy loop. Its last check and outcome are published
//! on a `watch` that `zdtctl status` reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::hooks::{self, Hook};
use super::Layout;
use crate::config::{DeployConfig, Watch};
use crate::control::proto::{Command, Reply};
use crate::control::ControlRequest;
use crate::spawn::Spawner;
use crate::state::{now_ms, WatchState};

/// How long `git ls-remote` may take.
const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running watch; dropping it stops the task.
pub struct WatchHandle {
    /// What it watches, to tell whether a reload changed it.
    pub watch: Watch,
    /// Its state, for status.
    pub state: watch::Receiver<WatchState>,
    /// Stops the task when cancelled (and when this handle is dropped).
    _stop: tokio_util::sync::DropGuard,
}

/// Starts the watch of `config` (which must have one) for program `target`;
/// deploys go to `requests` (the supervisor's own channel).
pub fn start(
    target: String,
    config: &DeployConfig,
    spawner: Spawner,
    requests: mpsc::Sender<ControlRequest>,
) -> Option<WatchHandle> {
    let w = config.watch.clone()?;
    let source = match &w {
        Watch::Git { url, branch, .. } => format!("git {url}#{branch}"),
        Watch::Upload { dir, .. } => format!("upload {}", dir.display()),
    };
    let (tx, rx) = watch::channel(WatchState {
        source,
        ..WatchState::default()
    });
    let stop = CancellationToken::new();
    let task = Task {
        target,
        root: config.root.clone(),
        spawner,
        requests,
        state: tx,
    };
    let token = stop.clone();
    let what = w.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = token.cancelled() => {}
            () = task.run(what) => {}
        }
    });
    Some(WatchHandle {
        watch: w,
        state: rx,
        _stop: stop.drop_guard(),
    })
}

struct Task {
    target: String,
    root: PathBuf,
    spawner: Spawner,
    requests: mpsc::Sender<ControlRequest>,
    state: watch::Sender<WatchState>,
}

impl Task {
    async fn run(self, w: Watch) {
        match w {
            Watch::Git {
                url,
                branch,
                interval,
            } => self.git(&url, &branch, interval).await,
            Watch::Upload { dir, settle } => self.upload(&dir, settle).await,
        }
    }

    fn record(&self, outcome: String) {
        tracing::info!(root = %self.root.display(), "deploy watch: {outcome}");
        self.state.send_modify(|s| {
            s.last_check_ms = Some(now_ms());
            s.outcome = Some(outcome);
        });
    }

    /// Asks the supervisor for a deploy and waits for its end.
    async fn deploy(&self, from: String) -> Result<String, String> {
        let (tx, mut rx) = mpsc::channel(64);
        let req = ControlRequest {
            command: Command::Deploy {
                target: self.target.clone(),
                from,
                base: None,
                pause: false,
                max_pause: None,
                canary: None,
            },
            replies: tx,
            peer_uid: nix::unistd::geteuid().as_raw(),
        };
        self.requests
            .send(req)
            .await
            .map_err(|_| "zdt is stopping".to_string())?;
        while let Some(reply) = rx.recv().await {
            match reply {
                Reply::Ok { result } => {
                    return Ok(match result {
                        crate::control::proto::Outcome::Done { message, .. } => message,
                        other => format!("{other:?}"),
                    })
                }
                Reply::Error { error } => return Err(error.message),
                _ => {}
            }
        }
        Err("the deploy ended without an answer".into())
    }

    async fn git(&self, url: &str, branch: &str, interval: Duration) {
        // Commits tried and failed: never tried again.
        let mut failed: BTreeSet<String> = BTreeSet::new();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let head = match self.ls_remote(url, branch).await {
                Ok(h) => h,
                Err(e) => {
                    self.record(format!("cannot read {url}#{branch}: {e}"));
                    continue;
                }
            };
            let live = self.live_commit();
            if live.as_deref() == Some(head.as_str()) {
                self.record(format!("up to date (commit {})", short(&head)));
                continue;
            }
            if failed.contains(&head) || self.failed_before(&head) {
                self.record(format!(
                    "commit {} failed before; waiting for a new one",
                    short(&head)
                ));
                continue;
            }
            // The deploy fetches this very commit, so what failed is known.
            let outcome = match self.deploy(format!("git+{url}#{head}")).await {
                Ok(m) => format!("commit {}: {m}", short(&head)),
                Err(e) => {
                    failed.insert(head.clone());
                    format!("deploy of commit {} failed: {e}", short(&head))
                }
            };
            self.record(outcome);
        }
    }

    /// Whether a release of `commit` failed, in this zdt's life or an
    /// earlier one's (so a restart of zdt does not try it again).
    fn failed_before(&self, commit: &str) -> bool {
        let layout = Layout::new(&self.root);
        layout
            .ids()
            .iter()
            .filter_map(|id| layout.meta(id))
            .any(|m| {
                m.commit.as_deref() == Some(commit) && m.state == super::layout::BuildState::Failed
            })
    }

    /// The commit of the live release, if it came from git.
    fn live_commit(&self) -> Option<String> {
        let layout = Layout::new(&self.root);
        layout.meta(&layout.current_id()?)?.commit
    }

    async fn ls_remote(&self, url: &str, branch: &str) -> Result<String, String> {
        let hook = Hook {
            argv: vec![
                "git".into(),
                "ls-remote".into(),
                "--".into(),
                url.into(),
                branch.into(),
            ],
            dir: std::env::temp_dir(),
            env: vec![("GIT_TERMINAL_PROMPT".into(), "0".into())],
            user: None,
            group: None,
            timeout: LS_REMOTE_TIMEOUT,
        };
        let ran = hooks::run(&self.spawner, &hook, |_| {}).await?;
        if !ran.ok() {
            return Err(format!(
                "git ls-remote {}: {}",
                ran.describe(LS_REMOTE_TIMEOUT),
                ran.tail_text()
            ));
        }
        // "<sha>\trefs/heads/<branch>": the exact branch first, then a tag.
        let refs: Vec<(&str, &str)> = ran
            .output
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .collect();
        let wanted = [
            format!("refs/heads/{branch}"),
            format!("refs/tags/{branch}"),
        ];
        wanted
            .iter()
            .find_map(|w| {
                refs.iter()
                    .find(|(_, r)| r == w)
                    .map(|(sha, _)| sha.to_string())
            })
            .or_else(|| refs.first().map(|(sha, _)| sha.to_string()))
            .ok_or_else(|| format!("no branch {branch:?} in {url}"))
    }

    async fn upload(&self, dir: &Path, settle: Duration) {
        // Per archive: (size, mtime) last seen and since when unchanged.
        let mut seen: BTreeMap<PathBuf, ((u64, i64), Instant)> = BTreeMap::new();
        let every = (settle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announced = false;
        loop {
            tick.tick().await;
            let found = match archives_in(dir) {
                Ok(f) => f,
                Err(e) => {
                    if !announced {
                        self.record(format!("cannot read {}: {e}", dir.display()));
                        announced = true;
                    }
                    continue;
                }
            };
            if !announced {
                self.record(format!("watching {}", dir.display()));
                announced = true;
            }
            seen.retain(|p, _| found.iter().any(|(f, _)| f == p));
            let now = Instant::now();
            let mut ready = None;
            for (path, sig) in found {
                let entry = seen.entry(path.clone()).or_insert((sig, now));
                if entry.0 != sig {
                    *entry = (sig, now);
                } else if now.duration_since(entry.1) >= settle && ready.is_none() {
                    ready = Some(path);
                }
            }
            let Some(archive) = ready else {
                self.state.send_modify(|s| s.last_check_ms = Some(now_ms()));
                continue;
            };
            seen.remove(&archive);
            let name = archive
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let result = self.deploy(archive.display().to_string()).await;
            let (to, outcome) = match result {
                Ok(m) => ("done", format!("{name}: {m}")),
                Err(e) => ("failed", format!("{name} failed: {e}")),
            };
            let moved = move_into(&archive, &dir.join(to));
            self.record(match moved {
                Ok(p) => format!("{outcome}; moved to {}", p.display()),
                Err(e) => format!("{outcome}; cannot move it to {to}/: {e}"),
            });
        }
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The archives directly in `dir`, with (size, mtime).
fn archives_in(dir: &Path) -> std::io::Result<Vec<(PathBuf, (u64, i64))>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // The names `zdtctl deploy --from` takes as archives.
        let archive = super::fetch::kind_by_name(&e.path()).is_some();
        if !archive || name.starts_with('.') {
            continue;
        }
        // Only plain files: a link could point anywhere.
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_file() {
            out.push((e.path(), (m.len(), m.mtime())));
        }
    }
    out.sort();
    Ok(out)
}

/// Moves `file` into `folder` (made if missing), under a new name if the
/// name is taken.
fn move_into(file: &Path, folder: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(folder)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut to = folder.join(&name);
    let mut n = 2;
    while to.symlink_metadata().is_ok() {
        to = folder.join(format!("{}-{n}-{name}", super::layout::utc_stamp(now_ms())));
        n += 1;
    }
    std::fs::rename(file, &to)?;
    Ok(to)
}
