//! The built-in DCGM exporter under Prometheus: `gpuprov run` with
//! `dcgmExporter.mode: builtin` on the 8-GPU fake (every field answering),
//! scraped once a second. Prints its resident memory over time (first,
//! median, last, peak: it must stay flat), CPU seconds per scrape, scrape
//! latency p50/p99 and bytes per scrape.
//!
//! `cargo bench --bench telemetry` scrapes for 10 minutes
//! (`GPUPROV_BENCH_SECONDS` for another length); `cargo test` runs a few
//! seconds.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::daemon::{Daemon, eventually, free_port, get};
use support::fake_api::FakeApi;

const NODE: &str = "gpu-node-1";

fn main() {
    let seconds: u64 = if common::runs(2) > 1 {
        std::env::var("GPUPROV_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600)
    } else {
        3
    };
    // The same node without the exporter first, for what it adds.
    scrape("operand", (seconds / 10).max(3));
    scrape("builtin", seconds);
}

/// `gpuprov run` with `dcgmExporter.mode: <mode>`, scraped once a second
/// for `seconds`.
fn scrape(mode: &str, seconds: u64) {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    let fixture = support::telemetry_fixture(host.path());
    let spec = support::write_spec(
        host.path(),
        "node.yaml",
        &format!("dcgmExporter:\n  mode: {mode}\n"),
    );
    let port = free_port();
    let daemon = Daemon::spawn_nvml(&fake, NODE, host.path(), port, &spec, &fixture, &[]);
    let pid = daemon.0.id();
    // Converged first, so the figures are the exporter's, not a converge's.
    eventually("a converged node", Duration::from_secs(60), || {
        get(port, "/metrics").is_some_and(|(_, b)| b.contains("\ngpuprov_converged 1\n"))
    });
    let (_, cpu_before) = common::usage(pid);
    let mut latencies = Vec::new();
    let mut rss = Vec::new();
    let mut bytes = 0;
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < Duration::from_secs(seconds) {
        let at = Instant::now();
        let (code, body) = get(port, "/metrics").expect("a scrape");
        latencies.push(at.elapsed());
        assert_eq!(code, 200);
        bytes = body.len();
        rss.push(common::usage(pid).0);
        next += Duration::from_secs(1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (_, cpu_after) = common::usage(pid);
    let scrapes = latencies.len();
    latencies.sort();
    let at = |p: f64| latencies[((scrapes as f64 - 1.0) * p).round() as usize];
    let mut sorted = rss.clone();
    sorted.sort();
    let mib = |kib: u64| kib as f64 / 1024.0;
    if mode == "builtin" {
        assert!(get(port, "/metrics").is_some_and(|(_, b)| b.contains("DCGM_FI_DEV_GPU_UTIL{")));
    }
    println!(
        "gpuprov run, dcgmExporter.mode {mode}, 8 GPUs, {scrapes} scrapes of /metrics at 1/s over {seconds} s:"
    );
    println!(
        "  RSS: first {:.1} MiB, median {:.1} MiB, last {:.1} MiB, peak {:.1} MiB{}",
        mib(rss[0]),
        mib(sorted[scrapes / 2]),
        mib(rss[scrapes - 1]),
        mib(sorted[scrapes - 1]),
        if mode == "builtin" {
            " (target: under 16 MiB and flat)"
        } else {
            ""
        },
    );
    println!(
        "  CPU: {:.2} s over the run, {:.2} ms per scrape",
        cpu_after - cpu_before,
        (cpu_after - cpu_before) * 1000.0 / scrapes as f64
    );
    println!(
        "  scrape latency: p50 {:.2} ms, p99 {:.2} ms; {bytes} bytes per scrape",
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
    );
}
