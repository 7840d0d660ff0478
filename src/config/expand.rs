//! `${VAR}` and `${VAR:-default}` in the configuration's strings, from
//! zdt's own environment, before the TOML is read.
//!
//! Only inside TOML strings: keys, numbers and comments are left alone. A
//! value is escaped for the string it lands in (a `"` in a basic string
//! stays a character, never ends the string); a literal `'string'` cannot
//! hold a `'` or a line break, so such a value is an error. `$${` is a
//! literal `${`. An unset variable without a default is an error at its
//! place. [`Expanded::original`] maps a position in the expanded text back
//! to the file, so every later error still names the file's line and column.

/// A substitution: where it is in the expanded text and in the file.
#[derive(Debug, Clone, Copy)]
struct Span {
    expanded: (usize, usize),
    original: (usize, usize),
}

/// The expanded text and the way back to the file's positions.
#[derive(Debug, Clone)]
pub struct Expanded {
    /// The text the TOML parser reads.
    pub text: String,
    spans: Vec<Span>,
}

impl Expanded {
    /// The file's offset for `offset` in [`Expanded::text`] (a position
    /// inside a substituted value maps to its `$`).
    pub fn original(&self, offset: usize) -> usize {
        let mut base = (0, 0);
        for s in &self.spans {
            if s.expanded.1 <= offset {
                base = (s.expanded.1, s.original.1);
            } else if s.expanded.0 <= offset {
                return s.original.0;
            } else {
                break;
            }
        }
        base.1 + (offset - base.0)
    }
}

/// Which string the scanner is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum In {
    Code,
    Comment,
    Basic,
    MultiBasic,
    Literal,
    MultiLiteral,
}

/// Expands `text` with `lookup` (zdt's environment in use); an error is
/// (offset in `text`, message).
pub fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Expanded, (usize, String)> {
    if !text.contains("${") {
        return Ok(Expanded {
            text: text.to_string(),
            spans: Vec::new(),
        });
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut spans = Vec::new();
    let mut state = In::Code;
    let mut i = 0;
    // Bytes copied as they are run from `copied` to `i`.
    let mut copied = 0;
    while i < b.len() {
        let rest = &b[i..];
        match state {
            In::Code => {
                if rest.starts_with(b"\"\"\"") {
                    state = In::MultiBasic;
                    i += 3;
                } else if rest.starts_with(b"'''") {
                    state = In::MultiLiteral;
                    i += 3;
                } else {
                    state = match b[i] {
                        b'"' => In::Basic,
                        b'\'' => In::Literal,
                        b'#' => In::Comment,
                        _ => In::Code,
                    };
                    i += 1;
                }
            }
            In::Comment => {
                if b[i] == b'\n' {
                    state = In::Code;
                }
                i += 1;
            }
            In::Basic | In::MultiBasic | In::Literal | In::MultiLiteral => {
                let basic = matches!(state, In::Basic | In::MultiBasic);
                let close: &[u8] = match state {
                    In::Basic => b"\"",
                    In::MultiBasic => b"\"\"\"",
                    In::Literal => b"'",
                    _ => b"'''",
                };
                if basic && b[i] == b'\\' {
                    i += 2;
                } else if rest.starts_with(close) {
                    state = In::Code;
                    i += close.len();
                } else if (state == In::Basic || state == In::Literal) && b[i] == b'\n' {
                    // An unclosed string: the TOML parser says so.
                    state = In::Code;
                    i += 1;
                } else if rest.starts_with(b"$${") {
                    out.push_str(&text[copied..i]);
                    out.push_str("${");
                    spans.push(Span {
                        expanded: (out.len() - 2, out.len()),
                        original: (i, i + 3),
                    });
                    i += 3;
                    copied = i;
                } else if rest.starts_with(b"${") {
                    let line = text[i..].find('\n').map_or(&text[i..], |n| &text[i..i + n]);
                    let Some(len) = line.find('}') else {
                        return Err((i, "`${` without its `}`".into()));
                    };
                    let inner = &text[i + 2..i + len];
                    let (name, default) = match inner.split_once(":-") {
                        Some((n, d)) => (n, Some(d)),
                        None => (inner, None),
                    };
                    let name_ok = !name.is_empty()
                        && !name.starts_with(|c: char| c.is_ascii_digit())
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !name_ok {
                        return Err((
                            i,
                            format!("${{{inner}}}: {name:?} is not a variable name (letters, digits and _)"),
                        ));
                    }
                    let value = match (lookup(name).filter(|v| !v.is_empty()), default) {
                        (Some(v), _) => v,
                        (None, Some(d)) => d.to_string(),
                        (None, None) => {
                            return Err((
                                i,
                                format!(
                                    "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                                ),
                            ))
                        }
                    };
                    let escaped =
                        escape(&value, state).map_err(|why| (i, format!("${{{name}}}: {why}")))?;
                    out.push_str(&text[copied..i]);
                    let start = out.len();
                    out.push_str(&escaped);
                    spans.push(Span {
                        expanded: (start, out.len()),
                        original: (i, i + len + 1),
                    });
                    i += len + 1;
                    copied = i;
                } else {
                    i += 1;
                }
            }
        }
    }
    out.push_str(&text[copied.min(text.len())..]);
    Ok(Expanded { text: out, spans })
}

/// `value` as it must be written inside a string of kind `state`.
fn escape(value: &str, state: In) -> Result<String, String> {
    match state {
        In::Basic | In::MultiBasic => {
            let mut s = String::with_capacity(value.len());
            for c in value.chars() {
                match c {
                    '"' => s.push_str("\\\""),
                    '\\' => s.push_str("\\\\"),
                    '\n' => s.push_str("\\n"),
                    '\t' => s.push_str("\\t"),
                    '\r' => s.push_str("\\r"),
                    c if c.is_control() => s.push_str(&format!("\\u{:04X}", u32::from(c))),
                    c => s.push(c),
                }
            }
            Ok(s)
        }
        In::Literal if value.contains(['\'', '\n']) => {
            Err("its value holds a ' or a line break, which a 'literal string' cannot: use a \"basic string\"".into())
        }
        In::MultiLiteral if value.contains("'''") => {
            Err("its value holds ''', which a '''literal string''' cannot: use a \"basic string\"".into())
        }
        _ => Ok(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/home/app".into()),
            "QUOTE" => Some("say \"hi\"\\".into()),
            "APOS" => Some("it's".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn strings_are_expanded_and_the_rest_is_not() {
        let text = "# ${NOT_IN_COMMENTS}\na = \"${HOME}/x\"\nb = '${HOME}'\nc = \"${UNSET:-dflt} ${EMPTY:-was empty}\"\nd = \"$${HOME}\"\ne = \"${QUOTE}\"\n";
        let e = expand(text, env).expect("expands");
        let t: toml::Table = toml::from_str(&e.text).expect("still TOML");
        assert_eq!(t["a"].as_str(), Some("/home/app/x"));
        assert_eq!(t["b"].as_str(), Some("/home/app"));
        assert_eq!(t["c"].as_str(), Some("dflt was empty"));
        assert_eq!(t["d"].as_str(), Some("${HOME}"));
        assert_eq!(
            t["e"].as_str(),
            Some("say \"hi\"\\"),
            "a quote stays inside the string"
        );
        assert!(e.text.starts_with("# ${NOT_IN_COMMENTS}\n"));
    }

    #[test]
    fn positions_map_back_to_the_file() {
        let text = "a = \"${HOME}\"\nb = 1x\n";
        let e = expand(text, env).expect("expands");
        let bad = e.text.find("1x").expect("there");
        assert_eq!(e.original(bad), text.find("1x").expect("there"));
        let inside = e.text.find("app").expect("there");
        assert_eq!(e.original(inside), text.find('$').expect("there"));
        assert_eq!(e.original(2), 2, "before any substitution");
    }

    #[test]
    fn errors_name_the_variable_at_its_place() {
        let text = "a = 1\nb = \"x ${NOPE}\"\n";
        let (at, msg) = expand(text, env).expect_err("unset");
        assert_eq!(at, text.find('$').expect("there"));
        assert!(
            msg.contains("NOPE is not set") && msg.contains("${NOPE:-default}"),
            "{msg}"
        );
        assert!(expand("a = '${APOS}'\n", env)
            .expect_err("apostrophe")
            .1
            .contains("basic string"));
        assert!(expand("a = \"${1X}\"\n", env)
            .expect_err("name")
            .1
            .contains("not a variable name"));
        assert!(expand("a = \"${HOME\"\n", env)
            .expect_err("open")
            .1
            .contains("without its `}`"));
    }
}
