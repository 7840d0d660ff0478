//! Writing into the release folder through its descriptor, never through a
//! symlink.
//!
//! Paths given to [`Dest`] are relative and already checked (no `..`, not
//! absolute). Each folder on the way is opened with
//! `O_DIRECTORY|O_NOFOLLOW` from its parent's descriptor, so a symlink in
//! the way (planted by an earlier archive entry, or by anyone) fails the
//! write instead of redirecting it. Files are created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`; a file or link already there is unlinked
//! first (`unlinkat` never follows). Folders are created private (0700) and
//! get their final mode in [`Dest::finish`], deepest first, so a read-only
//! folder of the archive can still be filled.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, futimens, mkdirat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{linkat, symlinkat, unlinkat, UnlinkatFlags};

use super::FetchError;

/// Mode of a folder created on the way to an entry (`mkdir -p`).
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// The release folder, open for writing.
pub(super) struct Dest {
    /// The release folder's path, for error messages.
    path: PathBuf,
    /// The release folder, opened once; every write starts from it.
    root: OwnedFd,
    /// Folders created, with the mode each gets in [`Dest::finish`].
    dir_modes: BTreeMap<PathBuf, u32>,
}

/// Where a file's content comes from, and what a read failure becomes.
pub(super) struct Content<'a> {
    pub reader: &'a mut dyn Read,
    pub read_error: &'a dyn Fn(io::Error) -> FetchError,
}

impl Dest {
    /// Opens `path`, which must be a real, empty folder (not a symlink).
    pub fn open_empty(path: &Path) -> Result<Self, FetchError> {
        let problem = |problem: String| FetchError::Dest {
            path: path.to_path_buf(),
            problem,
        };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(None, path, flags, Mode::empty()).map_err(|e| {
            problem(match e {
                Errno::ELOOP | Errno::ENOTDIR => "it is not a folder (or it is a symlink)".into(),
                e => io::Error::from(e).to_string(),
            })
        })?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut entries = std::fs::read_dir(path).map_err(|e| problem(e.to_string()))?;
        if entries.next().is_some() {
            return Err(problem("it is not empty".into()));
        }
        Ok(Dest {
            path: path.to_path_buf(),
            root,
            dir_modes: BTreeMap::new(),
        })
    }

    /// Device and inode of the release folder.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let meta = File::from(self.root.try_clone()?).metadata()?;
        Ok((meta.dev(), meta.ino()))
    }

    fn write_error(&self, rel: &Path) -> impl Fn(io::Error) -> FetchError {
        let path = self.path.join(rel);
        move |source| FetchError::Write {
            path: path.clone(),
            source,
        }
    }

    /// Creates folder `rel` (and any missing folder on the way); it gets
    /// `mode` in [`Dest::finish`]. An existing folder is kept.
    pub fn dir(&mut self, rel: &Path, mode: u32) -> Result<(), FetchError> {
        let err = self.write_error(rel);
        let (parent, name) = self.parent(rel).map_err(&err)?;
        match mkdirat(Some(raw(&self.root, &parent)), name, Mode::S_IRWXU) {
            Ok(()) => {}
            Err(Errno::EEXIST) if self.is_dir(&parent, name).map_err(&err)? => {}
            Err(e) => return Err(err(e.into())),
        }
        self.dir_modes.insert(rel.to_path_buf(), mode);
        Ok(())
    }

    /// Creates file `rel` with `mode` and the content of `from`; returns
    /// the bytes written.
    pub fn file(
        &mut self,
        rel: &Path,
        mode: u32,
        mtime: Option<TimeSpec>,
        from: Content<'_>,
    ) -> Result<u64, FetchError> {
        let err = self.write_error(rel);
        let (parent, name) = self.parent(rel).map_err(&err)?;
        let dir = raw(&self.root, &parent);
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = match openat(Some(dir), name, flags, Mode::S_IRUSR | Mode::S_IWUSR) {
            Err(Errno::EEXIST) => {
                // A later entry of the same name replaces a file or a link
                // (as tar does); a folder stays and fails the open below.
                if !self.is_dir(&parent, name).map_err(&err)? {
                    unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir)
                        .map_err(|e| err(e.into()))?;
                }
                openat(Some(dir), name, flags, Mode::S_IRUSR | Mode::S_IWUSR)
            }
            other => other,
        }
        .map_err(|e| err(e.into()))?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut buf = vec![0; 64 * 1024];
        let mut bytes = 0;
        loop {
            let n = match from.reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((from.read_error)(e)),
            };
            file.write_all(&buf[..n]).map_err(&err)?;
            bytes += n as u64;
        }
        fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(|e| err(e.into()))?;
        if let Some(mtime) = mtime {
            futimens(file.as_raw_fd(), &mtime, &mtime).map_err(|e| err(e.into()))?;
        }
        Ok(bytes)
    }

    /// Creates symlink `rel` pointing to `target`, stored as it is.
    pub fn symlink(&mut self, rel: &Path, target: &Path) -> Result<(), FetchError> {
        let err = self.write_error(rel);
        let (parent, name) = self.parent(rel).map_err(&err)?;
        symlinkat(target, Some(raw(&self.root, &parent)), name).map_err(|e| err(e.into()))
    }

    /// Creates `rel` as a hard link to `existing`, a file written before.
    pub fn hardlink(&mut self, rel: &Path, existing: &Path) -> Result<(), FetchError> {
        let err = self.write_error(rel);
        let (old_parent, old_name) = self.parent(existing).map_err(&err)?;
        let (new_parent, new_name) = self.parent(rel).map_err(&err)?;
        linkat(
            Some(raw(&self.root, &old_parent)),
            old_name,
            Some(raw(&self.root, &new_parent)),
            new_name,
            // No AT_SYMLINK_FOLLOW: a symlink is linked, never its target.
            AtFlags::empty(),
        )
        .map_err(|e| err(e.into()))
    }

    /// Gives every folder created its mode, deepest first.
    pub fn finish(mut self) -> Result<(), FetchError> {
        let mut dirs: Vec<_> = std::mem::take(&mut self.dir_modes).into_iter().collect();
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, mode) in dirs {
            let err = self.write_error(&rel);
            let fd = self.walk(&rel, false).map_err(&err)?;
            fchmod(raw(&self.root, &fd), Mode::from_bits_truncate(mode))
                .map_err(|e| err(e.into()))?;
        }
        Ok(())
    }

    /// Opens the folder that holds `rel` (creating missing folders on the
    /// way); `None` is the release folder itself.
    fn parent<'p>(&mut self, rel: &'p Path) -> io::Result<(Option<OwnedFd>, &'p OsStr)> {
        let name = rel
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty entry name"))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.walk(parent, true)?, name))
    }

    /// Opens folder `rel`, one component at a time, never following a
    /// symlink.
    fn walk(&mut self, rel: &Path, create: bool) -> io::Result<Option<OwnedFd>> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut current: Option<OwnedFd> = None;
        let mut sofar = PathBuf::new();
        for component in rel.components() {
            let Component::Normal(name) = component else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a plain relative path", rel.display()),
                ));
            };
            sofar.push(name);
            let dir = raw(&self.root, &current);
            let fd = match openat(Some(dir), name, flags, Mode::empty()) {
                Err(Errno::ENOENT) if create => {
                    match mkdirat(Some(dir), name, Mode::S_IRWXU) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.dir_modes
                        .entry(sofar.clone())
                        .or_insert(IMPLICIT_DIR_MODE);
                    openat(Some(dir), name, flags, Mode::empty())
                }
                other => other,
            };
            let fd = match fd {
                Ok(fd) => fd,
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(io::Error::other(format!(
                        "{} is a symlink or a file, not a folder; zdt does not write through it",
                        sofar.display()
                    )))
                }
                Err(e) => return Err(e.into()),
            };
            // SAFETY: openat returned a new descriptor that nothing else owns.
            current = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(current)
    }

    fn is_dir(&self, parent: &Option<OwnedFd>, name: &OsStr) -> io::Result<bool> {
        let stat = fstatat(
            Some(raw(&self.root, parent)),
            name,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        Ok(SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR)
    }
}

/// The descriptor of a folder from [`Dest::walk`]: `None` is the root.
fn raw(root: &OwnedFd, dir: &Option<OwnedFd>) -> RawFd {
    dir.as_ref().unwrap_or(root).as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn content(data: &[u8]) -> (std::io::Cursor<Vec<u8>>, impl Fn(io::Error) -> FetchError) {
        (std::io::Cursor::new(data.to_vec()), |source| {
            FetchError::Read {
                path: PathBuf::from("test"),
                source,
            }
        })
    }

    #[test]
    fn never_writes_through_a_symlink_in_the_way() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (dest_path, outside) = (tmp.path().join("dest"), tmp.path().join("outside"));
        std::fs::create_dir(&dest_path).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        let mut dest = Dest::open_empty(&dest_path).expect("empty");
        // What an archive's `l -> ../outside`, then `l/x`, would leave if
        // the checks before writing missed it.
        dest.symlink(Path::new("l"), &outside).expect("symlink");
        let (mut data, read_error) = content(b"x");
        let from = Content {
            reader: &mut data,
            read_error: &read_error,
        };
        let e = dest
            .file(Path::new("l/x"), 0o644, None, from)
            .expect_err("written through l");
        assert!(e.to_string().contains("l is a symlink or a file"), "{e}");
        assert!(dest.dir(Path::new("l/sub"), 0o755).is_err());
        // Replacing the link itself is fine: it is unlinked, never followed.
        let (mut data, read_error) = content(b"y");
        let from = Content {
            reader: &mut data,
            read_error: &read_error,
        };
        dest.file(Path::new("l"), 0o644, None, from)
            .expect("replace link");
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
    }

    #[test]
    fn read_only_folders_are_filled_then_locked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut dest = Dest::open_empty(tmp.path()).expect("empty");
        dest.dir(Path::new("ro"), 0o555).expect("dir");
        let (mut data, read_error) = content(b"hello");
        let from = Content {
            reader: &mut data,
            read_error: &read_error,
        };
        let n = dest
            .file(Path::new("ro/deep/f"), 0o750, None, from)
            .expect("file");
        assert_eq!(n, 5);
        dest.finish().expect("finish");
        let mode = |p: &str| {
            std::fs::symlink_metadata(tmp.path().join(p))
                .expect("stat")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(
            (mode("ro"), mode("ro/deep"), mode("ro/deep/f")),
            (0o555, 0o755, 0o750)
        );
        // Let tempdir clean up.
        std::fs::set_permissions(
            tmp.path().join("ro"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
    }

    #[test]
    fn refuses_a_folder_that_is_not_empty_or_not_a_folder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("f"), "x").expect("write");
        let e = Dest::open_empty(tmp.path()).err().expect("not empty");
        assert!(e.to_string().ends_with("it is not empty"), "{e}");
        let e = Dest::open_empty(&tmp.path().join("f"))
            .err()
            .expect("a file");
        assert!(e.to_string().contains("not a folder"), "{e}");
        let e = Dest::open_empty(&tmp.path().join("missing"))
            .err()
            .expect("missing");
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
