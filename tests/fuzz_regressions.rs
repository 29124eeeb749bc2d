//! Replays every input the fuzz targets found a problem with
//! (`fuzz/regressions/<target>/`), and the fixtures they start from,
//! through the same invariants (fuzz/invariants.rs).

#[path = "../fuzz/invariants.rs"]
mod invariants;
mod support;

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn replay(target: &str, check: fn(&str), seeds: &[&str]) {
    let repo = support::repo();
    let mut inputs = files(&repo.join("fuzz/regressions").join(target));
    for seed in seeds {
        inputs.extend(files(&repo.join(seed)));
    }
    assert!(!inputs.is_empty(), "{target}: nothing to replay");
    for input in inputs {
        let bytes = std::fs::read(&input).unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let result = std::panic::catch_unwind(|| check(text));
            assert!(
                result.is_ok(),
                "{target}: {} breaks an invariant",
                input.display()
            );
        }
    }
}

#[test]
fn spec_inputs_hold() {
    replay(
        "spec",
        invariants::spec,
        &["fixtures/specs", "fixtures/bad/spec"],
    );
}

#[test]
fn state_inputs_hold() {
    replay(
        "state",
        invariants::state,
        &["states", "fixtures/bad/catalogue"],
    );
}

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn containerd_inputs_hold() {
    replay(
        "containerd",
        invariants::containerd,
        &[
            "fixtures/containerd",
            "fixtures/bad/containerd",
            "../shared/realworld/containerd",
        ],
    );
}
