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
use std::process::Command;
use std::time::Duration;

use common::{gpuprov, measure, succeeds};
use support::fake_api::FakeApi;

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
    let mut times: [Vec<Duration>; 5] = Default::default();
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
        let bare = fresh.copy();
        let started = std::time::Instant::now();
        fresh_edit_syncs_alone(bare.path());
        times[4].push(started.elapsed());
    }
    let [floor, plan, apply, edit, syncs] = times.map(|mut samples| {
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
    report(
        "  its writes and syncs alone, in its rounds, in process",
        n,
        syncs,
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
    println!(
        "  → its writes and syncs alone {:.2}× the floor; floor plus them {:.2}× the floor",
        ratio(syncs),
        1.0 + ratio(syncs)
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

/// What durability alone costs a fresh edit on this disk: the same files
/// written and the same syncs made in the same dependent rounds as
/// `gpuprov apply` makes them (README, "Writes are atomic and durable"),
/// with nothing read, parsed or checked, in this process. A round's syncs
/// run at once, as gpuprov's do; each round waits for the last.
fn fresh_edit_syncs_alone(node: &Path) {
    use std::fs::File;
    use std::io::Write;
    let sync_all = |paths: &[std::path::PathBuf]| {
        std::thread::scope(|scope| {
            for path in paths {
                scope.spawn(move || File::open(path).unwrap().sync_all().unwrap());
            }
        })
    };
    let write = |path: &Path, len: usize| {
        let mut file = File::create(path).unwrap();
        file.write_all(&vec![b'#'; len]).unwrap();
        path.to_path_buf()
    };
    let at = |p: &str| node.join(p);
    let config = 7_000;
    // Round 1: the backup, the record and the config, each a temporary.
    std::fs::create_dir_all(at("var/lib/gpuprov/backup/etc/containerd")).unwrap();
    let temps = [
        write(&at("var/lib/gpuprov/backup/etc/containerd/.b.tmp"), config),
        write(&at("var/lib/gpuprov/.r.tmp"), 600),
        write(&at("etc/containerd/.c.tmp"), config + 1_000),
    ];
    sync_all(&temps);
    // Round 2: the backup and the record in place, their directories and
    // those made for them synced, then the config renamed.
    std::fs::rename(
        &temps[0],
        at("var/lib/gpuprov/backup/etc/containerd/config.toml"),
    )
    .unwrap();
    std::fs::rename(&temps[1], at("var/lib/gpuprov/containerd.json")).unwrap();
    let made = [
        "",
        "var",
        "var/lib",
        "var/lib/gpuprov",
        "var/lib/gpuprov/backup",
        "var/lib/gpuprov/backup/etc",
        "var/lib/gpuprov/backup/etc/containerd",
    ];
    sync_all(&made.map(at));
    std::fs::rename(&temps[2], at("etc/containerd/config.toml")).unwrap();
    // Round 3: the labels file.
    let features = "etc/kubernetes/node-feature-discovery/features.d";
    std::fs::create_dir_all(at(features)).unwrap();
    let labels = write(&at(&format!("{features}/.g.tmp")), 300);
    sync_all(std::slice::from_ref(&labels));
    std::fs::rename(&labels, at(&format!("{features}/gpuprov"))).unwrap();
    // Round 4: the directories the last renames and mkdirs changed.
    let changed = [
        "",
        "etc",
        "etc/containerd",
        "etc/kubernetes",
        "etc/kubernetes/node-feature-discovery",
        features,
    ];
    sync_all(&changed.map(at));
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
