//! The `exec` capability: a user's own state, a `check` command (exit 0 means
//! converged) and an `apply` command, both run in the host root through its
//! shell exactly as written.

use crate::state::{Change, ErrorKind, Observation, Outcome, StateContext, StateError};

/// A user's check that fails may pass later (it may wait on something
/// outside gpuprov): its failures are transient, and `apply --wait` keeps
/// waiting on them.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let mut obs = check(ctx).map_err(|e| e.of_kind(ErrorKind::Transient))?;
    obs.failure_kind = ErrorKind::Transient;
    Ok(obs)
}

fn check(ctx: &StateContext) -> Result<Observation, StateError> {
    let check = ctx
        .state
        .check
        .as_deref()
        .expect("exec states have a check (catalogue validates)");
    let record = ctx.host.run_shell(check)?;
    let passed = record.success();
    let summary = record.failure_summary();
    // The outcome names the node's state, not this run's action, so a
    // converged state keeps its label from one run to the next.
    let converged = if ctx.state.apply.is_some() {
        Outcome::Configured
    } else {
        Outcome::Ready
    };
    let mut obs = if passed {
        Observation::new(converged, "check passes")
    } else if let Some(apply) = &ctx.state.apply {
        let mut obs = Observation::new(Outcome::Pending, format!("check {summary}"));
        obs.on_change = converged;
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
