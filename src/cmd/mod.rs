//! The CLI's subcommands, one file each: each runs the converge pipeline
//! (`converge.rs`) and prints what it returns, as text or JSON, with the
//! exit code the README documents.

mod apply;
mod facts;
mod plan;
mod revert;
mod states;

pub use facts::{FactsReport, facts_report};

use std::io::Write;

use crate::Error;
use crate::cli::{Cli, Command, NodeArgs, RunArgs};
use crate::converge::NodeOptions;
use crate::daemon::DaemonOptions;

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<i32, Error> {
    match cli.command {
        Command::Plan(args) => plan::run_plan(&args),
        Command::Apply(args) => apply::run_apply(&args),
        Command::States(args) => states::run_states(&args),
        Command::Revert(args) => revert::run_revert(&args),
        Command::Run(args) => crate::daemon::run(&daemon_options(&args)),
        Command::Facts(args) => facts::run_facts(&args),
    }
}

/// Writes to stdout; a closed pipe is an error, not a panic.
fn print(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(Error::Stdout)
}

/// The pipeline's own input, from `plan`'s and `apply`'s flags: the CLI is
/// the only layer that knows clap.
pub fn node_options(args: &NodeArgs) -> NodeOptions {
    NodeOptions {
        config: args.config.clone(),
        host_root: args.host_root.clone(),
        host_exec: args.host_exec,
        states_dir: args.states_dir.clone(),
        node_labels: args.node_labels.clone(),
        node_labels_file: args.node_labels_file.clone(),
        labels_sink: args.labels_sink,
        kubeconfig: args.kubeconfig.clone(),
        node_name: args.node_name.clone(),
        nvml_lib: args.nvml_lib.clone(),
        command_timeout: args.command_timeout,
    }
}

/// The daemon's own input, from `run`'s flags.
fn daemon_options(args: &RunArgs) -> DaemonOptions {
    DaemonOptions {
        node: node_options(&args.node),
        listen: args.listen,
        drift_interval: args.drift_interval,
        pending_interval: args.pending_interval,
        slot_wait_interval: args.slot_wait_interval,
        watch_timeout: args.watch_timeout,
        lock_timeout: args.lock_timeout,
    }
}
