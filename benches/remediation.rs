//! GPU fault remediation benchmarks against the loopback fake API server:
//!
//! * time from an XID event to gpuprov's taint on the Node: `gpuprov run`
//!   on the HGX H100 fixture host, the XID written into the fake NVML
//!   library's event set, the Node polled every millisecond; each run then
//!   waits for the node to recover before the next;
//! * a fleet of simulated agents in this process, a fifth of them faulting
//!   at once, each walking remediation with gpuprov's own code (its
//!   actions made through `CapabilityChange::make`, its slots and storm
//!   checks from `gpuprov::slots` and `gpuprov::remediation::storm`): once
//!   with the storm threshold out of reach, for the most nodes ever past
//!   `taint` against `maxUnavailable`, and once with the default storm
//!   threshold (10%), for when the storm stopped the fleet and what got
//!   past `taint` before; API requests per second during each.
//!
//! Run with `cargo bench --bench remediation` (`cargo test` runs a small
//! version).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use gpuprov::kube::{Cluster, ClusterOptions};
use gpuprov::remediation::action::Action;
use gpuprov::remediation::record::Stage;
use gpuprov::remediation::{SLOTS, storm};
use gpuprov::slots::{Fleet, take};
use gpuprov::state::{CapabilityChange, LabelsSet, MakeContext};

use support::fake_api::FakeApi;

const NAMESPACE: &str = "gpuprov";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// XID → taint, `runs` times on one `gpuprov run`.
fn xid_to_taint(runs: usize) {
    let node = "gpu-node-1";
    let fake = FakeApi::with_node(node, &[("nvidia.com/gpu.present", "true")]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    let fixture = support::telemetry_fixture(host.path());
    let events = host.path().join("nvml-events");
    std::fs::write(&events, "").unwrap();
    let spec = support::write_spec(
        host.path(),
        "node.yaml",
        "health:\n  recoverAfterSeconds: 1\nremediation:\n  enabled: true\n  flapWindowSeconds: 1\n  policy:\n    resetNeeded: taint\n",
    );
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"))
        .env("GPUPROV_FAKE_NVML", &fixture)
        .env("GPUPROV_FAKE_NVML_EVENTS", &events)
        .args(["run", "--host-exec", "prefix", "--node-name", node])
        .arg("--nvml-lib")
        .arg(support::fake_nvml_library())
        .arg("--config")
        .arg(&spec)
        .args(["--drift-interval", "1h", "--pending-interval", "1s"])
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host.path())
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("KUBECONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = support::daemon::Daemon(child);
    let remediation = |value: &str| {
        fake.labels(node)
            .get("gpuprov.io/gpu-remediation")
            .map(String::as_str)
            == Some(value)
    };
    support::daemon::eventually("converged", Duration::from_secs(60), || {
        remediation("ready")
    });
    let tainted = || {
        fake.taints(node)
            .iter()
            .any(|t| t.starts_with("gpuprov.io/gpu-fault"))
    };
    let mut times = Vec::new();
    for run in 0..runs {
        // Different GPUs, so each is a new error.
        let line = format!("{} xid 48\n", run % 8);
        let started = Instant::now();
        {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&events)
                .unwrap();
            file.write_all(line.as_bytes()).unwrap();
        }
        while !tainted() {
            assert!(started.elapsed() < Duration::from_secs(30), "no taint");
            std::thread::sleep(Duration::from_millis(1));
        }
        times.push(started.elapsed());
        support::daemon::eventually("recovered", Duration::from_secs(30), || {
            !tainted() && remediation("ready")
        });
        // Past the flap window.
        std::thread::sleep(Duration::from_millis(1100));
    }
    times.sort();
    println!(
        "XID event to the taint on the Node ({runs} runs, gpuprov run, policy taint): median {:.1?}, p99 {:.1?}, max {:.1?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}

fn connect(fake: &FakeApi, node: &str) -> Cluster {
    Cluster::connect(&ClusterOptions {
        kubeconfig: Some(fake.kubeconfig()),
        node_name: Some(node.to_string()),
    })
    .unwrap()
}

/// How one simulated agent's remediation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Remediated,
    StormHold,
}

/// `agents` GPU nodes, `faulting` of them with a reset-class fault at
/// once, `maxUnavailable: 10%`, the storm at `storm`; each remediation
/// takes `per_node`, a waiting node looks again every `wait`.
fn storm_fleet(agents: usize, faulting: usize, storm: &str, per_node: Duration, wait: Duration) {
    let fake = FakeApi::start();
    let nodes: Vec<String> = (0..agents).map(|i| format!("node-{i}")).collect();
    for node in &nodes {
        fake.add_node(node, &[("nvidia.com/gpu.present", "true")], "kubelet");
    }
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.yaml");
    std::fs::write(
        &spec_path,
        format!(
            "remediation:\n  enabled: true\n  maxUnavailable: \"10%\"\n  storm:\n    maxFaultingNodes: {storm}\n    windowSeconds: 600\n"
        ),
    )
    .unwrap();
    let spec = gpuprov::spec::Spec::load(&spec_path).unwrap();
    let remediation = spec.remediation.clone();
    fake.clear_log();
    let started = Instant::now();
    let done: Vec<std::thread::JoinHandle<(Duration, Ended)>> = nodes
        .iter()
        .take(faulting)
        .enumerate()
        .map(|(i, node)| {
            let cluster = connect(&fake, node);
            let remediation = remediation.clone();
            let host_dir = dir.path().join(node);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    std::fs::create_dir_all(&host_dir).unwrap();
                    let host = gpuprov::host::Host::new(
                        &host_dir,
                        gpuprov::host::CommandMode::Prefix,
                        Duration::from_secs(5),
                    )
                    .unwrap();
                    let labels_set = LabelsSet::default();
                    let mut commands = Vec::new();
                    let mut make = |action: Action| {
                        let mut on = MakeContext {
                            host: &host,
                            cluster: Some(&cluster),
                            commands: &mut commands,
                            labels_set: &labels_set,
                        };
                        action.make(&mut on)
                    };
                    let since = gpuprov::remediation::now();
                    let publish = |stage| Action::Publish {
                        stage,
                        fault_since: Some(since),
                    };
                    make(publish(Stage::Tainted)).unwrap();
                    loop {
                        if storm::raised(&cluster, NAMESPACE).unwrap().is_some() {
                            make(publish(Stage::StormHold)).unwrap();
                            return (started.elapsed(), Ended::StormHold);
                        }
                        let fleet =
                            Fleet::read(&cluster, &SLOTS, NAMESPACE, remediation.max_unavailable)
                                .unwrap();
                        if fleet.ours(&cluster.node).is_none() && fleet.free().is_some() {
                            let (count, threshold) = storm::count(&cluster, &remediation).unwrap();
                            if count > threshold {
                                make(Action::RaiseStorm {
                                    namespace: NAMESPACE.into(),
                                    faulting: count,
                                    threshold,
                                })
                                .unwrap();
                                make(publish(Stage::StormHold)).unwrap();
                                return (started.elapsed(), Ended::StormHold);
                            }
                            if take(
                                &cluster,
                                &SLOTS,
                                NAMESPACE,
                                fleet.slots,
                                remediation.lease_duration_seconds,
                            )
                            .is_ok()
                            {
                                break;
                            }
                        }
                        // As --slot-wait-interval: up to a fifth more, spread by node.
                        std::thread::sleep(wait + wait.mul_f64((i * 7919 % 1000) as f64 / 5000.0));
                    }
                    make(publish(Stage::Draining)).unwrap();
                    std::thread::sleep(per_node);
                    make(Action::Publish {
                        stage: Stage::Recovered,
                        fault_since: None,
                    })
                    .unwrap();
                    make(Action::ReleaseSlot {
                        namespace: NAMESPACE.into(),
                    })
                    .unwrap();
                    (started.elapsed(), Ended::Remediated)
                })
                .unwrap()
        })
        .collect();
    let ends: Vec<(Duration, Ended)> = done.into_iter().map(|h| h.join().unwrap()).collect();
    let took = started.elapsed();
    let log = fake.log();
    // Replay the log: the most nodes past taint at once.
    let (_, most) = fake.walks(
        "gpuprov-remediation",
        "gpuprov.io/remediation",
        "healthy",
        |s| s == "draining",
    );
    let slots = (agents as u64 * 10).div_ceil(100);
    let remediated = ends.iter().filter(|e| e.1 == Ended::Remediated).count();
    let held = ends.len() - remediated;
    let stormed_at = ends
        .iter()
        .filter(|e| e.1 == Ended::StormHold)
        .map(|e| e.0)
        .min();
    println!(
        "{agents} GPU nodes, {faulting} faulting at once, maxUnavailable 10% ({slots} slots), storm past {storm}: {remediated} remediated, {held} held by a storm{}; at most {most} past taint at once ({}); done in {took:.1?}; {} API requests ({:.0} per second)",
        stormed_at.map_or(String::new(), |t| format!(
            " (the first {t:.1?} after the faults)"
        )),
        if most as u64 <= slots {
            "never over"
        } else {
            "OVER maxUnavailable"
        },
        log.len(),
        log.len() as f64 / took.as_secs_f64(),
    );
}

fn main() {
    // `cargo bench --bench remediation -- NAME` runs only the parts whose
    // name holds NAME (`taint`, `fleet`, `storm`).
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    if common::runs(2) == 2 {
        if wanted("taint") {
            xid_to_taint(30);
        }
        if wanted("fleet") {
            storm_fleet(
                2000,
                400,
                "\"100%\"",
                Duration::from_secs(5),
                Duration::from_secs(1),
            );
        }
        if wanted("storm") {
            storm_fleet(
                2000,
                400,
                "\"10%\"",
                Duration::from_secs(5),
                Duration::from_secs(1),
            );
        }
    } else {
        xid_to_taint(2);
        storm_fleet(
            20,
            8,
            "\"100%\"",
            Duration::from_millis(200),
            Duration::from_millis(100),
        );
        storm_fleet(
            20,
            8,
            "\"10%\"",
            Duration::from_millis(200),
            Duration::from_millis(100),
        );
    }
}
