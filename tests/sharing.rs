//! GPU sharing through the device plugin's own configs
//! (`devicePlugin.config`): chosen per node by `nvidia.com/device-plugin.config`,
//! handed to the device plugin (a ConfigMap and a node label with an API
//! server, a host file and the static pod without), and followed by the
//! device plugin's readiness and GFD's labels. The fake API server plays
//! the device plugin: it offers what the handed config says.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::fake_api::FakeApi;
use support::{
    containerd_restarts, copy_host, fake_nvml_library, gpuprov_with_fake_nvml, steps, write_spec,
};

const NODE: &str = "gpu-node-1";
const A100: &str = "NVIDIA-A100-SXM4-40GB";
const CONFIG_MAP: &str = "gpuprov-device-plugin-configs";

/// Three configs: whole GPUs (the default), time-slicing ×4, MPS ×2
/// offered as nvidia.com/gpu.shared.
const SPEC: &str = "devicePlugin:
  config:
    default: whole
    configs:
      whole:
        version: v1
      ts4:
        version: v1
        flags:
          migStrategy: none
        sharing:
          timeSlicing:
            resources:
              - name: nvidia.com/gpu
                replicas: 4
      mps2:
        version: v1
        sharing:
          mps:
            renameByDefault: true
            resources:
              - name: nvidia.com/gpu
                replicas: 2
";

/// `apply --output json` on `host` with one whole A100 (fake NVML), against
/// `fake` when given; the exit code and the report.
fn apply(fake: Option<&FakeApi>, host: &Path, spec: &Path) -> (i32, Value) {
    let mut cmd = gpuprov_with_fake_nvml("a100.yaml");
    cmd.args(["apply", "--output", "json", "--host-exec", "prefix"])
        .arg("--nvml-lib")
        .arg(fake_nvml_library())
        .arg("--host-root")
        .arg(host)
        .arg("--config")
        .arg(spec);
    support::against(&mut cmd, fake, NODE);
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
    (output.status.code().unwrap(), report)
}

fn converge(fake: &FakeApi, host: &Path, spec: &Path) -> Value {
    let mut last = Value::Null;
    for _ in 0..3 {
        let (code, report) = apply(Some(fake), host, spec);
        if code == 0 {
            return report;
        }
        last = report;
    }
    panic!("not converged after three runs: {:#?}", steps(&last));
}

fn step(report: &Value, name: &str) -> (String, String, String) {
    steps(report).remove(name).unwrap()
}

fn spec(host: &Path) -> PathBuf {
    write_spec(host, "node.yaml", SPEC)
}

fn allocatable(fake: &FakeApi) -> BTreeMap<String, String> {
    fake.node_allocatable(NODE)
        .into_iter()
        .filter(|(k, _)| k.starts_with("nvidia.com/"))
        .collect()
}

#[test]
fn time_slicing_multiplies_the_gpus_and_a_config_change_restarts_nothing_else() {
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/device-plugin.config", "ts4")]);
    fake.run_working_cluster(1, A100);
    let host = copy_host("a100-preinstalled");
    let spec = spec(host.path());

    let report = converge(&fake, host.path(), &spec);
    let (_, state, reason) = step(&report, "device-plugin");
    assert_eq!(state, "ready");
    assert!(
        reason.contains("nvidia.com/gpu: 4 (1 × 4 replicas)")
            && reason.contains("config ts4 (nvidia.com/device-plugin.config=ts4, time-slicing)"),
        "{reason}"
    );
    assert_eq!(
        allocatable(&fake),
        BTreeMap::from([("nvidia.com/gpu".to_string(), "4".to_string())])
    );
    // Every config is handed over, each a file the device plugin reads,
    // with the MIG strategy in force written in.
    let data = fake
        .config_map("gpuprov", CONFIG_MAP)
        .expect("the ConfigMap");
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["mps2", "ts4", "whole"],
        "{data:?}"
    );
    let ts4: Value = serde_saphyr::from_str(&data["ts4"]).unwrap();
    assert_eq!(ts4["version"], "v1");
    assert_eq!(ts4["flags"]["migStrategy"], "none");
    assert_eq!(ts4["sharing"]["timeSlicing"]["resources"][0]["replicas"], 4);
    let whole: Value = serde_saphyr::from_str(&data["whole"]).unwrap();
    assert_eq!(
        whole["flags"]["migStrategy"], "single",
        "mig.strategy's default"
    );
    let labels = fake.labels(NODE);
    for (key, value) in [
        ("gpuprov.io/device-plugin.config", "ts4"),
        ("nvidia.com/gpu.replicas", "4"),
        ("nvidia.com/gpu.sharing-strategy", "time-slicing"),
        ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-40GB-SHARED"),
        ("nvidia.com/gpu.count", "1"),
        ("nvidia.com/mps.capable", "false"),
    ] {
        assert_eq!(labels.get(key).map(String::as_str), Some(value), "{key}");
    }
    // The config's flags.migStrategy none: no MIG strategy label.
    assert!(
        !labels.contains_key("nvidia.com/mig.strategy"),
        "{labels:?}"
    );

    // Converged: nothing is written.
    fake.clear_log();
    let (code, _) = apply(Some(&fake), host.path(), &spec);
    assert_eq!(code, 0);
    assert!(fake.writes().is_empty(), "{:#?}", fake.writes());

    // Back to whole GPUs: the label that the sidecar follows changes, the
    // ConfigMap (which holds every config) does not, containerd is not
    // restarted, and the -SHARED labels go.
    let restarts = containerd_restarts(host.path());
    fake.set_label(NODE, "nvidia.com/device-plugin.config", "whole", "kubectl");
    fake.clear_log();
    converge(&fake, host.path(), &spec);
    let writes = fake.writes();
    assert!(
        writes.iter().all(|w| !w.uri.contains("configmaps")),
        "{writes:#?}"
    );
    assert_eq!(containerd_restarts(host.path()), restarts);
    assert_eq!(
        allocatable(&fake),
        BTreeMap::from([("nvidia.com/gpu".to_string(), "1".to_string())])
    );
    let labels = fake.labels(NODE);
    assert_eq!(labels["gpuprov.io/device-plugin.config"], "whole");
    assert_eq!(labels["nvidia.com/gpu.replicas"], "1");
    assert_eq!(labels["nvidia.com/gpu.sharing-strategy"], "none");
    assert_eq!(labels["nvidia.com/gpu.product"], A100);
    assert_eq!(labels["nvidia.com/mig.strategy"], "single");
}

#[test]
fn mps_renamed_is_offered_as_gpu_shared_and_labelled_capable() {
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/device-plugin.config", "mps2")]);
    fake.run_working_cluster(1, A100);
    let host = copy_host("a100-preinstalled");
    let report = converge(&fake, host.path(), &spec(host.path()));
    let (_, state, reason) = step(&report, "device-plugin");
    assert_eq!(state, "ready");
    assert!(
        reason.contains("nvidia.com/gpu.shared: 2 (1 × 2 replicas)"),
        "{reason}"
    );
    assert_eq!(
        allocatable(&fake),
        BTreeMap::from([("nvidia.com/gpu.shared".to_string(), "2".to_string())])
    );
    let labels = fake.labels(NODE);
    assert_eq!(labels["nvidia.com/gpu.sharing-strategy"], "mps");
    assert_eq!(labels["nvidia.com/gpu.replicas"], "2");
    assert_eq!(labels["nvidia.com/mps.capable"], "true");
    // Renamed: GFD adds no -SHARED.
    assert_eq!(labels["nvidia.com/gpu.product"], A100);
}

#[test]
fn the_device_plugin_waits_for_the_replicas_it_was_told() {
    // A cluster whose device plugin offers whole GPUs only (an older
    // DaemonSet without the config-manager): gpuprov does not call that ready.
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/device-plugin.config", "ts4")]);
    fake.run_working_cluster(1, A100);
    let host = copy_host("a100-preinstalled");
    let spec = spec(host.path());
    apply(Some(&fake), host.path(), &spec);
    fake.set_allocatable(NODE, "nvidia.com/gpu", "1");
    let (code, report) = apply(Some(&fake), host.path(), &spec);
    assert_eq!(code, 3);
    let (_, state, reason) = step(&report, "device-plugin");
    assert_eq!(state, "pending");
    assert!(
        reason.contains("allocatable nvidia.com/gpu is 1, want 4"),
        "{reason}"
    );
}

#[test]
fn a_label_naming_no_config_fails_the_device_plugin_and_changes_nothing() {
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/device-plugin.config", "ts8")]);
    fake.run_working_cluster(1, A100);
    let host = copy_host("a100-preinstalled");
    let (code, report) = apply(Some(&fake), host.path(), &spec(host.path()));
    assert_ne!(code, 0);
    let (_, state, reason) = step(&report, "device-plugin");
    assert_eq!(state, "failed");
    assert!(
        reason.contains("nvidia.com/device-plugin.config=ts8 names no config")
            && reason.contains("mps2, ts4, whole"),
        "{reason}"
    );
    assert!(fake.config_map("gpuprov", CONFIG_MAP).is_none());
    assert!(
        !fake
            .labels(NODE)
            .contains_key("gpuprov.io/device-plugin.config")
    );
}

#[test]
fn without_an_api_server_the_static_pod_reads_the_chosen_file_and_restarts_on_a_change() {
    let host = copy_host("a100-preinstalled");
    let config_file = host
        .path()
        .join("var/lib/gpuprov/device-plugin/config.yaml");
    let manifest = |name: &str| {
        host.path()
            .join("etc/kubernetes/manifests")
            .join(format!("gpuprov-{name}.yaml"))
    };
    let spec = write_spec(
        host.path(),
        "node.yaml",
        &SPEC.replace("default: whole", "default: ts4"),
    );
    let (code, _) = apply(None, host.path(), &spec);
    assert_eq!(code, 0);
    let handed: Value = serde_saphyr::from_str(&fs::read_to_string(&config_file).unwrap()).unwrap();
    assert_eq!(
        handed["sharing"]["timeSlicing"]["resources"][0]["replicas"],
        4
    );
    let pod: Value =
        serde_saphyr::from_str(&fs::read_to_string(manifest("device-plugin")).unwrap()).unwrap();
    let annotation = pod["metadata"]["annotations"]["gpuprov.io/device-plugin-config"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(annotation.starts_with("ts4 sha256:"), "{annotation}");
    let env = &pod["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "CONFIG_FILE"
                && v["value"] == "/etc/gpuprov-device-plugin/config.yaml"),
        "{env}"
    );
    assert!(
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hostPath"]["path"] == "/var/lib/gpuprov/device-plugin"),
        "{pod}"
    );

    // Unchanged: nothing is rewritten.
    let before = support::tree(host.path());
    let (code, report) = apply(None, host.path(), &spec);
    assert_eq!(code, 0, "{report}");
    let after = support::tree(host.path());
    let changed: Vec<_> = support::changed(&before, &after)
        .into_iter()
        // The run's report (and so its directory) is rewritten every run.
        .filter(|p| {
            !p.starts_with("var/lib/gpuprov/last-run.json")
                && p != Path::new("var/lib/gpuprov")
                && !p.starts_with("run/")
        })
        .collect();
    assert!(changed.is_empty(), "{changed:?}");

    // Another default: the file and the device plugin's manifest change
    // (the kubelet restarts that pod), the other operands' do not.
    let exporter = fs::read_to_string(manifest("dcgm-exporter")).unwrap();
    let spec = write_spec(host.path(), "node.yaml", SPEC);
    let (code, _) = apply(None, host.path(), &spec);
    assert_eq!(code, 0);
    let handed: Value = serde_saphyr::from_str(&fs::read_to_string(&config_file).unwrap()).unwrap();
    assert!(handed.get("sharing").is_none(), "{handed}");
    let pod: Value =
        serde_saphyr::from_str(&fs::read_to_string(manifest("device-plugin")).unwrap()).unwrap();
    let now = pod["metadata"]["annotations"]["gpuprov.io/device-plugin-config"]
        .as_str()
        .unwrap();
    assert!(
        now.starts_with("whole sha256:") && now != annotation,
        "{now}"
    );
    assert_eq!(
        fs::read_to_string(manifest("dcgm-exporter")).unwrap(),
        exporter
    );
}

#[test]
fn bad_device_plugin_configs_are_refused_with_their_place() {
    let host = copy_host("a100-preinstalled");
    let config = |body: &str| {
        format!(
            "devicePlugin:\n  config:\n    configs:\n      shared:\n        version: v1\n{body}"
        )
    };
    let ts = |resource: &str| {
        config(&format!(
            "        sharing:\n          timeSlicing:\n            resources:\n              - {resource}\n"
        ))
    };
    for (yaml, wanted) in [
        (
            ts("name: nvidia.com/gpu\n                replicas: 1"),
            ":10:27: devicePlugin.config.configs.shared.sharing.timeSlicing.resources[0].replicas must be between 2 and 1024, not 1",
        ),
        (
            ts("name: nvidia.com/gpus\n                replicas: 2"),
            "`nvidia.com/gpus` is not a resource the device plugin offers",
        ),
        (
            ts("name: nvidia.com/gpu\n                rename: gpu.small\n                replicas: 2"),
            "ignores rename",
        ),
        (
            ts("name: nvidia.com/gpu\n                devices: [0, 1]\n                replicas: 2"),
            "shares all devices of a resource",
        ),
        (
            ts("name: nvidia.com/gpu\n                replica: 2"),
            "replica",
        ),
        (
            config("        flags:\n          migStrategy: some\n"),
            "flags.migStrategy must be none, single or mixed, not `some`",
        ),
        (
            config("        resources:\n          gpus: []\n"),
            "ignores custom resource names",
        ),
        (
            config("        sharing:\n          timeSlicing:\n            resources: []\n          mps:\n            resources:\n              - name: gpu\n                replicas: 2\n"),
            "timeSlicing and mps are both given",
        ),
        (
            "devicePlugin:\n  config:\n    default: shraed\n    configs:\n      shared:\n        version: v1\n".to_string(),
            "did you mean `shared`?",
        ),
        (
            "devicePlugin:\n  config:\n    configs:\n      a:\n        version: v1\n      b:\n        version: v1\n".to_string(),
            "several configs but no default",
        ),
        (
            config("").replace("version: v1", "version: v2"),
            "version `v2` is not a device plugin config version",
        ),
        (
            "gfd:\n  config:\n    default: a\n".to_string(),
            "gfd.config is not a setting",
        ),
    ] {
        let spec = write_spec(host.path(), "bad.yaml", &yaml);
        let output = support::run_on("plan", host.path(), &spec);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{yaml}\n{stderr}");
        assert!(stderr.contains(wanted), "wanted {wanted:?} in:\n{stderr}");
        assert!(stderr.contains("bad.yaml:"), "{stderr}");
    }
}
