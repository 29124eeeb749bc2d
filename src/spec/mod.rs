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

use crate::diagnostic::{Diagnostic, Diagnostics, Source, nearest};

mod cdi;
mod containerd;
mod device_plugin;
mod driver;
mod gpu_system;
mod health;
mod mig;
mod operands;
mod readiness;
mod remediation;
mod states;
mod toolkit;

pub use cdi::*;
pub use containerd::*;
pub use device_plugin::*;
pub use driver::*;
pub use gpu_system::*;
pub use health::*;
pub use mig::*;
pub use operands::*;
pub use readiness::*;
pub use remediation::*;
pub use states::*;
pub use toolkit::*;

/// The spec used when `--config` is not given.
pub const DEFAULT_SPEC: &str = include_str!("../../fixtures/specs/default.yaml");

pub const DEFAULT_SPEC_NAME: &str = "<embedded default spec>";

/// Spec switches a catalogue state may name in `enabledBy`.
pub const SWITCHES: &[&str] = &[
    "driver.enabled",
    "driver.rdma.enabled",
    "fabricManager.enabled",
    "persistence.enabled",
    "toolkit.enabled",
    "cdi.enabled",
    "devicePlugin.enabled",
    "dcgmExporter.enabled",
    "gfd.enabled",
    "validator.enabled",
    "remediation.enabled",
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
    containerd: RawContainerd,
    /// `containerd` or `crio` (or `auto`): which runtime gets the runtime class.
    runtime: Option<Spanned<EnvValue>>,
    #[serde(default)]
    crio: RawCrio,
    #[serde(default)]
    cdi: cdi::RawCdi,
    #[serde(default)]
    device_plugin: RawOperand,
    #[serde(default)]
    dcgm_exporter: RawOperand,
    #[serde(default)]
    gfd: RawOperand,
    #[serde(default)]
    validator: RawValidator,
    #[serde(default)]
    operands: RawOperands,
    #[serde(default)]
    readiness: readiness::RawReadiness,
    #[serde(default)]
    mig: mig::RawMig,
    #[serde(default)]
    health: health::RawHealth,
    #[serde(default)]
    remediation: remediation::RawRemediation,
    #[serde(default)]
    fabric_manager: gpu_system::RawFabricManager,
    #[serde(default)]
    persistence: gpu_system::RawPersistence,
    #[serde(default)]
    states: Vec<RawUserState>,
}

/// `value` is read as text, so `value: true` and `value: "true"` are one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvVar {
    name: Spanned<String>,
    value: Spanned<EnvValue>,
}

/// A `toolkit.env` value: a string, or a YAML boolean or number taken as
/// its text (the GPU Operator's values write `value: true`).
#[derive(Debug)]
struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = EnvValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a boolean")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// How specs and state files are read: a string field must be written as
/// a string when its text would read as a number or a boolean
/// (`version: 3.10` is refused with the quoted form to write; as a
/// number it would be 3.1), and booleans are YAML 1.2's `true`/`false`.
pub fn strict_yaml() -> serde_saphyr::Options {
    serde_saphyr::options! { no_schema: true, strict_booleans: true }
}

/// The validated desired state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Where it came from: a file path or the embedded default.
    pub source: String,
    pub driver: DriverSpec,
    pub toolkit: ToolkitSpec,
    pub containerd: ContainerdOptions,
    pub cdi: CdiSpec,
    pub device_plugin: OperandSpec,
    /// `devicePlugin.config`: the device plugin's configs by name.
    pub device_plugin_config: PluginConfigs,
    /// NVIDIA's device plugin, or gpuprov's DRA kubelet plugin.
    pub device_plugin_mode: PluginMode,
    /// `devicePlugin.kubeletDir`: where the kubelet keeps its plugin
    /// sockets (`plugins_registry/`, `plugins/`).
    pub kubelet_dir: String,
    pub dcgm_exporter: OperandSpec,
    /// Who serves the DCGM exporter's metrics.
    pub dcgm_exporter_mode: ExporterMode,
    /// Builtin: read NVML at most this often (seconds); none: every scrape.
    pub dcgm_exporter_interval: Option<u64>,
    pub gfd: OperandSpec,
    pub gfd_mode: GfdMode,
    pub validator: ValidatorSpec,
    pub operands: OperandsSpec,
    pub readiness: ReadinessSpec,
    pub mig: MigSpec,
    pub health: HealthSpec,
    pub remediation: RemediationSpec,
    pub fabric_manager: FabricManagerSpec,
    pub persistence: PersistenceSpec,
    /// The user's own states, in document order, checked (the catalogue
    /// makes them states: `Catalog::with_user_states`).
    #[serde(skip)]
    pub states: Vec<RawUserState>,
    /// The document they were written in, for their diagnostics.
    #[serde(skip)]
    pub states_source: Arc<Source>,
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
        let text =
            crate::host::read_user_file(path, crate::host::USER_FILE_CAP).map_err(|source| {
                SpecError::Read {
                    path: path.display().to_string(),
                    source,
                }
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
            serde_saphyr::from_str_with_options(&source.text, strict_yaml())
                .map_err(|e| SpecError::Invalid(Diagnostic::from_yaml(source, &e).into()))?
        };
        resolve(raw, source).map_err(SpecError::Invalid)
    }

    /// The value of a switch named in `SWITCHES`.
    pub fn switch(&self, name: &str) -> Option<bool> {
        Some(match name {
            "driver.enabled" => self.driver.enabled,
            "driver.rdma.enabled" => self.driver.rdma,
            "fabricManager.enabled" => self.fabric_manager.enabled,
            "persistence.enabled" => self.persistence.enabled,
            "toolkit.enabled" => self.toolkit.enabled,
            "cdi.enabled" => self.cdi.enabled,
            "devicePlugin.enabled" => self.device_plugin.enabled,
            "dcgmExporter.enabled" => self.dcgm_exporter.enabled,
            "gfd.enabled" => self.gfd.enabled,
            "validator.enabled" => self.validator.enabled,
            "remediation.enabled" => self.remediation.enabled,
            _ => return None,
        })
    }
}

fn resolve(raw: RawSpec, source: &Source) -> Result<Spec, Diagnostics> {
    let mut errors = Vec::new();

    let driver = resolve_driver(&raw.driver, source, &mut errors);

    // Built in by default: GFD's DaemonSet needs NFD to publish its labels,
    // which a bare cluster does not have.
    let gfd_mode = choose(
        "gfd.mode",
        &raw.gfd.mode,
        &[
            ("builtin", GfdMode::Builtin),
            ("daemonset", GfdMode::Daemonset),
        ],
        GfdMode::Builtin,
        source,
        &mut errors,
    );
    // The operands' sections share one raw type; a key that belongs to
    // one of them is refused in the others.
    let config_help = "devicePlugin.config holds the device plugin's (and GFD's) configs";
    let interval_help =
        "dcgmExporter.sampleIntervalSeconds sets how often the built-in exporter reads NVML";
    let misplaced = [
        (
            "dcgmExporter.config",
            raw.dcgm_exporter.config.as_ref().map(|c| c.referenced),
            config_help,
        ),
        (
            "gfd.config",
            raw.gfd.config.as_ref().map(|c| c.referenced),
            config_help,
        ),
        (
            "dcgmExporter.kubeletDir",
            raw.dcgm_exporter.kubelet_dir.as_ref().map(|d| d.referenced),
            "devicePlugin.kubeletDir says where the kubelet keeps its plugin sockets",
        ),
        (
            "gfd.kubeletDir",
            raw.gfd.kubelet_dir.as_ref().map(|d| d.referenced),
            "devicePlugin.kubeletDir says where the kubelet keeps its plugin sockets",
        ),
        (
            "devicePlugin.sampleIntervalSeconds",
            raw.device_plugin
                .sample_interval_seconds
                .as_ref()
                .map(|i| i.referenced),
            interval_help,
        ),
        (
            "gfd.sampleIntervalSeconds",
            raw.gfd
                .sample_interval_seconds
                .as_ref()
                .map(|i| i.referenced),
            interval_help,
        ),
    ];
    for (key, location, help) in misplaced {
        if let Some(location) = location {
            errors.push(
                Diagnostic::at_location(source, location, format!("{key} is not a setting"))
                    .with_help(help),
            );
        }
    }
    let dcgm_exporter_mode = choose(
        "dcgmExporter.mode",
        &raw.dcgm_exporter.mode,
        &[
            ("operand", ExporterMode::Operand),
            ("builtin", ExporterMode::Builtin),
        ],
        ExporterMode::Operand,
        source,
        &mut errors,
    );
    let device_plugin_mode = choose(
        "devicePlugin.mode",
        &raw.device_plugin.mode,
        &[("operand", PluginMode::Operand), ("dra", PluginMode::Dra)],
        PluginMode::Operand,
        source,
        &mut errors,
    );
    let kubelet_dir = host_dir(
        "devicePlugin.kubeletDir",
        &raw.device_plugin.kubelet_dir,
        DEFAULT_KUBELET_DIR,
        source,
        &mut errors,
    );
    let dcgm_exporter_interval = raw
        .dcgm_exporter
        .sample_interval_seconds
        .is_some()
        .then(|| {
            seconds(
                &raw.dcgm_exporter.sample_interval_seconds,
                "dcgmExporter.sampleIntervalSeconds",
                1,
                source,
                &mut errors,
            )
        });
    let device_plugin = resolve_operand(
        "devicePlugin",
        &raw.device_plugin,
        DEVICE_PLUGIN_IMAGE,
        source,
        &mut errors,
    );
    let device_plugin_config = device_plugin::resolve_plugin_configs(
        raw.device_plugin.config.as_ref(),
        source,
        &mut errors,
    );
    let dcgm_exporter = resolve_operand(
        "dcgmExporter",
        &raw.dcgm_exporter,
        DCGM_EXPORTER_IMAGE,
        source,
        &mut errors,
    );
    let gfd = resolve_operand("gfd", &raw.gfd, GFD_IMAGE, source, &mut errors);
    let validator = resolve_validator(&raw.validator, source, &mut errors);
    let operands = resolve_operands(&raw.operands, source, &mut errors);
    let containerd = resolve_containerd(
        &raw.containerd,
        &Others {
            runtime: raw.runtime.as_ref(),
            crio: &raw.crio,
        },
        &raw.toolkit.env,
        source,
        &mut errors,
    );
    let toolkit = resolve_toolkit(&raw.toolkit, source, &mut errors);
    let cdi = cdi::resolve_cdi(
        &raw.cdi,
        &containerd.runtime_class,
        device_plugin_mode,
        source,
        &mut errors,
    );
    let readiness = readiness::resolve_readiness(&raw.readiness, source, &mut errors);
    let mig = mig::resolve_mig(&raw.mig, source, &mut errors);
    let health = health::resolve_health(&raw.health, source, &mut errors);
    let remediation =
        remediation::resolve_remediation(&raw.remediation, &health, source, &mut errors);
    let fabric_manager = gpu_system::resolve_fabric_manager(
        &raw.fabric_manager,
        driver.install.as_ref(),
        source,
        &mut errors,
    );
    let persistence = gpu_system::resolve_persistence(&raw.persistence);

    let states = resolve_states(raw.states, source, &mut errors);
    let shared_source = Arc::new(source.clone());

    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    Ok(Spec {
        source: source.name.clone(),
        driver,
        toolkit,
        containerd,
        cdi,
        device_plugin,
        device_plugin_config,
        device_plugin_mode,
        kubelet_dir,
        dcgm_exporter,
        dcgm_exporter_mode,
        dcgm_exporter_interval,
        gfd,
        gfd_mode,
        validator,
        operands,
        readiness,
        mig,
        health,
        remediation,
        fabric_manager,
        persistence,
        states,
        states_source: shared_source,
    })
}

/// The longest wait a spec or a flag may ask for: a year. Longer ones are
/// mistakes, and past a few hundred years a deadline overflows the clock.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// A number of seconds from the spec: at least 1 and at most `MAX_SECONDS`,
/// `default` when it is not given.
/// One of `choices` by its spec name; `default` when not given. Another
/// word is an error naming the key and every choice (`gfd.mode must be
/// builtin or daemonset, not `x``).
fn choose<T: Copy>(
    key: &str,
    given: &Option<Spanned<String>>,
    choices: &[(&str, T)],
    default: T,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> T {
    let Some(given) = given else {
        return default;
    };
    if let Some((_, value)) = choices.iter().find(|(name, _)| *name == given.value) {
        return *value;
    }
    let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
    let (last, rest) = names.split_last().expect("choices are given");
    let listed = if rest.is_empty() {
        last.to_string()
    } else {
        format!("{} or {last}", rest.join(", "))
    };
    errors.push(Diagnostic::at_location(
        source,
        given.referenced,
        format!("{key} must be {listed}, not `{}`", given.value),
    ));
    default
}

/// `<key>.url` and `<key>.sha256` checked into a pinned artifact.
fn artifact(
    key: &str,
    url: &Spanned<String>,
    sha256: Option<&Spanned<String>>,
    allow_insecure_http: bool,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> Option<crate::download::Artifact> {
    let at = |v: &Spanned<String>, message: String| {
        Diagnostic::at_location(source, v.referenced, message)
    };
    if !["https://", "http://", "file://"]
        .iter()
        .any(|p| url.value.starts_with(p))
    {
        errors.push(at(
            url,
            format!(
                "{key}.url `{}` is not https://, http:// or file://",
                url.value
            ),
        ));
        return None;
    }
    match sha256 {
        None => {
            errors.push(
                at(url, format!("{key}.url needs {key}.sha256")).with_help(
                    "gpuprov runs nothing it cannot verify: add `sha256: <64 hex digits>`",
                ),
            );
            None
        }
        Some(sha) if sha.value.len() != 64 || !sha.value.bytes().all(|b| b.is_ascii_hexdigit()) => {
            errors.push(at(
                sha,
                format!("{key}.sha256 `{}` is not 64 hex digits", sha.value),
            ));
            None
        }
        Some(sha) => Some(crate::download::Artifact {
            url: url.value.clone(),
            sha256: sha.value.to_lowercase(),
            allow_insecure_http,
        }),
    }
}

fn seconds(
    value: &Option<Spanned<u64>>,
    key: &str,
    default: u64,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> u64 {
    match value {
        None => default,
        Some(t) if t.value == 0 => {
            errors.push(Diagnostic::at_location(
                source,
                t.referenced,
                format!("{key} must be at least 1"),
            ));
            default
        }
        Some(t) if t.value > MAX_SECONDS => {
            errors.push(Diagnostic::at_location(
                source,
                t.referenced,
                format!("{key} must be at most {MAX_SECONDS} (a year)"),
            ));
            default
        }
        Some(t) => t.value,
    }
}

/// Host paths in the spec are absolute and never climb with `..`.
/// A directory on the host from the spec, without its trailing `/`;
/// `default` when not given. One that is not an absolute host path is an
/// error at its place.
fn host_dir(
    key: &str,
    given: &Option<Spanned<String>>,
    default: &str,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> String {
    let Some(dir) = given else {
        return default.to_string();
    };
    if let Err(problem) = check_host_path(&dir.value) {
        errors.push(Diagnostic::at_location(
            source,
            dir.referenced,
            format!("{key} {problem}"),
        ));
    }
    dir.value.trim_end_matches('/').to_string()
}

fn check_host_path(value: &str) -> Result<(), String> {
    if value.starts_with('/') && !value.split('/').any(|p| p == "..") {
        Ok(())
    } else {
        Err(format!(
            "must be an absolute path on the host without `..`, not `{value}`"
        ))
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
        assert!(
            spec.driver.enabled
                && spec.toolkit.enabled
                && spec.device_plugin.enabled
                && spec.gfd.enabled
        );
        assert_eq!(
            spec.device_plugin.image,
            "nvcr.io/nvidia/k8s-device-plugin:v0.17.0"
        );
        assert_eq!(spec.containerd.config, "/etc/containerd/config.toml");
        assert_eq!(spec.containerd.runtime_class, "nvidia");
    }

    #[test]
    fn env_values_may_be_booleans_or_strings() {
        for value in ["true", "\"true\"", "\"True\""] {
            let spec = parse(&format!(
                "toolkit:\n  env:\n  - name: CONTAINERD_SET_AS_DEFAULT\n    value: {value}\n"
            ))
            .unwrap();
            assert!(spec.containerd.set_as_default, "{value}");
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
