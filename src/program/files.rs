//! `watch`: the files of a program in development. A change under a watched
//! path (not ignored, not in a folder zdt writes to) is sent to the program
//! actor, which restarts the program once nothing has changed for the
//! debounce time.
//!
//! Folders are watched one by one (inotify watches are per folder), the
//! ignored ones (`node_modules`, `.git`, zdt's logs) left out, so that a
//! project's dependencies cost no watches; a folder created later under a
//! watched one is added when its creation is seen.

use std::path::{Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::config::WatchConfig;

/// A running watch; dropping it ends it.
pub(super) struct Watch {
    /// What it watches (a new setting makes a new watch).
    pub config: WatchConfig,
    filter: Filter,
    watcher: notify::RecommendedWatcher,
    /// The folders watched so far.
    folders: std::collections::HashSet<PathBuf>,
    program: String,
    /// A folder could not be watched (said once).
    failed: bool,
}

/// The most folders one program's watch takes.
const MAX_FOLDERS: usize = 20_000;

impl Watch {
    /// Watches `top` (a file, or a folder with the folders below it that
    /// are not ignored), leaving out what is watched already.
    pub fn add(&mut self, top: &Path) {
        if !top.is_dir() {
            if top.exists() && self.folders.insert(top.to_path_buf()) {
                self.watch_one(top);
            }
            return;
        }
        let mut todo = vec![top.to_path_buf()];
        while let Some(dir) = todo.pop() {
            if self.folders.len() >= MAX_FOLDERS {
                if !self.failed {
                    tracing::warn!(program = %self.program, "watch: more than {MAX_FOLDERS} folders; the rest are not watched (add the big ones to watch_ignore)");
                    self.failed = true;
                }
                return;
            }
            if (dir != top && self.filter.ignored(&dir)) || !self.folders.insert(dir.clone()) {
                continue;
            }
            self.watch_one(&dir);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // Not through symlinks: a link to `/` must not watch it all.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(entry.path());
                }
            }
        }
    }

    fn watch_one(&mut self, path: &Path) {
        if let Err(e) = self.watcher.watch(path, RecursiveMode::NonRecursive) {
            if !self.failed {
                tracing::warn!(program = %self.program, path = %path.display(), "watch: cannot watch it: {e}");
                self.failed = true;
            }
        }
    }
}

/// Starts watching `config.paths`; each change that counts is sent to `tx`.
/// A path that cannot be watched (missing, out of inotify watches) is
/// logged and left out.
pub(super) fn start(
    program: &str,
    config: &WatchConfig,
    tx: mpsc::UnboundedSender<PathBuf>,
) -> Result<Watch, String> {
    let filter = Filter::new(config);
    let events = filter.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if !counts(&event.kind) {
            return;
        }
        for path in event.paths {
            if !events.ignored(&path) {
                let _ = tx.send(path);
            }
        }
    })
    .map_err(|e| format!("cannot watch files: {e}"))?;
    let mut watch = Watch {
        config: config.clone(),
        filter,
        watcher,
        folders: Default::default(),
        program: program.to_string(),
        failed: false,
    };
    for path in &config.paths {
        if !path.exists() {
            tracing::warn!(program, path = %path.display(), "watch: no such file or folder; not watched");
        }
        watch.add(path);
    }
    tracing::info!(
        program,
        paths = ?config.paths,
        folders = watch.folders.len(),
        "watching for changes; a change restarts the program"
    );
    Ok(watch)
}

/// Whether a change of this kind restarts: writes, creations, removals,
/// renames; not reads, and not access times.
fn counts(kind: &EventKind) -> bool {
    use notify::event::{MetadataKind, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(_) | EventKind::Other | EventKind::Any => false,
    }
}

/// What a watch leaves alone, its patterns compiled once.
#[derive(Clone)]
pub(super) struct Filter {
    paths: Vec<PathBuf>,
    skip: Vec<PathBuf>,
    patterns: Vec<glob::Pattern>,
}

impl Filter {
    pub fn new(config: &WatchConfig) -> Filter {
        Filter {
            paths: config.paths.clone(),
            skip: config.skip.clone(),
            // Checked by the config loader: none is left out here.
            patterns: config
                .ignore
                .iter()
                .filter_map(|p| glob::Pattern::new(p).ok())
                .collect(),
        }
    }

    /// Whether a change of `path` is left alone: under a folder zdt writes
    /// to, or with a part of its path matching an ignore pattern.
    pub fn ignored(&self, path: &Path) -> bool {
        if self.skip.iter().any(|s| path.starts_with(s)) {
            return true;
        }
        // Only the parts below the watched path that holds it count, so
        // that a project inside a folder named like a pattern is still
        // watched.
        let below = self
            .paths
            .iter()
            .filter_map(|w| path.strip_prefix(w).ok())
            .min_by_key(|rest| rest.components().count())
            .unwrap_or(path);
        below.components().any(|c| {
            let name = c.as_os_str().to_string_lossy();
            self.patterns.iter().any(|p| p.matches(&name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignore_patterns_match_parts_below_the_watched_path() {
        let cfg = WatchConfig {
            paths: vec!["/srv/node_modules/app".into()],
            ignore: crate::config::DEFAULT_WATCH_IGNORE
                .iter()
                .map(|s| s.to_string())
                .collect(),
            debounce: std::time::Duration::from_millis(500),
            skip: vec!["/srv/node_modules/app/logs".into()],
        };
        let cfg = Filter::new(&cfg);
        let app = Path::new("/srv/node_modules/app");
        assert!(!cfg.ignored(&app.join("src/server.js")));
        assert!(cfg.ignored(&app.join("node_modules/x/index.js")));
        assert!(cfg.ignored(&app.join(".git/index")));
        assert!(cfg.ignored(&app.join("src/.server.js.swp")));
        assert!(cfg.ignored(&app.join("debug.log")));
        assert!(cfg.ignored(&app.join("logs/web-0.out")));
    }
}
