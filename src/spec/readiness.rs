//! `readiness`: the GPU readiness gate on the Node (its `nvidia.com/GPUReady`
//! condition and the startup taint gpuprov removes once it is `True`).

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::diagnostic::{Diagnostic, Source};

/// The cluster autoscaler treats a taint with this prefix as a startup
/// taint without flags (GKE and AKS included): a node carrying it is one
/// that will be ready soon, not one to scale up beside.
pub const DEFAULT_STARTUP_TAINT: &str =
    "startup-taint.cluster-autoscaler.kubernetes.io/gpu-not-ready:NoSchedule";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawReadiness {
    pub(super) condition: Option<bool>,
    pub(super) startup_taint: Option<Spanned<String>>,
    pub(super) taint_on_degraded: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessSpec {
    /// Publish the `nvidia.com/GPUReady` condition.
    pub condition: bool,
    /// The taint removed once GPUs are ready; `None`: no taint is managed.
    pub startup_taint: Option<StartupTaint>,
    /// Put the taint back while GPU health is degraded.
    pub taint_on_degraded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StartupTaint {
    pub key: String,
    /// Empty when the taint has none (`key:Effect`).
    pub value: String,
    pub effect: String,
}

impl std::fmt::Display for StartupTaint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect)
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect)
        }
    }
}

/// Taint keys that Kubernetes' controllers own.
const RESERVED_TAINT_PREFIXES: &[&str] = &[
    "node.kubernetes.io/",
    "node.cloudprovider.kubernetes.io/",
    "node-role.kubernetes.io/",
];

/// `key[=value]:Effect`, as `kubectl taint` writes it.
pub fn parse_taint(text: &str) -> Result<StartupTaint, String> {
    let (key_value, effect) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("`{text}` is not key[=value]:Effect"))?;
    if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
        return Err(format!(
            "the effect `{effect}` is not NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = key_value.split_once('=').unwrap_or((key_value, ""));
    crate::label_syntax::check_label_key(key).map_err(|why| format!("the key: {why}"))?;
    // gpuprov removes its startup taint once the node is ready: a taint of
    // Kubernetes' own (the node lifecycle controller's, the cloud
    // provider's) must never be one it removes.
    if let Some(reserved) = RESERVED_TAINT_PREFIXES
        .iter()
        .find(|prefix| key.starts_with(*prefix))
    {
        return Err(format!(
            "the key `{key}` is Kubernetes' own (`{reserved}…`), and gpuprov removes its startup taint: use a key of your own, such as {}",
            DEFAULT_STARTUP_TAINT
        ));
    }
    if !value.is_empty() {
        crate::label_syntax::check_label_value(key, value)
            .map_err(|why| format!("the value: {why}"))?;
    }
    Ok(StartupTaint {
        key: key.to_string(),
        value: value.to_string(),
        effect: effect.to_string(),
    })
}

pub(super) fn resolve_readiness(
    raw: &RawReadiness,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> ReadinessSpec {
    let startup_taint = match &raw.startup_taint {
        None => Some(parse_taint(DEFAULT_STARTUP_TAINT).expect("the default is valid")),
        Some(given) if given.value.trim().is_empty() => None,
        Some(given) => match parse_taint(given.value.trim()) {
            Ok(taint) => Some(taint),
            Err(why) => {
                errors.push(Diagnostic::at_location(
                    source,
                    given.referenced,
                    format!("readiness.startupTaint: {why}"),
                ));
                None
            }
        },
    };
    ReadinessSpec {
        condition: raw.condition.unwrap_or(true),
        startup_taint,
        taint_on_degraded: raw.taint_on_degraded.unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_read_as_kubectl_writes_them() {
        let taint = parse_taint("example.com/gpu=starting:NoExecute").unwrap();
        assert_eq!(
            (
                taint.key.as_str(),
                taint.value.as_str(),
                taint.effect.as_str()
            ),
            ("example.com/gpu", "starting", "NoExecute")
        );
        assert_eq!(taint.to_string(), "example.com/gpu=starting:NoExecute");
        assert_eq!(
            parse_taint(DEFAULT_STARTUP_TAINT).unwrap().to_string(),
            DEFAULT_STARTUP_TAINT
        );
        assert!(
            parse_taint("gpu:Sometimes")
                .unwrap_err()
                .contains("Sometimes")
        );
        assert!(parse_taint("no-effect").is_err());
        assert!(
            parse_taint("bad key!:NoSchedule")
                .unwrap_err()
                .contains("key")
        );
    }
}
