//! Rolling driver upgrades (`driver.upgradePolicy: rolling`), coordinated
//! through the API server with no controller: a node whose driver must
//! change takes one of the fleet's upgrade slots (`slots.rs`: Leases,
//! `maxUnavailable` of them), then walks k8s-operator-libs' states,
//! publishing each in `nvidia.com/gpu-driver-upgrade-state` before it acts
//! (`run.rs`), so that dashboards and runbooks written for the GPU
//! Operator work, and a crash resumes from the published state.

pub mod action;
pub mod run;

pub use action::{Action, STATE_LABEL, State};

use crate::slots::{self, SlotKind};

use crate::spec::FailurePolicy;
use crate::state::{
    CapabilityChange, Change, LookAgain, MakeContext, Observation, OnFailure, Outcome,
    StateContext, StateError, json_fields,
};

/// `true` on a node keeps its driver as it is.
pub const SKIP_LABEL: &str = "nvidia.com/gpu-driver-upgrade.skip";

/// The fleet's upgrade slots.
pub static SLOTS: SlotKind = SlotKind {
    prefix: action::SLOT_PREFIX,
    label: crate::kube::upgrade::SLOT_LABEL,
    purpose: "upgrade",
    still_out: cordoned_mid_upgrade,
};

/// Whether a node is cordoned and its published upgrade state is between
/// cordon and uncordon: out of service for an upgrade that has not ended.
fn cordoned_mid_upgrade(node: &k8s_openapi::api::core::v1::Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let state = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(STATE_LABEL))
        .and_then(|s| State::parse(s));
    cordoned && state.is_some_and(State::in_progress)
}

fn upgrade(action: Action) -> Change {
    Change::own(action)
}

/// Each step of a rolling upgrade is one change of the driver's.
impl CapabilityChange for Action {
    fn kind(&self) -> &'static str {
        "upgrade"
    }

    fn summary(&self) -> String {
        Action::summary(self)
    }

    fn fields(&self) -> serde_json::Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        run::make(on.cluster, self, on.labels_set).map_err(StateError::operator)
    }
}

/// The node's upgrade state: as this run published it, else its label.
pub fn current_state(ctx: &StateContext) -> Option<State> {
    ctx.node_label(STATE_LABEL).and_then(|s| State::parse(&s))
}

/// What ends an upgrade whose driver is in and validated: uncordon, say
/// `upgrade-done`, then give the slot back (so that no more nodes than
/// there are slots ever say they are past `cordon-required`; a crash
/// between the last two leaves a Lease that expires). Nothing unless this
/// node's upgrade waits on validation.
pub fn finishing_changes(ctx: &StateContext) -> Vec<Change> {
    let driver = &ctx.spec.driver;
    if driver.upgrade_policy != crate::spec::UpgradePolicy::Rolling || ctx.cluster.is_none() {
        return Vec::new();
    }
    let namespace = ctx.spec.operands.namespace.clone();
    let mut changes = match current_state(ctx) {
        Some(State::ValidationRequired) => vec![upgrade(Action::Publish {
            state: State::UncordonRequired,
        })],
        Some(State::UncordonRequired) => Vec::new(),
        _ => return Vec::new(),
    };
    changes.extend([
        upgrade(Action::Uncordon),
        upgrade(Action::Publish {
            state: State::UpgradeDone,
        }),
        upgrade(Action::ReleaseSlot { namespace }),
    ]);
    changes
}

/// What a failure under way does: the node says `upgrade-failed` (and
/// stays cordoned), and gives its slot back if `failurePolicy` says so;
/// once `changes_after` changes were made.
pub fn failure(ctx: &StateContext, changes_after: usize) -> OnFailure {
    let mut changes = vec![upgrade(Action::Publish {
        state: State::UpgradeFailed,
    })];
    if ctx.spec.driver.upgrade.failure_policy == FailurePolicy::ReleaseSlot {
        changes.push(upgrade(Action::ReleaseSlot {
            namespace: ctx.spec.operands.namespace.clone(),
        }));
    }
    OnFailure {
        labels: Default::default(),
        gate: crate::state::Gate::Block("the driver upgrade failed".to_string()),
        changes,
        changes_after,
    }
}

/// The `driver` step under `rolling`, for a loaded driver: `None` when
/// there is nothing to coordinate (the version wanted is loaded and no
/// upgrade is under way), else what the upgrade does next.
pub fn observe(
    ctx: &StateContext,
    loaded: &str,
    wanted: &str,
    replace: Vec<Change>,
    outcome: Outcome,
) -> Result<Option<Observation>, StateError> {
    let spec = &ctx.spec.driver.upgrade;
    let state = current_state(ctx);
    let Some(cluster) = ctx.cluster else {
        return Ok(Some(Observation::new(
            Outcome::Failed,
            format!(
                "driver.upgradePolicy rolling takes an upgrade slot through the API server, and there is none; {} is loaded, {wanted} wanted (use ifDifferent on a node without one)",
                loaded
            ),
        )));
    };
    let namespace = ctx.spec.operands.namespace.clone();
    let publish = |state: State| upgrade(Action::Publish { state });
    let details = |obs: &mut Observation, state: Option<State>| {
        obs.details = serde_json::json!({"upgradeState": state.map(State::as_str)});
        // Waiting for a slot, it looks for a free one sooner than drift.
        if state == Some(State::UpgradeRequired) {
            obs.look_again = Some(LookAgain::SharedSlot);
        }
    };

    if loaded == wanted {
        let mut obs = Observation::new(
            outcome,
            format!("NVIDIA {} is loaded, as driver.version asks", loaded),
        );
        match state {
            Some(State::ValidationRequired | State::UncordonRequired) => {
                if ctx.spec.validator.enabled {
                    // The validator, after this step, ends the upgrade
                    // once it passes (`finishing_changes`).
                    obs.reason = format!(
                        "upgraded to {wanted}; the node stays cordoned until the validator passes with it"
                    );
                } else {
                    obs.reason = format!("upgraded to {wanted} (no validator): uncordoning");
                    obs.changes = finishing_changes(ctx);
                }
            }
            Some(State::UpgradeRequired) => obs.changes = vec![publish(State::UpgradeDone)],
            Some(s) if s < State::ValidationRequired => {
                // Installed, then stopped before saying so.
                obs.changes = vec![publish(State::ValidationRequired)];
            }
            Some(State::UpgradeFailed) => {
                obs.reason.push_str(&format!(
                    "; its upgrade failed earlier and the node stays cordoned: set {STATE_LABEL}=upgrade-done once it is checked"
                ));
            }
            _ => return Ok(None),
        }
        details(&mut obs, state);
        return Ok(Some(obs));
    }

    if ctx.facts.node_labels.get(SKIP_LABEL).map(String::as_str) == Some("true") {
        let mut obs = Observation::new(
            outcome,
            format!(
                "NVIDIA {} is loaded; {SKIP_LABEL}=true keeps it (driver.version asks {wanted})",
                loaded
            ),
        );
        details(&mut obs, state);
        return Ok(Some(obs));
    }
    if state == Some(State::UpgradeFailed) {
        let mut obs = Observation::new(
            Outcome::Failed,
            format!(
                "the upgrade from {} to {wanted} failed (the node's events say why); the node stays cordoned: set {STATE_LABEL}=upgrade-required to try again",
                loaded
            ),
        );
        details(&mut obs, state);
        return Ok(Some(obs));
    }

    let fleet = slots::Fleet::read(cluster, &SLOTS, &namespace, spec.max_unavailable)?;
    let ours = fleet.ours(&cluster.node);
    if ours.is_none() && fleet.free().is_none() {
        let mut obs = Observation::new(
            outcome,
            format!(
                "NVIDIA {} is loaded; {wanted} waits for an upgrade slot: {}",
                loaded,
                fleet.describe()
            ),
        );
        if state != Some(State::UpgradeRequired) && !state.is_some_and(State::in_progress) {
            obs.changes = vec![publish(State::UpgradeRequired)];
        }
        details(&mut obs, Some(State::UpgradeRequired));
        return Ok(Some(obs));
    }

    // From the state published last: a resumed upgrade redoes only its
    // current stage (each is safe to do twice).
    let from = state
        .filter(|s| State::CordonRequired <= *s && *s <= State::PodRestartRequired)
        .unwrap_or(State::CordonRequired);
    let mut changes = vec![upgrade(Action::TakeSlot {
        namespace: namespace.clone(),
        slots: fleet.slots,
        lease_seconds: spec.lease_duration_seconds,
    })];
    for stage in [
        State::CordonRequired,
        State::WaitForJobsRequired,
        State::PodDeletionRequired,
        State::DrainRequired,
        State::PodRestartRequired,
    ] {
        if stage < from {
            continue;
        }
        changes.push(publish(stage));
        match stage {
            State::CordonRequired => changes.push(upgrade(Action::Cordon)),
            State::WaitForJobsRequired if !spec.wait_for_jobs.pod_selector.is_empty() => changes
                .push(upgrade(Action::WaitForJobs {
                    selector: spec.wait_for_jobs.pod_selector.clone(),
                    timeout_seconds: spec.wait_for_jobs.timeout_seconds,
                })),
            State::PodDeletionRequired => changes.push(upgrade(Action::DeleteGpuPods {
                operands_namespace: namespace.clone(),
            })),
            State::DrainRequired if spec.drain.enable => changes.push(upgrade(Action::Drain {
                selector: spec.drain.pod_selector.clone(),
                timeout_seconds: spec.drain.timeout_seconds,
                delete_empty_dir: spec.drain.delete_empty_dir,
                force: spec.drain.force,
            })),
            State::PodRestartRequired => changes.extend(replace.clone()),
            _ => {}
        }
    }
    changes.push(publish(State::ValidationRequired));
    let mut obs = Observation::new(
        outcome,
        format!(
            "NVIDIA {} is loaded; driver.upgradePolicy rolling replaces it with {wanted} in upgrade slot {} of {}",
            loaded,
            ours.or(fleet.free()).map_or(0, |i| i.saturating_add(1)),
            fleet.slots,
        ),
    );
    obs.on_change = Outcome::Installed;
    obs.changes = changes;
    // Failing to take the slot (another node was first) is no failure.
    obs.on_failure = Some(failure(ctx, 1));
    details(&mut obs, Some(from));
    Ok(Some(obs))
}
