//! The GPU faults on the node now, each in its class: the critical XIDs
//! `gpuprov run` recorded (`gpu::xid`), the GPUs NVML reports lost, the
//! GPUs seen on this boot that the PCI bus no longer has, and GPUs the
//! bus has on the nvidia driver that NVML does not list.

use serde::{Deserialize, Serialize};

use crate::spec::{FaultClass, RemediationSpec, RemedyPolicy};
use crate::state::StateContext;

/// One fault, as the record and the events keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub class: FaultClassName,
    /// The GPU: its PCI address where known, else NVML's index.
    pub gpu: String,
    /// Its UUID where NVML knew it (a reset finds the GPU by it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    /// What was seen, for people: `XID 48 (double-bit ECC error)`.
    pub what: String,
    /// Seconds since the epoch: when the driver reported it, or when
    /// gpuprov first saw it (a lost GPU).
    pub at: u64,
}

/// A `FaultClass` as its word, so a record written by another version
/// with a class this one lacks still reads.
pub type FaultClassName = String;

impl Fault {
    pub fn class(&self) -> Option<FaultClass> {
        FaultClass::parse(&self.class)
    }

    pub fn describe(&self) -> String {
        format!("{} on GPU {}: {}", self.class, self.gpu, self.what)
    }
}

/// The faults now, newest last; `None` in NVML's place when NVML cannot
/// be asked at all (no library: a node without the driver yet).
pub fn current(ctx: &StateContext, seen_this_boot: &[String]) -> Vec<Fault> {
    let spec = &ctx.spec.remediation;
    let now = super::now();
    let mut faults = Vec::new();

    // The inventory, and the GPUs NVML reports lost.
    let nvml = ctx.facts.nvml_without_lost(ctx.host).ok();
    let listed: Vec<(String, String, u32)> = nvml
        .as_ref()
        .map(|(inventory, _)| {
            inventory
                .devices
                .iter()
                .map(|d| (d.sysfs_address(), d.uuid.clone(), d.index))
                .collect()
        })
        .unwrap_or_default();
    if let Some((_, lost)) = &nvml {
        for index in lost {
            faults.push(Fault {
                class: FaultClass::GpuLost.as_str().into(),
                gpu: format!("index {index}"),
                uuid: String::new(),
                what: "NVML reports it lost (GPU_IS_LOST): fallen off the bus or inaccessible"
                    .into(),
                at: now,
            });
        }
    }

    // The PCI bus: GPUs seen on this boot and gone, and GPUs on the
    // nvidia driver NVML does not list (where NVML answered at all).
    let on_bus: Vec<&str> = ctx.facts.gpus().map(|g| g.address.as_str()).collect();
    for address in seen_this_boot {
        if !on_bus.contains(&address.as_str()) {
            faults.push(Fault {
                class: FaultClass::GpuLost.as_str().into(),
                gpu: address.clone(),
                uuid: String::new(),
                what: "gone from the PCI bus since this boot began".into(),
                at: now,
            });
        }
    }
    if let Some((_, lost)) = &nvml {
        let unlisted: Vec<&str> = ctx
            .facts
            .gpus()
            .filter(|g| g.driver.as_deref() == Some("nvidia"))
            .map(|g| g.address.as_str())
            .filter(|address| !listed.iter().any(|(a, _, _)| a == address))
            .collect();
        // A lost GPU is not listed either: it is counted once, as lost.
        for address in unlisted.iter().skip(lost.len()) {
            faults.push(Fault {
                class: FaultClass::NvmlMismatch.as_str().into(),
                gpu: address.to_string(),
                uuid: String::new(),
                what: "on the nvidia driver on the PCI bus, but NVML does not list it".into(),
                at: now,
            });
        }
    }

    // The critical XIDs of the last `health.recoverAfterSeconds`: the
    // newest of each XID on each GPU (a failing GPU reports thousands).
    let health = &ctx.spec.health;
    if health.xids {
        let mut newest: std::collections::BTreeMap<(u32, u64), crate::gpu::xid::GpuError> =
            std::collections::BTreeMap::new();
        for error in crate::gpu::xid::recent(ctx.host, health.recover_after_seconds)
            .into_iter()
            .filter(|e| !health.ignored_xids.contains(&e.xid))
        {
            newest.insert((error.gpu, error.xid), error);
        }
        let mut errors: Vec<_> = newest.into_values().collect();
        errors.sort_by_key(|e| e.at);
        for error in errors {
            let gpu = listed
                .iter()
                .find(|(_, uuid, index)| {
                    (!error.uuid.is_empty() && *uuid == error.uuid) || *index == error.gpu
                })
                .map_or_else(|| format!("index {}", error.gpu), |(a, _, _)| a.clone());
            faults.push(Fault {
                class: spec.class_of_xid(error.xid).as_str().into(),
                gpu,
                uuid: error.uuid.clone(),
                what: format!(
                    "XID {} ({})",
                    error.xid,
                    crate::gpu::xid::meaning(error.xid)
                ),
                at: error.at,
            });
        }
    }
    faults
}

/// The faults gpuprov acts on (their class's policy is not `ignore`).
pub fn acted_on<'a>(spec: &RemediationSpec, faults: &'a [Fault]) -> Vec<&'a Fault> {
    faults
        .iter()
        .filter(|f| policy(spec, f) != RemedyPolicy::Ignore)
        .collect()
}

pub fn policy(spec: &RemediationSpec, fault: &Fault) -> RemedyPolicy {
    fault
        .class()
        .map_or(RemedyPolicy::Taint, |class| spec.policy_of(class))
}

/// The strongest policy among `faults`, and the class that asks for it.
pub fn strongest(spec: &RemediationSpec, faults: &[&Fault]) -> Option<(RemedyPolicy, String)> {
    faults
        .iter()
        .map(|f| (policy(spec, f), f.class.clone()))
        .max_by(|a, b| a.0.cmp(&b.0))
}
