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

/// Where `toolkit.method: artifact` unpacks the toolkit by default.
pub const DEFAULT_TOOLKIT_DIR: &str = "/usr/local/nvidia/toolkit";

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

/// `toolkit.env` names gpuprov understands (the GPU Operator's containerd
/// options), each with the `containerd:` key that says the same.
pub const TOOLKIT_ENV: &[(&str, &str)] = &[
    ("CONTAINERD_CONFIG", "config"),
    ("CONTAINERD_SOCKET", "socket"),
    ("CONTAINERD_RUNTIME_CLASS", "runtimeClass"),
    ("CONTAINERD_SET_AS_DEFAULT", "setAsDefault"),
    ("RUNTIME_DROP_IN_CONFIG", "dropInConfig"),
    ("RUNTIME_RESTART_MODE", "restartMode"),
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
    states: Vec<RawUserState>,
}

/// An operand's section (`devicePlugin`, `dcgmExporter`, `gfd`), with the
/// GPU Operator's key names. `mode` belongs to `gfd` alone; `resolve` says
/// so when another section has it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOperand {
    enabled: Option<bool>,
    mode: Option<Spanned<String>>,
    repository: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    image_pull_policy: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<RawEnvVar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawValidator {
    enabled: Option<bool>,
    repository: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    image_pull_policy: Option<Spanned<String>>,
    timeout_seconds: Option<Spanned<u64>>,
    namespace: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOperands {
    deploy: Option<Spanned<String>>,
    static_pod_dir: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
struct RawDriver {
    enabled: Option<bool>,
    version: Option<Spanned<String>>,
    upgrade_policy: Option<Spanned<String>>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    blacklist_nouveau: bool,
    install: Option<Spanned<RawDriverInstall>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDriverInstall {
    method: Spanned<String>,
    url: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    allow_insecure_http: bool,
    package: Option<Spanned<String>>,
    package_version: Option<Spanned<String>>,
    download_timeout_seconds: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawToolkit {
    enabled: Option<bool>,
    #[serde(default)]
    env: Vec<RawEnvVar>,
    install_dir: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    package_manager: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    artifact: Option<Spanned<RawArtifact>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawArtifact {
    url: Spanned<String>,
    sha256: Spanned<String>,
    #[serde(default)]
    allow_insecure_http: bool,
}

/// Values are read as text (`setAsDefault: true` and `"true"` are one) and
/// checked by the same code as their `toolkit.env` twins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawContainerd {
    // Read as text, as their `toolkit.env` twins are: `setAsDefault: true`.
    config: Option<Spanned<EnvValue>>,
    socket: Option<Spanned<EnvValue>>,
    runtime_class: Option<Spanned<EnvValue>>,
    set_as_default: Option<Spanned<EnvValue>>,
    drop_in_config: Option<Spanned<EnvValue>>,
    restart_mode: Option<Spanned<EnvValue>>,
    restart_timeout_seconds: Option<Spanned<u64>>,
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

/// The validated desired state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Where it came from: a file path or the embedded default.
    pub source: String,
    pub driver: DriverSpec,
    pub toolkit: ToolkitSpec,
    pub containerd: ContainerdOptions,
    pub device_plugin: OperandSpec,
    pub dcgm_exporter: OperandSpec,
    pub gfd: OperandSpec,
    pub gfd_mode: GfdMode,
    pub validator: ValidatorSpec,
    pub operands: OperandsSpec,
    /// The user's own states, in document order, checked (the catalogue
    /// makes them states: `Catalog::with_user_states`).
    #[serde(skip)]
    pub states: Vec<RawUserState>,
    /// The document they were written in, for their diagnostics.
    #[serde(skip)]
    pub states_source: Arc<Source>,
}

/// One operand: whether it runs, and the container it runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperandSpec {
    pub enabled: bool,
    /// `repository/image:version` (`@version` for a `sha256:` digest).
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Added after the template's own arguments.
    pub args: Vec<String>,
    /// Set in the container, replacing a template variable of the same name.
    pub env: Vec<(String, String)>,
}

/// The vectorAdd validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidatorSpec {
    pub enabled: bool,
    /// The CUDA sample the validation pod runs.
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// How long the pod may take to succeed (pull, schedule, run).
    pub timeout_seconds: u64,
    /// Where the validation pod is created.
    pub namespace: String,
}

/// How operands are started on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperandsSpec {
    pub deploy: OperandDeploy,
    /// The kubelet's static pod directory (`staticPodPath`).
    pub static_pod_dir: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OperandDeploy {
    /// Node labels with an API server, static pods without one.
    Auto,
    /// `nvidia.com/gpu.deploy.<operand>=true` for the operands' DaemonSets.
    Labels,
    /// Manifests in the kubelet's static pod directory.
    StaticPods,
}

/// Each operand's default image: the versions `deploy/operands` runs.
pub const DEVICE_PLUGIN_IMAGE: (&str, &str, &str) =
    ("nvcr.io/nvidia", "k8s-device-plugin", "v0.17.0");
pub const DCGM_EXPORTER_IMAGE: (&str, &str, &str) = (
    "nvcr.io/nvidia/k8s",
    "dcgm-exporter",
    "3.3.9-3.6.1-ubuntu22.04",
);
/// GFD ships in the device plugin's image.
pub const GFD_IMAGE: (&str, &str, &str) = DEVICE_PLUGIN_IMAGE;
/// The seed's validation sample.
pub const VALIDATOR_IMAGE: (&str, &str, &str) = (
    "nvcr.io/nvidia/k8s",
    "cuda-sample",
    "vectoradd-cuda11.7.1-ubuntu20.04",
);
pub const DEFAULT_STATIC_POD_DIR: &str = "/etc/kubernetes/manifests";

/// Who publishes GPU Feature Discovery's labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GfdMode {
    /// gpuprov itself, from NVML (the `gpu-feature-discovery` state).
    Builtin,
    /// NVIDIA's GFD DaemonSet.
    Daemonset,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverSpec {
    /// false: gpuprov never installs a driver; one must be pre-installed.
    pub enabled: bool,
    /// The driver version to install when none is loaded (`535.161.08`).
    pub version: Option<String>,
    /// What to do when a different driver is loaded.
    pub upgrade_policy: UpgradePolicy,
    /// With `ifDifferent`: replace the driver even while GPU processes run.
    pub force: bool,
    /// Blacklist nouveau when it holds the GPU (then a reboot is needed).
    pub blacklist_nouveau: bool,
    pub install: Option<DriverInstall>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpgradePolicy {
    /// A loaded driver stays, whatever its version (the plan notes a mismatch).
    Never,
    /// A loaded driver of another version is replaced.
    IfDifferent,
}

/// How gpuprov installs the driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "camelCase")]
pub enum DriverInstall {
    /// NVIDIA's `.run` installer, pinned by sha256.
    Runfile {
        artifact: crate::download::Artifact,
        args: Vec<String>,
        download_timeout_seconds: u64,
    },
    /// The host's package manager, with the package pinned to a version.
    Package { package: String, version: String },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolkitSpec {
    /// false: the toolkit is pre-installed; gpuprov only checks it is there.
    pub enabled: bool,
    /// Where the toolkit's binaries are; the host's PATH when absent.
    pub install_dir: Option<String>,
    /// The package version to install (`1.17.8-1`); the newest when absent.
    pub version: Option<String>,
    /// The host's package manager; read from `/etc/os-release` when absent.
    pub package_manager: Option<PackageManager>,
    /// `toolkit.method: artifact`: a tarball of the binaries, pinned by
    /// sha256, unpacked into the install dir (instead of packages).
    pub artifact: Option<crate::download::Artifact>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageManager {
    Apt,
    Dnf,
    Yum,
    Zypper,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerdOptions {
    pub config: String,
    pub socket: String,
    pub runtime_class: String,
    pub set_as_default: bool,
    /// Write the runtime to this drop-in file (imported from the main
    /// config) instead of editing the main config.
    pub drop_in_config: Option<String>,
    pub restart_mode: RestartMode,
    pub restart_timeout_seconds: u64,
}

/// How containerd picks up a changed config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// `systemctl restart containerd` in the host.
    Systemd,
    /// SIGHUP to the process serving the socket; containerd exits and its
    /// service manager starts it again.
    Signal,
    /// Never restart; the change waits for someone else's restart.
    None,
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
            "toolkit.enabled" => self.toolkit.enabled,
            "devicePlugin.enabled" => self.device_plugin.enabled,
            "dcgmExporter.enabled" => self.dcgm_exporter.enabled,
            "gfd.enabled" => self.gfd.enabled,
            "validator.enabled" => self.validator.enabled,
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

    let upgrade_policy = match raw
        .driver
        .upgrade_policy
        .as_ref()
        .map(|p| (p.value.as_str(), p))
    {
        None | Some(("never", _)) => UpgradePolicy::Never,
        Some(("ifDifferent", _)) => UpgradePolicy::IfDifferent,
        Some((other, p)) => {
            errors.push(Diagnostic::at_location(
                source,
                p.referenced,
                format!("driver.upgradePolicy must be never or ifDifferent, not `{other}`"),
            ));
            UpgradePolicy::Never
        }
    };
    let install = raw.driver.install.as_ref().and_then(|install| {
        let at = |location, message: String| Diagnostic::at_location(source, location, message);
        let spec = &install.value;
        match spec.method.value.as_str() {
            "runfile" => {
                let url = match &spec.url {
                    Some(url) if ["https://", "http://", "file://"].iter().any(|s| url.value.starts_with(s)) => url.value.clone(),
                    Some(url) => {
                        errors.push(at(url.referenced, format!("driver.install.url `{}` is not https://, http:// or file://", url.value)));
                        return None;
                    }
                    None => {
                        errors.push(at(install.referenced, "driver.install with method runfile needs a url".to_string()));
                        return None;
                    }
                };
                let sha256 = match &spec.sha256 {
                    Some(sha) if sha.value.len() == 64 && sha.value.bytes().all(|b| b.is_ascii_hexdigit()) => sha.value.to_lowercase(),
                    Some(sha) => {
                        errors.push(at(sha.referenced, format!("driver.install.sha256 `{}` is not 64 hex digits", sha.value)));
                        return None;
                    }
                    None => {
                        errors.push(
                            at(install.referenced, "driver.install with method runfile needs its sha256".to_string())
                                .with_help("gpuprov runs nothing it cannot verify: add `sha256: <64 hex digits>`"),
                        );
                        return None;
                    }
                };
                Some(DriverInstall::Runfile {
                    artifact: crate::download::Artifact {
                        url,
                        sha256,
                        allow_insecure_http: spec.allow_insecure_http,
                    },
                    args: spec.args.clone(),
                    download_timeout_seconds: seconds(
                        &spec.download_timeout_seconds,
                        "driver.install.downloadTimeoutSeconds",
                        600,
                        source,
                        &mut errors,
                    ),
                })
            }
            "package" => match (&spec.package, &spec.package_version) {
                (Some(package), Some(version)) => Some(DriverInstall::Package {
                    package: package.value.clone(),
                    version: version.value.clone(),
                }),
                _ => {
                    errors.push(at(
                        install.referenced,
                        "driver.install with method package needs package and packageVersion".to_string(),
                    ));
                    None
                }
            },
            other => {
                errors.push(at(spec.method.referenced, format!("driver.install.method must be runfile or package, not `{other}`")));
                None
            }
        }
    });
    if let (Some(_), None, Some(at)) = (&install, &version, &raw.driver.install) {
        errors.push(Diagnostic::at_location(
            source,
            at.referenced,
            "driver.install needs driver.version: the version to verify once installed",
        ));
    }

    let gfd_mode = match raw.gfd.mode.as_ref() {
        None => GfdMode::Daemonset,
        Some(mode) => match mode.value.as_str() {
            "builtin" => GfdMode::Builtin,
            "daemonset" => GfdMode::Daemonset,
            other => {
                errors.push(Diagnostic::at_location(
                    source,
                    mode.referenced,
                    format!("gfd.mode must be builtin or daemonset, not `{other}`"),
                ));
                GfdMode::Daemonset
            }
        },
    };
    for (section, raw_operand) in [
        ("devicePlugin", &raw.device_plugin),
        ("dcgmExporter", &raw.dcgm_exporter),
    ] {
        if let Some(mode) = &raw_operand.mode {
            errors.push(
                Diagnostic::at_location(
                    source,
                    mode.referenced,
                    format!("{section}.mode is not a setting"),
                )
                .with_help("only gfd has a mode (builtin or daemonset)"),
            );
        }
    }
    let device_plugin = resolve_operand(
        "devicePlugin",
        &raw.device_plugin,
        DEVICE_PLUGIN_IMAGE,
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
    let containerd = resolve_containerd(&raw.containerd, &raw.toolkit.env, source, &mut errors);
    let toolkit = resolve_toolkit(&raw.toolkit, source, &mut errors);

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
        states.push(user);
    }

    if !errors.is_empty() {
        return Err(Diagnostics(errors));
    }
    Ok(Spec {
        source: source.name.clone(),
        driver: DriverSpec {
            enabled: raw.driver.enabled.unwrap_or(true),
            version,
            upgrade_policy,
            force: raw.driver.force,
            blacklist_nouveau: raw.driver.blacklist_nouveau,
            install,
        },
        toolkit,
        containerd,
        device_plugin,
        dcgm_exporter,
        gfd,
        gfd_mode,
        validator,
        operands,
        states,
        states_source: shared_source,
    })
}

/// `repository/image:version` from the three keys (defaults for those not
/// given); a `sha256:` version is a digest (`@sha256:…`).
fn resolve_image(
    section: &str,
    parts: [&Option<Spanned<String>>; 3],
    default: (&str, &str, &str),
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> String {
    let defaults = [default.0, default.1, default.2];
    let mut values = [String::new(), String::new(), String::new()];
    for (i, (key, part)) in ["repository", "image", "version"]
        .iter()
        .zip(parts)
        .enumerate()
    {
        values[i] = match part {
            None => defaults[i].to_string(),
            Some(given) => {
                let value = given.value.trim();
                let bad_char =
                    |c: char| c.is_whitespace() || (*key != "repository" && c == '/') || c == '@';
                if value.is_empty() || value.chars().any(bad_char) {
                    errors.push(Diagnostic::at_location(
                        source,
                        given.referenced,
                        format!("{section}.{key} `{}` is not an image {key}", given.value),
                    ));
                }
                value.trim_end_matches('/').to_string()
            }
        };
    }
    let [repository, image, version] = values;
    let separator = if version.starts_with("sha256:") {
        '@'
    } else {
        ':'
    };
    format!("{repository}/{image}{separator}{version}")
}

fn resolve_pull_policy(
    section: &str,
    policy: &Option<Spanned<String>>,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> Option<String> {
    let policy = policy.as_ref()?;
    match policy.value.as_str() {
        "Always" | "IfNotPresent" | "Never" => Some(policy.value.clone()),
        other => {
            errors.push(Diagnostic::at_location(
                source,
                policy.referenced,
                format!(
                    "{section}.imagePullPolicy must be Always, IfNotPresent or Never, not `{other}`"
                ),
            ));
            None
        }
    }
}

fn resolve_operand(
    section: &str,
    raw: &RawOperand,
    default_image: (&str, &str, &str),
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> OperandSpec {
    let image = resolve_image(
        section,
        [&raw.repository, &raw.image, &raw.version],
        default_image,
        source,
        errors,
    );
    let mut env: Vec<(String, String)> = Vec::new();
    for var in &raw.env {
        let name = var.name.value.as_str();
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            errors.push(Diagnostic::at_location(
                source,
                var.name.referenced,
                format!("{section}.env name `{name}` is not an environment variable name"),
            ));
        } else if env.iter().any(|(n, _)| n == name) {
            errors.push(Diagnostic::at_location(
                source,
                var.name.referenced,
                format!("{section}.env `{name}` is set twice"),
            ));
        } else {
            env.push((name.to_string(), var.value.value.0.clone()));
        }
    }
    OperandSpec {
        enabled: raw.enabled.unwrap_or(true),
        image,
        image_pull_policy: resolve_pull_policy(section, &raw.image_pull_policy, source, errors),
        args: raw.args.clone(),
        env,
    }
}

fn resolve_validator(
    raw: &RawValidator,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> ValidatorSpec {
    let image = resolve_image(
        "validator",
        [&raw.repository, &raw.image, &raw.version],
        VALIDATOR_IMAGE,
        source,
        errors,
    );
    let timeout_seconds = seconds(
        &raw.timeout_seconds,
        "validator.timeoutSeconds",
        300,
        source,
        errors,
    );
    let namespace = match &raw.namespace {
        Some(ns) => {
            if let Err(why) = check_dns_label(&ns.value) {
                errors.push(Diagnostic::at_location(
                    source,
                    ns.referenced,
                    format!("validator.namespace `{}` {why}", ns.value),
                ));
            }
            ns.value.clone()
        }
        None => "gpuprov".to_string(),
    };
    ValidatorSpec {
        enabled: raw.enabled.unwrap_or(true),
        image,
        image_pull_policy: resolve_pull_policy("validator", &raw.image_pull_policy, source, errors),
        timeout_seconds,
        namespace,
    }
}

fn resolve_operands(
    raw: &RawOperands,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> OperandsSpec {
    let deploy = match raw.deploy.as_ref() {
        None => OperandDeploy::Auto,
        Some(d) => match d.value.as_str() {
            "auto" => OperandDeploy::Auto,
            "labels" => OperandDeploy::Labels,
            "staticPods" => OperandDeploy::StaticPods,
            other => {
                errors.push(Diagnostic::at_location(
                    source,
                    d.referenced,
                    format!("operands.deploy must be auto, labels or staticPods, not `{other}`"),
                ));
                OperandDeploy::Auto
            }
        },
    };
    let static_pod_dir = match &raw.static_pod_dir {
        Some(dir) => {
            if let Err(why) = check_host_path(&dir.value) {
                errors.push(Diagnostic::at_location(
                    source,
                    dir.referenced,
                    format!("operands.staticPodDir {why}"),
                ));
            }
            dir.value.clone()
        }
        None => DEFAULT_STATIC_POD_DIR.to_string(),
    };
    OperandsSpec {
        deploy,
        static_pod_dir,
    }
}

fn resolve_toolkit(raw: &RawToolkit, source: &Source, errors: &mut Vec<Diagnostic>) -> ToolkitSpec {
    let at = |v: &Spanned<String>, message: String| {
        Diagnostic::at_location(source, v.referenced, message)
    };
    let install_dir = raw
        .install_dir
        .as_ref()
        .and_then(|dir| match check_host_path(&dir.value) {
            Ok(()) => Some(dir.value.clone()),
            Err(why) => {
                errors.push(at(dir, format!("toolkit.installDir {why}")));
                None
            }
        });
    let version = raw.version.as_ref().and_then(|v| {
        let ok = !v.value.is_empty()
            && v.value.chars().next().is_some_and(|c| c.is_ascii_digit())
            && v.value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~:-_".contains(c));
        if ok {
            Some(v.value.clone())
        } else {
            errors.push(
                at(
                    v,
                    format!("toolkit.version `{}` is not a package version", v.value),
                )
                .with_help("write it as the package manager shows it, for example 1.17.8-1"),
            );
            None
        }
    });
    let package_manager = raw.package_manager.as_ref().and_then(|pm| {
        let known = [
            ("apt", PackageManager::Apt),
            ("dnf", PackageManager::Dnf),
            ("yum", PackageManager::Yum),
            ("zypper", PackageManager::Zypper),
        ];
        match known.iter().find(|(name, _)| *name == pm.value) {
            Some((_, manager)) => Some(*manager),
            None => {
                let mut d = at(
                    pm,
                    format!(
                        "toolkit.packageManager `{}` is not apt, dnf, yum or zypper",
                        pm.value
                    ),
                );
                if let Some(near) = nearest(&pm.value, known.iter().map(|(n, _)| *n)) {
                    d = d.with_help(format!("did you mean `{near}`?"));
                }
                errors.push(d);
                None
            }
        }
    });
    let artifact = match raw.method.as_ref().map(|m| (m.value.as_str(), m)) {
        None | Some(("package", _)) => None,
        Some(("artifact", method)) => match &raw.artifact {
            None => {
                errors.push(at(
                    method,
                    "toolkit.method artifact needs toolkit.artifact (url and sha256)".to_string(),
                ));
                None
            }
            Some(artifact) => {
                let (url, sha) = (&artifact.value.url, &artifact.value.sha256);
                if !["https://", "http://", "file://"]
                    .iter()
                    .any(|p| url.value.starts_with(p))
                {
                    errors.push(at(
                        url,
                        format!(
                            "toolkit.artifact.url `{}` is not https://, http:// or file://",
                            url.value
                        ),
                    ));
                    None
                } else if sha.value.len() != 64 || !sha.value.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    errors.push(at(
                        sha,
                        format!(
                            "toolkit.artifact.sha256 `{}` is not 64 hex digits",
                            sha.value
                        ),
                    ));
                    None
                } else {
                    Some(crate::download::Artifact {
                        url: url.value.clone(),
                        sha256: sha.value.to_lowercase(),
                        allow_insecure_http: artifact.value.allow_insecure_http,
                    })
                }
            }
        },
        Some((other, method)) => {
            errors.push(at(
                method,
                format!("toolkit.method must be package or artifact, not `{other}`"),
            ));
            None
        }
    };
    ToolkitSpec {
        enabled: raw.enabled.unwrap_or(true),
        install_dir: if artifact.is_some() {
            install_dir.or_else(|| Some(DEFAULT_TOOLKIT_DIR.to_string()))
        } else {
            install_dir
        },
        version,
        package_manager,
        artifact,
    }
}

/// One place a containerd setting is given: `containerd.<key>` or its
/// `toolkit.env` twin.
struct Given<'a> {
    key: &'static str,
    text: &'a str,
    referenced: serde_saphyr::Location,
    origin: String,
}

/// The `containerd:` section and the `toolkit.env` names that say the same
/// things. A setting given both ways must agree; the error names both.
fn resolve_containerd(
    raw: &RawContainerd,
    env: &[RawEnvVar],
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> ContainerdOptions {
    let mut options = ContainerdOptions {
        config: "/etc/containerd/config.toml".to_string(),
        socket: "/run/containerd/containerd.sock".to_string(),
        runtime_class: "nvidia".to_string(),
        set_as_default: false,
        drop_in_config: None,
        restart_mode: RestartMode::Systemd,
        restart_timeout_seconds: 60,
    };
    let mut given: Vec<Given> = [
        ("config", &raw.config),
        ("socket", &raw.socket),
        ("runtimeClass", &raw.runtime_class),
        ("setAsDefault", &raw.set_as_default),
        ("dropInConfig", &raw.drop_in_config),
        ("restartMode", &raw.restart_mode),
    ]
    .into_iter()
    .filter_map(|(key, value)| {
        value.as_ref().map(|value| Given {
            key,
            text: &value.value.0,
            referenced: value.referenced,
            origin: format!("containerd.{key}"),
        })
    })
    .collect();

    let mut seen_env = BTreeSet::new();
    for var in env {
        let name = var.name.value.as_str();
        if !seen_env.insert(name) {
            errors.push(Diagnostic::at_location(
                source,
                var.name.referenced,
                format!("toolkit.env `{name}` is set twice"),
            ));
            continue;
        }
        match TOOLKIT_ENV.iter().find(|(env_name, _)| *env_name == name) {
            Some((_, key)) => given.push(Given {
                key,
                text: &var.value.value.0,
                referenced: var.value.referenced,
                origin: format!("toolkit.env {name}"),
            }),
            None => {
                let names: Vec<&str> = TOOLKIT_ENV.iter().map(|(n, _)| *n).collect();
                let diagnostic = Diagnostic::at_location(
                    source,
                    var.name.referenced,
                    format!("unknown toolkit.env name `{name}`"),
                );
                let help = match nearest(name, names.iter().copied()) {
                    Some(near) => {
                        format!("did you mean `{near}`? known names: {}", names.join(", "))
                    }
                    None => format!("known names: {}", names.join(", ")),
                };
                errors.push(diagnostic.with_help(help));
            }
        }
    }

    let mut settled: Vec<(&'static str, String, &Given)> = Vec::new();
    for g in &given {
        let value = g.text.trim();
        let bad = |message: String| Diagnostic::at_location(source, g.referenced, message);
        let normalised = match g.key {
            "config" | "socket" | "dropInConfig" => check_host_path(value)
                .map(|()| value.to_string())
                .map_err(|why| bad(format!("{} {why}", g.origin))),
            "runtimeClass" => check_dns_label(value)
                .map(|()| value.to_string())
                .map_err(|why| bad(format!("{} `{value}` {why}", g.origin))),
            "setAsDefault" => match value.to_ascii_lowercase().as_str() {
                v @ ("true" | "false") => Ok(v.to_string()),
                _ => Err(
                    bad(format!("{} must be true or false, not `{value}`", g.origin))
                        .with_help("write `true` or `\"false\"`"),
                ),
            },
            "restartMode" => match value {
                "systemd" | "signal" | "none" => Ok(value.to_string()),
                _ => Err(bad(format!(
                    "{} must be systemd, signal or none, not `{value}`",
                    g.origin
                ))),
            },
            _ => unreachable!("every key is listed above"),
        };
        let normalised = match normalised {
            Ok(v) => v,
            Err(d) => {
                errors.push(d);
                continue;
            }
        };
        match settled.iter().find(|(key, _, _)| *key == g.key) {
            Some((_, earlier, first)) if *earlier != normalised => {
                errors.push(
                    Diagnostic::at_location(
                        source,
                        g.referenced,
                        format!(
                            "{} `{normalised}` disagrees with {} `{earlier}` (line {})",
                            g.origin,
                            first.origin,
                            first.referenced.line()
                        ),
                    )
                    .with_help("give the setting once, or the same value in both places"),
                );
            }
            Some(_) => {}
            None => settled.push((g.key, normalised, g)),
        }
    }
    for (key, value, _) in settled {
        match key {
            "config" => options.config = value,
            "socket" => options.socket = value,
            "runtimeClass" => options.runtime_class = value,
            "setAsDefault" => options.set_as_default = value == "true",
            "dropInConfig" => options.drop_in_config = Some(value),
            "restartMode" => {
                options.restart_mode = match value.as_str() {
                    "signal" => RestartMode::Signal,
                    "none" => RestartMode::None,
                    _ => RestartMode::Systemd,
                }
            }
            _ => unreachable!("every key is listed above"),
        }
    }
    options.restart_timeout_seconds = seconds(
        &raw.restart_timeout_seconds,
        "containerd.restartTimeoutSeconds",
        options.restart_timeout_seconds,
        source,
        errors,
    );
    options
}

/// The longest wait a spec or a flag may ask for: a year. Longer ones are
/// mistakes, and past a few hundred years a deadline overflows the clock.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// A number of seconds from the spec: at least 1 and at most `MAX_SECONDS`,
/// `default` when it is not given.
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
fn check_host_path(value: &str) -> Result<(), String> {
    if value.starts_with('/') && !value.split('/').any(|p| p == "..") {
        Ok(())
    } else {
        Err(format!(
            "must be an absolute path on the host without `..`, not `{value}`"
        ))
    }
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
        Some((key, value)) if !key.is_empty() => crate::label_syntax::check_label(key, value)
            .map_err(|why| format!("opt-out label `{selector}`: {why}")),
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
