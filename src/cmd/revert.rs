//! `gpuprov revert`: take back what gpuprov added.

use crate::cli::{ChangeArgs, ReportFormat};
use crate::converge::{Inputs, revert};
use crate::{Error, exit};

use super::print;

pub fn run_revert(args: &ChangeArgs) -> Result<i32, Error> {
    let report = revert(
        &Inputs::load(&super::node_options(&args.node))?,
        args.lock_timeout,
    )?;
    print(&match args.output {
        ReportFormat::Json => serde_json::to_string_pretty(&report).expect("serializes") + "\n",
        ReportFormat::Text => format!(
            "{}\nstatic pods: {}\nCDI specs: {}\nlabels: {}\n",
            report.containerd.summary,
            if report.static_pods_removed.is_empty() {
                "none to remove".to_string()
            } else {
                format!("removed {}", report.static_pods_removed.join(", "))
            },
            if report.cdi_specs_removed.is_empty() {
                "none to remove".to_string()
            } else {
                format!("removed {}", report.cdi_specs_removed.join(", "))
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
