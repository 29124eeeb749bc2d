//! `gpuprov apply`: converge once, or `--wait` until converged.

use crate::cli::{ApplyArgs, ReportFormat};
use crate::converge::{Inputs, apply, apply_until_converged};
use crate::labels::LabelTarget;
use crate::plan::{Summary, steps_table};
use crate::report::RunReport;
use crate::{Error, exit};

use super::print;

pub fn run_apply(args: &ApplyArgs) -> Result<i32, Error> {
    let change = &args.change;
    let inputs = Inputs::load(&super::node_options(&change.node))?;
    crate::interrupt::install();
    let report = if args.wait {
        apply_until_converged(&inputs, change.lock_timeout, args.timeout)?
    } else {
        apply(&inputs, change.lock_timeout)?
    };
    let text = match change.output {
        ReportFormat::Text => apply_text(&report),
        ReportFormat::Json => serde_json::to_string_pretty(&report).expect("serializes") + "\n",
    };
    // With labels on stdout, the report goes to stderr so the two don't mix.
    if inputs.labels_sink == LabelTarget::Stdout {
        eprint!("{text}");
    } else {
        print(&text)?;
    }
    Ok(if report.interrupted {
        tracing::warn!("interrupted: stopped after the change in progress");
        exit::INTERRUPTED
    } else if report.converged {
        exit::OK
    } else {
        exit::NOT_CONVERGED
    })
}

fn apply_text(report: &RunReport) -> String {
    let mut out = steps_table(&report.steps);
    let state = if report.labels_changed {
        "changed"
    } else {
        "unchanged"
    };
    out.push_str(&format!("labels → {} ({state})\n", report.label_sink));
    for note in &report.label_notes {
        out.push_str(&format!("    {note}\n"));
    }
    for error in &report.errors {
        out.push_str(&format!("error: {error}\n"));
    }
    let s = Summary::of(&report.steps);
    let verdict = if report.interrupted {
        "INTERRUPTED (SIGTERM or SIGINT) after the change in progress, labels not published"
    } else if report.converged {
        "converged"
    } else {
        "NOT converged"
    };
    out.push_str(&format!(
        "Apply: {verdict}: {} changed, {} unchanged, {} skipped, {} waiting, {} blocked, {} failed ({} ms).\n",
        s.change, s.unchanged, s.skip, s.wait, s.block, s.fail, report.duration_ms
    ));
    out
}
