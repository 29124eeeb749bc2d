//! The `mig` state through `apply`: layouts in mig-parted's format applied
//! through the real nvml-wrapper to the fake NVML (which keeps MIG state in
//! a file between runs, as the driver keeps it between processes), with and
//! without the fake API server.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::fake_api::FakeApi;
use support::{copy_host, repo, steps, write_spec};

const NODE: &str = "gpu-node-1";

/// A node and its GPUs' MIG state, kept between runs.
struct Node {
    host: tempfile::TempDir,
    fixture: PathBuf,
    state: PathBuf,
}

impl Node {
    /// A fixture host with the fake NVML answering from `fixture` (a file
    /// in fixtures/nvml), plus `extra` YAML lines added to its first device.
    fn new(host: &str, fixture: &str, first_device_extra: &str) -> Node {
        let host = copy_host(host);
        let text = fs::read_to_string(repo().join("fixtures/nvml").join(fixture)).unwrap();
        let text = text.replacen(
            "    migMode:",
            &format!("{first_device_extra}    migMode:"),
            1,
        );
        let fixture = host.path().join("fake-nvml.yaml");
        fs::write(&fixture, text).unwrap();
        let state = host.path().join("fake-nvml-state.yaml");
        Node {
            host,
            fixture,
            state,
        }
    }

    fn path(&self) -> &Path {
        self.host.path()
    }

    /// `gpuprov <command>` on this node, NVML answered by its fake.
    fn command(&self, command: &str, spec: &str) -> assert_cmd::Command {
        let spec = write_spec(self.path(), "mig-spec.yaml", spec);
        support::on_fake_nvml_host(command, self.path(), &self.fixture, &self.state, &spec)
    }

    /// `apply --output json` with `spec`; the exit code and the report.
    fn apply(&self, spec: &str, fake: Option<&FakeApi>, extra: &[&str]) -> (i32, Value) {
        let mut cmd = self.command("apply", spec);
        cmd.args(["--output", "json"]);
        support::against(&mut cmd, fake, NODE);
        let output = cmd.args(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let report = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
        (output.status.code().unwrap(), report)
    }

    /// The fake driver's MIG state, as it keeps it.
    fn state(&self) -> String {
        fs::read_to_string(&self.state).unwrap_or_default()
    }
}

fn mig(report: &Value) -> (String, String, String) {
    steps(report).remove("mig").unwrap()
}

fn layouts_spec(layout: &str) -> String {
    format!(
        "mig:\n  configFile: {}\n  default: {layout}\n",
        repo().join("fixtures/mig/layouts.yaml").display()
    )
}

#[test]
fn each_layout_of_a_mig_parted_file_applies_then_changes_nothing() {
    let node = Node::new("h100x8-nvswitch-preinstalled", "h100x8-mig.yaml", "");
    // In file order, so each applies over the one before.
    let expected = [
        (
            "all-enabled",
            "GPUs 0,1,2,3,4,5,6,7: MIG enabled, no MIG devices",
        ),
        ("all-1g", "GPUs 0,1,2,3,4,5,6,7: 7× 1g.10gb"),
        (
            "all-balanced",
            "GPUs 0,1,2,3,4,5,6,7: 2× 1g.10gb + 1× 2g.20gb + 1× 3g.40gb",
        ),
        (
            "half-and-half",
            "GPUs 0,1,2,3,4,5,6,7: 1× 3g.40gb + 1× 4g.40gb",
        ),
        (
            "custom-config",
            "GPU 6: 1× 1g.10gb+me + 3× 1g.20gb; GPU 7: 2× 1c.3g.40gb; GPU 5: 3× 2g.20gb; GPU 4: 7× 1g.10gb; GPUs 0,1,2,3: MIG disabled",
        ),
        ("all-disabled", "GPUs 0,1,2,3,4,5,6,7: MIG disabled"),
    ];
    for (layout, held) in expected {
        let spec = layouts_spec(layout);
        let (code, report) = node.apply(&spec, None, &[]);
        let (action, outcome, reason) = mig(&report);
        assert_eq!(
            (action.as_str(), outcome.as_str()),
            ("change", "ready"),
            "{layout}: {reason}"
        );
        assert!(reason.contains(held), "{layout}: {reason}");
        assert_eq!(code, 0, "{layout}: {report}");
        let state = node.state();
        let (code, report) = node.apply(&spec, None, &[]);
        let (action, _, reason) = mig(&report);
        assert_eq!(
            (code, action.as_str()),
            (0, "unchanged"),
            "{layout} again: {reason}"
        );
        assert_eq!(node.state(), state, "{layout}: a second apply changed MIG");
    }
}

#[test]
fn all_disabled_and_all_1g_switch_back_and_forth_with_the_built_in_layouts() {
    let node = Node::new("a100-preinstalled", "a100-mig.yaml", "");
    for (layout, held) in [
        ("all-1g.5gb", "GPU 0: 7× 1g.5gb"),
        ("all-disabled", "GPU 0: MIG disabled"),
        ("all-1g.5gb", "GPU 0: 7× 1g.5gb"),
        ("all-3g.20gb", "GPU 0: 2× 3g.20gb"),
    ] {
        // The layout from the node label, as the GPU Operator sets it.
        let label = format!("nvidia.com/mig.config={layout}");
        let (code, report) = node.apply("", None, &["--node-labels", &label]);
        let (_, outcome, reason) = mig(&report);
        assert_eq!((code, outcome.as_str()), (0, "ready"), "{layout}: {reason}");
        assert!(reason.contains(held), "{layout}: {reason}");
    }
}

#[test]
fn the_plan_shows_per_gpu_what_is_destroyed_and_created() {
    let node = Node::new("a100-preinstalled", "a100-mig.yaml", "");
    node.apply(
        "",
        None,
        &["--node-labels", "nvidia.com/mig.config=all-1g.5gb"],
    );
    let output = node
        .command("plan", &layouts_spec("all-disabled"))
        .args(["--node-labels", "nvidia.com/mig.config=all-balanced"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(
            "MIG layout all-balanced: GPU 0: destroy 7× 1g.5gb, create 1× 3g.20gb (slices 4) + 1× 2g.10gb (slices 0) + 2× 1g.5gb (slices 2,3)"
        ),
        "{text}"
    );
}

/// A cluster whose operands follow gpuprov's labels, converged with no
/// layout asked for (operands running, the DCGM exporter's pod on the node).
fn running_cluster(node: &Node) -> FakeApi {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    for _ in 0..3 {
        let (code, _) = node.apply("", Some(&fake), &[]);
        if code == 0 {
            return fake;
        }
    }
    panic!("the node did not converge before the MIG change");
}

fn deploy_labels(fake: &FakeApi) -> Vec<(String, String)> {
    fake.labels(NODE)
        .into_iter()
        .filter(|(k, _)| k.starts_with("nvidia.com/gpu.deploy."))
        .collect()
}

#[test]
fn a_failure_mid_apply_ends_failed_with_the_operands_restored() {
    // The third GPU instance NVML is asked for fails.
    let node = Node::new(
        "a100-preinstalled",
        "a100.yaml",
        "    failOnCall: {nvmlDeviceCreateGpuInstanceWithPlacement: [3, 999]}\n",
    );
    let fake = running_cluster(&node);
    let before = deploy_labels(&fake);
    assert!(before.iter().any(|(_, v)| v == "true"), "{before:?}");
    fake.set_label(NODE, "nvidia.com/mig.config", "all-1g.5gb", "kubectl");
    fake.clear_log();
    let (code, report) = node.apply("", Some(&fake), &[]);
    let (_, outcome, reason) = mig(&report);
    assert_eq!((code, outcome.as_str()), (3, "failed"), "{reason}");
    assert!(reason.contains("creating 1g.5gb at slice 2"), "{reason}");
    // Paused first, then restored, then failed on the node.
    let patches: Vec<String> = fake.writes().into_iter().map(|w| w.body).collect();
    assert!(
        patches.iter().any(|b| b.contains("paused-for-mig-change")),
        "{patches:#?}"
    );
    assert_eq!(deploy_labels(&fake), before);
    assert_eq!(fake.labels(NODE)["nvidia.com/mig.config.state"], "failed");
    // The operands are not blocked by it.
    let steps = steps(&report);
    assert_ne!(
        steps["device-plugin"].1, "blocked",
        "{:?}",
        steps["device-plugin"]
    );
    // The next run, without the failure, applies the layout.
    let fixture = fs::read_to_string(&node.fixture).unwrap();
    fs::write(
        &node.fixture,
        fixture.replace("    failOnCall:", "    # failOnCall:"),
    )
    .unwrap();
    let (_, report) = node.apply("", Some(&fake), &[]);
    let (_, outcome, reason) = mig(&report);
    assert_eq!(outcome, "ready", "{reason}");
    assert_eq!(fake.labels(NODE)["nvidia.com/mig.config.state"], "success");
}

#[test]
fn gpu_client_pods_that_never_leave_end_failed_at_the_timeout() {
    let node = Node::new("a100-preinstalled", "a100.yaml", "");
    let fake = running_cluster(&node);
    // A device plugin pod (the GPU Operator's label) that stays.
    fake.add_pod(
        "gpu-operator",
        "nvidia-device-plugin-daemonset-x1",
        NODE,
        &[("app", "nvidia-device-plugin-daemonset")],
        true,
    );
    let before = deploy_labels(&fake);
    fake.set_label(NODE, "nvidia.com/mig.config", "all-1g.5gb", "kubectl");
    let started = std::time::Instant::now();
    let (code, report) = node.apply("mig:\n  timeoutSeconds: 2\n", Some(&fake), &[]);
    let (_, outcome, reason) = mig(&report);
    assert_eq!((code, outcome.as_str()), (3, "failed"), "{reason}");
    assert!(
        reason.contains("gpu-operator/nvidia-device-plugin-daemonset-x1")
            && reason.contains("within 2s"),
        "{reason}"
    );
    assert!(started.elapsed().as_secs() < 60);
    assert_eq!(deploy_labels(&fake), before);
    assert_eq!(fake.labels(NODE)["nvidia.com/mig.config.state"], "failed");
    // Nothing was changed on the GPU.
    assert!(
        !node.state().contains("gpu_instances:\n  - "),
        "{}",
        node.state()
    );
}

#[test]
fn a_mode_change_that_needs_a_gpu_reset_is_reboot_required() {
    let node = Node::new(
        "h100x8-nvswitch-preinstalled",
        "h100x8-mig.yaml",
        "    migModeNeedsReset: true\n",
    );
    let (code, report) = node.apply(&layouts_spec("all-1g"), None, &[]);
    let (_, outcome, reason) = mig(&report);
    assert_eq!((code, outcome.as_str()), (3, "reboot-required"), "{reason}");
    assert!(
        reason.contains("GPU 0: MIG mode enabled is pending"),
        "{reason}"
    );
    // The other GPUs got their layout.
    let (_, report) = node.apply(&layouts_spec("all-1g"), None, &[]);
    assert_eq!(mig(&report).1, "reboot-required");
}

#[test]
fn a_layout_that_does_not_fit_or_names_an_unknown_profile_fails_with_the_reason() {
    let node = Node::new("a100-preinstalled", "a100-mig.yaml", "");
    let spec = "mig:\n  default: tight\n  configs:\n    version: v1\n    mig-configs:\n      tight:\n        - devices: all\n          mig-enabled: true\n          mig-devices:\n            \"3g.20gb\": 2\n            \"2g.10gb\": 1\n      h100-only:\n        - devices: all\n          mig-enabled: true\n          mig-devices:\n            \"1g.10gb+me\": 1\n";
    let (code, report) = node.apply(spec, None, &[]);
    let (_, outcome, reason) = mig(&report);
    assert_eq!((code, outcome.as_str()), (3, "failed"), "{reason}");
    assert!(reason.contains("do not fit together"), "{reason}");
    let (_, report) = node.apply(
        spec,
        None,
        &["--node-labels", "nvidia.com/mig.config=h100-only"],
    );
    let reason = mig(&report).2;
    assert!(
        reason.contains("has no MIG profile `1g.10gb+me`; it offers 1g.5gb,"),
        "{reason}"
    );
    let (_, report) = node.apply(spec, None, &["--node-labels", "nvidia.com/mig.config=nope"]);
    assert!(
        mig(&report).2.contains("names no layout"),
        "{}",
        mig(&report).2
    );
}

#[test]
fn bad_mig_parted_documents_are_refused_with_their_place() {
    let host = copy_host("a100-preinstalled");
    for (yaml, wanted) in [
        (
            "mig:\n  configs:\n    version: v2\n    mig-configs:\n      a:\n        - devices: all\n          mig-enabled: false\n",
            ":3:14: mig.configs: version `v2`",
        ),
        (
            "mig:\n  configs:\n    version: v1\n    mig-configs:\n      a:\n        - devices: all\n          mig-enabled: true\n          mig-devices:\n            \"1g.5GB\": 7\n",
            "`1g.5GB` is not a MIG profile",
        ),
        (
            // Not `7g.80gb` on every GPU: a compute count past any GPU's.
            "mig:\n  configs:\n    version: v1\n    mig-configs:\n      a:\n        - devices: all\n          mig-enabled: true\n          mig-devices:\n            \"99999999999c.7g.80gb\": 1\n",
            "`99999999999c.7g.80gb` is not a MIG profile",
        ),
        (
            "mig:\n  configs:\n    version: v1\n    mig-configs:\n      a:\n        - devices: some\n          mig-enabled: false\n",
            "devices must be `all` or a list of GPU indices, not `some`",
        ),
        (
            "mig:\n  default: all-balancd\n  configs:\n    version: v1\n    mig-configs:\n      all-balanced:\n        - devices: all\n          mig-enabled: false\n",
            "did you mean `all-balanced`?",
        ),
        (
            "mig:\n  configs:\n    version: v1\n    mig-configs:\n      a:\n        - devices: all\n          mig-enabled: true\n",
            "mig-enabled is true but mig-devices is missing",
        ),
        (
            "mig:\n  configs:\n    version: v1\n    mig-configs:\n      a:\n        - devices: all\n          device-filter: \"20B0\"\n          mig-enabled: false\n",
            "device-filter `20B0` is not a PCI id",
        ),
    ] {
        let spec = write_spec(host.path(), "bad.yaml", yaml);
        let output = support::run_on("plan", host.path(), &spec);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{yaml}\n{stderr}");
        assert!(stderr.contains(wanted), "wanted {wanted:?} in:\n{stderr}");
        assert!(stderr.contains("bad.yaml:"), "{stderr}");
    }
}

impl Node {
    /// The labels `apply --labels-sink stdout` publishes with `spec`.
    fn labels(&self, spec: &str) -> BTreeMap<String, String> {
        let output = self
            .command("apply", spec)
            .args(["--labels-sink", "stdout"])
            .output()
            .unwrap();
        assert!(
            output.status.code() == Some(0) || output.status.code() == Some(3),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// GFD's labels on the node: what its v0.17 labelers publish.
fn gfd_only(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .filter(|(k, _)| {
            (k.starts_with("nvidia.com/") && !k.contains(".deploy.") && !k.contains("mig.config"))
                && !k.starts_with("nvidia.com/gpu.present")
        })
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect()
}

/// The keys GFD's documentation lists for a MIG device type
/// (docs/gpu-feature-discovery/README.md, "MIG 'single' strategy" and
/// "MIG 'mixed' strategy"), under `prefix`.
fn gfd_mig_keys(prefix: &str) -> Vec<String> {
    [
        "count",
        "memory",
        "multiprocessors",
        "slices.gi",
        "slices.ci",
        "engines.copy",
        "engines.decoder",
        "engines.encoder",
        "engines.jpeg",
        "engines.ofa",
        "product",
        "replicas",
        "sharing-strategy",
    ]
    .iter()
    .map(|k| format!("{prefix}.{k}"))
    .collect()
}

#[test]
fn gfd_labels_follow_the_mig_strategy_and_the_layout() {
    let node = Node::new("a100-preinstalled", "a100.yaml", "");
    let spec = |strategy: &str, layout: &str| {
        format!(
            "mig:\n  strategy: {strategy}\n  default: {layout}\n  configs:\n    version: v1\n    mig-configs:\n      mixed:\n        - devices: all\n          mig-enabled: true\n          mig-devices:\n            \"3g.20gb\": 1\n            \"2g.10gb\": 1\n            \"1g.5gb\": 2\n"
        )
    };

    // No MIG: the whole GPU, and no MIG keys at all.
    let none = node.labels(&spec("none", "all-disabled"));
    assert_eq!(none["nvidia.com/gpu.product"], "NVIDIA-A100-SXM4-40GB");
    assert!(
        !none
            .keys()
            .any(|k| k.starts_with("nvidia.com/mig.strategy"))
    );
    insta::assert_snapshot!("gfd-mig-none", gfd_only(&none));

    // single: nvidia.com/gpu describes the MIG devices, as GFD's table.
    let single = node.labels(&spec("single", "all-1g.5gb"));
    for (key, value) in [
        ("nvidia.com/mig.strategy", "single"),
        ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"),
        ("nvidia.com/gpu.count", "7"),
        ("nvidia.com/gpu.memory", "4864"),
        ("nvidia.com/gpu.multiprocessors", "14"),
        ("nvidia.com/gpu.slices.gi", "1"),
        ("nvidia.com/gpu.slices.ci", "1"),
        ("nvidia.com/gpu.engines.copy", "1"),
        ("nvidia.com/gpu.engines.decoder", "0"),
        ("nvidia.com/gpu.replicas", "1"),
        ("nvidia.com/gpu.sharing-strategy", "none"),
    ] {
        assert_eq!(single.get(key).map(String::as_str), Some(value), "{key}");
    }
    for key in gfd_mig_keys("nvidia.com/gpu") {
        assert!(single.contains_key(&key), "single lacks {key}");
    }
    insta::assert_snapshot!("gfd-mig-single", gfd_only(&single));

    // mixed: one set per profile; the GPU itself is MIG-enabled, so GFD
    // labels it without replicas. The single keys are gone.
    let mixed = node.labels(&spec("mixed", "mixed"));
    assert_eq!(mixed["nvidia.com/mig.strategy"], "mixed");
    for (profile, count, memory, sms) in [
        ("3g.20gb", "1", "19968", "42"),
        ("2g.10gb", "1", "9856", "28"),
        ("1g.5gb", "2", "4864", "14"),
    ] {
        let prefix = format!("nvidia.com/mig-{profile}");
        for key in gfd_mig_keys(&prefix) {
            assert!(mixed.contains_key(&key), "mixed lacks {key}");
        }
        assert_eq!(mixed[&format!("{prefix}.count")], count);
        assert_eq!(mixed[&format!("{prefix}.memory")], memory);
        assert_eq!(mixed[&format!("{prefix}.multiprocessors")], sms);
        assert_eq!(
            mixed[&format!("{prefix}.product")],
            format!("NVIDIA-A100-SXM4-40GB-MIG-{profile}")
        );
    }
    assert_eq!(mixed["nvidia.com/gpu.replicas"], "0");
    assert_eq!(mixed["nvidia.com/gpu.product"], "NVIDIA-A100-SXM4-40GB");
    assert!(!mixed.contains_key("nvidia.com/gpu.multiprocessors"));
    insta::assert_snapshot!("gfd-mig-mixed", gfd_only(&mixed));

    // The same layout under single is not one GFD accepts: INVALID.
    let invalid = node.labels(&spec("single", "mixed"));
    assert_eq!(
        invalid["nvidia.com/gpu.product"],
        "NVIDIA-A100-SXM4-40GB-MIG-INVALID"
    );
    assert_eq!(invalid["nvidia.com/gpu.count"], "0");
    assert!(!invalid.keys().any(|k| k.starts_with("nvidia.com/mig-")));
}

#[test]
fn the_device_plugin_expects_the_mig_resources_of_the_strategy_and_stale_labels_go() {
    let node = Node::new("a100-preinstalled", "a100.yaml", "");
    let fake = running_cluster(&node);
    let spec = |strategy: &str| {
        format!(
            "mig:\n  strategy: {strategy}\n  default: mixed\n  configs:\n    version: v1\n    mig-configs:\n      mixed:\n        - devices: all\n          mig-enabled: true\n          mig-devices:\n            \"3g.20gb\": 1\n            \"1g.5gb\": 2\n"
        )
    };
    // The layout applies; the plugin (still offering the whole GPU) is not
    // what mixed asks for.
    let (code, report) = node.apply(&spec("mixed"), Some(&fake), &[]);
    assert_eq!(code, 3, "{report}");
    let (code, report) = node.apply(&spec("mixed"), Some(&fake), &[]);
    assert_eq!(code, 3);
    let (_, state, reason) = steps(&report).remove("device-plugin").unwrap();
    assert_eq!(state, "pending");
    assert!(
        reason.contains("nvidia.com/mig-1g.5gb is none, want 2")
            && reason.contains("nvidia.com/mig-3g.20gb is none, want 1"),
        "{reason}"
    );
    // The plugin registers the MIG devices, as the kubelet reports them.
    fake.set_allocatable(NODE, "nvidia.com/mig-1g.5gb", "2");
    fake.set_allocatable(NODE, "nvidia.com/mig-3g.20gb", "1");
    let (code, report) = node.apply(&spec("mixed"), Some(&fake), &[]);
    let (_, state, reason) = steps(&report).remove("device-plugin").unwrap();
    assert_eq!((code, state.as_str()), (0, "ready"), "{reason}");
    assert!(
        reason.contains("nvidia.com/mig-1g.5gb: 2, nvidia.com/mig-3g.20gb: 1"),
        "{reason}"
    );
    let labels = fake.labels(NODE);
    assert_eq!(labels["nvidia.com/mig-1g.5gb.count"], "2");
    assert_eq!(labels["nvidia.com/mig.strategy"], "mixed");

    // Under single the same layout is refused by the plugin: the step says
    // why, and GFD's labels turn INVALID; the mixed labels leave the node.
    let (code, report) = node.apply(&spec("single"), Some(&fake), &[]);
    assert_ne!(code, 0);
    let (_, state, reason) = steps(&report).remove("device-plugin").unwrap();
    assert_eq!(state, "failed");
    assert!(
        reason.contains(
            "mig-strategy single needs one MIG profile on the node, but it has 1g.5gb, 3g.20gb"
        ),
        "{reason}"
    );
    let labels = fake.labels(NODE);
    assert_eq!(
        labels["nvidia.com/gpu.product"],
        "NVIDIA-A100-SXM4-40GB-MIG-INVALID"
    );
    assert!(
        !labels.keys().any(|k| k.starts_with("nvidia.com/mig-")),
        "{labels:?}"
    );
    assert_eq!(labels["nvidia.com/mig.strategy"], "single");
}
