//! A MIG layout change on the 8-GPU fake (fixtures/nvml/h100x8-mig.yaml):
//! how long gpuprov takes for it (the fake NVML answers at once, so this is
//! gpuprov's own time, not the GPU's), timed as the whole `gpuprov apply`
//! that makes it against the same apply once converged; and how many API
//! writes one change costs against the fake API server.
//!
//! The change's time includes the fake NVML's own bookkeeping: it rewrites
//! its state file after every instance it makes or destroys.
//!
//! Then GPU sharing: the API writes a device plugin config change costs
//! (time-slicing ×4 back to whole GPUs) until the node is converged again.
//!
//! Run with `cargo bench --bench mig` (`cargo test` runs a small version).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;

use support::fake_api::FakeApi;

const NODE: &str = "gpu-node-1";

fn apply(host: &Path, state: &Path, layout: &str, fake: Option<&FakeApi>) -> serde_json::Value {
    let mut cmd = support::gpuprov();
    cmd.env(
        "GPUPROV_FAKE_NVML",
        support::repo().join("fixtures/nvml/h100x8-mig.yaml"),
    )
    .env("GPUPROV_FAKE_NVML_STATE", state)
    .args(["apply", "--output", "json", "--host-exec", "prefix"])
    .arg("--nvml-lib")
    .arg(support::fake_nvml_library())
    .arg("--host-root")
    .arg(host);
    match fake {
        Some(fake) => {
            fake.set_label(NODE, "nvidia.com/mig.config", layout, "kubectl");
            cmd.args(["--node-name", NODE])
                .arg("--kubeconfig")
                .arg(fake.kubeconfig());
        }
        None => {
            cmd.args(["--labels-sink", "none", "--node-labels"])
                .arg(format!("nvidia.com/mig.config={layout}"));
        }
    }
    let output = cmd.output().unwrap();
    serde_json::from_slice(&output.stdout).unwrap()
}

fn mig_action(report: &serde_json::Value) -> String {
    support::steps(report)["mig"].0.clone()
}

fn main() {
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    let state = host.path().join("fake-nvml-state.yaml");
    // The node converged once (containerd's edit, the static pods).
    apply(host.path(), &state, "all-disabled", None);
    let runs = common::runs(10);
    let layouts = ["all-1g.10gb", "all-3g.40gb"];
    let mut turn = 0;
    let (change, change_p90) = common::measure(runs, || {
        turn += 1;
        let report = apply(host.path(), &state, layouts[turn % 2], None);
        assert_eq!(mig_action(&report), "change");
    });
    let (converged, converged_p90) = common::measure(runs, || {
        let report = apply(host.path(), &state, layouts[turn % 2], None);
        assert_eq!(mig_action(&report), "unchanged");
    });
    println!(
        "apply with a MIG layout change on 8 GPUs (8× 7 or 8× 2 MIG devices destroyed and created): median {} ms, p90 {} ms ({runs} runs)",
        change.as_millis(),
        change_p90.as_millis()
    );
    println!(
        "the same apply converged (layout read and compared, nothing made): median {} ms, p90 {} ms",
        converged.as_millis(),
        converged_p90.as_millis()
    );
    println!(
        "  → the layout change itself: about {} ms of gpuprov's time",
        change.saturating_sub(converged).as_millis()
    );

    // API writes: a converged node with its operands running, then one
    // layout change.
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    let state = host.path().join("fake-nvml-state.yaml");
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    for _ in 0..3 {
        apply(host.path(), &state, "all-disabled", Some(&fake));
    }
    fake.clear_log();
    let report = apply(host.path(), &state, "all-1g.10gb", Some(&fake));
    assert_eq!(mig_action(&report), "change");
    let writes = fake.writes();
    let count =
        |f: &dyn Fn(&support::fake_api::Logged) -> bool| writes.iter().filter(|w| f(w)).count();
    println!(
        "API writes for one layout change: {} ({} label PATCHes: the pause, the restore, and the run's own labels, GFD's MIG labels now describing 1g.10gb devices; {} GPUReady condition PATCHes, False while the device plugin has yet to offer the 56 MIG devices; {} node events)",
        writes.len(),
        count(&|w| w.uri.contains("/nodes/") && !w.uri.contains("/status")),
        count(&|w| w.uri.contains("/status")),
        count(&|w| w.uri.contains("/events")),
    );
    fake.clear_log();
    let report = apply(host.path(), &state, "all-1g.10gb", Some(&fake));
    assert_eq!(mig_action(&report), "unchanged");
    println!(
        "API writes once the layout is applied: {}",
        fake.writes().len()
    );

    sharing_change_writes();
}

/// A converged A100 node on time-slicing ×4 is switched back to whole GPUs
/// by its `nvidia.com/device-plugin.config` label; the API writes until it
/// has converged again, by kind.
fn sharing_change_writes() {
    let host = support::copy_host("a100-preinstalled");
    let spec = support::write_spec(
        host.path(),
        "node.yaml",
        "devicePlugin:\n  config:\n    default: whole\n    configs:\n      whole:\n        version: v1\n      ts4:\n        version: v1\n        sharing:\n          timeSlicing:\n            resources:\n              - name: nvidia.com/gpu\n                replicas: 4\n",
    );
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/device-plugin.config", "ts4")]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    let apply = || {
        let mut cmd = support::gpuprov_with_fake_nvml("a100.yaml");
        cmd.args(["apply", "--output", "json", "--host-exec", "prefix"])
            .arg("--nvml-lib")
            .arg(support::fake_nvml_library())
            .arg("--host-root")
            .arg(host.path())
            .arg("--config")
            .arg(&spec);
        support::against(&mut cmd, Some(&fake), NODE);
        cmd.output().unwrap().status.code()
    };
    let converge = || (0..4).any(|_| apply() == Some(0));
    assert!(converge(), "the node converges on ts4");
    fake.set_label(NODE, "nvidia.com/device-plugin.config", "whole", "kubectl");
    fake.clear_log();
    assert!(converge(), "the node converges on whole GPUs");
    let writes = fake.writes();
    let count =
        |f: &dyn Fn(&support::fake_api::Logged) -> bool| writes.iter().filter(|w| f(w)).count();
    println!(
        "API writes for a device plugin config change (time-slicing x4 → whole GPUs), until converged again: {} ({} label PATCHes, {} GPUReady condition PATCHes, {} ConfigMap writes, {} node events)",
        writes.len(),
        count(&|w| w.uri.contains("/nodes/") && !w.uri.contains("/status")),
        count(&|w| w.uri.contains("/status")),
        count(&|w| w.uri.contains("/configmaps/")),
        count(&|w| w.uri.contains("/events")),
    );
}
