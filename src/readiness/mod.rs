//! The GPU readiness gate: a new GPU node reports Ready minutes before pods
//! can get a GPU. gpuprov says when they can, on the Node itself:
//!
//! * the condition `nvidia.com/GPUReady`: `True` once every required state
//!   converged on this boot (the validator passed), `False` with the first
//!   step that holds it as reason and message otherwise; patched only when
//!   it changes;
//! * the startup taint (`readiness.startupTaint`), removed once `GPUReady`
//!   is `True`, and put back while GPU health is degraded when
//!   `readiness.taintOnDegraded` says so.
//!
//! A node without a GPU gets neither: nothing is published and its taints
//! are left as they are.

use k8s_openapi::api::core::v1::Taint;

use crate::facts::Facts;
use crate::kube::node_status::Condition;
use crate::kube::{Cluster, KubeError};
use crate::report::StateReport;
use crate::spec::{ReadinessSpec, StartupTaint};
use crate::state::Outcome;

/// What the steps say of the node's GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub condition: Condition,
    /// A GPU's health is degraded (`taintOnDegraded` puts the taint back).
    pub degraded: bool,
}

/// A condition's message is for people; the API server caps it at 32 KiB,
/// and a kubectl column at much less.
const MESSAGE_CAP: usize = 1024;

/// The verdict of a walk, or `None` on a node without a GPU.
pub fn verdict(steps: &[StateReport], facts: &Facts) -> Option<Verdict> {
    // No GPU: nothing to say.
    facts.gpus().next()?;
    // What holds `/readyz`, and a GPU whose health is degraded.
    let holding = steps
        .iter()
        .find(|step| step.holds_readiness() || step.outcome == Outcome::Degraded);
    Some(match holding {
        Some(step) => Verdict {
            condition: Condition {
                status: false,
                reason: format!("{}{}", pascal(&step.name), pascal(step.outcome.as_str())),
                message: capped(format!(
                    "{}: {}: {}",
                    step.name,
                    step.outcome.as_str(),
                    step.reason
                )),
            },
            degraded: step.outcome == Outcome::Degraded,
        },
        None => {
            // A stable message: the validator's own reason changes from
            // "passed" to "passed since boot", which is no news.
            let validated = steps
                .iter()
                .any(|s| s.capability.name() == "validator" && s.outcome == Outcome::Ready);
            let (reason, message) = if validated {
                ("ValidatorPassed", "the validator passed on this boot")
            } else {
                (
                    "Converged",
                    "every required state converged (no validator ran)",
                )
            };
            Verdict {
                condition: Condition {
                    status: true,
                    reason: reason.to_string(),
                    message: message.to_string(),
                },
                degraded: false,
            }
        }
    })
}

/// Publishes the verdict of `steps`: the condition when it changed, the
/// taint when it must go (or come back). Writes nothing on a node whose
/// Node already says so.
pub fn publish(
    cluster: &Cluster,
    spec: &ReadinessSpec,
    facts: &Facts,
    steps: &[StateReport],
) -> Result<(), KubeError> {
    let Some(verdict) = verdict(steps, facts) else {
        return Ok(());
    };
    if spec.condition && facts.node_gpu_ready.as_ref() != Some(&verdict.condition) {
        let transition =
            facts.node_gpu_ready.as_ref().map(|c| c.status) != Some(verdict.condition.status);
        cluster.patch_gpu_ready(&verdict.condition, transition)?;
        tracing::info!(
            status = verdict.condition.status,
            reason = %verdict.condition.reason,
            "{}: {}",
            crate::kube::node_status::GPU_READY,
            verdict.condition.message
        );
    }
    if let Some(taint) = &spec.startup_taint {
        let wanted = !verdict.condition.status && verdict.degraded && spec.taint_on_degraded;
        let removing = verdict.condition.status;
        // From the Node as the converge read it: a converged node sends
        // nothing.
        if taints_after(&facts.node_taints, taint, wanted, removing).is_some() {
            let why = if removing {
                "GPUs are ready"
            } else {
                "GPU health is degraded"
            };
            set_taint(cluster, taint, !removing, why)?;
        }
    }
    Ok(())
}

/// The taint list with `taint` removed (`removing`) or added (`wanted`),
/// or `None` when it already is so.
fn taints_after(
    taints: &[Taint],
    taint: &StartupTaint,
    wanted: bool,
    removing: bool,
) -> Option<Vec<Taint>> {
    let ours = |t: &Taint| t.key == taint.key && t.effect == taint.effect;
    let has = taints.iter().any(ours);
    if removing && has {
        return Some(taints.iter().filter(|t| !ours(t)).cloned().collect());
    }
    if wanted && !has {
        let mut after = taints.to_vec();
        after.push(Taint {
            key: taint.key.clone(),
            value: (!taint.value.is_empty()).then(|| taint.value.clone()),
            effect: taint.effect.clone(),
            time_added: None,
        });
        return Some(after);
    }
    None
}

/// Puts `taint` on the Node (`present`) or takes it away (any value, same
/// key and effect), reading the Node afresh and replacing its taints if it
/// still needs it; a conflict (someone changed the Node meanwhile) is read
/// and tried again. `why` is for the log.
pub fn set_taint(
    cluster: &Cluster,
    taint: &StartupTaint,
    present: bool,
    why: &str,
) -> Result<(), KubeError> {
    let (wanted, removing) = (present, !present);
    const TRIES: usize = 3;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let node = cluster.node()?;
        let current = crate::kube::node_status::taints_of(&node);
        let Some(after) = taints_after(&current, taint, wanted, removing) else {
            return Ok(());
        };
        let version = node.metadata.resource_version.clone().unwrap_or_default();
        match cluster.replace_taints(&version, &after) {
            Err(KubeError::Api { code: 409, .. }) if attempt < TRIES => {
                tracing::warn!("the Node changed while its taints were replaced: reading it again");
            }
            result => {
                result?;
                let done = if removing { "removed" } else { "put on" };
                tracing::info!("taint {taint} {done}: {why}");
                return Ok(());
            }
        }
    }
}

/// `device-plugin` → `DevicePlugin`, `reboot-required` → `RebootRequired`.
fn pascal(name: &str) -> String {
    name.split(['-', '_'])
        .map(|w| {
            let mut chars = w.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn capped(mut message: String) -> String {
    if message.len() > MESSAGE_CAP {
        let mut end = MESSAGE_CAP - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_startup_taint_goes_and_only_it() {
        let ours = crate::spec::parse_taint(crate::spec::DEFAULT_STARTUP_TAINT).unwrap();
        let other = taint("dedicated", "NoSchedule");
        let node = vec![other.clone(), taint(&ours.key, "NoSchedule")];
        assert_eq!(
            taints_after(&node, &ours, false, true),
            Some(vec![other.clone()])
        );
        assert_eq!(
            taints_after(std::slice::from_ref(&other), &ours, false, true),
            None
        );
        // Put back only when wanted, and once.
        let back = taints_after(std::slice::from_ref(&other), &ours, true, false).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(taints_after(&back, &ours, true, false), None);
    }

    #[test]
    fn reasons_are_camel_case_and_messages_capped() {
        assert_eq!(
            pascal("device-plugin") + &pascal("pending"),
            "DevicePluginPending"
        );
        assert_eq!(pascal("reboot-required"), "RebootRequired");
        let long = capped("é".repeat(2000));
        assert!(long.len() <= MESSAGE_CAP && long.ends_with("..."));
    }
}
