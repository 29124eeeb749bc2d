//! `remediation`: what gpuprov does about a GPU fault on the node, by the
//! fault's class, and how many GPU nodes of the fleet it may take out of
//! service at once. Off by default.

use super::*;
use crate::spec::driver::{
    IntOrPercent, RawWaitForJobs, max_unavailable, pod_selector, wait_for_jobs,
};

/// What a fault is, as NVIDIA's XID catalogue resolves it (the XIDs in
/// `health.ignoredXids`, application errors, are never faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultClass {
    /// The catalogue's `RESET_GPU`: a GPU reset clears it.
    ResetNeeded,
    /// The catalogue's `RESTART_BM`: only a reboot of the node clears it.
    RebootNeeded,
    /// NVML cannot reach a GPU it lists (`GPU_IS_LOST`), or a GPU seen on
    /// this boot is gone from the PCI bus.
    GpuLost,
    /// The PCI bus has more GPUs on the nvidia driver than NVML lists.
    NvmlMismatch,
    /// A critical XID in no class above.
    OtherXid,
}

impl FaultClass {
    pub const ALL: [FaultClass; 5] = [
        FaultClass::ResetNeeded,
        FaultClass::RebootNeeded,
        FaultClass::GpuLost,
        FaultClass::NvmlMismatch,
        FaultClass::OtherXid,
    ];

    /// Its key under `remediation.policy`, and its word in taints and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultClass::ResetNeeded => "resetNeeded",
            FaultClass::RebootNeeded => "rebootNeeded",
            FaultClass::GpuLost => "gpuLost",
            FaultClass::NvmlMismatch => "nvmlMismatch",
            FaultClass::OtherXid => "otherXid",
        }
    }

    pub fn parse(text: &str) -> Option<FaultClass> {
        FaultClass::ALL.into_iter().find(|c| c.as_str() == text)
    }
}

/// What gpuprov does about a fault, each step including the ones before
/// it: `taint` < `drain` < `reset` < `reboot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RemedyPolicy {
    /// Nothing but a log line and an event.
    Ignore,
    /// gpuprov's own `NoSchedule` taint, and `GPUReady` False.
    Taint,
    /// Taint, cordon, then evict the GPU pods (Eviction API, PDBs kept).
    Drain,
    /// Drain where a process holds the GPU, then reset it through NVML.
    Reset,
    /// Drain, then run `remediation.rebootCommand`.
    Reboot,
}

impl RemedyPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RemedyPolicy::Ignore => "ignore",
            RemedyPolicy::Taint => "taint",
            RemedyPolicy::Drain => "drain",
            RemedyPolicy::Reset => "reset",
            RemedyPolicy::Reboot => "reboot",
        }
    }
}

/// The XIDs NVIDIA's catalogue resolves with a GPU reset (its immediate
/// action `RESET_GPU`): 48 double-bit ECC, 62 and 64 micro-controller halt
/// and row-remapper failure, 63 a row remapped (active after a reset), 74
/// NVLink, 95 uncontained ECC, 119 and 120 GSP, 140 unrecovered ECC.
pub const RESET_XIDS: [u64; 9] = [48, 62, 63, 64, 74, 95, 119, 120, 140];
/// The XIDs it resolves with a reboot of the node (`RESTART_BM`): 79, a
/// GPU fallen off the bus.
pub const REBOOT_XIDS: [u64; 1] = [79];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRemediation {
    enabled: Option<bool>,
    #[serde(default)]
    policy: RawPolicies,
    #[serde(default)]
    xids: RawXidClasses,
    max_unavailable: Option<Spanned<IntOrPercent>>,
    lease_duration_seconds: Option<Spanned<u64>>,
    reboot_command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    drain: RawEviction,
    #[serde(default)]
    wait_for_jobs: RawWaitForJobs,
    #[serde(default)]
    storm: RawStorm,
    flap_window_seconds: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicies {
    reset_needed: Option<Spanned<String>>,
    reboot_needed: Option<Spanned<String>>,
    gpu_lost: Option<Spanned<String>>,
    nvml_mismatch: Option<Spanned<String>>,
    other_xid: Option<Spanned<String>>,
}

/// XIDs moved into a class (out of the one the catalogue puts them in).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawXidClasses {
    reset_needed: Option<Spanned<Vec<u64>>>,
    reboot_needed: Option<Spanned<Vec<u64>>>,
    other_xid: Option<Spanned<Vec<u64>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawEviction {
    pod_selector: Option<Spanned<String>>,
    timeout_seconds: Option<Spanned<u64>>,
    #[serde(default)]
    delete_empty_dir: bool,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStorm {
    max_faulting_nodes: Option<Spanned<IntOrPercent>>,
    window_seconds: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemediationSpec {
    pub enabled: bool,
    /// The policy of each class, in `FaultClass::ALL`'s order.
    pub policy: Vec<(FaultClass, RemedyPolicy)>,
    pub reset_xids: Vec<u64>,
    pub reboot_xids: Vec<u64>,
    /// How many GPU nodes may be past `taint` at once.
    pub max_unavailable: MaxUnavailable,
    pub lease_duration_seconds: u64,
    /// The host command `reboot` runs (argv); none: `reboot` is refused.
    pub reboot_command: Vec<String>,
    /// Which GPU pods are evicted, and how (`enable` is always true).
    pub drain: DrainSpec,
    pub wait_for_jobs: WaitForJobsSpec,
    /// More faulting GPU nodes than this within `storm_window_seconds`
    /// stops automatic action fleet-wide.
    pub storm_max_faulting_nodes: MaxUnavailable,
    pub storm_window_seconds: u64,
    /// A fault within this long after a recovery is left for a person.
    pub flap_window_seconds: u64,
}

impl RemediationSpec {
    pub fn policy_of(&self, class: FaultClass) -> RemedyPolicy {
        self.policy
            .iter()
            .find(|(c, _)| *c == class)
            .map_or(RemedyPolicy::Taint, |(_, p)| *p)
    }

    /// The class of a critical XID (one `health.ignoredXids` lets through).
    pub fn class_of_xid(&self, xid: u64) -> FaultClass {
        if self.reset_xids.contains(&xid) {
            FaultClass::ResetNeeded
        } else if self.reboot_xids.contains(&xid) {
            FaultClass::RebootNeeded
        } else {
            FaultClass::OtherXid
        }
    }
}

pub(super) fn resolve_remediation(
    raw: &RawRemediation,
    health: &HealthSpec,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> RemediationSpec {
    let choices = [
        ("ignore", RemedyPolicy::Ignore),
        ("taint", RemedyPolicy::Taint),
        ("drain", RemedyPolicy::Drain),
        ("reset", RemedyPolicy::Reset),
        ("reboot", RemedyPolicy::Reboot),
    ];
    let given = [
        (
            FaultClass::ResetNeeded,
            &raw.policy.reset_needed,
            RemedyPolicy::Reset,
        ),
        (
            FaultClass::RebootNeeded,
            &raw.policy.reboot_needed,
            RemedyPolicy::Taint,
        ),
        (
            FaultClass::GpuLost,
            &raw.policy.gpu_lost,
            RemedyPolicy::Taint,
        ),
        (
            FaultClass::NvmlMismatch,
            &raw.policy.nvml_mismatch,
            RemedyPolicy::Taint,
        ),
        (
            FaultClass::OtherXid,
            &raw.policy.other_xid,
            RemedyPolicy::Taint,
        ),
    ];
    let reboot_command = raw
        .reboot_command
        .as_ref()
        .map(|c| c.value.clone())
        .unwrap_or_default();
    if let Some(command) = &raw.reboot_command
        && (command.value.is_empty() || command.value[0].trim().is_empty())
    {
        errors.push(
            Diagnostic::at_location(
                source,
                command.referenced,
                "remediation.rebootCommand is empty",
            )
            .with_help("name the host's reboot command, for example [systemctl, reboot]"),
        );
    }
    let mut policy = Vec::new();
    for (class, raw_policy, default) in given {
        let key = format!("remediation.policy.{}", class.as_str());
        let chosen = choose(&key, raw_policy, &choices, default, source, errors);
        // A fault only a GPU (not the whole node) can have cannot be reset
        // away: NVML lost the GPU, or never listed it.
        if chosen == RemedyPolicy::Reset
            && matches!(class, FaultClass::GpuLost | FaultClass::NvmlMismatch)
            && let Some(at) = raw_policy
        {
            errors.push(
                Diagnostic::at_location(
                    source,
                    at.referenced,
                    format!("{key} cannot be reset: NVML cannot reach the GPU to reset it"),
                )
                .with_help("use taint, drain or reboot"),
            );
        }
        if chosen == RemedyPolicy::Reboot
            && reboot_command.is_empty()
            && let Some(at) = raw_policy
        {
            errors.push(
                Diagnostic::at_location(
                    source,
                    at.referenced,
                    format!("{key} is reboot, and remediation.rebootCommand names no command"),
                )
                .with_help(
                    "gpuprov never reboots a node by itself: set remediation.rebootCommand, for example [systemctl, reboot]",
                ),
            );
        }
        policy.push((class, chosen));
    }

    // The catalogue's classes, with the spec's XIDs moved where it says.
    let mut reset_xids = RESET_XIDS.to_vec();
    let mut reboot_xids = REBOOT_XIDS.to_vec();
    let moves = [
        ("resetNeeded", &raw.xids.reset_needed),
        ("rebootNeeded", &raw.xids.reboot_needed),
        ("otherXid", &raw.xids.other_xid),
    ];
    let mut placed: Vec<u64> = Vec::new();
    for (class, xids) in moves {
        let Some(xids) = xids else { continue };
        for xid in &xids.value {
            let key = format!("remediation.xids.{class}");
            if health.ignored_xids.contains(xid) {
                errors.push(
                    Diagnostic::at_location(
                        source,
                        xids.referenced,
                        format!("{key}: XID {xid} is an application error (health.ignoredXids): gpuprov never sees it as a fault"),
                    )
                    .with_help("take it out of health.ignoredXids, or out of this list"),
                );
                continue;
            }
            if placed.contains(xid) {
                errors.push(Diagnostic::at_location(
                    source,
                    xids.referenced,
                    format!("{key}: XID {xid} is placed in two classes"),
                ));
                continue;
            }
            placed.push(*xid);
            reset_xids.retain(|x| x != xid);
            reboot_xids.retain(|x| x != xid);
            match class {
                "resetNeeded" => reset_xids.push(*xid),
                "rebootNeeded" => reboot_xids.push(*xid),
                _ => {}
            }
        }
    }

    let drain_timeout = seconds(
        &raw.drain.timeout_seconds,
        "remediation.drain.timeoutSeconds",
        300,
        source,
        errors,
    );
    RemediationSpec {
        enabled: raw.enabled.unwrap_or(false),
        policy,
        reset_xids,
        reboot_xids,
        max_unavailable: max_unavailable(
            "remediation.maxUnavailable",
            raw.max_unavailable.as_ref(),
            source,
            errors,
        ),
        lease_duration_seconds: seconds(
            &raw.lease_duration_seconds,
            "remediation.leaseDurationSeconds",
            60,
            source,
            errors,
        ),
        reboot_command,
        drain: DrainSpec {
            enable: true,
            pod_selector: pod_selector(
                raw.drain.pod_selector.as_ref(),
                "remediation.drain.podSelector",
                source,
                errors,
            ),
            timeout_seconds: drain_timeout,
            delete_empty_dir: raw.drain.delete_empty_dir,
            force: raw.drain.force,
        },
        wait_for_jobs: wait_for_jobs(
            &raw.wait_for_jobs,
            "remediation.waitForJobs",
            source,
            errors,
        ),
        storm_max_faulting_nodes: match &raw.storm.max_faulting_nodes {
            None => MaxUnavailable::Percent(10),
            given => max_unavailable(
                "remediation.storm.maxFaultingNodes",
                given.as_ref(),
                source,
                errors,
            ),
        },
        storm_window_seconds: seconds(
            &raw.storm.window_seconds,
            "remediation.storm.windowSeconds",
            600,
            source,
            errors,
        ),
        flap_window_seconds: seconds(
            &raw.flap_window_seconds,
            "remediation.flapWindowSeconds",
            3600,
            source,
            errors,
        ),
    }
}
