//! The one table from a state's `handler` to the capability that runs it:
//! how it observes the node, what it takes away when it is disabled or
//! opted out, and what `revert` takes back. The executor and the revert
//! walk go through this table and know no capability by name; a new
//! capability adds its folder, its state YAML, its spec section, its
//! `Handler` and one entry here.

use crate::catalog::Handler;
use crate::report::RevertReport;
use crate::spec::ExporterMode;
use crate::step::{Change, Observation, RevertContext, StepContext, StepError};
use crate::{cdi, containerd, driver, exec_state, gpu, mig, operands, telemetry, toolkit};

type Observe = fn(&StepContext) -> Result<Observation, StepError>;
type Withdraw = fn(&StepContext) -> Result<Vec<Change>, StepError>;
pub type Revert = fn(&RevertContext, &mut RevertReport) -> Result<(), StepError>;

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

fn leave_as_is(_: &StepContext) -> Result<Vec<Change>, StepError> {
    Ok(Vec::new())
}

pub fn capability(handler: Handler) -> Capability {
    use operands::Operand;
    let (observe, withdraw, revert): (Observe, Withdraw, Option<Revert>) = match handler {
        Handler::DetectGpu => (|ctx| Ok(gpu::observe(ctx)), leave_as_is, None),
        Handler::Driver => (driver::observe, leave_as_is, None),
        Handler::ContainerToolkit => (toolkit::observe, leave_as_is, None),
        Handler::ContainerdRuntime => (
            containerd::observe,
            leave_as_is,
            Some(containerd::revert::revert),
        ),
        Handler::GpuHealth => (gpu::gfd::observe_health, leave_as_is, None),
        Handler::Mig => (mig::observe, leave_as_is, None),
        Handler::Cdi => (cdi::observe, cdi::withdraw, Some(cdi::revert)),
        Handler::GpuFeatureDiscovery => (
            gpu::gfd::observe,
            |ctx| operands::withdraw(ctx, Operand::GpuFeatureDiscovery),
            Some(operands::revert),
        ),
        Handler::DevicePlugin => (
            |ctx| operands::observe(ctx, Operand::DevicePlugin),
            |ctx| operands::withdraw(ctx, Operand::DevicePlugin),
            Some(operands::revert),
        ),
        Handler::DcgmExporter => (
            |ctx| match ctx.spec.dcgm_exporter_mode {
                ExporterMode::Operand => operands::observe(ctx, Operand::DcgmExporter),
                ExporterMode::Builtin => telemetry::observe_builtin(ctx),
            },
            |ctx| operands::withdraw(ctx, Operand::DcgmExporter),
            Some(operands::revert),
        ),
        Handler::Validator => (
            operands::validate::observe,
            leave_as_is,
            Some(operands::validate::revert),
        ),
        Handler::Exec => (exec_state::observe, leave_as_is, None),
    };
    Capability {
        observe,
        withdraw,
        revert,
        runs_when_operands_opted_out: handler == Handler::DetectGpu,
    }
}
