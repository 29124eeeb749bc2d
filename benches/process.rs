//! Whole-process figures, as a user meets them: the `gpuprov` binary run as
//! a process, each figure the median of many runs.
//!
//! * the process floor: `gpuprov --version` (exec, dynamic loading, exit);
//! * `plan` and a no-op `apply` on the converged 8-GPU fixture, and their
//!   ratio to the floor (target: a no-op `apply` within 3× the floor);
//! * a fresh edit of Debian's default containerd config, every write
//!   durable: only the `containerd-runtime` state enabled, restart mode
//!   none, on a copy of the pre-installed A100 node without a containerd
//!   binary (so that containerd's own view is merged in process: what is
//!   measured is gpuprov, not containerd's start), the config being
//!   `containerd config default` of Debian 12's containerd 1.6 from
//!   `../shared/realworld` (target: within 3× the floor);
//! * a cold converge of a pre-installed node end to end: toolkit present,
//!   containerd's config edited and containerd restarted (the fixture's
//!   stand-in), labels applied on the API server.
//!
//! Run with `cargo bench --bench process` (`cargo test` runs one of each).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::measure;
use support::fake_api::FakeApi;

fn gpuprov(args: &[&str]) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("gpuprov"));
    cmd.args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", "/nonexistent-gpuprov-bench-home")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn succeeds(cmd: &mut Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?} exited {status}");
}

fn report(name: &str, runs: usize, (median, p90): (Duration, Duration)) {
    println!("{name:<62} {runs:>5} runs  median {median:>10.2?}  p90 {p90:>10.2?}");
}

fn on_host(subcommand: &str, host: &Path) -> Command {
    let mut cmd = gpuprov(&[subcommand, "--host-exec", "prefix", "--host-root"]);
    cmd.arg(host);
    cmd
}

fn main() {
    let runs = common::runs;

    // The 8-GPU fixture, converged once (the runtime added, the static
    // pods written, the fake containerd restarted).
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    succeeds(&mut on_host("apply", host.path()));
    // The three are run in turn, so that the machine's noise falls on each
    // alike and their ratios hold.
    let fresh = FreshEdit::new();
    let n = runs(300);
    let mut times: [Vec<Duration>; 4] = Default::default();
    for _ in 0..n {
        // A fresh node for the edit, copied before the clock starts.
        let node = fresh.copy();
        let commands: [Command; 4] = [
            gpuprov(&["--version"]),
            on_host("plan", host.path()),
            on_host("apply", host.path()),
            fresh.apply(node.path()),
        ];
        for (mut command, samples) in commands.into_iter().zip(times.iter_mut()) {
            let started = std::time::Instant::now();
            succeeds(&mut command);
            samples.push(started.elapsed());
        }
        fresh.check(node.path());
    }
    let [floor, plan, apply, edit] = times.map(|mut samples| {
        samples.sort();
        (samples[n / 2], samples[n * 9 / 10])
    });
    report("process floor: gpuprov --version", n, floor);
    report("gpuprov plan, converged 8-GPU host", n, plan);
    report("gpuprov apply (no-op), converged 8-GPU host", n, apply);
    let ratio = |(median, _): (Duration, Duration)| median.as_secs_f64() / floor.0.as_secs_f64();
    report(
        "fresh containerd edit, Debian's default config, durable",
        n,
        edit,
    );
    let verdict = |r: f64| if r <= 3.0 { "met" } else { "MISSED" };
    println!(
        "  → plan {:.2}× the floor, no-op apply {:.2}× the floor (target: apply within 3×: {})",
        ratio(plan),
        ratio(apply),
        verdict(ratio(apply))
    );
    println!(
        "  → fresh containerd edit {:.2}× the floor (target: within 3×: {})",
        ratio(edit),
        verdict(ratio(edit))
    );

    // A cold converge: a fresh copy of the pre-installed A100 node each
    // time, against the API server, operands left to the GPU Operator.
    let node_prep = support::repo().join("fixtures/specs/node-prep-only.yaml");
    let cold = measure(runs(40), || {
        let fake = FakeApi::start();
        fake.add_node("gpu-node-1", &[], "kubelet");
        let host = support::copy_host("a100-preinstalled");
        let mut cmd = on_host("apply", host.path());
        cmd.args(["--node-name", "gpu-node-1", "--config"])
            .arg(&node_prep)
            .arg("--kubeconfig")
            .arg(fake.kubeconfig());
        succeeds(&mut cmd);
        assert_eq!(
            fake.labels("gpu-node-1")["gpuprov.io/containerd-runtime"],
            "configured"
        );
    });
    report(
        "cold converge, pre-installed A100 node, labels on the API",
        runs(40),
        cold,
    );
}

/// The fresh containerd edit: a template node, copied anew for each run.
struct FreshEdit {
    template: tempfile::TempDir,
    spec: std::path::PathBuf,
    config: String,
}

impl FreshEdit {
    fn new() -> FreshEdit {
        let template = support::copy_host("a100-preinstalled");
        std::fs::remove_file(template.path().join("usr/bin/containerd")).unwrap();
        let debian = support::repo().join(
            "../shared/realworld/containerd/12-debian12-containerd-1.6-default-systemd-v2.toml",
        );
        let config = std::fs::read_to_string(&debian)
            .unwrap_or_else(|e| panic!("{}: {e} (the bench reads ../shared)", debian.display()));
        std::fs::write(template.path().join("etc/containerd/config.toml"), &config).unwrap();
        let spec = template.path().join("containerd-only.yaml");
        std::fs::write(
            &spec,
            "driver:\n  enabled: false\ntoolkit:\n  enabled: false\ncontainerd:\n  restartMode: none\n\
devicePlugin:\n  enabled: false\ndcgmExporter:\n  enabled: false\ngfd:\n  enabled: false\nvalidator:\n  enabled: false\n",
        )
        .unwrap();
        FreshEdit {
            template,
            spec,
            config,
        }
    }

    fn copy(&self) -> tempfile::TempDir {
        let node = tempfile::tempdir().unwrap();
        support::copy_tree(self.template.path(), node.path());
        node
    }

    fn apply(&self, node: &Path) -> Command {
        let mut cmd = on_host("apply", node);
        cmd.arg("--config").arg(&self.spec);
        cmd
    }

    /// The run did edit the config (and kept the original as a backup).
    fn check(&self, node: &Path) {
        let edited = std::fs::read_to_string(node.join("etc/containerd/config.toml")).unwrap();
        assert!(edited.contains("runtimes.nvidia]") && edited.len() > self.config.len());
        let backup = node.join("var/lib/gpuprov/backup/etc/containerd/config.toml");
        assert_eq!(std::fs::read_to_string(backup).unwrap(), self.config);
    }
}
