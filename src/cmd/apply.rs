//! `gpuprov apply`: converge once, or `--wait` until converged.

use std::time::Duration;

use crate::cli::{ApplyArgs, ReportFormat};
use crate::converge::{Inputs, apply, waiting_may_help};
use crate::labels::LabelTarget;
use crate::plan::{Summary, steps_table};
use crate::report::{Action, RunReport};
use crate::{Error, exit};

use super::print;

pub fn run_apply(args: &ApplyArgs) -> Result<i32, Error> {
    let change = &args.change;
    let inputs = Inputs::load(&change.node)?;
    crate::interrupt::install();
    let deadline = std::time::Instant::now() + args.timeout;
    let mut delay = Duration::from_secs(1);
    let report = loop {
        // Under --wait, a run that errors (the API server away, the lock
        // held) is one more try, not the end.
        let result = apply(&inputs, change.lock_timeout);
        let done = match &result {
            Ok(report) => report.converged,
            Err(_) => false,
        };
        let out_of_time = std::time::Instant::now() + delay > deadline;
        // Waiting helps only with what changes by itself: operands
        // starting, an API server coming back, another run's lock.
        let hopeless = match &result {
            Ok(report) => report.cannot_converge_by_waiting(),
            Err(e) if waiting_may_help(e) => None,
            Err(e) => Some(crate::step::error_chain(e)),
        };
        if args.wait
            && !done
            && !out_of_time
            && let Some(why) = &hopeless
        {
            tracing::error!("not waiting: the node cannot converge by waiting: {why}");
        }
        if done || !args.wait || out_of_time || hopeless.is_some() || crate::interrupt::requested()
        {
            let report = result?;
            if args.wait && !report.converged && !report.interrupted && hopeless.is_none() {
                let waiting: Vec<String> = report
                    .steps
                    .iter()
                    .filter(|s| matches!(s.action, Action::Fail | Action::Block | Action::Wait))
                    .map(|s| format!("{} is {}: {}", s.name, s.outcome.as_str(), s.reason))
                    .collect();
                tracing::error!(
                    "not converged after {}: {}",
                    humantime::format_duration(args.timeout),
                    waiting.join("; ")
                );
            }
            break report;
        }
        match &result {
            Ok(report) => {
                let blocking: Vec<&str> = report
                    .steps
                    .iter()
                    .filter(|s| matches!(s.action, Action::Fail | Action::Block | Action::Wait))
                    .map(|s| s.name.as_str())
                    .collect();
                tracing::warn!(
                    "not converged yet ({}); trying again in {delay:?}",
                    blocking.join(", ")
                );
            }
            Err(e) => tracing::warn!("{}; trying again in {delay:?}", crate::step::error_chain(e)),
        }
        std::thread::sleep(delay);
        // Waiting on an operand's pod is progress: keep looking every
        // couple of seconds rather than backing off.
        let waiting = matches!(&result, Ok(report) if report.only_waiting());
        delay = if waiting {
            Duration::from_secs(2)
        } else {
            (delay * 2).min(Duration::from_secs(30))
        };
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
