//! A GPU reset through NVML, as NVML documents hot removal: no process may
//! hold the GPU (NVML's compute and graphics processes; legacy persistence
//! mode counts as one, so it is turned off and back on), the GPU is put in
//! the drain state (no new NVML client attaches), removed from the driver's
//! and the OS's view, and discovered again, which initialises it afresh.
//! Then NVML must read it again by its UUID, or the reset failed.

use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{DetachGpuState, PcieLinkState};
use nvml_wrapper::error::NvmlError;

/// A GPU to reset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResetTarget {
    pub address: String,
    pub uuid: String,
}

/// Resets each GPU in turn; the first that cannot be reset stops it.
pub fn reset(library: &Path, gpus: &[ResetTarget]) -> Result<String, String> {
    if gpus.is_empty() {
        // A fault whose GPU NVML did not name (no UUID): nothing to reset
        // is no reset done.
        return Err("no GPU to reset: the driver did not say which GPU faulted (no UUID)".into());
    }
    let mut done = Vec::new();
    for gpu in gpus {
        reset_one(library, gpu).map_err(|why| {
            let before = if done.is_empty() {
                String::new()
            } else {
                format!(" (reset before it: {})", done.join(", "))
            };
            format!(
                "GPU {} ({}) was not reset: {why}{before}",
                gpu.address, gpu.uuid
            )
        })?;
        done.push(gpu.address.clone());
    }
    Ok(format!("reset GPU {} through NVML", done.join(", ")))
}

fn open(library: &Path) -> Result<Nvml, String> {
    crate::gpu::nvml::open(library).map_err(|p| p.to_string())
}

fn reset_one(library: &Path, gpu: &ResetTarget) -> Result<(), String> {
    let nvml = open(library)?;
    let mut device = nvml
        .device_by_uuid(gpu.uuid.as_str())
        .map_err(|e| format!("NVML cannot find it by its UUID: {e}"))?;
    let mut holders: Vec<u32> = Vec::new();
    for processes in [
        device.running_compute_processes(),
        device.running_graphics_processes(),
    ] {
        match processes {
            Ok(list) => holders.extend(list.iter().map(|p| p.pid)),
            Err(NvmlError::NotSupported) => {}
            Err(e) => return Err(format!("NVML cannot list the processes on it: {e}")),
        }
    }
    if !holders.is_empty() {
        holders.sort_unstable();
        holders.dedup();
        let pids: Vec<String> = holders.iter().map(u32::to_string).collect();
        return Err(format!(
            "processes hold it (pid {}): a reset would kill their work",
            pids.join(", ")
        ));
    }
    let pci = device
        .pci_info()
        .map_err(|e| format!("NVML cannot read its PCI address: {e}"))?;
    let persistent = device.is_in_persistent_mode().unwrap_or(false);
    if persistent {
        device.set_persistent(false).map_err(|e| {
            format!("persistence mode is on and NVML cannot turn it off ({e}); nvidia-persistenced may hold it")
        })?;
    }
    let restore = |why: String| -> String {
        if persistent
            && let Ok(nvml) = open(library)
            && let Ok(mut device) = nvml.device_by_uuid(gpu.uuid.as_str())
        {
            let _ = device.set_drain(false, None);
            let _ = device.set_persistent(true);
        }
        why
    };
    device
        .set_drain(true, pci.clone())
        .map_err(|e| restore(format!("NVML cannot put it in the drain state: {e}")))?;
    let (removed, kept) = device.remove(pci.clone(), DetachGpuState::Remove, PcieLinkState::Keep);
    if let Err(e) = removed {
        if let Some(mut device) = kept {
            let _ = device.set_drain(false, None);
        }
        return Err(restore(format!("NVML cannot remove it: {}", e.error)));
    }
    nvml.discover_gpus(pci)
        .map_err(|e| format!("NVML did not discover it again after removing it: {e}"))?;
    drop(nvml);

    // Handles do not outlive a discovery: read it afresh.
    let nvml = open(library)?;
    let mut device = nvml
        .device_by_uuid(gpu.uuid.as_str())
        .map_err(|e| format!("NVML does not list it after the reset: {e}"))?;
    if device.is_drain_enabled(None).unwrap_or(false) {
        device
            .set_drain(false, None)
            .map_err(|e| format!("NVML cannot take it out of the drain state: {e}"))?;
    }
    device
        .name()
        .map_err(|e| format!("NVML cannot read it after the reset: {e}"))?;
    if persistent {
        device
            .set_persistent(true)
            .map_err(|e| format!("reset, but persistence mode cannot be turned back on: {e}"))?;
    }
    Ok(())
}
