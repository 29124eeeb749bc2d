//! The `persistence` capability: keep the driver initialised while no
//! process uses a GPU, so a pod's first CUDA call does not pay for
//! bringing the GPUs up (seconds on an 8-GPU board) and the GPU state
//! survives between jobs. NVIDIA's `nvidia-persistenced` does it; where a
//! host has no daemon, the driver's legacy persistence mode
//! (`nvidia-smi -pm 1`) does, until the driver unloads.

use crate::driver::service;
use crate::host::process;
use crate::state::{Change, Observation, Outcome, StateContext, StateError};

pub const PROGRAM: &str = "nvidia-persistenced";
/// The unit the distributions' driver packages install.
pub const SERVICE: &str = "nvidia-persistenced";

/// The `persistence` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let host = ctx.host;
    // NVML's word, where it can give it: the GPUs whose mode is off.
    let off: Option<Vec<String>> = ctx.facts.nvml(host).as_ref().ok().map(|inventory| {
        inventory
            .devices
            .iter()
            .filter(|d| !d.persistence_mode)
            .map(|d| d.pci_bus_id.clone())
            .collect()
    });
    let running = process::running(host, PROGRAM)?;
    if let Some(pid) = running.first() {
        let mut reason = format!("{PROGRAM} runs (pid {pid})");
        if let Some(off) = off.filter(|off| !off.is_empty()) {
            // Someone runs it with --no-persistence-mode, or turned GPUs
            // off with nvidia-smi: theirs to decide.
            reason.push_str(&format!(
                "; NVML says persistence mode is off on {}",
                off.join(", ")
            ));
        }
        return Ok(Observation::new(Outcome::Ready, reason));
    }
    if let Some(binary) = process::on_path(host, PROGRAM)? {
        let mut obs = Observation::new(
            Outcome::Absent,
            format!("{PROGRAM} is installed ({binary}) but not running"),
        );
        obs.on_change = Outcome::Ready;
        obs.changes.push(service::start(
            host,
            SERVICE,
            vec![binary, "--persistence-mode".to_string()],
        )?);
        return Ok(obs);
    }
    let Some(smi) = process::on_path(host, "nvidia-smi")? else {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "neither {PROGRAM} nor nvidia-smi is in the host to keep the GPUs initialised: install the driver's utilities, or set persistence.enabled: false"
            ),
        ));
    };
    let mut commands = Vec::new();
    let off = match off {
        Some(off) => off,
        // Without NVML, nvidia-smi says (`Enabled` or `Disabled` a GPU).
        None => {
            let record = host.run(&[
                smi.clone(),
                "--query-gpu=persistence_mode".to_string(),
                "--format=csv,noheader".to_string(),
            ])?;
            let off = if record.success() {
                Some(
                    record
                        .stdout
                        .lines()
                        .filter(|line| !line.trim().is_empty())
                        .enumerate()
                        .filter(|(_, line)| line.trim() != "Enabled")
                        .map(|(index, _)| format!("GPU {index}"))
                        .collect(),
                )
            } else {
                None
            };
            let failure = record.failure_summary();
            commands.push(record);
            off.ok_or_else(|| {
                StateError::operator(format!(
                    "`{smi} --query-gpu=persistence_mode` failed: {failure}"
                ))
            })?
        }
    };
    let mut obs = if off.is_empty() {
        Observation::new(
            Outcome::Ready,
            format!(
                "persistence mode is on for every GPU (no {PROGRAM} in the host; the driver keeps it until it unloads)"
            ),
        )
    } else {
        let mut obs = Observation::new(
            Outcome::Absent,
            format!(
                "no {PROGRAM} in the host, and persistence mode is off on {}",
                off.join(", ")
            ),
        );
        obs.on_change = Outcome::Ready;
        obs.changes.push(Change::Run {
            argv: vec![smi.clone(), "-pm".to_string(), "1".to_string()],
            display: format!("{smi} -pm 1"),
        });
        obs
    };
    obs.commands = commands;
    Ok(obs)
}
