//! GPUs through Dynamic Resource Allocation (issue 36): `devicePlugin.mode:
//! dra` makes `gpuprov run` the node's `gpu.nvidia.com` DRA driver. Each
//! test runs the real binary against the fake API server (ResourceSlices,
//! ResourceClaims) and a fake kubelet that registers the plugin and calls
//! it over its unix sockets with the kubelet's own messages.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use serde_json::Value;
use support::daemon::get;
use support::dra_node::{DRA, DRIVER, NODE, Node};
use support::kubelet::Kubelet;

/// The claims' CDI spec files in the node's spec directory.
fn claim_specs(node: &Node) -> Vec<String> {
    fs::read_dir(node.at("/var/run/cdi"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("claim"))
                .collect()
        })
        .unwrap_or_default()
}

fn device_names(slice: &Value) -> Vec<String> {
    slice["spec"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

fn attribute<'a>(device: &'a Value, name: &str) -> &'a Value {
    let value = &device["attributes"][name];
    value
        .as_object()
        .and_then(|o| o.values().next())
        .unwrap_or(&Value::Null)
}

/// Registered, converged: the slice lists NVML's 8 GPUs with the
/// attributes NVIDIA's driver publishes, and the state is ready.
fn registered(node: &mut Node) -> Kubelet {
    node.start("1s");
    let mut kubelet = Kubelet::new(node.path());
    let info = kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(30));
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, DRIVER);
    assert_eq!(
        info.endpoint,
        "/var/lib/kubelet/plugins/gpu.nvidia.com/dra.sock"
    );
    for version in [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1alpha1.DRAResourceHealth",
    ] {
        assert!(
            info.supported_versions.iter().any(|v| v == version),
            "{:?}",
            info.supported_versions
        );
    }
    node.wait_for("the device-plugin state to be ready", || {
        node.state().as_deref() == Some("ready")
    });
    // Only the kubelet (root) may call the plugin.
    for socket in kubelet.registry_sockets() {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", socket.display());
    }
    kubelet
}

#[test]
fn slices_list_nvmls_gpus_and_a_converged_node_sends_nothing() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let _kubelet = registered(&mut node);
    let slice = node.only_slice();
    assert_eq!(slice["spec"]["pool"]["name"], NODE);
    assert_eq!(slice["spec"]["pool"]["resourceSliceCount"], 1);
    assert_eq!(
        slice["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "gpuprov"
    );
    assert!(
        slice["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("gpu-node-1-gpu.nvidia.com-"),
        "{slice:#}"
    );
    let nvml = node.nvml_fixture();
    let gpus = nvml["devices"].as_array().unwrap();
    let devices = slice["spec"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), gpus.len());
    for (i, (device, gpu)) in devices.iter().zip(gpus).enumerate() {
        assert_eq!(device["name"], format!("gpu-{i}"));
        assert_eq!(attribute(device, "type"), "gpu");
        assert_eq!(attribute(device, "uuid"), &gpu["uuid"]);
        assert_eq!(attribute(device, "index"), i);
        assert_eq!(attribute(device, "productName"), &gpu["name"]);
        assert_eq!(attribute(device, "brand"), "Nvidia");
        assert_eq!(attribute(device, "architecture"), "Hopper");
        assert_eq!(attribute(device, "cudaComputeCapability"), "9.0.0");
        assert_eq!(attribute(device, "driverVersion"), "550.54.15");
        assert_eq!(attribute(device, "cudaDriverVersion"), "12.4.0");
        let bus = gpu["pciBusId"].as_str().unwrap().to_lowercase();
        assert_eq!(
            attribute(device, "resource.kubernetes.io/pciBusID"),
            &bus[4..],
            "{device:#}"
        );
        // The fixture's GPUs each hang from a root complex of their own.
        assert_eq!(
            attribute(device, "resource.kubernetes.io/pcieRoot"),
            &format!("pci0000:{}", &bus[9..11])
        );
        // Dual-socket: the first four GPUs on NUMA node 0, as the kernel says.
        assert_eq!(
            attribute(device, "resource.kubernetes.io/numaNode"),
            if i < 4 { 0 } else { 1 }
        );
        let mib = gpu["memoryTotalMiB"].as_u64().unwrap();
        assert_eq!(device["capacity"]["memory"]["value"], format!("{mib}Mi"));
    }
    assert_eq!(slice["spec"]["pool"]["generation"], 1, "{}", node.log());
    // The DaemonSet of NVIDIA's device plugin is not asked for.
    assert!(
        !node
            .fake
            .labels(NODE)
            .contains_key("nvidia.com/gpu.deploy.device-plugin"),
        "{:?}",
        node.fake.labels(NODE)
    );

    // Converged: drift converges every second read and write nothing.
    std::thread::sleep(Duration::from_secs(2));
    node.fake.clear_log();
    std::thread::sleep(Duration::from_secs(4));
    let sent: Vec<String> = node
        .fake
        .log_of(NODE)
        .iter()
        .map(|l| format!("{} {}", l.method, l.uri))
        .collect();
    assert_eq!(sent, Vec::<String>::new());
    assert_eq!(node.only_slice()["spec"]["pool"]["generation"], 1);
    let (_, metrics) = get(node.port, "/metrics").unwrap();
    assert!(metrics.contains("gpuprov_converges_total"), "{metrics}");
}

/// Prepare writes a CDI spec that names exactly the claim's devices and
/// passes the CDI rules; a device another claim holds is refused; a
/// restart between prepare and unprepare loses nothing; unprepare removes
/// the spec, and the device is free again. The v1beta1 service answers as
/// v1 does.
#[test]
fn claims_are_prepared_through_cdi_and_survive_a_restart() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    node.fake.add_claim(
        "team-a",
        "train",
        "uid-train-0001",
        DRIVER,
        NODE,
        &[("gpus", "gpu-3"), ("gpus", "gpu-5")],
    );
    let answer = kubelet
        .prepare("v1", &[("team-a", "train", "uid-train-0001")])
        .unwrap();
    let result = &answer.claims["uid-train-0001"];
    assert_eq!(result.error, "");
    let ids: Vec<&str> = result
        .devices
        .iter()
        .flat_map(|d| d.cdi_device_ids.iter().map(String::as_str))
        .collect();
    assert_eq!(
        ids,
        [
            "k8s.gpu.nvidia.com/claim=uid-train-0001-gpu-3",
            "k8s.gpu.nvidia.com/claim=uid-train-0001-gpu-5"
        ]
    );
    for device in &result.devices {
        assert_eq!(device.pool_name, NODE);
        assert_eq!(device.request_names, ["gpus"]);
    }
    let spec_file = node.at("/var/run/cdi/k8s.gpu.nvidia.com-claim_uid-train-0001.yaml");
    let text = fs::read_to_string(&spec_file).unwrap();
    let spec: Value = serde_saphyr::from_str(&text).unwrap();
    let problems = support::cdi_schema::problems(&spec);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(spec["kind"], "k8s.gpu.nvidia.com/claim");
    let names: Vec<&str> = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["uid-train-0001-gpu-3", "uid-train-0001-gpu-5"]);
    // Only the allocated GPUs' nodes, and the driver's control nodes.
    let nodes: BTreeSet<&str> = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .chain([&spec])
        .flat_map(|d| {
            d["containerEdits"]["deviceNodes"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .map(|n| n["path"].as_str().unwrap())
        .filter(|p| {
            p.trim_start_matches("/dev/nvidia")
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .collect();
    assert_eq!(nodes, BTreeSet::from(["/dev/nvidia3", "/dev/nvidia5"]));

    // Prepared again (the kubelet retries): the same answer.
    let again = kubelet
        .prepare("v1", &[("team-a", "train", "uid-train-0001")])
        .unwrap();
    assert_eq!(again.claims["uid-train-0001"].devices, result.devices);

    // Another claim for gpu-5: refused, with the claim that holds it.
    node.fake.add_claim(
        "team-b",
        "infer",
        "uid-infer-0002",
        DRIVER,
        NODE,
        &[("gpu", "gpu-5")],
    );
    let refused = kubelet
        .prepare("v1beta1", &[("team-b", "infer", "uid-infer-0002")])
        .unwrap();
    let error = &refused.claims["uid-infer-0002"].error;
    assert!(
        error.contains("gpu-5") && error.contains("team-a/train"),
        "{error}"
    );
    assert!(
        !node
            .at("/var/run/cdi/k8s.gpu.nvidia.com-claim_uid-infer-0002.yaml")
            .exists()
    );

    // A restart between prepare and unprepare.
    node.stop();
    assert!(
        kubelet.registry_sockets().is_empty(),
        "the sockets go with the plugin"
    );
    node.start("1s");
    let mut kubelet = Kubelet::new(node.path());
    kubelet.register(&["v1beta1.DRAPlugin"], Duration::from_secs(30));
    let refused = kubelet
        .prepare("v1beta1", &[("team-b", "infer", "uid-infer-0002")])
        .unwrap();
    assert!(
        refused.claims["uid-infer-0002"]
            .error
            .contains("team-a/train"),
        "{refused:?}"
    );
    let unprepared = kubelet
        .unprepare("v1beta1", &[("team-a", "train", "uid-train-0001")])
        .unwrap();
    assert_eq!(unprepared.claims["uid-train-0001"].error, "");
    assert!(!spec_file.exists());
    // Unprepared again: nothing left to do, no error.
    let twice = kubelet
        .unprepare("v1", &[("team-a", "train", "uid-train-0001")])
        .unwrap();
    assert_eq!(twice.claims["uid-train-0001"].error, "");
    let now = kubelet
        .prepare("v1", &[("team-b", "infer", "uid-infer-0002")])
        .unwrap();
    assert_eq!(now.claims["uid-infer-0002"].error, "");
    assert_eq!(now.claims["uid-infer-0002"].devices[0].device_name, "gpu-5");
}

/// A claim for a device this node does not publish, from another node's
/// pool, of a claim made again under the same name, or one that is gone:
/// each a clear error, and nothing written.
#[test]
fn a_claim_this_node_cannot_serve_is_an_error() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    node.fake
        .add_claim("ns", "nine", "uid-nine", DRIVER, NODE, &[("gpu", "gpu-9")]);
    node.fake.add_claim(
        "ns",
        "elsewhere",
        "uid-elsewhere",
        DRIVER,
        "gpu-node-2",
        &[("gpu", "gpu-0")],
    );
    node.fake
        .add_claim("ns", "remade", "uid-new", DRIVER, NODE, &[("gpu", "gpu-0")]);
    let answer = kubelet
        .prepare(
            "v1",
            &[
                ("ns", "nine", "uid-nine"),
                ("ns", "elsewhere", "uid-elsewhere"),
                ("ns", "remade", "uid-old"),
                ("ns", "gone", "uid-gone"),
                ("ns", "../../etc", "uid-bad"),
            ],
        )
        .unwrap();
    let error = |uid: &str| answer.claims[uid].error.clone();
    assert!(
        error("uid-nine").contains("gpu-9") && error("uid-nine").contains("gpu-0, gpu-1"),
        "{}",
        error("uid-nine")
    );
    assert!(
        error("uid-elsewhere").contains("gpu-node-2"),
        "{}",
        error("uid-elsewhere")
    );
    assert!(error("uid-old").contains("uid-new"), "{}", error("uid-old"));
    assert!(
        error("uid-gone").contains("does not exist"),
        "{}",
        error("uid-gone")
    );
    assert!(
        error("uid-bad").contains("not a namespace and name"),
        "{}",
        error("uid-bad")
    );
    for uid in [
        "uid-nine",
        "uid-elsewhere",
        "uid-old",
        "uid-gone",
        "uid-bad",
    ] {
        assert!(answer.claims[uid].devices.is_empty());
    }
    let written = claim_specs(&node);
    assert!(written.is_empty(), "{written:?}");
}

/// A GPU lost updates the slice (its generation bumped); the kubelet
/// registering again after it deleted the slices (as it does for a driver
/// gone a while) gets them published again.
#[test]
fn a_lost_gpu_and_a_wiped_pool_update_the_slices() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let mut kubelet = registered(&mut node);
    let before = node.only_slice();
    // GPU 5 falls off the bus: NVML answers NVML_ERROR_GPU_IS_LOST for it.
    let mut nvml = node.nvml_fixture();
    let uuid = nvml["devices"][5]["uuid"].as_str().unwrap().to_string();
    nvml["devices"][5]["failures"] =
        serde_json::json!({"nvmlDeviceGetMemoryInfo_v2": 15, "nvmlDeviceGetMemoryInfo": 15});
    fs::write(&node.nvml, serde_json::to_string(&nvml).unwrap()).unwrap();
    node.wait_for("the slice to lose the GPU", || {
        node.slices()
            .first()
            .is_some_and(|s| s["spec"]["devices"].as_array().unwrap().len() == 7)
    });
    let after = node.only_slice();
    assert_eq!(after["metadata"]["name"], before["metadata"]["name"]);
    assert_eq!(after["spec"]["pool"]["generation"], 2);
    assert!(!after.to_string().contains(&uuid));
    assert!(!device_names(&after).contains(&"gpu-5".to_string()));
    // The CDI spec leaves it out too, the others stay usable.
    let cdi = fs::read_to_string(node.at("/var/run/cdi/nvidia.yaml")).unwrap();
    assert!(!cdi.contains(&uuid) && cdi.contains("/dev/nvidia7"));

    node.fake.wipe_resource_slices();
    kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(10));
    node.wait_for("the slice to be published again", || {
        node.slices().len() == 1
    });
    assert_eq!(device_names(&node.only_slice()).len(), 7);
}

/// With MIG on, the slice lists the MIG devices (not their GPUs) with
/// NVIDIA's names, profile and parent, and a claim for one gets the
/// parent's node and the MIG device's capability nodes.
#[test]
fn mig_devices_are_published_and_prepared() {
    let mut node = Node::new(
        "h100x8-mig.yaml",
        &format!("{DRA}mig:\n  default: all-3g.40gb\n"),
    );
    support::mig_capability_nodes(node.path());
    let kubelet = registered(&mut node);
    let slice = node.only_slice();
    let names = device_names(&slice);
    assert_eq!(names.len(), 16, "{names:?}");
    assert!(
        names.iter().all(|n| n.contains("-mig-3g40gb-")),
        "{names:?}"
    );
    let nvml = node.nvml_fixture();
    let first = &slice["spec"]["devices"][0];
    assert_eq!(attribute(first, "type"), "mig");
    assert_eq!(attribute(first, "profile"), "3g.40gb");
    assert_eq!(attribute(first, "parentUUID"), &nvml["devices"][0]["uuid"]);
    assert!(
        attribute(first, "uuid")
            .as_str()
            .unwrap()
            .starts_with("MIG-"),
        "{first:#}"
    );
    assert!(
        first["capacity"]["multiprocessors"]["value"].is_string(),
        "{first:#}"
    );
    assert!(
        first["capacity"]["memorySlice0"].is_object()
            || first["capacity"]["memorySlice4"].is_object(),
        "{first:#}"
    );
    let device = names[2].clone();
    node.fake
        .add_claim("ns", "mig", "uid-mig", DRIVER, NODE, &[("mig", &device)]);
    let answer = kubelet.prepare("v1", &[("ns", "mig", "uid-mig")]).unwrap();
    assert_eq!(answer.claims["uid-mig"].error, "");
    let spec: Value = serde_saphyr::from_str(
        &fs::read_to_string(node.at("/var/run/cdi/k8s.gpu.nvidia.com-claim_uid-mig.yaml")).unwrap(),
    )
    .unwrap();
    assert!(support::cdi_schema::problems(&spec).is_empty());
    let nodes: Vec<&str> = spec["devices"][0]["containerEdits"]["deviceNodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["path"].as_str().unwrap())
        .collect();
    assert_eq!(nodes[0], "/dev/nvidia1", "{nodes:?}");
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes[1..]
            .iter()
            .all(|n| n.starts_with("/dev/nvidia-caps/nvidia-cap"))
    );
}

/// A GPU with a recent critical error: the health stream says so for its
/// device, and its device is tainted in the slice.
#[test]
fn an_xid_marks_the_device_unhealthy_and_taints_it() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    let nvml = node.nvml_fixture();
    let uuid = nvml["devices"][2]["uuid"].as_str().unwrap().to_string();
    let errors = node.at("/run/gpuprov/gpu-errors.json");
    let (first, next) = kubelet.watch_health(Duration::from_secs(15), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        fs::create_dir_all(errors.parent().unwrap()).unwrap();
        fs::write(
            &errors,
            serde_json::json!([{"gpu": 2, "uuid": uuid, "xid": 79, "at": now}]).to_string(),
        )
        .unwrap();
    });
    assert_eq!(first.devices.len(), 8);
    assert!(first.devices.iter().all(|d| d.health == 1), "{first:?}");
    let unhealthy: Vec<&str> = next
        .devices
        .iter()
        .filter(|d| d.health == 2)
        .map(|d| d.device.as_ref().unwrap().device_name.as_str())
        .collect();
    assert_eq!(unhealthy, ["gpu-2"]);
    node.wait_for("the device to be tainted", || {
        node.slices()
            .first()
            .is_some_and(|s| s["spec"]["devices"][2]["taints"][0]["key"] == "gpu.nvidia.com/xid")
    });
    let slice = node.only_slice();
    assert_eq!(slice["spec"]["devices"][2]["taints"][0]["value"], "79");
    assert_eq!(
        slice["spec"]["devices"][2]["taints"][0]["effect"],
        "NoSchedule"
    );
    assert!(slice["spec"]["devices"][1].get("taints").is_none());
}

/// Switching back to NVIDIA's device plugin withdraws DRA: the slices are
/// deleted, the plugin's sockets go, the deploy label comes.
#[test]
fn the_operand_mode_withdraws_the_slices() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    assert_eq!(node.slices().len(), 1);
    fs::write(&node.spec, DRA.replace("mode: dra", "mode: operand")).unwrap();
    node.wait_for("the slices to go", || node.slices().is_empty());
    node.wait_for("the plugin's sockets to go", || {
        kubelet.registry_sockets().is_empty()
    });
    node.wait_for("NVIDIA's device plugin to be asked for", || {
        node.fake
            .labels(NODE)
            .get("nvidia.com/gpu.deploy.device-plugin")
            .map(String::as_str)
            == Some("true")
    });
    assert!(!node.at("/var/lib/gpuprov/dra/devices.json").exists());
}

/// `plan` shows the slice that would be published, without writing it;
/// without an API server it says DRA needs one and still lists the devices.
#[test]
fn plan_shows_the_slice_it_would_publish() {
    let node = Node::new("h100x8.yaml", DRA);
    let output = support::gpuprov()
        .env("GPUPROV_FAKE_NVML", &node.nvml)
        .args([
            "plan",
            "--host-exec",
            "prefix",
            "--node-name",
            NODE,
            "--output",
            "json",
        ])
        .arg("--nvml-lib")
        .arg(support::fake_nvml_library())
        .arg("--config")
        .arg(&node.spec)
        .arg("--kubeconfig")
        .arg(node.fake.kubeconfig())
        .arg("--host-root")
        .arg(node.path())
        .output()
        .unwrap();
    let plan: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    let step = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "device-plugin")
        .unwrap();
    let publish = step["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "resource-slice")
        .unwrap_or_else(|| panic!("{step:#}"));
    assert_eq!(
        publish["slice"]["spec"]["devices"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    assert_eq!(publish["generation"], 1);
    assert!(node.slices().is_empty(), "plan wrote nothing");

    let output = node.command("plan").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("needs an API server") && text.contains("8 devices: gpu-0 … gpu-7"),
        "{text}"
    );
}

/// NVIDIA's DRA driver already publishing for this node: gpuprov publishes
/// nothing beside it and says why.
#[test]
fn another_drivers_slice_is_left_and_named() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let foreign = serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": "gpu-node-1-gpu.nvidia.com-abcde"},
        "spec": {"driver": DRIVER, "nodeName": NODE, "pool": {"name": NODE, "generation": 3, "resourceSliceCount": 1}, "devices": []},
    });
    node.fake.put_resource_slice(foreign);
    node.start("1s");
    let mut kubelet = Kubelet::new(node.path());
    kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(30));
    node.wait_for("the state to fail", || {
        node.state().as_deref() == Some("failed")
    });
    assert_eq!(node.slices().len(), 1);
    assert_eq!(node.only_slice()["spec"]["pool"]["generation"], 3);
}

/// The validator's pod gets its GPU through a claim from gpuprov's
/// ResourceClaimTemplate (one device of the class `gpu.nvidia.com`), not
/// an `nvidia.com/gpu` limit no device plugin would satisfy.
#[test]
fn the_validation_pod_claims_its_gpu_through_dra() {
    let mut node = Node::new(
        "h100x8.yaml",
        &DRA.replace("validator:\n  enabled: false\n", ""),
    );
    node.fake.kubelet(support::fake_api::Kubelet::Runs {
        phase: "Succeeded",
        after_ms: 100,
        log: "Test PASSED\n".into(),
        exit_code: 0,
    });
    node.start("1s");
    let mut kubelet = Kubelet::new(node.path());
    kubelet.register(&["v1.DRAPlugin"], Duration::from_secs(30));
    node.wait_for("the validator to pass", || {
        node.fake
            .labels(NODE)
            .get("gpuprov.io/validator")
            .map(String::as_str)
            == Some("ready")
    });
    let template = node
        .fake
        .claim_template("gpuprov", "gpuprov-validator-gpu")
        .expect("the template is applied");
    let request = &template["spec"]["spec"]["devices"]["requests"][0];
    assert_eq!(request["exactly"]["deviceClassName"], DRIVER);
    assert_eq!(request["exactly"]["count"], 1);
    let created = node
        .fake
        .log()
        .into_iter()
        .find(|l| l.method == "POST" && l.uri.contains("/pods"))
        .unwrap();
    let pod: Value = serde_json::from_str(&created.body).unwrap();
    assert_eq!(
        pod["spec"]["resourceClaims"][0]["resourceClaimTemplateName"],
        "gpuprov-validator-gpu"
    );
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["resources"]["claims"][0]["name"], "gpu");
    assert!(container["resources"].get("limits").is_none(), "{pod:#}");
}

/// A real CDI consumer reads a prepared claim's spec: podman resolves
/// `k8s.gpu.nvidia.com/claim=<uid>-gpu-3` and gives the container that
/// GPU's node and the driver's files, and no other GPU. (containerd 1.6,
/// Debian's, predates CDI: 1.7 brought it.)
#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "podman and mount namespaces need root: run as root (CI and scripts/test do)"
)]
fn podman_reads_a_prepared_claims_spec() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    node.fake
        .add_claim("ns", "one", "uid-one", DRIVER, NODE, &[("gpu", "gpu-3")]);
    let answer = kubelet.prepare("v1", &[("ns", "one", "uid-one")]).unwrap();
    let id = answer.claims["uid-one"].devices[0].cdi_device_ids[0].clone();
    let spec = node.at("/var/run/cdi/k8s.gpu.nvidia.com-claim_uid-one.yaml");
    let oci = support::podman::oci_spec(node.path(), &[&spec], &[&id]);
    let devices: Vec<&str> = oci["linux"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert!(devices.contains(&"/dev/nvidia3"), "{devices:?}");
    assert!(devices.contains(&"/dev/nvidiactl"), "{devices:?}");
    for other in [0, 1, 2, 4, 5, 6, 7] {
        assert!(
            !devices.contains(&format!("/dev/nvidia{other}").as_str()),
            "{devices:?}"
        );
    }
    let root = node.path().display().to_string();
    let libcuda = "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15";
    assert!(
        oci["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["source"] == format!("{root}{libcuda}") && m["destination"] == libcuda),
        "{oci:#}"
    );
}

/// `revert` takes back what DRA wrote on the host: each prepared claim's
/// CDI spec and record, and what was published.
#[test]
fn revert_removes_the_claims_specs_and_records() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    node.fake
        .add_claim("ns", "one", "uid-one", DRIVER, NODE, &[("gpu", "gpu-1")]);
    assert_eq!(
        kubelet
            .prepare("v1", &[("ns", "one", "uid-one")])
            .unwrap()
            .claims["uid-one"]
            .error,
        ""
    );
    node.stop();
    let spec = node.at("/var/run/cdi/k8s.gpu.nvidia.com-claim_uid-one.yaml");
    assert!(spec.exists());
    let output = node.command("revert").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("/var/run/cdi/k8s.gpu.nvidia.com-claim_uid-one.yaml"),
        "{stdout}"
    );
    assert!(!spec.exists());
    assert!(!node.at("/var/lib/gpuprov/dra/claims/uid-one.json").exists());
    assert!(!node.at("/var/lib/gpuprov/dra/devices.json").exists());
}

/// A call naming more claims than any pod has is refused as a whole; a
/// claim whose allocation is not what the API server writes is an error;
/// neither writes anything.
#[test]
fn a_hostile_call_or_claim_is_refused() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    let names: Vec<String> = (0..2000).map(|i| format!("claim-{i}")).collect();
    let many: Vec<(&str, &str, &str)> = names
        .iter()
        .map(|n| ("ns", n.as_str(), n.as_str()))
        .collect();
    let status = kubelet.prepare("v1", &many).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("2000 claims"), "{status:?}");
    node.fake.put_claim(
        "ns",
        "odd",
        serde_json::json!({
            "metadata": {"name": "odd", "namespace": "ns", "uid": "uid-odd"},
            "status": {"allocation": {"devices": {"results": "gpu-0"}}},
        }),
    );
    let answer = kubelet.prepare("v1", &[("ns", "odd", "uid-odd")]).unwrap();
    assert!(
        answer.claims["uid-odd"].error.contains("is not allocated"),
        "{answer:?}"
    );
    let written = claim_specs(&node);
    assert!(written.is_empty(), "{written:?}");
    assert!(
        !node.at("/var/lib/gpuprov/dra/claims").exists()
            || fs::read_dir(node.at("/var/lib/gpuprov/dra/claims"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// The kubelet prepares pods' claims at once: claims for different GPUs
/// are all prepared; of claims racing for one GPU exactly one gets it.
#[test]
fn claims_prepared_at_once_never_share_a_gpu() {
    let mut node = Node::new("h100x8.yaml", DRA);
    let kubelet = registered(&mut node);
    let uids: Vec<String> = (0..8).map(|i| format!("uid-own-{i}")).collect();
    for (i, uid) in uids.iter().enumerate() {
        node.fake.add_claim(
            "ns",
            uid,
            uid,
            DRIVER,
            NODE,
            &[("gpu", &format!("gpu-{i}"))],
        );
    }
    let racers: Vec<String> = (0..6).map(|i| format!("uid-race-{i}")).collect();
    for uid in &racers {
        node.fake
            .add_claim("ns", uid, uid, DRIVER, NODE, &[("gpu", "gpu-7")]);
    }
    let calls: Vec<_> = uids
        .iter()
        .take(7)
        .chain(racers.iter())
        .map(|uid| {
            let client = kubelet.another();
            let uid = uid.clone();
            std::thread::spawn(move || {
                let answer = client.prepare("v1", &[("ns", &uid, &uid)]).unwrap();
                (uid.clone(), answer.claims[&uid].error.clone())
            })
        })
        .collect();
    let results: Vec<(String, String)> = calls.into_iter().map(|c| c.join().unwrap()).collect();
    for (uid, error) in &results {
        if uid.starts_with("uid-own-") {
            assert_eq!(error, "", "{uid}");
        }
    }
    let winners: Vec<&String> = results
        .iter()
        .filter(|(uid, error)| uid.starts_with("uid-race-") && error.is_empty())
        .map(|(uid, _)| uid)
        .collect();
    assert_eq!(winners.len(), 1, "{results:#?}");
    for (uid, error) in results.iter().filter(|(u, _)| u.starts_with("uid-race-")) {
        if !winners.contains(&uid) {
            assert!(error.contains("gpu-7"), "{uid}: {error}");
        }
    }
}
