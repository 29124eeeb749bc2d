//! The executor: walks the plan's states in order and, for each, decides
//! whether it runs at all (disabled, opted out, blocked), observes the node
//! through its capability's registry entry, and then either shows the
//! changes (`plan`) or makes them (`make`) and checks that the state
//! converged (`apply`). Both walks share every decision; they differ only
//! in what they do with an observation. It names no capability.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::catalog::StateDef;
use crate::facts::Facts;
use crate::host::{Host, HostError};
use crate::kube::Cluster;
use crate::make::{make_change, make_next};
use crate::plan::Graph;
use crate::registry::capability;
use crate::report::{Action, StateReport};
use crate::spec::Spec;
use crate::state::{
    Change, ErrorKind, Gate, LabelsSet, Observation, Outcome, StateContext, StateError,
};

/// A node carrying this label gets no operand at all, as with the GPU Operator.
pub const OPERANDS_OPT_OUT: &str = "nvidia.com/gpu.deploy.operands=false";

/// Everything needed to walk a plan on one host.
pub struct Executor<'a> {
    pub host: &'a Host,
    pub spec: &'a Spec,
    pub facts: &'a Facts,
    pub graph: &'a Graph,
    pub cluster: Option<&'a Cluster>,
    /// The node labels this walk set (a rolling upgrade's state).
    pub labels_set: LabelsSet,
}

impl Executor<'_> {
    /// Observes every step and lists what `apply` would change. Writes nothing.
    pub fn plan(&self) -> Vec<StateReport> {
        self.walk(|state, obs, _, changing_upstream| {
            if obs.changes.is_empty() {
                // A step that cannot converge on the node as it is now may
                // well converge once what an earlier step will install is
                // there (the validator after the toolkit): the plan shows
                // it waiting for that step, not failed.
                if let Some(upstream) = changing_upstream
                    && action_for(&obs) == Action::Fail
                {
                    let reason = format!(
                        "waits for {upstream}, which will change first (now: {})",
                        obs.reason
                    );
                    let mut report = StateReport::from_observation(
                        state,
                        Action::Wait,
                        Outcome::Pending,
                        Observation { reason, ..obs },
                    );
                    report.gate = Gate::Pass;
                    return report;
                }
                StateReport::from_observation(state, action_for(&obs), obs.outcome, obs)
            } else {
                let disables = matches!(obs.gate, Some(Gate::Disable(_)));
                let mut report =
                    StateReport::from_observation(state, Action::Change, obs.on_change, obs);
                // Dependents are shown as they would run once this converges.
                if !disables {
                    report.gate = Gate::Pass;
                }
                report
            }
        })
    }

    /// Converges every step: observe, change, observe again, verify.
    pub fn apply(&self) -> Vec<StateReport> {
        self.walk(|state, obs, again, _| self.converge(state, obs, again))
    }

    /// Makes one step's changes and verifies them by observing `again`.
    fn converge(
        &self,
        state: &StateDef,
        obs: Observation,
        again: &dyn Fn() -> Result<Observation, StateError>,
    ) -> StateReport {
        if obs.changes.is_empty() {
            return StateReport::from_observation(state, action_for(&obs), obs.outcome, obs);
        }
        let mut commands = obs.commands.clone();
        let mut done = 0;
        while let Some(change) = obs.changes.get(done) {
            if crate::interrupt::requested() {
                let reason = format!(
                    "interrupted before {} (of {} changes, {done} made)",
                    change.summary(),
                    obs.changes.len()
                );
                let mut stopped = Observation::new(Outcome::Failed, reason);
                stopped.commands = commands;
                stopped.changes = obs.changes.clone();
                return StateReport::from_observation(
                    state,
                    Action::Fail,
                    Outcome::Failed,
                    stopped,
                );
            }
            match make_next(
                self.host,
                self.cluster,
                &obs.changes[done..],
                &mut commands,
                &self.labels_set,
            ) {
                Ok(made) => done += made,
                // A change before the step's point of no return that may
                // pass when tried again (a slot another node took first):
                // nothing was disrupted, so the step stays as it was seen,
                // waiting, and is looked at again.
                Err(error)
                    if error.kind() == ErrorKind::Transient
                        && obs
                            .on_failure
                            .as_ref()
                            .is_some_and(|f| done < f.changes_after) =>
                {
                    let mut waiting = obs.clone();
                    waiting.reason = format!("{}; not yet: {error}", obs.reason);
                    waiting.commands = commands;
                    return StateReport::from_observation(
                        state,
                        Action::Wait,
                        obs.outcome,
                        waiting,
                    );
                }
                Err(error) => {
                    // The error's own kind where it says more than that a
                    // person must act; else what the state says its
                    // failures mean.
                    let kind = match error.kind() {
                        ErrorKind::NeedsOperator => obs.failure_kind,
                        kind => kind,
                    };
                    let mut reason = error.to_string();
                    if let Some(on_failure) = &obs.on_failure
                        && done >= on_failure.changes_after
                    {
                        // Best effort: the failure itself is what is reported.
                        for change in &on_failure.changes {
                            let mut more = Vec::new();
                            if let Err(also) = make_change(
                                self.host,
                                self.cluster,
                                change,
                                &mut more,
                                &self.labels_set,
                            ) {
                                reason.push_str(&format!("; then {}: {also}", change.summary()));
                            }
                            commands.append(&mut more);
                        }
                    }
                    let mut failed = Observation::new(Outcome::Failed, reason);
                    failed.failure_kind = kind;
                    failed.commands = commands;
                    failed.changes = obs.changes.clone();
                    if let Some(on_failure) = &obs.on_failure {
                        failed.labels = on_failure.labels.clone();
                        failed.gate = Some(on_failure.gate.clone());
                    }
                    return StateReport::from_observation(
                        state,
                        Action::Fail,
                        Outcome::Failed,
                        failed,
                    );
                }
            }
        }
        let (action, outcome, mut after) = match again() {
            // Made as planned; `degraded` too when the step said it would
            // be (a remediation under way: the node stays tainted).
            Ok(after)
                if after.changes.is_empty()
                    && (after.outcome.lets_dependents_run()
                        || after.outcome == Outcome::RebootRequired
                        || (after.outcome == Outcome::Degraded
                            && obs.on_change == Outcome::Degraded)) =>
            {
                (Action::Change, after.outcome, after)
            }
            // Changes made; the rest is up to something else (a pod to
            // start), which a later converge verifies.
            Ok(after) if after.changes.is_empty() && after.outcome == Outcome::Pending => {
                (Action::Wait, Outcome::Pending, after)
            }
            Ok(mut after) => {
                if let Some(on_failure) = after.on_failure.clone().or(obs.on_failure.clone()) {
                    after.labels = on_failure.labels;
                    after.gate = Some(on_failure.gate);
                }
                let still: Vec<String> = after.changes.iter().map(Change::summary).collect();
                let reason = if still.is_empty() {
                    after.reason.clone()
                } else {
                    format!(
                        "changes made but not converged: still needs {}",
                        still.join("; ")
                    )
                };
                (
                    Action::Fail,
                    Outcome::Failed,
                    Observation { reason, ..after },
                )
            }
            Err(e) => (Action::Fail, Outcome::Failed, Observation::failed(&e)),
        };
        commands.append(&mut after.commands);
        after.commands = commands;
        if matches!(action, Action::Change | Action::Wait) {
            after.reason = if after.reason == obs.reason {
                format!("changed: {}", after.reason)
            } else {
                format!("changed: {} (was: {})", after.reason, obs.reason)
            };
        }
        after.changes = obs.changes;
        StateReport::from_observation(state, action, outcome, after)
    }

    fn context<'s>(&'s self, state: &'s StateDef) -> StateContext<'s> {
        StateContext {
            host: self.host,
            spec: self.spec,
            facts: self.facts,
            state,
            cluster: self.cluster,
            labels_set: &self.labels_set,
        }
    }

    /// A skipped step's observation: its outcome and what it withdraws.
    fn skipped(
        &self,
        state: &StateDef,
        outcome: Outcome,
        reason: &str,
        gate: &Gate,
    ) -> Result<Observation, StateError> {
        let changes = (of(state)?.withdraw)(&self.context(state))?;
        let mut obs = Observation::new(outcome, reason);
        obs.gate = Some(gate.clone());
        obs.changes = changes;
        Ok(obs)
    }

    fn walk(
        &self,
        mut act: impl FnMut(
            &StateDef,
            Observation,
            &dyn Fn() -> Result<Observation, StateError>,
            Option<&str>,
        ) -> StateReport,
    ) -> Vec<StateReport> {
        let mut reports: Vec<StateReport> = Vec::new();
        // For each step, an earlier step (itself or further up) that changes.
        let mut changing: BTreeMap<String, Option<String>> = BTreeMap::new();
        for state in &self.graph.states {
            // The earliest such step: the one whose change the rest follow
            // from (the toolkit's install, before the runtime that runs it).
            let changing_upstream: Option<String> =
                state
                    .after
                    .iter()
                    .filter_map(|dep| {
                        let index = reports.iter().position(|r| r.name == dep.value)?;
                        let report = &reports[index];
                        changing.get(&report.name).cloned().flatten().or_else(|| {
                            (report.action == Action::Change).then(|| report.name.clone())
                        })
                    })
                    .min_by_key(|name| reports.iter().position(|r| &r.name == name));
            changing.insert(state.name.clone(), changing_upstream.clone());
            let gates: Vec<(&str, &Gate)> = state
                .after
                .iter()
                .filter_map(|dep| reports.iter().find(|r| r.name == dep.value))
                .map(|r| (r.name.as_str(), &r.gate))
                .collect();
            let disabled_upstream = gates.iter().find_map(|(_, g)| match g {
                Gate::Disable(reason) => Some(reason.clone()),
                _ => None,
            });
            let switched_off = state
                .enabled_by
                .as_deref()
                .filter(|s| self.spec.switch(s) == Some(false));
            let opted_out = self.opt_out_label(state);
            let blocked = gates.iter().find_map(|(_, g)| match g {
                Gate::Block(reason) => Some(reason.clone()),
                _ => None,
            });
            let skipped = if crate::interrupt::requested() {
                let reason = "not run: gpuprov was interrupted".to_string();
                Some((Outcome::Blocked, reason.clone(), Gate::Block(reason)))
            } else if let Some(reason) = disabled_upstream {
                Some((Outcome::Disabled, reason.clone(), Gate::Disable(reason)))
            } else if let Some(switch) = switched_off {
                Some((Outcome::Disabled, format!("{switch} is false"), Gate::Pass))
            } else if let Some(label) = opted_out {
                Some((Outcome::OptedOut, format!("node label {label}"), Gate::Pass))
            } else {
                blocked.map(|reason| (Outcome::Blocked, reason.clone(), Gate::Block(reason)))
            };
            let started = Instant::now();
            let report = match skipped {
                // A blocked step leaves the node as it is: a passing failure
                // upstream must not tear operands down.
                Some((Outcome::Blocked, reason, gate)) => StateReport::without_observation(
                    state,
                    Action::Block,
                    Outcome::Blocked,
                    reason,
                    gate,
                ),
                // A disabled or opted-out step withdraws what it put there.
                Some((outcome, reason, gate)) => {
                    let again = || self.skipped(state, outcome, &reason, &gate);
                    match again() {
                        Ok(obs) if obs.changes.is_empty() => StateReport::without_observation(
                            state,
                            Action::Skip,
                            outcome,
                            reason.clone(),
                            gate.clone(),
                        ),
                        Ok(obs) => act(state, obs, &again, changing_upstream.as_deref()),
                        Err(e) => failed_report(state, &e),
                    }
                }
                None => {
                    let again = || (of(state)?.observe)(&self.context(state));
                    let report = match again() {
                        Ok(obs) => act(state, obs, &again, changing_upstream.as_deref()),
                        Err(e) => failed_report(state, &e),
                    };
                    tracing::info!(
                        state = %state.name,
                        outcome = report.outcome.as_str(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "{}",
                        report.reason
                    );
                    report
                }
            };
            reports.push(report);
        }
        reports
    }

    fn opt_out_label(&self, state: &StateDef) -> Option<String> {
        let global = capability(&state.capability)
            .is_none_or(|c| !c.runs_when_operands_opted_out)
            .then_some(OPERANDS_OPT_OUT);
        state
            .opt_out_labels
            .iter()
            .map(String::as_str)
            .chain(global)
            .find(|selector| self.facts.has_label(selector))
            .map(str::to_string)
    }
}

/// The capability that runs `state` (the catalogue admits no other name;
/// one would fail its state, not the run).
fn of(state: &StateDef) -> Result<&'static crate::registry::Capability, StateError> {
    capability(&state.capability).ok_or_else(|| {
        StateError::operator(format!(
            "no capability `{}` in this build runs state {}",
            state.capability.name(),
            state.name
        ))
    })
}

fn failed_report(state: &StateDef, e: &StateError) -> StateReport {
    StateReport::from_observation(state, Action::Fail, Outcome::Failed, Observation::failed(e))
}

/// A converged outcome is unchanged. So is a step that says it stands in
/// no one's way (it disables its dependents: no GPU; or lets them pass:
/// nothing to check). Anything else, `degraded` included, did not converge.
fn action_for(obs: &Observation) -> Action {
    let harmless = match &obs.gate {
        Some(Gate::Disable(_)) => true,
        Some(Gate::Pass) => !matches!(obs.outcome, Outcome::Degraded | Outcome::Failed),
        _ => false,
    };
    if obs.outcome.lets_dependents_run() || harmless {
        Action::Unchanged
    } else if obs.outcome == Outcome::Pending {
        Action::Wait
    } else {
        Action::Fail
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "another gpuprov apply holds the lock on {path}; gave up after {waited:?} (raise --lock-timeout to wait longer)"
    )]
    Timeout { path: String, waited: Duration },
}

/// Held while an `apply` runs; released on drop (or when the process dies).
///
/// The lock is an exclusive flock(2) on the host root directory itself: no
/// lock file is created, so a run that stops on bad input leaves no trace,
/// and a gpuprov in a pod (`/host`) and one on the node (`/`) exclude each
/// other because they lock the same directory.
pub struct ApplyLock {
    _lock: Flock<std::fs::File>,
}

impl ApplyLock {
    /// Takes the host's apply lock, waiting up to `timeout` for another run.
    pub fn acquire(host: &Host, timeout: Duration) -> Result<ApplyLock, LockError> {
        let path = host.resolve("/")?;
        let read_err = |source| HostError::Read {
            path: path.clone(),
            source,
        };
        let started = Instant::now();
        let mut announced = false;
        loop {
            // Opened anew each try: a failed flock consumes the handle.
            let dir = std::fs::File::open(&path).map_err(read_err)?;
            match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(ApplyLock { _lock: lock }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
                Err((_, errno)) => return Err(read_err(std::io::Error::from(errno)).into()),
            }
            if started.elapsed() >= timeout {
                return Err(LockError::Timeout {
                    path: path.display().to_string(),
                    waited: timeout,
                });
            }
            if !announced {
                tracing::warn!(lock = %path.display(), "another gpuprov apply is running; waiting for its lock");
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
