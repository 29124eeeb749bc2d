//! The node's devices as DRA publishes them: each whole GPU, and with MIG
//! on each MIG device instead of its GPU, with the names, attributes and
//! capacities NVIDIA's DRA driver (`gpu.nvidia.com`) gives them, so that a
//! claim or DeviceClass written for that driver selects the same devices
//! here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::gpu::nvml::{Inventory, NvmlDevice};
use crate::host::Host;
use crate::mig::nvml::{ComputeInstance, GpuInstance, GpuMig};

/// The standard attributes Kubernetes defines for PCI devices.
const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
const NUMA_NODE: &str = "resource.kubernetes.io/numaNode";

/// One device in the pool, with what `NodePrepareResources` needs to hand
/// it to a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DraDevice {
    /// Its name in the ResourceSlice (`gpu-0`, `gpu-0-mig-1g10gb-19-0`).
    pub name: String,
    pub uuid: String,
    /// The UUID of the GPU it is (or is part of): what its health follows.
    pub gpu: String,
    /// The minor of the GPU's node, `/dev/nvidia<minor>` (the parent's for
    /// a MIG device).
    pub minor: u32,
    /// A MIG device's GPU and compute instance ids (its capability nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<(u32, u32)>,
}

/// The devices, and each one's entry in a ResourceSlice.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    pub devices: Vec<DraDevice>,
    /// `spec.devices` of the slice, in the same order.
    pub entries: Vec<Value>,
}

/// A GPU has at most 8 memory slices (NVML's placements count them); a
/// library saying more is not believed.
const MAX_MEMORY_SLICES: u32 = 8;

/// The devices on the node: GPUs with MIG off whole, GPUs with MIG on by
/// their MIG devices (`migs`: NVML's MIG side, read where MIG is on).
pub fn devices(host: &Host, inventory: &Inventory, migs: &[GpuMig]) -> Devices {
    let mut found = Devices::default();
    let mut gpus: Vec<&NvmlDevice> = inventory.devices.iter().collect();
    gpus.sort_by_key(|g| g.minor_number);
    for gpu in gpus {
        let common = common(host, inventory, gpu);
        // MIG's side read afresh says whether MIG is on now (the `mig`
        // state may have just turned it on); the run's inventory, else.
        let mig = migs.iter().find(|m| m.uuid == gpu.uuid);
        let mig_on = mig.map_or(gpu.mig_enabled, |m| m.current);
        match mig {
            Some(mig) if mig_on => {
                for gi in &mig.instances {
                    for ci in &gi.compute {
                        let (device, entry) = mig_device(gpu, mig, gi, ci, &common);
                        found.devices.push(device);
                        found.entries.push(entry);
                    }
                }
            }
            // MIG on with no MIG device yet offers nothing: the GPU cannot
            // run a whole-GPU workload while MIG is on.
            _ if mig_on => {}
            _ => {
                let (device, entry) = whole_gpu(gpu, &common);
                found.devices.push(device);
                found.entries.push(entry);
            }
        }
    }
    found
}

/// What every device of a GPU shares: NVML's words for it, versions as
/// semantic versions, where it sits on the PCI bus and NUMA.
fn common(host: &Host, inventory: &Inventory, gpu: &NvmlDevice) -> serde_json::Map<String, Value> {
    let mut attributes = serde_json::Map::new();
    attributes.insert("productName".into(), json!({"string": gpu.name}));
    attributes.insert("brand".into(), json!({"string": gpu.brand}));
    attributes.insert("architecture".into(), json!({"string": gpu.architecture}));
    let (major, minor) = gpu.compute_capability;
    for (key, text) in [
        ("cudaComputeCapability", format!("{major}.{minor}")),
        ("driverVersion", inventory.driver_version.clone()),
        ("cudaDriverVersion", inventory.cuda_driver_version.clone()),
    ] {
        if let Some(version) = semantic_version(&text) {
            attributes.insert(key.into(), json!({ "version": version }));
        }
    }
    let address = gpu.sysfs_address();
    attributes.insert(PCI_BUS_ID.into(), json!({ "string": address }));
    if let Some(root) = pcie_root(host, &address) {
        attributes.insert(PCIE_ROOT.into(), json!({ "string": root }));
    }
    if let Some(node) = numa_node(host, &address) {
        attributes.insert(NUMA_NODE.into(), json!({ "int": node }));
    }
    attributes
}

fn whole_gpu(gpu: &NvmlDevice, common: &serde_json::Map<String, Value>) -> (DraDevice, Value) {
    let name = format!("gpu-{}", gpu.minor_number);
    let mut attributes = serde_json::Map::new();
    attributes.insert("type".into(), json!({"string": "gpu"}));
    attributes.insert("uuid".into(), json!({"string": gpu.uuid}));
    // Releases of NVIDIA's driver before 25.12 published these; claims
    // written then select by them.
    attributes.insert("index".into(), json!({"int": gpu.index}));
    attributes.insert("minor".into(), json!({"int": gpu.minor_number}));
    attributes.extend(common.clone());
    let entry = json!({
        "name": name,
        "attributes": attributes,
        "capacity": {"memory": {"value": binary_quantity(gpu.memory_total_mib.saturating_mul(1 << 20))}},
    });
    let device = DraDevice {
        name,
        uuid: gpu.uuid.clone(),
        gpu: gpu.uuid.clone(),
        minor: gpu.minor_number,
        mig: None,
    };
    (device, entry)
}

fn mig_device(
    gpu: &NvmlDevice,
    mig: &GpuMig,
    gi: &GpuInstance,
    ci: &ComputeInstance,
    common: &serde_json::Map<String, Value>,
) -> (DraDevice, Value) {
    let profile_name = mig.device_name(gi, ci);
    let profile = mig.profile(gi.profile_id);
    // NVIDIA's name: parent minor, profile, GPU instance profile id and
    // placement; a compute instance smaller than its GPU instance (one of
    // several in it) adds its own id.
    let mut name = format!(
        "gpu-{}-mig-{}-{}-{}",
        gpu.minor_number,
        name_part(&profile_name),
        gi.profile_id,
        gi.start
    );
    if profile.is_some_and(|p| p.slices != ci.slices) {
        name.push_str(&format!("-{}", ci.id));
    }
    let mut attributes = serde_json::Map::new();
    attributes.insert("type".into(), json!({"string": "mig"}));
    attributes.insert("uuid".into(), json!({"string": ci.uuid}));
    attributes.insert("parentUUID".into(), json!({"string": gpu.uuid}));
    attributes.insert("parentIndex".into(), json!({"int": gpu.index}));
    attributes.insert("parentMinor".into(), json!({"int": gpu.minor_number}));
    attributes.insert("profile".into(), json!({"string": profile_name}));
    attributes.extend(common.clone());
    let mut capacity = serde_json::Map::new();
    if let Some(p) = profile {
        for (key, value) in [
            ("multiprocessors", u64::from(p.multiprocessors)),
            ("copyEngines", u64::from(p.copy_engines)),
            ("decoders", u64::from(p.decoders)),
            ("encoders", u64::from(p.encoders)),
            ("jpegEngines", u64::from(p.jpegs)),
            ("ofaEngines", u64::from(p.ofas)),
            ("memory", p.memory_mib.saturating_mul(1 << 20)),
        ] {
            capacity.insert(key.into(), json!({"value": binary_quantity(value)}));
        }
    }
    // Which memory slices it holds: two MIG devices never share one.
    let slices = gi.size.min(MAX_MEMORY_SLICES);
    for slice in gi.start..gi.start.saturating_add(slices) {
        capacity.insert(format!("memorySlice{slice}"), json!({"value": "1"}));
    }
    let entry = json!({"name": name, "attributes": attributes, "capacity": capacity});
    let device = DraDevice {
        name,
        uuid: ci.uuid.clone(),
        gpu: gpu.uuid.clone(),
        minor: gpu.minor_number,
        mig: Some((gi.id, ci.id)),
    };
    (device, entry)
}

/// A MIG profile as a part of a device name (a DNS label): lower case,
/// dots dropped, anything else not a letter or digit a dash
/// (`1g.10gb+me` → `1g10gb-me`).
fn name_part(profile: &str) -> String {
    let mapped: String = profile
        .to_lowercase()
        .chars()
        .filter(|c| *c != '.')
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    mapped.trim_matches('-').to_string()
}

/// `550.54.15`, `9.0`, `12.4` as the semantic versions the API server
/// accepts (`9.0.0`; leading zeros dropped, `535.104.05` → `535.104.5`);
/// `None` for text that is not dotted numbers.
pub fn semantic_version(text: &str) -> Option<String> {
    let mut parts: Vec<u64> = Vec::new();
    for part in text.trim().split('.') {
        if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        parts.push(part.parse().ok()?);
    }
    if parts.len() > 3 {
        return None;
    }
    parts.resize(3, 0);
    Some(format!("{}.{}.{}", parts[0], parts[1], parts[2]))
}

/// A count in Kubernetes' canonical binary form: `81559Mi` for a whole
/// number of MiB, `132` for what is not a multiple of 1024.
pub fn binary_quantity(value: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut mantissa = value;
    let mut exponent = 0;
    while mantissa != 0 && mantissa.is_multiple_of(1024) && exponent < SUFFIXES.len() {
        mantissa /= 1024;
        exponent += 1;
    }
    match exponent {
        0 => mantissa.to_string(),
        e => format!("{mantissa}{}", SUFFIXES[e - 1]),
    }
}

/// A quantity as the API server may write it back (`81559Mi`, `80Gi`,
/// `85520809984`, `1k`), as a number; `None` for a fraction or a form
/// gpuprov never writes.
pub fn quantity_value(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// The PCIe root complex a function hangs from (`pci0000:17`), from its
/// sysfs link (`../../../devices/pci0000:17/…/0000:18:00.0`), as
/// Kubernetes' `deviceattribute` package reads it; `None` when the link
/// is not of that shape.
fn pcie_root(host: &Host, address: &str) -> Option<String> {
    let target = host
        .link_target(&format!("/sys/bus/pci/devices/{address}"))
        .ok()??;
    let parts: Vec<&str> = target.split('/').filter(|p| *p != "..").collect();
    match parts.as_slice() {
        ["devices", root, .., last] if root.starts_with("pci") && *last == address => {
            Some(root.to_string())
        }
        _ => None,
    }
}

/// The NUMA node the kernel puts a function on (`numa_node` in sysfs);
/// `None` where it says -1 (one node, or a VM that does not tell).
fn numa_node(host: &Host, address: &str) -> Option<i64> {
    host.read(&format!("/sys/bus/pci/devices/{address}/numa_node"))
        .ok()??
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|node| *node >= 0)
}

/// Each device's entry as gpuprov would write it, from what the API server
/// wrote back: quantities in canonical form, no empty taint list, no
/// taint's `timeAdded` (the server's), so that equal slices compare equal.
pub fn canonical_entries(entries: &[Value]) -> Vec<Value> {
    entries
        .iter()
        .map(|entry| {
            let mut entry = entry.clone();
            if let Some(fields) = entry.as_object_mut() {
                if fields
                    .get("taints")
                    .is_some_and(|t| t.is_null() || t.as_array().is_some_and(Vec::is_empty))
                {
                    fields.remove("taints");
                }
                if let Some(taints) = fields.get_mut("taints").and_then(Value::as_array_mut) {
                    for taint in taints.iter_mut().filter_map(Value::as_object_mut) {
                        taint.remove("timeAdded");
                    }
                }
            }
            if let Some(capacity) = entry.get_mut("capacity").and_then(Value::as_object_mut) {
                for value in capacity.values_mut() {
                    if let Some(text) = value.get("value").and_then(Value::as_str)
                        && let Some(number) = quantity_value(text)
                    {
                        value["value"] = json!(binary_quantity(number));
                    }
                }
            }
            entry
        })
        .collect()
}

/// The devices by name, for a claim's allocation.
pub fn by_name(devices: &[DraDevice]) -> BTreeMap<&str, &DraDevice> {
    devices.iter().map(|d| (d.name.as_str(), d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_what_the_api_server_accepts() {
        assert_eq!(semantic_version("9.0").as_deref(), Some("9.0.0"));
        assert_eq!(semantic_version("550.54.15").as_deref(), Some("550.54.15"));
        assert_eq!(semantic_version("535.104.05").as_deref(), Some("535.104.5"));
        assert_eq!(semantic_version("12.4").as_deref(), Some("12.4.0"));
        assert_eq!(semantic_version("1.2.3.4"), None);
        assert_eq!(semantic_version("550.x"), None);
        assert_eq!(semantic_version(""), None);
    }

    #[test]
    fn quantities_are_canonical_and_read_back() {
        assert_eq!(binary_quantity(81559 << 20), "81559Mi");
        assert_eq!(binary_quantity(80 << 30), "80Gi");
        assert_eq!(binary_quantity(132), "132");
        assert_eq!(binary_quantity(0), "0");
        for text in ["81559Mi", "80Gi", "132", "0"] {
            assert_eq!(binary_quantity(quantity_value(text).unwrap()), text);
        }
        assert_eq!(quantity_value("85520809984"), Some(81559 << 20));
        assert_eq!(quantity_value("1.5Gi"), None);
        assert_eq!(quantity_value("99999999999Ei"), None);
    }

    #[test]
    fn mig_profiles_become_dns_label_parts() {
        assert_eq!(name_part("1g.10gb"), "1g10gb");
        assert_eq!(name_part("1g.10gb+me"), "1g10gb-me");
        assert_eq!(name_part("1c.3g.40gb"), "1c3g40gb");
    }
}
