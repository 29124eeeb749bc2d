//! The one table from a state's `handler` to the capability that runs it:
//! how it observes the node, what it takes away when it is disabled or
//! opted out, and what `revert` takes back. The executor and the revert
//! walk go through this table and know no capability by name; a new
//! capability adds its folder, its state YAML, its spec section, its
//! `CapabilityId` and one entry here.

use crate::catalog::CapabilityId;
use crate::report::RevertReport;
use crate::spec::ExporterMode;
use crate::state::{Change, Observation, RevertContext, StateContext, StateError};
use crate::{cdi, containerd, driver, exec, gpu, mig, operands, telemetry, toolkit};

type Observe = fn(&StateContext) -> Result<Observation, StateError>;
type Withdraw = fn(&StateContext) -> Result<Vec<Change>, StateError>;
pub type Revert = fn(&RevertContext, &mut RevertReport) -> Result<(), StateError>;

/// What a step's handler does, as functions of its context.
pub struct Capability {
    /// Looks at the node: the outcome now, and the changes that would
    /// converge it.
    pub observe: Observe,
    /// What a disabled or opted-out step takes away from the node (an
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

fn leave_as_is(_: &StateContext) -> Result<Vec<Change>, StateError> {
    Ok(Vec::new())
}

pub fn capability(handler: CapabilityId) -> Capability {
    use operands::Operand;
    let (observe, withdraw, revert): (Observe, Withdraw, Option<Revert>) = match handler {
        CapabilityId::DetectGpu => (|ctx| Ok(gpu::observe(ctx)), leave_as_is, None),
        CapabilityId::Driver => (driver::observe, leave_as_is, None),
        CapabilityId::ContainerToolkit => (toolkit::observe, leave_as_is, None),
        CapabilityId::ContainerdRuntime => (
            containerd::observe,
            leave_as_is,
            Some(containerd::revert::revert),
        ),
        CapabilityId::GpuHealth => (gpu::gfd::observe_health, leave_as_is, None),
        CapabilityId::Mig => (mig::observe, leave_as_is, None),
        CapabilityId::Cdi => (cdi::observe, cdi::withdraw, Some(cdi::revert)),
        CapabilityId::GpuFeatureDiscovery => (
            gpu::gfd::observe,
            |ctx| operands::withdraw(ctx, Operand::GpuFeatureDiscovery),
            Some(operands::revert),
        ),
        CapabilityId::DevicePlugin => (
            |ctx| operands::observe(ctx, Operand::DevicePlugin),
            |ctx| operands::withdraw(ctx, Operand::DevicePlugin),
            Some(operands::revert),
        ),
        CapabilityId::DcgmExporter => (
            |ctx| match ctx.spec.dcgm_exporter_mode {
                ExporterMode::Operand => operands::observe(ctx, Operand::DcgmExporter),
                ExporterMode::Builtin => telemetry::observe_builtin(ctx),
            },
            |ctx| operands::withdraw(ctx, Operand::DcgmExporter),
            Some(operands::revert),
        ),
        CapabilityId::Validator => (
            operands::validate::observe,
            leave_as_is,
            Some(operands::validate::revert),
        ),
        CapabilityId::Exec => (exec::observe, leave_as_is, None),
    };
    Capability {
        observe,
        withdraw,
        revert,
        runs_when_operands_opted_out: handler == CapabilityId::DetectGpu,
    }
}
