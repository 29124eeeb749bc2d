//! The CLI's subcommands: each runs the converge pipeline
//! (`converge.rs`) and prints what it returns, as text or JSON, with the
//! exit code the README documents.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{
    ApplyArgs, ChangeArgs, Cli, Command, PlanArgs, PlanFormat, ReportFormat, StatesArgs,
};
use crate::converge::{Inputs, apply, compile, node_labels, plan, revert, waiting_may_help};
use crate::facts::Facts;
use crate::host::{ExecMode, Host};
use crate::labels::LabelTarget;
use crate::plan::{Summary, steps_table};
use crate::report::{Action, RunReport};
use crate::spec::Spec;
use crate::{Error, exit};

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
