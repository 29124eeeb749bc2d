//! The `exec` handler: a user's own state, a `check` command (exit 0 means
//! converged) and an `apply` command, both run in the host root through its
//! shell exactly as written.

use crate::exec::{Change, Observation, Outcome, StepContext, StepError};

pub fn observe(ctx: &StepContext) -> Result<Observation, StepError> {
    let check = ctx
        .state
        .check
        .as_deref()
        .expect("exec states have a check (catalogue validates)");
    let record = ctx.host.run_shell(check)?;
    let passed = record.success();
    let summary = record.failure_summary();
    let mut obs = if passed {
        Observation::new(Outcome::Ready, "check passes")
    } else if let Some(apply) = &ctx.state.apply {
        let mut obs = Observation::new(Outcome::Pending, format!("check {summary}"));
        obs.on_change = Outcome::Configured;
        obs.changes.push(Change::Run {
            argv: vec!["/bin/sh".to_string(), "-c".to_string(), apply.clone()],
            display: apply.clone(),
        });
        obs
    } else {
        Observation::new(
            Outcome::Failed,
            format!("check {summary} (no apply command)"),
        )
    };
    obs.commands.push(record);
    Ok(obs)
}
