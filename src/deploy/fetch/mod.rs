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
//!   entry, when an entry name is absolute or has a `..` component (even a
//!   harmless `a/../b`); when a
//!   symlink points to an absolute path or resolves outside `dest` (resolved
//!   the way the kernel will, through the archive's other symlinks); when an
//!   entry goes through a symlink of the archive (`l -> sub`, then `l/x`);
//!   when a hard link does not name a regular file earlier in the archive;
//!   when a path appears twice and one of them is a symlink.
//! - **Bounds**: at most [`MAX_ENTRIES`] entries, names and link targets of
//!   at most [`MAX_PATH`] bytes. (The tar reader holds a GNU long name or a
//!   pax header whole in memory before the name is checked; the bytes
//!   written are not bounded: the disk is.)
//! - **One top folder is stripped**: when every entry of an archive lies in
//!   one top-level folder (`app-1.2/…`, what `tar czf app.tgz app/` and
//!   GitHub's tarballs make), its content goes to `dest` directly. Any other
//!   layout is kept as it is.
//! - **Modes**: permission bits are kept, exec bits included; setuid, setgid
//!   and sticky bits are dropped (zdt usually runs as root). Archives also
//!   lose group and other write. Owners (uid/gid) are ignored: the files
//!   belong to zdt's user. Folder modes are applied last, so a read-only
//!   folder can still be filled. Files copied from a folder or a tar keep
//!   their modification time; zip entries get the time of unpacking (a
//!   zip's DOS time has no time zone).
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
mod sniff;
mod source;
mod unpack;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use copy::{copy_dir, tree_size};
pub use source::{kind_by_name, parse_source};
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
