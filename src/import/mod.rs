//! `zdt import`: a supervisord or PM2 configuration turned into a
//! supervisor.toml.
//!
//! The readers (`supervisord`, `pm2`) fill a `Doc`: tables of lines,
//! each a key and value zdt accepts, a comment where the meaning changed in
//! the mapping, or a line left commented out when zdt cannot take it yet.
//! What has no equivalent at all goes to the report, each note naming the
//! source file and, where known, its line.
//!
//! CONTRACT: a reader never fails on something it cannot map (that is a
//! note); it fails ([`ImportError`], exit 2) only on input it cannot read
//! or parse, naming the file and line.

use std::fmt;
use std::path::{Path, PathBuf};

mod ini;
mod out;
mod pm2;
mod pyformat;
mod supervisord;

pub(crate) use out::{Doc, Table};

/// A place in an input file: a file and, where known, a line (from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The file, as it was named (or found by an include).
    pub file: PathBuf,
    /// The line, from 1, when known.
    pub line: Option<usize>,
}

impl Source {
    /// A line of `file`.
    pub fn at(file: &Path, line: usize) -> Source {
        Source {
            file: file.to_path_buf(),
            line: Some(line),
        }
    }

    /// The whole of `file`.
    pub fn file(file: &Path) -> Source {
        Source {
            file: file.to_path_buf(),
            line: None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

/// Something of the input that has no zdt equivalent, or needs a look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Where it was.
    pub at: Source,
    /// What was not mapped, and why or what to do instead.
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// An input that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {message}")]
pub struct ImportError {
    /// Where.
    pub at: Source,
    /// What is wrong.
    pub message: String,
}

impl ImportError {
    pub(crate) fn new(at: Source, message: impl Into<String>) -> ImportError {
        ImportError {
            at,
            message: message.into(),
        }
    }
}

/// The kinds of input `zdt import` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// supervisord's INI file (`.conf`, `.ini`, anything else).
    Supervisord,
    /// PM2's `ecosystem.config.js` (evaluated with node).
    Pm2Js,
    /// PM2's process file in JSON.
    Pm2Json,
    /// PM2's process file in YAML.
    Pm2Yaml,
}

impl Format {
    /// The format a file name says: `.js`/`.cjs`/`.mjs`, `.json`,
    /// `.yaml`/`.yml` are PM2's; anything else is read as supervisord's.
    pub fn of(path: &Path) -> Format {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("js" | "cjs" | "mjs") => Format::Pm2Js,
            Some("json") => Format::Pm2Json,
            Some("yaml" | "yml") => Format::Pm2Yaml,
            _ => Format::Supervisord,
        }
    }
}

/// Choices of the import.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// PM2: also take `env_NAME` (over `env`), as `pm2 start --env NAME`.
    pub env: Option<String>,
}

/// The result of an import.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The supervisor.toml text.
    pub toml: String,
    /// What could not be mapped.
    pub report: Vec<Note>,
}

/// Reads `path` (its format from its name, see [`Format::of`]) and returns
/// the equivalent supervisor.toml and the report.
pub fn import(path: &Path, options: &Options) -> Result<Imported, ImportError> {
    let doc = match Format::of(path) {
        Format::Supervisord => supervisord::import(path)?,
        format => pm2::import(path, format, options)?,
    };
    let mut doc = doc;
    if doc.programs.is_empty() {
        doc.note(
            Source::file(path),
            "no programs: nothing in it for zdt to run (zdt check warns; zdtctl reload refuses it without --allow-empty)",
        );
    }
    let toml = doc.render(path);
    Ok(Imported {
        toml,
        report: doc.notes,
    })
}

/// A log file path made one per instance: `{instance}` before its
/// extension (`worker.log` → `worker-{instance}.log`), else at its end.
pub(crate) fn per_instance(path: &str) -> String {
    let p = Path::new(path);
    match (p.file_stem(), p.extension()) {
        (Some(stem), Some(ext)) => p
            .with_file_name(format!(
                "{}-{{instance}}.{}",
                stem.to_string_lossy(),
                ext.to_string_lossy()
            ))
            .display()
            .to_string(),
        _ => format!("{path}-{{instance}}"),
    }
}

/// Whether a user `name` can be given to zdt here: zdt runs as root
/// (this process does) and the user exists.
pub(crate) fn user_usable(name: &str) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("zdt must run as root to change user (this import did not run as root)".into());
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(_)) => Ok(()),
        _ => Err(format!("no user {name:?} on this machine")),
    }
}

/// A program name zdt accepts, made from `name`: letters, digits, `_`,
/// `.`, `-`; anything else becomes `-`. Returns it and whether it changed.
pub(crate) fn program_name(name: &str) -> (String, bool) {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if out.is_empty() {
        out = "app".into();
    }
    if out == "all" {
        out = "all-".into();
    }
    let changed = out != name;
    (out, changed)
}

#[cfg(test)]
mod tests;
