//! Fleet benchmarks against the loopback fake API server:
//!
//! * a simulation of many nodes (agents: one `gpuprov apply --wait` process
//!   each, on its own copy of a fixture host, many at once) converging
//!   against one API server, whose operands start as soon as a node is
//!   labelled for them and whose validation pods pass at once: total
//!   requests, requests per node, and the p50/p99 time until the node is
//!   ready (operands verified, vectorAdd passed);
//! * `gpuprov run` on a converged node: resident memory and CPU over a
//!   minute, and the API requests it makes;
//! * time from a fresh node (registered with the startup taint) to
//!   `nvidia.com/GPUReady=True` and the taint gone, under `gpuprov run`,
//!   with instant operands;
//! * `gpuprov run` on a node without a GPU (what the DaemonSet costs on
//!   every other node): time to its first converge, memory, CPU, and API
//!   requests per hour at the default drift interval.
//!
//! Run with `cargo bench --bench fleet` (`cargo test` runs a small version).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::{Daemon, eventually, free_port};
use support::fake_api::FakeApi;

fn gpuprov_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("gpuprov")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The cluster's side, instant: the operands' DaemonSets start on the
/// labels, and the vectorAdd pod succeeds.
fn instant_cluster(fake: &FakeApi, gpus: usize) {
    fake.run_working_cluster(gpus, "NVIDIA-A100-SXM4-40GB");
}

fn simulate(nodes: usize, parallel: usize) {
    let fake = FakeApi::start();
    instant_cluster(&fake, 1);
    for i in 0..nodes {
        fake.add_node(
            &format!("node-{i}"),
            &[("kubernetes.io/hostname", &format!("node-{i}"))],
            "kubelet",
        );
    }
    let hosts: Vec<tempfile::TempDir> = (0..nodes)
        .map(|_| support::copy_host("a100-preinstalled"))
        .collect();
    // containerd restarts are the fake's, not the API's business here.
    let spec = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(spec.path(), "containerd:\n  restartMode: none\n").unwrap();
    let kubeconfig = fake.kubeconfig();

    let run_fleet = |label: &str| {
        fake.clear_log();
        let started = Instant::now();
        let mut times = Vec::with_capacity(nodes);
        for batch in (0..nodes).collect::<Vec<_>>().chunks(parallel) {
            let children: Vec<(Instant, std::process::Child)> = batch
                .iter()
                .map(|&i| {
                    let child = Command::new(gpuprov_bin())
                        .args([
                            "apply",
                            "--wait",
                            "--timeout",
                            "2m",
                            "--host-exec",
                            "prefix",
                            "--node-name",
                            &format!("node-{i}"),
                            "--config",
                        ])
                        .arg(spec.path())
                        .arg("--kubeconfig")
                        .arg(&kubeconfig)
                        .arg("--host-root")
                        .arg(hosts[i].path())
                        .env_remove("KUBECONFIG")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap();
                    (Instant::now(), child)
                })
                .collect();
            for (start, mut child) in children {
                let status = child.wait().unwrap();
                assert!(status.success(), "an agent did not converge");
                times.push(start.elapsed());
            }
        }
        let wall = started.elapsed();
        times.sort();
        let log = fake.log();
        let writes = log.iter().filter(|l| l.method != "GET").count();
        println!(
            "{label:<34} {nodes:>4} nodes, {parallel:>3} at once: {:>6} requests ({:.2}/node, {:.2} writes/node), \
             time to converge p50 {:>8.1?} p99 {:>8.1?}, all in {:>7.2?}",
            log.len(),
            log.len() as f64 / nodes as f64,
            writes as f64 / nodes as f64,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            wall,
        );
        if label.contains("converged") {
            println!(
                "  → a converged node under `gpuprov apply`: {writes} writes (target: zero writes: {})",
                if writes == 0 { "met" } else { "MISSED" }
            );
        }
    };
    run_fleet("fleet, first converge");
    run_fleet("fleet, converged (second apply)");
}

/// `gpuprov run`'s API requests on a converged node, measured with a drift
/// converge every second and its watches reopened every 5 s for `seconds`,
/// then scaled to its defaults (a drift converge every 5 minutes, the
/// watches reopened every hour).
fn run_footprint(label: &str, fake: &FakeApi, node: &str, host: &std::path::Path, seconds: u64) {
    let port = free_port();
    let more: [&std::ffi::OsStr; 2] = ["--watch-timeout".as_ref(), "5s".as_ref()];
    let daemon = Daemon::spawn_with(fake, node, host, "1s", port, &more);
    eventually("run to converge", Duration::from_secs(60), || {
        support::daemon::get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    std::thread::sleep(Duration::from_secs(2));
    let converges = || {
        let (_, metrics) = support::daemon::get(port, "/metrics").unwrap();
        metrics
            .lines()
            .filter(|l| l.starts_with("gpuprov_converges_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let before = converges();
    fake.clear_log();
    std::thread::sleep(Duration::from_secs(seconds));
    let log = fake.log_of(node);
    let done = converges() - before;
    drop(daemon);
    let watches = log.iter().filter(|l| l.uri.contains("watch=true")).count();
    let others = log.len() - watches;
    let writes = log.iter().filter(|l| l.method != "GET").count();
    let per_converge = others as f64 / done.max(1) as f64;
    let reopened_per_period = watches as f64 / (seconds as f64 / 5.0);
    let per_hour = per_converge * 12.0 + reopened_per_period;
    println!(
        "`gpuprov run`, {label}: {done} drift converges in {seconds}s sent {others} requests ({writes} writes), \
         {watches} watch reopenings ({reopened_per_period:.1} per watch period) \
         → {per_hour:.2} requests per hour at --drift-interval 5m --watch-timeout 1h (target: at most 2: {})",
        if per_hour <= 2.0 { "met" } else { "MISSED" }
    );
}

fn steady_state(seconds: u64) {
    let fake = FakeApi::with_node("gpu-node-1", &[]);
    instant_cluster(&fake, 8);
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    let daemon = Daemon::spawn(&fake, "gpu-node-1", host.path(), "5m", free_port());
    // Let it converge: the first converge restarts the fake containerd and
    // labels the node for its operands, the next validates.
    eventually("run to converge", Duration::from_secs(30), || {
        fake.labels("gpu-node-1")
            .get("gpuprov.io/validator")
            .is_some_and(|v| v == "ready")
    });
    std::thread::sleep(Duration::from_secs(1));
    fake.clear_log();
    let (_, cpu_before) = common::usage(daemon.0.id());
    let mut peak = 0;
    let mut samples = Vec::new();
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        let (rss, _) = common::usage(daemon.0.id());
        peak = peak.max(rss);
        samples.push(rss);
    }
    let (_, cpu_after) = common::usage(daemon.0.id());
    let log = fake.log();
    drop(daemon);
    samples.sort();
    let median_mib = samples[samples.len() / 2] as f64 / 1024.0;
    println!(
        "`gpuprov run`, converged, {seconds}s: RSS median {median_mib:.1} MiB, peak {:.1} MiB; CPU {:.3}s ({:.3}% of a core); \
         API requests {} ({} writes)",
        peak as f64 / 1024.0,
        cpu_after - cpu_before,
        (cpu_after - cpu_before) / seconds as f64 * 100.0,
        log.len(),
        log.iter().filter(|l| l.method != "GET").count(),
    );
    println!(
        "  → steady-state RSS under 16 MiB: {}",
        if peak as f64 / 1024.0 < 16.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    run_footprint(
        "8 GPUs, operands verified",
        &fake,
        "gpu-node-1",
        host.path(),
        seconds.min(20),
    );
}

/// A fresh 8-GPU node under `gpuprov run` (pending interval 1 s), until
/// its GPUReady condition is True and its startup taint gone.
fn time_to_gpu_ready(runs: usize) {
    let taint = "startup-taint.cluster-autoscaler.kubernetes.io/gpu-not-ready";
    let mut times = Vec::new();
    for _ in 0..runs {
        let fake = FakeApi::with_node("gpu-node-1", &[]);
        fake.set_taints("gpu-node-1", &[(taint, "NoSchedule")]);
        instant_cluster(&fake, 8);
        let host = support::copy_host("h100x8-nvswitch-preinstalled");
        let started = Instant::now();
        let daemon = Daemon::spawn(&fake, "gpu-node-1", host.path(), "5m", free_port());
        loop {
            let ready = fake
                .condition("gpu-node-1", "nvidia.com/GPUReady")
                .is_some_and(|c| c["status"] == "True");
            if ready && fake.taints("gpu-node-1").is_empty() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "never ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        times.push(started.elapsed());
        drop(daemon);
    }
    times.sort();
    println!(
        "fresh node → GPUReady=True, taint gone (`gpuprov run`, instant operands, --pending-interval 1s), {runs} runs: median {:.0} ms, max {:.0} ms",
        percentile(&times, 0.5).as_secs_f64() * 1000.0,
        times[times.len() - 1].as_secs_f64() * 1000.0,
    );
}

/// `gpuprov run` with the DaemonSet's defaults on the no-GPU fixture:
/// every state after `detect-gpu` is disabled at once.
fn without_a_gpu(seconds: u64) {
    let node = "cpu-node-1";
    let fake = FakeApi::with_node(node, &[]);
    let host = support::copy_host("no-gpu");
    let started = Instant::now();
    let daemon = Daemon::spawn(&fake, node, host.path(), "5m", free_port());
    eventually("run to converge", Duration::from_secs(30), || {
        fake.labels(node).contains_key("gpuprov.io/detect-gpu")
    });
    let first = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    fake.clear_log();
    let (_, cpu_before) = common::usage(daemon.0.id());
    let mut samples = Vec::new();
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(common::usage(daemon.0.id()).0);
    }
    let (_, cpu_after) = common::usage(daemon.0.id());
    let idle_requests = fake.log().len();
    drop(daemon);
    samples.sort();
    let median_mib = samples[samples.len() / 2] as f64 / 1024.0;
    let peak_mib = samples[samples.len() - 1] as f64 / 1024.0;

    println!(
        "`gpuprov run` without a GPU: first converge {:.0} ms after start; {seconds}s: RSS median {median_mib:.1} MiB, \
         peak {peak_mib:.1} MiB; CPU {:.3}s ({:.3}% of a core); API requests {idle_requests} in {seconds}s",
        first.as_secs_f64() * 1000.0,
        cpu_after - cpu_before,
        (cpu_after - cpu_before) / seconds as f64 * 100.0,
    );
    run_footprint("without a GPU", &fake, node, host.path(), seconds.min(20));
}

fn main() {
    if common::runs(2) == 2 {
        simulate(500, 25);
        steady_state(60);
        time_to_gpu_ready(5);
        without_a_gpu(60);
    } else {
        simulate(4, 2);
        steady_state(2);
        time_to_gpu_ready(1);
        without_a_gpu(2);
    }
}
