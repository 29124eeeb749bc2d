//! The operands (device plugin, DCGM exporter, GFD) and the validation,
//! through `apply` on a fixture host: against the fake API server, which
//! plays the operands' DaemonSets and the kubelet, and without one (static
//! pods, host checks). Then the seed's deployment scenarios end to end.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::fake_api::{FakeApi, Kubelet};
use support::{copy_host, fake_nvml_library, gpuprov_with_fake_nvml, repo, steps, write_spec};

const NODE: &str = "gpu-node-1";
const A100: &str = "NVIDIA-A100-SXM4-40GB";
const MANIFESTS: &str = "etc/kubernetes/manifests";
const MARKER: &str = "run/gpuprov/validations/cuda-vectoradd.json";

/// A cluster with NODE (an A100 node, as the host fixture and fake NVML say).
fn cluster(labels: &[(&str, &str)]) -> FakeApi {
    FakeApi::with_node(NODE, labels)
}

/// A cluster whose operands follow gpuprov's labels and whose kubelet runs
/// the validation pod to success.
fn working_cluster(labels: &[(&str, &str)]) -> FakeApi {
    let fake = cluster(labels);
    fake.run_working_cluster(1, A100);
    fake
}

/// `apply --output json` on `host` (NVML answering from a100.yaml),
/// against `fake` when given; the exit code, the report and stderr.
fn apply(
    fake: Option<&FakeApi>,
    host: &Path,
    spec: Option<&Path>,
    extra: &[&str],
) -> (i32, Value, String) {
    let mut cmd = gpuprov_with_fake_nvml("a100.yaml");
    cmd.args(["apply", "--output", "json", "--host-exec", "prefix"])
        .arg("--nvml-lib")
        .arg(fake_nvml_library())
        .arg("--host-root")
        .arg(host);
    if let Some(fake) = fake {
        cmd.args(["--node-name", NODE])
            .arg("--kubeconfig")
            .arg(fake.kubeconfig());
    }
    if let Some(spec) = spec {
        cmd.arg("--config").arg(spec);
    }
    let output = cmd.args(extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
    (output.status.code().unwrap(), report, stderr)
}

/// Applies until the node converges (the first run starts the operands,
/// the next finds them running); fails after three runs.
fn converge(fake: &FakeApi, host: &Path, spec: Option<&Path>) -> Value {
    let mut last = String::new();
    for _ in 0..3 {
        let (code, report, stderr) = apply(Some(fake), host, spec, &[]);
        if code == 0 {
            return report;
        }
        assert_eq!(code, 3, "{stderr}");
        last = format!("{:#?}", steps(&report));
    }
    panic!("not converged after three runs: {last}");
}

fn outcome(report: &Value, step: &str) -> (String, String, String) {
    steps(report)
        .remove(step)
        .unwrap_or_else(|| panic!("no step {step}"))
}

fn spec_file(host: &Path, yaml: &str) -> PathBuf {
    write_spec(host, "node.yaml", yaml)
}

/// The validation pods the server saw created, as sent.
fn validation_pods_created(fake: &FakeApi) -> Vec<Value> {
    fake.log()
        .into_iter()
        .filter(|l| l.method == "POST" && l.uri.contains("/pods"))
        .map(|l| serde_json::from_str(&l.body).unwrap())
        .collect()
}

/// A spec with only `keep` of the operands and the validator enabled.
fn only(host: &Path, keep: &str) -> PathBuf {
    let mut spec: String = ["devicePlugin", "dcgmExporter", "gfd", "validator"]
        .iter()
        .filter(|k| **k != keep)
        .map(|k| format!("{k}:\n  enabled: false\n"))
        .collect();
    // GFD the operand, not the built-in labels.
    if keep == "gfd" {
        spec.push_str("gfd:\n  mode: daemonset\n");
    }
    spec_file(host, &spec)
}

#[test]
fn the_device_plugin_is_pending_until_the_node_offers_every_gpu() {
    let fake = cluster(&[]);
    let host = copy_host("a100-preinstalled");
    let spec = only(host.path(), "devicePlugin");

    let (code, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(code, 3, "pending is not converged");
    let (action, state, reason) = outcome(&report, "device-plugin");
    assert_eq!((action.as_str(), state.as_str()), ("wait", "pending"));
    assert!(
        reason.contains("nvidia.com/gpu.deploy.device-plugin=true"),
        "{reason}"
    );
    assert_eq!(
        fake.labels(NODE)["nvidia.com/gpu.deploy.device-plugin"],
        "true"
    );
    assert_eq!(fake.labels(NODE)["gpuprov.io/device-plugin"], "pending");

    // Labelled, but the plugin has not registered yet.
    let (code, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(code, 3);
    let (_, state, reason) = outcome(&report, "device-plugin");
    assert_eq!(state, "pending");
    assert!(
        reason.contains("allocatable nvidia.com/gpu is none, want 1"),
        "{reason}"
    );

    // The plugin registers: the kubelet sets allocatable.
    fake.set_allocatable(NODE, "nvidia.com/gpu", "1");
    let (code, report, stderr) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(outcome(&report, "device-plugin").1, "ready");
    assert_eq!(fake.labels(NODE)["gpuprov.io/device-plugin"], "ready");
    assert!(
        !host.path().join(MANIFESTS).exists(),
        "labels, not static pods, with an API server"
    );
}

#[test]
fn the_dcgm_exporter_is_ready_once_its_pod_on_this_node_is_ready() {
    let fake = cluster(&[]);
    let host = copy_host("a100-preinstalled");
    let spec = only(host.path(), "dcgmExporter");
    apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(
        fake.labels(NODE)["nvidia.com/gpu.deploy.dcgm-exporter"],
        "true"
    );

    let exporter = [("app", "nvidia-dcgm-exporter")];
    fake.add_pod(
        "gpuprov",
        "exporter-elsewhere",
        "gpu-node-2",
        &exporter,
        true,
    );
    let (_, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    let reason = outcome(&report, "dcgm-exporter").2;
    assert!(
        reason.contains("waiting for a pod with app=nvidia-dcgm-exporter"),
        "{reason}"
    );

    fake.add_pod("gpuprov", "exporter-here", NODE, &exporter, false);
    let (code, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(code, 3);
    let reason = outcome(&report, "dcgm-exporter").2;
    assert!(
        reason.contains("gpuprov/exporter-here to be Ready: Running, Ready False"),
        "{reason}"
    );

    fake.add_pod("gpuprov", "exporter-here", NODE, &exporter, true);
    let (code, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(code, 0);
    assert_eq!(
        outcome(&report, "dcgm-exporter"),
        (
            "unchanged".into(),
            "ready".into(),
            "pod gpuprov/exporter-here is Ready".into()
        )
    );
}

#[test]
fn gfd_is_ready_once_the_product_label_is_on_the_node() {
    let fake = cluster(&[]);
    let host = copy_host("a100-preinstalled");
    let spec = only(host.path(), "gfd");
    apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(
        fake.labels(NODE)["nvidia.com/gpu.deploy.gpu-feature-discovery"],
        "true"
    );
    let (_, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(outcome(&report, "gpu-feature-discovery").1, "pending");

    fake.set_label(NODE, "nvidia.com/gpu.product", A100, "nfd-worker");
    let (code, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(code, 0);
    let (_, state, reason) = outcome(&report, "gpu-feature-discovery");
    assert_eq!(state, "ready");
    assert!(reason.contains(A100), "{reason}");
}

#[test]
fn the_validation_pod_runs_once_per_boot_and_is_deleted() {
    let fake = working_cluster(&[]);
    let host = copy_host("a100-preinstalled");
    let report = converge(&fake, host.path(), None);
    assert_eq!(outcome(&report, "validator").1, "ready");

    let created = validation_pods_created(&fake);
    assert_eq!(created.len(), 1, "one validation pod");
    let pod = &created[0];
    assert_eq!(pod["metadata"]["namespace"], "gpuprov");
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    assert_eq!(pod["spec"]["runtimeClassName"], "nvidia");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "nvcr.io/nvidia/k8s/cuda-sample:vectoradd-cuda11.7.1-ubuntu20.04"
    );
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    let term = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0]["matchFields"][0];
    assert_eq!(term["key"], "metadata.name");
    assert_eq!(term["values"][0], NODE);
    assert!(
        fake.pods()
            .iter()
            .all(|p| p["metadata"]["name"] != pod["metadata"]["name"]),
        "the validation pod is deleted"
    );
    let marker = fs::read_to_string(host.path().join(MARKER)).unwrap();
    assert!(marker.contains("\"driver\": \"535.161.08\""), "{marker}");

    // Converged: nothing is written, no pod runs again.
    fake.clear_log();
    let (code, report, _) = apply(Some(&fake), host.path(), None, &[]);
    assert_eq!(code, 0);
    assert!(
        steps(&report)
            .values()
            .all(|s| s.0 == "unchanged" || s.0 == "skip")
    );
    assert_eq!(
        fake.writes(),
        Vec::new(),
        "a converged node gets no API write"
    );

    // A reboot clears /run: the pod runs again.
    fs::remove_file(host.path().join(MARKER)).unwrap();
    let (code, _, _) = apply(Some(&fake), host.path(), None, &[]);
    assert_eq!(code, 0);
    assert_eq!(validation_pods_created(&fake).len(), 1);
}

#[test]
fn a_failed_validation_fails_the_step_with_the_pods_log_and_an_event() {
    let fake = working_cluster(&[]);
    fake.kubelet(Kubelet::Runs {
        phase: "Failed",
        after_ms: 100,
        log: (1..=30).map(|i| format!("line {i}\n")).collect::<String>()
            + "Failed to allocate device vector A (error code no CUDA-capable device is detected)!\n",
        exit_code: 1,
    });
    let host = copy_host("a100-preinstalled");
    apply(Some(&fake), host.path(), None, &[]);
    let (code, report, _) = apply(Some(&fake), host.path(), None, &[]);
    assert_eq!(code, 3);
    let (action, state, reason) = outcome(&report, "validator");
    assert_eq!((action.as_str(), state.as_str()), ("fail", "failed"));
    assert!(
        reason.contains("failed (Failed, cuda-vectoradd: exit code 1 (Error))"),
        "{reason}"
    );
    assert!(
        reason.contains("no CUDA-capable device is detected"),
        "{reason}"
    );
    assert!(
        reason.contains("line 12") && !reason.contains("line 11\n"),
        "the last 20 lines: {reason}"
    );
    assert_eq!(fake.labels(NODE)["gpuprov.io/validator"], "failed");
    assert!(fake.pods().iter().all(|p| {
        !p["metadata"]["name"]
            .as_str()
            .unwrap()
            .contains("vectoradd")
    }));
    assert!(
        !host.path().join(MARKER).exists(),
        "a failure is not remembered"
    );
    let event = fake
        .events()
        .into_iter()
        .find(|e| e["reason"] == "Failed")
        .expect("a Failed event on the node");
    assert_eq!(event["regarding"]["name"], NODE);
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("no CUDA-capable device"),
        "{event}"
    );
}

#[test]
fn a_validation_pod_never_scheduled_times_out_and_is_deleted() {
    let fake = working_cluster(&[]);
    fake.kubelet(Kubelet::NeverSchedules);
    let host = copy_host("a100-preinstalled");
    let spec = spec_file(host.path(), "validator:\n  timeoutSeconds: 2\n");
    apply(Some(&fake), host.path(), Some(&spec), &[]);
    let (code, report, _) = apply(Some(&fake), host.path(), Some(&spec), &[]);
    assert_eq!(code, 3);
    let reason = outcome(&report, "validator").2;
    assert!(reason.contains("did not succeed within 2s"), "{reason}");
    assert!(reason.contains("PodScheduled False (Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.)"), "{reason}");
    assert!(fake.pods().iter().all(|p| {
        !p["metadata"]["name"]
            .as_str()
            .unwrap()
            .contains("vectoradd")
    }));
}

/// A static pod manifest under the host root, parsed.
fn manifest(host: &Path, dir: &str, operand: &str) -> Option<Value> {
    let path = host.join(dir).join(format!("gpuprov-{operand}.yaml"));
    let text = fs::read_to_string(path).ok()?;
    Some(serde_saphyr::from_str(&text).unwrap())
}

#[test]
fn without_an_api_server_static_pods_are_written_from_the_spec_and_removed_when_disabled() {
    let host = copy_host("a100-preinstalled");
    let dir = "etc/kubernetes/static";
    let spec = "operands:\n  staticPodDir: /etc/kubernetes/static\n\
                gfd:\n  mode: daemonset\n\
                devicePlugin:\n  version: v0.16.2\n  imagePullPolicy: IfNotPresent\n  args: [--mig-strategy=single]\n  env:\n    - name: FAIL_ON_INIT_ERROR\n      value: true\n    - name: PASS_DEVICE_SPECS\n      value: \"true\"\n";
    let spec = spec_file(host.path(), spec);
    let (code, report, stderr) = apply(None, host.path(), Some(&spec), &[]);
    assert_eq!(code, 0, "{stderr}");
    for operand in ["device-plugin", "dcgm-exporter", "gpu-feature-discovery"] {
        let (action, state, _) = outcome(&report, operand);
        assert_eq!(
            (action.as_str(), state.as_str()),
            ("change", "configured"),
            "{operand}"
        );
    }
    let plugin = manifest(host.path(), dir, "device-plugin").unwrap();
    assert_eq!(plugin["metadata"]["namespace"], "kube-system");
    assert_eq!(plugin["spec"]["runtimeClassName"], "nvidia");
    let container = &plugin["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "nvcr.io/nvidia/k8s-device-plugin:v0.16.2"
    );
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    assert_eq!(
        container["args"],
        serde_json::json!(["--mig-strategy=single"])
    );
    let env: BTreeMap<String, String> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().into(),
                v["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        env["FAIL_ON_INIT_ERROR"], "true",
        "the spec replaces the template's value"
    );
    assert_eq!(env["PASS_DEVICE_SPECS"], "true");
    assert_eq!(
        manifest(host.path(), dir, "dcgm-exporter").unwrap()["spec"]["containers"][0]["image"],
        "nvcr.io/nvidia/k8s/dcgm-exporter:3.3.9-3.6.1-ubuntu22.04"
    );
    assert!(
        !host.path().join(MANIFESTS).exists(),
        "only the configured directory"
    );
    let labels = fs::read_to_string(
        host.path()
            .join("etc/kubernetes/node-feature-discovery/features.d/gpuprov"),
    )
    .unwrap();
    assert!(
        labels.contains("gpuprov.io/device-plugin=configured"),
        "{labels}"
    );
    assert!(
        !labels.contains("nvidia.com/gpu.deploy.device-plugin"),
        "no deploy label: the static pod runs it"
    );
    assert_eq!(outcome(&report, "validator").1, "ready", "host checks");

    // Again: nothing to change.
    let (code, report, _) = apply(None, host.path(), Some(&spec), &[]);
    assert_eq!(code, 0);
    assert_eq!(outcome(&report, "device-plugin").0, "unchanged");

    // The device plugin disabled: its static pod goes, the others stay.
    let disabled = fs::read_to_string(&spec)
        .unwrap()
        .replace("devicePlugin:\n", "devicePlugin:\n  enabled: false\n");
    let disabled = write_spec(host.path(), "disabled.yaml", &disabled);
    let (code, report, _) = apply(None, host.path(), Some(&disabled), &[]);
    assert_eq!(code, 0);
    let (action, state, _) = outcome(&report, "device-plugin");
    assert_eq!((action.as_str(), state.as_str()), ("change", "disabled"));
    assert!(manifest(host.path(), dir, "device-plugin").is_none());
    assert!(manifest(host.path(), dir, "dcgm-exporter").is_some());

    // Opted out by the node's label: every static pod goes.
    let (code, report, _) = apply(
        None,
        host.path(),
        Some(&disabled),
        &["--node-labels", "nvidia.com/gpu.deploy.operands=false"],
    );
    assert_eq!(code, 0);
    assert_eq!(outcome(&report, "dcgm-exporter").1, "opted-out");
    assert_eq!(fs::read_dir(host.path().join(dir)).unwrap().count(), 0);

    // Back in, then `gpuprov revert` takes them away again.
    assert_eq!(apply(None, host.path(), Some(&spec), &[]).0, 0);
    assert_eq!(fs::read_dir(host.path().join(dir)).unwrap().count(), 3);
    let output = support::run_on("revert", host.path(), &spec);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("static pods: removed /etc/kubernetes/static/gpuprov-device-plugin.yaml"),
        "{text}"
    );
    assert_eq!(fs::read_dir(host.path().join(dir)).unwrap().count(), 0);
    assert!(
        !host
            .path()
            .join("var/lib/gpuprov/device-plugin/config.yaml")
            .exists(),
        "the device plugin's config goes with it"
    );
}

#[test]
fn a_static_pod_gpuprov_did_not_write_is_left_alone() {
    let host = copy_host("a100-preinstalled");
    let path = host
        .path()
        .join(MANIFESTS)
        .join("gpuprov-device-plugin.yaml");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let theirs = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: their-plugin\n";
    fs::write(&path, theirs).unwrap();
    let (code, report, _) = apply(None, host.path(), None, &[]);
    assert_eq!(code, 3);
    let (_, state, reason) = outcome(&report, "device-plugin");
    assert_eq!(state, "failed");
    assert!(
        reason.contains("exists and gpuprov did not write it"),
        "{reason}"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), theirs);
    // Disabled, it is still not removed: it is not gpuprov's.
    let spec = spec_file(host.path(), "devicePlugin:\n  enabled: false\n");
    apply(None, host.path(), Some(&spec), &[]);
    assert_eq!(fs::read_to_string(&path).unwrap(), theirs);
}

#[test]
fn without_an_api_server_the_validator_checks_the_host() {
    let host = copy_host("a100-preinstalled");
    let (code, report, _) = apply(None, host.path(), None, &[]);
    assert_eq!(code, 0);
    let reason = outcome(&report, "validator").2;
    assert!(reason.contains("NVML sees all 1 GPUs"), "{reason}");
    assert!(
        reason.contains("/usr/bin/nvidia-container-runtime runs"),
        "{reason}"
    );

    fs::remove_file(host.path().join("dev/nvidia0")).unwrap();
    fs::remove_file(host.path().join("usr/bin/nvidia-container-runtime")).unwrap();
    let spec = spec_file(host.path(), "toolkit:\n  enabled: false\n");
    let (code, report, _) = apply(None, host.path(), Some(&spec), &[]);
    assert_eq!(code, 3);
    // The toolkit is absent, which blocks containerd, the operands and so the validator.
    assert_eq!(outcome(&report, "validator").1, "blocked");
    let spec = spec_file(
        host.path(),
        "toolkit:\n  enabled: false\ndevicePlugin:\n  enabled: false\n",
    );
    let (_, report, _) = apply(None, host.path(), Some(&spec), &[]);
    let (_, state, reason) = outcome(&report, "validator");
    assert_eq!(state, "failed");
    assert!(
        reason.contains("missing device nodes: /dev/nvidia0"),
        "{reason}"
    );
    assert!(
        reason.contains("no runtime binary at /usr/bin/nvidia-container-runtime"),
        "{reason}"
    );
}

// The seed's deployment scenarios, each end to end on the A100 fixture
// host against a cluster whose operands follow gpuprov's labels.

/// gpuprov's outcome labels and the GPU Operator's deploy labels on the node.
fn node_outcomes(fake: &FakeApi) -> BTreeMap<String, String> {
    fake.labels(NODE)
        .into_iter()
        .filter(|(k, _)| k.starts_with("gpuprov.io/") || k.starts_with("nvidia.com/gpu.deploy."))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn scenario_default() {
    let fake = working_cluster(&[]);
    let host = copy_host("a100-preinstalled");
    converge(&fake, host.path(), None);
    assert_eq!(
        node_outcomes(&fake),
        labels(&[
            ("gpuprov.io/cdi", "disabled"),
            ("gpuprov.io/container-toolkit", "preinstalled"),
            ("gpuprov.io/containerd-runtime", "configured"),
            ("gpuprov.io/dcgm-exporter", "ready"),
            ("gpuprov.io/detect-gpu", "ready"),
            ("gpuprov.io/device-plugin", "ready"),
            ("gpuprov.io/device-plugin.config", "default"),
            ("gpuprov.io/driver", "preinstalled"),
            ("gpuprov.io/driver.kernel-module-type", "proprietary"),
            ("gpuprov.io/fabric-manager", "disabled"),
            ("gpuprov.io/gpu-feature-discovery", "ready"),
            ("gpuprov.io/gpu-health", "ready"),
            ("gpuprov.io/gpu-remediation", "disabled"),
            ("gpuprov.io/gpudirect-rdma", "disabled"),
            ("gpuprov.io/mig", "disabled"),
            ("gpuprov.io/persistence", "ready"),
            ("gpuprov.io/secure-boot", "disabled"),
            ("gpuprov.io/validator", "ready"),
            ("nvidia.com/gpu.deploy.dcgm-exporter", "true"),
            ("nvidia.com/gpu.deploy.device-plugin", "true"),
            ("nvidia.com/gpu.deploy.driver", "pre-installed"),
        ])
    );
    // Built in: gpuprov published the product from NVML, with no GFD.
    assert_eq!(fake.labels(NODE)["nvidia.com/gpu.product"], A100);
    assert!(
        fake.owned_by(NODE, "gpuprov")
            .contains(&"nvidia.com/gpu.product".to_string()),
        "gpuprov owns the product label"
    );
}

#[test]
fn scenario_operands_opted_out_by_node_label() {
    let fake = working_cluster(&[]);
    let host = copy_host("a100-preinstalled");
    converge(&fake, host.path(), None);
    fake.set_label(
        NODE,
        "nvidia.com/gpu.deploy.operands",
        "false",
        "kubectl-label",
    );
    let (code, report, stderr) = apply(Some(&fake), host.path(), None, &[]);
    assert_eq!(code, 0, "{stderr}");
    for step in [
        "driver",
        "container-toolkit",
        "containerd-runtime",
        "device-plugin",
        "dcgm-exporter",
        "gpu-feature-discovery",
        "validator",
    ] {
        assert_eq!(outcome(&report, step).1, "opted-out", "{step}");
    }
    let on_node = node_outcomes(&fake);
    assert!(
        on_node
            .keys()
            .all(|k| !k.starts_with("nvidia.com/gpu.deploy.")
                || k == "nvidia.com/gpu.deploy.operands"),
        "every operand label is removed: {on_node:?}"
    );
    assert_eq!(
        on_node["nvidia.com/gpu.deploy.operands"], "false",
        "the person's label stays"
    );
    // The operands leave: no exporter pod, no GFD label.
    assert!(fake.pods().is_empty());
    assert!(!fake.labels(NODE).contains_key("nvidia.com/gpu.product"));
}

#[test]
fn scenario_driver_opted_out_by_node_label() {
    let fake = working_cluster(&[("nvidia.com/gpu.deploy.driver", "false")]);
    let host = copy_host("a100-preinstalled");
    let report = converge(&fake, host.path(), None);
    assert_eq!(outcome(&report, "driver").1, "opted-out");
    let on_node = node_outcomes(&fake);
    assert_eq!(
        on_node["nvidia.com/gpu.deploy.driver"], "false",
        "never overwritten"
    );
    assert_eq!(on_node["gpuprov.io/driver"], "opted-out");
    for step in ["containerd-runtime", "device-plugin", "validator"] {
        assert_ne!(outcome(&report, step).1, "opted-out", "{step} still runs");
    }
    assert_eq!(on_node["gpuprov.io/validator"], "ready");
}

#[test]
fn scenario_preinstalled_driver() {
    let fake = working_cluster(&[]);
    let host = copy_host("a100-preinstalled");
    let spec = repo().join("fixtures/specs/preinstalled-driver.yaml");
    let report = converge(&fake, host.path(), Some(&spec));
    assert_eq!(outcome(&report, "driver").1, "preinstalled");
    let on_node = node_outcomes(&fake);
    assert_eq!(on_node["nvidia.com/gpu.deploy.driver"], "pre-installed");
    assert_eq!(on_node["gpuprov.io/container-toolkit"], "preinstalled");
    assert_eq!(on_node["gpuprov.io/device-plugin"], "ready");
    assert_eq!(on_node["gpuprov.io/validator"], "ready");
}

#[test]
fn scenario_preinstalled_driver_and_toolkit() {
    let fake = working_cluster(&[]);
    let host = copy_host("a100-preinstalled");
    let spec = repo().join("fixtures/specs/preinstalled-driver-and-toolkit.yaml");
    let report = converge(&fake, host.path(), Some(&spec));
    assert_eq!(outcome(&report, "driver").1, "preinstalled");
    assert_eq!(outcome(&report, "container-toolkit").1, "preinstalled");
    assert_eq!(outcome(&report, "containerd-runtime").1, "configured");
    let on_node = node_outcomes(&fake);
    assert_eq!(on_node["gpuprov.io/validator"], "ready");
    assert_eq!(on_node["nvidia.com/gpu.deploy.device-plugin"], "true");
    assert!(
        !fs::read_to_string(host.path().join("var/log/fake-apt-get.log"))
            .unwrap_or_default()
            .contains("install"),
        "nothing installed"
    );
}

#[test]
fn scenario_containerd_options() {
    let fake = working_cluster(&[]);
    let host = copy_host("a100-preinstalled");
    // A containerd of its own with its config and socket elsewhere,
    // started by its service with --address. (k3s's own layout, where
    // the config is written again at every start, is tests/runtimes.rs's.)
    let config = "opt/containerd/etc/config.toml";
    let socket = "/run/custom/containerd.sock";
    fs::create_dir_all(host.path().join(config).parent().unwrap()).unwrap();
    fs::copy(
        host.path().join("etc/containerd/config.toml"),
        host.path().join(config),
    )
    .unwrap();
    let default_config = fs::read(host.path().join("etc/containerd/config.toml")).unwrap();
    let systemctl = host.path().join("usr/bin/systemctl");
    fs::write(
        &systemctl,
        format!(
            "#!/bin/sh\nmkdir -p \"$GPUPROV_HOST_ROOT/var/log\"\necho \"$*\" >> \"$GPUPROV_HOST_ROOT/var/log/fake-systemctl.log\"\n\
             if [ \"$*\" = \"restart containerd\" ]; then\n  nohup \"$GPUPROV_HOST_ROOT/usr/bin/containerd\" --address {socket} >/dev/null 2>&1 &\nfi\n"
        ),
    )
    .unwrap();
    let spec = spec_file(
        host.path(),
        &format!(
            "toolkit:\n  env:\n  - name: CONTAINERD_CONFIG\n    value: /{config}\n  - name: CONTAINERD_SOCKET\n    value: {socket}\n\
             \x20 - name: CONTAINERD_RUNTIME_CLASS\n    value: nvidia-gpu\n  - name: CONTAINERD_SET_AS_DEFAULT\n    value: true\n"
        ),
    );
    let report = converge(&fake, host.path(), Some(&spec));
    let reason = outcome(&report, "containerd-runtime").2;
    assert!(reason.contains("runtime `nvidia-gpu`"), "{reason}");
    let edited = fs::read_to_string(host.path().join(config)).unwrap();
    assert!(edited.contains("runtimes.nvidia-gpu]"), "{edited}");
    assert!(
        edited.contains("default_runtime_name = \"nvidia-gpu\""),
        "{edited}"
    );
    assert_eq!(
        fs::read(host.path().join("etc/containerd/config.toml")).unwrap(),
        default_config,
        "the default path is not touched"
    );
    assert_eq!(support::containerd_restarts(host.path()), 1);
    // nvidia is containerd's default, so the validation pod names no runtime class.
    let pods = validation_pods_created(&fake);
    assert_eq!(pods.len(), 1);
    assert!(
        pods[0]["spec"].get("runtimeClassName").is_none(),
        "{}",
        pods[0]
    );
    assert_eq!(node_outcomes(&fake)["gpuprov.io/validator"], "ready");
}
