//! The GPU readiness gate against the fake API server: the Node condition
//! `nvidia.com/GPUReady` through the status subresource and the startup
//! taint, removed only once the validator passed, put back on degraded
//! health when asked, and nothing written on a converged node.

mod support;

use std::path::Path;

use serde_json::Value;
use support::fake_api::{FakeApi, Kubelet};
use support::{copy_host, fake_nvml_library, gpuprov_with_fake_nvml, write_spec};

const NODE: &str = "gpu-node-1";
const STARTUP_TAINT: &str = "startup-taint.cluster-autoscaler.kubernetes.io/gpu-not-ready";
const H100: &str = "NVIDIA-H100-80GB-HBM3";

/// `apply` on the 8× H100 fixture with NVML answering from `nvml`; its exit
/// code and stderr.
fn apply(fake: &FakeApi, host: &Path, nvml: &str, spec: &Path) -> (i32, String) {
    let output = gpuprov_with_fake_nvml(nvml)
        .args(["apply", "--host-exec", "prefix", "--node-name", NODE])
        .arg("--nvml-lib")
        .arg(fake_nvml_library())
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host)
        .arg("--config")
        .arg(spec)
        .output()
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `apply` until it converges (at most three runs: the operands start on
/// the first, the validation passes on the next); the last exit code.
fn converge(fake: &FakeApi, host: &Path, nvml: &str, spec: &Path) -> i32 {
    let mut code = 3;
    for _ in 0..3 {
        code = apply(fake, host, nvml, spec).0;
        if code == 0 {
            break;
        }
    }
    code
}

fn gpu_ready(fake: &FakeApi) -> Value {
    fake.condition(NODE, "nvidia.com/GPUReady")
        .expect("the node has the GPUReady condition")
}

/// A GPU node as a node pool registers it: with the startup taint, and
/// another taint that is not gpuprov's.
fn tainted_node() -> FakeApi {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.set_taints(
        NODE,
        &[(STARTUP_TAINT, "NoSchedule"), ("dedicated", "NoSchedule")],
    );
    fake
}

#[test]
fn the_startup_taint_goes_only_once_the_validator_passed() {
    let fake = tainted_node();
    fake.run_working_cluster(8, H100);
    fake.kubelet(Kubelet::NeverSchedules);
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "validator:\n  timeoutSeconds: 2\n",
    );

    // Until the validation pod runs, the GPUs are not ready: the taint
    // stays, and the condition names the step that holds it.
    for _ in 0..2 {
        apply(&fake, host.path(), "h100x8.yaml", &spec);
    }
    let condition = gpu_ready(&fake);
    assert_eq!(condition["status"], "False", "{condition}");
    assert_eq!(condition["reason"], "ValidatorFailed", "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .starts_with("validator: failed: "),
        "{condition}"
    );
    assert_eq!(
        fake.taints(NODE),
        vec![
            format!("{STARTUP_TAINT}:NoSchedule"),
            "dedicated:NoSchedule".into()
        ]
    );

    // The pod runs: True, and only gpuprov's taint is gone.
    fake.kubelet(Kubelet::Runs {
        phase: "Succeeded",
        after_ms: 0,
        log: "Test PASSED\n".into(),
        exit_code: 0,
    });
    let (code, stderr) = apply(&fake, host.path(), "h100x8.yaml", &spec);
    assert_eq!(code, 0, "{stderr}");
    let condition = gpu_ready(&fake);
    assert_eq!(condition["status"], "True", "{condition}");
    assert_eq!(condition["reason"], "ValidatorPassed", "{condition}");
    assert!(condition["lastTransitionTime"].is_string(), "{condition}");
    assert_eq!(fake.taints(NODE), vec!["dedicated:NoSchedule".to_string()]);

    // Converged: the next run writes nothing, condition and taints included.
    fake.clear_log();
    let (code, _) = apply(&fake, host.path(), "h100x8.yaml", &spec);
    assert_eq!(code, 0);
    assert_eq!(fake.writes().len(), 0, "{:?}", fake.writes());
}

#[test]
fn a_lost_gpu_sets_gpu_ready_false_and_puts_the_taint_back_when_asked() {
    let fake = tainted_node();
    fake.run_working_cluster(8, H100);
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "readiness:\n  taintOnDegraded: true\n",
    );
    assert_eq!(converge(&fake, host.path(), "h100x8.yaml", &spec), 0);
    assert_eq!(gpu_ready(&fake)["status"], "True");
    assert_eq!(fake.taints(NODE), vec!["dedicated:NoSchedule".to_string()]);

    // The fourth GPU falls off the bus.
    apply(&fake, host.path(), "gpu-lost.yaml", &spec);
    let condition = gpu_ready(&fake);
    assert_eq!(condition["status"], "False", "{condition}");
    assert_eq!(condition["reason"], "GpuHealthDegraded", "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .starts_with("gpu-health: degraded: "),
        "{condition}"
    );
    let mut taints = fake.taints(NODE);
    taints.sort();
    assert_eq!(
        taints,
        vec![
            "dedicated:NoSchedule".to_string(),
            format!("{STARTUP_TAINT}:NoSchedule")
        ]
    );
    assert!(condition["lastTransitionTime"].is_string());
}

#[test]
fn a_node_without_a_gpu_gets_no_condition_and_keeps_its_taints() {
    let fake = tainted_node();
    let host = copy_host("no-gpu");
    let spec = write_spec(host.path(), "spec.yaml", "validator:\n  enabled: true\n");
    let (code, stderr) = apply(&fake, host.path(), "zero-devices.yaml", &spec);
    assert_eq!(code, 0, "{stderr}");
    assert!(fake.condition(NODE, "nvidia.com/GPUReady").is_none());
    assert_eq!(fake.taints(NODE).len(), 2);
}

#[test]
fn the_gate_can_be_turned_off() {
    let fake = tainted_node();
    fake.run_working_cluster(8, H100);
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "readiness:\n  condition: false\n  startupTaint: \"\"\n",
    );
    converge(&fake, host.path(), "h100x8.yaml", &spec);
    assert_eq!(fake.labels(NODE)["gpuprov.io/validator"], "ready");
    assert!(fake.condition(NODE, "nvidia.com/GPUReady").is_none());
    assert_eq!(fake.taints(NODE).len(), 2);
}
