//! `gpuprov facts`: what gpuprov observes on the host, nothing changed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::cli::ReportFormat;
use crate::converge::node_labels;
use crate::facts::Facts;
use crate::host::{CommandMode, Host};
use crate::{Error, exit};

use super::print;

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
    /// The container runtime and its layout, as `containerd-runtime`
    /// would find them with the default spec.
    pub runtime: serde_json::Value,
    /// What a GPU system needs besides the driver: the NVLink fabric,
    /// Secure Boot, the RDMA NICs and whether nvidia-peermem is loaded,
    /// and the daemons that run.
    pub gpu_system: serde_json::Value,
    pub node_labels: BTreeMap<String, String>,
}

/// Observes the node and reports what it saw; changes nothing.
pub fn facts_report(args: &crate::cli::FactsArgs) -> Result<FactsReport, Error> {
    let host = Host::new(
        &args.host_root,
        CommandMode::default_for(&args.host_root),
        Duration::from_secs(30),
    )?;
    let node_labels = node_labels(&args.node_labels, None)?;
    let facts = Facts::gather(&host, node_labels).map_err(|source| Error::Facts {
        root: host.root().display().to_string(),
        source,
    })?;
    let driver = match crate::driver::detect::detect(&host) {
        Ok(Some(driver)) => {
            let flavour = if driver.open_kernel_module {
                "open"
            } else {
                "proprietary"
            };
            serde_json::json!({"loaded": true, "version": driver.version, "openKernelModule": driver.open_kernel_module, "kernelModuleType": flavour})
        }
        Ok(None) => serde_json::json!({"loaded": false}),
        Err(e) => serde_json::json!({"error": crate::state::error_chain(&e)}),
    };
    let nvml = match crate::gpu::nvml::find_library(&host, args.nvml_lib.as_deref())
        .and_then(|lib| crate::gpu::nvml::inventory(&lib))
    {
        Ok(inventory) => serde_json::to_value(inventory).expect("serializes"),
        Err(problem) => serde_json::json!({"unavailable": problem.to_string(), "reason": problem}),
    };
    let defaults = crate::spec::Spec::default_spec().containerd;
    let runtime = match crate::runtime::crio_chosen(&host, &defaults) {
        Ok(Some(why)) => match crate::crio::target(&host, &defaults) {
            Ok(target) => {
                let mut value = serde_json::to_value(target).expect("serializes");
                value["runtime"] = "crio".into();
                value["detectedBy"] = why.into();
                value
            }
            Err(e) => serde_json::json!({"error": crate::state::error_chain(&e)}),
        },
        Ok(None) => match crate::runtime::containerd_target(&host, &defaults) {
            Ok(target) => {
                let mut value = serde_json::to_value(target).expect("serializes");
                value["runtime"] = "containerd".into();
                value
            }
            Err(e) => serde_json::json!({"error": crate::state::error_chain(&e)}),
        },
        Err(e) => serde_json::json!({"error": crate::state::error_chain(&e)}),
    };
    let running = |program: &str| crate::host::process::running(&host, program).unwrap_or_default();
    let gpu_system = serde_json::json!({
        "fabric": crate::fabric::fabric_of(&facts).map(|f| f.to_string()),
        "fabricManagerPids": running(crate::fabric::PROGRAM),
        "persistencedPids": running(crate::persistence::PROGRAM),
        "secureBoot": facts.secure_boot,
        "rdmaNics": crate::peermem::rdma_nics(&facts.pci).iter().map(|n| &n.address).collect::<Vec<_>>(),
        "peermemLoaded": host.exists(crate::peermem::LOADED).unwrap_or(false),
    });
    Ok(FactsReport {
        gpu_system,
        runtime,
        host_root: host.root().display().to_string(),
        os: facts.os,
        kernel: facts.kernel,
        pci: facts.pci,
        driver,
        nvml,
        node_labels: facts.node_labels,
    })
}

pub fn run_facts(args: &crate::cli::FactsArgs) -> Result<i32, Error> {
    let report = facts_report(args)?;
    print(&match args.output {
        ReportFormat::Json => serde_json::to_string_pretty(&report).expect("serializes") + "\n",
        ReportFormat::Text => facts_text(&report),
    })?;
    Ok(exit::OK)
}

/// One line: the fabric and its manager, persistence, Secure Boot, RDMA.
fn gpu_system_text(system: &serde_json::Value) -> String {
    let pids = |key: &str| match system[key].as_array() {
        Some(pids) if !pids.is_empty() => format!(
            "running (pid {})",
            pids.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => "not running".to_string(),
    };
    let fabric = match system["fabric"].as_str() {
        Some(fabric) => format!("{fabric}, fabric manager {}", pids("fabricManagerPids")),
        None => "no NVLink fabric".to_string(),
    };
    let secure_boot = match system["secureBoot"]["state"].as_str() {
        Some("unreadable") => format!(
            "unknown ({})",
            system["secureBoot"]["problem"].as_str().unwrap_or("")
        ),
        Some("not-efi") => "off (a BIOS boot, no EFI)".to_string(),
        Some(state) => state.to_string(),
        None => "unknown".to_string(),
    };
    let nics = system["rdmaNics"].as_array().map_or(0, Vec::len);
    let peermem = if system["peermemLoaded"].as_bool() == Some(true) {
        "loaded"
    } else {
        "not loaded"
    };
    format!(
        "GPU system: {fabric}; nvidia-persistenced {}; Secure Boot {secure_boot}; {nics} RDMA NIC(s), nvidia-peermem {peermem}\n",
        pids("persistencedPids")
    )
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
    out.push_str(&runtime_text(&report.runtime));
    out.push_str(&match (
        report.driver["loaded"].as_bool(),
        report.driver["version"].as_str(),
    ) {
        (Some(true), Some(version)) => format!(
            "driver: NVIDIA {version} loaded ({} kernel modules)\n",
            report.driver["kernelModuleType"]
                .as_str()
                .unwrap_or("unknown")
        ),
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
                let fabric = match d["fabricState"]["state"].as_str() {
                    Some(state) => format!("  fabric {state}"),
                    None => String::new(),
                };
                out.push_str(&format!(
                    "  {}  {}  {}  {}  {} MiB  compute {}.{}  {mig}  persistence {}{fabric}\n",
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
    out.push_str(&gpu_system_text(&report.gpu_system));
    if !report.node_labels.is_empty() {
        out.push_str("node labels:\n");
        for (k, v) in &report.node_labels {
            out.push_str(&format!("  {k}={v}\n"));
        }
    }
    out
}

/// The runtime line of `facts`: the flavour, why, and where it is.
fn runtime_text(runtime: &serde_json::Value) -> String {
    if let Some(error) = runtime["error"].as_str() {
        return format!("runtime: cannot tell ({error})\n");
    }
    let field = |key: &str| runtime[key].as_str().unwrap_or("").to_string();
    if field("runtime") == "crio" {
        return format!(
            "runtime: CRI-O ({}); config {}, drop-ins {}, socket {}\n",
            field("detectedBy"),
            field("config"),
            field("dir"),
            field("socket")
        );
    }
    let mut line = format!(
        "runtime: containerd, {} ({}); config {}, socket {}, restarted by {}",
        field("flavor"),
        field("detectedBy"),
        field("config"),
        field("socket"),
        field("service")
    );
    if let Some(template) = runtime["template"].as_str() {
        line.push_str(&format!("; template {template}"));
    }
    if let Some(why) = runtime["readOnly"].as_str() {
        line.push_str(&format!("; read-only: {why}"));
    }
    line + "\n"
}
