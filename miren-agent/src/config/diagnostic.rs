//! Positions in `app.toml` and rustc-style error reports.

use std::fmt;
use std::ops::Range;

/// Byte range into a [`Source`]'s text.
pub type Span = Range<usize>;

/// The name and text of a config file, used to turn byte spans into positions.
///
/// The start of every line is indexed once, so locating a span costs a binary search plus
/// the length of its line, whatever the size of the file and the number of diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    name: String,
    text: String,
    /// Byte offset of the start of each line (the first is 0).
    line_starts: Vec<usize>,
}

impl Source {
    /// Wraps a file's display name (e.g. `app/.miren/app.toml`) and its text.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        let text = text.into();
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            name: name.into(),
            text,
            line_starts,
        }
    }

    /// The file name shown in diagnostics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full file text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The 1-based line number of byte `offset`.
    pub fn line(&self, offset: usize) -> usize {
        // The number of lines starting at or before `offset`.
        self.line_starts.partition_point(|&start| start <= offset)
    }

    /// Builds a diagnostic pointing at `span`, with a hint saying what to do.
    pub fn diagnostic(
        &self,
        span: Span,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> Diagnostic {
        let text = self.text.as_str();
        let start = floor_char_boundary(text, span.start);
        let line = self.line(start);
        let line_start = self.line_starts[line - 1];
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let end = floor_char_boundary(text, span.end.clamp(start, line_end));
        Diagnostic {
            message: message.into(),
            help: help.into(),
            file: self.name.clone(),
            line,
            column: text[line_start..start].chars().count() + 1,
            width: text[start..end].chars().count().max(1),
            line_text: text[line_start..line_end]
                .trim_end_matches('\r')
                .replace('\t', " "),
        }
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// One error: what is wrong, where (1-based line and column), and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong, e.g. `node_port 80 is reserved for the HTTP ingress`.
    pub message: String,
    /// What to do about it.
    pub help: String,
    /// File name as given to [`Source::new`].
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// Number of characters underlined (at least 1).
    pub width: usize,
    /// The offending line, tabs shown as spaces.
    pub line_text: String,
}

/// The most characters of the offending line a rendered diagnostic shows; a longer line is
/// cut around the marked span, with `...` where text was left out.
const MAX_SHOWN_CHARS: usize = 120;

impl Diagnostic {
    /// The part of the line to show, with the 1-based column and the width of the marks in it.
    fn shown_line(&self) -> (String, usize, usize) {
        let chars: Vec<char> = self.line_text.chars().collect();
        if chars.len() <= MAX_SHOWN_CHARS {
            return (self.line_text.clone(), self.column, self.width);
        }
        let start = (self.column - 1)
            .saturating_sub(MAX_SHOWN_CHARS / 4)
            .min(chars.len() - MAX_SHOWN_CHARS);
        let end = start + MAX_SHOWN_CHARS;
        let mut text = String::new();
        let mut column = self.column - start;
        if start > 0 {
            text.push_str("...");
            column += 3;
        }
        text.extend(&chars[start..end]);
        if end < chars.len() {
            text.push_str("...");
        }
        let width = self.width.min(end.saturating_sub(self.column - 1)).max(1);
        (text, column, width)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pad = " ".repeat(self.line.to_string().len());
        let (text, column, width) = self.shown_line();
        writeln!(f, "error: {}", self.message)?;
        writeln!(f, "{pad}--> {}:{}:{}", self.file, self.line, self.column)?;
        writeln!(f, "{pad} |")?;
        writeln!(f, "{} | {text}", self.line)?;
        writeln!(f, "{pad} | {}{}", " ".repeat(column - 1), "^".repeat(width))?;
        write!(f, "{pad} = help: {}", self.help)
    }
}

/// All problems found in one config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct ConfigError {
    /// The diagnostics, sorted by file, line and column.
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    /// Sorts `diagnostics` into file order (stable for equal positions).
    pub fn new(mut diagnostics: Vec<Diagnostic>) -> Self {
        diagnostics.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        Self { diagnostics }
    }

    /// `Ok(())` when `diagnostics` is empty, else the sorted error.
    pub fn check(diagnostics: Vec<Diagnostic>) -> Result<(), Self> {
        if diagnostics.is_empty() {
            Ok(())
        } else {
            Err(Self::new(diagnostics))
        }
    }
}

/// The most diagnostics a [`ConfigError`] shows; the rest are counted.
const MAX_RENDERED: usize = 50;

fn render(diagnostics: &[Diagnostic]) -> String {
    let mut text = diagnostics
        .iter()
        .take(MAX_RENDERED)
        .map(Diagnostic::to_string)
        .collect::<Vec<_>>()
        .join("\n\n");
    if let Some(more) = diagnostics
        .len()
        .checked_sub(MAX_RENDERED)
        .filter(|n| *n > 0)
    {
        text.push_str(&format!(
            "\n\nerror: {more} more errors not shown; fix the ones above first"
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_rustc() {
        let text = "name = \"a\"\n".repeat(11) + "node_port = 80\n";
        let src = Source::new("app/.miren/app.toml", text);
        let start = src.text().find("80").unwrap_or_default();
        let d = src.diagnostic(
            start..start + 2,
            "node_port 80 is reserved for the HTTP ingress",
            "choose another node_port",
        );
        assert_eq!(
            d.to_string(),
            "error: node_port 80 is reserved for the HTTP ingress\n  --> app/.miren/app.toml:12:13\n   |\n12 | node_port = 80\n   |             ^^\n   = help: choose another node_port"
        );
    }

    #[test]
    fn at_most_50_errors_are_shown() {
        let src = Source::new("f", "a\n".repeat(60));
        let all = |n: usize| {
            let diags = (0..n)
                .map(|i| src.diagnostic(2 * i..2 * i + 1, "bad", "h"))
                .collect();
            ConfigError::new(diags).to_string()
        };
        let fifty = all(50);
        assert_eq!(fifty.matches("error: bad").count(), 50);
        assert!(!fifty.contains("more errors"), "{fifty}");
        let sixty = all(60);
        assert_eq!(sixty.matches("error: bad").count(), 50);
        assert!(sixty.contains(" --> f:50:1\n"), "{sixty}");
        assert!(!sixty.contains(" --> f:51:1\n"), "{sixty}");
        assert!(
            sixty.ends_with("\n\nerror: 10 more errors not shown; fix the ones above first"),
            "{sixty}"
        );
    }

    #[test]
    fn a_long_line_is_cut_around_the_marks() {
        let text = format!("x = {}\"é\"{}\n", "[".repeat(300), "]".repeat(300));
        let src = Source::new("f", text.clone());
        let at = text.find('"').unwrap_or_default();
        let d = src.diagnostic(at..at + 4, "m", "h");
        assert_eq!((d.line, d.column, d.width), (1, 305, 3));
        let shown = d.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines[1], " --> f:1:305");
        // 30 characters before the marks, 120 shown in all.
        let expected = format!("...{}\"é\"{}...", "[".repeat(30), "]".repeat(87));
        assert_eq!(lines[3], format!("1 | {expected}"));
        assert_eq!(lines[4], format!("  | {}^^^", " ".repeat(33)));
        // Marks at the very end of a long line.
        let d = src.diagnostic(text.len() - 1..text.len(), "m", "h");
        let shown = d.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines[3], format!("1 | ...{}", "]".repeat(120)));
        assert_eq!(lines[4], format!("  | {}^", " ".repeat(123)));
    }

    #[test]
    fn span_past_end_and_multibyte_columns() {
        let src = Source::new("f", "a = \"é\" # x\nb");
        let d = src.diagnostic(8..100, "m", "h");
        assert_eq!((d.line, d.column, d.width), (1, 8, 4));
        let d = src.diagnostic(13..13, "m", "h");
        assert_eq!((d.line, d.column, d.width), (2, 1, 1));
    }

    #[test]
    fn errors_sorted_by_position() {
        let src = Source::new("f", "a\nb\nc");
        let err = ConfigError::new(vec![
            src.diagnostic(4..5, "c", "h"),
            src.diagnostic(0..1, "a", "h"),
            src.diagnostic(2..3, "b", "h"),
        ]);
        let order: Vec<_> = err.diagnostics.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(order, ["a", "b", "c"]);
        assert!(err.to_string().contains("\n\nerror: b\n"));
    }
}
