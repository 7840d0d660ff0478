//! `[program.NAME.deploy]`: where a program's releases live and how one is
//! built. Programs that name the same `root` form one deploy group (a web
//! server and its queue worker): one of them carries the settings, or all
//! carry the same; a deploy restarts all of them.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::values::{CommandValue, DurationValue};

/// How long one build hook may run when `build_timeout` is not set.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Releases kept after a good deploy when `keep_releases` is not set.
pub const DEFAULT_KEEP_RELEASES: usize = 5;
/// How often a git watch looks at the branch when `interval` is not set.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(30);
/// How long an uploaded archive must keep its size when `settle` is not set.
pub const DEFAULT_WATCH_SETTLE: Duration = Duration::from_secs(5);

/// A deploy root and what a deploy does in it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeployConfig {
    /// Absolute: holds `releases/`, `shared/`, `current`.
    pub root: PathBuf,
    /// Paths (relative, inside a release) that are links into `root/shared/`.
    pub shared: Vec<PathBuf>,
    /// Commands run in a new release before it goes live, in order.
    pub build: Vec<Vec<String>>,
    /// Commands run while the program is paused, before the switch
    /// (`zdtctl deploy --pause`).
    pub migrate: Vec<Vec<String>>,
    /// Bound on each build or migrate command. Default 10 min.
    pub build_timeout: Duration,
    /// Releases kept after a good deploy (at least 1). Default 5.
    pub keep_releases: usize,
    /// Deploy by itself when a git branch or an upload folder changes.
    pub watch: Option<Watch>,
}

/// What a deploy watch looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watch {
    /// A git branch, checked every `interval`.
    Git {
        /// The repository (a path, file://, https://, ssh).
        url: String,
        /// The branch (or tag) whose head is deployed.
        branch: String,
        /// How often the head is read.
        interval: Duration,
    },
    /// A folder where archives are uploaded.
    Upload {
        /// The folder (absolute).
        dir: PathBuf,
        /// An archive is taken once its size has not changed for this long.
        settle: Duration,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeploy {
    root: Spanned<String>,
    shared: Option<Vec<Spanned<String>>>,
    build: Option<Vec<CommandValue>>,
    migrate: Option<Vec<CommandValue>>,
    build_timeout: Option<Spanned<DurationValue>>,
    keep_releases: Option<Spanned<i64>>,
    watch: Option<Spanned<RawWatch>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    git: Option<Spanned<String>>,
    interval: Option<Spanned<DurationValue>>,
    upload: Option<String>,
    settle: Option<DurationValue>,
}

/// A program's deploy table, checked on its own.
pub(super) struct Parsed {
    pub config: DeployConfig,
    /// Only `root` was given: the settings come from another program of the group.
    pub only_root: bool,
    /// Where the table starts, for errors about the group.
    pub at: usize,
}

/// Checks one program's table. `err` makes an error at a byte offset;
/// `resolve` makes a path absolute against the config file's folder.
pub(super) fn parse<E>(
    raw: RawDeploy,
    resolve: &dyn Fn(&str) -> PathBuf,
    err: &dyn Fn(usize, String) -> E,
) -> Result<Parsed, E> {
    let at = raw.root.span().start;
    let only_root = raw.shared.is_none()
        && raw.build.is_none()
        && raw.migrate.is_none()
        && raw.build_timeout.is_none()
        && raw.keep_releases.is_none()
        && raw.watch.is_none();
    if raw.root.get_ref().is_empty() {
        return Err(err(at, "deploy root must not be empty".into()));
    }
    let root = resolve(raw.root.get_ref());
    let mut shared = Vec::new();
    for s in raw.shared.unwrap_or_default() {
        let p = Path::new(s.get_ref().trim_end_matches('/'));
        let inside =
            !p.as_os_str().is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(err(
                s.span().start,
                format!(
                    "shared path {:?} must be relative and stay inside the release (no '..', no leading '/')",
                    s.get_ref()
                ),
            ));
        }
        shared.push(p.to_path_buf());
    }
    let build_timeout = match raw.build_timeout {
        Some(t) if t.get_ref().0.is_zero() => {
            return Err(err(t.span().start, "build_timeout must be above 0".into()))
        }
        Some(t) => t.into_inner().0,
        None => DEFAULT_BUILD_TIMEOUT,
    };
    let keep_releases = match raw.keep_releases {
        None => DEFAULT_KEEP_RELEASES,
        Some(k) => match usize::try_from(*k.get_ref()) {
            Ok(n @ 1..=1000) => n,
            _ => {
                return Err(err(
                    k.span().start,
                    format!("keep_releases = {}: use 1 to 1000", k.get_ref()),
                ))
            }
        },
    };
    let watch = match raw.watch {
        None => None,
        Some(w) => {
            let wat = w.span().start;
            let w = w.into_inner();
            match (w.git, w.upload) {
                (Some(g), None) => {
                    if w.settle.is_some() {
                        return Err(err(wat, "settle is for upload watches; a git watch uses interval".into()));
                    }
                    let (url, branch) = match g.get_ref().rsplit_once('#') {
                        Some((u, b)) if !u.is_empty() && !b.is_empty() => (u.to_string(), b.to_string()),
                        _ => {
                            return Err(err(
                                g.span().start,
                                format!("watch git = {:?}: write \"URL#BRANCH\", e.g. \"/srv/app.git#main\"", g.get_ref()),
                            ))
                        }
                    };
                    let interval = match w.interval {
                        Some(i) if i.get_ref().0 < Duration::from_secs(1) => {
                            return Err(err(i.span().start, "watch interval must be at least 1s".into()))
                        }
                        Some(i) => i.into_inner().0,
                        None => DEFAULT_WATCH_INTERVAL,
                    };
                    let url = if url.contains("://") || url.contains(':') && !url.starts_with('/') && !url.starts_with('.') {
                        url
                    } else {
                        resolve(&url).display().to_string()
                    };
                    Some(Watch::Git { url, branch, interval })
                }
                (None, Some(u)) => {
                    if w.interval.is_some() {
                        return Err(err(wat, "interval is for git watches; an upload watch uses settle".into()));
                    }
                    Some(Watch::Upload {
                        dir: resolve(&u),
                        settle: w.settle.map_or(DEFAULT_WATCH_SETTLE, |s| s.0),
                    })
                }
                _ => {
                    return Err(err(
                        wat,
                        "a deploy watch needs exactly one of git = \"URL#BRANCH\" or upload = \"/folder\"".into(),
                    ))
                }
            }
        }
    };
    Ok(Parsed {
        config: DeployConfig {
            root,
            shared,
            build: raw
                .build
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.0)
                .collect(),
            migrate: raw
                .migrate
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.0)
                .collect(),
            build_timeout,
            keep_releases,
            watch,
        },
        only_root,
        at,
    })
}

/// Gives every program of a deploy group the group's settings: those of the
/// programs that set more than `root`, which must agree.
pub(super) fn merge_groups<E>(
    parsed: BTreeMap<String, Parsed>,
    err: &dyn Fn(&str, usize, String) -> E,
) -> Result<BTreeMap<String, DeployConfig>, E> {
    let mut settings: BTreeMap<PathBuf, (String, DeployConfig)> = BTreeMap::new();
    for (name, p) in &parsed {
        if p.only_root {
            continue;
        }
        if let Some((first, cfg)) = settings.get(&p.config.root) {
            if *cfg != p.config {
                return Err(err(
                    name,
                    p.at,
                    format!(
                        "programs {first:?} and {name:?} share deploy root {} but set different deploy settings: give them in one program (the others need only root) or make them equal",
                        p.config.root.display()
                    ),
                ));
            }
        } else {
            settings.insert(p.config.root.clone(), (name.clone(), p.config.clone()));
        }
    }
    Ok(parsed
        .into_iter()
        .map(|(name, p)| {
            let cfg = match settings.get(&p.config.root) {
                Some((_, c)) => c.clone(),
                None => p.config,
            };
            (name, cfg)
        })
        .collect())
}
