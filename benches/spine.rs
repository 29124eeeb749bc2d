//! Benchmarks of the spine, printed as medians: compiling the plan, and a
//! whole `plan` and `apply` on the converged 8-GPU fixture host.
//!
//! Run with `cargo bench --bench spine`. Each figure is the median (and p90)
//! of many runs in one process, so runs on a noisy machine stay comparable.

use std::path::PathBuf;
use std::time::Duration;

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::measure;

use gpuprov::catalog::Catalog;
use gpuprov::converge::{Inputs, apply, plan};
use gpuprov::diagnostic::Source;
use gpuprov::plan::Graph;
use gpuprov::spec::Spec;

fn report(name: &str, runs: usize, (median, p90): (Duration, Duration)) {
    println!("{name:<58} {runs:>6} runs  median {median:>10.2?}  p90 {p90:>10.2?}");
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then one run of each keeps the benchmark compiled and working.
    let runs = common::runs;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let site_states = repo.join("fixtures/specs/site-states.yaml");
    let spec_text = std::fs::read_to_string(&site_states).unwrap();

    report(
        "parse spec + load catalogue + compile plan (site-states)",
        runs(5000),
        measure(runs(5000), || {
            let spec = Spec::parse(&Source {
                name: "site-states.yaml".into(),
                text: spec_text.clone(),
            })
            .unwrap();
            let states = Catalog::load(None)
                .unwrap()
                .with_user_states(&spec)
                .unwrap();
            std::hint::black_box(Graph::compile(states).unwrap());
        }),
    );

    let dir = tempfile::tempdir().unwrap();
    support::copy_tree(
        &repo.join("fixtures/hosts/h100x8-nvswitch-preinstalled"),
        dir.path(),
    );
    for (label, config, runs) in [
        ("default spec", None, runs(500)),
        (
            "site-states spec (2 exec checks)",
            Some(site_states.clone()),
            runs(200),
        ),
    ] {
        let inputs = Inputs::load(&common::node_args(dir.path(), config, None)).unwrap();
        let first = apply(&inputs, Duration::from_secs(5)).unwrap();
        assert!(first.converged, "the fixture converges");
        report(
            &format!("plan, converged 8-GPU host, {label}"),
            runs,
            measure(runs, || {
                std::hint::black_box(plan(&inputs).unwrap());
            }),
        );
        report(
            &format!("apply, converged 8-GPU host, {label}"),
            runs,
            measure(runs, || {
                let report = apply(&inputs, Duration::from_secs(5)).unwrap();
                assert!(report.steps.iter().all(|s| s.changes.is_empty()));
            }),
        );
    }
}
