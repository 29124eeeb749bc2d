//! The one table from a state's `handler` to the capability that runs it:
//! how it observes the node, and what it takes away when it is disabled
//! or opted out. The executor walks the plan through this table and knows
//! no capability by name; a new capability adds its folder, its state
//! YAML, its spec section, its `Handler` and one entry here.

use crate::catalog::Handler;
use crate::spec::ExporterMode;
use crate::step::{Change, Observation, StepContext, StepError};
use crate::{cdi, containerd, driver, exec_state, gpu, mig, operands, telemetry, toolkit};

type Observe = fn(&StepContext) -> Result<Observation, StepError>;
type Withdraw = fn(&StepContext) -> Result<Vec<Change>, StepError>;

/// What a step's handler does, as functions of its context.
pub struct Capability {
    /// Looks at the node: the outcome now, and the changes that would
    /// converge it.
    pub observe: Observe,
    /// What a disabled or opted-out step takes away from the node (an
    /// operand's static pod); most leave things as they are.
    pub withdraw: Withdraw,
}

fn leave_as_is(_: &StepContext) -> Result<Vec<Change>, StepError> {
    Ok(Vec::new())
}

pub fn capability(handler: Handler) -> Capability {
    use operands::Operand;
    let (observe, withdraw): (Observe, Withdraw) = match handler {
        Handler::DetectGpu => (|ctx| Ok(gpu::observe(ctx)), leave_as_is),
        Handler::Driver => (driver::observe, leave_as_is),
        Handler::ContainerToolkit => (toolkit::observe, leave_as_is),
        Handler::ContainerdRuntime => (containerd::observe, leave_as_is),
        Handler::GpuHealth => (gpu::gfd::observe_health, leave_as_is),
        Handler::Mig => (mig::observe, leave_as_is),
        Handler::Cdi => (cdi::observe, cdi::withdraw),
        Handler::GpuFeatureDiscovery => (gpu::gfd::observe, |ctx| {
            operands::withdraw(ctx, Operand::GpuFeatureDiscovery)
        }),
        Handler::DevicePlugin => (
            |ctx| operands::observe(ctx, Operand::DevicePlugin),
            |ctx| operands::withdraw(ctx, Operand::DevicePlugin),
        ),
        Handler::DcgmExporter => (
            |ctx| match ctx.spec.dcgm_exporter_mode {
                ExporterMode::Operand => operands::observe(ctx, Operand::DcgmExporter),
                ExporterMode::Builtin => telemetry::observe_builtin(ctx),
            },
            |ctx| operands::withdraw(ctx, Operand::DcgmExporter),
        ),
        Handler::Validator => (operands::validate::observe, leave_as_is),
        Handler::Exec => (exec_state::observe, leave_as_is),
    };
    Capability { observe, withdraw }
}
