//! Errors in a user's YAML, shown the way a compiler shows them: the file,
//! line and column, the offending line with a caret, and a hint.

use std::fmt;

/// A named YAML document: a file path, or `<embedded …>` for built-ins.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// One error at one place in a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
    /// The source line the error is on, for the snippet.
    pub snippet: Option<String>,
    /// How many characters the caret underlines.
    pub width: usize,
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error at a 1-based line and column of `source`.
    pub fn at(
        source: &Source,
        line: u32,
        column: u32,
        width: usize,
        message: impl Into<String>,
    ) -> Diagnostic {
        let snippet = line
            .checked_sub(1)
            .and_then(|i| source.text.lines().nth(i as usize))
            .map(str::to_string);
        Diagnostic {
            file: source.name.clone(),
            line,
            column,
            message: message.into(),
            snippet,
            width: width.max(1),
            help: None,
        }
    }

    /// An error at a serde-saphyr location.
    pub fn at_location(
        source: &Source,
        location: serde_saphyr::Location,
        message: impl Into<String>,
    ) -> Diagnostic {
        let width = location.span().len() as usize;
        Diagnostic::at(
            source,
            location.line() as u32,
            location.column() as u32,
            width,
            message,
        )
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// Turns a serde-saphyr error into a diagnostic, suggesting the nearest
    /// valid key for an unknown one.
    pub fn from_yaml(source: &Source, err: &serde_saphyr::Error) -> Diagnostic {
        let inner = err.without_snippet();
        let (message, help) = match inner {
            serde_saphyr::Error::SerdeUnknownField {
                field, expected, ..
            } => (
                format!("unknown key `{field}`"),
                Some(match nearest(field, expected.iter().copied()) {
                    Some(near) => format!(
                        "did you mean `{near}`? valid keys here: {}",
                        expected.join(", ")
                    ),
                    None => format!("valid keys here: {}", expected.join(", ")),
                }),
            ),
            other => (plain_message(other), None),
        };
        let diagnostic = match err.location() {
            Some(location) if location.line() > 0 => {
                Diagnostic::at_location(source, location, message)
            }
            _ => Diagnostic {
                file: source.name.clone(),
                line: 1,
                column: 1,
                message,
                snippet: None,
                width: 1,
                help: None,
            },
        };
        Diagnostic { help, ..diagnostic }
    }
}

/// serde-saphyr's message without its own "line N column M:" prefix and
/// snippet, since the diagnostic shows both itself.
fn plain_message(err: &serde_saphyr::Error) -> String {
    let options = serde_saphyr::render_options! { snippets: serde_saphyr::SnippetMode::Off };
    let text = err.render_with_options(options);
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    let text = match text.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") && head.contains(" column ") => rest,
        _ => text,
    };
    // Some messages end with their own " at line N, column M" suffix.
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text,
    };
    humane(text.trim())
}

/// Rewords the parser's messages that speak to a programmer, not a user.
fn humane(message: &str) -> String {
    if let Some(key) = message.strip_prefix("duplicate mapping key: ") {
        let key = key.split(',').next().unwrap_or(key);
        return format!("key `{key}` appears twice in this mapping");
    }
    if message.starts_with("multiple YAML documents detected") {
        return "a second YAML document starts here; a spec is one document".to_string();
    }
    if message == "expected string scalar" {
        return "expected a single value here, not a list or mapping".to_string();
    }
    if let Some(rest) = message.strip_prefix("The string value [")
        && let Some(text) = rest.strip_suffix("] must be quoted")
    {
        return format!(
            "write this as a string, \"{text}\": unquoted, YAML reads it as a number or a boolean"
        );
    }
    match message {
        "expected sequence start" => "expected a list here".to_string(),
        "expected mapping start" => "expected a mapping (key: value lines) here".to_string(),
        "invalid u64" | "invalid u32" | "invalid i64" => {
            "expected a whole number of seconds".to_string()
        }
        "invalid boolean (strict mode expects true/false)" => "expected true or false".to_string(),
        _ => message.to_string(),
    }
}

/// The candidate closest to `word` by edit distance, when close enough to be
/// a likely typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&word.to_lowercase(), &c.to_lowercase()),
                c,
            )
        })
        .filter(|(distance, c)| *distance <= (c.len() / 3).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if let Some(line) = &self.snippet {
            let number = self.line.to_string();
            let pad = " ".repeat(number.len());
            let caret_pad = " ".repeat(self.column.saturating_sub(1) as usize);
            write!(
                f,
                "\n {pad} |\n {number} | {line}\n {pad} | {caret_pad}{}",
                "^".repeat(self.width)
            )?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

/// One or more diagnostics, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Diagnostics {
        Diagnostics(vec![d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_and_ignores_strangers() {
        let keys = ["enabled", "version"];
        assert_eq!(nearest("verison", keys), Some("version"));
        assert_eq!(nearest("Enabled", keys), Some("enabled"));
        assert_eq!(nearest("repository", keys), None);
    }

    #[test]
    fn renders_a_caret_under_the_place() {
        let source = Source {
            name: "node.yaml".into(),
            text: "driver:\n  verison: x\n".into(),
        };
        let text = Diagnostic::at(&source, 2, 3, 7, "unknown key `verison`")
            .with_help("did you mean `version`?")
            .to_string();
        assert_eq!(
            text,
            "node.yaml:2:3: unknown key `verison`\n   |\n 2 |   verison: x\n   |   ^^^^^^^\n  = help: did you mean `version`?"
        );
    }
}
