//! The NVIDIA kernel driver: detection (installing comes later).

pub mod detect;

use std::collections::BTreeMap;

use crate::exec::{Gate, Observation, Outcome, StepContext, StepError};

/// The GPU Operator's label for a node whose driver it must not deploy.
pub const DEPLOY_DRIVER_LABEL: &str = "nvidia.com/gpu.deploy.driver";

/// The `driver` handler. A loaded driver is kept as found (`preinstalled`),
/// as the GPU Operator's driver pod does; no driver means `absent`, which
/// blocks everything that needs one.
pub fn observe(ctx: &StepContext) -> Result<Observation, StepError> {
    let loaded =
        detect::detect(ctx.host).map_err(|e| StepError::Observe(crate::exec::error_chain(&e)))?;
    let Some(driver) = loaded else {
        let bound = bound_drivers(ctx);
        let mut reason = "no NVIDIA kernel driver is loaded".to_string();
        if !bound.is_empty() {
            reason.push_str(&format!(" (GPUs bound to {bound})"));
        }
        reason.push_str(if ctx.spec.driver.enabled {
            "; this gpuprov cannot install drivers yet: pre-install one"
        } else {
            "; driver.enabled is false, so gpuprov will not install one"
        });
        let mut obs = Observation::new(Outcome::Absent, reason.clone());
        obs.gate = Some(Gate::Block(format!("driver is absent: {reason}")));
        return Ok(obs);
    };

    let kind = if driver.open_kernel_module {
        "open"
    } else {
        "proprietary"
    };
    let mut reason = format!("NVIDIA {} ({kind} kernel module) is loaded", driver.version);
    if let Some(wanted) = &ctx.spec.driver.version
        && *wanted != driver.version
    {
        reason.push_str(&format!(
            "; driver.version asks {wanted}, the pre-installed driver is kept"
        ));
    }
    let elsewhere: Vec<String> = ctx
        .facts
        .gpus()
        .filter(|g| g.driver.as_deref() != Some("nvidia"))
        .map(|g| {
            format!(
                "{} ({})",
                g.address,
                g.driver.as_deref().unwrap_or("no driver")
            )
        })
        .collect();
    if !elsewhere.is_empty() {
        reason.push_str(&format!(
            "; GPUs not bound to nvidia are left alone: {}",
            elsewhere.join(", ")
        ));
    }
    let mut obs = Observation::new(Outcome::Preinstalled, reason);
    obs.labels
        .insert(DEPLOY_DRIVER_LABEL.to_string(), "pre-installed".to_string());
    obs.details = serde_json::to_value(&driver).expect("serializes");
    Ok(obs)
}

/// "nouveau ×1, vfio-pci ×2" for GPUs that some other driver holds.
fn bound_drivers(ctx: &StepContext) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for gpu in ctx.facts.gpus() {
        if let Some(driver) = gpu.driver.as_deref() {
            *counts.entry(driver).or_default() += 1;
        }
    }
    counts
        .iter()
        .map(|(d, n)| format!("{d} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
