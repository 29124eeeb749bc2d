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
use crate::cli::{Cli, Command};

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<i32, Error> {
    match cli.command {
        Command::Plan(args) => plan::run_plan(&args),
        Command::Apply(args) => apply::run_apply(&args),
        Command::States(args) => states::run_states(&args),
        Command::Revert(args) => revert::run_revert(&args),
        Command::Run(args) => crate::daemon::run(&args.options()),
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
