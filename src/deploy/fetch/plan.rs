//! The first pass over an archive: every entry checked, nothing written.
//!
//! [`Planner::add`] takes the entries in archive order and checks each one
//! alone (bounds, absolute names, `..`); [`Planner::finish`] checks them
//! together (one top folder to strip, symlinks resolved through each other,
//! entries that go through a symlink, hard link targets) and returns the
//! [`Plan`] the second pass follows.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::FetchError;

/// Symlinks followed while resolving one target (Linux's limit).
const MAX_LINK_DEPTH: u32 = 40;

/// An entry as its header describes it.
#[derive(Clone)]
pub(super) enum RawKind {
    Dir,
    File,
    /// A symlink, with its target as stored.
    Symlink(Vec<u8>),
    /// A hard link, with the archive path of the file it names.
    Hardlink(Vec<u8>),
    /// A socket, fifo or device: left out and counted.
    Special,
    /// A header that describes other entries (pax, GNU long names).
    Ignore,
}

/// What the second pass does for one entry; paths are relative to the
/// release folder.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    Dir(PathBuf),
    File(PathBuf),
    Symlink(PathBuf, PathBuf),
    /// A new path, and the file written before that it links to.
    Hardlink(PathBuf, PathBuf),
}

/// The checked archive.
pub(super) struct Plan {
    /// One per archive entry, in archive order; `None` for what is not
    /// written (special files, pax headers, the stripped top folder).
    pub steps: Vec<Option<Step>>,
    /// Special files left out.
    pub skipped: u64,
}

enum Kind {
    Dir,
    File,
    Symlink(PathBuf),
    Hardlink(Vec<OsString>),
}

struct Entry {
    /// The name as stored, for messages.
    name: String,
    /// Its normal components (no `.`, no `..`, none empty).
    path: Vec<OsString>,
    kind: Kind,
}

pub(super) struct Planner {
    archive: PathBuf,
    max_entries: u64,
    max_path: usize,
    entries: Vec<Option<Entry>>,
    skipped: u64,
}

impl Planner {
    pub fn new(archive: &Path, max_entries: u64, max_path: usize) -> Self {
        Planner {
            archive: archive.to_path_buf(),
            max_entries,
            max_path,
            entries: Vec::new(),
            skipped: 0,
        }
    }

    fn refuse(&self, name: &str, problem: String) -> FetchError {
        FetchError::Unsafe {
            archive: self.archive.clone(),
            entry: name.to_string(),
            problem,
        }
    }

    fn check_len(&self, name: &str, what: &str, bytes: &[u8]) -> Result<(), FetchError> {
        if bytes.len() <= self.max_path {
            return Ok(());
        }
        let start: String = name.chars().take(60).collect();
        Err(FetchError::TooBig {
            archive: self.archive.clone(),
            problem: format!(
                "entry {start:?}… has a {what} of {} bytes (at most {} allowed)",
                bytes.len(),
                self.max_path
            ),
        })
    }

    /// Checks the next entry of the archive on its own.
    pub fn add(&mut self, raw_name: &[u8], kind: RawKind) -> Result<(), FetchError> {
        if self.entries.len() as u64 >= self.max_entries {
            return Err(FetchError::TooBig {
                archive: self.archive.clone(),
                problem: format!("it has more than {} entries", self.max_entries),
            });
        }
        let name = String::from_utf8_lossy(raw_name).into_owned();
        if matches!(kind, RawKind::Ignore) {
            self.entries.push(None);
            return Ok(());
        }
        self.check_len(&name, "name", raw_name)?;
        let path = normalize(raw_name).map_err(|p| self.refuse(&name, p.to_string()))?;
        let kind = match kind {
            RawKind::Ignore => unreachable!("handled above"),
            RawKind::Special => {
                self.skipped += 1;
                self.entries.push(None);
                return Ok(());
            }
            RawKind::Dir => Kind::Dir,
            RawKind::File => Kind::File,
            RawKind::Symlink(target) => {
                self.check_len(&name, "symlink target", &target)?;
                let shown = String::from_utf8_lossy(&target);
                if target.is_empty() || target.contains(&0) {
                    return Err(
                        self.refuse(&name, format!("is a symlink to {shown:?}, not a path"))
                    );
                }
                if target.starts_with(b"/") {
                    return Err(self.refuse(
                        &name,
                        format!("is a symlink to {shown:?}, an absolute path; links must stay inside the release"),
                    ));
                }
                Kind::Symlink(PathBuf::from(OsStr::from_bytes(&target)))
            }
            RawKind::Hardlink(target) => {
                self.check_len(&name, "hard link target", &target)?;
                let shown = String::from_utf8_lossy(&target);
                let target = normalize(&target).map_err(|p| {
                    self.refuse(&name, format!("is a hard link to {shown:?}, which {p}"))
                })?;
                Kind::Hardlink(target)
            }
        };
        if path.is_empty() && !matches!(kind, Kind::Dir) {
            return Err(self.refuse(&name, "has no name".into()));
        }
        // `./`: the release folder itself.
        let entry = (!path.is_empty()).then_some(Entry { name, path, kind });
        self.entries.push(entry);
        Ok(())
    }

    /// Checks the entries together and says what to write.
    pub fn finish(mut self) -> Result<Plan, FetchError> {
        self.strip_top_folder();
        let mut links: HashMap<PathBuf, PathBuf> = HashMap::new();
        let mut seen: HashMap<PathBuf, bool> = HashMap::new();
        let mut files: HashSet<PathBuf> = HashSet::new();
        for entry in self.entries.iter().flatten() {
            let path: PathBuf = entry.path.iter().collect();
            let is_link = matches!(entry.kind, Kind::Symlink(_));
            if let Some(was_link) = seen.insert(path.clone(), is_link) {
                if was_link || is_link {
                    return Err(self.refuse(&entry.name, "appears twice, once as a symlink".into()));
                }
            }
            match &entry.kind {
                Kind::Symlink(target) => {
                    links.insert(path, target.clone());
                }
                Kind::File => {
                    files.insert(path);
                }
                Kind::Hardlink(target) if !files.contains(&target.iter().collect::<PathBuf>()) => {
                    let target: PathBuf = target.iter().collect();
                    return Err(self.refuse(
                        &entry.name,
                        format!("is a hard link to {target:?}, which is not a file earlier in the archive"),
                    ));
                }
                Kind::Hardlink(_) | Kind::Dir => {}
            }
        }
        let mut steps = Vec::with_capacity(self.entries.len());
        for entry in &self.entries {
            let Some(entry) = entry else {
                steps.push(None);
                continue;
            };
            through_link(&links, &entry.path).map_err(|p| self.refuse(&entry.name, p))?;
            let path: PathBuf = entry.path.iter().collect();
            steps.push(Some(match &entry.kind {
                Kind::Dir => Step::Dir(path),
                Kind::File => Step::File(path),
                Kind::Symlink(target) => {
                    let parent = &entry.path[..entry.path.len() - 1];
                    resolve(&links, parent, target, 0).map_err(|p| {
                        self.refuse(
                            &entry.name,
                            format!("is a symlink to {target:?}, which {p}"),
                        )
                    })?;
                    Step::Symlink(path, target.clone())
                }
                Kind::Hardlink(target) => {
                    through_link(&links, target).map_err(|p| self.refuse(&entry.name, p))?;
                    Step::Hardlink(path, target.iter().collect())
                }
            }));
        }
        Ok(Plan {
            steps,
            skipped: self.skipped,
        })
    }

    /// When every entry lies in one top-level folder, drops that folder
    /// from every path (and hard link target).
    fn strip_top_folder(&mut self) {
        let mut named = self.entries.iter().flatten();
        let Some(top) = named.next().map(|e| e.path[0].clone()) else {
            return;
        };
        let inside =
            |e: &Entry| e.path[0] == top && (e.path.len() > 1 || matches!(e.kind, Kind::Dir));
        if !self.entries.iter().flatten().all(inside) {
            return;
        }
        for slot in &mut self.entries {
            let Some(entry) = slot else { continue };
            entry.path.remove(0);
            if let Kind::Hardlink(target) = &mut entry.kind {
                if target.first() == Some(&top) {
                    target.remove(0);
                }
            }
            if entry.path.is_empty() {
                *slot = None;
            }
        }
    }
}

/// The normal components of an entry name; refuses absolute names and `..`.
fn normalize(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.contains(&0) {
        return Err("has a NUL byte in its name");
    }
    if raw.starts_with(b"/") {
        return Err("is an absolute path");
    }
    let mut parts = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("has a '..' component"),
            part => parts.push(OsStr::from_bytes(part).to_os_string()),
        }
    }
    Ok(parts)
}

/// Refuses a path whose folders include a symlink of the archive.
fn through_link(links: &HashMap<PathBuf, PathBuf>, path: &[OsString]) -> Result<(), String> {
    let mut prefix = PathBuf::new();
    for part in &path[..path.len().saturating_sub(1)] {
        prefix.push(part);
        if links.contains_key(&prefix) {
            return Err(format!("goes through {prefix:?}, a symlink of the archive"));
        }
    }
    Ok(())
}

/// Where a symlink in folder `parent` pointing to `target` leads, resolved
/// as the kernel will once every symlink of the archive exists. Fails when
/// it leaves the release folder.
fn resolve(
    links: &HashMap<PathBuf, PathBuf>,
    parent: &[OsString],
    target: &Path,
    depth: u32,
) -> Result<Vec<OsString>, String> {
    if depth > MAX_LINK_DEPTH {
        return Err("goes through too many symlinks".into());
    }
    let mut at = parent.to_vec();
    for component in target.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if at.pop().is_none() {
                    return Err("resolves outside the release folder".into());
                }
            }
            Component::Normal(name) => {
                at.push(name.to_os_string());
                if let Some(next) = links.get(&at.iter().collect::<PathBuf>()) {
                    at.pop();
                    at = resolve(links, &at, next, depth + 1)?;
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("resolves to an absolute path".into());
            }
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(entries: &[(&str, RawKind)]) -> Result<Vec<Option<Step>>, String> {
        let mut planner = Planner::new(Path::new("a.tar"), 100, 64);
        for (name, kind) in entries {
            planner
                .add(name.as_bytes(), kind.clone())
                .map_err(|e| e.to_string())?;
        }
        planner.finish().map(|p| p.steps).map_err(|e| e.to_string())
    }

    fn link(target: &str) -> RawKind {
        RawKind::Symlink(target.as_bytes().to_vec())
    }

    #[test]
    fn symlinks_are_resolved_through_each_other() {
        // `b -> a/..` looks harmless, but `a -> .` makes it `./..`.
        let e = plan(&[("a", link(".")), ("b", link("a/.."))]).expect_err("escapes");
        assert!(
            e.contains("entry \"b\" is a symlink to \"a/..\", which resolves outside"),
            "{e}"
        );
        let e = plan(&[("a", link("b")), ("b", link("a"))]).expect_err("loop");
        assert!(e.contains("too many symlinks"), "{e}");
        let ok = plan(&[
            ("x/bin/tool", link("../../lib/tool")),
            ("lib/tool", RawKind::File),
        ]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn top_folder_stripped_only_when_alone() {
        let steps = plan(&[
            ("app/", RawKind::Dir),
            ("app/a", RawKind::File),
            ("app/h", RawKind::Hardlink(b"app/a".to_vec())),
        ])
        .expect("plan");
        assert_eq!(
            steps,
            vec![
                None,
                Some(Step::File("a".into())),
                Some(Step::Hardlink("h".into(), "a".into()))
            ]
        );
        let steps = plan(&[("app/a", RawKind::File), ("b", RawKind::File)]).expect("plan");
        assert_eq!(steps[0], Some(Step::File("app/a".into())));
        // A lone file is not a folder.
        assert_eq!(
            plan(&[("app", RawKind::File)]).expect("plan")[0],
            Some(Step::File("app".into()))
        );
        // `./app/…` is one top folder too.
        assert_eq!(
            plan(&[("./app/a", RawKind::File)]).expect("plan")[0],
            Some(Step::File("a".into()))
        );
    }

    #[test]
    fn bounds() {
        let mut planner = Planner::new(Path::new("big.tar"), 3, 64);
        for name in ["a", "b", "c"] {
            planner
                .add(name.as_bytes(), RawKind::File)
                .expect("within bounds");
        }
        let e = planner.add(b"d", RawKind::File).expect_err("fourth entry");
        assert_eq!(
            e.to_string(),
            "refusing archive big.tar: it has more than 3 entries"
        );
        let mut planner = Planner::new(Path::new("big.tar"), 3, 64);
        let e = planner
            .add(&[b'x'; 65], RawKind::File)
            .expect_err("long name");
        assert!(
            e.to_string()
                .contains("has a name of 65 bytes (at most 64 allowed)"),
            "{e}"
        );
        let e = planner
            .add(b"l", RawKind::Symlink(vec![b'x'; 65]))
            .expect_err("long target");
        assert!(e.to_string().contains("symlink target of 65 bytes"), "{e}");
    }

    #[test]
    fn duplicates_and_hard_links() {
        let e = plan(&[("a", RawKind::File), ("a", link("b"))]).expect_err("dup");
        assert!(e.contains("appears twice, once as a symlink"), "{e}");
        assert!(plan(&[("a", RawKind::File), ("a", RawKind::File)]).is_ok());
        let e = plan(&[
            ("h", RawKind::Hardlink(b"f".to_vec())),
            ("f", RawKind::File),
        ])
        .expect_err("later");
        assert!(
            e.contains("is a hard link to \"f\", which is not a file earlier"),
            "{e}"
        );
        let e = plan(&[
            ("d/", RawKind::Dir),
            ("h", RawKind::Hardlink(b"d".to_vec())),
        ])
        .expect_err("dir");
        assert!(e.contains("not a file earlier"), "{e}");
    }
}
