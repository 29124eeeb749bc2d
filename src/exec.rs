//! The executor: walks the plan's steps in order and, for each, decides
//! whether it runs at all (disabled, opted out, blocked), observes the node,
//! and then either shows the changes (`plan`) or makes them and checks that
//! the step converged (`apply`). Both walks share every decision; they differ
//! only in what they do with an observation.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

use crate::catalog::{Handler, StateDef};
use crate::facts::Facts;
use crate::host::{CommandRecord, Host, HostError};
use crate::kube::Cluster;
use crate::plan::Graph;
use crate::spec::Spec;
use crate::{containerd, driver, exec_state, gpu, operands, toolkit};

/// Where `apply` records each run, under the host root.
pub const LAST_RUN_PATH: &str = "/var/lib/gpuprov/last-run.json";
/// A node carrying this label gets no operand at all, as with the GPU Operator.
pub const OPERANDS_OPT_OUT: &str = "nvidia.com/gpu.deploy.operands=false";
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// How a step ended: published as `gpuprov.io/<state>=<outcome>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ready,
    Preinstalled,
    Installed,
    Configured,
    Disabled,
    OptedOut,
    Blocked,
    Pending,
    Failed,
    RebootRequired,
    Absent,
    /// Working, but not wholly: a GPU fell off the bus.
    Degraded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ready => "ready",
            Outcome::Preinstalled => "preinstalled",
            Outcome::Installed => "installed",
            Outcome::Configured => "configured",
            Outcome::Disabled => "disabled",
            Outcome::OptedOut => "opted-out",
            Outcome::Blocked => "blocked",
            Outcome::Pending => "pending",
            Outcome::Failed => "failed",
            Outcome::RebootRequired => "reboot-required",
            Outcome::Absent => "absent",
            Outcome::Degraded => "degraded",
        }
    }

    /// Whether dependents may run after a step that ended this way.
    fn lets_dependents_run(self) -> bool {
        matches!(
            self,
            Outcome::Ready
                | Outcome::Preinstalled
                | Outcome::Installed
                | Outcome::Configured
                | Outcome::Disabled
                | Outcome::OptedOut
        )
    }
}

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

/// What dependents of a finished step do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Dependents are blocked, with the reason.
    Block(String),
    /// Dependents are disabled (and so theirs), with the reason: `no GPU`.
    Disable(String),
}

/// One change a step needs, as data: `plan` prints it, `apply` makes it.
#[derive(Debug, Clone, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum Change {
    /// Run a command in the host.
    Run {
        argv: Vec<String>,
        /// How a person reads it (a user's own command as written).
        display: String,
    },
    /// Write a file atomically.
    WriteFile {
        path: String,
        #[serde(skip)]
        content: Vec<u8>,
        #[serde(skip)]
        mode: u32,
        /// Why, in a few words (`backup of the original`).
        purpose: String,
        /// Unified diff from the current content, where a person wants to
        /// read it (a config file; not a backup).
        #[serde(skip_serializing_if = "Option::is_none")]
        diff: Option<String>,
    },
    /// Remove a file gpuprov wrote (a marker); a missing file is fine.
    RemoveFile { path: String, purpose: String },
    /// Stop the process serving a unix socket (found by the socket's peer
    /// credentials) so its service manager starts it again, then wait for a
    /// new process to answer.
    SignalSocketOwner {
        socket: String,
        timeout_seconds: u64,
    },
    /// Check containerd's own view of its config (`containerd config dump`
    /// in the host) for the runtime: it must exist, run `binary`, carry
    /// runc's SystemdCgroup, and be the default when `set_as_default`.
    CheckContainerdView {
        config: String,
        class: String,
        binary: String,
        set_as_default: bool,
    },
    /// Wait until something answers on a unix socket.
    WaitSocket {
        socket: String,
        timeout_seconds: u64,
    },
    /// Run the validation pod on this node and wait for it to succeed; it is
    /// deleted afterwards, whatever happened.
    ValidationPod {
        namespace: String,
        name: String,
        image: String,
        runtime_class: Option<String>,
        timeout_seconds: u64,
        #[serde(skip)]
        manifest: serde_json::Value,
    },
    /// Unpack a cached `.tar.gz` into a directory, atomically.
    Unpack { archive: String, into: String },
    /// Put a pinned artifact into the cache (a no-op when it is there).
    Fetch {
        #[serde(flatten)]
        artifact: crate::download::Artifact,
        /// Where it is kept, a host path.
        path: String,
        /// Whether the cache already has it (no network then).
        cached: bool,
        /// Its size, when known (cached).
        size: Option<u64>,
        timeout_seconds: u64,
        executable: bool,
    },
}

impl Change {
    /// Fetch `artifact` into its cache path, saying whether the cache
    /// already holds it (and how big it is) so a plan shows whether the
    /// network is needed.
    pub fn fetch(
        host: &Host,
        artifact: &crate::download::Artifact,
        timeout_seconds: u64,
        executable: bool,
    ) -> Result<Change, StepError> {
        let path = artifact.cache_path();
        let cached = crate::download::cached(host, artifact)
            .map_err(|e| StepError::Observe(error_chain(&e)))?;
        let size = if cached {
            host.stat(&path)?.map(|info| info.size)
        } else {
            None
        };
        Ok(Change::Fetch {
            artifact: artifact.clone(),
            path,
            cached,
            size,
            timeout_seconds,
            executable,
        })
    }

    pub fn summary(&self) -> String {
        match self {
            Change::Run { display, .. } => format!("run: {display}"),
            Change::WriteFile { path, purpose, .. } => format!("write {path} ({purpose})"),
            Change::RemoveFile { path, purpose } => format!("remove {path} ({purpose})"),
            Change::SignalSocketOwner { socket, .. } => {
                format!(
                    "SIGTERM the process serving {socket}, wait for its service manager to start it again"
                )
            }
            Change::WaitSocket {
                socket,
                timeout_seconds,
            } => {
                format!("wait up to {timeout_seconds}s for {socket} to answer")
            }
            Change::CheckContainerdView { config, class, .. } => {
                format!(
                    "check runtime `{class}` in containerd's own view of {config} (containerd config dump)"
                )
            }
            Change::Unpack { archive, into } => {
                format!("unpack {archive} into {into} (atomically)")
            }
            Change::ValidationPod {
                namespace,
                name,
                image,
                runtime_class,
                timeout_seconds,
                ..
            } => {
                let class = runtime_class
                    .as_deref()
                    .map(|c| format!(", runtime class {c}"))
                    .unwrap_or_default();
                format!(
                    "run pod {namespace}/{name} ({image}{class}, 1 nvidia.com/gpu) on this node, wait up to {timeout_seconds}s for it to succeed, delete it"
                )
            }
            Change::Fetch {
                artifact,
                path,
                cached,
                size,
                ..
            } => {
                let size = size
                    .map(|s| format!(", {:.1} MiB", s as f64 / 1048576.0))
                    .unwrap_or_default();
                let how = if *cached {
                    "cache hit, no download"
                } else {
                    "download"
                };
                format!(
                    "fetch {} (sha256 {}{size}) → {path} ({how})",
                    artifact.url, artifact.sha256
                )
            }
        }
    }
}

/// What a handler saw on the node.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The outcome when nothing needs to change.
    pub outcome: Outcome,
    /// The outcome expected once `changes` are made (what `plan` shows);
    /// `apply` reports what it observes afterwards.
    pub on_change: Outcome,
    pub reason: String,
    pub changes: Vec<Change>,
    /// Labels the step publishes besides its outcome label (GPU Operator
    /// compatibility labels).
    pub labels: BTreeMap<String, String>,
    /// Overrides the gate the outcome implies.
    pub gate: Option<Gate>,
    /// Commands run while observing (an exec state's check).
    pub commands: Vec<CommandRecord>,
    pub details: serde_json::Value,
}

impl Observation {
    pub fn new(outcome: Outcome, reason: impl Into<String>) -> Observation {
        Observation {
            outcome,
            on_change: outcome,
            reason: reason.into(),
            changes: Vec::new(),
            labels: BTreeMap::new(),
            gate: None,
            commands: Vec::new(),
            details: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{0}")]
    Observe(String),
}

/// Everything a handler may look at.
pub struct StepContext<'a> {
    pub host: &'a Host,
    pub spec: &'a Spec,
    pub facts: &'a Facts,
    pub state: &'a StateDef,
    /// The API server, when there is one.
    pub cluster: Option<&'a Cluster>,
}

fn observe(ctx: &StepContext) -> Result<Observation, StepError> {
    match ctx.state.handler {
        Handler::DetectGpu => Ok(gpu::observe(ctx)),
        Handler::Driver => driver::observe(ctx),
        Handler::ContainerToolkit => toolkit::observe(ctx),
        Handler::ContainerdRuntime => containerd::observe(ctx),
        Handler::GpuHealth => gpu::gfd::observe_health(ctx),
        Handler::GpuFeatureDiscovery => gpu::gfd::observe(ctx),
        Handler::DevicePlugin => operands::observe(ctx, operands::Operand::DevicePlugin),
        Handler::DcgmExporter => operands::observe(ctx, operands::Operand::DcgmExporter),
        Handler::Validator => operands::validate::observe(ctx),
        Handler::Exec => exec_state::observe(ctx),
    }
}

/// What a disabled or opted-out step takes away from the node (an
/// operand's static pod); most states leave things as they are.
fn withdraw(ctx: &StepContext) -> Result<Vec<Change>, StepError> {
    match operands::Operand::of(ctx.state.handler) {
        Some(operand) => operands::withdraw(ctx, operand),
        None => Ok(Vec::new()),
    }
}

/// One step's result, in a plan or a run report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub name: String,
    pub handler: Handler,
    pub after: Vec<String>,
    pub action: Action,
    pub outcome: Outcome,
    pub reason: String,
    pub changes: Vec<Change>,
    pub commands: Vec<CommandRecord>,
    pub labels: BTreeMap<String, String>,
    pub details: serde_json::Value,
    #[serde(skip)]
    gate: Gate,
}

impl StepReport {
    fn without_observation(
        state: &StateDef,
        action: Action,
        outcome: Outcome,
        reason: String,
        gate: Gate,
    ) -> StepReport {
        StepReport {
            name: state.name.clone(),
            handler: state.handler,
            after: state.after.iter().map(|a| a.value.clone()).collect(),
            action,
            outcome,
            reason,
            changes: Vec::new(),
            commands: Vec::new(),
            labels: BTreeMap::new(),
            details: serde_json::Value::Null,
            gate,
        }
    }

    fn from_observation(
        state: &StateDef,
        action: Action,
        outcome: Outcome,
        obs: Observation,
    ) -> StepReport {
        let gate = obs
            .gate
            .clone()
            .unwrap_or_else(|| default_gate(&state.name, outcome, &obs.reason));
        StepReport {
            labels: obs.labels,
            changes: obs.changes,
            commands: obs.commands,
            details: obs.details,
            reason: obs.reason,
            ..StepReport::without_observation(state, action, outcome, String::new(), gate)
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

/// Everything needed to walk a plan on one host.
pub struct Executor<'a> {
    pub host: &'a Host,
    pub spec: &'a Spec,
    pub facts: &'a Facts,
    pub graph: &'a Graph,
    pub cluster: Option<&'a Cluster>,
}

impl Executor<'_> {
    /// Observes every step and lists what `apply` would change. Writes nothing.
    pub fn plan(&self) -> Vec<StepReport> {
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
                    let mut report = StepReport::from_observation(
                        state,
                        Action::Wait,
                        Outcome::Pending,
                        Observation { reason, ..obs },
                    );
                    report.gate = Gate::Pass;
                    return report;
                }
                StepReport::from_observation(state, action_for(&obs), obs.outcome, obs)
            } else {
                let disables = matches!(obs.gate, Some(Gate::Disable(_)));
                let mut report =
                    StepReport::from_observation(state, Action::Change, obs.on_change, obs);
                // Dependents are shown as they would run once this converges.
                if !disables {
                    report.gate = Gate::Pass;
                }
                report
            }
        })
    }

    /// Converges every step: observe, change, observe again, verify.
    pub fn apply(&self) -> Vec<StepReport> {
        self.walk(|state, obs, again, _| self.converge(state, obs, again))
    }

    /// Makes one step's changes and verifies them by observing `again`.
    fn converge(
        &self,
        state: &StateDef,
        obs: Observation,
        again: &dyn Fn() -> Result<Observation, StepError>,
    ) -> StepReport {
        if obs.changes.is_empty() {
            return StepReport::from_observation(state, action_for(&obs), obs.outcome, obs);
        }
        let mut commands = obs.commands.clone();
        for (done, change) in obs.changes.iter().enumerate() {
            if crate::interrupt::requested() {
                let reason = format!(
                    "interrupted before {} (of {} changes, {done} made)",
                    change.summary(),
                    obs.changes.len()
                );
                let mut stopped = Observation::new(Outcome::Failed, reason);
                stopped.commands = commands;
                stopped.changes = obs.changes.clone();
                return StepReport::from_observation(state, Action::Fail, Outcome::Failed, stopped);
            }
            if let Err(reason) = make_change(self.host, self.cluster, change, &mut commands) {
                let mut failed = Observation::new(Outcome::Failed, reason);
                failed.commands = commands;
                failed.changes = obs.changes.clone();
                return StepReport::from_observation(state, Action::Fail, Outcome::Failed, failed);
            }
        }
        let (action, outcome, mut after) = match again() {
            Ok(after)
                if after.changes.is_empty()
                    && (after.outcome.lets_dependents_run()
                        || after.outcome == Outcome::RebootRequired) =>
            {
                (Action::Change, after.outcome, after)
            }
            // Changes made; the rest is up to something else (a pod to
            // start), which a later converge verifies.
            Ok(after) if after.changes.is_empty() && after.outcome == Outcome::Pending => {
                (Action::Wait, Outcome::Pending, after)
            }
            Ok(after) => {
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
            Err(e) => (
                Action::Fail,
                Outcome::Failed,
                Observation::new(Outcome::Failed, error_chain(&e)),
            ),
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
        StepReport::from_observation(state, action, outcome, after)
    }

    fn context<'s>(&'s self, state: &'s StateDef) -> StepContext<'s> {
        StepContext {
            host: self.host,
            spec: self.spec,
            facts: self.facts,
            state,
            cluster: self.cluster,
        }
    }

    /// A skipped step's observation: its outcome and what it withdraws.
    fn skipped(
        &self,
        state: &StateDef,
        outcome: Outcome,
        reason: &str,
        gate: &Gate,
    ) -> Result<Observation, StepError> {
        let changes = withdraw(&self.context(state))?;
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
            &dyn Fn() -> Result<Observation, StepError>,
            Option<&str>,
        ) -> StepReport,
    ) -> Vec<StepReport> {
        let mut reports: Vec<StepReport> = Vec::new();
        // For each step, an earlier step (itself or further up) that changes.
        let mut changing: BTreeMap<String, Option<String>> = BTreeMap::new();
        for state in &self.graph.steps {
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
                Some((Outcome::Blocked, reason, gate)) => StepReport::without_observation(
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
                        Ok(obs) if obs.changes.is_empty() => StepReport::without_observation(
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
                    let again = || observe(&self.context(state));
                    let report = match again() {
                        Ok(obs) => act(state, obs, &again, changing_upstream.as_deref()),
                        Err(e) => failed_report(state, &e),
                    };
                    tracing::info!(
                        step = %state.name,
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
        let global = (state.handler != Handler::DetectGpu).then_some(OPERANDS_OPT_OUT);
        state
            .opt_out_labels
            .iter()
            .map(String::as_str)
            .chain(global)
            .find(|selector| self.facts.has_label(selector))
            .map(str::to_string)
    }
}

fn failed_report(state: &StateDef, e: &StepError) -> StepReport {
    let obs = Observation::new(Outcome::Failed, error_chain(e));
    StepReport::from_observation(state, Action::Fail, Outcome::Failed, obs)
}

/// A converged outcome is unchanged. So is a step that says it stands in
/// no one's way (it disables its dependents: no GPU; or lets them pass:
/// nothing to check). Anything else, `degraded` included, did not converge.
fn action_for(obs: &Observation) -> Action {
    let harmless = match &obs.gate {
        Some(Gate::Disable(_)) => true,
        Some(Gate::Pass) => obs.outcome != Outcome::Degraded,
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

/// Makes changes in order, stopping at the first that fails.
pub fn make_changes(host: &Host, changes: &[Change]) -> Result<Vec<CommandRecord>, String> {
    let mut commands = Vec::new();
    for change in changes {
        make_change(host, None, change, &mut commands)?;
    }
    Ok(commands)
}

fn make_change(
    host: &Host,
    cluster: Option<&Cluster>,
    change: &Change,
    commands: &mut Vec<CommandRecord>,
) -> Result<(), String> {
    match change {
        Change::Run { argv, display } => {
            let record = host.run(argv).map_err(|e| error_chain(&e))?;
            let ok = record.success();
            let summary = record.failure_summary();
            commands.push(record);
            if ok {
                Ok(())
            } else {
                Err(format!("`{display}` {summary}"))
            }
        }
        Change::WriteFile {
            path,
            content,
            mode,
            ..
        } => host
            .write_atomic(path, content, *mode)
            .map(|_| ())
            .map_err(|e| error_chain(&e)),
        Change::RemoveFile { path, .. } => host.remove(path).map_err(|e| error_chain(&e)),
        Change::SignalSocketOwner {
            socket,
            timeout_seconds,
        } => {
            let path = host.resolve(socket).map_err(|e| error_chain(&e))?;
            crate::containerd::restart::signal_and_wait(
                &path,
                Duration::from_secs(*timeout_seconds),
            )
        }
        Change::Unpack { archive, into } => crate::download::unpack(host, archive, into),
        Change::ValidationPod {
            namespace,
            name,
            timeout_seconds,
            manifest,
            ..
        } => {
            let cluster = cluster.ok_or("the validation pod needs an API server")?;
            operands::validate::run_pod(
                cluster,
                namespace,
                name,
                manifest,
                Duration::from_secs(*timeout_seconds),
            )
        }
        Change::Fetch {
            artifact,
            timeout_seconds,
            executable,
            ..
        } => crate::download::fetch(
            host,
            artifact,
            Duration::from_secs(*timeout_seconds),
            *executable,
        )
        .map(|_| ())
        .map_err(|e| error_chain(&e)),
        Change::CheckContainerdView {
            config,
            class,
            binary,
            set_as_default,
        } => {
            let wanted = crate::containerd::config::RuntimeWanted {
                class: class.clone(),
                binary: binary.clone(),
                default: if *set_as_default {
                    crate::containerd::config::DefaultRuntime::Set
                } else {
                    crate::containerd::config::DefaultRuntime::Keep
                },
            };
            crate::containerd::effective::verify(host, config, &wanted, commands)
        }
        Change::WaitSocket {
            socket,
            timeout_seconds,
        } => {
            let path = host.resolve(socket).map_err(|e| error_chain(&e))?;
            crate::containerd::restart::wait_for_socket(
                &path,
                Duration::from_secs(*timeout_seconds),
                None,
            )
        }
    }
}

/// A unified diff of a file's content, for a `WriteFile` change.
pub fn file_diff(path: &str, now: &str, wanted: &str) -> String {
    similar::TextDiff::from_lines(now, wanted)
        .unified_diff()
        .context_radius(3)
        .header(path, path)
        .to_string()
}

/// An error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
    pub steps: Vec<StepReport>,
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
        steps: Vec<StepReport>,
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
            .filter(|s| match s.action {
                Action::Fail => s.handler != crate::catalog::Handler::Exec,
                _ => s.outcome == Outcome::RebootRequired,
            })
            .map(|s| format!("{} is {}: {}", s.name, s.outcome.as_str(), s.reason))
            .collect();
        (!final_steps.is_empty()).then(|| final_steps.join("; "))
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

/// Every step converged, disabled or opted out, and no reboot is owed.
pub fn is_converged(steps: &[StepReport]) -> bool {
    steps.iter().all(|s| {
        matches!(s.action, Action::Unchanged | Action::Change | Action::Skip)
            && s.outcome != Outcome::RebootRequired
    })
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
