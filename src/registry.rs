//! The one table from a state's `handler` to the capability that runs it:
//! how it observes the node, what it takes away when it is disabled or
//! opted out, and what `revert` takes back. The executor and the revert
//! walk go through this table and know no capability by name. A new
//! capability adds its folder, its state file, its spec section and one
//! entry here.

use crate::catalog::CapabilityId;
use crate::operands::Operand;
use crate::report::RevertReport;
use crate::spec::{ExporterMode, PluginMode};
use crate::state::{Change, Observation, RevertContext, StateContext, StateError};
use crate::{
    cdi, containerd, dra, driver, exec, fabric, gpu, mig, operands, peermem, persistence,
    remediation, telemetry, toolkit,
};

type Observe = fn(&StateContext) -> Result<Observation, StateError>;
type Withdraw = fn(&StateContext) -> Result<Vec<Change>, StateError>;
pub type Revert = fn(&RevertContext, &mut RevertReport) -> Result<(), StateError>;

/// Every capability, by the `handler` name state files give it.
static CAPABILITIES: &[(&str, Capability)] = &[
    (
        "detect-gpu",
        Capability::observing(detect_gpu).despite_operands_opt_out(),
    ),
    ("driver", Capability::observing(driver::observe)),
    ("fabric-manager", Capability::observing(fabric::observe)),
    ("persistence", Capability::observing(persistence::observe)),
    ("peermem", Capability::observing(peermem::observe)),
    ("container-toolkit", Capability::observing(toolkit::observe)),
    (
        "containerd-runtime",
        Capability::observing(containerd::observe).reverting(containerd::revert::revert),
    ),
    (
        "gpu-health",
        Capability::observing(gpu::gfd::observe_health),
    ),
    (
        "gpu-remediation",
        Capability::observing(remediation::observe).withdrawing(remediation::withdraw),
    ),
    ("mig", Capability::observing(mig::observe)),
    (
        "cdi",
        Capability::observing(cdi::observe)
            .withdrawing(cdi::withdraw)
            .reverting(cdi::revert),
    ),
    (
        "gpu-feature-discovery",
        Capability::observing(gpu::gfd::observe)
            .withdrawing(withdraw_gfd)
            .reverting(operands::revert),
    ),
    (
        "device-plugin",
        Capability::observing(observe_device_plugin)
            .withdrawing(withdraw_device_plugin)
            .reverting(revert_device_plugin),
    ),
    (
        "dcgm-exporter",
        Capability::observing(observe_dcgm_exporter)
            .withdrawing(withdraw_dcgm_exporter)
            .reverting(operands::revert),
    ),
    (
        "validator",
        Capability::observing(operands::validate::observe).reverting(operands::validate::revert),
    ),
    ("exec", Capability::observing(exec::observe)),
];

/// What a state's capability does, as functions of its context.
pub struct Capability {
    /// Looks at the node: the outcome now, and the changes that would
    /// converge it.
    pub observe: Observe,
    /// What a disabled or opted-out state takes away from the node (an
    /// operand's static pod); most leave things as they are.
    pub withdraw: Withdraw,
    /// What `revert` takes back of what the capability wrote, adding to
    /// the report (capabilities that share files share one revert, made
    /// once); `None` leaves the node as it is (installed packages stay).
    pub revert: Option<Revert>,
    /// Whether `nvidia.com/gpu.deploy.operands=false` leaves it alone
    /// (detecting the GPU is no operand).
    pub runs_when_operands_opted_out: bool,
}

impl Capability {
    const fn observing(observe: Observe) -> Capability {
        Capability {
            observe,
            withdraw: leave_as_is,
            revert: None,
            runs_when_operands_opted_out: false,
        }
    }

    const fn withdrawing(self, withdraw: Withdraw) -> Capability {
        Capability { withdraw, ..self }
    }

    const fn reverting(self, revert: Revert) -> Capability {
        Capability {
            revert: Some(revert),
            ..self
        }
    }

    const fn despite_operands_opt_out(self) -> Capability {
        Capability {
            runs_when_operands_opted_out: true,
            ..self
        }
    }
}

/// The capability a state names; `None` for a name no capability has
/// (the catalogue admits only names the built-in states use, and `exec`).
pub fn capability(id: &CapabilityId) -> Option<&'static Capability> {
    CAPABILITIES
        .iter()
        .find(|(name, _)| *name == id.name())
        .map(|(_, capability)| capability)
}

/// Every capability's name, in the table's order.
pub fn names() -> impl DoubleEndedIterator<Item = &'static str> {
    CAPABILITIES.iter().map(|(name, _)| *name)
}

fn leave_as_is(_: &StateContext) -> Result<Vec<Change>, StateError> {
    Ok(Vec::new())
}

fn detect_gpu(ctx: &StateContext) -> Result<Observation, StateError> {
    Ok(gpu::observe(ctx))
}

/// NVIDIA's device plugin, or gpuprov's DRA plugin: whichever runs, the
/// other's traces go.
fn observe_device_plugin(ctx: &StateContext) -> Result<Observation, StateError> {
    match ctx.spec.device_plugin_mode {
        PluginMode::Operand => {
            let mut obs = operands::observe(ctx, Operand::DevicePlugin)?;
            let withdrawn = dra::withdraw(ctx)?;
            if !withdrawn.is_empty() && obs.changes.is_empty() {
                obs.on_change = obs.outcome;
            }
            obs.changes.extend(withdrawn);
            Ok(obs)
        }
        PluginMode::Dra => dra::observe(ctx),
    }
}

fn withdraw_device_plugin(ctx: &StateContext) -> Result<Vec<Change>, StateError> {
    let mut changes = operands::withdraw(ctx, Operand::DevicePlugin)?;
    changes.extend(dra::withdraw(ctx)?);
    Ok(changes)
}

fn revert_device_plugin(
    ctx: &crate::state::RevertContext,
    report: &mut RevertReport,
) -> Result<(), StateError> {
    operands::revert(ctx, report)?;
    dra::revert(ctx, report)
}

fn observe_dcgm_exporter(ctx: &StateContext) -> Result<Observation, StateError> {
    match ctx.spec.dcgm_exporter_mode {
        ExporterMode::Operand => operands::observe(ctx, Operand::DcgmExporter),
        ExporterMode::Builtin => telemetry::observe_builtin(ctx),
    }
}

fn withdraw_dcgm_exporter(ctx: &StateContext) -> Result<Vec<Change>, StateError> {
    operands::withdraw(ctx, Operand::DcgmExporter)
}

fn withdraw_gfd(ctx: &StateContext) -> Result<Vec<Change>, StateError> {
    operands::withdraw(ctx, Operand::GpuFeatureDiscovery)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    #[test]
    fn every_capability_a_state_may_name_has_its_code_and_every_entry_a_state() {
        let known: Vec<String> = Catalog::builtin()
            .capabilities()
            .iter()
            .map(|id| id.name().to_string())
            .collect();
        let table: Vec<String> = names().map(str::to_string).collect();
        assert_eq!(known, table);
    }
}
