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
//!   requests per hour at the default drift interval;
//! * 2,000 simulated agents in this process: each holds the Node and pods
//!   watches `gpuprov run` holds (the same code, `Cluster::watch`), their
//!   timeout shortened, for the fleet's requests per second at steady
//!   state; then each walks a rolling upgrade with gpuprov's own slot code
//!   and actions (`upgrade::slots`, `upgrade::run::make`) and a fixed
//!   per-node upgrade time, for the upgrade's duration at
//!   `maxUnavailable: 10%`.
//!
//! Run with `cargo bench --bench fleet` (`cargo test` runs a small version).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gpuprov::kube::{Cluster, ClusterOptions};
use gpuprov::state::LabelsSet;

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

fn connect(fake: &FakeApi, node: &str) -> Cluster {
    Cluster::connect(&ClusterOptions {
        kubeconfig: Some(fake.kubeconfig()),
        node_name: Some(node.to_string()),
    })
    .unwrap()
}

/// `agents` simulated agents, each with `gpuprov run`'s two watches (its
/// Node, the DCGM exporter's pods on it) reopened every `timeout` instead
/// of every hour; their requests over `seconds`, scaled to the default.
fn steady_state_fleet(agents: usize, timeout: u64, seconds: u64) {
    let fake = FakeApi::start();
    let nodes: Vec<String> = (0..agents).map(|i| format!("node-{i}")).collect();
    for node in &nodes {
        fake.add_node(node, &[("nvidia.com/gpu.present", "true")], "kubelet");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // Each Cluster is dropped once its watches run (they have their own
    // thread, runtime and connections): 2,000 of them kept open would pass
    // this machine's 20,000 open files and silently starve some agents.
    let _watches: Vec<_> = nodes
        .iter()
        .map(|n| connect(&fake, n).watch(Duration::from_secs(timeout), stop.clone(), |_| {}))
        .collect();
    eventually("every watch open", Duration::from_secs(120), || {
        fake.log()
            .iter()
            .filter(|l| l.uri.contains("watch=true"))
            .count()
            >= 2 * agents
    });
    let opened = started.elapsed();
    fake.clear_log();
    std::thread::sleep(Duration::from_secs(seconds));
    let log = fake.log();
    stop.store(true, Ordering::Relaxed);
    let watches = log.iter().filter(|l| l.uri.contains("watch=true")).count();
    let node_watches = log
        .iter()
        .filter(|l| l.uri.contains("watch=true") && l.uri.contains("/nodes"))
        .count();
    // Reopenings per agent: each holds two watches.
    let mut per_agent: Vec<usize> = nodes
        .iter()
        .map(|n| {
            let (by_name, by_node) = (
                format!("metadata.name%3D{n}&"),
                format!("spec.nodeName%3D{n}&"),
            );
            log.iter()
                .filter(|l| l.uri.contains("watch=true"))
                .filter(|l| {
                    let uri = format!("{}&", l.uri);
                    uri.contains(&by_name) || uri.contains(&by_node)
                })
                .count()
        })
        .collect();
    per_agent.sort();
    println!(
        "  watch reopenings per agent in {seconds}s: min {}, median {}, max {} (node {node_watches}, pods {})",
        per_agent[0],
        per_agent[agents / 2],
        per_agent[agents - 1],
        watches - node_watches
    );
    let rps = log.len() as f64 / seconds as f64;
    let per_node_hour =
        log.len() as f64 / agents as f64 * (3600.0 / seconds as f64) * (timeout as f64 / 3600.0);
    println!(
        "{agents} agents' watches (all open in {opened:.1?}), reopened every {timeout}s: {} requests in {seconds}s ({watches} watch reopenings, {} writes) = {rps:.1} per second; at --watch-timeout 1h: {per_node_hour:.2} per node per hour, {:.2} per second for {agents} nodes, {:.2} for 5,000",
        log.len(),
        log.iter().filter(|l| l.method != "GET").count(),
        per_node_hour * agents as f64 / 3600.0,
        per_node_hour * 5000.0 / 3600.0,
    );
}

/// `agents` simulated agents roll a driver upgrade at `maxUnavailable:
/// 10%`: each waits for a slot as `gpuprov run` does (one list of the slot
/// Leases every `wait`, up to a fifth more at random), takes it, publishes
/// `cordon-required`, spends `per_node` upgrading, publishes
/// `upgrade-done` and gives the slot back, all through gpuprov's own
/// upgrade actions.
fn rolling_upgrade_fleet(agents: usize, per_node: Duration, wait: Duration) {
    use gpuprov::slots::{Fleet, take};
    use gpuprov::upgrade::run::make;
    use gpuprov::upgrade::{Action, State};
    let fake = FakeApi::start();
    let nodes: Vec<String> = (0..agents).map(|i| format!("node-{i}")).collect();
    for node in &nodes {
        fake.add_node(node, &[("nvidia.com/gpu.present", "true")], "kubelet");
    }
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.yaml");
    std::fs::write(
        &spec_path,
        "driver:\n  version: \"550.54.15\"\n  upgradePolicy: rolling\n  upgrade:\n    maxUnavailable: \"10%\"\n  install:\n    method: package\n    package: nvidia-driver\n    packageVersion: \"550.54.15-1\"\n",
    )
    .unwrap();
    let spec = gpuprov::spec::Spec::load(&spec_path).unwrap();
    let upgrade = spec.driver.upgrade.clone();
    let namespace = spec.operands.namespace.clone();
    fake.clear_log();
    let started = Instant::now();
    let agents_done: Vec<std::thread::JoinHandle<(Duration, usize)>> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let (cluster, upgrade, namespace) =
                (connect(&fake, node), upgrade.clone(), namespace.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut looks = 0;
                    loop {
                        looks += 1;
                        let fleet = Fleet::read(
                            &cluster,
                            &gpuprov::upgrade::SLOTS,
                            &namespace,
                            upgrade.max_unavailable,
                        )
                        .unwrap();
                        if (fleet.ours(&cluster.node).is_some() || fleet.free().is_some())
                            && take(
                                &cluster,
                                &gpuprov::upgrade::SLOTS,
                                &namespace,
                                fleet.slots,
                                upgrade.lease_duration_seconds,
                            )
                            .is_ok()
                        {
                            break;
                        }
                        // As --slot-wait-interval: up to a fifth more, spread by node.
                        std::thread::sleep(wait + wait.mul_f64((i * 7919 % 1000) as f64 / 5000.0));
                    }
                    let labels_set = LabelsSet::default();
                    let publish = |state| {
                        make(Some(&cluster), &Action::Publish { state }, &labels_set).unwrap()
                    };
                    publish(State::CordonRequired);
                    std::thread::sleep(per_node);
                    publish(State::UpgradeDone);
                    make(
                        Some(&cluster),
                        &Action::ReleaseSlot {
                            namespace: namespace.clone(),
                        },
                        &labels_set,
                    )
                    .unwrap();
                    (started.elapsed(), looks)
                })
                .unwrap()
        })
        .collect();
    let mut ends: Vec<(Duration, usize)> =
        agents_done.into_iter().map(|h| h.join().unwrap()).collect();
    let took = started.elapsed();
    ends.sort();
    let slots = (agents as u64 * 10).div_ceil(100);
    let waves = (agents as u64).div_ceil(slots);
    let ideal = per_node * waves as u32;
    // Replay the request log: the most nodes between cordon-required and
    // upgrade-done at once.
    let log = fake.log();
    let (_, most) = fake.walks(
        "gpuprov-driver-upgrade",
        "nvidia.com/gpu-driver-upgrade-state",
        "",
        |s| s == "cordon-required",
    );
    let lists = log
        .iter()
        .filter(|l| l.method == "GET" && l.uri.contains("/leases"))
        .count();
    let looks: usize = ends.iter().map(|(_, n)| n).sum();
    println!(
        "rolling upgrade, {agents} agents, maxUnavailable 10% ({slots} slots, {waves} waves of {per_node:?}: {ideal:?} at best), slot looked for every {wait:?}: all upgrade-done in {took:.1?} ({:.1}% over the best), p50 {:.1?}, p99 {:.1?}; at most {most} in progress at once ({}); {} requests ({:.1} per second; {lists} slot lists, {:.1} looks per node)",
        (took.as_secs_f64() / ideal.as_secs_f64() - 1.0) * 100.0,
        percentile(&ends.iter().map(|e| e.0).collect::<Vec<_>>(), 0.5),
        percentile(&ends.iter().map(|e| e.0).collect::<Vec<_>>(), 0.99),
        if most as u64 <= slots {
            "never over"
        } else {
            "OVER maxUnavailable"
        },
        log.len(),
        log.len() as f64 / took.as_secs_f64(),
        looks as f64 / agents as f64,
    );
}

fn main() {
    // `cargo bench --bench fleet -- NAME` runs only the parts whose name
    // holds NAME (`agents`, `rolling`, `simulate`, `steady`, `ready`, `without`).
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    if common::runs(2) == 2 {
        if wanted("agents") {
            steady_state_fleet(2000, 30, 120);
        }
        if wanted("rolling") {
            // 200 first: the same waves, a tenth of the load on this machine.
            rolling_upgrade_fleet(200, Duration::from_secs(10), Duration::from_secs(1));
            rolling_upgrade_fleet(2000, Duration::from_secs(10), Duration::from_secs(1));
        }
        if wanted("simulate") {
            simulate(2000, 25);
        }
        if wanted("steady") {
            steady_state(60);
        }
        if wanted("ready") {
            time_to_gpu_ready(5);
        }
        if wanted("without") {
            without_a_gpu(60);
        }
    } else {
        steady_state_fleet(20, 2, 3);
        rolling_upgrade_fleet(20, Duration::from_millis(300), Duration::from_millis(100));
        simulate(4, 2);
        steady_state(2);
        time_to_gpu_ready(1);
        without_a_gpu(2);
    }
}
