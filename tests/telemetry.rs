//! The built-in DCGM exporter (`dcgmExporter.mode: builtin`): a running
//! `gpuprov run` is scraped, and its series are compared, name by name,
//! label by label and value by value, with what the fake NVML answers
//! (each GPU's `telemetry` in the fixture) and with dcgm-exporter's
//! exposition (names, HELP and TYPE lines, labels).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::daemon::{Daemon, eventually, free_port, get};
use support::fake_api::FakeApi;
use support::pod_resources::{Container, Pod, PodResources};
use support::{copy_host, write_spec};

const NODE: &str = "gpu-node-1";
const H100: &str = "NVIDIA H100 80GB HBM3";

/// Series of one metric: its labels → its value.
fn series(body: &str, name: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| l.split_once("} "))
        .map(|(labels, value)| (labels.to_string(), value.to_string()))
        .collect()
}

#[test]
fn gpuprov_run_serves_dcgm_exporters_metrics_from_nvml() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let fixture = support::telemetry_fixture(host.path());
    let spec = write_spec(host.path(), "node.yaml", "dcgmExporter:\n  mode: builtin\n");
    // The kubelet's pod resources: GPU 0 whole to ml/trainer-0, a
    // time-sliced replica of GPU 1 to ml/infer-1, GPU 2's UUID under a
    // resource that is not NVIDIA's (ignored).
    let uuid = |i: usize| {
        let text = std::fs::read_to_string(&fixture).unwrap();
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("uuid: "))
            .nth(i)
            .unwrap()
            .to_string()
    };
    let _kubelet = PodResources::serve(
        &host
            .path()
            .join("var/lib/kubelet/pod-resources/kubelet.sock"),
        vec![
            Pod {
                namespace: "ml",
                name: "trainer-0",
                containers: vec![Container {
                    name: "main",
                    devices: vec![("nvidia.com/gpu", vec![uuid(0)])],
                }],
            },
            Pod {
                namespace: "ml",
                name: "infer-1",
                containers: vec![Container {
                    name: "server",
                    devices: vec![("nvidia.com/gpu", vec![format!("{}::2", uuid(1))])],
                }],
            },
            Pod {
                namespace: "other",
                name: "x",
                containers: vec![Container {
                    name: "c",
                    devices: vec![("example.com/dev", vec![uuid(2)])],
                }],
            },
        ],
    );
    let port = free_port();
    let _daemon = Daemon::spawn_nvml(&fake, NODE, host.path(), port, &spec, &fixture, &[]);
    eventually(
        "a scrape with GPU metrics after a converge",
        Duration::from_secs(30),
        || {
            get(port, "/metrics").is_some_and(|(_, body)| {
                body.contains("DCGM_FI_DEV_GPU_UTIL{") && body.contains("gpuprov_converges_total{")
            })
        },
    );
    let (code, body) = get(port, "/metrics").unwrap();
    assert_eq!(code, 200);

    // dcgm-exporter's HELP and TYPE lines; counters keep their names.
    for (name, kind, help) in [
        ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
        (
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "gauge",
            "Memory utilization (in %).",
        ),
        (
            "DCGM_FI_DEV_FB_USED",
            "gauge",
            "Frame buffer memory used (in MB).",
        ),
        (
            "DCGM_FI_DEV_FB_FREE",
            "gauge",
            "Frame buffer memory free (in MB).",
        ),
        ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
        ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "counter",
            "Total energy consumption since boot (in mJ).",
        ),
        (
            "DCGM_FI_DEV_SM_CLOCK",
            "gauge",
            "SM clock frequency (in MHz).",
        ),
        (
            "DCGM_FI_DEV_MEM_CLOCK",
            "gauge",
            "Memory clock frequency (in MHz).",
        ),
        (
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
            "counter",
            "Total number of PCIe retries.",
        ),
        (
            "DCGM_FI_DEV_ENC_UTIL",
            "gauge",
            "Encoder utilization (in %).",
        ),
        (
            "DCGM_FI_DEV_DEC_UTIL",
            "gauge",
            "Decoder utilization (in %).",
        ),
    ] {
        assert!(
            body.contains(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n")),
            "{name}:\n{body}"
        );
    }

    // Every GPU's series, labelled as dcgm-exporter labels them, with the
    // fixture's values in DCGM's units.
    let facts: Vec<(String, String)> = {
        let text = std::fs::read_to_string(&fixture).unwrap();
        let field = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(key))
                .map(|v| v.trim().trim_matches('"').to_string())
                .collect()
        };
        field("uuid:").into_iter().zip(field("pciBusId:")).collect()
    };
    // dcgm-exporter's labels, then its pod attributes for a GPU in use.
    let labels = |i: usize| {
        let pod = match i {
            0 => ",container=\"main\",namespace=\"ml\",pod=\"trainer-0\"",
            1 => ",container=\"server\",namespace=\"ml\",pod=\"infer-1\"",
            _ => "",
        };
        format!(
            "gpu=\"{i}\",UUID=\"{}\",pci_bus_id=\"{}\",device=\"nvidia{i}\",modelName=\"{H100}\",Hostname=\"{NODE}\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"{pod}",
            facts[i].0, facts[i].1
        )
    };
    for i in 0..8usize {
        let want = |name: &str, value: String| {
            assert_eq!(
                series(&body, name).get(&labels(i)),
                Some(&value),
                "{name} of GPU {i}:\n{body}"
            );
        };
        want("DCGM_FI_DEV_GPU_UTIL", (10 + i).to_string());
        want("DCGM_FI_DEV_MEM_COPY_UTIL", (20 + i).to_string());
        want("DCGM_FI_DEV_FB_USED", (1024 * (i + 1)).to_string());
        want("DCGM_FI_DEV_FB_FREE", (81559 - 1024 * (i + 1)).to_string());
        want("DCGM_FI_DEV_GPU_TEMP", (40 + i).to_string());
        // Milliwatts to watts.
        want(
            "DCGM_FI_DEV_POWER_USAGE",
            ((300_000 + 125 * i) as f64 / 1000.0).to_string(),
        );
        want("DCGM_FI_DEV_SM_CLOCK", "1980".to_string());
        want("DCGM_FI_DEV_MEM_CLOCK", "2619".to_string());
        want("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", i.to_string());
    }
    // The error counters, as the fixture's GPU 3 has them.
    for (name, kind, value) in [
        ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "53"),
        ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "3"),
        ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "0"),
        ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "counter", "30"),
        ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "counter", "1"),
        ("DCGM_FI_DEV_RETIRED_SBE", "counter", "3"),
        ("DCGM_FI_DEV_RETIRED_DBE", "counter", "1"),
        ("DCGM_FI_DEV_RETIRED_PENDING", "counter", "1"),
        ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "3"),
        ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "2"),
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "0"),
        // Its 18 NVLinks' data counters, both ways, KiB: 3·18·1000 + 2·153.
        ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "counter", "162306"),
    ] {
        assert!(body.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
        assert_eq!(
            series(&body, name).get(&labels(3)).map(String::as_str),
            Some(value),
            "{name}"
        );
    }
    // GPU 7 cannot say: no series for it, the others have theirs.
    for name in [
        "DCGM_FI_DEV_ENC_UTIL",
        "DCGM_FI_DEV_DEC_UTIL",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_MEMORY_TEMP",
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "DCGM_FI_DEV_RETIRED_SBE",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    ] {
        let found = series(&body, name);
        assert_eq!(found.len(), 7, "{name}: {found:?}");
        assert!(!found.contains_key(&labels(7)));
    }
    assert_eq!(
        series(&body, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")[&labels(3)],
        "1000000003"
    );
    // gpuprov's own metrics are there too, in the same text format.
    assert!(
        body.contains("# TYPE gpuprov_converges_total counter\n"),
        "{body}"
    );
    assert!(!body.contains("# EOF"));
    // NVML answers: the node-status metric for the driver's validation.
    assert!(
        body.contains("\ngpu_operator_node_driver_validation 1\n"),
        "{body}"
    );

    // The state says who serves the metrics, and no exporter pod is asked for.
    let labels = fake.labels(NODE);
    assert_eq!(labels["gpuprov.io/dcgm-exporter"], "ready");
    assert!(!labels.contains_key("nvidia.com/gpu.deploy.dcgm-exporter"));
}

#[test]
fn a_bad_exporter_mode_is_refused_with_its_place() {
    let host = copy_host("a100-preinstalled");
    for (yaml, wanted) in [
        (
            "dcgmExporter:\n  mode: sidecar\n",
            ":2:9: dcgmExporter.mode must be operand or builtin, not `sidecar`",
        ),
        (
            "dcgmExporter:\n  mode: builtin\n  sampleIntervalSeconds: 0\n",
            "dcgmExporter.sampleIntervalSeconds must be at least 1",
        ),
        (
            "gfd:\n  sampleIntervalSeconds: 5\n",
            "gfd.sampleIntervalSeconds is not a setting",
        ),
        (
            "devicePlugin:\n  mode: builtin\n",
            "devicePlugin.mode must be operand or dra, not `builtin`",
        ),
    ] {
        let spec = write_spec(host.path(), "bad.yaml", yaml);
        let output = support::run_on("plan", host.path(), &spec);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{yaml}\n{stderr}");
        assert!(stderr.contains(wanted), "wanted {wanted:?} in:\n{stderr}");
    }
}

/// `gpuprov run` with the built-in exporter and `extra` in its spec on a
/// copy of the 8-GPU node, its NVML events fed from a file the test
/// writes; returned once `gpu-health` is ready.
struct XidNode {
    fake: FakeApi,
    host: tempfile::TempDir,
    events: std::path::PathBuf,
    port: u16,
    _daemon: Daemon,
}

impl XidNode {
    fn start(extra: &str) -> XidNode {
        let fake = FakeApi::with_node(NODE, &[]);
        fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
        let host = copy_host("h100x8-nvswitch-preinstalled");
        let fixture = support::telemetry_fixture(host.path());
        let events = host.path().join("nvml-events");
        std::fs::write(&events, "").unwrap();
        let spec = write_spec(
            host.path(),
            "node.yaml",
            &format!("dcgmExporter:\n  mode: builtin\n{extra}"),
        );
        let port = free_port();
        let daemon = Daemon::spawn_nvml(
            &fake,
            NODE,
            host.path(),
            port,
            &spec,
            &fixture,
            &[("GPUPROV_FAKE_NVML_EVENTS", &events)],
        );
        let node = XidNode {
            fake,
            host,
            events,
            port,
            _daemon: daemon,
        };
        eventually("gpu-health ready", Duration::from_secs(30), || {
            node.health().as_deref() == Some("ready")
        });
        node
    }

    fn health(&self) -> Option<String> {
        self.fake.labels(NODE).get("gpuprov.io/gpu-health").cloned()
    }
}

/// XID 79 on GPU 3, injected into the fake NVML's event set while
/// `gpuprov run` waits on it: `gpu-health` turns `degraded` naming the XID
/// and its meaning, a Node event says so, dcgm-exporter's
/// `DCGM_FI_DEV_XID_ERRORS` reads 79; after `health.recoverAfterSeconds`
/// without another, the GPU is healthy again. An application's XID (13)
/// changes nothing.
#[test]
fn a_critical_xid_degrades_the_gpu_then_it_recovers() {
    let node = XidNode::start("health:\n  recoverAfterSeconds: 3\n");
    let (fake, events, port) = (&node.fake, &node.events, node.port);

    // An application's error: ignored by default, as the device plugin does.
    std::fs::write(events, "2 xid 13\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node.health().as_deref(), Some("ready"));

    std::fs::write(events, "2 xid 13\n3 xid 79\n").unwrap();
    eventually("gpu-health degraded", Duration::from_secs(30), || {
        node.health().as_deref() == Some("degraded")
    });
    let said: Vec<String> = fake
        .events()
        .iter()
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        said.iter().any(|n| n.contains(
            "GPU 3 (GPU-5f1c4e2a-0d3b-4c7e-9a10-00000000005D): XID 79 (GPU has fallen off the bus)"
        )),
        "{said:#?}"
    );
    let (_, body) = get(port, "/metrics").unwrap();
    let xids = series(&body, "DCGM_FI_DEV_XID_ERRORS");
    let values: Vec<&str> = xids.values().map(String::as_str).collect();
    assert_eq!(values, ["0", "0", "0", "79", "0", "0", "0", "0"], "{body}");

    eventually("gpu-health ready again", Duration::from_secs(60), || {
        node.health().as_deref() == Some("ready")
    });
}

/// GPU 0 with MIG on, a 1g.10gb and a 3g.40gb GPU instance: as
/// dcgm-exporter's default (flex) mode has it, GPU 0 has no series of its
/// own but one per GPU instance, labelled `GPU_I_PROFILE` and `GPU_I_ID`,
/// with the instance's own frame buffer, the GPU's temperature and no
/// utilization; a pod holding a MIG device (by its UUID, or GKE's
/// `nvidia0/gi1`) is on its instance's series.
#[test]
fn mig_instances_get_their_own_series() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let fixture = support::telemetry_fixture(host.path());
    let text = std::fs::read_to_string(&fixture).unwrap();
    let text = text
        .replacen(
            "    migMode: [0, 0]\n",
            "    migMode: [1, 1]\n    migProfiles: h100-80gb\n    migInstances: [{profile: 0, start: 0}, {profile: 2, start: 4}]\n",
            1,
        )
        .replacen(
            "telemetry: {gpuUtil: 10,",
            "telemetry: {migMemoryUsedMiB: {1: 512, 2: 4096}, gpuUtil: 10,",
            1,
        );
    std::fs::write(&fixture, text).unwrap();
    let spec = write_spec(host.path(), "node.yaml", "dcgmExporter:\n  mode: builtin\n");
    // The fake's MIG device UUIDs: the GPU's, its fourth group the GPU and
    // compute instance ids.
    let gpu0 = "GPU-5f1c4e2a-0d3b-4c7e-9a10-000000000018";
    let _kubelet = PodResources::serve(
        &host
            .path()
            .join("var/lib/kubelet/pod-resources/kubelet.sock"),
        vec![
            Pod {
                namespace: "ml",
                name: "mig-pod",
                containers: vec![Container {
                    name: "main",
                    devices: vec![(
                        "nvidia.com/mig-3g.40gb",
                        vec!["MIG-5f1c4e2a-0d3b-4c7e-0200-000000000018".to_string()],
                    )],
                }],
            },
            Pod {
                namespace: "gke",
                name: "small",
                containers: vec![Container {
                    name: "c",
                    devices: vec![("nvidia.com/gpu", vec!["nvidia0/gi1".to_string()])],
                }],
            },
        ],
    );
    let port = free_port();
    let _daemon = Daemon::spawn_nvml(&fake, NODE, host.path(), port, &spec, &fixture, &[]);
    eventually("a scrape with MIG series", Duration::from_secs(30), || {
        get(port, "/metrics").is_some_and(|(_, body)| body.contains("GPU_I_ID="))
    });
    let (_, body) = get(port, "/metrics").unwrap();
    let instance = |profile: &str, id: u32, pod: &str| {
        format!(
            "gpu=\"0\",UUID=\"{gpu0}\",pci_bus_id=\"00000000:18:00.0\",device=\"nvidia0\",modelName=\"{H100}\",GPU_I_PROFILE=\"{profile}\",GPU_I_ID=\"{id}\",Hostname=\"{NODE}\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"{pod}"
        )
    };
    let small = instance(
        "1g.10gb",
        1,
        ",container=\"c\",namespace=\"gke\",pod=\"small\"",
    );
    let large = instance(
        "3g.40gb",
        2,
        ",container=\"main\",namespace=\"ml\",pod=\"mig-pod\"",
    );
    for (name, wanted) in [
        ("DCGM_FI_DEV_FB_USED", [("512", &small), ("4096", &large)]),
        // 1g.10gb: 9984 MiB, 3g.40gb: 40448 MiB.
        ("DCGM_FI_DEV_FB_FREE", [("9472", &small), ("36352", &large)]),
        ("DCGM_FI_DEV_GPU_TEMP", [("40", &small), ("40", &large)]),
        ("DCGM_FI_DEV_XID_ERRORS", [("0", &small), ("0", &large)]),
    ] {
        let found = series(&body, name);
        for (value, labels) in wanted {
            assert_eq!(
                found.get(labels.as_str()).map(String::as_str),
                Some(value),
                "{name}:\n{body}"
            );
        }
        // Two instances and seven whole GPUs; GPU 0 has no series of its own.
        assert_eq!(found.len(), 9, "{name}: {found:#?}");
        assert!(
            found
                .keys()
                .filter(|l| l.starts_with("gpu=\"0\""))
                .all(|l| l.contains("GPU_I_ID")),
            "{name}: {found:#?}"
        );
    }
    // No utilization for a MIG instance, as NVML and DCGM give none.
    let util = series(&body, "DCGM_FI_DEV_GPU_UTIL");
    assert_eq!(util.len(), 7, "{util:#?}");
    assert!(util.keys().all(|l| !l.starts_with("gpu=\"0\"")));
}

/// 2,000 critical XIDs in a burst (a GPU falling apart): one converge for
/// the burst, not one each, and the record written in batches, keeping
/// the newest 64.
#[test]
fn a_burst_of_xids_is_one_converge_not_one_each() {
    let node = XidNode::start("");
    let (events, port, host) = (&node.events, node.port, &node.host);
    let converges = || -> u64 {
        let (_, body) = get(port, "/metrics").unwrap();
        body.lines()
            .filter(|l| l.starts_with("gpuprov_converges_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = converges();
    let burst: String = (0..2000).map(|i| format!("{} xid 79\n", i % 8)).collect();
    std::fs::write(events, burst).unwrap();
    eventually("gpu-health degraded", Duration::from_secs(30), || {
        node.health().as_deref() == Some("degraded")
    });
    std::thread::sleep(Duration::from_secs(4));
    let made = converges() - before;
    assert!(made <= 4, "{made} converges for one burst");
    let record = std::fs::read_to_string(host.path().join("run/gpuprov/gpu-errors.json")).unwrap();
    let kept: Vec<serde_json::Value> = serde_json::from_str(&record).unwrap();
    assert_eq!(kept.len(), 64, "the newest 64 kept");
}
