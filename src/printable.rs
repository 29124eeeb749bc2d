//! Text that gpuprov did not write, made safe to print.

/// Text for a terminal or an event, with every control character
/// escaped (`\u{1b}`, `\n`): what gpuprov did not write itself (a label
/// value from the API server, a line of a host file) can neither move the
/// cursor nor start a line of its own, so it cannot pass for gpuprov's
/// `✓ … ready`. `keep_tabs` keeps tabs (a file's diff lines).
pub fn printable(text: &str, keep_tabs: bool) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_control() && !(keep_tabs && c == '\t');
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' if escaped(c) => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' if escaped(c) => out.push_str("\\t"),
            c if escaped(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}
