//! gpuprov against hostile peers (issue 32), through the binary:
//!
//! * peak RSS of `apply` against the loopback API server when it answers
//!   normally, and when it answers the Node with 1 GiB (`ru_maxrss` from
//!   wait4; the commands it runs count too);
//! * peak RSS of `gpuprov run` (its own `VmHWM` after 8 s) when the API
//!   server answers normally, when a watch's first event is a line that
//!   never ends, and when a pod list's pages never end;
//! * the converge loop's latency while the metrics port is flooded: the
//!   time from a config change to the label it changes on the Node, with
//!   the kubelet's pod-resources socket silent (each sample waits its 2 s
//!   timeout), quiet and under 20 clients scraping `/metrics` without a
//!   pause.
//!
//! Each figure is the median over a few runs. Run with
//! `cargo bench --bench hostile` (`cargo test` runs one of each).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::daemon::{Daemon, eventually, free_port, get};
use support::fake_api::{FakeApi, Fault, Flood};

const NODE: &str = "gpu-node-1";

fn median<T: Ord + Copy>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `apply`'s peak RSS (KiB) and exit code against `fake`.
fn apply_peak(fake: &FakeApi) -> (u64, Option<i32>) {
    let host = support::copy_host("a100-preinstalled");
    let child = support::daemon::against(fake, NODE, &["apply"], host.path())
        .spawn()
        .unwrap();
    let (code, kib) = support::peak_rss(child);
    (kib, code)
}

fn flooded(fault: Fault) -> FakeApi {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.inject(fault);
    fake
}

fn memory(runs: usize) {
    let (normal, _) = (0..runs)
        .map(|_| apply_peak(&FakeApi::with_node(NODE, &[])))
        .fold((Vec::new(), None), |(mut v, _), (kib, code)| {
            v.push(kib);
            (v, code)
        });
    println!(
        "{:<64} peak RSS {:>6.1} MiB",
        "apply, the API server answering",
        mib(median(normal))
    );
    let huge: Vec<(u64, Option<i32>)> = (0..runs)
        .map(|_| apply_peak(&flooded(Flood::Node(1 << 30).fault())))
        .collect();
    println!(
        "{:<64} peak RSS {:>6.1} MiB (exit {})",
        "apply, a 1 GiB Node answer (cut at 16 MiB)",
        mib(median(huge.iter().map(|(k, _)| *k).collect())),
        huge[0].1.unwrap_or(-1)
    );
    let seconds = if runs > 1 { 8 } else { 3 };
    for (label, fake) in [
        ("run, the API server answering", None),
        (
            "run, a watch line that never ends",
            Some(Flood::EndlessLine.fault()),
        ),
        (
            "run, a pod list whose pages never end",
            Some(Flood::EndlessPages.fault()),
        ),
    ] {
        let peaks: Vec<u64> = (0..runs.min(3))
            .map(|_| {
                let fake = match &fake {
                    Some(fault) => flooded(fault.clone()),
                    None => FakeApi::with_node(NODE, &[]),
                };
                support::daemon::run_for(&fake, NODE, seconds, None)
            })
            .collect();
        println!(
            "{:<64} peak RSS {:>6.1} MiB (own VmHWM after {seconds} s)",
            label,
            mib(median(peaks))
        );
    }
}

/// The time from each config change to its label on the Node, `changes`
/// times, under `gpuprov run` with a silent kubelet, while `scrapers`
/// clients scrape `/metrics` without a pause.
fn converge_latency(changes: usize, scrapers: usize) -> Vec<Duration> {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    let fixture = support::telemetry_fixture(host.path());
    let exporter = "dcgmExporter:\n  mode: builtin\n";
    let spec = support::write_spec(host.path(), "node.yaml", exporter);
    support::daemon::silent_kubelet(host.path());
    let port = free_port();
    let _daemon = Daemon::spawn_nvml(&fake, NODE, host.path(), port, &spec, &fixture, &[]);
    let validator = || fake.labels(NODE).get("gpuprov.io/validator").cloned();
    eventually("the first converge", Duration::from_secs(60), || {
        validator().is_some()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..scrapers)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = get(port, "/metrics");
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let mut latencies = Vec::new();
    for i in 0..changes {
        let (text, wanted) = match i % 2 {
            0 => (
                format!("{exporter}validator:\n  enabled: false\n"),
                "disabled",
            ),
            _ => (exporter.to_string(), "ready"),
        };
        let changed = Instant::now();
        std::fs::write(&spec, text).unwrap();
        eventually(
            "the converge after a config change",
            Duration::from_secs(60),
            || validator().as_deref() == Some(wanted),
        );
        latencies.push(changed.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    latencies
}

fn main() {
    let runs = common::runs(5);
    memory(runs);
    let changes = if runs > 1 { 6 } else { 2 };
    let quiet = median(converge_latency(changes, 0));
    let flooded = median(converge_latency(changes, 20));
    println!(
        "{:<64} {:>6.0} ms",
        "config change to label, silent kubelet, no scrapes",
        quiet.as_secs_f64() * 1000.0
    );
    println!(
        "{:<64} {:>6.0} ms ({:.2}× quiet)",
        "config change to label, silent kubelet, 20 clients scraping",
        flooded.as_secs_f64() * 1000.0,
        flooded.as_secs_f64() / quiet.as_secs_f64()
    );
}
