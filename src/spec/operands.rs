//! The operands' sections (`devicePlugin`, `dcgmExporter`, `gfd`), the
//! `validator` and `operands` (how they are deployed).

use super::*;

/// An operand's section (`devicePlugin`, `dcgmExporter`, `gfd`), with the
/// GPU Operator's key names. `mode` belongs to `gfd` alone; `resolve` says
/// so when another section has it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawOperand {
    pub(super) enabled: Option<bool>,
    pub(super) mode: Option<Spanned<String>>,
    /// `dcgmExporter.sampleIntervalSeconds` alone.
    pub(super) sample_interval_seconds: Option<Spanned<u64>>,
    /// `devicePlugin.config` alone; `resolve` says so for another section.
    pub(super) config: Option<Spanned<device_plugin::RawPluginConfigs>>,
    /// `devicePlugin.kubeletDir` alone (DRA's sockets live under it).
    pub(super) kubelet_dir: Option<Spanned<String>>,
    pub(super) repository: Option<Spanned<String>>,
    pub(super) image: Option<Spanned<String>>,
    pub(super) version: Option<Spanned<String>>,
    pub(super) image_pull_policy: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default)]
    pub(super) env: Vec<RawEnvVar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawValidator {
    pub(super) enabled: Option<bool>,
    pub(super) repository: Option<Spanned<String>>,
    pub(super) image: Option<Spanned<String>>,
    pub(super) version: Option<Spanned<String>>,
    pub(super) image_pull_policy: Option<Spanned<String>>,
    pub(super) timeout_seconds: Option<Spanned<u64>>,
    pub(super) namespace: Option<Spanned<String>>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) command: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawOperands {
    pub(super) deploy: Option<Spanned<String>>,
    pub(super) namespace: Option<Spanned<String>>,
    pub(super) static_pod_dir: Option<Spanned<String>>,
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
    pub mode: ValidatorMode,
    /// What the container runs instead of the image's own command; through
    /// the CRI, `nvidia-smi -L` when not given.
    pub command: Option<Vec<String>>,
}

/// How the validator runs its container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidatorMode {
    /// A pod with an API server; without one, a container through
    /// containerd's CRI when its socket is there, else host checks.
    Auto,
    /// A pod through the API server (none: the validator fails).
    Pod,
    /// A container through containerd's CRI socket, with or without an
    /// API server.
    Cri,
    /// Host checks only: NVML, device nodes, the runtime binary runs.
    Host,
}

/// What the CRI validation runs when `validator.command` is not given:
/// the NVIDIA runtime mounts `nvidia-smi` into the container.
pub const CRI_DEFAULT_COMMAND: [&str; 2] = ["nvidia-smi", "-L"];

/// How operands are started on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperandsSpec {
    pub deploy: OperandDeploy,
    /// Where the operands' DaemonSets run (`deploy/operands`): the device
    /// plugin's configs go into a ConfigMap there.
    pub namespace: String,
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

/// `deploy/operands`' namespace.
pub const DEFAULT_OPERANDS_NAMESPACE: &str = "gpuprov";

pub const DEFAULT_STATIC_POD_DIR: &str = "/etc/kubernetes/manifests";

/// Who serves the DCGM exporter's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExporterMode {
    /// NVIDIA's dcgm-exporter, an operand like the device plugin.
    Operand,
    /// `gpuprov run` itself, from NVML, on its metrics port.
    Builtin,
}

/// Who hands the GPUs to pods (`devicePlugin.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginMode {
    /// NVIDIA's device plugin: `nvidia.com/gpu` as an extended resource.
    Operand,
    /// gpuprov's own DRA kubelet plugin (`gpu.nvidia.com`), served by
    /// `gpuprov run`: ResourceSlices and claims prepared through CDI.
    Dra,
}

/// The kubelet's root directory: DRA's registration and plugin sockets
/// live under it.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

/// Who publishes GPU Feature Discovery's labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GfdMode {
    /// gpuprov itself, from NVML (the `gpu-feature-discovery` state).
    Builtin,
    /// NVIDIA's GFD DaemonSet.
    Daemonset,
}

/// `repository/image:version` from the three keys (defaults for those not
/// given); a `sha256:` version is a digest (`@sha256:…`).
pub(super) fn resolve_image(
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

pub(super) fn resolve_pull_policy(
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

pub(super) fn resolve_operand(
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

pub(super) fn resolve_validator(
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
    let mode = choose(
        "validator.mode",
        &raw.mode,
        &[
            ("auto", ValidatorMode::Auto),
            ("pod", ValidatorMode::Pod),
            ("cri", ValidatorMode::Cri),
            ("host", ValidatorMode::Host),
        ],
        ValidatorMode::Auto,
        source,
        errors,
    );
    let command = raw.command.as_ref().map(|command| {
        if command.value.is_empty() || command.value.iter().any(|arg| arg.contains('\0')) {
            errors.push(Diagnostic::at_location(
                source,
                command.referenced,
                "validator.command must be a non-empty list of arguments without NUL bytes"
                    .to_string(),
            ));
        }
        command.value.clone()
    });
    ValidatorSpec {
        enabled: raw.enabled.unwrap_or(true),
        image,
        image_pull_policy: resolve_pull_policy("validator", &raw.image_pull_policy, source, errors),
        timeout_seconds,
        namespace,
        mode,
        command,
    }
}

pub(super) fn resolve_operands(
    raw: &RawOperands,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> OperandsSpec {
    let deploy = choose(
        "operands.deploy",
        &raw.deploy,
        &[
            ("auto", OperandDeploy::Auto),
            ("labels", OperandDeploy::Labels),
            ("staticPods", OperandDeploy::StaticPods),
        ],
        OperandDeploy::Auto,
        source,
        errors,
    );
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
    let namespace = match &raw.namespace {
        Some(ns) => {
            let valid = !ns.value.is_empty()
                && ns.value.len() <= 63
                && ns
                    .value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !ns.value.starts_with('-')
                && !ns.value.ends_with('-');
            if !valid {
                errors.push(Diagnostic::at_location(
                    source,
                    ns.referenced,
                    format!(
                        "operands.namespace `{}` is not a namespace name (lower-case letters, digits and `-`, at most 63)",
                        ns.value
                    ),
                ));
            }
            ns.value.clone()
        }
        None => DEFAULT_OPERANDS_NAMESPACE.to_string(),
    };
    OperandsSpec {
        deploy,
        namespace,
        static_pod_dir,
    }
}
