//! The runtime edit on each kind of node, as a user meets it: the binary
//! run as a process, only `containerd-runtime` enabled, `restartMode:
//! none`, no API server.
//!
//! * containerd 1.6 (the baseline: Debian 12's `containerd config default`
//!   on the pre-installed A100 node, the main file edited);
//! * containerd 2.3 (`containerd config default` of v2.3.4, version 4,
//!   importing conf.d: a drop-in written, the main file left);
//! * CRI-O 1.36 (its shipped crio.conf and 10-crio.conf: a drop-in).
//!
//! The nodes have no containerd or crio binary, so that the runtime's
//! view is merged in process (what is measured is gpuprov, not the
//! fixture's Python `config dump` or `crio config`). For each: a fresh edit (a new copy of
//! the node each run, copied before the clock starts, every write
//! durable) and the no-op converge on a converged copy. Runs are
//! interleaved with the process floor, so the machine's noise falls on
//! all alike.
//!
//! Run with `cargo bench --bench runtimes` (`cargo test` runs one of each).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{gpuprov, succeeds};

const ONLY_THE_RUNTIME: &str = "driver:\n  enabled: false\ntoolkit:\n  enabled: false\ncontainerd:\n  restartMode: none\n\
devicePlugin:\n  enabled: false\ndcgmExporter:\n  enabled: false\ngfd:\n  enabled: false\nvalidator:\n  enabled: false\n";

/// One kind of node: a template copied for each fresh run, and a
/// converged copy for the no-op.
struct Node {
    name: &'static str,
    template: tempfile::TempDir,
    converged: tempfile::TempDir,
    spec: PathBuf,
    /// The file the edit writes, checked after each fresh run.
    written: &'static str,
}

impl Node {
    fn new(name: &'static str, host: &str, written: &'static str, prepare: impl Fn(&Path)) -> Node {
        let template = support::copy_host(host);
        prepare(template.path());
        let spec = template.path().join("runtime-only.yaml");
        std::fs::write(&spec, ONLY_THE_RUNTIME).unwrap();
        let converged = copy(template.path());
        succeeds(&mut apply(converged.path(), &spec));
        Node {
            name,
            template,
            converged,
            spec,
            written,
        }
    }
}

/// The L4 hosts' NVML is a stand-in file that cannot be loaded (their
/// tests read NVML through the fake library): without it, gpu-health has
/// no NVML to ask, as on the A100 node, and the run converges.
fn without_stub_nvml(root: &Path) {
    let dir = root.join("usr/lib/x86_64-linux-gnu");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("libnvidia-ml.so")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
}

fn copy(from: &Path) -> tempfile::TempDir {
    let node = tempfile::tempdir().unwrap();
    support::copy_tree(from, node.path());
    node
}

fn apply(node: &Path, spec: &Path) -> Command {
    let mut cmd = gpuprov(&["apply", "--host-exec", "prefix", "--host-root"]);
    cmd.arg(node).arg("--config").arg(spec);
    cmd
}

fn timed(mut command: Command) -> Duration {
    let started = Instant::now();
    succeeds(&mut command);
    started.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let n = common::runs(200);
    let nodes = [
        Node::new(
            "containerd 1.6, version 2 (main file)",
            "a100-preinstalled",
            "etc/containerd/config.toml",
            |root| {
                std::fs::remove_file(root.join("usr/bin/containerd")).unwrap();
                let debian = support::repo().join(
                    "../shared/realworld/containerd/12-debian12-containerd-1.6-default-systemd-v2.toml",
                );
                std::fs::copy(&debian, root.join("etc/containerd/config.toml")).unwrap_or_else(
                    |e| panic!("{}: {e} (the bench reads ../shared)", debian.display()),
                );
            },
        ),
        Node::new(
            "containerd 2.3, version 4 (conf.d drop-in)",
            "l4x4-containerd23",
            "etc/containerd/conf.d/gpuprov-runtime.toml",
            |root| {
                std::fs::remove_file(root.join("usr/bin/containerd")).unwrap();
                without_stub_nvml(root);
            },
        ),
        Node::new(
            "CRI-O 1.36 (crio.conf.d drop-in)",
            "l4x4-crio",
            "etc/crio/crio.conf.d/99-nvidia.toml",
            |root| {
                // As for containerd: CRI-O's view merged in process, not
                // the fixture's Python `crio config`.
                std::fs::remove_file(root.join("usr/bin/crio")).unwrap();
                without_stub_nvml(root);
            },
        ),
    ];
    let mut floor = Vec::new();
    let mut fresh: Vec<Vec<Duration>> = vec![Vec::new(); nodes.len()];
    let mut noop: Vec<Vec<Duration>> = vec![Vec::new(); nodes.len()];
    for _ in 0..n {
        floor.push(timed(gpuprov(&["--version"])));
        for (i, node) in nodes.iter().enumerate() {
            let copy = copy(node.template.path());
            fresh[i].push(timed(apply(copy.path(), &node.spec)));
            assert!(copy.path().join(node.written).exists(), "{}", node.name);
            noop[i].push(timed(apply(node.converged.path(), &node.spec)));
        }
    }
    let floor = median(floor);
    println!(
        "{:<48} {n:>5} runs  median {floor:>10.2?}",
        "process floor: gpuprov --version"
    );
    let base = (median(fresh[0].clone()), median(noop[0].clone()));
    for (i, node) in nodes.iter().enumerate() {
        let (edit, converged) = (median(fresh[i].clone()), median(noop[i].clone()));
        println!(
            "{:<48} fresh edit median {edit:>10.2?} ({:.2}× 1.6's)  no-op median {converged:>10.2?} ({:.2}× 1.6's)",
            node.name,
            edit.as_secs_f64() / base.0.as_secs_f64(),
            converged.as_secs_f64() / base.1.as_secs_f64()
        );
    }
}
