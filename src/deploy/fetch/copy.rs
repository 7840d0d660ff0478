//! Copying a folder into a release, and measuring a release.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::time::TimeSpec;

use super::dest::{Content, Dest};
use super::{FetchError, Filled};

/// Permission bits kept from the source: all but setuid, setgid and sticky.
const COPY_MODE_MASK: u32 = 0o777;

fn read_error(path: &Path) -> impl Fn(io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Read {
        path: path.clone(),
        source,
    }
}

/// Copies the tree under `src` into `dest`, an existing empty folder, under
/// the rules of the [module](super): without `.git`, symlinks kept as they
/// are, special files left out and counted. Returns what was written.
pub fn copy_dir(src: &Path, dest: &Path) -> Result<Filled, FetchError> {
    let mut out = Dest::open_empty(dest)?;
    let dest_id = out.id().map_err(|source| FetchError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    let mut filled = Filled::default();
    // Folders still to copy, relative to `src`; a stack, not recursion, so
    // a deep tree cannot overflow ours.
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = src.join(&rel);
        for item in fs::read_dir(&dir).map_err(read_error(&dir))? {
            let item = item.map_err(read_error(&dir))?;
            let name = item.file_name();
            if name == ".git" {
                continue;
            }
            let (from, to) = (item.path(), rel.join(&name));
            let meta = fs::symlink_metadata(&from).map_err(read_error(&from))?;
            let mode = meta.mode() & COPY_MODE_MASK;
            let kind = meta.file_type();
            if kind.is_dir() {
                if (meta.dev(), meta.ino()) == dest_id {
                    continue; // the release being filled lies inside the source
                }
                out.dir(&to, mode)?;
                todo.push(to);
            } else if kind.is_file() {
                let mut file = open_file(&from).map_err(read_error(&from))?;
                let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
                let from = Content {
                    reader: &mut file,
                    read_error: &read_error(&from),
                };
                filled.bytes += out.file(&to, mode, Some(mtime), from)?;
            } else if kind.is_symlink() {
                let target = fs::read_link(&from).map_err(read_error(&from))?;
                out.symlink(&to, &target)?;
            } else {
                filled.skipped += 1;
                continue;
            }
            filled.entries += 1;
        }
    }
    out.finish()?;
    Ok(filled)
}

/// Opens a source file seen as a regular file, refusing whatever replaced
/// it since (a symlink, or a fifo that would block the open).
fn open_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other(
            "it changed into something else than a file while being copied",
        ));
    }
    Ok(file)
}

/// Total size in bytes of the regular files under `path`, for `zdtctl
/// releases`. Symlinks are not followed (nor is `path` itself, when it is
/// one), a file with several hard links counts once, and what cannot be
/// read counts nothing.
pub fn tree_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut linked = HashSet::new();
    let mut todo = vec![path.to_path_buf()];
    while let Some(path) = todo.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(items) = fs::read_dir(&path) {
                todo.extend(items.flatten().map(|item| item.path()));
            }
        } else if meta.is_file() && (meta.nlink() == 1 || linked.insert((meta.dev(), meta.ino()))) {
            total += meta.len();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    fn write(path: &Path, content: &str, mode: u32) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn copies_modes_links_and_content_without_git() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (src, dest) = (tmp.path().join("src"), tmp.path().join("dest"));
        write(&src.join("bin/run"), "#!/bin/sh\n", 0o755);
        write(&src.join("app.js"), "hello", 0o640);
        write(&src.join("setuid"), "s", 0o4755);
        write(&src.join(".git/HEAD"), "ref", 0o644);
        write(&src.join("vendor/lib/.git/config"), "x", 0o644);
        write(&src.join("vendor/sub/.git"), "gitdir: ../x", 0o644); // a submodule's file
        write(&src.join("vendor/lib/a.php"), "<?php", 0o644);
        symlink("bin/run", src.join("start")).expect("symlink");
        symlink("/srv/shared/uploads", src.join("uploads")).expect("symlink");
        nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        fs::create_dir(&dest).expect("mkdir");

        let filled = copy_dir(&src, &dest).expect("copy");

        assert_eq!(filled.bytes, (10 + 5 + 1 + 5) as u64);
        assert_eq!(filled.skipped, 1, "the fifo");
        assert_eq!(
            fs::read_to_string(dest.join("vendor/lib/a.php")).expect("read"),
            "<?php"
        );
        assert_eq!(
            fs::read_to_string(dest.join("app.js")).expect("read"),
            "hello"
        );
        assert_eq!(mode(&dest.join("bin/run")), 0o755);
        assert_eq!(mode(&dest.join("app.js")), 0o640);
        assert_eq!(mode(&dest.join("setuid")), 0o755, "setuid dropped");
        assert_eq!(
            fs::read_link(dest.join("start")).expect("link"),
            Path::new("bin/run")
        );
        assert_eq!(
            fs::read_link(dest.join("uploads")).expect("link"),
            Path::new("/srv/shared/uploads")
        );
        for gone in [".git", "vendor/lib/.git", "vendor/sub/.git", "fifo"] {
            assert!(
                fs::symlink_metadata(dest.join(gone)).is_err(),
                "{gone} copied"
            );
        }
        let src_mtime = fs::metadata(src.join("app.js"))
            .expect("stat")
            .modified()
            .expect("mtime");
        assert_eq!(
            fs::metadata(dest.join("app.js"))
                .expect("stat")
                .modified()
                .expect("mtime"),
            src_mtime
        );
        assert_eq!(tree_size(&dest), filled.bytes);
    }

    #[test]
    fn leaves_out_a_release_inside_the_source() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(&tmp.path().join("app.js"), "x", 0o644);
        let dest = tmp.path().join("releases/1");
        fs::create_dir_all(&dest).expect("mkdir");
        copy_dir(tmp.path(), &dest).expect("copy");
        assert!(dest.join("app.js").exists());
        assert!(dest.join("releases").is_dir());
        assert!(!dest.join("releases/1").exists(), "copied into itself");
    }

    #[test]
    fn missing_source_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = copy_dir(&tmp.path().join("nope"), tmp.path()).expect_err("missing");
        let text = e.to_string();
        assert!(
            text.contains("nope") && text.contains("No such file"),
            "{text}"
        );
    }

    #[test]
    fn tree_size_counts_files_once_and_follows_no_link() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(&tmp.path().join("a/f"), "12345", 0o644);
        fs::hard_link(tmp.path().join("a/f"), tmp.path().join("a/g")).expect("link");
        let big = tempfile::tempdir().expect("tempdir");
        write(&big.path().join("big"), &"x".repeat(1000), 0o644);
        symlink(big.path(), tmp.path().join("elsewhere")).expect("symlink");
        assert_eq!(tree_size(tmp.path()), 5);
        assert_eq!(tree_size(&tmp.path().join("elsewhere")), 0);
        assert_eq!(tree_size(&tmp.path().join("missing")), 0);
    }
}
