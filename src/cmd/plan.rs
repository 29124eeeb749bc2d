//! `gpuprov plan`: what `apply` would change, as a table, a diff, DOT or JSON.

use crate::cli::{PlanArgs, PlanFormat};
use crate::converge::{Inputs, plan};
use crate::{Error, exit};

use super::print;

pub fn run_plan(args: &PlanArgs) -> Result<i32, Error> {
    let report = plan(&Inputs::load(&super::node_options(&args.node))?)?;
    print(&match args.output {
        PlanFormat::Text => report.to_text(),
        PlanFormat::Json => report.to_json(),
        PlanFormat::Dot => report.to_dot(),
    })?;
    Ok(if args.detailed_exitcode && report.has_changes() {
        exit::CHANGES_PENDING
    } else {
        exit::OK
    })
}
