//! A remediation's steps, as data (each one `Change`), and how each is
//! made: one API call, a loop of them (eviction), an NVML reset, or the
//! spec's reboot command.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::faults::Fault;
use super::record::{self, Record, Stage};
use super::reset::ResetTarget;
use super::{FAULT_SINCE_LABEL, SLOTS, STAGE_LABEL, TAINT_KEY};
use crate::kube::Cluster;
use crate::slots;
use crate::spec::StartupTaint;
use crate::state::{
    CapabilityChange, ErrorKind, MakeContext, StateError, error_chain, json_fields,
};

/// The field manager of the remediation labels, apart from gpuprov's
/// label set: each stage is published as it starts, not at a converge's end.
const STAGE_MANAGER: &str = "gpuprov-remediation";

/// What a remediation does next; each is one `Change`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "do", rename_all = "camelCase")]
pub enum Action {
    /// Remember the GPUs on the PCI bus on this boot (one gone later is lost).
    Remember {
        boot_id: String,
        gpus: Vec<String>,
    },
    /// Write the node's record: the stage it enters, and the faults it is
    /// about (a history line says why).
    Enter {
        stage: Stage,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        faults: Vec<Fault>,
        note: String,
        /// The storm this node raised its event for.
        #[serde(skip_serializing_if = "Option::is_none")]
        storm: Option<String>,
    },
    /// Label the node with the stage (and when its fault began).
    Publish {
        stage: Stage,
        #[serde(skip_serializing_if = "Option::is_none")]
        fault_since: Option<u64>,
    },
    /// Put gpuprov's fault taint on the node.
    Taint {
        class: String,
    },
    /// Take gpuprov's fault taint away.
    Untaint,
    TakeSlot {
        namespace: String,
        slots: u64,
        lease_seconds: u64,
    },
    ReleaseSlot {
        namespace: String,
    },
    Cordon,
    Uncordon,
    /// Wait for the pods `selector` names on this node to finish.
    WaitForJobs {
        selector: String,
        timeout_seconds: u64,
    },
    /// Evict the pods on this node that use GPUs, through the Eviction API.
    EvictGpuPods {
        selector: String,
        timeout_seconds: u64,
        delete_empty_dir: bool,
        force: bool,
        operands_namespace: String,
    },
    /// Reset GPUs through NVML, none of them held by a process, then see
    /// that NVML reads each again.
    ResetGpus {
        gpus: Vec<ResetTarget>,
        library: PathBuf,
        namespace: String,
    },
    /// Run the spec's reboot command (the record says which boot ran it).
    Reboot {
        argv: Vec<String>,
        namespace: String,
    },
    /// Stop automatic remediation fleet-wide: create the storm Lease.
    RaiseStorm {
        namespace: String,
        faulting: u64,
        threshold: u64,
    },
    /// A node event.
    Event {
        warning: bool,
        reason: String,
        note: String,
    },
}

impl CapabilityChange for Action {
    fn kind(&self) -> &'static str {
        "remediation"
    }

    fn summary(&self) -> String {
        match self {
            Action::Remember { gpus, .. } => format!(
                "remember this boot's {} GPUs in {}",
                gpus.len(),
                super::record::RECORD_FILE
            ),
            Action::Enter { stage, .. } => format!(
                "record remediation stage {} in {}",
                stage.as_str(),
                super::record::RECORD_FILE
            ),
            Action::Publish { stage, .. } if *stage == Stage::Healthy => {
                format!("remove the node's {STAGE_LABEL} and {FAULT_SINCE_LABEL} labels")
            }
            Action::Publish { stage, .. } => {
                format!("label the node {STAGE_LABEL}={}", stage.as_str())
            }
            Action::Taint { class } => format!("taint the node {TAINT_KEY}={class}:NoSchedule"),
            Action::Untaint => format!("remove the taint {TAINT_KEY}"),
            Action::TakeSlot {
                namespace, slots, ..
            } => format!(
                "take a remediation slot (one of {slots} Leases {namespace}/{}-N)",
                SLOTS.prefix
            ),
            Action::ReleaseSlot { namespace } => {
                format!("give the remediation slot back (delete its Lease in {namespace})")
            }
            Action::Cordon => "cordon the node (spec.unschedulable)".into(),
            Action::Uncordon => "uncordon the node (unless it was unschedulable before)".into(),
            Action::WaitForJobs {
                selector,
                timeout_seconds,
            } => crate::upgrade::action::wait_for_jobs_summary(selector, *timeout_seconds),
            Action::EvictGpuPods {
                selector,
                timeout_seconds,
                ..
            } => {
                let which = if selector.is_empty() {
                    "the pods on this node that use GPUs".to_string()
                } else {
                    format!("the pods `{selector}` on this node that use GPUs")
                };
                format!(
                    "evict {which} through the Eviction API (PodDisruptionBudgets honoured), up to {timeout_seconds}s"
                )
            }
            Action::ResetGpus { gpus, .. } => format!(
                "reset GPU {} through NVML once no process holds it, then read it again",
                gpus.iter()
                    .map(|g| g.address.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Action::Reboot { argv, .. } => {
                format!("reboot the node: run `{}`", argv.join(" "))
            }
            Action::RaiseStorm {
                namespace,
                faulting,
                threshold,
            } => format!(
                "stop automatic remediation fleet-wide: {faulting} GPU nodes faulting, more than {threshold} (create Lease {namespace}/{})",
                super::STORM_LEASE
            ),
            Action::Event { reason, note, .. } => format!("event {reason}: {note}"),
        }
    }

    fn fields(&self) -> serde_json::Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        make(on, self).map_err(|why| match self {
            // Another node took the slot first (or the API server did not
            // answer): nothing was disrupted, and looking again may do.
            Action::TakeSlot { .. } => StateError::new(ErrorKind::Transient, why),
            _ => StateError::operator(why),
        })
    }
}

fn api(e: crate::kube::KubeError) -> String {
    error_chain(&e)
}

fn fault_taint(class: &str) -> StartupTaint {
    StartupTaint {
        key: TAINT_KEY.to_string(),
        value: class.to_string(),
        effect: "NoSchedule".to_string(),
    }
}

/// Makes `action`; a step past taint that fails leaves its reason in the
/// record's history and in a Node event, for the person who takes over.
fn make(on: &mut MakeContext, action: &Action) -> Result<(), String> {
    let result = make_step(on, action);
    if let Err(why) = &result
        && let Some(step) = action.disruptive_step()
    {
        let mut record = Record::read(on.host);
        record.note(super::now(), format!("{step} failed: {why}"));
        let noted = record.write(on.host);
        if let Some(cluster) = on.cluster {
            let note = format!("{step} failed: {why}");
            if let Err(e) = cluster.post_event(true, "GpuRemediationFailed", "Remediate", &note) {
                tracing::warn!("the failure's event was not posted: {}", error_chain(&e));
            }
        }
        if let Err(e) = noted {
            tracing::warn!("the failure was not recorded: {e}");
        }
    }
    result
}

impl Action {
    /// The steps that disrupt the node's work, by name.
    fn disruptive_step(&self) -> Option<&'static str> {
        Some(match self {
            Action::Cordon => "cordon",
            Action::WaitForJobs { .. } => "waiting for jobs",
            Action::EvictGpuPods { .. } => "drain",
            Action::ResetGpus { .. } => "reset",
            Action::Reboot { .. } => "reboot",
            _ => return None,
        })
    }
}

fn make_step(on: &mut MakeContext, action: &Action) -> Result<(), String> {
    if let Action::Enter {
        stage,
        faults,
        note,
        storm,
    } = action
    {
        return enter(on.host, *stage, faults, note, storm.as_deref());
    }
    if let Action::Remember { boot_id, gpus } = action {
        let mut record = Record::read(on.host);
        record.boot_id = boot_id.clone();
        record.seen_gpus = gpus.clone();
        return record.write(on.host);
    }
    let cluster = on
        .cluster
        .ok_or("remediation acts through the API server, and there is none")?;
    match action {
        Action::Enter { .. } | Action::Remember { .. } => Ok(()),
        Action::Publish { stage, fault_since } => {
            let mut labels = BTreeMap::new();
            if *stage != Stage::Healthy {
                labels.insert(STAGE_LABEL.to_string(), stage.as_str().to_string());
            }
            if let Some(since) = fault_since {
                labels.insert(FAULT_SINCE_LABEL.to_string(), since.to_string());
            }
            if *stage == Stage::Healthy {
                // A person's `cleared` is theirs: taken over first, so
                // that applying none removes it.
                let ours = BTreeMap::from([(STAGE_LABEL.to_string(), stage.as_str().to_string())]);
                cluster
                    .apply_labels_forced(STAGE_MANAGER, &ours)
                    .map_err(api)?;
            }
            cluster
                .apply_labels_forced(STAGE_MANAGER, &labels)
                .map_err(api)?;
            on.labels_set.record(STAGE_LABEL, stage.as_str());
            tracing::info!("{STAGE_LABEL}={}", stage.as_str());
            Ok(())
        }
        Action::Taint { class } => {
            crate::readiness::set_taint(cluster, &fault_taint(class), true, "a GPU fault")
                .map_err(api)?;
            on.labels_set.record(super::TAINT_SET, "on");
            Ok(())
        }
        Action::Untaint => {
            crate::readiness::set_taint(cluster, &fault_taint(""), false, "the GPUs recovered")
                .map_err(api)?;
            on.labels_set.record(super::TAINT_SET, "off");
            Ok(())
        }
        Action::TakeSlot {
            namespace,
            slots,
            lease_seconds,
        } => slots::take(cluster, &SLOTS, namespace, *slots, *lease_seconds),
        Action::ReleaseSlot { namespace } => slots::release(cluster, &SLOTS, namespace),
        Action::Cordon => {
            holding_slot(cluster, "cordoning")?;
            cluster.set_unschedulable(true).map_err(api)
        }
        Action::Uncordon => cluster.set_unschedulable(false).map_err(api),
        Action::WaitForJobs {
            selector,
            timeout_seconds,
        } => crate::upgrade::run::wait_for_jobs(cluster, selector, *timeout_seconds),
        Action::EvictGpuPods {
            selector,
            timeout_seconds,
            delete_empty_dir,
            force,
            operands_namespace,
        } => {
            holding_slot(cluster, "evicting GPU pods")?;
            let gpu_pod = |pod: &k8s_openapi::api::core::v1::Pod| {
                crate::upgrade::run::uses_gpus(pod)
                    && !crate::upgrade::run::is_operand(pod, operands_namespace)
            };
            crate::upgrade::run::drain(
                cluster,
                &gpu_pod,
                selector,
                std::time::Duration::from_secs(*timeout_seconds),
                *delete_empty_dir,
                *force,
                "remediation.drain",
            )
        }
        Action::ResetGpus {
            gpus,
            library,
            namespace,
        } => {
            holding_slot(cluster, "resetting")?;
            no_storm(cluster, namespace, "resetting")?;
            let done = super::reset::reset(library, gpus)?;
            tracing::info!("{done}");
            Ok(())
        }
        Action::Reboot { argv, namespace } => {
            holding_slot(cluster, "rebooting")?;
            no_storm(cluster, namespace, "rebooting")?;
            // A new boot id is what ends `rebooting`: without one, the
            // node could never tell it came back.
            let boot = super::boot_id(on.host);
            if boot.is_empty() {
                return Err(format!(
                    "no boot id ({}): gpuprov could not tell the node rebooted, so it does not reboot it",
                    super::BOOT_ID
                ));
            }
            let mut record = Record::read(on.host);
            record.rebooted_from = Some(boot);
            record.write(on.host)?;
            let run = on.host.run(argv).map_err(|e| error_chain(&e))?;
            let (ok, summary) = (run.success(), run.failure_summary());
            on.commands.push(run);
            if ok {
                Ok(())
            } else {
                Err(format!("the reboot command `{}` {summary}", argv.join(" ")))
            }
        }
        Action::RaiseStorm {
            namespace,
            faulting,
            threshold,
        } => {
            let storm = super::storm::raise(cluster, namespace, *faulting, *threshold)?;
            let mut record = Record::read(on.host);
            if record.report_storm(&storm.uid) {
                record.write(on.host)?;
                let note = format!(
                    "automatic remediation stopped fleet-wide by a GPU fault storm: {}",
                    storm.describe()
                );
                cluster
                    .post_event(true, "GpuRemediationStorm", "Remediate", &note)
                    .map_err(api)?;
            }
            Ok(())
        }
        Action::Event {
            warning,
            reason,
            note,
        } => cluster
            .post_event(*warning, reason, "Remediate", note)
            .map_err(api),
    }
}

/// A disruptive step starts only while the node holds its slot: one lost
/// (the API server unreachable for longer than the Lease) may be another
/// node's by now.
fn holding_slot(cluster: &Cluster, doing: &str) -> Result<(), String> {
    if slots::renewing(cluster, &SLOTS) {
        Ok(())
    } else {
        Err(format!(
            "the remediation slot was lost before {doing}: another node may hold it now; stopping here"
        ))
    }
}

/// A storm raised meanwhile stops the node before a reset or a reboot.
fn no_storm(cluster: &Cluster, namespace: &str, doing: &str) -> Result<(), String> {
    match super::storm::raised(cluster, namespace).map_err(api)? {
        Some(storm) => Err(format!(
            "a GPU fault storm stopped automatic remediation before {doing}: {}",
            storm.describe()
        )),
        None => Ok(()),
    }
}

/// Writes the record's new stage.
fn enter(
    host: &crate::host::Host,
    stage: Stage,
    faults: &[Fault],
    note: &str,
    storm: Option<&str>,
) -> Result<(), String> {
    let now = super::now();
    let mut record = Record::read(host);
    if !record.stage.tainted() && stage.tainted() {
        record.fault_since = now;
        record.faults.clear();
    }
    let refs: Vec<&Fault> = faults.iter().collect();
    record.add_faults(&refs);
    match stage {
        Stage::Recovered => {
            record.recovered_at = Some(now);
            record.faults.clear();
            record.rebooted_from = None;
            // What the action acted on is handled; an error since it
            // ended would have kept it from recovering.
            record.handled_until = if record.stage == Stage::Recovering {
                record.since
            } else {
                now
            };
        }
        Stage::Healthy => {
            record.recovered_at = None;
            record.faults.clear();
            record.rebooted_from = None;
            record.handled_until = now;
        }
        Stage::Draining | Stage::Resetting | Stage::Rebooting => {
            record::count(&mut record.actions_taken, stage.as_str());
        }
        _ => {}
    }
    if stage == Stage::Tainted && record.stage != Stage::Tainted {
        record::count(&mut record.actions_taken, "taint");
    }
    if let Some(storm) = storm {
        record.report_storm(storm);
    }
    record.stage = stage;
    record.since = now;
    record.note(now, format!("{}: {note}", stage.as_str()));
    record.write(host)
}
