//! The Container Device Interface spec's rules, checked on a parsed spec
//! file: written here from the published spec (cncf-tags/
//! container-device-interface, SPEC.md and schema/schema.json, spec
//! version 1.1.0), not taken from gpuprov's code, so that a spec gpuprov
//! writes is held to what CDI consumers accept.

use serde_json::Value;

/// Released spec versions, oldest first.
const VERSIONS: [&str; 8] = [
    "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0",
];

const HOOK_NAMES: [&str; 5] = [
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

fn version_index(version: &str) -> Option<usize> {
    VERSIONS.iter().position(|v| *v == version)
}

/// Every rule broken by `spec`, each with where; empty when it is valid.
pub fn problems(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(top) = spec.as_object() else {
        return vec!["the document is not a mapping".into()];
    };
    // Loading fails on unknown fields (SPEC.md, "Released versions").
    for key in top.keys() {
        if ![
            "cdiVersion",
            "kind",
            "annotations",
            "devices",
            "containerEdits",
        ]
        .contains(&key.as_str())
        {
            out.push(format!("unknown field `{key}`"));
        }
    }
    // The lowest version each feature in use needs.
    let mut needs: Vec<(&str, &str)> = Vec::new();
    let version = top.get("cdiVersion").and_then(Value::as_str);
    match version {
        None => out.push("cdiVersion is required, a string".into()),
        Some(v) if version_index(v).is_none() => {
            out.push(format!("cdiVersion {v} is not a released spec version"))
        }
        Some(_) => {}
    }
    match top.get("kind").and_then(Value::as_str) {
        None => out.push("kind is required, a string".into()),
        Some(kind) => check_kind(kind, &mut out, &mut needs),
    }
    if top.contains_key("annotations") {
        needs.push(("0.6.0", "annotations"));
    }
    match top.get("devices").and_then(Value::as_array) {
        None => out.push("devices is required, an array".into()),
        Some(devices) if devices.is_empty() => {
            out.push("devices must have at least one entry".into())
        }
        Some(devices) => {
            let mut names = std::collections::BTreeSet::new();
            for (i, device) in devices.iter().enumerate() {
                let at = format!("devices[{i}]");
                let Some(device) = device.as_object() else {
                    out.push(format!("{at} is not a mapping"));
                    continue;
                };
                for key in device.keys() {
                    if !["name", "annotations", "containerEdits"].contains(&key.as_str()) {
                        out.push(format!("{at}: unknown field `{key}`"));
                    }
                }
                if device.contains_key("annotations") {
                    needs.push(("0.6.0", "device annotations"));
                }
                match device.get("name").and_then(Value::as_str) {
                    None => out.push(format!("{at}: name is required, a string")),
                    Some(name) => {
                        check_device_name(name, &at, &mut out, &mut needs);
                        if !names.insert(name.to_string()) {
                            out.push(format!("{at}: device name `{name}` is used twice"));
                        }
                    }
                }
                match device.get("containerEdits") {
                    None => out.push(format!("{at}: containerEdits is required")),
                    Some(edits) => {
                        check_edits(edits, &format!("{at}.containerEdits"), &mut out, &mut needs)
                    }
                }
            }
        }
    }
    if let Some(edits) = top.get("containerEdits") {
        check_edits(edits, "containerEdits", &mut out, &mut needs);
    }
    if let Some(have) = version.and_then(version_index) {
        for (need, what) in needs {
            if version_index(need).expect("listed") > have {
                out.push(format!(
                    "{what} needs cdiVersion {need} or later, not {}",
                    VERSIONS[have]
                ));
            }
        }
    }
    out
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// `vendor.com/class`: a DNS subdomain, a slash, and a name of at most 63
/// characters that begins and ends with a letter or digit, with `-`, `_`
/// and (from 0.6.0) `.` between.
fn check_kind(kind: &str, out: &mut Vec<String>, needs: &mut Vec<(&str, &str)>) {
    let Some((prefix, name)) = kind.split_once('/') else {
        out.push(format!(
            "kind `{kind}` has no vendor prefix (vendor.com/class)"
        ));
        return;
    };
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if prefix.len() > 253 || !prefix.split('.').all(label_ok) {
        out.push(format!("kind `{kind}`: `{prefix}` is not a DNS subdomain"));
    }
    let ends_ok =
        name.chars().next().is_some_and(is_alnum) && name.chars().last().is_some_and(is_alnum);
    if name.is_empty() || name.len() > 63 || !ends_ok {
        out.push(format!("kind `{kind}`: the class `{name}` must be 1 to 63 characters, beginning and ending with a letter or digit"));
    }
    if name.contains('/') || !name.chars().all(|c| is_alnum(c) || "-_.".contains(c)) {
        out.push(format!(
            "kind `{kind}`: the class `{name}` has a character outside letters, digits, -, _ and ."
        ));
    }
    if name.contains('.') {
        needs.push(("0.6.0", "a dot in the kind's class"));
    }
}

/// A device name begins and ends with a letter or digit (a digit first
/// from 0.5.0), with `-`, `_`, `.` between; the reference parser (pkg/
/// parser, `ValidateDeviceName`) also takes `:` between, which MIG device
/// names (`0:1`) use.
fn check_device_name(name: &str, at: &str, out: &mut Vec<String>, needs: &mut Vec<(&str, &str)>) {
    let first = name.chars().next();
    let last = name.chars().last();
    if !first.is_some_and(is_alnum) || !last.is_some_and(is_alnum) {
        out.push(format!(
            "{at}: device name `{name}` must begin and end with a letter or digit"
        ));
    }
    if !name.chars().all(|c| is_alnum(c) || "-_.:".contains(c)) {
        out.push(format!(
            "{at}: device name `{name}` has a character outside letters, digits, -, _, . and :"
        ));
    }
    if first.is_some_and(|c| c.is_ascii_digit()) {
        needs.push(("0.5.0", "a device name beginning with a digit"));
    }
}

fn strings(value: &Value, at: &str, out: &mut Vec<String>) -> Vec<String> {
    match value.as_array() {
        Some(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item.as_str() {
                Some(s) => Some(s.to_string()),
                None => {
                    out.push(format!("{at}[{i}] is not a string"));
                    None
                }
            })
            .collect(),
        None => {
            out.push(format!("{at} is not an array of strings"));
            Vec::new()
        }
    }
}

fn absolute(path: Option<&Value>, at: &str, required: bool, out: &mut Vec<String>) {
    match path.map(|p| p.as_str()) {
        None if required => out.push(format!("{at} is required")),
        None => {}
        Some(None) => out.push(format!("{at} is not a string")),
        Some(Some(p)) if !p.starts_with('/') => out.push(format!("{at} `{p}` is not absolute")),
        Some(Some(_)) => {}
    }
}

fn check_edits(edits: &Value, at: &str, out: &mut Vec<String>, needs: &mut Vec<(&str, &str)>) {
    let Some(edits) = edits.as_object() else {
        out.push(format!("{at} is not a mapping"));
        return;
    };
    for key in edits.keys() {
        match key.as_str() {
            "env" | "deviceNodes" | "mounts" | "hooks" => {}
            "intelRdt" | "additionalGids" => needs.push(("0.7.0", "intelRdt or additionalGids")),
            "netDevices" => needs.push(("1.1.0", "netDevices")),
            other => out.push(format!("{at}: unknown field `{other}`")),
        }
    }
    if let Some(env) = edits.get("env") {
        for (i, var) in strings(env, &format!("{at}.env"), out).iter().enumerate() {
            if var.split_once('=').is_none_or(|(name, _)| name.is_empty()) {
                out.push(format!("{at}.env[{i}] `{var}` is not VARNAME=VARVALUE"));
            }
        }
    }
    for (i, node) in edits
        .get("deviceNodes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{at}.deviceNodes[{i}]");
        absolute(node.get("path"), &format!("{at}.path"), true, out);
        if node.get("hostPath").is_some() {
            absolute(node.get("hostPath"), &format!("{at}.hostPath"), false, out);
            needs.push(("0.5.0", "deviceNodes.hostPath"));
        }
        if let Some(permissions) = node.get("permissions").and_then(Value::as_str)
            && !permissions.chars().all(|c| "rwm".contains(c))
        {
            out.push(format!(
                "{at}.permissions `{permissions}` is not made of r, w and m"
            ));
        }
        for key in node.as_object().into_iter().flat_map(|o| o.keys()) {
            if ![
                "path",
                "hostPath",
                "type",
                "major",
                "minor",
                "fileMode",
                "permissions",
                "uid",
                "gid",
            ]
            .contains(&key.as_str())
            {
                out.push(format!("{at}: unknown field `{key}`"));
            }
        }
    }
    for (i, mount) in edits
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{at}.mounts[{i}]");
        absolute(mount.get("hostPath"), &format!("{at}.hostPath"), true, out);
        absolute(
            mount.get("containerPath"),
            &format!("{at}.containerPath"),
            true,
            out,
        );
        if let Some(options) = mount.get("options") {
            strings(options, &format!("{at}.options"), out);
        }
        if mount.get("type").is_some() {
            needs.push(("0.4.0", "mounts.type"));
        }
        for key in mount.as_object().into_iter().flat_map(|o| o.keys()) {
            if !["hostPath", "containerPath", "options", "type"].contains(&key.as_str()) {
                out.push(format!("{at}: unknown field `{key}`"));
            }
        }
    }
    for (i, hook) in edits
        .get("hooks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{at}.hooks[{i}]");
        match hook.get("hookName").and_then(Value::as_str) {
            Some(name) if HOOK_NAMES.contains(&name) => {}
            Some(name) => out.push(format!(
                "{at}.hookName `{name}` is not one of {HOOK_NAMES:?}"
            )),
            None => out.push(format!("{at}.hookName is required")),
        }
        absolute(hook.get("path"), &format!("{at}.path"), true, out);
        for list in ["args", "env"] {
            if let Some(items) = hook.get(list) {
                strings(items, &format!("{at}.{list}"), out);
            }
        }
        if let Some(timeout) = hook.get("timeout")
            && !timeout
                .as_u64()
                .is_some_and(|t| t > 0 && t <= u64::from(u32::MAX))
        {
            out.push(format!("{at}.timeout must be a number of seconds above 0"));
        }
    }
}
