//! File-name patterns with the syntax of Go's `filepath.Match`, as
//! containerd's `imports` globs use them, and whether an `imports` entry
//! names a path.

/// One of Go's `filepath.Match` pattern elements.
#[derive(Debug)]
enum Token {
    Star,
    AnyChar,
    Char(char),
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Star => true,
            Token::AnyChar => true,
            Token::Char(want) => c == *want,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
            }
        }
    }
}

/// A file-name pattern with Go's syntax: `*`, `?`, `[a-z]`, `[^a]`, `\x`.
#[derive(Debug)]
pub struct Pattern(Vec<Token>);

impl Pattern {
    /// `None` for a name without wildcards; an error for a malformed one
    /// (containerd refuses those too).
    pub fn parse(text: &str) -> Result<Option<Pattern>, String> {
        if !text.contains(['*', '?', '[', '\\']) {
            return Ok(None);
        }
        let bad = || format!("{text:?} is not a valid glob (Go's filepath.Match syntax)");
        // A class member: `-` and `]` only escaped, as Go requires.
        let member = |chars: &mut std::iter::Peekable<std::str::Chars>| match chars.next() {
            None | Some('-' | ']') => None,
            Some('\\') => chars.next(),
            Some(c) => Some(c),
        };
        let mut chars = text.chars().peekable();
        let mut tokens = Vec::new();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => Token::Star,
                '?' => Token::AnyChar,
                '\\' => Token::Char(chars.next().ok_or_else(bad)?),
                '[' => {
                    let negated = chars.next_if_eq(&'^').is_some();
                    let mut ranges = Vec::new();
                    while ranges.is_empty() || chars.next_if_eq(&']').is_none() {
                        let lo = member(&mut chars).ok_or_else(bad)?;
                        let hi = match chars.next_if_eq(&'-') {
                            Some(_) => member(&mut chars).ok_or_else(bad)?,
                            None => lo,
                        };
                        if lo > hi {
                            return Err(bad());
                        }
                        ranges.push((lo, hi));
                    }
                    Token::Class { negated, ranges }
                }
                c => Token::Char(c),
            });
        }
        Ok(Some(Pattern(tokens)))
    }

    /// Whether `name` (one path component) matches. Iterative, with one
    /// backtrack point per star: linear in practice, never exponential.
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        let tokens = &self.0;
        let (mut t, mut n) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match tokens.get(t) {
                Some(Token::Star) => {
                    star = Some((t + 1, n));
                    t += 1;
                    continue;
                }
                Some(token) if token.matches(name[n]) => {
                    t += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                // The last star takes one more character, and the rest of
                // the pattern is tried again from there.
                Some((after, from)) => {
                    star = Some((after, from + 1));
                    t = after;
                    n = from + 1;
                }
                None => return false,
            }
        }
        tokens[t..].iter().all(|token| matches!(token, Token::Star))
    }
}

/// Whether an `imports` entry names `path`, directly or as a glob.
pub fn entry_covers(entry: &str, path: &str) -> bool {
    let entry: Vec<&str> = entry.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    entry.len() == path.len()
        && entry
            .iter()
            .zip(&path)
            .all(|(e, p)| match Pattern::parse(e) {
                Ok(Some(pattern)) => pattern.matches(p),
                Ok(None) => e == p,
                Err(_) => false,
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().unwrap().matches(name)
    }

    #[test]
    fn patterns_match_as_gos_filepath_match_does() {
        assert!(matches("*.toml", "99-nvidia.toml"));
        assert!(matches("*.toml", ".hidden.toml"));
        assert!(!matches("*.toml", "99-nvidia.toml.bak"));
        assert!(matches("9?-*.toml", "99-nvidia.toml"));
        assert!(matches("[0-9][0-9]-*", "10-site"));
        assert!(!matches("[^0-9]*", "10-site"));
        assert!(matches("a\\*b", "a*b"));
        assert!(!matches("a\\*b", "axb"));
        assert!(Pattern::parse("[a-").is_err());
        assert!(Pattern::parse("abc").unwrap().is_none());
        // Many stars against a long name that fails at the end: a
        // recursive matcher takes exponential time here.
        let name = "a".repeat(200);
        assert!(!matches(&format!("{}b", "*a".repeat(30)), &name));
    }

    #[test]
    fn entries_cover_paths_directly_or_as_globs() {
        let path = "/etc/containerd/conf.d/99-nvidia.toml";
        assert!(entry_covers("/etc/containerd/conf.d/*.toml", path));
        assert!(entry_covers(path, path));
        assert!(!entry_covers("/etc/containerd/*.toml", path));
        assert!(!entry_covers("/etc/containerd/conf.d/*.conf", path));
        assert!(entry_covers("/etc/containerd/*/9?-nvidia.toml", path));
    }
}
