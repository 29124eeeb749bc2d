//! Static pod manifests for the operands, from the templates in
//! `states/templates/` with the image, pull policy, args and env from the
//! spec, and the runtime class unless nvidia is containerd's default.

use serde_json::{Value, json};

use super::Operand;
use super::device_plugin::{
    CONFIG_ANNOTATION, Chosen, HOST_CONFIG_DIR, HOST_CONFIG_FILE, POD_CONFIG_DIR,
};
use crate::catalog::OPERAND_TEMPLATES;
use crate::spec::Spec;

pub use crate::kube::MANAGED_BY;

/// Where the operand's manifest goes, a host path.
pub fn path(spec: &Spec, operand: Operand) -> String {
    let dir = spec.operands.static_pod_dir.trim_end_matches('/');
    format!("{dir}/gpuprov-{}.yaml", operand.name())
}

fn template(operand: Operand) -> (&'static str, &'static str) {
    let wanted = format!("states/templates/{}.yaml", operand.name());
    *OPERAND_TEMPLATES
        .iter()
        .find(|(name, _)| *name == wanted)
        .expect("every operand has a template")
}

/// The operand's manifest as gpuprov writes it; with the device plugin's
/// config, the pod reads it from the host file gpuprov writes, and carries
/// its digest so that a new config restarts the pod. `cdi_hook`, the
/// toolkit's `nvidia-ctk` on this host, is given for the device plugin
/// with `cdi.enabled`: it then hands devices out by CDI name.
pub fn render(
    spec: &Spec,
    operand: Operand,
    config: Option<&Chosen>,
    cdi_hook: Option<&str>,
) -> Result<String, String> {
    let (name, text) = template(operand);
    let mut pod: Value =
        serde_saphyr::from_str(text).map_err(|e| format!("template {name}: {e}"))?;
    let wanted = operand.spec(spec);
    pod["metadata"]["labels"][MANAGED_BY.0] = json!(MANAGED_BY.1);
    if let Some(config) = config {
        pod["metadata"]["annotations"][CONFIG_ANNOTATION] = json!(config.annotation());
        let volumes = pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        pod["spec"]["volumes"] = json!(volumes);
        pod["spec"]["volumes"]
            .as_array_mut()
            .expect("an array")
            .push(json!({
                "name": "device-plugin-config",
                "hostPath": {"path": HOST_CONFIG_DIR, "type": "DirectoryOrCreate"},
            }));
    }
    if !spec.containerd.set_as_default {
        put_first(
            &mut pod["spec"],
            &[("runtimeClassName", json!(spec.containerd.runtime_class))],
        );
    }
    let container = pod["spec"]["containers"]
        .get_mut(0)
        .filter(|c| c.is_object())
        .ok_or_else(|| format!("template {name} has no container"))?;
    let mut first = vec![("image", json!(wanted.image))];
    if let Some(policy) = &wanted.image_pull_policy {
        first.push(("imagePullPolicy", json!(policy)));
    }
    // After the container's name, where a person looks for them.
    let container_name = container["name"].take();
    first.insert(0, ("name", container_name));
    put_first(container, &first);
    if !wanted.args.is_empty() {
        let mut args = container["args"].as_array().cloned().unwrap_or_default();
        args.extend(wanted.args.iter().map(|a| json!(a)));
        container["args"] = json!(args);
    }
    let mut env_vars = wanted.env.clone();
    if let Some(hook) = cdi_hook {
        use_cdi(&mut pod, spec, hook, &mut env_vars);
    }
    let container = pod["spec"]["containers"]
        .get_mut(0)
        .ok_or_else(|| format!("template {name} has no container"))?;
    if config.is_some() {
        let mut mounts = container["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        mounts.push(
            json!({"name": "device-plugin-config", "mountPath": POD_CONFIG_DIR, "readOnly": true}),
        );
        container["volumeMounts"] = json!(mounts);
        env_vars.insert(
            0,
            (
                "CONFIG_FILE".to_string(),
                format!("{POD_CONFIG_DIR}/config.yaml"),
            ),
        );
    }
    if !env_vars.is_empty() {
        let mut env = container["env"].as_array().cloned().unwrap_or_default();
        for (key, value) in &env_vars {
            let var = json!({"name": key, "value": value});
            match env.iter_mut().find(|v| v["name"] == json!(key)) {
                Some(existing) => *existing = var,
                None => env.push(var),
            }
        }
        container["env"] = json!(env);
    }
    let yaml = serde_saphyr::to_string(&pod).map_err(|e| format!("template {name}: {e}"))?;
    Ok(format!(
        "# Written by gpuprov from {name} and the spec.\n# gpuprov rewrites it, and removes it when the operand is disabled.\n{yaml}"
    ))
}

/// Where the device plugin sees the host's root, to find the driver's
/// files for the CDI spec it writes for its own devices.
const DRIVER_ROOT_IN_POD: &str = "/driver-root";

/// With `cdi.enabled`, the device plugin hands devices out by CDI name
/// (`DEVICE_LIST_STRATEGY=cdi-annotations`, as the GPU Operator does; the
/// spec's `devicePlugin.env` may say `cdi-cri`): it writes its spec into
/// `cdi.specDir` from the driver files under the host's root (read-only),
/// with the toolkit's `nvidia-ctk` (`hook`, the one the `cdi` state's spec
/// names) as its hook. Variables the spec sets win.
fn use_cdi(pod: &mut Value, spec: &Spec, hook: &str, env_vars: &mut Vec<(String, String)>) {
    for (key, value) in [
        ("DEVICE_LIST_STRATEGY", "cdi-annotations"),
        ("NVIDIA_CDI_HOOK_PATH", hook),
        ("NVIDIA_DRIVER_ROOT", "/"),
        ("DRIVER_ROOT_CTR_PATH", DRIVER_ROOT_IN_POD),
    ] {
        if !env_vars.iter().any(|(k, _)| k == key) {
            env_vars.push((key.to_string(), value.to_string()));
        }
    }
    let mut volumes = pod["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    volumes.push(json!({
        "name": "cdi-specs",
        "hostPath": {"path": spec.cdi.spec_dir, "type": "DirectoryOrCreate"},
    }));
    volumes.push(json!({"name": "driver-root", "hostPath": {"path": "/"}}));
    pod["spec"]["volumes"] = json!(volumes);
    let container = &mut pod["spec"]["containers"][0];
    let mut mounts = container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    mounts.push(json!({"name": "cdi-specs", "mountPath": "/var/run/cdi"}));
    mounts.push(json!({
        "name": "driver-root",
        "mountPath": DRIVER_ROOT_IN_POD,
        "readOnly": true,
        "mountPropagation": "HostToContainer",
    }));
    container["volumeMounts"] = json!(mounts);
}

/// Sets `entries` at the start of an object, in order, keeping the rest.
fn put_first(object: &mut Value, entries: &[(&str, Value)]) {
    let rest = match object.take() {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let mut map = serde_json::Map::new();
    for (key, value) in entries {
        map.insert(key.to_string(), value.clone());
    }
    for (key, value) in rest {
        if !map.contains_key(&key) {
            map.insert(key, value);
        }
    }
    *object = Value::Object(map);
}

/// Removes every operand manifest gpuprov wrote (`gpuprov revert`), and
/// the device plugin config they read; returns their paths.
pub fn remove_ours(
    host: &crate::host::Host,
    spec: &Spec,
) -> Result<Vec<String>, crate::host::HostError> {
    let mut removed = Vec::new();
    for operand in Operand::ALL {
        let path = path(spec, operand);
        if host.read(&path)?.is_some_and(|text| is_ours(&text)) {
            host.remove(&path)?;
            removed.push(path);
        }
    }
    // Under gpuprov's own directory: only gpuprov writes it.
    if host.read(HOST_CONFIG_FILE)?.is_some() {
        host.remove(HOST_CONFIG_FILE)?;
        removed.push(HOST_CONFIG_FILE.to_string());
    }
    Ok(removed)
}

/// Whether a manifest carries gpuprov's label (a file that is not YAML is
/// someone else's).
pub fn is_ours(text: &str) -> bool {
    serde_saphyr::from_str::<Value>(text)
        .is_ok_and(|pod| pod["metadata"]["labels"][MANAGED_BY.0] == json!(MANAGED_BY.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_renders_and_is_recognised_as_ours() {
        let spec = Spec::default_spec();
        for operand in Operand::ALL {
            let text = render(&spec, operand, None, None).unwrap();
            assert!(is_ours(&text), "{text}");
            let pod: Value = serde_saphyr::from_str(&text).unwrap();
            assert_eq!(pod["kind"], "Pod");
            assert_eq!(pod["spec"]["runtimeClassName"], "nvidia");
            assert_eq!(
                pod["spec"]["containers"][0]["image"],
                json!(operand.spec(&spec).image)
            );
        }
        assert!(!is_ours(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: theirs\n"
        ));
        assert!(!is_ours("not: [yaml"));
    }
}
