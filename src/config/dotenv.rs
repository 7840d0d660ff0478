//! `env_file = ".env"`: the dotenv syntax most tools read.
//!
//! One `KEY=VALUE` a line; blank lines and lines starting with `#` are
//! skipped; `export KEY=VALUE` is accepted (a file that a shell also
//! sources). A value may be bare (trailing spaces and a ` #` comment are
//! cut), in single quotes (taken as it is), or in double quotes (`\n`,
//! `\t`, `\"`, `\\` and `\$` are escapes). Nothing is expanded: `$HOME` stays
//! `$HOME`, as docker's `--env-file` leaves it.

/// A parse error: the byte offset in the text and what is wrong.
pub type Error = (usize, String);

/// The variables of `text`, in order (a later one replaces an earlier one
/// when they are merged).
pub fn parse(text: &str) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    let mut offset = 0;
    for raw in text.split_inclusive('\n') {
        let line_start = offset;
        offset += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let body = trimmed
            .strip_prefix("export ")
            .map_or(trimmed, str::trim_start);
        let body_at = line_start + indent + (trimmed.len() - body.len());
        let Some(eq) = body.find('=') else {
            return Err((body_at, "expected KEY=VALUE".into()));
        };
        let key = body[..eq].trim_end();
        let key_ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err((
                body_at,
                format!(
                    "{key:?} is not a variable name (letters, digits and _, not first a digit)"
                ),
            ));
        }
        let value_at = body_at + eq + 1;
        let value = &body[eq + 1..];
        out.push((key.to_string(), unquote(value, value_at)?));
    }
    Ok(out)
}

fn unquote(value: &str, at: usize) -> Result<String, Error> {
    let v = value.trim_start();
    let at = at + (value.len() - v.len());
    if let Some(rest) = v.strip_prefix('\'') {
        let Some(end) = rest.find('\'') else {
            return Err((at, "a single quote is not closed on its line".into()));
        };
        return trailing(&rest[end + 1..], at + end + 2).map(|()| rest[..end].to_string());
    }
    if let Some(rest) = v.strip_prefix('"') {
        let mut s = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return trailing(&rest[i + 1..], at + i + 2).map(|()| s),
                '\\' => match chars.next() {
                    Some((_, 'n')) => s.push('\n'),
                    Some((_, 't')) => s.push('\t'),
                    Some((_, 'r')) => s.push('\r'),
                    Some((_, e @ ('"' | '\\' | '$'))) => s.push(e),
                    Some((_, e)) => {
                        s.push('\\');
                        s.push(e);
                    }
                    None => break,
                },
                c => s.push(c),
            }
        }
        return Err((at, "a double quote is not closed on its line".into()));
    }
    let bare = match v.find(" #") {
        Some(i) => &v[..i],
        None => v,
    };
    Ok(bare.trim_end().to_string())
}

/// After a closing quote: only spaces and a comment.
fn trailing(rest: &str, at: usize) -> Result<(), Error> {
    let r = rest.trim_start();
    if r.is_empty() || r.starts_with('#') {
        Ok(())
    } else {
        Err((
            at + (rest.len() - r.len()),
            "unexpected text after the quoted value".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usual_forms_are_read() {
        let text = "# comment\n\nA=1\nexport B = two words  # note\nC='single $HOME # kept'\nD=\"line\\nnext \\\"q\\\" \\$X\"\nE=\nF=a=b\n";
        let vars = parse(text).expect("valid");
        let want = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "single $HOME # kept"),
            ("D", "line\nnext \"q\" $X"),
            ("E", ""),
            ("F", "a=b"),
        ];
        let got: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn errors_point_at_their_place() {
        let text = "A=1\n  no equals sign\n";
        assert_eq!(parse(text), Err((6, "expected KEY=VALUE".into())));
        let text = "A=1\n1X=2\n";
        assert_eq!(parse(text).map_err(|e| e.0), Err(4));
        let text = "A=\"open\n";
        assert_eq!(parse(text).map_err(|e| e.0), Err(2));
        let text = "A='x' y\n";
        assert_eq!(parse(text).map_err(|e| e.0), Err(6));
    }
}
