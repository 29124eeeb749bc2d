//! GPU fault remediation (`remediation.enabled`): what an operator does at
//! 3 a.m., done by the node itself and never to more of the fleet than
//! the fleet allows.
//!
//! The `gpu-remediation` state reads the node's faults (`faults.rs`),
//! classes them as NVIDIA's XID catalogue does, and by the strongest
//! class's policy walks the node through stages (`record.rs`), each
//! published in `gpuprov.io/remediation` as it starts: `tainted` (gpuprov's
//! `NoSchedule` taint; `GPUReady` False), then, only while holding one of
//! the fleet's remediation slots (`crate::slots`, Leases, their own
//! `maxUnavailable`), `draining` (cordon, evict GPU pods), `resetting`
//! (NVML, `reset.rs`) or `rebooting` (the spec's command), then
//! `recovering` until health holds for `health.recoverAfterSeconds`, then
//! `recovered`: taint, cordon and slot gone. A fault within
//! `flapWindowSeconds` of a recovery, or a step that fails, leaves the
//! node `needs-attention` for a person (who sets the label to `cleared`).
//! A fault storm (`storm.rs`) stops every node at `taint`.

pub mod action;
pub mod faults;
pub mod record;
pub mod reset;
pub mod storm;

use std::time::Duration;

use action::Action;
use faults::Fault;
use record::{Record, Stage};
use reset::ResetTarget;

use crate::slots::{self, SlotKind};
use crate::spec::{FaultClass, RemediationSpec, RemedyPolicy};
use crate::state::{Change, LookAgain, Observation, OnFailure, Outcome, StateContext, StateError};

/// Where the node's remediation stands (`Stage`); absent when healthy.
pub const STAGE_LABEL: &str = "gpuprov.io/remediation";
/// When the node's fault began (seconds since the epoch), while it lasts:
/// what nodes count for a storm.
pub const FAULT_SINCE_LABEL: &str = "gpuprov.io/gpu-fault-since";
/// gpuprov's fault taint: `gpuprov.io/gpu-fault=<class>:NoSchedule`.
pub const TAINT_KEY: &str = "gpuprov.io/gpu-fault";
/// The Lease whose presence stops automatic remediation fleet-wide.
pub const STORM_LEASE: &str = "gpuprov-remediation-storm";
/// What a person sets `STAGE_LABEL` to, to hand a node back to gpuprov.
pub const CLEARED: &str = "cleared";
/// Where the kernel says which boot this is.
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The fleet's remediation slots.
pub static SLOTS: SlotKind = SlotKind {
    prefix: "gpuprov-remediation",
    label: "gpuprov.io/remediation-slot",
    purpose: "remediation",
    still_out: out_for_remediation,
};

/// A node whose published stage holds a slot is out of service for its
/// remediation (it died mid-way, or is rebooting): its slot is not free.
fn out_for_remediation(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(STAGE_LABEL))
        .and_then(|s| Stage::parse(s))
        .is_some_and(Stage::holds_slot)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// This boot's id: the host root's `/proc` where it is mounted there (a
/// fixture host says it this way), else gpuprov's own (one kernel, one
/// boot id, whatever the namespaces); empty where neither says.
pub fn boot_id(host: &crate::host::Host) -> String {
    let shown = |text: String| -> String { text.trim().chars().take(64).collect() };
    host.read(BOOT_ID)
        .ok()
        .flatten()
        .map(shown)
        .filter(|id| !id.is_empty())
        .or_else(|| {
            crate::host::read_user_file(std::path::Path::new(BOOT_ID), 4096)
                .ok()
                .map(shown)
        })
        .unwrap_or_default()
}

fn own(action: Action) -> Change {
    Change::own(action)
}

/// What the state decided: an outcome, a reason, the changes.
struct Decision {
    outcome: Outcome,
    reason: String,
    changes: Vec<Action>,
    look_again: Option<LookAgain>,
    /// The changes a failure makes once the slot is held.
    on_failure: Option<Vec<Action>>,
}

impl Decision {
    fn new(outcome: Outcome, reason: impl Into<String>) -> Decision {
        Decision {
            outcome,
            reason: reason.into(),
            changes: Vec::new(),
            look_again: None,
            on_failure: None,
        }
    }
}

/// The `gpu-remediation` state.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let spec = &ctx.spec.remediation;
    let record = Record::read(ctx.host);
    let boot = boot_id(ctx.host);
    let seen = if record.boot_id == boot {
        record.seen_gpus.clone()
    } else {
        Vec::new()
    };
    let all = faults::current(ctx, &seen);
    let faults: Vec<&Fault> = faults::acted_on(spec, &all);

    let mut decision = decide(ctx, &record, &boot, &faults)?;
    // The GPUs of this boot, remembered so that one gone is seen.
    let mut gpus: Vec<String> = seen;
    for gpu in ctx.facts.gpus() {
        if !gpus.contains(&gpu.address) {
            gpus.push(gpu.address.clone());
        }
    }
    if record.boot_id != boot || gpus != record.seen_gpus {
        decision.changes.insert(
            0,
            Action::Remember {
                boot_id: boot,
                gpus,
            },
        );
    }

    let mut obs = Observation::new(decision.outcome, decision.reason);
    obs.on_change = decision.outcome;
    obs.gate = Some(crate::state::Gate::Pass);
    obs.look_again = decision.look_again;
    obs.details = serde_json::json!({
        "stage": record.stage.as_str(),
        "faults": all,
        "faultsSeen": record.faults_seen,
        "actionsTaken": record.actions_taken,
        "stormsSeen": record.storms_seen,
        "slotHeld": record.stage.holds_slot(),
    });
    let taken = decision
        .changes
        .iter()
        .position(|a| matches!(a, Action::TakeSlot { .. }));
    obs.changes = decision.changes.into_iter().map(own).collect();
    if let (Some(changes), Some(at)) = (decision.on_failure, taken) {
        obs.on_failure = Some(OnFailure {
            labels: Default::default(),
            gate: crate::state::Gate::Pass,
            changes: changes.into_iter().map(own).collect(),
            // Failing to take the slot (another node was first) is no
            // failure of the remediation.
            changes_after: at + 1,
        });
    }
    Ok(obs)
}

fn decide(
    ctx: &StateContext,
    record: &Record,
    boot: &str,
    faults: &[&Fault],
) -> Result<Decision, StateError> {
    let spec = &ctx.spec.remediation;
    let now = now();
    let described = || {
        faults
            .iter()
            .map(|f| f.describe())
            .collect::<Vec<_>>()
            .join("; ")
    };
    if ctx.cluster.is_none() {
        let why = "remediation acts through the API server, and there is none";
        return Ok(if !faults.is_empty() {
            Decision::new(
                Outcome::Failed,
                format!("{why}; GPU faults: {}", described()),
            )
        } else if record.stage.tainted() {
            Decision::new(
                Outcome::Failed,
                format!(
                    "{why}; the node's remediation is at {} ({})",
                    record.stage.as_str(),
                    record::RECORD_FILE
                ),
            )
        } else {
            Decision::new(Outcome::Ready, "no GPU fault")
        });
    }
    let namespace = ctx.spec.operands.namespace.clone();
    let label = ctx.node_label(STAGE_LABEL);

    // A person hands the node back (on a node with nothing to hand back,
    // their label is only taken away).
    if label.as_deref() == Some(CLEARED) {
        let mut d = Decision::new(
            Outcome::Ready,
            format!("{STAGE_LABEL}={CLEARED}: a person handed the node back"),
        );
        d.changes = if record.stage == Stage::Healthy {
            vec![Action::Publish {
                stage: Stage::Healthy,
                fault_since: None,
            }]
        } else {
            ending(&namespace, Stage::Healthy, "cleared by a person")
        };
        return Ok(d);
    }

    match record.stage {
        Stage::Healthy | Stage::Recovered => {
            // An error the last remediation handled is no new fault while
            // it is still recent.
            let faults: Vec<&Fault> = faults
                .iter()
                .copied()
                .filter(|f| f.at > record.handled_until)
                .collect();
            let faults = faults.as_slice();
            if faults.is_empty() {
                let reason = match record.recovered_at {
                    Some(at) if record.stage == Stage::Recovered => {
                        format!("no GPU fault (recovered at {})", record::rfc3339(at))
                    }
                    _ => "no GPU fault".to_string(),
                };
                return Ok(Decision::new(Outcome::Ready, reason));
            }
            if let Some(at) = record.recovered_at
                && now.saturating_sub(at) < spec.flap_window_seconds
            {
                return Ok(needs_attention(
                    record,
                    faults,
                    &format!(
                        "faulted again {} s after recovering (remediation.flapWindowSeconds {})",
                        now.saturating_sub(at),
                        spec.flap_window_seconds
                    ),
                    "GpuFaultRepeated",
                    None,
                ));
            }
            begin(ctx, record, faults, &namespace)
        }
        Stage::Tainted | Stage::WaitingForSlot | Stage::StormHold => {
            if faults.is_empty() {
                // An XID clears only once `recoverAfterSeconds` passed
                // without another: health held already. A GPU lost or
                // unlisted clears the moment it is back: it must hold.
                let xids_only = record.faults.iter().all(|f| {
                    !matches!(
                        f.class(),
                        Some(FaultClass::GpuLost | FaultClass::NvmlMismatch)
                    )
                });
                if !xids_only {
                    let mut d = Decision::new(
                        Outcome::Degraded,
                        "the GPU fault cleared: recovering while health holds",
                    );
                    d.changes = entering(
                        Stage::Recovering,
                        Vec::new(),
                        "the fault cleared",
                        None,
                        Some(record.fault_since),
                    )
                    .into();
                    return Ok(d);
                }
                let mut d = Decision::new(Outcome::Ready, "the GPU fault cleared: recovered");
                d.changes = ending(&namespace, Stage::Recovered, "the fault cleared");
                // Nothing past the taint was done: no cordon, no slot.
                d.changes
                    .retain(|a| !matches!(a, Action::Uncordon | Action::ReleaseSlot { .. }));
                return Ok(d);
            }
            begin(ctx, record, faults, &namespace)
        }
        Stage::Draining | Stage::Resetting => {
            // Stopped mid-way (a restart): done again from the start,
            // each step being safe to do twice.
            begin(ctx, record, faults, &namespace)
        }
        Stage::Rebooting => {
            if record.rebooted_from.as_deref() != Some(boot) {
                let mut d = Decision::new(Outcome::Degraded, "the node rebooted: recovering");
                d.changes = entering(
                    Stage::Recovering,
                    Vec::new(),
                    "the node rebooted",
                    None,
                    Some(record.fault_since),
                )
                .into();
                return Ok(d);
            }
            Ok(Decision::new(
                Outcome::Degraded,
                format!(
                    "the reboot command ran at {}; waiting for the node to go down",
                    record::rfc3339(record.since)
                ),
            ))
        }
        Stage::Recovering => {
            // Faults from before the action are what it acted on.
            let again: Vec<&Fault> = faults
                .iter()
                .copied()
                .filter(|f| f.at > record.since)
                .collect();
            if !again.is_empty() {
                return Ok(needs_attention(
                    record,
                    &again,
                    "the fault came back after the remediation",
                    "GpuFaultPersists",
                    Some(&namespace),
                ));
            }
            let recover_after = ctx.spec.health.recover_after_seconds;
            let held = now.saturating_sub(record.since);
            if held >= recover_after {
                let mut d = Decision::new(
                    Outcome::Ready,
                    format!("health held for {recover_after} s after the remediation: recovered"),
                );
                d.changes = ending(&namespace, Stage::Recovered, "health held");
                return Ok(d);
            }
            let mut d = Decision::new(
                Outcome::Degraded,
                format!(
                    "recovering: health must hold {} s more (health.recoverAfterSeconds {recover_after})",
                    recover_after - held
                ),
            );
            d.look_again = Some(LookAgain::After(Duration::from_secs(
                recover_after - held + 1,
            )));
            Ok(d)
        }
        Stage::NeedsAttention => {
            let mut d = Decision::new(
                Outcome::Degraded,
                format!(
                    "left tainted for a person (set {STAGE_LABEL}={CLEARED} to hand it back): {}",
                    record
                        .history
                        .iter()
                        .rev()
                        .take(2)
                        .rev()
                        .map(|e| e.what.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            );
            if !tainted(ctx) {
                d.changes = vec![Action::Taint {
                    class: first_class(record, faults),
                }];
            }
            Ok(d)
        }
    }
}

fn first_class(record: &Record, faults: &[&Fault]) -> String {
    faults
        .first()
        .map(|f| f.class.clone())
        .or_else(|| record.faults.first().map(|f| f.class.clone()))
        .unwrap_or_else(|| "unknown".into())
}

/// Where this run notes that it put the fault taint on or took it away.
const TAINT_SET: &str = "taint:gpuprov.io/gpu-fault";

/// Whether the node carries gpuprov's fault taint: as this run left it,
/// else as the Node was read.
fn tainted(ctx: &StateContext) -> bool {
    match ctx.labels_set.get(TAINT_SET).as_deref() {
        Some(set) => set == "on",
        None => ctx
            .facts
            .node_taints
            .iter()
            .any(|t| t.key == TAINT_KEY && t.effect == "NoSchedule"),
    }
}

/// Entering `stage`: the record says so (with `faults` and why), then the
/// node's labels (and when its fault began, while it lasts).
fn entering(
    stage: Stage,
    faults: Vec<Fault>,
    note: impl Into<String>,
    storm: Option<String>,
    fault_since: Option<u64>,
) -> [Action; 2] {
    [
        Action::Enter {
            stage,
            faults,
            note: note.into(),
            storm,
        },
        Action::Publish { stage, fault_since },
    ]
}

fn owned(faults: &[&Fault]) -> Vec<Fault> {
    faults.iter().map(|f| (*f).clone()).collect()
}

/// The node left tainted for a person, with its history in an event;
/// its slot (if any) goes back, so the fleet goes on.
fn needs_attention(
    record: &Record,
    faults: &[&Fault],
    why: &str,
    reason: &str,
    release_from: Option<&str>,
) -> Decision {
    let mut d = Decision::new(
        Outcome::Degraded,
        format!("{why}: left tainted for a person"),
    );
    let described: Vec<String> = faults.iter().map(|f| f.describe()).collect();
    let history = record.history_text();
    d.changes = entering(Stage::NeedsAttention, owned(faults), why, None, Some(now())).into();
    d.changes.extend([
        Action::Taint {
            class: first_class(record, faults),
        },
        Action::Event {
            warning: true,
            reason: reason.to_string(),
            note: format!(
                "{why}: {}; left tainted for a person (set {STAGE_LABEL}={CLEARED} once it is checked). History: {}",
                described.join("; "),
                if history.is_empty() { "none" } else { &history }
            ),
        },
    ]);
    if let Some(namespace) = release_from {
        d.changes.push(Action::ReleaseSlot {
            namespace: namespace.to_string(),
        });
    }
    d
}

/// What ends a remediation in `stage` (`recovered`, or `healthy` when a
/// person cleared it): taint and cordon go, the labels say so, the slot
/// goes back last.
fn ending(namespace: &str, stage: Stage, why: &str) -> Vec<Action> {
    let [enter, publish] = entering(stage, Vec::new(), why, None, None);
    vec![
        Action::Untaint,
        Action::Uncordon,
        enter,
        publish,
        Action::Event {
            warning: false,
            reason: "GpuRecovered".into(),
            note: format!("GPU remediation ended: {why}"),
        },
        Action::ReleaseSlot {
            namespace: namespace.to_string(),
        },
    ]
}

/// A remediation begins (or goes on from where it waited): taint only,
/// or, for a policy past it, a storm check and a slot, then the action.
fn begin(
    ctx: &StateContext,
    record: &Record,
    faults: &[&Fault],
    namespace: &str,
) -> Result<Decision, StateError> {
    let spec = &ctx.spec.remediation;
    let Some(cluster) = ctx.cluster else {
        return Ok(Decision::new(
            Outcome::Failed,
            "remediation acts through the API server, and there is none",
        ));
    };
    // The policy: the strongest of the faults now and those it began with.
    let kept: Vec<&Fault> = record.faults.iter().collect();
    let all: Vec<&Fault> = faults.iter().copied().chain(kept).collect();
    let Some((policy, class)) = faults::strongest(spec, &all) else {
        return Ok(Decision::new(Outcome::Ready, "no GPU fault"));
    };
    let fault_since = if record.stage.tainted() {
        record.fault_since
    } else {
        now()
    };
    let described: Vec<String> = faults.iter().map(|f| f.describe()).collect();
    let described = described.join("; ");
    let tainting = |stage: Stage, note: String, storm: Option<String>| {
        let mut changes = Vec::new();
        if record.stage != stage || (storm.is_some() && record.storm_reported != storm) {
            changes.extend(entering(
                stage,
                owned(faults),
                note,
                storm,
                Some(fault_since),
            ));
        }
        if !tainted(ctx) {
            changes.push(Action::Taint {
                class: class.clone(),
            });
        }
        changes
    };

    if policy == RemedyPolicy::Taint || policy == RemedyPolicy::Ignore {
        let mut d = Decision::new(
            Outcome::Degraded,
            format!("GPU fault, tainted (remediation.policy.{class}: taint): {described}"),
        );
        d.changes = tainting(Stage::Tainted, described.clone(), None);
        if record.stage != Stage::Tainted {
            d.changes.push(Action::Event {
                warning: true,
                reason: "GpuFault".into(),
                note: format!("{described}; tainted {TAINT_KEY}={class}:NoSchedule"),
            });
        }
        d.look_again = Some(LookAgain::After(Duration::from_secs(
            ctx.spec.health.recover_after_seconds + 1,
        )));
        return Ok(d);
    }

    // A driver upgrade under way has the node: remediation waits at taint.
    if crate::upgrade::current_state(ctx).is_some_and(crate::upgrade::State::in_progress) {
        let mut d = Decision::new(
            Outcome::Degraded,
            format!(
                "GPU fault, tainted; {} waits for the driver upgrade under way: {described}",
                policy.as_str()
            ),
        );
        d.changes = tainting(Stage::Tainted, described.clone(), None);
        return Ok(d);
    }

    let api = |e: crate::kube::KubeError| StateError::operator(crate::state::error_chain(&e));
    if let Some(storm) = storm::raised(cluster, namespace).map_err(api)? {
        let mut d = Decision::new(
            Outcome::Degraded,
            format!(
                "GPU fault, tainted; {} stopped by a fault storm: {}",
                policy.as_str(),
                storm.describe()
            ),
        );
        let reported = record.storm_reported.as_deref() == Some(storm.uid.as_str());
        d.changes = tainting(Stage::StormHold, storm.describe(), Some(storm.uid.clone()));
        if !reported {
            d.changes.push(Action::Event {
                warning: true,
                reason: "GpuRemediationStorm".into(),
                note: format!(
                    "{} not done: a GPU fault storm stopped automatic remediation fleet-wide: {}; faults here: {described}",
                    policy.as_str(),
                    storm.describe()
                ),
            });
        }
        d.look_again = Some(LookAgain::SharedSlot);
        return Ok(d);
    }

    let fleet = slots::Fleet::read(cluster, &SLOTS, namespace, spec.max_unavailable)?;
    let ours = fleet.ours(&cluster.node);
    if ours.is_none() {
        if fleet.free().is_none() {
            let mut d = Decision::new(
                Outcome::Degraded,
                format!(
                    "GPU fault, tainted; {} waits for a remediation slot ({}): {described}",
                    policy.as_str(),
                    fleet.describe()
                ),
            );
            d.changes = tainting(Stage::WaitingForSlot, fleet.describe(), None);
            d.look_again = Some(LookAgain::SharedSlot);
            return Ok(d);
        }
        let (faulting, threshold) = storm::count(cluster, spec).map_err(StateError::operator)?;
        if faulting > threshold {
            let mut d = Decision::new(
                Outcome::Degraded,
                format!(
                    "GPU fault storm: {faulting} GPU nodes faulting within {} s, more than {threshold}: automatic remediation stops fleet-wide",
                    spec.storm_window_seconds
                ),
            );
            d.changes = vec![Action::RaiseStorm {
                namespace: namespace.to_string(),
                faulting,
                threshold,
            }];
            d.changes.extend(tainting(
                Stage::StormHold,
                format!("{faulting} GPU nodes faulting, more than {threshold}"),
                None,
            ));
            d.look_again = Some(LookAgain::SharedSlot);
            return Ok(d);
        }
    }

    // The slot is ours, or free: the action.
    let mut changes = vec![Action::TakeSlot {
        namespace: namespace.to_string(),
        slots: fleet.slots,
        lease_seconds: spec.lease_duration_seconds,
    }];
    changes.extend(entering(
        Stage::Draining,
        owned(faults),
        format!("{}: {described}", policy.as_str()),
        None,
        Some(fault_since),
    ));
    changes.extend([
        Action::Taint {
            class: class.clone(),
        },
        Action::Event {
            warning: true,
            reason: "GpuRemediation".into(),
            note: format!("{}: {described}", policy.as_str()),
        },
        Action::Cordon,
    ]);
    if !spec.wait_for_jobs.pod_selector.is_empty() {
        changes.push(Action::WaitForJobs {
            selector: spec.wait_for_jobs.pod_selector.clone(),
            timeout_seconds: spec.wait_for_jobs.timeout_seconds,
        });
    }
    changes.push(Action::EvictGpuPods {
        selector: spec.drain.pod_selector.clone(),
        timeout_seconds: spec.drain.timeout_seconds,
        delete_empty_dir: spec.drain.delete_empty_dir,
        force: spec.drain.force,
        operands_namespace: namespace.to_string(),
    });
    let stage =
        |stage: Stage, note: String| entering(stage, Vec::new(), note, None, Some(fault_since));
    match policy {
        RemedyPolicy::Reset => {
            let targets = reset_targets(spec, &all);
            let library = crate::gpu::nvml::find_library(ctx.host, ctx.facts.nvml_lib.as_deref())
                .map_err(|p| StateError::operator(p.to_string()))?;
            changes.extend(stage(Stage::Resetting, "GPU pods evicted".into()));
            changes.push(Action::ResetGpus {
                gpus: targets,
                library,
                namespace: namespace.to_string(),
            });
            changes.extend(stage(Stage::Recovering, "GPU reset through NVML".into()));
        }
        RemedyPolicy::Reboot => {
            changes.extend(stage(
                Stage::Rebooting,
                format!("running `{}`", spec.reboot_command.join(" ")),
            ));
            changes.push(Action::Reboot {
                argv: spec.reboot_command.clone(),
                namespace: namespace.to_string(),
            });
        }
        _ => changes.extend(stage(Stage::Recovering, "GPU pods evicted".into())),
    }
    let mut d = Decision::new(
        Outcome::Degraded,
        format!(
            "GPU fault: {} in remediation slot {} of {}: {described}",
            policy.as_str(),
            ours.or(fleet.free()).map_or(0, |i| i.saturating_add(1)),
            fleet.slots
        ),
    );
    d.changes = changes;
    // Another node may take the slot first: then it looks again soon.
    d.look_again = Some(LookAgain::SharedSlot);
    let mut on_failure: Vec<Action> = stage(
        Stage::NeedsAttention,
        format!("{} failed (the node's events say why)", policy.as_str()),
    )
    .into();
    on_failure.push(Action::ReleaseSlot {
        namespace: namespace.to_string(),
    });
    d.on_failure = Some(on_failure);
    Ok(d)
}

/// The GPUs whose faults ask for a reset, by UUID (one NVML could not
/// name cannot be reset; none at all fails the reset step).
fn reset_targets(spec: &RemediationSpec, faults: &[&Fault]) -> Vec<ResetTarget> {
    let mut targets: Vec<ResetTarget> = Vec::new();
    for fault in faults {
        if faults::policy(spec, fault) != RemedyPolicy::Reset || fault.uuid.is_empty() {
            continue;
        }
        if !targets.iter().any(|t| t.uuid == fault.uuid) {
            targets.push(ResetTarget {
                address: fault.gpu.clone(),
                uuid: fault.uuid.clone(),
            });
        }
    }
    targets
}

/// With remediation off (or opted out): a remediation under way ends,
/// taint, cordon and slot gone.
pub fn withdraw(ctx: &StateContext) -> Result<Vec<Change>, StateError> {
    let record = Record::read(ctx.host);
    if ctx.cluster.is_none() || !record.stage.tainted() {
        return Ok(Vec::new());
    }
    Ok(ending(
        &ctx.spec.operands.namespace,
        Stage::Healthy,
        "remediation turned off",
    )
    .into_iter()
    .map(own)
    .collect())
}
