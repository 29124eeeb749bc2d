//! The validator's CRI path on Debian's real containerd and runc (the node
//! of tests/support/cri_node.rs, a local image, no registry, no CNI): how
//! long a validation takes (pod sandbox, container, exit, cleanup), timed
//! as the whole `gpuprov apply` that runs it, against the same apply once
//! the pass is remembered.
//!
//! Run with `cargo bench --bench cri` as root (`cargo test` runs a small
//! version; without root it says so and measures nothing).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use support::cri_node::Node;

const COMMAND: &str = "  command: [\"/bin/sh\", \"-c\", \"echo GPU 0: benchmark\"]\n";

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: containerd needs root (benches/run.sh runs as root)");
        return;
    }
    let node = Node::start(true);
    let started = std::time::Instant::now();
    let (code, _, stderr) = node.apply(COMMAND);
    assert_eq!(code, 0, "{stderr}");
    println!(
        "first apply on a fresh node (config edit, containerd restart, CRI validation): {} ms",
        started.elapsed().as_millis()
    );

    let marker = node.root().join("run/gpuprov/validations/cri.json");
    let runs = common::runs(10);
    let (validating, validating_p90) = common::measure(runs, || {
        std::fs::remove_file(&marker).unwrap();
        let (code, report, stderr) = node.apply(COMMAND);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(support::steps(&report)["validator"].0, "change");
    });
    let (converged, converged_p90) = common::measure(runs, || {
        let (code, report, _) = node.apply(COMMAND);
        assert_eq!(code, 0);
        assert_eq!(support::steps(&report)["validator"].0, "unchanged");
    });
    println!(
        "apply with a CRI validation (sandbox, container, exit 0, cleanup; local image): median {} ms, p90 {} ms ({runs} runs)",
        validating.as_millis(),
        validating_p90.as_millis()
    );
    println!(
        "apply with the pass remembered (no container): median {} ms, p90 {} ms",
        converged.as_millis(),
        converged_p90.as_millis()
    );
    println!(
        "  → the validation itself: about {} ms",
        validating.saturating_sub(converged).as_millis()
    );
}
