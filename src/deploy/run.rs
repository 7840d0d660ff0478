//! The deploy and rollback sequences (see the module map in `deploy`).
//!
//! Rule kept throughout: `current` moves to a release only once it is
//! complete, and moves back as soon as a program fails to start on it; the
//! programs' old generations keep serving until the new ones are ready (the
//! program actors' zero-downtime restart), so a failed deploy fails no
//! request.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::fetch::{self, Source};
use super::hooks::{self, Hook};
use super::layout::{self, at, BuildState, Journal, Layout, Meta};
use super::secs;
use crate::config::{DeployConfig, ProgramConfig};
use crate::control::proto::{ErrorBody, ReleaseRow, Reply};
use crate::program::{OpError, ProgramHandle, ProgramMsg};
use crate::spawn::Spawner;
use crate::state::InstanceState;

/// One program on the deploy root.
#[derive(Clone)]
pub struct Member {
    /// Its handle.
    pub handle: ProgramHandle,
    /// Its settings.
    pub config: ProgramConfig,
}

/// The programs on one deploy root, lowest priority first.
pub struct Group {
    /// The root's settings (the same for every member).
    pub config: DeployConfig,
    /// The programs, in start order.
    pub members: Vec<Member>,
}

/// What `zdtctl deploy` asks for.
#[derive(Clone, Debug)]
pub struct Request {
    /// `--from`: a folder, an archive, or `git+URL#REF`.
    pub from: String,
    /// Where a relative `from` is (the client's working directory).
    pub base: PathBuf,
    /// `--pause`: hold new requests (proxy mode) while the migrate hooks
    /// run and the new release starts; each request at most this long.
    pub pause: Option<Duration>,
    /// `--canary PERCENT`: the new release serves that share of new
    /// clients beside the old one until `promote` or `rollback`.
    pub canary: Option<u8>,
}

/// Progress lines: to the client (if still there) and the release's log.
pub struct Progress {
    /// To the client's connection; a gone client is ignored.
    replies: Option<mpsc::Sender<Reply>>,
    /// The release's deploy log once the release has an id; lines said
    /// before are kept in `early` and written then.
    log: Option<fs::File>,
    early: Vec<String>,
    /// Lines the client's channel had no room for since the last one sent.
    dropped: usize,
}

impl Progress {
    /// Lines go to `replies`.
    pub fn new(replies: Option<mpsc::Sender<Reply>>) -> Self {
        Self {
            replies,
            log: None,
            early: Vec::new(),
            dropped: 0,
        }
    }

    /// Says one line.
    pub fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(target: "zdt::deploy", "{line}");
        self.log_line(&line);
        self.send(line);
    }

    /// To the client; a slow client loses lines rather than holding the
    /// deploy, and is told how many (the deploy log has them all).
    fn send(&mut self, line: String) {
        let Some(r) = &self.replies else { return };
        if self.dropped > 0 {
            let note = format!(
                "  ({} line(s) not shown: output came faster than zdtctl read it; the deploy log has them)",
                self.dropped
            );
            if r.try_send(Reply::Progress { message: note }).is_err() {
                self.dropped += 1;
                return;
            }
            self.dropped = 0;
        }
        if r.try_send(Reply::Progress { message: line }).is_err() {
            self.dropped += 1;
        }
    }

    /// A line of hook output: to the log and the client, not zdt's log.
    fn output(&mut self, line: &str) {
        let line = format!("  | {line}");
        self.log_line(&line);
        self.send(line);
    }

    fn log_line(&mut self, line: &str) {
        match &mut self.log {
            Some(f) => {
                let _ = writeln!(f, "{line}");
            }
            None => self.early.push(line.to_string()),
        }
    }

    fn open_log(&mut self, path: &Path) {
        match fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(mut f) => {
                for l in self.early.drain(..) {
                    let _ = writeln!(f, "{l}");
                }
                self.log = Some(f);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "cannot write the deploy log")
            }
        }
    }

    /// The client's channel, for the program actors' own progress lines.
    pub fn sender(&self) -> Option<mpsc::Sender<Reply>> {
        self.replies.clone()
    }
}

fn failed(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new("failed", message)
}

fn io_failed(what: &str, e: io::Error) -> ErrorBody {
    failed(format!("{what}: {e}"))
}

/// Runs blocking file work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("file work stopped: {e}"))?
}

/// `zdtctl deploy`: fetch, build, switch, restart; or nothing live changed
/// and an error saying why.
pub async fn deploy(
    group: Group,
    spawner: Spawner,
    req: Request,
    out: &mut Progress,
) -> Result<String, ErrorBody> {
    let started = Instant::now();
    let layout = Layout::new(&group.config.root);
    layout
        .prepare()
        .map_err(|e| io_failed("cannot prepare the deploy root", e))?;
    let _lock = take_lock(&layout)?;
    refuse_during_canary(&layout)?;
    if let Some(p) = req.canary {
        canary_possible(&group, p)?;
    }
    let source = fetch::parse_source(&req.from, &req.base).map_err(|e| failed(e.to_string()))?;
    let started_ms = layout::now();
    let previous = layout.current_id();
    let mut journal = Journal {
        release: None,
        what: format!("deploy from {}", req.from),
        started_ms,
        previous: previous.clone(),
        switched: false,
    };
    layout
        .write_journal(&journal)
        .map_err(|e| io_failed("cannot record the deploy", e))?;
    let result = deploy_locked(&group, &spawner, &layout, &source, &req, &mut journal, out).await;
    layout.clear_journal();
    let id = result?;
    if let Some(p) = req.canary {
        out.say(format!(
            "release {id} serves {p} % of new clients as a canary beside {} ({})",
            previous.as_deref().unwrap_or("none"),
            secs(started.elapsed())
        ));
        return Ok(format!(
            "canary {id} on {names}: watch it with `zdtctl status {first}`; `zdtctl promote {first}` completes the deploy, `zdtctl rollback {first}` ends it",
            names = names(&group),
            first = group.members.first().map_or("", |m| m.config.name.as_str())
        ));
    }
    out.say(format!(
        "release {id} live (was {}) in {}",
        previous.as_deref().unwrap_or("none"),
        secs(started.elapsed())
    ));
    Ok(format!("deployed {id} to {}", names(&group)))
}

fn names(group: &Group) -> String {
    group
        .members
        .iter()
        .map(|m| m.config.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn take_lock(layout: &Layout) -> Result<layout::Lock, ErrorBody> {
    match layout.lock() {
        Ok(Ok(lock)) => Ok(lock),
        Ok(Err(running)) => {
            let what = match running {
                Some(j) => format!(
                    "{}{}, since {} ({} ago)",
                    j.what,
                    j.release
                        .map(|r| format!(" (release {r})"))
                        .unwrap_or_default(),
                    layout::rfc3339(j.started_ms),
                    secs(Duration::from_millis(
                        layout::now().saturating_sub(j.started_ms)
                    ))
                ),
                None => "another deploy".to_string(),
            };
            Err(ErrorBody::new(
                "busy",
                format!("a deploy of {} is running: {what}", layout.root().display()),
            )
            .with_hint("wait for it to finish; `zdtctl releases` shows the outcome"))
        }
        Err(e) => Err(io_failed("cannot lock the deploy root", e)),
    }
}

async fn deploy_locked(
    group: &Group,
    spawner: &Spawner,
    layout: &Layout,
    source: &Source,
    req: &Request,
    journal: &mut Journal,
    out: &mut Progress,
) -> Result<String, ErrorBody> {
    // Fetch into a folder that is not a release yet.
    let incoming = layout.releases().join(format!(
        ".incoming-{}-{}",
        journal.started_ms,
        std::process::id()
    ));
    fs::create_dir(&incoming)
        .map_err(|e| io_failed("cannot make the release folder", at(&incoming)(e)))?;
    let t = Instant::now();
    let fetched = fetch_into(source, &incoming, spawner, group, out).await;
    let commit = match fetched {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_dir_all(&incoming);
            return Err(e);
        }
    };
    let id = layout.new_id(journal.started_ms, commit.as_deref());
    let dir = layout.release(&id);
    // Named in the journal first: a zdt killed from here on leaves a
    // release the next start marks failed.
    journal.release = Some(id.clone());
    layout
        .write_journal(journal)
        .map_err(|e| io_failed("cannot record the deploy", e))?;
    fs::rename(&incoming, &dir).map_err(|e| {
        let _ = fs::remove_dir_all(&incoming);
        io_failed("cannot name the release", at(&dir)(e))
    })?;
    out.open_log(&layout.log_path(&id));
    out.say(format!(
        "fetch {} -> releases/{id}{}: {}",
        req.from,
        commit
            .as_deref()
            .map(|c| format!(" (commit {c})"))
            .unwrap_or_default(),
        secs(t.elapsed())
    ));
    let mut meta = Meta {
        id: id.clone(),
        created_ms: journal.started_ms,
        source: req.from.clone(),
        commit,
        build_ms: None,
        size_bytes: 0,
        state: BuildState::Building,
        reason: None,
    };
    layout
        .write_meta(&meta)
        .map_err(|e| io_failed("cannot record the release", e))?;
    write_release_file(&dir, &meta).map_err(|e| io_failed("cannot write RELEASE", e))?;
    let fail = |reason: String| {
        layout.mark_failed(&id, &reason);
        failed(reason)
    };
    // Shared paths, and the owner the hooks and workers run as.
    let shared = group.config.shared.clone();
    let (root, rel) = (layout.root().to_path_buf(), dir.clone());
    let owner = hook_owner(group);
    let n = blocking(move || {
        link_shared(&root, &rel, &shared, owner.as_ref()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| fail(format!("shared paths: {e}")))?;
    if n > 0 {
        out.say(format!("shared: {n} link(s) into shared/"));
    }
    // Build.
    let t = Instant::now();
    let total = group.config.build.len();
    for (i, argv) in group.config.build.iter().enumerate() {
        let step = format!("build {}/{total} {}", i + 1, argv.join(" "));
        run_hook(spawner, group, &dir, &id, argv, &step, out)
            .await
            .map_err(|(msg, tail)| {
                layout.mark_failed(&id, &msg);
                failed(msg).with_hint(format!("last output of the hook:\n{tail}"))
            })?;
    }
    meta.build_ms = (total > 0).then(|| t.elapsed().as_millis() as u64);
    let rel = dir.clone();
    meta.size_bytes = blocking(move || Ok(fetch::tree_size(&rel)))
        .await
        .unwrap_or(0);
    layout
        .write_meta(&meta)
        .map_err(|e| fail(format!("cannot record the release: {e}")))?;
    // Migrations: with --pause, no request runs while they do.
    let paused = match req.pause {
        Some(max) => pause(group, max, out).await.map_err(|e| {
            fail(e.message.clone()).with_hint("the pause was ended; nothing was switched")
        })?,
        None => Vec::new(),
    };
    let total = group.config.migrate.len();
    for (i, argv) in group.config.migrate.iter().enumerate() {
        let step = format!("migrate {}/{total} {}", i + 1, argv.join(" "));
        if let Err((msg, tail)) = run_hook(spawner, group, &dir, &id, argv, &step, out).await {
            resume(&paused, out).await;
            layout.mark_failed(&id, &msg);
            return Err(failed(msg).with_hint(format!("last output of the hook:\n{tail}")));
        }
    }
    let live = go_live(group, layout, &id, journal, req.canary, out).await;
    resume(&paused, out).await;
    live?;
    meta.state = BuildState::Ready;
    if let Err(e) = layout.write_meta(&meta) {
        tracing::warn!(release = %id, cause = %e, "cannot record the release as ready");
    }
    if req.canary.is_some() {
        let record = layout::CanaryRecord {
            release: id.clone(),
            previous: journal.previous.clone(),
            since_ms: layout::now(),
        };
        if let Err(e) = layout.set_canary(Some(&record)) {
            out.say(format!("cannot record the canary: {e}"));
        }
    } else {
        prune(&group.config, group, layout, out).await;
    }
    Ok(id)
}

/// Switches `current` to `id` and restarts every program; on a failure,
/// switches back and brings the programs that moved back too.
async fn go_live(
    group: &Group,
    layout: &Layout,
    id: &str,
    journal: &mut Journal,
    canary: Option<u8>,
    out: &mut Progress,
) -> Result<(), ErrorBody> {
    let previous = journal.previous.clone();
    journal.switched = true;
    layout
        .write_journal(journal)
        .map_err(|e| io_failed("cannot record the deploy", e))?;
    layout
        .switch(Some(id))
        .map_err(|e| io_failed("cannot switch current", e))?;
    out.say(format!(
        "switch current -> releases/{id} (was {})",
        previous.as_deref().unwrap_or("none")
    ));
    let mut moved: Vec<&Member> = Vec::new();
    for m in &group.members {
        let t = Instant::now();
        match restart(m, canary, out).await {
            Ok(true) => {
                out.say(format!(
                    "{}: serving {id} after {}",
                    m.config.name,
                    secs(t.elapsed())
                ));
                moved.push(m);
            }
            Ok(false) => out.say(format!(
                "{}: not running (autostart = false), left stopped",
                m.config.name
            )),
            Err(e) => {
                let reason = format!(
                    "{} did not start on release {id}: {}",
                    m.config.name, e.message
                );
                layout.mark_failed(id, &reason);
                out.say(format!("{reason}; switching current back"));
                if let Err(e) = layout.switch(previous.as_deref()) {
                    out.say(format!("cannot switch current back: {e}"));
                } else {
                    out.say(format!(
                        "switch current -> {} (back)",
                        previous
                            .as_deref()
                            .map_or("none".to_string(), |p| format!("releases/{p}"))
                    ));
                }
                // A program without owned sockets restarts stop-then-start:
                // its old process is gone, so it starts again on the old release.
                if !m.config.overlaps() {
                    if let Err(e) = restart(m, None, out).await {
                        out.say(format!(
                            "{}: cannot start again: {}",
                            m.config.name, e.message
                        ));
                    }
                }
                for back in moved {
                    // A canary goes back by ending it; a restart by another.
                    let back_result = match canary {
                        Some(_) => end_canary(back, out).await,
                        None => restart(back, None, out).await.map(|_| ()),
                    };
                    if let Err(e) = back_result {
                        out.say(format!(
                            "{}: cannot go back: {}",
                            back.config.name, e.message
                        ));
                    }
                }
                let body = failed(reason);
                return Err(match e.log_tail {
                    Some(t) if !t.is_empty() => {
                        body.with_hint(format!("last output of the worker:\n{t}"))
                    }
                    _ => body,
                });
            }
        }
    }
    Ok(())
}

/// Pauses the proxy-mode programs (pass-mode ones cannot hold requests);
/// returns the ones paused, once none has a request in flight.
async fn pause(group: &Group, max: Duration, out: &mut Progress) -> Result<Vec<Member>, OpError> {
    let mut paused = Vec::new();
    let t = Instant::now();
    for m in &group.members {
        if m.config.mode != crate::config::Mode::Proxy {
            out.say(format!(
                "{}: pass mode, not paused (the app accepts its connections itself)",
                m.config.name
            ));
            continue;
        }
        let r = m
            .handle
            .call(|reply| ProgramMsg::Pause {
                max_pause: max,
                reply,
            })
            .await;
        paused.push(m.clone());
        match r {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                resume(&paused, out).await;
                return Err(e);
            }
            None => {
                resume(&paused, out).await;
                return Err(OpError {
                    message: "zdt is shutting down".into(),
                    log_tail: None,
                    kept_previous_config: false,
                });
            }
        }
    }
    if !paused.is_empty() {
        out.say(format!(
            "paused {}: 0 in flight after {}; new requests are held (each at most {})",
            paused
                .iter()
                .map(|m| m.config.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            secs(t.elapsed()),
            secs(max)
        ));
    }
    Ok(paused)
}

async fn resume(paused: &[Member], out: &mut Progress) {
    for m in paused {
        if let Some(Err(e)) = m.handle.call(|reply| ProgramMsg::Resume { reply }).await {
            out.say(format!("{}: cannot resume: {}", m.config.name, e.message));
        }
    }
    if !paused.is_empty() {
        out.say("resumed: held requests go on");
    }
}

/// Restarts a program without downtime, or starts it when it is not
/// running and `autostart` is set. Ok(false): left stopped.
async fn restart(m: &Member, canary: Option<u8>, out: &Progress) -> Result<bool, OpError> {
    let snap = m.handle.snapshot();
    let running = snap.instances.iter().any(|i| {
        i.pid.is_some()
            || matches!(
                i.state,
                InstanceState::Starting | InstanceState::Running | InstanceState::Backoff
            )
    });
    let progress = out.sender();
    let result = if running {
        m.handle
            .call(|reply| ProgramMsg::Restart {
                instance: None,
                canary,
                progress,
                reply,
            })
            .await
    } else if m.config.autostart {
        m.handle
            .call(|reply| ProgramMsg::Start {
                instance: None,
                reply,
            })
            .await
    } else {
        return Ok(false);
    };
    match result {
        Some(Ok(_)) => Ok(true),
        Some(Err(e)) => Err(e),
        None => Err(OpError {
            message: "zdt is shutting down".into(),
            log_tail: None,
            kept_previous_config: false,
        }),
    }
}

/// `zdtctl rollback NAME [ID]`: the same switch and restart, no fetch or build.
pub async fn rollback(
    group: Group,
    to: Option<String>,
    out: &mut Progress,
) -> Result<String, ErrorBody> {
    let started = Instant::now();
    let layout = Layout::new(&group.config.root);
    let _lock = take_lock(&layout)?;
    refuse_during_canary(&layout)?;
    let current = layout.current_id();
    let id = match to {
        Some(id) => {
            if !layout.ids().contains(&id) {
                let known = layout.ids().join(", ");
                return Err(ErrorBody::new(
                    "bad_request",
                    format!(
                        "no release {id:?} in {} (known: {known})",
                        layout.releases().display()
                    ),
                ));
            }
            id
        }
        None => layout.previous_good().ok_or_else(|| {
            failed(format!(
                "no earlier good release in {} to go back to",
                layout.releases().display()
            ))
            .with_hint("`zdtctl releases` lists them")
        })?,
    };
    if current.as_deref() == Some(id.as_str()) {
        return Err(ErrorBody::new(
            "bad_request",
            format!("release {id} is live already"),
        ));
    }
    let mut journal = Journal {
        release: None,
        what: format!("rollback to {id}"),
        started_ms: layout::now(),
        previous: current.clone(),
        switched: false,
    };
    layout
        .write_journal(&journal)
        .map_err(|e| io_failed("cannot record the rollback", e))?;
    let result = go_live(&group, &layout, &id, &mut journal, None, out).await;
    layout.clear_journal();
    result?;
    // A release that failed before and now serves is good after all.
    if let Some(mut m) = layout.meta(&id) {
        if m.state != BuildState::Ready {
            m.state = BuildState::Ready;
            m.reason = None;
            let _ = layout.write_meta(&m);
        }
    }
    out.say(format!(
        "release {id} live (was {}) in {}",
        current.as_deref().unwrap_or("none"),
        secs(started.elapsed())
    ));
    Ok(format!("rolled back {} to {id}", names(&group)))
}

/// `zdtctl releases`: every release of the root, oldest first.
pub fn list(config: &DeployConfig) -> Vec<ReleaseRow> {
    let layout = Layout::new(&config.root);
    let current = layout.current_id();
    let previous = layout.previous_good();
    let running = layout.journal().and_then(|j| j.release);
    let canary = layout.canary();
    layout
        .ids()
        .into_iter()
        .map(|id| {
            let meta = layout.meta(&id);
            // During a canary, `current` names the canary; the stable
            // release is the live one.
            let live = match &canary {
                Some(c) => c.previous.as_deref(),
                None => current.as_deref(),
            };
            let state = if canary.as_ref().is_some_and(|c| c.release == id) {
                "canary"
            } else if live == Some(id.as_str()) {
                "live"
            } else if running.as_deref() == Some(id.as_str()) {
                "building"
            } else {
                match meta.as_ref().map(|m| m.state) {
                    Some(BuildState::Failed) => "failed",
                    Some(BuildState::Building) => "failed",
                    _ if previous.as_deref() == Some(id.as_str()) => "previous",
                    _ => "ready",
                }
            };
            ReleaseRow {
                state: state.to_string(),
                created_ms: meta.as_ref().map(|m| m.created_ms),
                source: meta.as_ref().map(|m| m.source.clone()),
                commit: meta.as_ref().and_then(|m| m.commit.clone()),
                build_ms: meta.as_ref().and_then(|m| m.build_ms),
                size_bytes: meta.as_ref().map(|m| m.size_bytes),
                reason: meta.and_then(|m| m.reason),
                id,
            }
        })
        .collect()
}

/// Removes the oldest releases beyond `keep_releases`, never the live one
/// nor one a process still runs in.
async fn prune(config: &DeployConfig, group: &Group, layout: &Layout, out: &mut Progress) {
    let keep = config.keep_releases;
    let ids = layout.ids();
    if ids.len() <= keep {
        return;
    }
    let current = layout.current_id();
    let in_use: Vec<String> = group
        .members
        .iter()
        .flat_map(|m| m.handle.snapshot().instances)
        .filter_map(|i| i.release)
        .collect();
    let mut excess = ids.len() - keep;
    for id in ids {
        if excess == 0 {
            break;
        }
        if current.as_deref() == Some(id.as_str()) || in_use.contains(&id) {
            continue;
        }
        let l = layout.clone();
        let gone = id.clone();
        match blocking(move || l.remove(&gone).map_err(|e| e.to_string())).await {
            Ok(()) => {
                out.say(format!("pruned release {id} (keep_releases = {keep})"));
                excess -= 1;
            }
            Err(e) => out.say(format!("cannot prune release {id}: {e}")),
        }
    }
}

/// A deploy or rollback waits for a canary to be promoted or rolled back.
fn refuse_during_canary(layout: &Layout) -> Result<(), ErrorBody> {
    match layout.canary() {
        Some(c) => Err(ErrorBody::new(
            "busy",
            format!(
                "release {} serves as a canary since {}",
                c.release,
                layout::rfc3339(c.since_ms)
            ),
        )
        .with_hint("`zdtctl promote NAME` completes it, `zdtctl rollback NAME` ends it")),
        None => Ok(()),
    }
}

/// `--canary` needs running proxy-mode HTTP programs (the kernel, not zdt,
/// picks which pass-mode process accepts).
fn canary_possible(group: &Group, percent: u8) -> Result<(), ErrorBody> {
    if !(1..=99).contains(&percent) {
        return Err(ErrorBody::new(
            "bad_request",
            "--canary takes a percentage from 1 to 99",
        ));
    }
    for m in &group.members {
        let c = &m.config;
        if c.mode != crate::config::Mode::Proxy || c.protocol != crate::config::Protocol::Http {
            return Err(ErrorBody::new(
                "bad_request",
                format!("--canary needs every program on the root in mode = \"proxy\" with protocol = \"http\"; {} is not", c.name),
            ));
        }
        if !m
            .handle
            .snapshot()
            .instances
            .iter()
            .any(|i| i.state == InstanceState::Running)
        {
            return Err(ErrorBody::new(
                "bad_request",
                format!("--canary needs {} running (the canary serves beside it); deploy without --canary first", c.name),
            ));
        }
    }
    Ok(())
}

async fn end_canary(m: &Member, out: &Progress) -> Result<(), OpError> {
    let progress = out.sender();
    match m
        .handle
        .call(|reply| ProgramMsg::EndCanary { progress, reply })
        .await
    {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e),
        None => Err(OpError {
            message: "zdt is shutting down".into(),
            log_tail: None,
            kept_previous_config: false,
        }),
    }
}

/// After `promote` (true) or `rollback` (false) of a canary a deploy
/// started: the release is live for good (then prune), or `current` goes
/// back and the release is marked failed. Nothing when no deploy canary runs.
pub async fn finish_canary(group: &Group, promoted: bool, out: &mut Progress) -> Option<String> {
    let layout = Layout::new(&group.config.root);
    let c = layout.canary()?;
    let said = if promoted {
        format!("release {} is live", c.release)
    } else {
        layout.mark_failed(&c.release, "canary rolled back");
        match layout.switch(c.previous.as_deref()) {
            Ok(()) => format!(
                "current -> {} again; release {} marked failed",
                c.previous.as_deref().unwrap_or("none"),
                c.release
            ),
            Err(e) => format!("cannot switch current back: {e}"),
        }
    };
    if let Err(e) = layout.set_canary(None) {
        out.say(format!("cannot clear the canary record: {e}"));
    }
    if promoted {
        prune(&group.config, group, &layout, out).await;
    }
    Some(said)
}

/// Fills `dir` from the source; returns the commit for git.
async fn fetch_into(
    source: &Source,
    dir: &Path,
    spawner: &Spawner,
    group: &Group,
    out: &mut Progress,
) -> Result<Option<String>, ErrorBody> {
    match source.clone() {
        Source::Dir(src) => {
            let dest = dir.to_path_buf();
            blocking(move || fetch::copy_dir(&src, &dest).map_err(|e| e.to_string()))
                .await
                .map_err(failed)?;
            Ok(None)
        }
        Source::Archive { path, kind } => {
            let dest = dir.to_path_buf();
            blocking(move || fetch::unpack(&path, kind, &dest).map_err(|e| e.to_string()))
                .await
                .map_err(failed)?;
            Ok(None)
        }
        Source::Git { url, reference } => {
            let steps: [Vec<String>; 4] = [
                vec!["git".into(), "init".into(), "-q".into()],
                vec![
                    "git".into(),
                    "fetch".into(),
                    "-q".into(),
                    "--depth".into(),
                    "1".into(),
                    url.clone(),
                    reference.clone(),
                ],
                vec![
                    "git".into(),
                    "-c".into(),
                    "advice.detachedHead=false".into(),
                    "checkout".into(),
                    "-q".into(),
                    "FETCH_HEAD".into(),
                ],
                vec!["git".into(), "rev-parse".into(), "HEAD".into()],
            ];
            let mut commit = None;
            for argv in steps {
                let hook = Hook {
                    argv: argv.clone(),
                    dir: dir.to_path_buf(),
                    env: vec![("GIT_TERMINAL_PROMPT".into(), "0".into())],
                    user: None,
                    group: None,
                    timeout: group.config.build_timeout,
                };
                let ran = hooks::run(spawner, &hook, |l| out.output(l))
                    .await
                    .map_err(|e| failed(format!("git: {e}")))?;
                if !ran.ok() {
                    return Err(failed(format!(
                        "git {} {} from {url}: {}",
                        argv.get(1).map_or("", String::as_str),
                        reference,
                        ran.describe(group.config.build_timeout)
                    ))
                    .with_hint(ran.tail_text()));
                }
                commit = Some(ran.output.trim().to_string());
            }
            let git = dir.join(".git");
            fs::remove_dir_all(&git).map_err(|e| io_failed("cannot remove .git", at(&git)(e)))?;
            Ok(commit.filter(|c| !c.is_empty()))
        }
    }
}

/// `RELEASE` in the release folder, for the app and for people: what it
/// is and where it came from (`key=value` lines, dotenv style).
fn write_release_file(dir: &Path, m: &Meta) -> io::Result<()> {
    let mut text = format!(
        "id={}\nsource={}\ncreated={}\n",
        m.id,
        m.source,
        layout::rfc3339(m.created_ms)
    );
    if let Some(c) = &m.commit {
        text.push_str(&format!("commit={c}\n"));
    }
    let path = dir.join("RELEASE");
    // A RELEASE of the app's own (or a planted link) is replaced, never followed.
    let _ = fs::remove_file(&path);
    fs::write(&path, text).map_err(at(&path))
}

/// The user and group hooks run as: the first program's that sets one.
fn hook_owner(group: &Group) -> Option<(String, Option<String>)> {
    group
        .members
        .iter()
        .find_map(|m| m.config.user.clone().map(|u| (u, m.config.group.clone())))
}

/// Runs one build or migrate hook; Err((message, last lines)).
async fn run_hook(
    spawner: &Spawner,
    group: &Group,
    dir: &Path,
    id: &str,
    argv: &[String],
    step: &str,
    out: &mut Progress,
) -> Result<(), (String, String)> {
    let owner = hook_owner(group);
    let first = group.members.first().map(|m| &m.config);
    let release = dir.to_string_lossy().into_owned();
    let mut env: Vec<(String, String)> = first
        .map(|c| {
            c.environment
                .iter()
                .map(|(k, v)| (k.clone(), v.replace("{release}", &release)))
                .collect()
        })
        .unwrap_or_default();
    env.push(("ZDT_RELEASE".into(), id.to_string()));
    env.push(("ZDT_RELEASE_DIR".into(), release.clone()));
    env.push((
        "ZDT_DEPLOY_ROOT".into(),
        group.config.root.to_string_lossy().into_owned(),
    ));
    let hook = Hook {
        argv: argv
            .iter()
            .map(|a| a.replace("{release}", &release))
            .collect(),
        dir: dir.to_path_buf(),
        env,
        user: owner.as_ref().map(|o| o.0.clone()),
        group: owner.and_then(|o| o.1),
        timeout: group.config.build_timeout,
    };
    out.say(format!("{step}: running"));
    let ran = hooks::run(spawner, &hook, |l| out.output(l))
        .await
        .map_err(|e| (format!("{step}: {e}"), String::new()))?;
    if ran.ok() {
        out.say(format!("{step}: {}", secs(ran.took)));
        Ok(())
    } else {
        let msg = format!(
            "{step}: {} after {}",
            ran.describe(group.config.build_timeout),
            secs(ran.took)
        );
        out.say(msg.clone());
        Err((msg, ran.tail_text()))
    }
}

/// Makes each `shared` path of the release a link into `root/shared/`,
/// seeding `shared/` from the release the first time. Returns how many.
fn link_shared(
    root: &Path,
    release: &Path,
    shared: &[PathBuf],
    owner: Option<&(String, Option<String>)>,
) -> io::Result<usize> {
    let store = root.join("shared");
    for rel in shared {
        // Checked at load time too; a path must stay inside.
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} leaves the release", rel.display()),
            ));
        }
        let inside = release.join(rel);
        // Every folder on the way must be a real folder of the release, not
        // a link out of it (an archive may carry one).
        let mut on_way = release.to_path_buf();
        if let Some(parent) = rel.parent() {
            for c in parent.components() {
                on_way.push(c);
                match on_way.symlink_metadata() {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{} is not a folder of the release", on_way.display()),
                        ))
                    }
                    Err(_) => fs::create_dir(&on_way).map_err(at(&on_way))?,
                }
            }
        }
        let target = store.join(rel);
        if let Some(p) = target.parent() {
            fs::create_dir_all(p).map_err(at(p))?;
        }
        let in_release = inside.symlink_metadata().ok();
        if target.symlink_metadata().is_err() {
            // First deploy: the release's copy becomes the shared one.
            match &in_release {
                Some(m) if !m.file_type().is_symlink() => {
                    fs::rename(&inside, &target).map_err(at(&target))?;
                }
                _ if looks_like_file(rel) => {
                    fs::File::create(&target).map_err(at(&target))?;
                }
                _ => fs::create_dir(&target).map_err(at(&target))?,
            }
            if let Some((user, group)) = owner {
                chown(&target, user, group.as_deref())?;
            }
        }
        match inside.symlink_metadata() {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&inside).map_err(at(&inside))?,
            Ok(_) => fs::remove_file(&inside).map_err(at(&inside))?,
            Err(_) => {}
        }
        symlink(&target, &inside).map_err(at(&inside))?;
    }
    if let Some((user, group)) = owner {
        chown_tree(release, user, group.as_deref())?;
    }
    Ok(shared.len())
}

/// A missing shared path is made a file when its name has an extension
/// (`.env`, `config.php`), else a folder.
fn looks_like_file(rel: &Path) -> bool {
    rel.file_name()
        .map(|n| n.to_string_lossy().contains('.'))
        .unwrap_or(false)
}

fn ids_of(user: &str, group: Option<&str>) -> io::Result<(nix::unistd::Uid, nix::unistd::Gid)> {
    let u = nix::unistd::User::from_name(user)
        .map_err(io::Error::from)?
        .ok_or_else(|| io::Error::other(format!("no user {user:?}")))?;
    let gid = match group {
        Some(g) => {
            nix::unistd::Group::from_name(g)
                .map_err(io::Error::from)?
                .ok_or_else(|| io::Error::other(format!("no group {g:?}")))?
                .gid
        }
        None => u.gid,
    };
    Ok((u.uid, gid))
}

fn chown(path: &Path, user: &str, group: Option<&str>) -> io::Result<()> {
    let (uid, gid) = ids_of(user, group)?;
    std::os::unix::fs::lchown(path, Some(uid.as_raw()), Some(gid.as_raw())).map_err(at(path))
}

/// Gives the release to the user the hooks and workers run as (links
/// themselves, never what they point to).
fn chown_tree(path: &Path, user: &str, group: Option<&str>) -> io::Result<()> {
    let (uid, gid) = ids_of(user, group)?;
    fn walk(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(at(p))?;
        if p.symlink_metadata()?.is_dir() {
            for e in fs::read_dir(p).map_err(at(p))? {
                walk(&e?.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    walk(path, uid.as_raw(), gid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_links_seed_and_survive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let l = Layout::new(root);
        l.prepare().expect("prepare");
        let shared = vec![
            PathBuf::from("storage"),
            PathBuf::from(".env"),
            PathBuf::from("public/uploads"),
        ];
        let r1 = l.release("a");
        fs::create_dir_all(r1.join("storage")).expect("mkdir");
        fs::write(r1.join("storage/kept.txt"), "1").expect("write");
        assert_eq!(link_shared(root, &r1, &shared, None).expect("link"), 3);
        assert!(root.join("shared/storage/kept.txt").is_file());
        assert!(root.join("shared/.env").is_file());
        assert!(root.join("shared/public/uploads").is_dir());
        assert!(r1
            .join("storage")
            .symlink_metadata()
            .expect("meta")
            .file_type()
            .is_symlink());
        // The next release's own copy is replaced by the link: data stays.
        let r2 = l.release("b");
        fs::create_dir_all(r2.join("storage")).expect("mkdir");
        link_shared(root, &r2, &shared, None).expect("link");
        assert_eq!(
            fs::read_to_string(r2.join("storage/kept.txt")).expect("read"),
            "1"
        );
    }

    #[test]
    fn shared_refuses_a_link_on_the_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let l = Layout::new(root);
        l.prepare().expect("prepare");
        let r = l.release("a");
        fs::create_dir_all(&r).expect("mkdir");
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        symlink(&outside, r.join("public")).expect("link");
        let err =
            link_shared(root, &r, &[PathBuf::from("public/uploads")], None).expect_err("refused");
        assert!(
            err.to_string().contains("not a folder of the release"),
            "{err}"
        );
        assert!(fs::read_dir(&outside).expect("read").next().is_none());
    }
}
