//! Filling a new release (placeholder until the full module lands).

use std::path::{Path, PathBuf};

/// Where a release comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A folder, copied.
    Dir(PathBuf),
    /// An archive, unpacked.
    Archive {
        /// The file.
        path: PathBuf,
        /// Its format.
        kind: ArchiveKind,
    },
    /// A git repository and ref.
    Git {
        /// The repository.
        url: String,
        /// The ref.
        reference: String,
    },
}

/// Archive formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveKind {
    /// .tar
    Tar,
    /// .tar.gz
    TarGz,
    /// .zip
    Zip,
}

/// Why a release could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Anything.
    #[error("{0}")]
    Other(String),
}

/// Parses `--from`.
pub fn parse_source(src: &str, base: &Path) -> Result<Source, FetchError> {
    if let Some(g) = src.strip_prefix("git+") {
        let (url, r) = g.rsplit_once('#').unwrap_or((g, "HEAD"));
        return Ok(Source::Git {
            url: url.to_string(),
            reference: r.to_string(),
        });
    }
    let p = base.join(src);
    if p.is_dir() {
        Ok(Source::Dir(p))
    } else {
        Err(FetchError::Other(format!("{}: not a folder", p.display())))
    }
}

/// Copies a folder.
pub fn copy_dir(src: &Path, dest: &Path) -> Result<u64, FetchError> {
    let mut n = 0;
    for e in std::fs::read_dir(src).map_err(|e| FetchError::Other(e.to_string()))? {
        let e = e.map_err(|e| FetchError::Other(e.to_string()))?;
        if e.file_name() == ".git" {
            continue;
        }
        let t = e
            .file_type()
            .map_err(|e| FetchError::Other(e.to_string()))?;
        let to = dest.join(e.file_name());
        if t.is_dir() {
            std::fs::create_dir(&to).map_err(|e| FetchError::Other(e.to_string()))?;
            n += copy_dir(&e.path(), &to)?;
        } else {
            n += std::fs::copy(e.path(), &to).map_err(|e| FetchError::Other(e.to_string()))?;
        }
    }
    Ok(n)
}

/// Unpacks an archive.
pub fn unpack(archive: &Path, _kind: ArchiveKind, _dest: &Path) -> Result<u64, FetchError> {
    Err(FetchError::Other(format!(
        "{}: archives not yet",
        archive.display()
    )))
}

/// Bytes under a folder.
pub fn tree_size(path: &Path) -> u64 {
    walk(path)
}

fn walk(p: &Path) -> u64 {
    let Ok(m) = p.symlink_metadata() else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.filter_map(Result::ok).map(|e| walk(&e.path())).sum())
            .unwrap_or(0)
    } else {
        m.len()
    }
}
