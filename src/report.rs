//! What a walk of the plan reports: each step's `StateReport` (its
//! `Action` and outcome) and the run's `RunReport`, recorded in
//! `last-run.json`. The executor makes them; the plan's printer, the
//! labels, the Node events and the daemon read them, without the executor.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;

use crate::catalog::{CapabilityId, StateDef};
use crate::host::{CommandRecord, Host, HostError};
use crate::spec::Spec;
use crate::state::{Change, ErrorKind, Gate, LookAgain, Observation, Outcome, error_chain};

/// Where `apply` records each run, under the host root.
pub const LAST_RUN_PATH: &str = "/var/lib/gpuprov/last-run.json";
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// What a step does, in one word: the plan's symbol and the report's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Converged already: nothing to do.
    Unchanged,
    /// Changes are needed (`plan`) or were made (`apply`).
    Change,
    /// Not run: disabled or opted out.
    Skip,
    /// Not run: a prerequisite did not converge.
    Block,
    /// Done what it can; waiting for something outside gpuprov (an
    /// operand's pod to start, the device plugin to register).
    Wait,
    /// Observing or applying failed, or the step is not converged.
    Fail,
}

/// One step's result, in a plan or a run report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateReport {
    pub name: String,
    /// The capability that ran it (`handler` in the JSON, as in state files).
    #[serde(rename = "handler")]
    pub capability: CapabilityId,
    pub after: Vec<String>,
    pub action: Action,
    pub outcome: Outcome,
    pub reason: String,
    pub changes: Vec<Change>,
    pub commands: Vec<CommandRecord>,
    pub labels: BTreeMap<String, String>,
    pub details: serde_json::Value,
    #[serde(skip)]
    pub(crate) gate: Gate,
    /// Its state's `optional`: waiting, it does not hold readiness.
    #[serde(skip)]
    pub optional: bool,
    /// Why it did not converge, where waiting is not what it needs: a
    /// failure's kind, or a reboot owed.
    #[serde(skip)]
    pub failure: Option<ErrorKind>,
    #[serde(skip)]
    pub look_again: Option<LookAgain>,
}

impl StateReport {
    pub(crate) fn without_observation(
        state: &StateDef,
        action: Action,
        outcome: Outcome,
        reason: String,
        gate: Gate,
    ) -> StateReport {
        StateReport {
            name: state.name.clone(),
            capability: state.capability.clone(),
            after: state.after.iter().map(|a| a.value.clone()).collect(),
            action,
            outcome,
            reason,
            changes: Vec::new(),
            commands: Vec::new(),
            labels: BTreeMap::new(),
            details: serde_json::Value::Null,
            gate,
            optional: state.optional,
            failure: (outcome == Outcome::RebootRequired).then_some(ErrorKind::NeedsReboot),
            look_again: None,
        }
    }

    pub(crate) fn from_observation(
        state: &StateDef,
        action: Action,
        outcome: Outcome,
        obs: Observation,
    ) -> StateReport {
        let gate = obs
            .gate
            .clone()
            .unwrap_or_else(|| default_gate(&state.name, outcome, &obs.reason));
        let failure = match action {
            Action::Fail => Some(obs.failure_kind),
            _ => (outcome == Outcome::RebootRequired).then_some(ErrorKind::NeedsReboot),
        };
        StateReport {
            failure,
            look_again: obs.look_again,
            labels: obs.labels,
            changes: obs.changes,
            commands: obs.commands,
            details: obs.details,
            reason: obs.reason,
            ..StateReport::without_observation(state, action, outcome, String::new(), gate)
        }
    }

    /// Whether this step keeps the node from being ready: it failed, is
    /// blocked, owes a reboot, or waits as a required (not optional) step.
    pub fn holds_readiness(&self) -> bool {
        match self.action {
            Action::Unchanged | Action::Change | Action::Skip => {
                self.outcome == Outcome::RebootRequired
            }
            Action::Wait => !self.optional,
            Action::Block | Action::Fail => true,
        }
    }
}

fn default_gate(name: &str, outcome: Outcome, reason: &str) -> Gate {
    if outcome.lets_dependents_run() {
        Gate::Pass
    } else {
        Gate::Block(format!("{name} is {}: {reason}", outcome.as_str()))
    }
}

/// The record of one `apply`, written to `last-run.json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub schema_version: u32,
    pub gpuprov_version: &'static str,
    pub started_at: String,
    pub duration_ms: u64,
    pub host_root: String,
    pub spec: String,
    /// True when every step is converged, disabled or opted out.
    pub converged: bool,
    pub steps: Vec<StateReport>,
    pub labels: BTreeMap<String, String>,
    /// Where the labels went, and whether that changed anything.
    pub label_sink: String,
    pub labels_changed: bool,
    /// Labels gpuprov left as another manager set them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub label_notes: Vec<String>,
    /// Stopped by SIGTERM or SIGINT: steps after the action in progress
    /// did not run, and no labels were published.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// What went wrong after the steps and the labels: the report not
    /// recorded (a full disk, a read-only mount). A run with any is not
    /// converged, and each is printed after the steps' own errors, never
    /// instead of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl RunReport {
    pub fn new(
        host: &Host,
        spec: &Spec,
        started: SystemTime,
        steps: Vec<StateReport>,
        labels: BTreeMap<String, String>,
    ) -> RunReport {
        RunReport {
            schema_version: REPORT_SCHEMA_VERSION,
            gpuprov_version: env!("CARGO_PKG_VERSION"),
            started_at: humantime::format_rfc3339_millis(started).to_string(),
            duration_ms: started.elapsed().unwrap_or_default().as_millis() as u64,
            host_root: host.root().display().to_string(),
            spec: spec.source.clone(),
            converged: is_converged(&steps),
            steps,
            labels,
            label_sink: String::new(),
            labels_changed: false,
            label_notes: Vec::new(),
            interrupted: false,
            errors: Vec::new(),
        }
    }

    /// Records the report in `last-run.json`; a failure to (a full disk, a
    /// read-only mount) is kept in `errors`, so that the run's own outcome
    /// is still printed.
    pub fn record(&mut self, host: &Host) {
        if let Err(e) = self.write(host) {
            let why = format!("the run report was not recorded: {}", error_chain(&e));
            tracing::error!("{why}");
            self.converged = false;
            self.errors.push(why);
        }
    }

    pub fn write(&self, host: &Host) -> Result<(), HostError> {
        let mut json = serde_json::to_vec_pretty(self).expect("a report serializes");
        json.push(b'\n');
        host.write_report(LAST_RUN_PATH, &json, 0o644).map(|_| ())
    }
}

impl RunReport {
    /// Why waiting cannot make this run converge, if it cannot: a step
    /// failed that does not change by itself (only a user's own `exec`
    /// checks watch conditions that may), a reboot is owed, something is
    /// absent. `None` while everything left is waiting (pending operands)
    /// or blocked behind what is waiting.
    pub fn cannot_converge_by_waiting(&self) -> Option<String> {
        let final_steps: Vec<String> = self
            .steps
            .iter()
            .filter(|s| s.failure.is_some_and(|kind| kind != ErrorKind::Transient))
            .map(|s| format!("{} is {}: {}", s.name, s.outcome.as_str(), s.reason))
            .collect();
        (!final_steps.is_empty()).then(|| final_steps.join("; "))
    }

    /// Whether a step waits for a slot another node holds (a rolling
    /// upgrade's).
    pub fn waits_for_shared_slot(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.outcome != Outcome::Failed && s.look_again == Some(LookAgain::SharedSlot))
    }

    /// The soonest a step asked to be looked at again.
    pub fn look_again_after(&self) -> Option<std::time::Duration> {
        self.steps
            .iter()
            .filter_map(|s| match s.look_again {
                Some(LookAgain::After(after)) => Some(after),
                _ => None,
            })
            .min()
    }

    /// Not converged only because steps wait on something outside gpuprov
    /// (and what they wait for may arrive any moment): nothing failed.
    pub fn only_waiting(&self) -> bool {
        !self.converged
            && self.steps.iter().any(|s| s.action == Action::Wait)
            && self
                .steps
                .iter()
                .all(|s| s.action != Action::Fail && s.outcome != Outcome::RebootRequired)
    }
}

/// What `gpuprov run`'s `/readyz` answers after a converge: what a
/// DaemonSet rollout needs to know, with the reason for each step that
/// holds it (or that it no longer waits for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// One line per step that is not converged: `state: outcome: reason`.
    pub lines: Vec<String>,
}

impl Readiness {
    /// Ready when every step is converged, disabled or opted out, or waits
    /// only as an optional state (an operand gpuprov started whose pod
    /// needs something outside gpuprov). A failure, a block, a reboot owed
    /// or a required step's wait holds it.
    pub fn of(steps: &[StateReport]) -> Readiness {
        let mut ready = true;
        let mut lines = Vec::new();
        for step in steps {
            let line = format!("{}: {}: {}", step.name, step.outcome.as_str(), step.reason);
            let holds = step.holds_readiness();
            if !holds && step.action != Action::Wait {
                continue;
            }
            ready &= !holds;
            lines.push(if holds {
                line
            } else {
                format!("{line} (optional: not waited for)")
            });
        }
        Readiness { ready, lines }
    }

    /// The body of `/readyz`: `ready` or `not ready`, then the lines.
    pub fn body(&self) -> String {
        let mut body = String::from(if self.ready { "ready\n" } else { "not ready\n" });
        for line in &self.lines {
            body.push_str(line);
            body.push('\n');
        }
        body
    }
}

/// Every step converged, disabled or opted out, and no reboot is owed.
pub fn is_converged(steps: &[StateReport]) -> bool {
    steps.iter().all(|s| {
        matches!(s.action, Action::Unchanged | Action::Change | Action::Skip)
            && s.outcome != Outcome::RebootRequired
    })
}

/// What writing the labels would do (`plan`) or did (`apply`).
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SinkPreview {
    /// Where labels go: the node on an API server, a file under the host
    /// root, `stdout` or `none`.
    pub target: String,
    pub changes: bool,
    /// Unified diff of the labels (the feature file, or the node's labels).
    pub diff: Option<String>,
    /// Labels gpuprov wants but leaves alone, and why (another manager set them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// What `revert` did: each capability's revert adds its part.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertReport {
    /// The container runtime's config (containerd's, or CRI-O's drop-in).
    pub containerd: RuntimeReverted,
    /// The operands' static pod manifests removed.
    pub static_pods_removed: Vec<String>,
    /// The CDI spec files gpuprov wrote, removed.
    pub cdi_specs_removed: Vec<String>,
    pub labels_removed: bool,
}

/// What reverting the runtime's config did, in a sentence.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeReverted {
    pub summary: String,
    pub changed: bool,
    pub commands: Vec<CommandRecord>,
}
