//! The `cdi` state through `apply`, `plan` and `revert` on fixture hosts
//! with a real driver's file tree (the 550 and 570 packages' names), NVML
//! answered by the fake library: the specs it writes hold to the CDI spec's
//! rules, list NVML's GPUs and MIG devices, point only at files that are
//! there, are rewritten when the driver or the GPUs change and never
//! otherwise, and a file that is not gpuprov's is left alone.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::{copy_host, repo, steps, write_spec};

const CDI_ON: &str = "cdi:\n  enabled: true\n";
const GPU_SPEC: &str = "var/run/cdi/nvidia.yaml";
const MANAGEMENT_SPEC: &str = "var/run/cdi/management.nvidia.com-gpu.yaml";

/// A fixture host whose NVML answers from a copy of a fixture in
/// fixtures/nvml (so a test can change the driver or the GPUs).
struct Node {
    host: tempfile::TempDir,
    nvml: PathBuf,
    state: PathBuf,
}

impl Node {
    fn new(host: &str, nvml: &str) -> Node {
        let host = copy_host(host);
        let copy = host.path().join("fake-nvml.yaml");
        fs::copy(repo().join("fixtures/nvml").join(nvml), &copy).unwrap();
        let state = host.path().join("fake-nvml-state.yaml");
        Node {
            host,
            nvml: copy,
            state,
        }
    }

    fn path(&self) -> &Path {
        self.host.path()
    }

    fn command(&self, command: &str, spec: &str) -> assert_cmd::Command {
        let spec = write_spec(self.path(), "cdi-spec.yaml", spec);
        support::on_fake_nvml_host(command, self.path(), &self.nvml, &self.state, &spec)
    }

    /// `apply --output json`: the exit code and the report.
    fn apply(&self, spec: &str) -> (i32, Value) {
        let output = self
            .command("apply", spec)
            .args(["--output", "json"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let report = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
        (output.status.code().unwrap(), report)
    }

    /// The `cdi` step: (action, outcome, reason).
    fn cdi_step(&self, spec: &str) -> (String, String, String) {
        let (_, report) = self.apply(spec);
        steps(&report)["cdi"].clone()
    }

    fn text(&self, relative: &str) -> Option<String> {
        fs::read_to_string(self.path().join(relative)).ok()
    }

    /// A spec file, parsed as CDI consumers parse it.
    fn spec(&self, relative: &str) -> Value {
        let text = self
            .text(relative)
            .unwrap_or_else(|| panic!("{relative} was not written"));
        serde_saphyr::from_str(&text).unwrap()
    }

    /// The NVML fixture in use, parsed.
    fn nvml(&self) -> Value {
        serde_saphyr::from_str(&fs::read_to_string(&self.nvml).unwrap()).unwrap()
    }

    /// The host file a host path names.
    fn at(&self, host_path: &str) -> PathBuf {
        self.path().join(host_path.trim_start_matches('/'))
    }
}

fn device_names(spec: &Value) -> Vec<String> {
    spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

fn all_edits(spec: &Value) -> Vec<&Value> {
    let mut edits = vec![&spec["containerEdits"]];
    edits.extend(
        spec["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| &d["containerEdits"]),
    );
    edits
}

fn paths<'a>(edits: &[&'a Value], list: &str, key: &str) -> Vec<&'a str> {
    edits
        .iter()
        .flat_map(|e| e[list].as_array().into_iter().flatten())
        .map(|item| item[key].as_str().unwrap())
        .collect()
}

/// What a spec must hold on `node`: the CDI rules, a device per NVML GPU
/// by index and by UUID plus `all`, and nothing that is not on the host.
fn check_spec(node: &Node, spec: &Value, name: &str, version: &str) {
    let problems = support::cdi_schema::problems(spec);
    assert!(problems.is_empty(), "{name}: {problems:#?}");
    let edits = all_edits(spec);
    for path in paths(&edits, "deviceNodes", "path") {
        assert!(
            node.at(path).exists(),
            "{name}: device node {path} is not on the host"
        );
    }
    let mounted = paths(&edits, "mounts", "hostPath");
    for path in &mounted {
        assert!(node.at(path).exists(), "{name}: {path} is not on the host");
        assert!(
            fs::symlink_metadata(node.at(path)).unwrap().is_file(),
            "{name}: {path} is mounted but is not the library file itself"
        );
    }
    for library in [
        "libcuda.so",
        "libnvidia-ml.so",
        "libnvidia-ptxjitcompiler.so",
    ] {
        let wanted = format!("/usr/lib/x86_64-linux-gnu/{library}.{version}");
        assert!(
            mounted.contains(&wanted.as_str()),
            "{name}: {wanted} is not mounted"
        );
    }
    assert!(
        mounted
            .iter()
            .all(|m| !m.contains(".so.") || m.ends_with(version) || m.contains("nvvm70")),
        "{name}: a library of another version is mounted: {mounted:#?}"
    );
    // The links the hook recreates are the host's own.
    for hook in spec["containerEdits"]["hooks"].as_array().unwrap() {
        let args: Vec<&str> = hook["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            node.at(hook["path"].as_str().unwrap()).exists(),
            "{name}: hook binary"
        );
        if args.get(2) == Some(&"create-symlinks") {
            for link in args.iter().filter(|a| a.contains("::")) {
                let (target, at) = link.split_once("::").unwrap();
                assert_eq!(
                    fs::read_link(node.at(at)).unwrap().to_str().unwrap(),
                    target,
                    "{name}: {link}"
                );
            }
        }
    }
}

#[test]
fn the_specs_hold_to_the_cdi_rules_and_list_nvmls_gpus() {
    for (host, nvml, version) in [
        ("h100x8-cdi", "h100x8.yaml", "550.54.15"),
        ("l4x4-570", "l4x4-570.yaml", "570.133.07"),
    ] {
        let node = Node::new(host, nvml);
        let (code, report) = node.apply(CDI_ON);
        assert_eq!(code, 0, "{host}: {report:#}");
        let step = &steps(&report)["cdi"];
        assert_eq!(
            (step.0.as_str(), step.1.as_str()),
            ("change", "configured"),
            "{host}: {step:?}"
        );

        let gpu_spec = node.spec(GPU_SPEC);
        assert_eq!(gpu_spec["kind"], "nvidia.com/gpu");
        check_spec(&node, &gpu_spec, &format!("{host} nvidia.yaml"), version);
        let mut expected = Vec::new();
        for (i, device) in node.nvml()["devices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            expected.push(i.to_string());
            expected.push(device["uuid"].as_str().unwrap().to_string());
        }
        expected.push("all".to_string());
        assert_eq!(device_names(&gpu_spec), expected, "{host}");

        let management = node.spec(MANAGEMENT_SPEC);
        assert_eq!(management["kind"], "management.nvidia.com/gpu");
        check_spec(&node, &management, &format!("{host} management"), version);
        assert_eq!(device_names(&management), ["all"]);
        let nodes = paths(&all_edits(&management), "deviceNodes", "path");
        for gpu in 0..expected.len() / 2 {
            assert!(
                nodes.contains(&format!("/dev/nvidia{gpu}").as_str()),
                "{host}: {nodes:?}"
            );
        }

        insta::assert_snapshot!(
            format!("cdi-{host}-nvidia.yaml"),
            node.text(GPU_SPEC).unwrap()
        );
        insta::assert_snapshot!(
            format!("cdi-{host}-management.yaml"),
            node.text(MANAGEMENT_SPEC).unwrap()
        );
        // containerd reads specs: CDI is on in its config.
        let config = node.text("etc/containerd/config.toml").unwrap();
        assert!(config.contains("enable_cdi = true"), "{host}:\n{config}");
        // ...and runs the CDI runtime for `runtimeClassName: nvidia-cdi`,
        // with the options of gpuprov's own runtime.
        let doc: toml_edit::DocumentMut = config.parse().unwrap();
        let runtimes = doc["plugins"]
            .as_table_like()
            .and_then(|p| p.iter().find_map(|(_, plugin)| plugin.get("containerd")))
            .and_then(|c| c.get("runtimes"))
            .unwrap_or_else(|| panic!("{host}: no runtimes:\n{config}"));
        let (nvidia, cdi) = (&runtimes["nvidia"], &runtimes["nvidia-cdi"]);
        let binary = cdi["options"]["BinaryName"].as_str().unwrap();
        assert!(
            binary.ends_with("/nvidia-container-runtime.cdi"),
            "{host}: {binary}"
        );
        assert_eq!(
            cdi["options"]["SystemdCgroup"].as_bool(),
            nvidia["options"]["SystemdCgroup"].as_bool(),
            "{host}:\n{config}"
        );
    }
}

/// The rules checker is not a formality: what CDI consumers refuse, it
/// refuses, naming the place.
#[test]
fn the_rules_checker_refuses_what_cdi_consumers_refuse() {
    let good = serde_json::json!({
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}],
    });
    assert!(support::cdi_schema::problems(&good).is_empty());
    let broken = |change: &dyn Fn(&mut Value), says: &str| {
        let mut spec = good.clone();
        change(&mut spec);
        let problems = support::cdi_schema::problems(&spec);
        assert!(
            problems.iter().any(|p| p.contains(says)),
            "{says}: {problems:#?}"
        );
    };
    broken(&|s| s["kind"] = "gpu".into(), "has no vendor prefix");
    broken(
        &|s| s["kind"] = "Nvidia.com/gpu".into(),
        "is not a DNS subdomain",
    );
    broken(
        &|s| s["cdiVersion"] = "0.4.0".into(),
        "needs cdiVersion 0.5.0",
    );
    broken(
        &|s| s["devices"][0]["name"] = "-0".into(),
        "must begin and end",
    );
    broken(
        &|s| s["devices"] = serde_json::json!([]),
        "at least one entry",
    );
    broken(
        &|s| s["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] = "dev/nvidia0".into(),
        "is not absolute",
    );
    broken(
        &|s| {
            s["containerEdits"] = serde_json::json!({"hooks": [{"hookName": "prestart", "path": "/usr/bin/nvidia-ctk"}]})
        },
        "is not one of",
    );
    broken(&|s| s["extra"] = 1.into(), "unknown field `extra`");
}

/// A converged node writes nothing; a changed GPU set or driver version
/// rewrites the spec (the toolkit's nvidia-cdi-refresh, done by the state).
#[test]
fn the_spec_is_rewritten_when_the_gpus_or_the_driver_change_and_only_then() {
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    assert_eq!(node.cdi_step(CDI_ON).0, "change");
    let spec_file = node.path().join(GPU_SPEC);
    let before = fs::metadata(&spec_file).unwrap();
    let step = node.cdi_step(CDI_ON);
    assert_eq!(
        (step.0.as_str(), step.1.as_str()),
        ("unchanged", "configured"),
        "{step:?}"
    );
    let after = fs::metadata(&spec_file).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec(), before.mtime()),
        (after.ino(), after.mtime_nsec(), after.mtime()),
        "a converged node rewrote its CDI spec"
    );

    // A GPU falls off the bus: seven GPUs in the spec.
    fs::copy(
        repo().join("fixtures/nvml/h100x7-one-missing.yaml"),
        &node.nvml,
    )
    .unwrap();
    assert_eq!(node.cdi_step(CDI_ON).0, "change");
    let names = device_names(&node.spec(GPU_SPEC));
    assert_eq!(names.len(), 7 * 2 + 1, "{names:?}");
    assert!(!names.contains(&"GPU-5f1c4e2a-0d3b-4c7e-9a10-00000000005D".to_string()));

    // A driver upgrade to 550.90.07: its files beside the old ones (as a
    // package upgrade leaves them until the old ones go), NVML says so.
    let libdir = node.path().join("usr/lib/x86_64-linux-gnu");
    for entry in fs::read_dir(&libdir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".so.550.54.15") && path.is_file() && !path.is_symlink() {
            fs::copy(&path, libdir.join(name.replace("550.54.15", "550.90.07"))).unwrap();
        }
    }
    let text = fs::read_to_string(&node.nvml)
        .unwrap()
        .replace("550.54.15", "550.90.07");
    fs::write(&node.nvml, text).unwrap();
    let step = node.cdi_step(CDI_ON);
    assert_eq!(step.0, "change", "{step:?}");
    assert!(step.2.contains("driver 550.90.07"), "{step:?}");
    let spec = node.spec(GPU_SPEC);
    let mounted = paths(&all_edits(&spec), "mounts", "hostPath");
    assert!(mounted.contains(&"/usr/lib/x86_64-linux-gnu/libcuda.so.550.90.07"));
    assert!(
        !mounted.iter().any(|m| m.ends_with("550.54.15")),
        "{mounted:#?}"
    );
    assert_eq!(node.cdi_step(CDI_ON).0, "unchanged");
}

/// A broken install is reported by name, and no spec is written for it.
#[test]
fn a_missing_library_or_device_node_is_named_and_nothing_is_written() {
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    fs::remove_file(
        node.path()
            .join("usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"),
    )
    .unwrap();
    fs::remove_file(node.path().join("dev/nvidia3")).unwrap();
    let (code, report) = node.apply(CDI_ON);
    assert_ne!(code, 0);
    let step = &steps(&report)["cdi"];
    assert_eq!(step.1, "failed", "{step:?}");
    assert!(
        step.2.contains("libcuda.so.550.54.15 (driver 550.54.15's library) is in none of /usr/lib/x86_64-linux-gnu"),
        "{step:?}"
    );
    assert!(!node.path().join(GPU_SPEC).exists());
    // With the library back, the device node is what is missing.
    fs::write(
        node.path()
            .join("usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"),
        "x",
    )
    .unwrap();
    let step = node.cdi_step(CDI_ON);
    assert!(
        step.2.contains("device node /dev/nvidia3 of GPU 3 (GPU-5f1c4e2a-0d3b-4c7e-9a10-00000000005D) does not exist"),
        "{step:?}"
    );
    assert!(!node.path().join(GPU_SPEC).exists());
}

/// Another tool's spec at gpuprov's path, or a link there, is refused by
/// name and left as it is, by apply and by revert.
#[test]
fn a_spec_gpuprov_did_not_write_is_left_alone() {
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    let theirs = "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: []\n";
    fs::create_dir_all(node.path().join("var/run/cdi")).unwrap();
    fs::write(node.path().join(GPU_SPEC), theirs).unwrap();
    let step = node.cdi_step(CDI_ON);
    assert_eq!(step.1, "failed", "{step:?}");
    assert!(
        step.2
            .contains("/var/run/cdi/nvidia.yaml was not written by gpuprov"),
        "{step:?}"
    );
    assert_eq!(node.text(GPU_SPEC).unwrap(), theirs);
    let revert = node.command("revert", CDI_ON).output().unwrap();
    assert!(revert.status.success());
    assert_eq!(node.text(GPU_SPEC).unwrap(), theirs);

    // A link to a file outside gpuprov's: refused, the link and its
    // target untouched.
    fs::remove_file(node.path().join(GPU_SPEC)).unwrap();
    fs::write(node.path().join("etc/passwd-like"), "root:x:0:0\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd-like", node.path().join(GPU_SPEC)).unwrap();
    let step = node.cdi_step(CDI_ON);
    assert!(step.2.contains("is a symbolic link"), "{step:?}");
    assert_eq!(
        fs::read_to_string(node.path().join("etc/passwd-like")).unwrap(),
        "root:x:0:0\n"
    );
    assert!(node.path().join(GPU_SPEC).is_symlink());
}

/// Turning `cdi` off takes gpuprov's specs away; revert takes them and
/// containerd's CDI setting away.
#[test]
fn disabling_cdi_or_reverting_removes_gpuprovs_specs() {
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    let original_config = node.text("etc/containerd/config.toml").unwrap();
    assert_eq!(node.cdi_step(CDI_ON).0, "change");
    assert!(node.path().join(MANAGEMENT_SPEC).exists());
    let step = node.cdi_step("cdi:\n  enabled: false\n");
    assert_eq!(step.1, "disabled", "{step:?}");
    assert!(!node.path().join(GPU_SPEC).exists());
    assert!(!node.path().join(MANAGEMENT_SPEC).exists());

    assert_eq!(node.cdi_step(CDI_ON).0, "change");
    let output = node.command("revert", CDI_ON).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("CDI specs: removed /var/run/cdi/nvidia.yaml, /var/run/cdi/management.nvidia.com-gpu.yaml"),
        "{stdout}"
    );
    assert!(!node.path().join(GPU_SPEC).exists());
    assert_eq!(
        node.text("etc/containerd/config.toml").unwrap(),
        original_config
    );
}

/// `plan` shows the spec as a diff, before it is written and after the
/// GPUs change.
#[test]
fn plan_shows_the_spec_as_a_diff() {
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    let plan = |node: &Node| {
        let output = node.command("plan", CDI_ON).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let first = plan(&node);
    assert!(
        first.contains("write /var/run/cdi/nvidia.yaml (CDI spec)"),
        "{first}"
    );
    assert!(first.contains("+kind: nvidia.com/gpu"), "{first}");
    assert!(!node.path().join(GPU_SPEC).exists(), "plan wrote the spec");
    node.apply(CDI_ON);
    assert!(plan(&node).contains("CDI spec /var/run/cdi/nvidia.yaml is current"));
    fs::copy(
        repo().join("fixtures/nvml/h100x7-one-missing.yaml"),
        &node.nvml,
    )
    .unwrap();
    let changed = plan(&node);
    assert!(
        changed.contains("/var/run/cdi/nvidia.yaml is out of date"),
        "{changed}"
    );
    assert!(
        changed.contains("-- name: GPU-5f1c4e2a-0d3b-4c7e-9a10-00000000005D"),
        "{changed}"
    );
}

/// With MIG on, each MIG device is `<gpu>:<mig>`, reached through its
/// parent's node and the capability nodes the driver lists for it.
#[test]
fn mig_devices_are_listed_with_their_capability_nodes() {
    let node = Node::new("h100x8-cdi", "h100x8-mig.yaml");
    let table = support::mig_capability_nodes(node.path());
    let spec = format!("{CDI_ON}mig:\n  default: all-3g.40gb\n");
    let (code, report) = node.apply(&spec);
    assert_eq!(code, 0, "{report:#}");
    let gpu_spec = node.spec(GPU_SPEC);
    let problems = support::cdi_schema::problems(&gpu_spec);
    assert!(problems.is_empty(), "{problems:#?}");
    let names = device_names(&gpu_spec);
    // Two 3g.40gb per H100, on every GPU.
    for gpu in 0..8 {
        for mig in 0..2 {
            assert!(names.contains(&format!("{gpu}:{mig}")), "{names:?}");
        }
        assert!(!names.contains(&format!("{gpu}:2")), "{names:?}");
    }
    let mig = gpu_spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "1:0")
        .unwrap();
    let nodes = paths(&[&mig["containerEdits"]], "deviceNodes", "path");
    assert_eq!(nodes[0], "/dev/nvidia1");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for cap in &nodes[1..] {
        let minor = cap.trim_start_matches("/dev/nvidia-caps/nvidia-cap");
        let name = table
            .lines()
            .find_map(|line| line.strip_suffix(&format!(" {minor}")))
            .unwrap();
        assert!(name.starts_with("gpu1/gi"), "{cap} is {name}");
    }
    // The layout did not change: nothing is written again.
    assert_eq!(steps(&node.apply(&spec).1)["cdi"].0, "unchanged");
}

/// A real CDI consumer reads the spec: Debian's podman (4.3, installed by
/// scripts/test) resolves `nvidia.com/gpu=<index>`, `=<uuid>` and
/// `management.nvidia.com/gpu=all` from the generated files and writes
/// their edits into the container's OCI spec (`support::podman`).
#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "podman and mount namespaces need root: run as root (CI and scripts/test do)"
)]
fn podman_injects_the_generated_spec() {
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    assert_eq!(node.apply(CDI_ON).0, 0);
    let root = node.path().display().to_string();
    let specs = [
        node.path().join(GPU_SPEC),
        node.path().join(MANAGEMENT_SPEC),
    ];
    let oci = support::podman::oci_spec(
        node.path(),
        &[&specs[0], &specs[1]],
        &[
            "nvidia.com/gpu=3",
            "nvidia.com/gpu=GPU-5f1c4e2a-0d3b-4c7e-9a10-0000000000DB",
            "management.nvidia.com/gpu=all",
        ],
    );
    let env: Vec<&str> = oci["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=void"), "{env:?}");
    let devices: Vec<&str> = oci["linux"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    for wanted in [
        "/dev/nvidia3",
        "/dev/nvidia7",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia0",
    ] {
        assert!(devices.contains(&wanted), "{wanted} not in {devices:?}");
    }
    let mounts: Vec<(&str, &str)> = oci["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["source"].as_str().unwrap(),
                m["destination"].as_str().unwrap(),
            )
        })
        .collect();
    let libcuda = "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15";
    assert!(
        mounts.contains(&(format!("{root}{libcuda}").as_str(), libcuda)),
        "{mounts:#?}"
    );
    let hooks = oci["hooks"]["createContainer"].as_array().unwrap();
    assert!(
        hooks.iter().any(|h| h["args"][2] == "update-ldcache"),
        "{hooks:#?}"
    );
}

/// The device plugin's static pod hands devices out by CDI name, with the
/// same `nvidia-ctk` as gpuprov's own spec (where the host has it, here
/// /usr/local/bin), the spec directory mounted, and the spec's
/// `devicePlugin.env` winning over gpuprov's settings.
#[test]
fn the_device_plugin_uses_cdi_with_the_hook_of_gpuprovs_spec() {
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    fs::create_dir_all(node.at("/usr/local/bin")).unwrap();
    fs::rename(
        node.at("/usr/bin/nvidia-ctk"),
        node.at("/usr/local/bin/nvidia-ctk"),
    )
    .unwrap();
    let pod_path = "etc/kubernetes/manifests/gpuprov-device-plugin.yaml";
    let env_of = |pod: &Value| -> Vec<(String, String)> {
        pod["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let text = |key: &str| e[key].as_str().unwrap_or_default().to_string();
                (text("name"), text("value"))
            })
            .collect()
    };
    let (code, report) = node.apply(CDI_ON);
    assert_eq!(code, 0, "{report}");
    let pod: Value = serde_saphyr::from_str(&node.text(pod_path).unwrap()).unwrap();
    let env = env_of(&pod);
    let value = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in {env:?}"))
    };
    assert_eq!(value("DEVICE_LIST_STRATEGY"), "cdi-annotations");
    let gpu_spec = node.spec(GPU_SPEC);
    let hooks = paths(&[&gpu_spec["containerEdits"]], "hooks", "path");
    assert!(!hooks.is_empty());
    assert!(
        hooks.iter().all(|h| *h == "/usr/local/bin/nvidia-ctk"),
        "{hooks:?}"
    );
    assert_eq!(value("NVIDIA_CDI_HOOK_PATH"), hooks[0]);
    let specs_volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/var/run/cdi")
        .unwrap_or_else(|| panic!("no volume for the spec directory: {pod}"));
    let mounts = pod["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == specs_volume["name"] && m["mountPath"] == "/var/run/cdi"),
        "{mounts:?}"
    );

    let (code, report) = node.apply(
        "cdi:\n  enabled: true\ndevicePlugin:\n  env:\n    - name: DEVICE_LIST_STRATEGY\n      value: cdi-cri\n",
    );
    assert_eq!(code, 0, "{report}");
    let pod: Value = serde_saphyr::from_str(&node.text(pod_path).unwrap()).unwrap();
    let strategies: Vec<_> = env_of(&pod)
        .into_iter()
        .filter(|(n, _)| n == "DEVICE_LIST_STRATEGY")
        .collect();
    assert_eq!(
        strategies,
        [("DEVICE_LIST_STRATEGY".to_string(), "cdi-cri".to_string())]
    );
}

#[test]
fn paths_no_consumer_can_use_are_left_out_and_named() {
    // Two of the driver's libraries with names nothing downstream can
    // take: one not UTF-8 (the spec would name a path that does not
    // exist), one with `::` (nvidia-ctk's create-symlinks refuses it,
    // "invalid symlink specification", and every GPU container with it).
    use std::os::unix::ffi::OsStrExt;
    let node = Node::new("h100x8-cdi", "h100x8.yaml");
    let lib = node.path().join("usr/lib/x86_64-linux-gnu");
    fs::write(lib.join("libnvidia-evil::x.so.550.54.15"), "x").unwrap();
    std::os::unix::fs::symlink(
        "libnvidia-evil::x.so.550.54.15",
        lib.join("libnvidia-evil::x.so.1"),
    )
    .unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"libnvidia-\xff.so.550.54.15");
    fs::write(lib.join(odd), "x").unwrap();
    let (_, outcome, reason) = node.cdi_step(CDI_ON);
    assert_eq!(outcome, "configured", "{reason}");
    assert!(
        reason.contains("/usr/lib/x86_64-linux-gnu/libnvidia-evil::x.so.550.54.15 (it holds `::`, nvidia-ctk's link separator)"),
        "{reason}"
    );
    assert!(
        reason.contains(
            "/usr/lib/x86_64-linux-gnu/libnvidia-\u{fffd}.so.550.54.15 (its name is not UTF-8)"
        ),
        "{reason}"
    );
    let spec = node.text(GPU_SPEC).unwrap();
    assert!(
        !spec.contains("evil") && !spec.contains('\u{fffd}'),
        "{spec}"
    );
    check_spec(&node, &node.spec(GPU_SPEC), GPU_SPEC, "550.54.15");
}
