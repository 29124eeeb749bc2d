//! The desired state of a node (`node.yaml`).
//!
//! Two stages: serde reads the raw document (unknown keys and wrong types are
//! errors with their place), then `resolve` checks values and fills defaults
//! into a `Spec`. Nothing downstream validates again.
//!
//! Key names follow the GPU Operator's Helm values where the concept is the
//! same, so `driver.enabled: false` means what it means there.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::catalog::{Handler, StateDef};
use crate::diagnostic::{Diagnostic, Diagnostics, Source, nearest};

/// The spec used when `--config` is not given.
pub const DEFAULT_SPEC: &str = include_str!("../fixtures/specs/default.yaml");
pub const DEFAULT_SPEC_NAME: &str = "<embedded default spec>";

/// Spec switches a catalogue state may name in `enabledBy`.
pub const SWITCHES: &[&str] = &[
    "driver.enabled",
    "toolkit.enabled",
    "devicePlugin.enabled",
    "dcgmExporter.enabled",
    "gfd.enabled",
    "validator.enabled",
];

/// `toolkit.env` names gpuprov understands (the GPU Operator's containerd options).
pub const TOOLKIT_ENV: &[&str] = &[
    "CONTAINERD_CONFIG",
    "CONTAINERD_SOCKET",
    "CONTAINERD_RUNTIME_CLASS",
    "CONTAINERD_SET_AS_DEFAULT",
];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read spec {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid spec\n{0}")]
    Invalid(Diagnostics),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    driver: RawDriver,
    #[serde(default)]
    toolkit: RawToolkit,
    #[serde(default)]
    device_plugin: RawSwitch,
    #[serde(default)]
    dcgm_exporter: RawSwitch,
    #[serde(default)]
    gfd: RawSwitch,
    #[serde(default)]
    validator: RawSwitch,
    #[serde(default)]
    states: Vec<RawUserState>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSwitch {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDriver {
    enabled: Option<bool>,
    version: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToolkit {
    enabled: Option<bool>,
    #[serde(default)]
    env: Vec<RawEnvVar>,
}

/// `value` is read as text, so `value: true` and `value: "true"` are one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvVar {
    name: Spanned<String>,
    value: Spanned<String>,
}

/// A user's own state: an `exec` state with a check and an apply command.
#[derive(Debug, Deserialize)]
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

/// The validated desired state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Where it came from: a file path or the embedded default.
    pub source: String,
    pub driver: DriverSpec,
    pub toolkit: ToolkitSpec,
    pub device_plugin: bool,
    pub dcgm_exporter: bool,
    pub gfd: bool,
    pub validator: bool,
    /// The user's own states, in document order.
    #[serde(skip)]
    pub states: Vec<StateDef>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverSpec {
    /// false: gpuprov never installs a driver; one must be pre-installed.
    pub enabled: bool,
    /// The driver version to install when none is loaded (`535.161.08`).
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolkitSpec {
    pub enabled: bool,
    pub containerd: ContainerdOptions,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerdOptions {
    pub config: String,
    pub socket: String,
    pub runtime_class: String,
    pub set_as_default: bool,
}

impl Spec {
    /// The embedded default spec.
    pub fn default_spec() -> Spec {
        Spec::parse(&Source {
            name: DEFAULT_SPEC_NAME.to_string(),
            text: DEFAULT_SPEC.to_string(),
        })
        .expect("the embedded default spec is valid")
    }

    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Spec::parse(&Source {
            name: path.display().to_string(),
            text,
        })
    }

    pub fn parse(source: &Source) -> Result<Spec, SpecError> {
        let raw: RawSpec = if source.text.trim().is_empty() {
            // An empty file asks for every default.
            serde_saphyr::from_str("{}").expect("empty mapping")
        } else {
            serde_saphyr::from_str(&source.text)
                .map_err(|e| SpecError::Invalid(Diagnostic::from_yaml(source, &e).into()))?
        };
        resolve(raw, source).map_err(SpecError::Invalid)
    }

    /// The value of a switch named in `SWITCHES`.
    pub fn switch(&self, name: &str) -> Option<bool> {
        Some(match name {
            "driver.enabled" => self.driver.enabled,
            "toolkit.enabled" => self.toolkit.enabled,
            "devicePlugin.enabled" => self.device_plugin,
            "dcgmExporter.enabled" => self.dcgm_exporter,
            "gfd.enabled" => self.gfd,
            "validator.enabled" => self.validator,
            _ => return None,
        })
    }
}

fn resolve(raw: RawSpec, source: &Source) -> Result<Spec, Diagnostics> {
    let mut errors = Vec::new();

    let version = raw.driver.version.and_then(|v| {
        if is_driver_version(&v.value) {
            Some(v.value)
        } else {
            errors.push(
                Diagnostic::at_location(
                    source,
                    v.referenced,
                    format!("driver.version `{}` is not a driver version", v.value),
                )
                .with_help("write it as NVIDIA prints it, for example 535.161.08 or 550.54.15 (quote it in YAML)"),
            );
            None
        }
    });

    let containerd = resolve_toolkit_env(&raw.toolkit.env, source, &mut errors);

    let mut states = Vec::new();
    let mut seen = BTreeSet::new();
    let shared_source = Arc::new(source.clone());
    for user in raw.states {
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
        states.push(StateDef::from_user(
            user,
            Handler::Exec,
            shared_source.clone(),
        ));
    }

    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    Ok(Spec {
        source: source.name.clone(),
        driver: DriverSpec {
            enabled: raw.driver.enabled.unwrap_or(true),
            version,
        },
        toolkit: ToolkitSpec {
            enabled: raw.toolkit.enabled.unwrap_or(true),
            containerd,
        },
        device_plugin: raw.device_plugin.enabled.unwrap_or(true),
        dcgm_exporter: raw.dcgm_exporter.enabled.unwrap_or(true),
        gfd: raw.gfd.enabled.unwrap_or(true),
        validator: raw.validator.enabled.unwrap_or(true),
        states,
    })
}

fn resolve_toolkit_env(
    env: &[RawEnvVar],
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> ContainerdOptions {
    let mut options = ContainerdOptions {
        config: "/etc/containerd/config.toml".to_string(),
        socket: "/run/containerd/containerd.sock".to_string(),
        runtime_class: "nvidia".to_string(),
        set_as_default: false,
    };
    let mut seen = BTreeSet::new();
    for var in env {
        let (name, value) = (var.name.value.as_str(), var.value.value.trim());
        let bad_value =
            |message: String| Diagnostic::at_location(source, var.value.referenced, message);
        if !seen.insert(name) {
            errors.push(Diagnostic::at_location(
                source,
                var.name.referenced,
                format!("toolkit.env `{name}` is set twice"),
            ));
            continue;
        }
        match name {
            "CONTAINERD_CONFIG" | "CONTAINERD_SOCKET" => {
                if !value.starts_with('/') || value.split('/').any(|p| p == "..") {
                    errors.push(bad_value(format!(
                        "{name} must be an absolute path on the host without `..`, not `{value}`"
                    )));
                } else if name == "CONTAINERD_CONFIG" {
                    options.config = value.to_string();
                } else {
                    options.socket = value.to_string();
                }
            }
            "CONTAINERD_RUNTIME_CLASS" => match check_dns_label(value) {
                Ok(()) => options.runtime_class = value.to_string(),
                Err(why) => errors.push(bad_value(format!(
                    "CONTAINERD_RUNTIME_CLASS `{value}` {why}"
                ))),
            },
            "CONTAINERD_SET_AS_DEFAULT" => match value.to_ascii_lowercase().as_str() {
                "true" => options.set_as_default = true,
                "false" => options.set_as_default = false,
                _ => errors.push(
                    bad_value(format!(
                        "CONTAINERD_SET_AS_DEFAULT must be true or false, not `{value}`"
                    ))
                    .with_help("write `value: true` or `value: \"false\"`"),
                ),
            },
            other => {
                let diagnostic = Diagnostic::at_location(
                    source,
                    var.name.referenced,
                    format!("unknown toolkit.env name `{other}`"),
                );
                let help = match nearest(other, TOOLKIT_ENV.iter().copied()) {
                    Some(near) => format!(
                        "did you mean `{near}`? known names: {}",
                        TOOLKIT_ENV.join(", ")
                    ),
                    None => format!("known names: {}", TOOLKIT_ENV.join(", ")),
                };
                errors.push(diagnostic.with_help(help));
            }
        }
    }
    options
}

/// NVIDIA driver versions are two or three dot-separated numbers.
pub fn is_driver_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A state name becomes a label key (`gpuprov.io/<name>`), so it is a DNS-1123 label.
pub fn check_state_name(name: &str) -> Result<(), String> {
    check_dns_label(name)
}

fn check_dns_label(value: &str) -> Result<(), String> {
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
        Some((key, _)) if !key.is_empty() && !key.contains(char::is_whitespace) => Ok(()),
        _ => Err(format!(
            "opt-out label `{selector}` must be written key=value"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Spec, SpecError> {
        Spec::parse(&Source {
            name: "node.yaml".into(),
            text: text.into(),
        })
    }

    #[test]
    fn defaults_follow_the_gpu_operator() {
        let spec = parse("").unwrap();
        assert!(spec.driver.enabled && spec.toolkit.enabled && spec.device_plugin && spec.gfd);
        assert_eq!(
            spec.toolkit.containerd.config,
            "/etc/containerd/config.toml"
        );
        assert_eq!(spec.toolkit.containerd.runtime_class, "nvidia");
    }

    #[test]
    fn env_values_may_be_booleans_or_strings() {
        for value in ["true", "\"true\"", "\"True\""] {
            let spec = parse(&format!(
                "toolkit:\n  env:\n  - name: CONTAINERD_SET_AS_DEFAULT\n    value: {value}\n"
            ))
            .unwrap();
            assert!(spec.toolkit.containerd.set_as_default, "{value}");
        }
    }

    #[test]
    fn driver_versions_are_checked() {
        assert!(is_driver_version("535.161.08"));
        assert!(is_driver_version("550.54"));
        assert!(!is_driver_version("latest"));
        assert!(!is_driver_version("535..1"));
        assert!(!is_driver_version("535"));
    }
}
