//! The spec's own `states`: `exec` states with a check and an apply
//! command, and the names and selectors they use.

use super::*;

/// A user's own state: an `exec` state with a check and an apply command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawUserState {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub after: Vec<Spanned<String>>,
    pub check: Spanned<String>,
    pub apply: Option<Spanned<String>>,
    #[serde(default)]
    pub opt_out_labels: Vec<Spanned<String>>,
}

/// A state name becomes a label key (`gpuprov.io/<name>`), so it is a DNS-1123 label.
pub fn check_state_name(name: &str) -> Result<(), String> {
    check_dns_label(name)
}

pub(super) fn check_dns_label(value: &str) -> Result<(), String> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if value.is_empty() || value.len() > 63 {
        Err("must be 1 to 63 characters".to_string())
    } else if !ok_chars {
        Err("may hold only lower-case letters, digits and `-`".to_string())
    } else if value.starts_with('-') || value.ends_with('-') {
        Err("must start and end with a letter or digit".to_string())
    } else {
        Ok(())
    }
}

/// An opt-out label is written `key=value`; the state is opted out when the
/// node carries exactly that label.
pub fn check_label_selector(selector: &str) -> Result<(), String> {
    match selector.split_once('=') {
        Some((key, value)) if !key.is_empty() => crate::label_syntax::check_label(key, value)
            .map_err(|why| format!("opt-out label `{selector}`: {why}")),
        _ => Err(format!(
            "opt-out label `{selector}` must be written key=value"
        )),
    }
}

/// The spec's own states checked (names, commands, selectors); the
/// catalogue makes them states.
pub(super) fn resolve_states(
    raw: Vec<RawUserState>,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> Vec<RawUserState> {
    let mut states = Vec::new();
    let mut seen = BTreeSet::new();
    for user in raw {
        let name = &user.name;
        if let Err(why) = check_state_name(&name.value) {
            errors.push(Diagnostic::at_location(
                source,
                name.referenced,
                format!("state name `{}` {why}", name.value),
            ));
        } else if !seen.insert(name.value.clone()) {
            errors.push(Diagnostic::at_location(
                source,
                name.referenced,
                format!("state `{}` is defined twice", name.value),
            ));
        }
        for command in std::iter::once(&user.check).chain(user.apply.as_ref()) {
            if command.value.trim().is_empty() {
                errors.push(Diagnostic::at_location(
                    source,
                    command.referenced,
                    "command is empty",
                ));
            }
        }
        for label in &user.opt_out_labels {
            if let Err(why) = check_label_selector(&label.value) {
                errors.push(Diagnostic::at_location(source, label.referenced, why));
            }
        }
        states.push(user);
    }
    states
}
