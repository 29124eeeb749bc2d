//! Rolling driver upgrades (`driver.upgradePolicy: rolling`, issue 17):
//! `gpuprov apply` against the loopback fake API server, which keeps
//! Leases (with resourceVersion conflicts), evicts pods (a
//! PodDisruptionBudget may refuse) and cordons Nodes. The fixture host
//! `a100-preinstalled` has 535.161.08 loaded; the installer the test serves
//! puts 550.54.15 in place, and the fixture's modprobe loads it.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::artifact_server::{ArtifactServer, Route};
use support::fake_api::FakeApi;
use support::{copy_host, steps, write_spec};

const NODE: &str = "gpu-node-1";
const VERSION: &str = "550.54.15";
const STATE: &str = "nvidia.com/gpu-driver-upgrade-state";

fn installer() -> Vec<u8> {
    support::fake_driver_installer(VERSION)
}

/// The artifact server with the new driver's installer, and the fake API
/// server with `first` (labelled `labels`) and `more` nodes, playing a
/// working cluster.
fn cluster(first: &str, labels: &[(&str, &str)], more: &[&str]) -> (ArtifactServer, FakeApi) {
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let fake = FakeApi::with_node(first, labels);
    for node in more {
        fake.add_node(node, &[], "kubelet");
    }
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    (server, fake)
}

/// Waits for the slots to be given back (each right after its node's
/// `upgrade-done`).
fn slots_given_back(fake: &FakeApi) {
    support::daemon::eventually(
        "every slot given back",
        std::time::Duration::from_secs(10),
        || fake.leases("gpuprov").is_empty(),
    );
}

/// The notes of the Events gpuprov posted, oldest first.
fn event_notes(fake: &FakeApi) -> Vec<String> {
    fake.events()
        .iter()
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    support::sha256_hex(bytes)
}

fn spec(host: &Path, server: &ArtifactServer, upgrade: &str) -> std::path::PathBuf {
    write_spec(
        host,
        "rolling.yaml",
        &format!(
            "driver:\n  version: \"{VERSION}\"\n  upgradePolicy: rolling\n{upgrade}  install:\n    method: runfile\n    url: {}\n    sha256: {}\n    allowInsecureHttp: true\ncontainerd:\n  restartMode: none\n",
            server.url("/driver.run"),
            sha(&installer())
        ),
    )
}

/// Applies again while the node is `pending` (operands starting, the
/// validator), five times at most, as `gpuprov run` would.
fn apply_until_settled(
    fake: &FakeApi,
    host: &Path,
    spec: &Path,
) -> (i32, serde_json::Value, String) {
    let mut last = apply(fake, host, spec);
    for _ in 0..4 {
        if last.0 != 3 {
            break;
        }
        last = apply(fake, host, spec);
    }
    last
}

fn apply(fake: &FakeApi, host: &Path, spec: &Path) -> (i32, serde_json::Value, String) {
    let kubeconfig = fake.kubeconfig();
    support::apply_json(
        host,
        &[
            "--config",
            spec.to_str().unwrap(),
            "--node-name",
            NODE,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
}

/// The states published, in order, from the API server's request log.
fn published(fake: &FakeApi) -> Vec<String> {
    fake.log()
        .iter()
        .filter(|l| l.method == "PATCH" && l.uri.contains("fieldManager=gpuprov-driver-upgrade"))
        .filter_map(|l| {
            let body: serde_json::Value = serde_json::from_str(&l.body).ok()?;
            Some(body["metadata"]["labels"][STATE].as_str()?.to_string())
        })
        .collect()
}

fn loaded(host: &Path) -> String {
    std::fs::read_to_string(host.join("proc/driver/nvidia/version")).unwrap_or_default()
}

/// One node walks the whole sequence: a slot, cordon, its GPU pod
/// deleted, a drain that evicts a web pod (the operands' pods stay),
/// the driver replaced, the validator, uncordon, the slot given back.
#[test]
fn a_node_walks_the_upgrade_states_and_gives_its_slot_back() {
    let (server, fake) = cluster(NODE, &[], &[]);
    fake.add_gpu_pod("ml", "train-0", NODE, &[("app", "train")], 1);
    fake.add_gpu_pod("web", "frontend-0", NODE, &[("app", "web")], 0);
    let host = copy_host("a100-preinstalled");
    let spec = spec(
        host.path(),
        &server,
        "  upgrade:\n    drain:\n      enable: true\n      podSelector: app=web\n      timeoutSeconds: 30\n",
    );

    let (code, report, stderr) = apply_until_settled(&fake, host.path(), &spec);
    assert_eq!(code, 0, "{stderr}\n{:#?}", steps(&report));
    assert_eq!(
        steps(&report)["driver"].1,
        "installed",
        "{:#?}",
        steps(&report)
    );
    assert!(loaded(host.path()).contains(VERSION));
    assert_eq!(
        published(&fake),
        [
            "cordon-required",
            "wait-for-jobs-required",
            "pod-deletion-required",
            "drain-required",
            "pod-restart-required",
            "validation-required",
            "uncordon-required",
            "upgrade-done",
        ]
    );
    assert_eq!(fake.labels(NODE)[STATE], "upgrade-done");
    // Cordoned before the GPU pod went, uncordoned after the validation
    // pod passed with the new driver.
    let log = fake.log();
    let at = |what: &dyn Fn(&support::fake_api::Logged) -> bool| {
        log.iter()
            .position(what)
            .unwrap_or_else(|| panic!("not in the log"))
    };
    let cordon = at(&|l| l.method == "PATCH" && l.body.contains("\"unschedulable\":true"));
    let deleted = at(&|l| l.method == "DELETE" && l.uri.contains("/pods/train-0"));
    let evicted = at(&|l| l.method == "POST" && l.uri.ends_with("/pods/frontend-0/eviction"));
    let validated =
        at(&|l| l.method == "POST" && l.uri.ends_with("/pods") && l.body.contains("vectoradd"));
    let uncordon = at(&|l| l.method == "PATCH" && l.body.contains("\"unschedulable\":null"));
    assert!(cordon < deleted && deleted < evicted && evicted < validated && validated < uncordon);
    assert!(!fake.unschedulable(NODE));
    assert!(fake.leases("gpuprov").is_empty(), "the slot is given back");
    let pods: Vec<String> = fake
        .pods()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !pods.iter().any(|p| p == "train-0" || p == "frontend-0"),
        "{pods:?}"
    );
    assert!(
        pods.iter().any(|p| p.starts_with("nvidia-dcgm-exporter")),
        "the operands' pods stay: {pods:?}"
    );

    // Converged: nothing more is written.
    fake.clear_log();
    let (code, _, _) = apply(&fake, host.path(), &spec);
    assert_eq!(code, 0);
    assert!(fake.writes().is_empty(), "{:#?}", fake.writes());
}

/// `plan` shows the whole sequence and the slot it would take, and
/// changes nothing.
#[test]
fn plan_shows_the_sequence_and_the_slot() {
    let (server, fake) = cluster(NODE, &[], &[]);
    let host = copy_host("a100-preinstalled");
    let spec = spec(host.path(), &server, "  upgrade:\n    maxUnavailable: 2\n");
    let mut command = support::gpuprov();
    command.args(["plan", "--host-exec", "prefix", "--host-root"]);
    command.arg(host.path()).arg("--config").arg(&spec);
    support::against(&mut command, Some(&fake), NODE);
    let output = command.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    for line in [
        "in upgrade slot 1 of 2",
        "take an upgrade slot (one of 2 Leases gpuprov/gpuprov-driver-upgrade-N)",
        "label the node nvidia.com/gpu-driver-upgrade-state=cordon-required",
        "cordon the node",
        "delete the pods on this node that use NVIDIA GPUs",
        "run: modprobe -r nvidia-modeset",
        "label the node nvidia.com/gpu-driver-upgrade-state=validation-required",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
    assert!(fake.writes().is_empty(), "{:#?}", fake.writes());
    assert!(fake.leases("gpuprov").is_empty());
}

/// The skip label keeps the driver: no slot, no state.
#[test]
fn the_skip_label_is_obeyed() {
    let (server, fake) = cluster(NODE, &[("nvidia.com/gpu-driver-upgrade.skip", "true")], &[]);
    let host = copy_host("a100-preinstalled");
    let spec = spec(host.path(), &server, "");
    let (code, report, stderr) = apply_until_settled(&fake, host.path(), &spec);
    assert_eq!(code, 0, "{stderr}\n{:#?}", steps(&report));
    assert!(
        steps(&report)["driver"]
            .2
            .contains("nvidia.com/gpu-driver-upgrade.skip=true keeps it"),
        "{:?}",
        steps(&report)["driver"]
    );
    assert!(!loaded(host.path()).contains(VERSION));
    assert!(fake.leases("gpuprov").is_empty());
    assert!(!fake.labels(NODE).contains_key(STATE));
}

/// A PodDisruptionBudget that never allows the eviction: the drain times
/// out, the node is `upgrade-failed`, stays cordoned, and (with
/// `failurePolicy: releaseSlot`) gives its slot back; the driver is not
/// touched.
#[test]
fn a_pdb_that_blocks_the_drain_fails_the_upgrade() {
    let (server, fake) = cluster(NODE, &[], &[]);
    fake.add_gpu_pod("web", "db-0", NODE, &[("app", "db")], 0);
    fake.protect_pods("web", "db-");
    let host = copy_host("a100-preinstalled");
    let spec = spec(
        host.path(),
        &server,
        "  upgrade:\n    failurePolicy: releaseSlot\n    drain:\n      enable: true\n      timeoutSeconds: 3\n",
    );
    let (code, report, _) = apply(&fake, host.path(), &spec);
    assert_ne!(code, 0);
    let driver = &steps(&report)["driver"];
    assert_eq!(
        driver.1,
        "failed",
        "{driver:?}\n{:#?}",
        fake.log()
            .iter()
            .map(|l| format!("{} {}", l.method, l.uri))
            .collect::<Vec<_>>()
    );
    assert!(
        driver.2.contains("drain: not done within 3s: web/db-0: Cannot evict pod as it would violate the pod's disruption budget."),
        "{driver:?}"
    );
    assert_eq!(fake.labels(NODE)[STATE], "upgrade-failed");
    assert!(fake.unschedulable(NODE));
    assert!(
        fake.leases("gpuprov").is_empty(),
        "releaseSlot gives it back"
    );
    assert!(!loaded(host.path()).contains(VERSION));
    let notes = event_notes(&fake);
    assert!(
        notes.iter().any(|n| n.contains("disruption budget")),
        "{notes:#?}"
    );

    // It stays so until someone looks.
    let (_, report, _) = apply(&fake, host.path(), &spec);
    assert!(
        steps(&report)["driver"]
            .2
            .contains("set nvidia.com/gpu-driver-upgrade-state=upgrade-required to try again"),
        "{:?}",
        steps(&report)["driver"]
    );
}

/// `maxUnavailable` as a percentage is of the fleet's GPU nodes (those
/// labelled `nvidia.com/gpu.present=true`), rounded up: 40% of 5 is 2 (of all 6 nodes it would be 3).
#[test]
fn a_percentage_counts_the_gpu_nodes() {
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/gpu.present", "true")]);
    for i in 2..=5 {
        fake.add_node(
            &format!("gpu-node-{i}"),
            &[("nvidia.com/gpu.present", "true")],
            "kubelet",
        );
    }
    fake.add_node("cpu-node-1", &[], "kubelet");
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    let host = copy_host("a100-preinstalled");
    let spec = spec(
        host.path(),
        &server,
        "  upgrade:\n    maxUnavailable: \"40%\"\n",
    );
    let mut command = support::gpuprov();
    command.args(["plan", "--host-exec", "prefix", "--host-root"]);
    command.arg(host.path()).arg("--config").arg(&spec);
    support::against(&mut command, Some(&fake), NODE);
    let text = String::from_utf8_lossy(&command.output().unwrap().stdout).into_owned();
    assert!(text.contains("in upgrade slot 1 of 2"), "{text}");
}

/// `gpuprov run` for `node` with the rolling spec, looking for a free slot
/// every second; its log goes to `<host>/gpuprov.log`.
fn agent(fake: &FakeApi, node: &str, host: &Path, spec: &Path) -> support::daemon::Daemon {
    let log = std::fs::File::create(host.join("gpuprov.log")).unwrap();
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"))
        .env(
            "GPUPROV_FAKE_NVML",
            support::repo().join("fixtures/nvml/a100.yaml"),
        )
        .args(["run", "--host-exec", "prefix", "--node-name", node])
        .arg("--config")
        .arg(spec)
        .args(["--drift-interval", "1h", "--pending-interval", "1s"])
        .args(["--slot-wait-interval", "1s"])
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("KUBECONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    support::daemon::Daemon(child)
}

/// Each node's published upgrade states in the order the API server got
/// them, and the most nodes between `cordon-required` and
/// `uncordon-required` at any moment.
fn walk_of_the_fleet(fake: &FakeApi) -> (BTreeMap<String, Vec<String>>, usize) {
    fake.walks("gpuprov-driver-upgrade", STATE, "", |s| {
        !matches!(s, "upgrade-required" | "upgrade-done" | "upgrade-failed")
    })
}

/// Ten node agents (`gpuprov run`, one process each) and a version change
/// under `maxUnavailable: 2`: the API server's log proves no more than two
/// nodes were ever past `cordon-required` at once, and all ten end
/// `upgrade-done` on the new driver, uncordoned, holding no slot.
#[test]
fn ten_agents_upgrade_no_more_than_two_at_a_time() {
    let nodes: Vec<String> = (1..=10).map(|i| format!("gpu-node-{i}")).collect();
    let more: Vec<&str> = nodes[1..].iter().map(String::as_str).collect();
    let (server, fake) = cluster(&nodes[0], &[], &more);
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), &server, "  upgrade:\n    maxUnavailable: 2\n");
    let hosts: Vec<tempfile::TempDir> = nodes
        .iter()
        .map(|_| copy_host("a100-preinstalled"))
        .collect();
    let _agents: Vec<support::daemon::Daemon> = nodes
        .iter()
        .zip(&hosts)
        .map(|(node, host)| agent(&fake, node, host.path(), &spec))
        .collect();

    let done = |fake: &FakeApi| {
        nodes
            .iter()
            .all(|n| fake.labels(n).get(STATE).map(String::as_str) == Some("upgrade-done"))
    };
    let started = std::time::Instant::now();
    while !done(&fake) && started.elapsed() < std::time::Duration::from_secs(180) {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let (walks, most) = walk_of_the_fleet(&fake);
    let logs: Vec<String> = hosts
        .iter()
        .map(|h| std::fs::read_to_string(h.path().join("gpuprov.log")).unwrap_or_default())
        .collect();
    assert!(
        done(&fake),
        "not all upgrade-done: {walks:#?}\n{}",
        logs.join("\n----\n")
    );
    assert!(
        most <= 2,
        "{most} nodes past cordon-required at once: {walks:#?}"
    );
    assert!(most >= 1);
    // Waiting nodes poll the slots from the API server's cache.
    assert!(
        fake.log()
            .iter()
            .any(|l| l.uri.contains("/leases?") && l.uri.contains("resourceVersion=0")),
        "no cached list of the slots"
    );
    for (node, host) in nodes.iter().zip(&hosts) {
        assert!(loaded(host.path()).contains(VERSION), "{node}");
        assert!(!fake.unschedulable(node), "{node} is still cordoned");
        assert_eq!(walks[node].last().unwrap(), "upgrade-done", "{node}");
    }
    slots_given_back(&fake);
}

/// A node killed mid-upgrade (waiting for a job) stops renewing its slot,
/// but stays cordoned: it is still out of service, so its expired slot is
/// not free, and the other node waits rather than take a second node out
/// (a real API server showed three nodes past cordon under
/// `maxUnavailable: 2` before). The killed node, restarted after its job
/// ended, resumes from the state it published and finishes; then the
/// other node takes the slot.
#[test]
fn a_node_killed_mid_upgrade_keeps_its_slot_until_it_resumes() {
    let (first, second) = ("gpu-node-1", "gpu-node-2");
    let (server, fake) = cluster(first, &[], &[second]);
    fake.add_gpu_pod("ml", "train-0", first, &[("app", "train")], 1);
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(
        dir.path(),
        &server,
        "  upgrade:\n    leaseDurationSeconds: 3\n    waitForJobs:\n      podSelector: app=train\n",
    );
    let (host1, host2) = (
        copy_host("a100-preinstalled"),
        copy_host("a100-preinstalled"),
    );
    let state = |node: &str| fake.labels(node).get(STATE).cloned().unwrap_or_default();

    let mut killed = agent(&fake, first, host1.path(), &spec);
    support::daemon::eventually(
        "the first node waits for its job",
        std::time::Duration::from_secs(60),
        || state(first) == "wait-for-jobs-required",
    );
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    assert_eq!(fake.leases("gpuprov")["gpuprov-driver-upgrade-0"], first);

    let _second = agent(&fake, second, host2.path(), &spec);
    support::daemon::eventually(
        "the second node waits for the slot",
        std::time::Duration::from_secs(60),
        || state(second) == "upgrade-required",
    );
    // Well past the dead node's Lease: still nobody else past cordon.
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert_eq!(state(second), "upgrade-required");
    assert!(!fake.unschedulable(second), "the second node was cordoned");
    assert_eq!(fake.leases("gpuprov")["gpuprov-driver-upgrade-0"], first);
    assert!(fake.unschedulable(first), "the killed node stays cordoned");

    fake.set_pod_phase("ml", "train-0", "Succeeded");
    let _restarted = agent(&fake, first, host1.path(), &spec);
    for node in [first, second] {
        support::daemon::eventually(
            &format!("{node} finishes"),
            std::time::Duration::from_secs(90),
            || state(node) == "upgrade-done",
        );
    }
    let (walks, most) = walk_of_the_fleet(&fake);
    assert_eq!(
        walks[first],
        [
            "cordon-required",
            "wait-for-jobs-required",
            // Restarted: from the state it published.
            "wait-for-jobs-required",
            "pod-deletion-required",
            "drain-required",
            "pod-restart-required",
            "validation-required",
            "uncordon-required",
            "upgrade-done",
        ],
        "{walks:#?}"
    );
    assert_eq!(most, 1, "one node out at a time: {walks:#?}");
    assert!(loaded(host1.path()).contains(VERSION));
    assert!(loaded(host2.path()).contains(VERSION));
    assert!(!fake.unschedulable(first) && !fake.unschedulable(second));
    slots_given_back(&fake);
}

/// The validation pod fails with the new driver: the upgrade failed, the
/// node stays cordoned, and the Node's event says why.
#[test]
fn a_failed_validation_fails_the_upgrade() {
    let (server, fake) = cluster(NODE, &[], &[]);
    fake.kubelet(support::fake_api::Kubelet::Runs {
        phase: "Failed",
        after_ms: 0,
        log: "CUDA error: no CUDA-capable device is detected\n".to_string(),
        exit_code: 1,
    });
    let host = copy_host("a100-preinstalled");
    let spec = spec(host.path(), &server, "");
    let (code, report, _) = apply_until_settled(&fake, host.path(), &spec);
    assert_ne!(code, 0);
    assert_eq!(
        steps(&report)["validator"].1,
        "failed",
        "{:#?}",
        steps(&report)
    );
    assert!(loaded(host.path()).contains(VERSION));
    assert_eq!(fake.labels(NODE)[STATE], "upgrade-failed");
    assert!(fake.unschedulable(NODE));
    assert_eq!(
        fake.leases("gpuprov").len(),
        1,
        "holdSlot (the default) keeps the slot: the fleet stops here"
    );
    let notes = event_notes(&fake);
    assert!(
        notes.iter().any(|n| n.contains("no CUDA-capable device")),
        "{notes:#?}"
    );
}
