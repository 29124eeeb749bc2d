//! The gpu-feature-discovery (builtin) and gpu-health states through
//! `apply`, with the fake NVML answering through the real nvml-wrapper.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::{copy_host, gpuprov_with_fake_nvml, steps, write_spec};

/// `apply --labels-sink stdout` with builtin GFD; the labels and the report.
fn apply(host: &Path, fixture: &str) -> (i32, BTreeMap<String, String>, serde_json::Value) {
    let spec = write_spec(host, "gfd.yaml", "gfd:\n  mode: builtin\n");
    let report_path = host.join("var/lib/gpuprov/last-run.json");
    let output = gpuprov_with_fake_nvml(fixture)
        .args([
            "apply",
            "--labels-sink",
            "stdout",
            "--host-exec",
            "prefix",
            "--config",
        ])
        .arg(&spec)
        .arg("--nvml-lib")
        .arg(support::fake_nvml_library())
        .arg("--host-root")
        .arg(host)
        .output()
        .unwrap();
    let labels = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let report = serde_json::from_str(&std::fs::read_to_string(report_path).unwrap()).unwrap();
    (output.status.code().unwrap(), labels, report)
}

fn gfd_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .filter(|(k, _)| {
            k.starts_with("nvidia.com/gpu.")
                && *k != "nvidia.com/gpu.present"
                && !k.contains("deploy")
                || k.starts_with("nvidia.com/cuda.")
                || k.starts_with("nvidia.com/mig.")
                || k.starts_with("nvidia.com/mps.")
                || k.starts_with("nvidia.com/vgpu.")
        })
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect()
}

#[test]
fn builtin_gfd_labels_for_each_fixture() {
    for (host_name, fixture) in [
        ("h100x8-nvswitch-preinstalled", "h100x8.yaml"),
        ("a100-preinstalled", "a100-mig.yaml"),
        ("a100-preinstalled", "l4.yaml"),
        ("rtx-with-audio", "mixed-t4-a10g.yaml"),
    ] {
        let host = copy_host(host_name);
        let (code, labels, report) = apply(host.path(), fixture);
        assert_eq!(code, 0, "{host_name}/{fixture}: {report}");
        assert_eq!(steps(&report)["gpu-feature-discovery"].1, "ready");
        insta::assert_snapshot!(format!("gfd-{host_name}-{fixture}"), gfd_labels(&labels));
    }
}

#[test]
fn a_vgpu_guest_is_labelled_with_its_host_driver() {
    let host = copy_host("a100-preinstalled");
    // The GPU's PCI config space as a VM sees a vGPU: a capability list
    // (status bit 4, first capability at 0x60) holding NVIDIA's
    // vendor-specific capability, "VF", then the host driver record.
    let mut config = vec![0u8; 256];
    config[0x06] = 0x10;
    config[0x34] = 0x60;
    let capability: Vec<u8> = [0x09, 0x00, 32, b'V', b'F', 0x00, 0x00]
        .into_iter()
        .chain(*b"550.54.15\0r550_00\0\0\0")
        .collect();
    config[0x60..0x60 + capability.len()].copy_from_slice(&capability);
    std::fs::write(
        host.path().join("sys/bus/pci/devices/0000:00:05.0/config"),
        &config,
    )
    .unwrap();
    let (code, labels, report) = apply(host.path(), "a100-mig.yaml");
    assert_eq!(code, 0, "{report}");
    assert_eq!(labels["nvidia.com/vgpu.present"], "true");
    assert_eq!(labels["nvidia.com/vgpu.host-driver-version"], "550.54.15");
    assert_eq!(labels["nvidia.com/vgpu.host-driver-branch"], "r550_00");

    // A bare-metal GPU: no such capability.
    let host = copy_host("a100-preinstalled");
    let (_, labels, _) = apply(host.path(), "a100-mig.yaml");
    assert_eq!(labels["nvidia.com/vgpu.present"], "false");
    assert!(!labels.contains_key("nvidia.com/vgpu.host-driver-version"));
}

#[test]
fn the_h100_node_is_labelled_as_gfd_would() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let (_, labels, _) = apply(host.path(), "h100x8.yaml");
    for (key, value) in [
        ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),
        ("nvidia.com/gpu.count", "8"),
        ("nvidia.com/gpu.memory", "81559"),
        ("nvidia.com/gpu.family", "hopper"),
        ("nvidia.com/gpu.compute.major", "9"),
        ("nvidia.com/gpu.compute.minor", "0"),
        ("nvidia.com/cuda.driver-version.full", "550.54.15"),
        ("nvidia.com/cuda.driver-version.major", "550"),
        ("nvidia.com/cuda.driver-version.minor", "54"),
        ("nvidia.com/cuda.driver-version.revision", "15"),
        ("nvidia.com/cuda.runtime-version.full", "12.4"),
        ("nvidia.com/cuda.runtime-version.major", "12"),
        ("nvidia.com/cuda.runtime-version.minor", "4"),
        ("nvidia.com/gpu.machine", "PowerEdge-XE9680"),
        ("nvidia.com/gpu.mode", "compute"),
        ("nvidia.com/mig.capable", "true"),
        ("gpuprov.io/gpu-health", "ready"),
    ] {
        assert_eq!(labels.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert!(
        !labels.keys().any(|k| k.contains("timestamp")),
        "no timestamp label: it would make every run a write"
    );
}

#[test]
fn a_mixed_node_gets_the_same_labels_every_run() {
    let host = copy_host("rtx-with-audio");
    let (_, first, _) = apply(host.path(), "mixed-t4-a10g.yaml");
    assert_eq!(
        first["nvidia.com/gpu.product"], "Tesla-T4",
        "a tie goes to the lowest NVML index"
    );
    assert_eq!(
        first["nvidia.com/gpu.mode"], "graphics",
        "the node's GPU is a VGA-class function"
    );
    for _ in 0..100 {
        let spec = host.path().join("gfd.yaml");
        let output = gpuprov_with_fake_nvml("mixed-t4-a10g.yaml")
            .args([
                "plan",
                "--output",
                "json",
                "--host-exec",
                "prefix",
                "--config",
            ])
            .arg(&spec)
            .arg("--nvml-lib")
            .arg(support::fake_nvml_library())
            .arg("--host-root")
            .arg(host.path())
            .output()
            .unwrap();
        let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let labels: BTreeMap<String, String> =
            serde_json::from_value(plan["labels"].clone()).unwrap();
        assert_eq!(gfd_labels(&labels), gfd_labels(&first));
    }
}

#[test]
fn a_gpu_that_left_the_bus_makes_the_node_degraded() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let (code, labels, report) = apply(host.path(), "h100x7-one-missing.yaml");
    assert_eq!(code, 3, "degraded is not converged");
    let health = &steps(&report)["gpu-health"];
    assert_eq!(health.1, "degraded");
    assert!(
        health
            .2
            .contains("8 GPUs on the nvidia driver but NVML sees 7 (missing: 0000:5d:00.0)"),
        "{}",
        health.2
    );
    assert_eq!(labels["gpuprov.io/gpu-health"], "degraded");
    assert_eq!(
        steps(&report)["gpu-feature-discovery"].1,
        "ready",
        "the other GPUs are still labelled"
    );
    assert_eq!(labels["nvidia.com/gpu.count"], "7");

    let host = copy_host("h100x8-nvswitch-preinstalled");
    let (_, labels, report) = apply(host.path(), "gpu-lost.yaml");
    assert_eq!(steps(&report)["gpu-health"].1, "degraded");
    assert!(steps(&report)["gpu-health"].2.contains("GPU 3 is lost"));
    assert_eq!(labels["gpuprov.io/gpu-health"], "degraded");
}

#[test]
fn nvml_failures_are_reported_on_the_states_that_need_it() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let (code, _, report) = apply(host.path(), "driver-not-loaded.yaml");
    assert_eq!(code, 3);
    let steps = steps(&report);
    assert!(
        steps["gpu-health"].2.starts_with("driver not loaded"),
        "{:?}",
        steps["gpu-health"]
    );
    assert_eq!(steps["gpu-feature-discovery"].1, "failed");
    assert!(
        steps["gpu-feature-discovery"]
            .2
            .contains("no GPU features without NVML: driver not loaded")
    );
}

/// GPUs on one NVLink fabric clique, with an IMEX peer list on the host:
/// GFD's `gpu.clique` and `gpu.imex-domain`. The fake NVML answers
/// `nvmlDeviceGetGpuFabricInfo` from each device's `fabric`.
#[test]
fn gpus_on_one_nvlink_clique_are_labelled_with_it_and_their_imex_domain() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let fixture = host.path().join("fabric.yaml");
    let text = std::fs::read_to_string(support::repo().join("fixtures/nvml/h100x8.yaml"))
        .unwrap()
        .replace(
            "    persistenceMode: true\n",
            "    persistenceMode: true\n    fabric: {clusterUuid: 6e1e0d9a-5b1f-4a7c-9d2e-3f4a5b6c7d8e, cliqueId: 32766}\n",
        );
    std::fs::write(&fixture, text).unwrap();
    // Without the peer list: no IMEX labels.
    let (_, labels, _) = apply(host.path(), fixture.to_str().unwrap());
    assert!(!labels.contains_key("nvidia.com/gpu.clique"), "{labels:?}");

    let imex = host.path().join("etc/nvidia-imex");
    std::fs::create_dir_all(&imex).unwrap();
    std::fs::write(
        imex.join("nodes_config.cfg"),
        "192.168.0.12\n192.168.0.11\n",
    )
    .unwrap();
    let (code, labels, _) = apply(host.path(), fixture.to_str().unwrap());
    assert_eq!(code, 0);
    assert_eq!(
        labels["nvidia.com/gpu.clique"],
        "6e1e0d9a-5b1f-4a7c-9d2e-3f4a5b6c7d8e.32766"
    );
    // uuid.uuid5(uuid.UUID(int=0), "192.168.0.11\n192.168.0.12"): GFD's
    // uuid.NewSHA1 of the sorted peers.
    assert_eq!(
        labels["nvidia.com/gpu.imex-domain"],
        "97752ca8-08fb-5f83-90f8-ee63c6179fd7.32766"
    );

    // A peer list that is not a file: no IMEX labels, the others stay, and
    // the step says why.
    std::fs::remove_file(imex.join("nodes_config.cfg")).unwrap();
    std::fs::create_dir(imex.join("nodes_config.cfg")).unwrap();
    let (code, labels, report) = apply(host.path(), fixture.to_str().unwrap());
    assert_eq!(code, 0);
    assert!(!labels.contains_key("nvidia.com/gpu.clique"));
    assert_eq!(labels["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3");
    let reason = &steps(&report)["gpu-feature-discovery"].2;
    assert!(reason.contains("no IMEX labels: "), "{reason}");
    std::fs::remove_dir(imex.join("nodes_config.cfg")).unwrap();

    // A peer list GFD would refuse: no IMEX labels, and the step says why.
    std::fs::write(imex.join("nodes_config.cfg"), "192.168.0.11\nnode-b\n").unwrap();
    let (code, labels, report) = apply(host.path(), fixture.to_str().unwrap());
    assert_eq!(code, 0);
    assert!(!labels.contains_key("nvidia.com/gpu.imex-domain"));
    let reason = &steps(&report)["gpu-feature-discovery"].2;
    assert!(
        reason.contains("/etc/nvidia-imex/nodes_config.cfg:2: `node-b` is not an IP address"),
        "{reason}"
    );
}
