//! A rolling upgrade's states and actions, as data (a `Change` carries
//! an `Action`); what they do is `run.rs`'s, when they are due `mod.rs`'s.

use serde::Serialize;

/// The GPU Operator's label for where a node is in its driver upgrade.
pub const STATE_LABEL: &str = "nvidia.com/gpu-driver-upgrade-state";
/// Slot Leases are `<SLOT_PREFIX>-0`, `<SLOT_PREFIX>-1`, …
pub const SLOT_PREFIX: &str = "gpuprov-driver-upgrade";

/// k8s-operator-libs' upgrade states, in the order a node walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    UpgradeRequired,
    CordonRequired,
    WaitForJobsRequired,
    PodDeletionRequired,
    DrainRequired,
    PodRestartRequired,
    ValidationRequired,
    UncordonRequired,
    UpgradeDone,
    UpgradeFailed,
}

impl State {
    pub const ALL: [State; 10] = [
        State::UpgradeRequired,
        State::CordonRequired,
        State::WaitForJobsRequired,
        State::PodDeletionRequired,
        State::DrainRequired,
        State::PodRestartRequired,
        State::ValidationRequired,
        State::UncordonRequired,
        State::UpgradeDone,
        State::UpgradeFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::UpgradeRequired => "upgrade-required",
            State::CordonRequired => "cordon-required",
            State::WaitForJobsRequired => "wait-for-jobs-required",
            State::PodDeletionRequired => "pod-deletion-required",
            State::DrainRequired => "drain-required",
            State::PodRestartRequired => "pod-restart-required",
            State::ValidationRequired => "validation-required",
            State::UncordonRequired => "uncordon-required",
            State::UpgradeDone => "upgrade-done",
            State::UpgradeFailed => "upgrade-failed",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Between cordon and uncordon: the node is out of the fleet's service
    /// and must hold a slot.
    pub fn in_progress(self) -> bool {
        (State::CordonRequired..=State::UncordonRequired).contains(&self)
    }

    /// The stages that take the node's work away or its driver out: each
    /// starts only while the node holds its slot.
    pub fn disrupts(self) -> bool {
        (State::CordonRequired..=State::PodRestartRequired).contains(&self)
    }
}

/// What a rolling upgrade does next; each is one `Change`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "do", rename_all = "camelCase")]
pub enum Action {
    /// Take (or keep, renewing it while this process runs) an upgrade slot.
    TakeSlot {
        namespace: String,
        slots: u64,
        lease_seconds: u64,
    },
    /// Give the slot back.
    ReleaseSlot {
        namespace: String,
    },
    /// Publish the state in `STATE_LABEL`.
    Publish {
        state: State,
    },
    Cordon,
    Uncordon,
    /// Wait for the pods `selector` names on this node to finish.
    WaitForJobs {
        selector: String,
        timeout_seconds: u64,
    },
    /// Delete the pods on this node that hold NVIDIA devices (the
    /// operands' own, in `operands_namespace`, excepted).
    DeleteGpuPods {
        operands_namespace: String,
    },
    /// Evict pods through the Eviction API, PodDisruptionBudgets honoured.
    Drain {
        selector: String,
        timeout_seconds: u64,
        delete_empty_dir: bool,
        force: bool,
    },
}

impl Action {
    pub fn summary(&self) -> String {
        match self {
            Action::TakeSlot {
                namespace,
                slots,
                lease_seconds,
            } => format!(
                "take an upgrade slot (one of {slots} Leases {namespace}/{}-N), renewed every {}s while the upgrade runs",
                SLOT_PREFIX,
                (lease_seconds / 3).max(1)
            ),
            Action::ReleaseSlot { namespace } => {
                format!("give the upgrade slot back (delete its Lease in {namespace})")
            }
            Action::Publish { state } => format!("label the node {STATE_LABEL}={}", state.as_str()),
            Action::Cordon => "cordon the node (spec.unschedulable)".to_string(),
            Action::Uncordon => {
                "uncordon the node (unless it was unschedulable before the upgrade)".to_string()
            }
            Action::WaitForJobs {
                selector,
                timeout_seconds,
            } => wait_for_jobs_summary(selector, *timeout_seconds),
            Action::DeleteGpuPods { .. } => {
                "delete the pods on this node that use NVIDIA GPUs (not the operands')".to_string()
            }
            Action::Drain {
                selector,
                timeout_seconds,
                ..
            } => {
                let which = if selector.is_empty() {
                    "every pod but DaemonSets' and mirror pods".to_string()
                } else {
                    format!("the pods `{selector}`")
                };
                format!(
                    "drain: evict {which} through the Eviction API (PodDisruptionBudgets honoured), up to {timeout_seconds}s"
                )
            }
        }
    }
}

/// How `plan` words a wait for jobs (0: as long as it takes).
pub fn wait_for_jobs_summary(selector: &str, timeout_seconds: u64) -> String {
    let limit = if timeout_seconds == 0 {
        "as long as it takes".to_string()
    } else {
        format!("up to {timeout_seconds}s")
    };
    format!("wait {limit} for the pods `{selector}` on this node to finish")
}
