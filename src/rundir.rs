//! Paths zdt creates, made safe against other local users.
//!
//! zdt usually runs as root, so a path another user can influence is a way to
//! root: a configuration planted in a runtime folder runs its command as root
//! at the next reload; a symlink planted where the pidfile goes truncates the
//! file it points to; a socket renamed under zdt's feet gets its `chmod` and
//! `chown` applied to whatever replaced it. Every place that creates a path
//! goes through this module, with these rules:
//!
//! - **Private folder** ([`private_dir`], `zdt run`'s runtime folder): created
//!   with mode 0700. If it exists already, it is used only when it is a real
//!   folder (checked with `lstat`: a symlink is refused), owned by zdt's
//!   effective uid, with no permission bit for group or others. Anything else
//!   is refused with an error naming the path and what is wrong: another user
//!   may have made it beforehand.
//! - **Trusted folder** ([`trusted_dir`], [`check_existing`]: the folders of
//!   the control socket, the pidfile, unix listen sockets, `log_dir`): every
//!   folder on the way from `/` must be owned by root or by zdt's user, and
//!   must not be writable by group or others unless it is sticky (like
//!   `/tmp`: there nobody else can remove or rename what zdt put in it). A
//!   symlink on the way is followed only when root or zdt's user owns it.
//!   Missing folders are created (mode 0755), each only once its parent
//!   passed.
//! - **Socket files in other folders** ([`set_socket_file`], unix `listen`
//!   sockets, whose folder often belongs to the service user, e.g.
//!   `/run/php` owned by www-data): their mode and owner are set through a
//!   descriptor opened with `O_PATH|O_NOFOLLOW` and checked to be the socket
//!   zdt just bound, never by path, so a symlink swapped in cannot redirect
//!   a `chmod`/`chown` done as root.
//! - **Files** ([`write_new`]) are created with `O_CREAT|O_EXCL|O_NOFOLLOW` after
//!   a stale entry is removed (`unlink` never follows a symlink), in a
//!   trusted folder, so nothing planted there is ever written through.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a path was not used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The path, or a folder on the way to it, could be changed by another
    /// user.
    #[error("refusing to use {path}: {problem}")]
    Unsafe {
        /// The path zdt was asked to use.
        path: PathBuf,
        /// What is wrong, naming the offending folder or link.
        problem: String,
    },
    /// Creating or inspecting the path failed.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<PathError> for std::io::Error {
    fn from(e: PathError) -> Self {
        std::io::Error::other(e)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PathError + '_ {
    move |source| PathError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// At most this many symlinks are followed on one path (Linux's limit).
const MAX_LINKS: u32 = 40;

/// Checks that the existing folder `path` and every folder on the way to it
/// can be changed only by root or zdt's user (see the module doc).
fn check_chain(path: &Path) -> Result<(), PathError> {
    walk_chain(path, true)
}

/// Walks `path` from `/`, resolving every symlink on the way; a symlink is
/// followed only when root or zdt's user owns it. With `folders`, every
/// folder must also be trusted ([`check_folder`]).
fn walk_chain(path: &Path, folders: bool) -> Result<(), PathError> {
    let unsafe_path = |problem: String| PathError::Unsafe {
        path: path.to_path_buf(),
        problem,
    };
    let abs = std::path::absolute(path).map_err(io_err(path))?;
    let me = euid();
    // Components still to walk, the next one last.
    let mut todo: Vec<OsString> = Vec::new();
    let push = |todo: &mut Vec<OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::Normal(n) => todo.push(n.to_os_string()),
                Component::ParentDir => todo.push("..".into()),
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
    };
    push(&mut todo, &abs);
    let mut cur = PathBuf::from("/");
    let meta = std::fs::metadata(&cur).map_err(io_err(path))?;
    if folders {
        check_folder(&cur, &meta, me).map_err(unsafe_path)?;
    }
    let mut links = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            // `cur` has no symlink in it, so its parent is the real one.
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        let meta = std::fs::symlink_metadata(&next).map_err(io_err(path))?;
        if meta.file_type().is_symlink() {
            let owner = meta.uid();
            if owner != 0 && owner != me {
                return Err(unsafe_path(format!(
                    "{} is a symbolic link owned by {}, not by root or zdt's user ({})",
                    next.display(),
                    user_name(owner),
                    user_name(me)
                )));
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(unsafe_path("too many levels of symbolic links".into()));
            }
            let target = std::fs::read_link(&next).map_err(io_err(path))?;
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            push(&mut todo, &target);
            continue;
        }
        if !meta.is_dir() {
            return Err(unsafe_path(format!("{} is not a folder", next.display())));
        }
        if folders {
            check_folder(&next, &meta, me).map_err(unsafe_path)?;
        }
        cur = next;
    }
    Ok(())
}

/// One folder on the way: owned by root or us; writable by nobody else
/// unless sticky.
fn check_folder(dir: &Path, meta: &std::fs::Metadata, me: u32) -> Result<(), String> {
    let owner = meta.uid();
    if owner != 0 && owner != me {
        return Err(format!(
            "{} is owned by {}, not by root or zdt's user ({})",
            dir.display(),
            user_name(owner),
            user_name(me)
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(format!(
            "{} is writable by {} (mode {mode:04o}) and not sticky, so another user \
             could replace what zdt puts there; remove that write permission \
             (chmod go-w) or choose another folder",
            dir.display(),
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
        ));
    }
    Ok(())
}

/// "uid 65534 (nobody)".
fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Creates zdt's private folder `path` with mode 0700, or checks the one
/// that exists: a real folder (not a symlink), owned by zdt's user, no
/// permission for group or others. Its parent must be a trusted folder.
pub fn private_dir(path: &Path) -> Result<(), PathError> {
    let unsafe_path = |problem: String| PathError::Unsafe {
        path: path.to_path_buf(),
        problem: format!(
            "{problem}. Another user may have created it to plant files zdt would \
             trust; check who made it, remove it, and start again"
        ),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_chain(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_path("it is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_path("it is not a folder".into()));
    }
    let me = euid();
    if meta.uid() != me {
        return Err(unsafe_path(format!(
            "it is owned by {}, not by zdt's user ({})",
            user_name(meta.uid()),
            user_name(me)
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(unsafe_path(format!(
            "its mode is {mode:04o}; it must be 0700 (no access for group or others)"
        )));
    }
    Ok(())
}

/// Makes sure the folder `path` exists and is trusted (see the module doc):
/// checks the folders that exist, then creates the missing ones (mode 0755)
/// and checks again.
pub fn trusted_dir(path: &Path) -> Result<(), PathError> {
    let abs = std::path::absolute(path).map_err(io_err(path))?;
    let existing = check_existing(&abs)?;
    let missing: Vec<&Path> = abs
        .ancestors()
        .take_while(|a| *a != existing.as_path())
        .collect();
    for dir in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    if !missing.is_empty() {
        check_chain(&abs)?;
    }
    Ok(())
}

/// For files zdt opens in folders that may belong to a service's user (log
/// files): the folder of `path`, as far as it exists, is reached through no
/// symlink other than root's or zdt's user's. The folders themselves are not
/// checked; the file is opened with `O_NOFOLLOW`.
pub fn check_links(path: &Path) -> Result<(), PathError> {
    let abs = std::path::absolute(path).map_err(io_err(path))?;
    let mut existing = abs.parent().unwrap_or(Path::new("/"));
    while std::fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    walk_chain(existing, false)
}

/// Checks the deepest existing ancestor of `path` (itself, if it exists)
/// like [`trusted_dir`], creating nothing; returns that ancestor. For
/// folders something else creates later (`log_dir`).
pub fn check_existing(path: &Path) -> Result<PathBuf, PathError> {
    let abs = std::path::absolute(path).map_err(io_err(path))?;
    let mut existing = abs.as_path();
    loop {
        match std::fs::symlink_metadata(existing) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match existing.parent() {
                Some(p) => existing = p,
                None => break,
            },
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    check_chain(existing).map_err(|e| match e {
        PathError::Unsafe { problem, .. } => PathError::Unsafe {
            path: path.to_path_buf(),
            problem,
        },
        other => other,
    })?;
    Ok(existing.to_path_buf())
}

/// Writes `contents` to a new file `path` with `mode`, in a trusted folder
/// (created if missing): a stale entry at `path` is removed first, and the
/// file is opened with `O_EXCL|O_NOFOLLOW`, so a symlink or hard link planted
/// there is never written through.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PathError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        trusted_dir(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(contents).map_err(io_err(path))?;
    Ok(())
}

/// Sets the mode (and owner) of the socket file zdt just bound at `path`,
/// through a descriptor: the path must name a socket owned by zdt's user,
/// not a symlink (see the module doc).
pub fn set_socket_file(
    path: &Path,
    mode: u32,
    owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_socket() || meta.uid() != euid() {
        return Err(std::io::Error::other(format!(
            "{} was replaced by something else than the socket zdt bound \
             (is another user writing to its folder?)",
            path.display()
        )));
    }
    // An O_PATH descriptor cannot be fchmod'ed; its /proc link reaches the
    // very inode it holds, whatever now sits at `path`.
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    std::fs::set_permissions(&by_fd, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchownat(
            Some(file.as_raw_fd()),
            "",
            Some(uid),
            Some(gid),
            nix::fcntl::AtFlags::AT_EMPTY_PATH,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn private_dir_is_created_0700_and_reused() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("zdt");
        private_dir(&p).expect("create");
        let meta = std::fs::symlink_metadata(&p).expect("meta");
        assert_eq!(meta.mode() & 0o7777, 0o700);
        private_dir(&p).expect("reuse");
    }

    #[test]
    fn private_dir_with_group_or_other_bits_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("zdt");
        std::fs::create_dir(&p).expect("mkdir");
        chmod(&p, 0o750);
        let e = private_dir(&p).expect_err("refused").to_string();
        assert!(e.contains("mode is 0750"), "{e}");
        assert!(e.contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn private_dir_that_is_a_symlink_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let real = t.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        chmod(&real, 0o700);
        let p = t.path().join("zdt");
        std::os::unix::fs::symlink(&real, &p).expect("symlink");
        let e = private_dir(&p).expect_err("refused").to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_world_writable_folder_on_the_way_is_refused_unless_sticky() {
        let t = tempfile::tempdir().expect("tempdir");
        let open = t.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        chmod(&open, 0o777);
        let e = trusted_dir(&open.join("run")).expect_err("refused");
        assert!(e.to_string().contains("writable by everyone"), "{e}");
        assert!(!open.join("run").exists(), "created under an unsafe folder");
        chmod(&open, 0o1777);
        trusted_dir(&open.join("run")).expect("sticky is fine");
        assert!(open.join("run").is_dir());
    }

    #[test]
    fn write_new_replaces_a_planted_symlink_without_following_it() {
        let t = tempfile::tempdir().expect("tempdir");
        let victim = t.path().join("victim");
        std::fs::write(&victim, "precious").expect("write");
        let p = t.path().join("zdt.pid");
        std::os::unix::fs::symlink(&victim, &p).expect("symlink");
        write_new(&p, b"42\n", 0o644).expect("write");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "42\n");
        assert!(!std::fs::symlink_metadata(&p)
            .expect("meta")
            .file_type()
            .is_symlink());
    }
}
