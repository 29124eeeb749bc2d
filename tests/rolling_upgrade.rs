//! Rolling driver upgrades (`driver.upgradePolicy: rolling`, issue 17):
//! `gpuprov apply` against the loopback fake API server, which keeps
//! Leases (with resourceVersion conflicts), evicts pods (a
//! PodDisruptionBudget may refuse) and cordons Nodes. The fixture host
//! `a100-preinstalled` has 535.161.08 loaded; the installer the test serves
//! puts 550.54.15 in place, and the fixture's modprobe loads it.

mod support;

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
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
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
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
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
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/gpu-driver-upgrade.skip", "true")]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
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
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
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
    let notes: Vec<String> = fake
        .events()
        .iter()
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect();
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
