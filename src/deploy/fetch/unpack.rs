//! Unpacking tar, tar.gz and zip archives in two passes: the whole archive
//! is checked ([`plan`](super::plan)) before the first byte is written, then
//! written through [`Dest`](super::dest::Dest) following the plan. The
//! second pass takes names and link targets from the plan, never again from
//! the archive, so an archive rewritten between the passes cannot change
//! where anything goes.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use nix::sys::time::TimeSpec;

use super::dest::{Content, Dest};
use super::plan::{Plan, Planner, RawKind, Step};
use super::sniff::{check_kind, read_head};
use super::{ArchiveKind, FetchError, Filled, MAX_ENTRIES, MAX_PATH};

/// Permission bits an archive may set: no setuid, setgid, sticky, nor
/// write for group and others.
const ARCHIVE_MODE_MASK: u32 = 0o755;
/// Modes when the archive has none (zip files made on Windows).
const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;

/// Unpacks `archive` into `dest`, an existing empty folder, under the rules
/// of the [module](super). Returns what was written.
pub fn unpack(archive: &Path, kind: ArchiveKind, dest: &Path) -> Result<Filled, FetchError> {
    check_kind(archive, kind, &read_head(archive)?)?;
    let mut dest = Dest::open_empty(dest)?;
    let filled = match kind {
        ArchiveKind::Tar | ArchiveKind::TarGz => unpack_tar(archive, kind, &mut dest)?,
        ArchiveKind::Zip => unpack_zip(archive, &mut dest)?,
    };
    dest.finish()?;
    Ok(filled)
}

fn archive_error(archive: &Path) -> impl Fn(io::Error) -> FetchError {
    let archive = archive.to_path_buf();
    move |source| FetchError::Archive {
        archive: archive.clone(),
        source,
    }
}

fn entry_error(archive: &Path, entry: &[u8]) -> impl Fn(io::Error) -> FetchError {
    let archive = archive.to_path_buf();
    let entry = String::from_utf8_lossy(entry).into_owned();
    move |source| FetchError::Entry {
        archive: archive.clone(),
        entry: entry.clone(),
        source,
    }
}

fn changed(archive: &Path) -> FetchError {
    archive_error(archive)(io::Error::other("it changed while being unpacked"))
}

fn open_tar(archive: &Path, kind: ArchiveKind) -> Result<tar::Archive<Box<dyn Read>>, FetchError> {
    let file = File::open(archive).map_err(|source| FetchError::Read {
        path: archive.to_path_buf(),
        source,
    })?;
    let reader: Box<dyn Read> = match kind {
        ArchiveKind::TarGz => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        _ => Box::new(BufReader::new(file)),
    };
    Ok(tar::Archive::new(reader))
}

fn tar_kind<R: Read>(entry: &tar::Entry<'_, R>) -> RawKind {
    use tar::EntryType as T;
    let link = || {
        entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default()
    };
    match entry.header().entry_type() {
        // Old tars mark folders with a trailing slash only.
        T::Regular if entry.path_bytes().ends_with(b"/") => RawKind::Dir,
        T::Regular | T::Continuous | T::GNUSparse => RawKind::File,
        T::Directory => RawKind::Dir,
        T::Symlink => RawKind::Symlink(link()),
        T::Link => RawKind::Hardlink(link()),
        T::XGlobalHeader => RawKind::Ignore,
        // Devices, fifos, and types this reader does not know.
        _ => RawKind::Special,
    }
}

fn unpack_tar(archive: &Path, kind: ArchiveKind, dest: &mut Dest) -> Result<Filled, FetchError> {
    let err = archive_error(archive);
    let mut planner = Planner::new(archive, MAX_ENTRIES, MAX_PATH);
    let mut tar = open_tar(archive, kind)?;
    for entry in tar.entries().map_err(&err)? {
        let entry = entry.map_err(&err)?;
        planner.add(&entry.path_bytes(), tar_kind(&entry))?;
    }
    let Plan { steps, skipped } = planner.finish()?;

    let mut filled = Filled {
        skipped,
        ..Filled::default()
    };
    let mut tar = open_tar(archive, kind)?;
    let mut steps = steps.into_iter();
    for entry in tar.entries().map_err(&err)? {
        let mut entry = entry.map_err(&err)?;
        let step = steps.next().ok_or_else(|| changed(archive))?;
        let Some(step) = step else { continue };
        let header = entry.header();
        let mode = header
            .mode()
            .map_or(default_mode(&step), |m| m & ARCHIVE_MODE_MASK);
        let mtime = header
            .mtime()
            .ok()
            .and_then(|t| i64::try_from(t).ok())
            .map(|t| TimeSpec::new(t, 0));
        let read_error = entry_error(archive, &entry.path_bytes());
        write_step(
            dest,
            &step,
            mode,
            mtime,
            &mut entry,
            &read_error,
            &mut filled,
        )?;
    }
    if steps.next().is_some() {
        return Err(changed(archive));
    }
    Ok(filled)
}

fn default_mode(step: &Step) -> u32 {
    match step {
        Step::Dir(_) => DEFAULT_DIR_MODE,
        _ => DEFAULT_FILE_MODE,
    }
}

fn write_step(
    dest: &mut Dest,
    step: &Step,
    mode: u32,
    mtime: Option<TimeSpec>,
    reader: &mut dyn Read,
    read_error: &dyn Fn(io::Error) -> FetchError,
    filled: &mut Filled,
) -> Result<(), FetchError> {
    match step {
        Step::Dir(path) => dest.dir(path, mode)?,
        Step::File(path) => {
            filled.bytes += dest.file(path, mode, mtime, Content { reader, read_error })?
        }
        Step::Symlink(path, target) => dest.symlink(path, target)?,
        Step::Hardlink(path, target) => dest.hardlink(path, target)?,
    }
    filled.entries += 1;
    Ok(())
}

/// The file type bits of a unix mode.
const S_IFMT: u32 = 0o170000;

fn zip_kind(
    file: &mut zip::read::ZipFile<'_, BufReader<File>>,
    name: &[u8],
    archive: &Path,
) -> Result<RawKind, FetchError> {
    let file_type = file.unix_mode().map(|m| m & S_IFMT);
    Ok(match file_type {
        _ if name.ends_with(b"/") => RawKind::Dir,
        Some(0o040000) => RawKind::Dir,
        Some(0o120000) => {
            let mut target = Vec::new();
            file.take(MAX_PATH as u64 + 1)
                .read_to_end(&mut target)
                .map_err(entry_error(archive, name))?;
            RawKind::Symlink(target)
        }
        None | Some(0) | Some(0o100000) => RawKind::File,
        Some(_) => RawKind::Special,
    })
}

/// A zip entry's name, with Windows separators made `/` (as unzip does).
fn zip_name(file: &zip::read::ZipFile<'_, BufReader<File>>) -> Vec<u8> {
    file.name().replace('\\', "/").into_bytes()
}

fn unpack_zip(archive: &Path, dest: &mut Dest) -> Result<Filled, FetchError> {
    let err = archive_error(archive);
    let file = File::open(archive).map_err(|source| FetchError::Read {
        path: archive.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| err(e.into()))?;
    let mut planner = Planner::new(archive, MAX_ENTRIES, MAX_PATH);
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).map_err(|e| err(e.into()))?;
        let name = zip_name(&file);
        let kind = zip_kind(&mut file, &name, archive)?;
        planner.add(&name, kind)?;
    }
    let Plan { steps, skipped } = planner.finish()?;

    let mut filled = Filled {
        skipped,
        ..Filled::default()
    };
    for (i, step) in steps.iter().enumerate() {
        let Some(step) = step else { continue };
        let mut file = zip.by_index(i).map_err(|e| err(e.into()))?;
        let mode = file
            .unix_mode()
            .map_or(default_mode(step), |m| m & ARCHIVE_MODE_MASK);
        let read_error = entry_error(archive, &zip_name(&file));
        write_step(dest, step, mode, None, &mut file, &read_error, &mut filled)?;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests;
