//! supervisord's INI dialect, as Python's `configparser` reads it with the
//! options supervisord passes: `;` and `#` comments (whole line, or inline
//! after whitespace), `key = value` or `key: value` (keys lowercased),
//! values continued on more-indented lines, repeated keys and sections
//! allowed (the last value wins).

use std::path::Path;

use super::{ImportError, Source};

/// One `[name]` section of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Section {
    /// What is between the brackets, e.g. `program:web`.
    pub name: String,
    /// The line of the header.
    pub at: Source,
    /// Its options, in order.
    pub entries: Vec<Entry>,
}

/// One `key = value` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Lowercased key.
    pub key: String,
    /// The value, continuation lines joined with `\n`.
    pub value: String,
    /// The line of the key.
    pub line: usize,
}

impl Section {
    /// The last value of `key`, with its line.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.key == key)
    }
}

/// The line without its comment: a whole-line comment gives None.
fn strip_comment(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with(';') || t.starts_with('#') {
        return None;
    }
    let mut prev_space = false;
    for (i, c) in line.char_indices() {
        if (c == ';' || c == '#') && prev_space {
            return Some(&line[..i]);
        }
        prev_space = c.is_whitespace();
    }
    Some(line)
}

/// Parses `text`, read from `file`.
pub(crate) fn parse(text: &str, file: &Path) -> Result<Vec<Section>, ImportError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut sections: Vec<Section> = Vec::new();
    // The indentation of the current option's line, while one can go on.
    let mut option_indent: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let Some(line) = strip_comment(raw) else {
            continue;
        };
        let value = line.trim();
        let indent = line.len() - line.trim_start().len();
        if value.is_empty() {
            // A blank line inside a value is kept (trimmed at the end).
            if let (Some(_), Some(e)) = (
                option_indent,
                sections.last_mut().and_then(|s| s.entries.last_mut()),
            ) {
                e.value.push('\n');
            }
            continue;
        }
        if let Some(level) = option_indent {
            if indent > level {
                if let Some(e) = sections.last_mut().and_then(|s| s.entries.last_mut()) {
                    if !e.value.is_empty() {
                        e.value.push('\n');
                    }
                    e.value.push_str(value);
                    continue;
                }
            }
        }
        if let Some(rest) = value.strip_prefix('[') {
            let Some(end) = rest.rfind(']') else {
                return Err(ImportError::new(
                    Source::at(file, n),
                    format!("section header {value:?} has no closing ']'"),
                ));
            };
            let name = rest[..end].trim().to_string();
            if name.is_empty() {
                return Err(ImportError::new(
                    Source::at(file, n),
                    "empty section header []",
                ));
            }
            sections.push(Section {
                name,
                at: Source::at(file, n),
                entries: Vec::new(),
            });
            option_indent = None;
            continue;
        }
        let Some(split) = value.find(['=', ':']) else {
            return Err(ImportError::new(
                Source::at(file, n),
                format!("expected key = value or a [section], found {value:?}"),
            ));
        };
        let key = value[..split].trim().to_ascii_lowercase();
        if key.is_empty() {
            return Err(ImportError::new(
                Source::at(file, n),
                format!("no key before '=' in {value:?}"),
            ));
        }
        let Some(section) = sections.last_mut() else {
            return Err(ImportError::new(
                Source::at(file, n),
                format!("{key} comes before any [section] header"),
            ));
        };
        section.entries.push(Entry {
            key,
            value: value[split + 1..].trim().to_string(),
            line: n,
        });
        option_indent = Some(indent);
    }
    for s in &mut sections {
        for e in &mut s.entries {
            let v = e.value.trim_end_matches('\n').to_string();
            e.value = v;
        }
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(text: &str) -> Vec<Section> {
        parse(text, Path::new("/x/s.conf")).expect("parses")
    }

    #[test]
    fn comments_continuations_and_delimiters() {
        let s = sections(
            "; a comment\n# another\n[program:web] ; trailing\ncommand = /bin/cat ; inline\n  --flag\n\n  --more\nKey: v#not a comment\nx=a ;b\n",
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "program:web");
        assert_eq!(s[0].at.line, Some(3));
        let e = &s[0].entries;
        assert_eq!(e[0].key, "command");
        assert_eq!(e[0].value, "/bin/cat\n--flag\n\n--more");
        assert_eq!(e[0].line, 4);
        assert_eq!(e[1].key, "key");
        assert_eq!(e[1].value, "v#not a comment");
        assert_eq!(e[2].value, "a");
    }

    #[test]
    fn the_last_of_a_repeated_key_wins() {
        let s = sections("[a]\nk=1\nk=2\n");
        assert_eq!(s[0].get("k").map(|e| e.value.as_str()), Some("2"));
    }

    #[test]
    fn bad_lines_name_their_line() {
        let bad = [
            ("[a]\nk=1\njust words\n", 3, "expected key = value"),
            ("k=1\n", 1, "before any [section]"),
            ("[a]\n[b\n", 2, "closing"),
            ("[a]\n= v\n", 2, "no key"),
        ];
        for (text, line, word) in bad {
            let e = parse(text, Path::new("/x/s.conf")).expect_err(text);
            assert_eq!(e.at.line, Some(line), "{text:?}");
            assert!(e.message.contains(word), "{text:?}: {}", e.message);
            assert!(e.to_string().starts_with(&format!("/x/s.conf:{line}: ")));
        }
    }
}
