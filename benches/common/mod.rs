#![allow(dead_code)]
//! What every benchmark needs: timing a closure many times.

use std::time::{Duration, Instant};

/// `cargo bench` passes --bench; `cargo test --all-targets` does not, and
/// then one run of each keeps the benchmark compiled and working.
pub fn runs(full: usize) -> usize {
    if std::env::args().any(|a| a == "--bench") {
        full
    } else {
        1
    }
}

/// The median and 90th percentile of `runs` timings of `f`.
pub fn measure(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    (times[runs / 2], times[runs * 9 / 10])
}

/// Resident set size (KiB) and CPU seconds (user + system) of a process,
/// from /proc.
pub fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (rss_kib, (ticks(11) + ticks(12)) / 100.0)
}

/// The `gpuprov` binary as a bench runs it: no kubeconfig found by
/// accident, output discarded.
pub fn gpuprov(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"));
    cmd.args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", "/nonexistent-gpuprov-bench-home")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd
}

/// Runs `cmd`, which must succeed.
pub fn succeeds(cmd: &mut std::process::Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?} exited {status}");
}

/// What the pipeline is given for `host` (as by `gpuprov apply`): a converge in process
/// with `--host-exec prefix`, labels to the NFD file, no API server.
pub fn node_args(
    host: &std::path::Path,
    config: Option<std::path::PathBuf>,
    nvml_lib: Option<std::path::PathBuf>,
) -> gpuprov::converge::NodeOptions {
    gpuprov::converge::NodeOptions {
        config,
        host_root: host.to_path_buf(),
        host_exec: Some(gpuprov::host::CommandMode::Prefix),
        states_dir: None,
        node_labels: Vec::new(),
        node_labels_file: None,
        labels_sink: gpuprov::labels::LabelTarget::File,
        kubeconfig: None,
        node_name: None,
        nvml_lib,
        command_timeout: Duration::from_secs(60),
    }
}
