//! GPU discovery: which PCI functions are NVIDIA GPUs.

pub mod gfd;
pub mod nvml;
pub mod pci;
pub mod xid;

use std::collections::BTreeMap;

use crate::state::{Gate, Observation, Outcome, StateContext};
use pci::NvidiaFunction;

pub const GPU_PRESENT_LABEL: &str = "nvidia.com/gpu.present";
/// NFD's label for NVIDIA PCI devices, which the GPU Operator selects on.
pub const NFD_NVIDIA_PCI_LABEL: &str = "feature.node.kubernetes.io/pci-10de.present";

/// The `detect-gpu` capability: counts physical NVIDIA GPUs and says what the
/// other NVIDIA functions were, so a miscount is visible in the plan.
pub fn observe(ctx: &StateContext) -> Observation {
    let gpus: Vec<_> = ctx.facts.gpus().collect();
    let mut others: BTreeMap<NvidiaFunction, usize> = BTreeMap::new();
    for kind in ctx.facts.pci.iter().filter_map(|f| f.nvidia_kind()) {
        if kind != NvidiaFunction::Gpu {
            *others.entry(kind).or_default() += 1;
        }
    }

    let mut models: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for gpu in &gpus {
        let driver = gpu
            .driver
            .clone()
            .unwrap_or_else(|| "no driver".to_string());
        *models.entry((gpu.device, driver)).or_default() += 1;
    }
    let found = models
        .iter()
        .map(|((device, driver), n)| format!("{n}× 10de:{device:04x} ({driver})"))
        .collect::<Vec<_>>()
        .join(", ");
    let ignored = others
        .iter()
        .map(|(kind, n)| format!("{n}× {}", kind.describe()))
        .collect::<Vec<_>>()
        .join(", ");

    let mut obs = if gpus.is_empty() {
        let mut obs = Observation::new(Outcome::Absent, "no NVIDIA GPU on the PCI bus");
        obs.gate = Some(Gate::Disable("no GPU".to_string()));
        obs
    } else {
        let noun = if gpus.len() == 1 { "GPU" } else { "GPUs" };
        Observation::new(Outcome::Ready, format!("{} {noun}: {found}", gpus.len()))
    };
    if !ignored.is_empty() {
        obs.reason.push_str(&format!("; not GPUs: {ignored}"));
    }
    obs.labels.insert(
        GPU_PRESENT_LABEL.to_string(),
        (!gpus.is_empty()).to_string(),
    );
    if ctx
        .facts
        .pci
        .iter()
        .any(|f| f.vendor == pci::NVIDIA_VENDOR && f.counts_for_nfd())
    {
        obs.labels
            .insert(NFD_NVIDIA_PCI_LABEL.to_string(), "true".to_string());
    }
    obs.details = serde_json::json!({
        "count": gpus.len(),
        "gpus": gpus.iter().map(|g| serde_json::json!({
            "address": g.address,
            "id": format!("10de:{:04x}", g.device),
            "class": format!("0x{:06x}", g.class),
            "driver": g.driver,
        })).collect::<Vec<_>>(),
    });
    obs
}
