//! Telling archive formats apart by their first bytes, so a misnamed file
//! (an HTML error page saved as `app.tar.gz`) gets a clear error instead of
//! a decoder's.

use std::io::Read;
use std::path::Path;

use super::{ArchiveKind, FetchError};

/// The first block of a file: enough for every signature [`sniff`] knows.
pub(super) fn read_head(path: &Path) -> Result<Vec<u8>, FetchError> {
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
pub(super) fn check_kind(path: &Path, kind: ArchiveKind, head: &[u8]) -> Result<(), FetchError> {
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
pub(super) fn sniff(head: &[u8]) -> Option<ArchiveKind> {
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
pub(super) fn describe(head: &[u8]) -> String {
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
