//! Peak memory of one `gpuprov apply` process (its own `ru_maxrss`, from
//! wait4), on what a node's containerd config can be:
//!
//! * the floor, `gpuprov --version`;
//! * the largest real config in `../shared/realworld/containerd`;
//! * a config of 19,000 runtime tables (1.9 MiB, just within the 2 MiB cap,
//!   so parsed and edited): the most memory a config can cost;
//! * oversize configs: 100,000 tables (10 MiB), and 20 MiB and 1 GiB
//!   sparse files: refused before a byte is read.
//!
//! Each figure is the median over a few runs. Run with
//! `cargo bench --bench memory` (`cargo test` runs one of each).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs the command to its end; its exit code and its peak RSS in KiB.
fn peak_rss(cmd: &mut Command) -> (i32, u64) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (code, kib) = support::peak_rss(child);
    (code.unwrap_or(-1), kib)
}

fn apply_on(host: &Path) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("gpuprov"));
    cmd.args(["apply", "--host-exec", "prefix", "--config"])
        .arg(support::repo().join("fixtures/specs/node-prep-only.yaml"))
        .arg("--host-root")
        .arg(host)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", "/nonexistent-gpuprov-bench-home");
    cmd
}

/// The median peak RSS (MiB) of `runs` applies on fresh copies of the
/// fixture host with `config` as containerd's config, and their exit code.
fn measure(runs: usize, config: &dyn Fn(&Path)) -> (f64, i32) {
    let mut peaks = Vec::new();
    let mut code = 0;
    for _ in 0..runs {
        let host = support::copy_host("a100-preinstalled");
        config(&host.path().join("etc/containerd/config.toml"));
        let (exit, kib) = peak_rss(&mut apply_on(host.path()));
        code = exit;
        peaks.push(kib);
    }
    peaks.sort();
    (peaks[runs / 2] as f64 / 1024.0, code)
}

fn many_tables(tables: usize) -> String {
    let mut text = String::from("version = 2\n");
    for i in 0..tables {
        let _ = write!(
            text,
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.r{i}]\n  runtime_type = \"io.containerd.runc.v2\"\n"
        );
    }
    text
}

fn main() {
    let runs = common::runs(5);
    let floor = {
        let mut peaks: Vec<u64> = (0..runs)
            .map(|_| {
                peak_rss(Command::new(assert_cmd::cargo::cargo_bin("gpuprov")).arg("--version")).1
            })
            .collect();
        peaks.sort();
        peaks[runs / 2] as f64 / 1024.0
    };
    println!(
        "{:<62} peak RSS {floor:>7.1} MiB",
        "floor: gpuprov --version"
    );

    let realworld = support::repo().join("../shared/realworld/containerd");
    if let Ok(entries) = std::fs::read_dir(&realworld) {
        let largest = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        let size = std::fs::metadata(&largest).unwrap().len();
        let (mib, code) = measure(runs, &|config| {
            std::fs::copy(&largest, config).unwrap();
        });
        println!(
            "{:<62} peak RSS {mib:>7.1} MiB (exit {code})",
            format!(
                "apply, largest real config ({}, {size} B)",
                largest.file_name().unwrap().to_string_lossy()
            )
        );
    }

    let at_cap = many_tables(19_000);
    let (mib, code) = measure(runs, &|config| std::fs::write(config, &at_cap).unwrap());
    println!(
        "{:<62} peak RSS {mib:>7.1} MiB (exit {code}; {:.1}× the file)",
        format!(
            "apply, 19,000-table config ({:.1} MiB, under the cap)",
            at_cap.len() as f64 / (1 << 20) as f64
        ),
        mib / (at_cap.len() as f64 / (1 << 20) as f64)
    );
    let big = many_tables(100_000);
    let (mib, code) = measure(runs, &|config| std::fs::write(config, &big).unwrap());
    println!(
        "{:<62} peak RSS {mib:>7.1} MiB (exit {code}: refused unread)",
        format!(
            "apply, 100,000-table config ({:.1} MiB)",
            big.len() as f64 / (1 << 20) as f64
        )
    );
    assert_eq!(code, 3, "a config over the cap fails its step");

    for (label, bytes) in [("20 MiB", 20u64 << 20), ("1 GiB", 1u64 << 30)] {
        let (mib, code) = measure(runs, &|config| {
            std::fs::File::create(config)
                .unwrap()
                .set_len(bytes)
                .unwrap();
        });
        println!(
            "{:<62} peak RSS {mib:>7.1} MiB (exit {code}: refused unread)",
            format!("apply, oversize config ({label}, sparse)")
        );
        assert_eq!(code, 3, "an oversize config fails its step");
    }
}
