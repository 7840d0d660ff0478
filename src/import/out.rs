//! The output of an import: tables of lines, rendered as supervisor.toml
//! text with a comment on each line whose meaning changed.

use std::path::Path;

use toml::Value;

use super::{Note, Source};

/// What an import produced: the tables and the report.
#[derive(Debug, Default)]
pub(crate) struct Doc {
    /// `[supervisor]` (left out when empty).
    pub supervisor: Table,
    /// `[program.NAME]`, in the input's order.
    pub programs: Vec<Table>,
    /// `[group.NAME]`.
    pub groups: Vec<Table>,
    /// What could not be mapped.
    pub notes: Vec<Note>,
}

impl Doc {
    /// A doc with an empty `[supervisor]` table.
    pub fn new() -> Doc {
        Doc {
            supervisor: Table::new("supervisor".into()),
            ..Doc::default()
        }
    }

    /// Adds a note to the report.
    pub fn note(&mut self, at: Source, message: impl Into<String>) {
        self.notes.push(Note {
            at,
            message: message.into(),
        });
    }

    /// The supervisor.toml text for an import of `input`.
    pub fn render(&self, input: &Path) -> String {
        let mut s = format!(
            "# Imported from {} by `zdt import`.\n# Lines with a comment changed meaning in the mapping: read them. Check with `zdt check -c FILE`.\n",
            input.display()
        );
        let tables = std::iter::once(&self.supervisor)
            .filter(|t| !t.lines.is_empty())
            .chain(&self.programs)
            .chain(&self.groups);
        for t in tables {
            s.push('\n');
            t.render_into(&mut s);
        }
        s
    }
}

/// One line of a table.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Line {
    /// The key as written (already quoted where TOML needs it); empty for
    /// a comment-only line.
    pub key: String,
    /// The value, rendered.
    pub value: Option<String>,
    /// The comment after it: what changed, or why it is commented out.
    pub note: Option<String>,
    /// Written commented out (zdt cannot take it here yet).
    pub disabled: bool,
}

/// One `[header]` table.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Table {
    /// `program.web`, `group.workers`, `supervisor`.
    pub header: String,
    /// Its lines, in order.
    pub lines: Vec<Line>,
}

/// A TOML key for `k`: bare when it can be, quoted otherwise.
pub(crate) fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

impl Table {
    /// An empty table.
    pub fn new(header: String) -> Table {
        Table {
            header,
            lines: Vec::new(),
        }
    }

    /// `[program.NAME]`.
    pub fn program(name: &str) -> Table {
        Table::new(format!("program.{}", key(name)))
    }

    fn push(&mut self, key: &str, value: Value, note: Option<String>, disabled: bool) {
        // A key set twice (a repeated option) keeps its last value, in place.
        self.lines.retain(|l| l.key != key || l.value.is_none());
        self.lines.push(Line {
            key: key.to_string(),
            value: Some(value.to_string()),
            note,
            disabled,
        });
    }

    /// `key = value`, same meaning.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.push(key, value.into(), None, false);
    }

    /// `key = value  # note`: the meaning changed.
    pub fn set_noted(&mut self, key: &str, value: impl Into<Value>, note: impl Into<String>) {
        self.push(key, value.into(), Some(note.into()), false);
    }

    /// `# key = value  # note`: zdt cannot take it (yet).
    pub fn disabled(&mut self, key: &str, value: impl Into<Value>, note: impl Into<String>) {
        self.push(key, value.into(), Some(note.into()), true);
    }

    /// `# note` on a line of its own.
    pub fn comment(&mut self, note: impl Into<String>) {
        self.lines.push(Line {
            key: String::new(),
            value: None,
            note: Some(note.into()),
            disabled: false,
        });
    }

    fn render_into(&self, s: &mut String) {
        s.push_str(&format!("[{}]\n", self.header));
        for l in &self.lines {
            let note = l
                .note
                .as_deref()
                .map(|n| n.replace('\n', " "))
                .unwrap_or_default();
            match &l.value {
                None => s.push_str(&format!("# {note}\n")),
                Some(v) => {
                    if l.disabled {
                        s.push_str("# ");
                    }
                    s.push_str(&format!("{} = {v}", l.key));
                    if !note.is_empty() {
                        s.push_str(&format!("  # {note}"));
                    }
                    s.push('\n');
                }
            }
        }
    }
}
