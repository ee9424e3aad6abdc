//! Configuration errors that point at the file, line and column they concern.

use std::fmt;
use std::ops::Range;
use std::path::Path;

/// A configuration problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    /// What the problem concerns, e.g. `route "api"`; empty when nothing narrower applies.
    pub context: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.col)?;
        }
        if !self.context.is_empty() {
            write!(f, "{}: ", self.context)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// All problems found in one file; a config is refused if there is any.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Turns byte offsets of one source text into `line:col` (1-based, columns in characters).
pub struct Locator<'a> {
    file: String,
    src: &'a str,
}

impl<'a> Locator<'a> {
    pub fn new(file: &Path, src: &'a str) -> Self {
        Locator {
            file: file.display().to_string(),
            src,
        }
    }

    pub fn error(
        &self,
        span: Range<usize>,
        context: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, col) = self.line_col(span.start);
        ConfigError {
            file: self.file.clone(),
            line,
            col,
            context: context.to_string(),
            message: message.into(),
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let before = self.src.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before
            .get(line_start..)
            .map(|s| s.chars().count())
            .unwrap_or(0)
            + 1;
        (line, col)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "a = 1\nbb = 2\n";
        let loc = Locator::new(Path::new("f.toml"), src);
        let e = loc.error(6..8, "route \"x\"", "bad");
        assert_eq!(e.to_string(), "f.toml:2:1: route \"x\": bad");
        let e = loc.error(11..12, "", "bad");
        assert_eq!((e.line, e.col), (2, 6));
    }
}
