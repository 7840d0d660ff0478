//! Filling a fresh release folder from a source: a folder, an archive, or
//! (parsed only) a git repository.
//!
//! Everything here is blocking and starts no process: zdt reaps every child
//! with `waitpid(-1)`, so `std::process` has no place in the daemon. Git
//! sources are only parsed ([`parse_source`]); the deploy runs git through
//! zdt's spawner.
//!
//! # Rules
//!
//! The release folder (`dest`) must exist and be empty. On error it may hold
//! part of the tree; the caller removes it. Nothing is ever written outside
//! it:
//!
//! - **Every write goes through `dest`'s descriptor** (`dest.rs`): each
//!   folder on the way is opened with `O_NOFOLLOW|O_DIRECTORY`, files are
//!   created with `O_EXCL|O_NOFOLLOW`, links with `symlinkat`/`linkat`. A
//!   symlink written by an earlier entry is never followed by a later one,
//!   whatever the checks below missed.
//! - **Archives are checked whole before anything is written**
//!   ([`unpack`], in two passes). The whole archive is refused, naming the
//!   entry, when an entry name is absolute or has a `..` component; when a
//!   symlink points to an absolute path or resolves outside `dest` (resolved
//!   the way the kernel will, through the archive's other symlinks); when an
//!   entry goes through a symlink of the archive (`l -> sub`, then `l/x`);
//!   when a hard link does not name a regular file earlier in the archive;
//!   when a path appears twice and one of them is a symlink.
//! - **Bounds**: at most [`MAX_ENTRIES`] entries, names and link targets of
//!   at most [`MAX_PATH`] bytes.
//! - **One top folder is stripped**: when every entry of an archive lies in
//!   one top-level folder (`app-1.2/…`, what `tar czf app.tgz app/` and
//!   GitHub's tarballs make), its content goes to `dest` directly. Any other
//!   layout is kept as it is.
//! - **Modes**: permission bits are kept, exec bits included; setuid, setgid
//!   and sticky bits are dropped (zdt usually runs as root). Archives also
//!   lose group and other write. Owners (uid/gid) are ignored: the files
//!   belong to zdt's user. Folder modes are applied last, so a read-only
//!   folder can still be filled. Modification times are kept for files copied from a folder
//!   or a tar; zip entries get the time of
//!   unpacking (a zip's DOS time has no time zone).
//! - **Special files** (sockets, fifos, devices) are left out and counted in
//!   [`Filled::skipped`].
//! - **Folder copies** ([`copy_dir`]) leave out `.git` (folder or file) at any
//!   depth, keep symlinks as symlinks, and copy their target as it is even
//!   when it points outside the copied tree: the folder is the operator's
//!   own, and a link to `/srv/app/shared/uploads` is often the point. Hard
//!   links become separate files. If `dest` lies inside the source, it is
//!   left out of the copy.

mod copy;
mod dest;
mod plan;
mod unpack;

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use copy::{copy_dir, tree_size};
pub use unpack::unpack;

/// Most entries an archive may have.
pub const MAX_ENTRIES: u64 = 1_000_000;
/// Longest entry name or link target in an archive, in bytes (Linux's
/// `PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// Where a release comes from (parsed from `--from`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A folder on this machine, copied without its `.git`.
    Dir(PathBuf),
    /// An archive file on this machine.
    Archive {
        /// Absolute (or base-relative) path of the archive.
        path: PathBuf,
        /// Its format, from its name (and checked against its content).
        kind: ArchiveKind,
    },
    /// A git repository; cloned by the deploy through zdt's spawner.
    Git {
        /// A URL (`https://`, `ssh://`, `git://`, `file://`), an scp-like
        /// `user@host:path`, or an absolute local path.
        url: String,
        /// Branch, tag or commit; `HEAD` when the source names none.
        reference: String,
    },
}

/// Archive formats [`unpack`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveKind {
    /// `.tar`
    Tar,
    /// `.tar.gz`, `.tgz`
    TarGz,
    /// `.zip` (stored or deflated entries)
    Zip,
}

impl fmt::Display for ArchiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArchiveKind::Tar => "tar",
            ArchiveKind::TarGz => "gzip-compressed tar",
            ArchiveKind::Zip => "zip",
        })
    }
}

/// What a fill did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    /// Bytes of file content written.
    pub bytes: u64,
    /// Files, folders and links created.
    pub entries: u64,
    /// Sockets, fifos and devices left out.
    pub skipped: u64,
}

/// Why a release folder could not be filled. Every message names the path
/// or archive entry, and the OS error when there is one.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A source path, or something under it, could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The source exists but is no folder and no known archive.
    #[error("{path} is neither a folder nor an archive: {problem}")]
    NotASource {
        /// The path.
        path: PathBuf,
        /// What it is, and what to do.
        problem: String,
    },
    /// The archive's content does not match its name.
    #[error("{path} is named like a {expected} archive, but {found}")]
    Misnamed {
        /// The archive.
        path: PathBuf,
        /// The format its name announces.
        expected: ArchiveKind,
        /// What its first bytes look like.
        found: String,
    },
    /// A `git+` source that cannot be used.
    #[error(
        "bad git source {source_text:?}: {problem} \
         (expected git+URL#REF, e.g. git+https://host/app.git#main, git+/srv/app.git#v1.2)"
    )]
    Git {
        /// The source as given.
        source_text: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The release folder is missing, not a folder, or not empty.
    #[error("cannot fill release folder {path}: {problem}")]
    Dest {
        /// The release folder.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Writing into the release folder failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The path being written.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The archive itself could not be read or decoded.
    #[error("cannot read archive {archive}: {source}")]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// The OS or format error.
        source: io::Error,
    },
    /// One entry's content could not be read (corrupt data, bad checksum,
    /// unsupported compression).
    #[error("cannot read entry {entry:?} of archive {archive}: {source}")]
    Entry {
        /// The archive.
        archive: PathBuf,
        /// The entry's name as stored.
        entry: String,
        /// The OS or format error.
        source: io::Error,
    },
    /// An entry that would write outside the release folder or through a
    /// link; nothing of the archive was written.
    #[error("refusing archive {archive}: entry {entry:?} {problem}")]
    Unsafe {
        /// The archive.
        archive: PathBuf,
        /// The entry's name as stored.
        entry: String,
        /// What it does wrong.
        problem: String,
    },
    /// The archive exceeds a bound ([`MAX_ENTRIES`], [`MAX_PATH`]).
    #[error("refusing archive {archive}: {problem}")]
    TooBig {
        /// The archive.
        archive: PathBuf,
        /// Which bound, and by how much.
        problem: String,
    },
}

/// Parses SRC, as given to `zdtctl deploy --from SRC`.
///
/// - `git+URL#REF` → [`Source::Git`]; `REF` defaults to `HEAD`. A relative
///   local path in `URL` is resolved against `base`.
/// - An existing folder → [`Source::Dir`].
/// - A file named `*.tar`, `*.tar.gz`, `*.tgz` or `*.zip` (any case) →
///   [`Source::Archive`], after checking that its first bytes match the name.
///
/// Relative paths are resolved against `base`, the client's working folder.
pub fn parse_source(src: &str, base: &Path) -> Result<Source, FetchError> {
    if let Some(rest) = src.strip_prefix("git+") {
        return parse_git(src, rest, base);
    }
    let path = base.join(src);
    let meta = std::fs::metadata(&path).map_err(|source| FetchError::Read {
        path: path.clone(),
        source,
    })?;
    if meta.is_dir() {
        return Ok(Source::Dir(path));
    }
    let head = read_head(&path)?;
    let Some(kind) = kind_by_name(&path) else {
        let problem = match sniff(&head) {
            Some(kind) => format!(
                "its content looks like a {kind} archive; name it {}",
                suffix(kind)
            ),
            None => format!(
                "{} (archives must be named .tar, .tar.gz, .tgz or .zip)",
                describe(&head)
            ),
        };
        return Err(FetchError::NotASource { path, problem });
    };
    check_kind(&path, kind, &head)?;
    Ok(Source::Archive { path, kind })
}

fn parse_git(src: &str, rest: &str, base: &Path) -> Result<Source, FetchError> {
    let bad = |problem: &str| FetchError::Git {
        source_text: src.to_string(),
        problem: problem.to_string(),
    };
    let (url, reference) = match rest.split_once('#') {
        Some((url, reference)) => (url, reference),
        None => (rest, "HEAD"),
    };
    if url.is_empty() {
        return Err(bad("the URL is empty"));
    }
    if reference.is_empty() {
        return Err(bad("the ref after '#' is empty"));
    }
    // Both end up as git arguments: a leading '-' would be read as an option.
    if url.starts_with('-') || reference.starts_with('-') {
        return Err(bad("the URL and the ref must not start with '-'"));
    }
    if reference.contains("..")
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad(
            "the ref must not contain '..', spaces or control characters",
        ));
    }
    if url.chars().any(char::is_control) {
        return Err(bad("the URL must not contain control characters"));
    }
    let url = if let Some((scheme, _)) = url.split_once("://") {
        if !matches!(scheme, "https" | "http" | "ssh" | "git" | "file") {
            return Err(bad(&format!(
                "unsupported scheme {scheme:?} (use https, http, ssh, git or file)"
            )));
        }
        url.to_string()
    } else if url.contains("::") {
        // git's remote helpers (`ext::`, `fd::`) run commands.
        return Err(bad("remote helpers (TRANSPORT::ADDRESS) are not allowed"));
    } else if is_scp_like(url) {
        url.to_string()
    } else {
        base.join(url).to_string_lossy().into_owned()
    };
    Ok(Source::Git {
        url,
        reference: reference.to_string(),
    })
}

/// `user@host:path` or `host:path`, as git reads it: a ':' before any '/'.
fn is_scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash,
        (Some(_), None) => true,
        _ => false,
    }
}

fn kind_by_name(path: &Path) -> Option<ArchiveKind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(ArchiveKind::TarGz)
    } else if name.ends_with(".tar") {
        Some(ArchiveKind::Tar)
    } else if name.ends_with(".zip") {
        Some(ArchiveKind::Zip)
    } else {
        None
    }
}

fn suffix(kind: ArchiveKind) -> &'static str {
    match kind {
        ArchiveKind::Tar => ".tar",
        ArchiveKind::TarGz => ".tar.gz",
        ArchiveKind::Zip => ".zip",
    }
}

/// The first block of a file: enough for every signature [`sniff`] knows.
fn read_head(path: &Path) -> Result<Vec<u8>, FetchError> {
    let read = |source| FetchError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .map_err(read)?
        .take(512)
        .read_to_end(&mut head)
        .map_err(read)?;
    Ok(head)
}

/// Refuses an archive whose first bytes are not those of `kind`.
fn check_kind(path: &Path, kind: ArchiveKind, head: &[u8]) -> Result<(), FetchError> {
    if sniff(head) == Some(kind) {
        return Ok(());
    }
    Err(FetchError::Misnamed {
        path: path.to_path_buf(),
        expected: kind,
        found: describe(head),
    })
}

/// The archive format of a file, from its first block.
fn sniff(head: &[u8]) -> Option<ArchiveKind> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(ArchiveKind::TarGz)
    } else if [b"PK\x03\x04", b"PK\x05\x06"]
        .iter()
        .any(|m| head.starts_with(*m))
    {
        Some(ArchiveKind::Zip)
    } else if head.len() == 512 && is_tar_header(head) {
        Some(ArchiveKind::Tar)
    } else {
        None
    }
}

/// A ustar magic, a valid header checksum (old v7 tars), or an empty
/// archive's zero block.
fn is_tar_header(block: &[u8]) -> bool {
    if &block[257..262] == b"ustar" || block.iter().all(|&b| b == 0) {
        return true;
    }
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    stored == Some(sum)
}

/// What a file's first bytes look like, for an operator.
fn describe(head: &[u8]) -> String {
    const OTHERS: [(&[u8], &str); 3] = [
        (b"\xfd7zXZ\0", "xz"),
        (b"BZh", "bzip2"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
    ];
    if head.is_empty() {
        return "it is empty".to_string();
    }
    if let Some(kind) = sniff(head) {
        return format!("its content is a {kind} archive");
    }
    if let Some((_, name)) = OTHERS.iter().find(|(magic, _)| head.starts_with(magic)) {
        return format!("it is {name}-compressed, which zdt does not read (use .tar.gz or .zip)");
    }
    // The head may end inside a character: only the bytes after the last
    // whole one may be invalid.
    let text = match std::str::from_utf8(head) {
        Ok(text) => Some(text),
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok(),
        Err(_) => None,
    };
    match text {
        Some(text) if !text.chars().any(|c| c.is_control() && !c.is_whitespace()) => {
            let start: String = text.chars().take(40).collect();
            format!("it holds text: {start:?}")
        }
        _ => "its content is no archive zdt knows (tar, tar.gz, zip)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(src: &str) -> (String, String) {
        match parse_source(src, Path::new("/home/me/app")) {
            Ok(Source::Git { url, reference }) => (url, reference),
            other => panic!("{src}: {other:?}"),
        }
    }

    fn git_error(src: &str) -> String {
        parse_source(src, Path::new("/"))
            .expect_err(src)
            .to_string()
    }

    #[test]
    fn git_sources() {
        let cases = [
            (
                "git+file:///srv/repo.git#main",
                "file:///srv/repo.git",
                "main",
            ),
            ("git+/srv/repo#v1.2", "/srv/repo", "v1.2"),
            ("git+https://h/x.git", "https://h/x.git", "HEAD"),
            (
                "git+ssh://git@h/x.git#0a1b2c",
                "ssh://git@h/x.git",
                "0a1b2c",
            ),
            (
                "git+git@github.com:org/x.git#release/2",
                "git@github.com:org/x.git",
                "release/2",
            ),
            ("git+../repo#main", "/home/me/app/../repo", "main"),
        ];
        for (src, url, reference) in cases {
            assert_eq!(git(src), (url.to_string(), reference.to_string()), "{src}");
        }
    }

    #[test]
    fn bad_git_sources_say_why() {
        assert!(git_error("git+#main").contains("the URL is empty"));
        assert!(git_error("git+https://h/x.git#").contains("the ref after '#' is empty"));
        assert!(
            git_error("git+https://h/x.git#--upload-pack=evil").contains("must not start with '-'")
        );
        assert!(git_error("git+-oProxyCommand=evil#main").contains("must not start with '-'"));
        assert!(git_error("git+ext::sh -c evil#main").contains("remote helpers"));
        assert!(git_error("git+ftp://h/x.git").contains("unsupported scheme \"ftp\""));
        let e = git_error("git+https://h/x.git#a b");
        assert!(
            e.starts_with("bad git source \"git+https://h/x.git#a b\": the ref must not contain"),
            "{e}"
        );
        assert!(e.ends_with("git+/srv/app.git#v1.2)"), "{e}");
    }

    #[test]
    fn folders_and_archives_relative_to_base() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("app")).expect("mkdir");
        assert_eq!(
            parse_source("app", tmp.path()).expect("dir"),
            Source::Dir(tmp.path().join("app"))
        );
        let mut gz = vec![0x1f, 0x8b, 8, 0];
        gz.resize(64, 0);
        let mut zip = b"PK\x03\x04".to_vec();
        zip.resize(64, 0);
        let mut tar = tar::Header::new_ustar();
        tar.set_path("a").expect("path");
        tar.set_cksum();
        for (name, content, kind) in [
            ("a.tar.gz", &gz[..], ArchiveKind::TarGz),
            ("A.TGZ", &gz[..], ArchiveKind::TarGz),
            ("a.zip", &zip[..], ArchiveKind::Zip),
            ("a.tar", tar.as_bytes(), ArchiveKind::Tar),
        ] {
            std::fs::write(tmp.path().join(name), content).expect("write");
            let path = tmp.path().join(name);
            assert_eq!(
                parse_source(name, tmp.path()).expect(name),
                Source::Archive { path, kind }
            );
        }
    }

    #[test]
    fn misnamed_missing_and_unknown_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("app.tar.gz"), "<html>Not Found</html>\n").expect("write");
        let e = parse_source("app.tar.gz", tmp.path())
            .expect_err("text")
            .to_string();
        let want = format!(
            "{}/app.tar.gz is named like a gzip-compressed tar archive, but it holds text: \"<html>Not Found</html>\\n\"",
            tmp.path().display()
        );
        assert_eq!(e, want);
        std::fs::write(tmp.path().join("app.zip"), [0x1f, 0x8b, 8, 0]).expect("write");
        let e = parse_source("app.zip", tmp.path())
            .expect_err("gzip")
            .to_string();
        assert!(
            e.ends_with(
                "named like a zip archive, but its content is a gzip-compressed tar archive"
            ),
            "{e}"
        );
        std::fs::write(tmp.path().join("app.tar"), b"\xfd7zXZ\0rest").expect("write");
        let e = parse_source("app.tar", tmp.path())
            .expect_err("xz")
            .to_string();
        assert!(
            e.ends_with("it is xz-compressed, which zdt does not read (use .tar.gz or .zip)"),
            "{e}"
        );

        let e = parse_source("gone/app.tgz", tmp.path())
            .expect_err("missing")
            .to_string();
        let want = format!(
            "cannot read {}/gone/app.tgz: No such file or directory (os error 2)",
            tmp.path().display()
        );
        assert_eq!(e, want);

        std::fs::write(tmp.path().join("release.bin"), [0x1f, 0x8b, 8, 0]).expect("write");
        let e = parse_source("release.bin", tmp.path())
            .expect_err("unknown")
            .to_string();
        assert!(e.ends_with("neither a folder nor an archive: its content looks like a gzip-compressed tar archive; name it .tar.gz"), "{e}");
    }
}
