//! DRA (`devicePlugin.mode: dra`), on the 8-GPU fixture (`h100x8-cdi`,
//! NVML through the fake library) against the loopback fake API server,
//! with the fake kubelet registering the plugin as soon as its socket
//! appears:
//!
//! * time from `gpuprov run`'s start to the node's ResourceSlice
//!   published (the fake API server has it);
//! * `NodePrepareResources` latency for a claim of one GPU and a claim of
//!   eight, over the plugin's unix socket (each claim unprepared before
//!   the next: the spec written, then removed), median and 99th
//!   percentile;
//! * resident memory of `gpuprov run` converged, in DRA mode beside
//!   device-plugin mode (operands simulated by the fake cluster);
//! * API requests of a converged node in DRA mode: a minute of drift
//!   converges every second, and the watches reopened every 10 s, scaled
//!   to an hour at the default (`--watch-timeout 1h`).
//!
//! Run with `cargo bench --bench dra` (`cargo test` runs a short version).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::dra_node::{DRA, DRIVER, NODE, Node};
use support::kubelet::Kubelet;

fn median_p99(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    let n = times.len();
    (times[n / 2], times[(n * 99 / 100).min(n - 1)])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Start to slice published, `runs` times.
fn time_to_slices(runs: usize) {
    let mut times = Vec::new();
    for _ in 0..runs {
        let mut node = Node::new("h100x8.yaml", DRA);
        let started = Instant::now();
        node.start("5m");
        let mut kubelet = Kubelet::new(node.path());
        kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(30));
        while node.slices().is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        times.push(started.elapsed());
        node.stop();
    }
    let (median, p99) = median_p99(times);
    println!(
        "start to ResourceSlice published (8 GPUs, {runs} runs): median {}, max {}",
        ms(median),
        ms(p99)
    );
}

/// Prepare latency for claims of `sizes` GPUs, `runs` each.
fn prepare_latency(runs: usize) {
    let mut node = Node::new("h100x8.yaml", DRA);
    node.start("5m");
    let mut kubelet = Kubelet::new(node.path());
    kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(30));
    node.wait_for("the slice", || !node.slices().is_empty());
    for gpus in [1usize, 8] {
        let mut times = Vec::new();
        let devices: Vec<String> = (0..gpus).map(|i| format!("gpu-{i}")).collect();
        let results: Vec<(&str, &str)> = devices.iter().map(|d| ("gpus", d.as_str())).collect();
        for run in 0..runs {
            let uid = format!("uid-bench-{gpus}-{run}");
            node.fake
                .add_claim("bench", &uid, &uid, DRIVER, NODE, &results);
            let claim = [("bench", uid.as_str(), uid.as_str())];
            let started = Instant::now();
            let answer = kubelet.prepare("v1", &claim).unwrap();
            times.push(started.elapsed());
            assert_eq!(answer.claims[&uid].error, "");
            assert_eq!(answer.claims[&uid].devices.len(), gpus);
            let unprepared = kubelet.unprepare("v1", &claim).unwrap();
            assert_eq!(unprepared.claims[&uid].error, "");
        }
        let (median, p99) = median_p99(times);
        println!(
            "NodePrepareResources, a claim of {gpus} GPU{} ({runs} calls): median {}, p99 {}",
            if gpus == 1 { "" } else { "s" },
            ms(median),
            ms(p99)
        );
    }
}

/// RSS of `gpuprov run` converged, DRA beside the device plugin.
fn memory(settle: Duration) {
    for (mode, spec) in [
        ("dra", DRA.to_string()),
        ("operand", DRA.replace("mode: dra", "mode: operand")),
    ] {
        let mut node = Node::new("h100x8.yaml", &spec);
        node.fake.run_operands(support::fake_api::Operands {
            gpus: 8,
            product: "NVIDIA-H100-80GB-HBM3".into(),
            exporter_ready: true,
        });
        node.start("1s");
        if mode == "dra" {
            let mut kubelet = Kubelet::new(node.path());
            kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(30));
        }
        node.wait_for("the device plugin state to be ready", || {
            node.state().as_deref() == Some("ready")
        });
        std::thread::sleep(settle);
        let pid = node.daemon.as_ref().unwrap().id();
        let (rss, _) = common::usage(pid);
        let peak = support::own_peak_rss(pid);
        println!(
            "gpuprov run, devicePlugin.mode {mode}, converged (drift every 1 s): RSS {:.1} MiB, peak {:.1} MiB",
            rss as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
}

/// API requests of a converged DRA node.
fn api_requests(window: Duration) {
    let mut node = Node::new("h100x8.yaml", DRA);
    node.start("1s");
    let mut kubelet = Kubelet::new(node.path());
    kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(30));
    node.wait_for("ready", || node.state().as_deref() == Some("ready"));
    std::thread::sleep(Duration::from_secs(2));
    node.fake.clear_log();
    std::thread::sleep(window);
    let log = node.fake.log_of(NODE);
    let dra = log
        .iter()
        .filter(|l| l.uri.contains("resource.k8s.io"))
        .count();
    let writes = log.iter().filter(|l| l.method != "GET").count();
    // The watches are reopened once per --watch-timeout (1 h by default):
    // their 2 requests an hour are what a converged node sends (the fleet
    // benchmark measures them); DRA must add none.
    let per_hour = log.len() as f64 * 3600.0 / window.as_secs_f64() + 2.0;
    println!(
        "converged DRA node, {}s of drift converges every second: {} requests ({dra} to resource.k8s.io, {writes} writes); per hour with the watches' 2 reopenings: {per_hour:.0} (target: at most 2)",
        window.as_secs(),
        log.len()
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    time_to_slices(common::runs(10));
    prepare_latency(common::runs(200));
    memory(if full {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(1)
    });
    api_requests(if full {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(2)
    });
}
