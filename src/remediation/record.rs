//! The node's remediation record, `/var/lib/gpuprov/remediation.json`:
//! where its remediation stands, what it is about, what happened before
//! (for a fault that comes back, and for people), and the totals the
//! metrics report. It survives a reboot (a reboot is a remediation step);
//! gpuprov owns it and rewrites it whole, atomically.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::faults::Fault;
use crate::host::Host;

pub const RECORD_FILE: &str = "/var/lib/gpuprov/remediation.json";
/// The history kept: the newest entries.
const HISTORY_KEPT: usize = 32;
/// The faults kept for one remediation: the newest.
const FAULTS_KEPT: usize = 16;

/// Where a node's remediation stands; published in `STAGE_LABEL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// No fault (the label is absent).
    #[default]
    Healthy,
    /// gpuprov's taint is on; its policy asks no more.
    Tainted,
    /// Tainted; its policy asks more, and every slot is held.
    WaitingForSlot,
    /// Tainted; a fault storm stopped automatic action fleet-wide.
    StormHold,
    /// Holding a slot: cordoned, GPU pods being evicted.
    Draining,
    /// Holding a slot: the faulty GPUs being reset through NVML.
    Resetting,
    /// Holding a slot: the spec's reboot command ran.
    Rebooting,
    /// The action is done: health must hold for `recoverAfterSeconds`.
    Recovering,
    /// Recovered: taint, cordon and slot are gone.
    Recovered,
    /// Left tainted for a person: the fault came back soon after a
    /// recovery, or an action failed.
    NeedsAttention,
}

impl Stage {
    pub const ALL: [Stage; 10] = [
        Stage::Healthy,
        Stage::Tainted,
        Stage::WaitingForSlot,
        Stage::StormHold,
        Stage::Draining,
        Stage::Resetting,
        Stage::Rebooting,
        Stage::Recovering,
        Stage::Recovered,
        Stage::NeedsAttention,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Healthy => "healthy",
            Stage::Tainted => "tainted",
            Stage::WaitingForSlot => "waiting-for-slot",
            Stage::StormHold => "storm-hold",
            Stage::Draining => "draining",
            Stage::Resetting => "resetting",
            Stage::Rebooting => "rebooting",
            Stage::Recovering => "recovering",
            Stage::Recovered => "recovered",
            Stage::NeedsAttention => "needs-attention",
        }
    }

    pub fn parse(text: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Past `taint`: the node holds a remediation slot.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            Stage::Draining | Stage::Resetting | Stage::Rebooting | Stage::Recovering
        )
    }

    /// gpuprov's taint is on the node.
    pub fn tainted(self) -> bool {
        !matches!(self, Stage::Healthy | Stage::Recovered)
    }
}

/// One line of history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub at: u64,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Record {
    /// The boot this record's `seenGpus` belong to.
    pub boot_id: String,
    /// The GPUs' PCI addresses seen on this boot: one gone is lost.
    pub seen_gpus: Vec<String>,
    pub stage: Stage,
    /// When the stage began (seconds since the epoch).
    pub since: u64,
    /// When the remediation began: the first fault seen.
    pub fault_since: u64,
    /// The faults it is about (the newest).
    pub faults: Vec<Fault>,
    /// The boot the reboot command ran on: a new boot id ends `rebooting`.
    pub rebooted_from: Option<String>,
    /// When the last remediation ended in a recovery.
    pub recovered_at: Option<u64>,
    /// Errors reported up to this time were handled by the last
    /// remediation (or a person cleared them): still recent, but no new
    /// fault.
    pub handled_until: u64,
    /// The storm (its Lease's UID) this node already raised an event for.
    pub storm_reported: Option<String>,
    pub history: Vec<Entry>,
    /// Faults seen, by class, since the record began.
    pub faults_seen: BTreeMap<String, u64>,
    /// Actions taken, by action.
    pub actions_taken: BTreeMap<String, u64>,
    pub storms_seen: u64,
}

impl Record {
    /// The record, or an empty one when there is none or it is unreadable
    /// (gpuprov's own; rewritten whole at the next change). A record
    /// longer than gpuprov keeps (edited by hand) is cut to its newest.
    pub fn read(host: &Host) -> Record {
        let mut record: Record = host
            .read(RECORD_FILE)
            .ok()
            .flatten()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let drop = record.history.len().saturating_sub(HISTORY_KEPT);
        record.history.drain(..drop);
        let drop = record.faults.len().saturating_sub(FAULTS_KEPT);
        record.faults.drain(..drop);
        record
    }

    pub fn write(&self, host: &Host) -> Result<(), String> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        host.make_dirs("/var/lib/gpuprov")
            .and_then(|()| host.write_atomic(RECORD_FILE, &text, 0o644).map(|_| ()))
            .map_err(|e| crate::error_chain::error_chain(&e))
    }

    pub fn note(&mut self, at: u64, what: impl Into<String>) {
        self.history.push(Entry {
            at,
            what: what.into(),
        });
        let drop = self.history.len().saturating_sub(HISTORY_KEPT);
        self.history.drain(..drop);
    }

    /// Adds faults not already kept (same class, GPU and what), counting
    /// each new one.
    pub fn add_faults(&mut self, faults: &[&Fault]) {
        for fault in faults {
            let known = self
                .faults
                .iter()
                .any(|f| f.class == fault.class && f.gpu == fault.gpu && f.what == fault.what);
            if !known {
                count(&mut self.faults_seen, &fault.class);
                self.faults.push((*fault).clone());
            }
        }
        let drop = self.faults.len().saturating_sub(FAULTS_KEPT);
        self.faults.drain(..drop);
    }

    /// Notes the storm (its Lease's UID) as reported, counting it once;
    /// whether it is new to this node.
    pub fn report_storm(&mut self, uid: &str) -> bool {
        if self.storm_reported.as_deref() == Some(uid) {
            return false;
        }
        self.storm_reported = Some(uid.to_string());
        self.storms_seen = self.storms_seen.saturating_add(1);
        true
    }

    /// The history as one text, newest last, for an event.
    pub fn history_text(&self) -> String {
        self.history
            .iter()
            .map(|e| format!("{}: {}", rfc3339(e.at), e.what))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One more of `what` in a total (saturating: a record is text a person
/// may have edited).
pub fn count(totals: &mut BTreeMap<String, u64>, what: &str) {
    let total = totals.entry(what.to_string()).or_default();
    *total = total.saturating_add(1);
}

pub fn rfc3339(seconds: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(seconds.min(i64::MAX as u64) as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| seconds.to_string())
}
