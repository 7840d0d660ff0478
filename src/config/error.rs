//! Configuration errors that name the file, line and column.

use std::path::PathBuf;

/// A configuration error. `Display` is `FILE:LINE:COL: MESSAGE`;
/// [`ConfigError::render`] adds the offending line with a caret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{col}: {message}", file.display())]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line; 0 when the error has no position (e.g. unreadable file).
    pub line: usize,
    /// 1-based column (in characters); 0 when there is no position.
    pub col: usize,
    /// What is wrong and what was expected.
    pub message: String,
    /// The source line with a caret under the column.
    pub snippet: Option<String>,
}

impl ConfigError {
    /// An error at byte `offset` of `text`.
    pub fn at(file: PathBuf, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        let line_text = text[line_start..].lines().next().unwrap_or("");
        let gutter = line.to_string().len();
        let snippet = format!(
            "{:gutter$} |\n{line} | {line_text}\n{:gutter$} | {:>col$}",
            "", "", "^"
        );
        Self {
            file,
            line,
            col,
            message: message.into(),
            snippet: Some(snippet),
        }
    }

    /// An error without a position.
    pub fn whole_file(file: PathBuf, message: impl Into<String>) -> Self {
        Self {
            file,
            line: 0,
            col: 0,
            message: message.into(),
            snippet: None,
        }
    }

    /// The error line followed by the source snippet, like a compiler prints it.
    pub fn render(&self) -> String {
        let head = if self.line == 0 {
            format!("{}: {}", self.file.display(), self.message)
        } else {
            self.to_string()
        };
        match &self.snippet {
            Some(s) => format!("{head}\n{s}"),
            None => head,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_and_snippet() {
        let text = "a = 1\nbb = \"x\"\n";
        let e = ConfigError::at("f.toml".into(), text, 11, "bad");
        assert_eq!((e.line, e.col), (2, 6));
        assert_eq!(e.to_string(), "f.toml:2:6: bad");
        assert_eq!(
            e.render(),
            "f.toml:2:6: bad\n  |\n2 | bb = \"x\"\n  |      ^"
        );
    }
}
