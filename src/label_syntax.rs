//! Kubernetes' label syntax, checked for every label gpuprov publishes or
//! reads from a user (the catalogue, `--node-labels`, selectors): a label
//! the API server would refuse, or a newline NFD's feature file would
//! take as a line, never gets out.

/// Checks a label key against Kubernetes' syntax: an optional DNS
/// subdomain prefix and `/`, then a name of at most 63 characters,
/// alphanumeric at both ends, with `-`, `_` and `.` inside.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let label_ok = |part: &str| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        };
        if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(label_ok) {
            return Err(format!(
                "label key {key:?}: its prefix {prefix:?} is not a DNS subdomain (lower-case letters, digits, `-` and `.`, at most 253 characters)"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("label key {key:?} has no name"));
    }
    check_name_part(name).map_err(|why| format!("label key {key:?}: its name {why}"))
}

/// Checks a label value: empty, or at most 63 characters, alphanumeric at
/// both ends, with `-`, `_` and `.` inside.
pub fn check_label_value(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name_part(value).map_err(|why| format!("label {key}: its value {value:?} {why}"))
}

pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    check_label_key(key)?;
    check_label_value(key, value)
}

fn check_name_part(part: &str) -> Result<(), String> {
    if part.len() > 63 {
        return Err(format!("is {} characters, more than 63", part.len()));
    }
    let edge = |b: u8| b.is_ascii_alphanumeric();
    let bytes = part.as_bytes();
    if !edge(bytes[0]) || !edge(bytes[bytes.len() - 1]) {
        return Err("must begin and end with a letter or digit".to_string());
    }
    if let Some(bad) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!(
            "has {bad:?}: only letters, digits, `-`, `_` and `.` are allowed"
        ));
    }
    Ok(())
}
