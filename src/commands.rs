//! The CLI's commands, on top of the library: load and validate every input
//! before the host is touched, then plan or apply.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::catalog::Catalog;
use crate::cli::{
    ApplyArgs, ChangeArgs, Cli, Command, NodeArgs, PlanArgs, PlanFormat, ReportFormat, StatesArgs,
};
use crate::exec::{ApplyLock, Executor};
use crate::facts::Facts;
use crate::host::{ExecMode, Host};
use crate::kube::{Cluster, ClusterOptions};
use crate::labels::{self, LabelTarget};
use crate::plan::{Graph, PlanReport, Summary, steps_table};
use crate::report::{Action, RunReport};
use crate::spec::Spec;
use crate::{Error, exit};

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
    pub fn load(args: &NodeArgs) -> Result<Inputs, Error> {
        let spec = match &args.config {
            Some(path) => Spec::load(path)?,
            None => Spec::default_spec(),
        };
        let graph = compile(&spec, args.states_dir.as_deref())?;
        let node_labels = node_labels(&args.node_labels, args.node_labels_file.as_deref())?;
        let mode = args
            .host_exec
            .unwrap_or_else(|| ExecMode::default_for(&args.host_root));
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
        let mut node_labels = node.labels;
        node_labels.extend(self.node_labels.clone());
        let mut facts = Facts::gather(&self.host, node_labels).map_err(|source| Error::Facts {
            root: self.host.root().display().to_string(),
            source,
        })?;
        facts.own_labels = node.ours;
        facts.node_allocatable = node.allocatable;
        facts.nvml_lib = self.nvml_lib.clone();
        Ok(facts)
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
        }
    }
}

fn compile(spec: &Spec, states_dir: Option<&Path>) -> Result<Graph, Error> {
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
    let _lock = ApplyLock::acquire(&inputs.host, lock_timeout)?;
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
                tracing::error!(step = %step.name, "{}", step.reason);
            }
            return Err(e.into());
        }
    };
    // Events tell people what happened; a failure to post them (RBAC, a
    // flaky server) is logged and does not undo a converge.
    if let Some(cluster) = &inputs.cluster
        && let Err(e) = crate::kube::events::publish(cluster, &inputs.host, &steps)
    {
        tracing::warn!("node events not posted: {}", crate::step::error_chain(&e));
    }
    let mut report = RunReport::new(&inputs.host, &inputs.spec, started, steps, labels);
    report.label_sink = published.target;
    report.labels_changed = published.changes;
    report.label_notes = published.notes;
    report.record(&inputs.host);
    Ok(report)
}

/// Whether an error of one try may be gone at the next: the API server
/// unreachable or answering 5xx, another run holding the lock. Invalid
/// input and a host that cannot be read stay as they are.
fn waiting_may_help(error: &Error) -> bool {
    matches!(error, Error::Kube(_) | Error::Lock(_) | Error::Labels(_))
}

/// gpuprov's own directories, where a killed run may have left a
/// temporary that no later write of the same file would sweep.
const OWN_DIRS: [&str; 3] = [
    "/var/lib/gpuprov",
    crate::download::CACHE_DIR,
    "/run/gpuprov",
];

fn sweep_interrupted(host: &Host) -> Result<(), Error> {
    for dir in OWN_DIRS {
        host.sweep_interrupted(dir)?;
    }
    Ok(())
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<i32, Error> {
    match cli.command {
        Command::Plan(args) => run_plan(&args),
        Command::Apply(args) => run_apply(&args),
        Command::States(args) => run_states(&args),
        Command::Revert(args) => run_revert(&args),
        Command::Run(args) => crate::daemon::run(&args),
        Command::Facts(args) => run_facts(&args),
    }
}

/// What `revert` did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertReport {
    pub containerd: crate::containerd::revert::Reverted,
    /// The operands' static pod manifests removed.
    pub static_pods_removed: Vec<String>,
    pub labels_removed: bool,
}

/// Removes what gpuprov added, under the host's lock: containerd's runtime
/// (restarting containerd only if its config changed), the operands' static
/// pods, the validation's pass and the labels (with an API server, the
/// deploy labels going stops the operands' DaemonSet pods). Installed
/// packages stay.
pub fn revert(inputs: &Inputs, lock_timeout: Duration) -> Result<RevertReport, Error> {
    let _lock = ApplyLock::acquire(&inputs.host, lock_timeout)?;
    sweep_interrupted(&inputs.host)?;
    let containerd = crate::containerd::revert::revert(
        &inputs.host,
        &inputs.spec.containerd,
        crate::exec::make_changes,
    )
    .map_err(Error::Revert)?;
    let static_pods_removed = crate::operands::static_pod::remove_ours(&inputs.host, &inputs.spec)?;
    inputs.host.remove(crate::operands::validate::MARKER)?;
    inputs.host.remove(crate::operands::validate::RUNTIME_RAN)?;
    inputs
        .host
        .remove(crate::containerd::effective::VIEW_CHECKED)?;
    let labels_removed = inputs.sink().withdraw()?;
    Ok(RevertReport {
        containerd,
        static_pods_removed,
        labels_removed,
    })
}

fn run_revert(args: &ChangeArgs) -> Result<i32, Error> {
    let report = revert(&Inputs::load(&args.node)?, args.lock_timeout)?;
    print(&match args.output {
        ReportFormat::Json => serde_json::to_string_pretty(&report).expect("serializes") + "\n",
        ReportFormat::Text => format!(
            "{}\nstatic pods: {}\nlabels: {}\n",
            report.containerd.summary,
            if report.static_pods_removed.is_empty() {
                "none to remove".to_string()
            } else {
                format!("removed {}", report.static_pods_removed.join(", "))
            },
            if report.labels_removed {
                "removed"
            } else {
                "none to remove"
            }
        ),
    })?;
    Ok(exit::OK)
}

fn run_plan(args: &PlanArgs) -> Result<i32, Error> {
    let report = plan(&Inputs::load(&args.node)?)?;
    print(&match args.output {
        PlanFormat::Text => report.to_text(),
        PlanFormat::Json => report.to_json(),
        PlanFormat::Dot => report.to_dot(),
    })?;
    Ok(if args.detailed_exitcode && report.has_changes() {
        exit::CHANGES_PENDING
    } else {
        exit::OK
    })
}

fn run_apply(args: &ApplyArgs) -> Result<i32, Error> {
    let change = &args.change;
    let inputs = Inputs::load(&change.node)?;
    crate::interrupt::install();
    let deadline = std::time::Instant::now() + args.timeout;
    let mut delay = Duration::from_secs(1);
    let report = loop {
        // Under --wait, a run that errors (the API server away, the lock
        // held) is one more try, not the end.
        let result = apply(&inputs, change.lock_timeout);
        let done = match &result {
            Ok(report) => report.converged,
            Err(_) => false,
        };
        let out_of_time = std::time::Instant::now() + delay > deadline;
        // Waiting helps only with what changes by itself: operands
        // starting, an API server coming back, another run's lock.
        let hopeless = match &result {
            Ok(report) => report.cannot_converge_by_waiting(),
            Err(e) if waiting_may_help(e) => None,
            Err(e) => Some(crate::step::error_chain(e)),
        };
        if args.wait
            && !done
            && !out_of_time
            && let Some(why) = &hopeless
        {
            tracing::error!("not waiting: the node cannot converge by waiting: {why}");
        }
        if done || !args.wait || out_of_time || hopeless.is_some() || crate::interrupt::requested()
        {
            let report = result?;
            if args.wait && !report.converged && !report.interrupted && hopeless.is_none() {
                let waiting: Vec<String> = report
                    .steps
                    .iter()
                    .filter(|s| matches!(s.action, Action::Fail | Action::Block | Action::Wait))
                    .map(|s| format!("{} is {}: {}", s.name, s.outcome.as_str(), s.reason))
                    .collect();
                tracing::error!(
                    "not converged after {}: {}",
                    humantime::format_duration(args.timeout),
                    waiting.join("; ")
                );
            }
            break report;
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
            Err(e) => tracing::warn!("{}; trying again in {delay:?}", crate::step::error_chain(e)),
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
    };
    let text = match change.output {
        ReportFormat::Text => apply_text(&report),
        ReportFormat::Json => serde_json::to_string_pretty(&report).expect("serializes") + "\n",
    };
    // With labels on stdout, the report goes to stderr so the two don't mix.
    if inputs.labels_sink == LabelTarget::Stdout {
        eprint!("{text}");
    } else {
        print(&text)?;
    }
    Ok(if report.interrupted {
        tracing::warn!("interrupted: stopped after the change in progress");
        exit::INTERRUPTED
    } else if report.converged {
        exit::OK
    } else {
        exit::NOT_CONVERGED
    })
}

fn apply_text(report: &RunReport) -> String {
    let mut out = steps_table(&report.steps);
    let state = if report.labels_changed {
        "changed"
    } else {
        "unchanged"
    };
    out.push_str(&format!("labels → {} ({state})\n", report.label_sink));
    for note in &report.label_notes {
        out.push_str(&format!("    {note}\n"));
    }
    for error in &report.errors {
        out.push_str(&format!("error: {error}\n"));
    }
    let s = Summary::of(&report.steps);
    let verdict = if report.interrupted {
        "INTERRUPTED (SIGTERM or SIGINT) after the change in progress, labels not published"
    } else if report.converged {
        "converged"
    } else {
        "NOT converged"
    };
    out.push_str(&format!(
        "Apply: {verdict}: {} changed, {} unchanged, {} skipped, {} waiting, {} blocked, {} failed ({} ms).\n",
        s.change, s.unchanged, s.skip, s.wait, s.block, s.fail, report.duration_ms
    ));
    out
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StateRow {
    name: String,
    handler: &'static str,
    after: Vec<String>,
    enabled_by: Option<String>,
    opt_out_labels: Vec<String>,
    label: String,
    description: String,
    source: String,
}

fn run_states(args: &StatesArgs) -> Result<i32, Error> {
    let spec = match &args.config {
        Some(path) => Spec::load(path)?,
        None => Spec::default_spec(),
    };
    let graph = compile(&spec, args.states_dir.as_deref())?;
    let rows: Vec<StateRow> = graph
        .steps
        .iter()
        .map(|s| StateRow {
            name: s.name.clone(),
            handler: s.handler.name(),
            after: s.after.iter().map(|a| a.value.clone()).collect(),
            enabled_by: s.enabled_by.clone(),
            opt_out_labels: s.opt_out_labels.clone(),
            label: s.label.clone(),
            description: s.description.clone(),
            source: s.origin.name.clone(),
        })
        .collect();
    let text = match args.output {
        ReportFormat::Json => serde_json::to_string_pretty(&rows).expect("serializes") + "\n",
        ReportFormat::Text => {
            let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
            let mut out = String::new();
            for (i, row) in rows.iter().enumerate() {
                out.push_str(&format!(
                    "{:>2}. {:width$}  {}\n",
                    i + 1,
                    row.name,
                    row.description
                ));
                let mut facts = vec![format!("handler {}", row.handler)];
                if !row.after.is_empty() {
                    facts.push(format!("after {}", row.after.join(", ")));
                }
                if let Some(switch) = &row.enabled_by {
                    facts.push(format!("enabled by {switch}"));
                }
                if !row.opt_out_labels.is_empty() {
                    facts.push(format!("opt-out {}", row.opt_out_labels.join(", ")));
                }
                facts.push(format!("label {}", row.label));
                facts.push(format!("from {}", row.source));
                out.push_str(&format!("    {:width$}  {}\n", "", facts.join(" · ")));
            }
            out
        }
    };
    print(&text)?;
    Ok(exit::OK)
}

/// `--node-labels` and `--node-labels-file`, merged (the flag wins).
fn node_labels(flag: &[String], file: Option<&Path>) -> Result<BTreeMap<String, String>, Error> {
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

fn print(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(Error::Stdout)
}

/// Everything `gpuprov facts` shows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FactsReport {
    pub host_root: String,
    pub os: Option<String>,
    pub kernel: Option<String>,
    pub pci: Vec<crate::gpu::pci::PciFunction>,
    pub driver: serde_json::Value,
    pub nvml: serde_json::Value,
    pub node_labels: BTreeMap<String, String>,
}

/// Observes the node and reports what it saw; changes nothing.
pub fn facts_report(args: &crate::cli::FactsArgs) -> Result<FactsReport, Error> {
    let host = Host::new(
        &args.host_root,
        ExecMode::default_for(&args.host_root),
        Duration::from_secs(30),
    )?;
    let node_labels = node_labels(&args.node_labels, None)?;
    let facts = Facts::gather(&host, node_labels).map_err(|source| Error::Facts {
        root: host.root().display().to_string(),
        source,
    })?;
    let driver = match crate::driver::detect::detect(&host) {
        Ok(Some(driver)) => {
            serde_json::json!({"loaded": true, "version": driver.version, "openKernelModule": driver.open_kernel_module})
        }
        Ok(None) => serde_json::json!({"loaded": false}),
        Err(e) => serde_json::json!({"error": crate::step::error_chain(&e)}),
    };
    let nvml = match crate::gpu::nvml::find_library(&host, args.nvml_lib.as_deref())
        .and_then(|lib| crate::gpu::nvml::inventory(&lib))
    {
        Ok(inventory) => serde_json::to_value(inventory).expect("serializes"),
        Err(problem) => serde_json::json!({"unavailable": problem.to_string(), "reason": problem}),
    };
    Ok(FactsReport {
        host_root: host.root().display().to_string(),
        os: facts.os,
        kernel: facts.kernel,
        pci: facts.pci,
        driver,
        nvml,
        node_labels: facts.node_labels,
    })
}

fn run_facts(args: &crate::cli::FactsArgs) -> Result<i32, Error> {
    let report = facts_report(args)?;
    print(&match args.output {
        ReportFormat::Json => serde_json::to_string_pretty(&report).expect("serializes") + "\n",
        ReportFormat::Text => facts_text(&report),
    })?;
    Ok(exit::OK)
}

fn facts_text(report: &FactsReport) -> String {
    let mut out = format!("host: {}", report.host_root);
    let about: Vec<String> = report
        .os
        .iter()
        .cloned()
        .chain(report.kernel.iter().map(|k| format!("kernel {k}")))
        .collect();
    if !about.is_empty() {
        out.push_str(&format!(" ({})", about.join(", ")));
    }
    out.push('\n');
    let nvidia: Vec<_> = report
        .pci
        .iter()
        .filter(|f| f.nvidia_kind().is_some())
        .collect();
    out.push_str(&format!(
        "PCI: {} functions, {} of them NVIDIA's\n",
        report.pci.len(),
        nvidia.len()
    ));
    for f in nvidia {
        let kind = f.nvidia_kind().expect("filtered").describe();
        let driver = f.driver.as_deref().unwrap_or("no driver");
        out.push_str(&format!(
            "  {}  10de:{:04x}  class 0x{:06x}  {driver}  {kind}\n",
            f.address, f.device, f.class
        ));
    }
    out.push_str(&match (
        report.driver["loaded"].as_bool(),
        report.driver["version"].as_str(),
    ) {
        (Some(true), Some(version)) => format!("driver: NVIDIA {version} loaded\n"),
        (Some(false), _) => "driver: no NVIDIA kernel driver loaded\n".to_string(),
        _ => format!(
            "driver: {}\n",
            report.driver["error"].as_str().unwrap_or("unknown")
        ),
    });
    match report.nvml["unavailable"].as_str() {
        Some(problem) => out.push_str(&format!("NVML: {problem}\n")),
        None => {
            let devices = report.nvml["devices"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            out.push_str(&format!(
                "NVML ({}): driver {}, CUDA {}, {} GPU(s)\n",
                report.nvml["library"].as_str().unwrap_or(""),
                report.nvml["driverVersion"].as_str().unwrap_or(""),
                report.nvml["cudaDriverVersion"].as_str().unwrap_or(""),
                devices.len()
            ));
            for d in devices {
                let mig = match (d["migCapable"].as_bool(), d["migEnabled"].as_bool()) {
                    (Some(true), Some(true)) => "MIG on",
                    (Some(true), _) => "MIG off",
                    _ => "no MIG",
                };
                out.push_str(&format!(
                    "  {}  {}  {}  {}  {} MiB  compute {}.{}  {mig}  persistence {}\n",
                    d["index"],
                    d["name"].as_str().unwrap_or(""),
                    d["uuid"].as_str().unwrap_or(""),
                    d["pciBusId"].as_str().unwrap_or(""),
                    d["memoryTotalMib"],
                    d["computeCapability"][0],
                    d["computeCapability"][1],
                    if d["persistenceMode"].as_bool() == Some(true) {
                        "on"
                    } else {
                        "off"
                    },
                ));
            }
        }
    }
    if !report.node_labels.is_empty() {
        out.push_str("node labels:\n");
        for (k, v) in &report.node_labels {
            out.push_str(&format!("  {k}={v}\n"));
        }
    }
    out
}
