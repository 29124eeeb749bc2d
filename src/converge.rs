//! The converge pipeline every subcommand and the daemon share: load and
//! validate every input before the host is touched, then observe (`plan`),
//! converge once under the host's lock (`apply`, publishing labels, posting
//! events and recording `last-run.json`), or take gpuprov's changes back
//! (`revert`). The subcommands in `cmd/` print what these return;
//! the daemon calls them in its loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::Error;
use crate::catalog::{CapabilityId, Catalog};
use crate::executor::{ApplyLock, Executor};
use crate::facts::Facts;
use crate::host::{CommandMode, Host};
use crate::kube::{Cluster, ClusterOptions};
use crate::labels::{self, LabelTarget};
use crate::plan::{Graph, PlanReport, Summary};
use crate::registry::{Capability, Revert, capability};
use crate::report::{Action, RevertReport, RunReport};
use crate::spec::Spec;
use crate::state::{ErrorKind, RevertContext};

/// What the pipeline is given for one node (the CLI's flags, converted).
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The desired-state YAML; the embedded default spec when absent.
    pub config: Option<PathBuf>,
    /// The node's root directory: `/` on the node, `/host` in a pod.
    pub host_root: PathBuf,
    /// How commands reach the host (default: by the root).
    pub host_exec: Option<CommandMode>,
    /// State YAML files that add to or override the built-in ones.
    pub states_dir: Option<PathBuf>,
    /// The node's labels given as `key=value` items.
    pub node_labels: Vec<String>,
    /// A file of the node's labels, one `key=value` a line.
    pub node_labels_file: Option<PathBuf>,
    pub labels_sink: LabelTarget,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    pub nvml_lib: Option<PathBuf>,
    /// Longest time one host command may run.
    pub command_timeout: Duration,
}

/// Validated inputs of `plan` and `apply`: nothing here has read the host
/// beyond checking that its root is a directory.
pub struct Inputs {
    pub host: Host,
    pub spec: Spec,
    pub graph: Graph,
    /// Labels given on the command line; they win over the node's own.
    pub node_labels: BTreeMap<String, String>,
    /// Where labels go, `Auto` resolved.
    pub labels_sink: LabelTarget,
    /// The API server, when one is configured (or asked for).
    pub cluster: Option<Cluster>,
    pub nvml_lib: Option<std::path::PathBuf>,
}

impl Inputs {
    pub fn load(args: &NodeOptions) -> Result<Inputs, Error> {
        let spec = match &args.config {
            Some(path) => Spec::load(path)?,
            None => Spec::default_spec(),
        };
        let graph = compile(&spec, args.states_dir.as_deref())?;
        let node_labels = node_labels(&args.node_labels, args.node_labels_file.as_deref())?;
        let mode = args
            .host_exec
            .unwrap_or_else(|| CommandMode::default_for(&args.host_root));
        let host = Host::new(&args.host_root, mode, args.command_timeout)?;
        let options = ClusterOptions {
            kubeconfig: args.kubeconfig.clone(),
            node_name: args.node_name.clone(),
        };
        // An API server is used when asked for, or (auto) when one is
        // configured; `auto` without one uses the feature file and says so.
        let wants_api = match args.labels_sink {
            LabelTarget::Api => true,
            LabelTarget::Auto => options.configured(),
            _ => options.kubeconfig.is_some(),
        };
        let cluster = if wants_api {
            Some(Cluster::connect(&options)?)
        } else {
            None
        };
        let labels_sink = match (args.labels_sink, &cluster) {
            (LabelTarget::Auto, Some(_)) => LabelTarget::Api,
            (LabelTarget::Auto, None) => {
                tracing::info!("no API server is configured: labels go to NFD's feature file");
                LabelTarget::File
            }
            (target, _) => target,
        };
        Ok(Inputs {
            host,
            spec,
            graph,
            node_labels,
            labels_sink,
            cluster,
            nvml_lib: args.nvml_lib.clone(),
        })
    }

    /// Observes the host; the node's labels come from the API server when
    /// there is one, with `--node-labels` on top.
    fn facts(&self) -> Result<Facts, Error> {
        let node = match &self.cluster {
            Some(cluster) => cluster.node_labels()?,
            None => Default::default(),
        };
        let sources = crate::facts::Sources {
            node,
            given_labels: self.node_labels.clone(),
            nvml_lib: self.nvml_lib.clone(),
        };
        Facts::gather_from(&self.host, sources).map_err(|source| Error::Facts {
            root: self.host.root().display().to_string(),
            source,
        })
    }

    fn sink(&self) -> Box<dyn labels::LabelSink + '_> {
        labels::sink_for(self.labels_sink, &self.host, self.cluster.as_ref())
    }

    fn executor<'a>(&'a self, facts: &'a Facts) -> Executor<'a> {
        Executor {
            host: &self.host,
            spec: &self.spec,
            facts,
            graph: &self.graph,
            cluster: self.cluster.as_ref(),
            labels_set: Default::default(),
        }
    }
}

pub fn compile(spec: &Spec, states_dir: Option<&Path>) -> Result<Graph, Error> {
    let catalog = Catalog::load(states_dir)?;
    let states = catalog.with_user_states(spec).map_err(Error::Graph)?;
    Graph::compile(states).map_err(Error::Graph)
}

/// Observes the node and lists what `apply` would change. Writes nothing.
pub fn plan(inputs: &Inputs) -> Result<PlanReport, Error> {
    let facts = inputs.facts()?;
    let steps = inputs.executor(&facts).plan();
    let labels = labels::compute(&steps, &inputs.graph, &facts);
    let label_sink = inputs.sink().preview(&labels)?;
    Ok(PlanReport {
        schema_version: crate::plan::PLAN_SCHEMA_VERSION,
        host_root: inputs.host.root().display().to_string(),
        spec: inputs.spec.source.clone(),
        os: facts.os.clone(),
        kernel: facts.kernel.clone(),
        summary: Summary::of(&steps),
        steps,
        labels,
        label_sink,
    })
}

/// Converges the node once, under the host's apply lock, then publishes
/// labels and records the run in `last-run.json`.
pub fn apply(inputs: &Inputs, lock_timeout: Duration) -> Result<RunReport, Error> {
    under_lock(inputs, lock_timeout, apply_locked)
}

/// Runs `work` under the host's apply lock. What it changed is on disk
/// before the lock goes (see `Host::write_files`); a run that changed
/// nothing syncs nothing.
fn under_lock<T>(
    inputs: &Inputs,
    lock_timeout: Duration,
    work: impl FnOnce(&Inputs) -> Result<T, Error>,
) -> Result<T, Error> {
    let _lock = ApplyLock::acquire(&inputs.host, lock_timeout)?;
    let done = work(inputs);
    let durable = inputs.host.make_durable();
    let value = done?;
    durable?;
    Ok(value)
}

fn apply_locked(inputs: &Inputs) -> Result<RunReport, Error> {
    sweep_interrupted(&inputs.host)?;
    let started = SystemTime::now();
    let facts = inputs.facts()?;
    let steps = inputs.executor(&facts).apply();
    let labels = labels::compute(&steps, &inputs.graph, &facts);
    if crate::interrupt::requested() {
        // A partial run's outcomes are not the node's: its labels stay as
        // they were until a run completes.
        let mut report = RunReport::new(&inputs.host, &inputs.spec, started, steps, labels);
        report.converged = false;
        report.interrupted = true;
        report.label_sink = "not published: interrupted".to_string();
        report.record(&inputs.host);
        return Ok(report);
    }
    // A failure to publish (the disk full under the feature file, the API
    // server refusing) ends the run as an error; the steps' own failures,
    // the root cause where a disk is full, are logged first so that they
    // are not hidden behind it. The node keeps the last run's labels and
    // `last-run.json` the last run's report.
    let published = match inputs.sink().publish(&labels) {
        Ok(published) => published,
        Err(e) => {
            for step in steps.iter().filter(|s| s.action == Action::Fail) {
                tracing::error!(state = %step.name, "{}", step.reason);
            }
            return Err(e.into());
        }
    };
    // Events tell people what happened; a failure to post them (RBAC, a
    // flaky server) is logged and does not undo a converge.
    if let Some(cluster) = &inputs.cluster
        && let Err(e) = crate::kube::events::publish(cluster, &inputs.host, &steps)
    {
        tracing::warn!("node events not posted: {}", crate::state::error_chain(&e));
    }
    // The readiness gate likewise: the next converge tries again.
    if let Some(cluster) = &inputs.cluster
        && let Err(e) = crate::readiness::publish(cluster, &inputs.spec.readiness, &facts, &steps)
    {
        tracing::error!(
            "the GPU readiness gate (condition, startup taint) is not updated: {}",
            crate::state::error_chain(&e)
        );
    }
    let mut report = RunReport::new(&inputs.host, &inputs.spec, started, steps, labels);
    report.label_sink = published.target;
    report.labels_changed = published.changes;
    report.label_notes = published.notes;
    report.record(&inputs.host);
    Ok(report)
}

/// Sweeps gpuprov's own directories (the host layer's one list of them),
/// where a killed run may have left a temporary that no later write of
/// the same file would sweep.
fn sweep_interrupted(host: &Host) -> Result<(), Error> {
    for dir in crate::host::OWN_DIRS {
        host.sweep_interrupted(&format!("/{dir}"))?;
    }
    Ok(())
}

/// Removes what gpuprov added, under the host's lock: a walk through the
/// registry, each capability's revert in reverse plan order (containerd's
/// runtime, restarting containerd only if its config changed; the
/// operands' static pods; CDI specs; the validation's pass), then the
/// labels (with an API server, the deploy labels going stops the operands'
/// DaemonSet pods). Installed packages stay.
pub fn revert(inputs: &Inputs, lock_timeout: Duration) -> Result<RevertReport, Error> {
    under_lock(inputs, lock_timeout, revert_locked)
}

fn revert_locked(inputs: &Inputs) -> Result<RevertReport, Error> {
    sweep_interrupted(&inputs.host)?;
    let ctx = RevertContext {
        host: &inputs.host,
        spec: &inputs.spec,
    };
    let mut report = RevertReport::default();
    let mut done: Vec<Revert> = Vec::new();
    for capability in revert_order(&inputs.graph) {
        let Some(revert) = capability.revert else {
            continue;
        };
        if done.iter().any(|d| std::ptr::fn_addr_eq(*d, revert)) {
            continue;
        }
        done.push(revert);
        revert(&ctx, &mut report).map_err(|e| Error::Revert(e.to_string()))?;
    }
    report.labels_removed = inputs.sink().withdraw()?;
    Ok(report)
}

/// Every capability, the plan's in reverse plan order, then those the
/// plan lacks (a state a states directory took out may have written
/// before), so that nothing gpuprov wrote is left for want of a state.
fn revert_order(graph: &Graph) -> Vec<&'static Capability> {
    let in_plan = graph
        .states
        .iter()
        .rev()
        .filter_map(|state| capability(&state.capability));
    let rest = crate::registry::names()
        .rev()
        .filter_map(|name| capability(&CapabilityId::named(name)));
    let mut order: Vec<&'static Capability> = Vec::new();
    for capability in in_plan.chain(rest) {
        if !order.iter().any(|c| std::ptr::eq(*c, capability)) {
            order.push(capability);
        }
    }
    order
}

pub fn node_labels(
    flag: &[String],
    file: Option<&Path>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = BTreeMap::new();
    if let Some(path) = file {
        let origin = path.display().to_string();
        let text = crate::host::read_user_file(path, crate::host::USER_FILE_CAP).map_err(|e| {
            Error::NodeLabels {
                origin: format!("in --node-labels-file {origin}"),
                problem: if e.kind() == std::io::ErrorKind::NotFound {
                    "no such file (it holds the node's labels, one key=value a line)".to_string()
                } else {
                    e.to_string()
                },
            }
        })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = split_label(line).map_err(|problem| Error::NodeLabels {
                origin: format!("{origin}:{}", i + 1),
                problem,
            })?;
            labels.insert(k, v);
        }
    }
    for item in flag.iter().filter(|i| !i.trim().is_empty()) {
        let (k, v) = split_label(item.trim()).map_err(|problem| Error::NodeLabels {
            origin: "in --node-labels".to_string(),
            problem,
        })?;
        labels.insert(k, v);
    }
    Ok(labels)
}

fn split_label(item: &str) -> Result<(String, String), String> {
    match item.split_once('=') {
        Some((k, v)) if !k.is_empty() => {
            crate::label_syntax::check_label(k, v).map_err(|why| format!("`{item}`: {why}"))?;
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("`{item}` is not key=value")),
    }
}

/// `apply` again until the node converges, for at most `timeout`
/// (`apply --wait`): a run that is only waiting (operands starting) is
/// looked at again every 2 s, an error that may pass (the API server, the
/// lock) after a backoff; a node that cannot converge by waiting, SIGTERM,
/// or the timeout ends it with the last run's report.
pub fn apply_until_converged(
    inputs: &Inputs,
    lock_timeout: Duration,
    timeout: Duration,
) -> Result<RunReport, Error> {
    let deadline = std::time::Instant::now() + timeout;
    let mut delay = Duration::from_secs(1);
    loop {
        // A run that errors (the API server away, the lock held) is one
        // more try, not the end.
        let result = apply(inputs, lock_timeout);
        let done = match &result {
            Ok(report) => report.converged,
            Err(_) => false,
        };
        let out_of_time = std::time::Instant::now() + delay > deadline;
        // Waiting helps only with what changes by itself: operands
        // starting, an API server coming back, another run's lock.
        let hopeless = match &result {
            Ok(report) => report.cannot_converge_by_waiting(),
            Err(e) if e.kind() == ErrorKind::Transient => None,
            Err(e) => Some(crate::state::error_chain(e)),
        };
        if !done
            && !out_of_time
            && let Some(why) = &hopeless
        {
            tracing::error!("not waiting: the node cannot converge by waiting: {why}");
        }
        if done || out_of_time || hopeless.is_some() || crate::interrupt::requested() {
            let report = result?;
            if !report.converged && !report.interrupted && hopeless.is_none() {
                let waiting: Vec<String> = report
                    .steps
                    .iter()
                    .filter(|s| matches!(s.action, Action::Fail | Action::Block | Action::Wait))
                    .map(|s| format!("{} is {}: {}", s.name, s.outcome.as_str(), s.reason))
                    .collect();
                tracing::error!(
                    "not converged after {}: {}",
                    humantime::format_duration(timeout),
                    waiting.join("; ")
                );
            }
            return Ok(report);
        }
        match &result {
            Ok(report) => {
                let blocking: Vec<&str> = report
                    .steps
                    .iter()
                    .filter(|s| matches!(s.action, Action::Fail | Action::Block | Action::Wait))
                    .map(|s| s.name.as_str())
                    .collect();
                tracing::warn!(
                    "not converged yet ({}); trying again in {delay:?}",
                    blocking.join(", ")
                );
            }
            Err(e) => tracing::warn!(
                "{}; trying again in {delay:?}",
                crate::state::error_chain(e)
            ),
        }
        std::thread::sleep(delay);
        // Waiting on an operand's pod is progress: keep looking every
        // couple of seconds rather than backing off.
        let waiting = matches!(&result, Ok(report) if report.only_waiting());
        delay = if waiting {
            Duration::from_secs(2)
        } else {
            (delay * 2).min(Duration::from_secs(30))
        };
    }
}
