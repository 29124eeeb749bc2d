//! GPU Feature Discovery's labels, built in (`gfd.mode: builtin`), and the
//! PCI/NVML health cross-check.
//!
//! Keys and value rules are GFD's, so that workloads scheduling on
//! `nvidia.com/gpu.product` need no GFD. On a node with several models the
//! labels describe one of them, chosen deterministically (GFD's choice
//! depends on enumeration order): the model with the most GPUs, ties broken
//! by the lowest NVML index. No timestamp label: it would make every run a
//! write.

use std::collections::BTreeMap;
use std::time::Duration;

use super::nvml::{Inventory, NvmlDevice};
use super::pci::PciFunction;
use crate::mig::nvml::MigDevice;
use crate::operands::device_plugin::GpuView;
use crate::spec::{GfdMode, MigStrategy, Sharing, SharingStrategy};
use crate::state::{Gate, LookAgain, Observation, Outcome, StateContext, StateError, error_chain};

pub const MACHINE_FILE: &str = "/sys/class/dmi/id/product_name";
/// The IMEX daemon's peer list: with it, GFD labels the node's NVLink
/// clique and IMEX domain.
pub const IMEX_NODES_FILE: &str = "/etc/nvidia-imex/nodes_config.cfg";

/// GFD's `gpu.clique` and `gpu.imex-domain`, for a node whose GPUs are on
/// one NVLink fabric clique and whose IMEX peer list is `imex_nodes`: the
/// clique as `<cluster uuid>.<clique id>`, the domain as a name-based UUID
/// of the sorted peer addresses, then `.<clique id>`. None when the GPUs
/// are on no fabric, or on several cliques; an address that is not one is
/// an error naming its line.
pub fn imex_labels(
    devices: &[NvmlDevice],
    imex_nodes: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut peers = Vec::new();
    for (i, line) in imex_nodes.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.parse::<std::net::IpAddr>().is_err() {
            return Err(format!(
                "{IMEX_NODES_FILE}:{}: `{line}` is not an IP address",
                i + 1
            ));
        }
        peers.push(line.to_string());
    }
    let fabrics: std::collections::BTreeSet<(&str, u32)> = devices
        .iter()
        .filter_map(|d| d.fabric.as_ref())
        .map(|f| (f.cluster_uuid.as_str(), f.clique_id))
        .collect();
    let mut labels = BTreeMap::new();
    let [(cluster, clique)] = fabrics.into_iter().collect::<Vec<_>>()[..] else {
        return Ok(labels);
    };
    if peers.is_empty() {
        return Ok(labels);
    }
    peers.sort();
    let domain = uuid::Uuid::new_v5(&uuid::Uuid::nil(), peers.join("\n").as_bytes());
    labels.insert(
        "nvidia.com/gpu.clique".to_string(),
        format!("{cluster}.{clique}"),
    );
    labels.insert(
        "nvidia.com/gpu.imex-domain".to_string(),
        format!("{domain}.{clique}"),
    );
    Ok(labels)
}

/// GFD's architecture family for a compute capability.
pub fn family(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (1, _) => "tesla",
        (2, _) => "fermi",
        (3, _) => "kepler",
        (5, _) => "maxwell",
        (6, _) => "pascal",
        (7, m) if m < 5 => "volta",
        (7, _) => "turing",
        (8, m) if m < 9 => "ampere",
        (8, _) => "ada-lovelace",
        (9, _) => "hopper",
        (10 | 12, _) => "blackwell",
        _ => "undefined",
    }
}

/// A label value: GFD's spaces-to-dashes, then only what Kubernetes allows
/// (alphanumerics, `-`, `_`, `.`; 63 characters; alphanumeric at both ends).
pub fn label_value(text: &str) -> String {
    let replaced: String = text
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed: String = replaced.chars().take(63).collect();
    trimmed
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// The model the labels describe: the most GPUs, then the lowest index.
pub fn chosen_model(devices: &[NvmlDevice]) -> Option<&NvmlDevice> {
    let mut counts: BTreeMap<&str, (usize, u32)> = BTreeMap::new();
    for d in devices {
        let entry = counts.entry(d.name.as_str()).or_insert((0, d.index));
        entry.0 += 1;
        entry.1 = entry.1.min(d.index);
    }
    let (name, _) = counts
        .iter()
        .max_by(|(_, (n1, i1)), (_, (n2, i2))| n1.cmp(n2).then(i2.cmp(i1)))?;
    devices
        .iter()
        .filter(|d| d.name == *name)
        .min_by_key(|d| d.index)
}

/// What GFD reads besides NVML's inventory: the GPUs with their MIG
/// devices now, and the device plugin config in force.
pub struct PluginView<'a> {
    pub gpus: &'a [GpuView],
    pub mig_strategy: MigStrategy,
    pub sharing: Option<&'a Sharing>,
}

/// GFD's labels for one resource (`nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`):
/// its product, count, replicas and sharing strategy, as its resource
/// labeler writes them. `shareable`: false for MIG-enabled GPUs, which GFD
/// labels without the sharing config (replicas 0).
fn resource_labels(
    labels: &mut BTreeMap<String, String>,
    resource: &str,
    product: &[&str],
    count: usize,
    sharing: Option<&Sharing>,
    shareable: bool,
) {
    let replicas = match (shareable, sharing) {
        (false, _) => 0,
        (true, Some(sharing)) => sharing.replicas(resource),
        (true, None) => 1,
    };
    let shared = replicas > 1;
    let mut parts: Vec<String> = product
        .iter()
        .map(|p| label_value(p))
        .filter(|p| !p.is_empty())
        .collect();
    if shared && !sharing.is_some_and(|s| s.rename_by_default) {
        parts.push("SHARED".to_string());
    }
    let strategy = match sharing {
        Some(sharing) if shared => sharing.strategy.as_str(),
        _ => "none",
    };
    for (key, value) in [
        ("product", parts.join("-")),
        ("count", count.to_string()),
        ("replicas", replicas.to_string()),
        ("sharing-strategy", strategy.to_string()),
    ] {
        labels.insert(format!("{resource}.{key}"), value);
    }
}

/// A MIG device's attribute labels (`memory`, `multiprocessors`,
/// `slices.gi`, `slices.ci`, `engines.*`).
fn mig_attribute_labels(labels: &mut BTreeMap<String, String>, resource: &str, device: &MigDevice) {
    for (key, value) in [
        ("memory", device.memory_mib.to_string()),
        ("multiprocessors", device.multiprocessors.to_string()),
        ("slices.gi", device.slices_gi.to_string()),
        ("slices.ci", device.slices_ci.to_string()),
        ("engines.copy", device.copy_engines.to_string()),
        ("engines.decoder", device.decoders.to_string()),
        ("engines.encoder", device.encoders.to_string()),
        ("engines.jpeg", device.jpegs.to_string()),
        ("engines.ofa", device.ofas.to_string()),
    ] {
        labels.insert(format!("{resource}.{key}"), value);
    }
}

/// Why GFD labels a node `<model>-MIG-INVALID` under mig-strategy single.
fn single_strategy_problem(gpus: &[GpuView]) -> Option<&'static str> {
    let enabled: Vec<&GpuView> = gpus.iter().filter(|g| g.mig_enabled).collect();
    if enabled.iter().any(|g| g.mig.is_empty()) {
        return Some("at least one MIG device is enabled but empty");
    }
    if enabled.len() != gpus.len() {
        return Some("devices with MIG enabled and disabled");
    }
    let profiles: std::collections::BTreeSet<&str> = enabled
        .iter()
        .flat_map(|g| g.mig.iter().map(|m| m.name.as_str()))
        .collect();
    (profiles.len() > 1).then_some("more than one MIG device type")
}

/// GFD's labels for this node.
pub fn labels(
    inventory: &Inventory,
    pci: &[PciFunction],
    machine: Option<&str>,
    plugin: &PluginView,
) -> BTreeMap<String, String> {
    let gpu = crate::operands::GPU_RESOURCE;
    let mut labels = BTreeMap::new();
    if let Some(model) = chosen_model(&inventory.devices) {
        let (major, minor) = model.compute_capability;
        let of_model: Vec<&GpuView> = plugin
            .gpus
            .iter()
            .filter(|g| g.name == model.name)
            .collect();
        // GFD labels MIG-enabled GPUs without the sharing config, then the
        // others with it; the latter win for a model that has both.
        let shareable = of_model.is_empty() || of_model.iter().any(|g| !g.mig_enabled);
        resource_labels(
            &mut labels,
            gpu,
            &[&model.name],
            inventory
                .devices
                .iter()
                .filter(|d| d.name == model.name)
                .count(),
            plugin.sharing,
            shareable,
        );
        let mut put = |key: &str, value: String| labels.insert(format!("{gpu}.{key}"), value);
        put("memory", model.memory_total_mib.to_string());
        put("family", family(major, minor).to_string());
        put("compute.major", major.to_string());
        put("compute.minor", minor.to_string());
    }
    let mut put = |key: &str, value: String| {
        labels.insert(format!("nvidia.com/{key}"), value);
    };
    // GFD's version labels, each in its long and its short form; a
    // version without a third part has an empty revision.
    let driver: Vec<&str> = inventory.driver_version.split('.').collect();
    let part = |parts: &[&str], i: usize| label_value(parts.get(i).copied().unwrap_or(""));
    put(
        "cuda.driver-version.full",
        label_value(&inventory.driver_version),
    );
    for (i, (long, short)) in [("major", "major"), ("minor", "minor"), ("revision", "rev")]
        .into_iter()
        .enumerate()
    {
        put(&format!("cuda.driver-version.{long}"), part(&driver, i));
        put(&format!("cuda.driver.{short}"), part(&driver, i));
    }
    let cuda: Vec<&str> = inventory.cuda_driver_version.split('.').collect();
    put(
        "cuda.runtime-version.full",
        label_value(&inventory.cuda_driver_version),
    );
    for (i, key) in ["major", "minor"].into_iter().enumerate() {
        put(&format!("cuda.runtime-version.{key}"), part(&cuda, i));
        put(&format!("cuda.runtime.{key}"), part(&cuda, i));
    }
    // MPS needs whole GPUs: GFD says so only for an MPS config.
    let mps = plugin
        .sharing
        .is_some_and(|s| s.strategy == SharingStrategy::Mps)
        && !plugin.gpus.iter().any(|g| g.mig_enabled);
    put("mps.capable", mps.to_string());
    let vgpus: Vec<&super::pci::VgpuInfo> = pci.iter().filter_map(|f| f.vgpu.as_ref()).collect();
    put("vgpu.present", (!vgpus.is_empty()).to_string());
    if let Some(vgpu) = vgpus.last() {
        put(
            "vgpu.host-driver-version",
            label_value(&vgpu.host_driver_version),
        );
        put(
            "vgpu.host-driver-branch",
            label_value(&vgpu.host_driver_branch),
        );
    }
    if let Some(machine) = machine.map(label_value).filter(|m| !m.is_empty()) {
        put("gpu.machine", machine);
    }
    let modes: std::collections::BTreeSet<&str> = pci
        .iter()
        .filter(|f| f.is_gpu())
        .map(|f| {
            if f.class_code() == 0x0302 {
                "compute"
            } else {
                "graphics"
            }
        })
        .collect();
    let mode = match modes.len() {
        1 => modes.first().copied().unwrap_or("unknown"),
        _ => "unknown",
    };
    put("gpu.mode", mode.to_string());
    let mig_capable = inventory.devices.iter().any(|d| d.mig_capable);
    put("mig.capable", mig_capable.to_string());
    if plugin.mig_strategy != MigStrategy::None && !plugin.gpus.is_empty() {
        put("mig.strategy", plugin.mig_strategy.as_str().to_string());
        mig_labels(&mut labels, plugin);
    }
    labels
}

/// The MIG labels of strategy `single` (on `nvidia.com/gpu.*`) or `mixed`
/// (`nvidia.com/mig-<profile>.*`), each profile described by the first
/// GPU (lowest index) holding it.
fn mig_labels(labels: &mut BTreeMap<String, String>, plugin: &PluginView) {
    let gpu = crate::operands::GPU_RESOURCE;
    let Some(first_enabled) = plugin.gpus.iter().find(|g| g.mig_enabled) else {
        return;
    };
    let mut profiles: BTreeMap<String, (&GpuView, &MigDevice, usize)> = BTreeMap::new();
    for view in plugin.gpus.iter().filter(|g| g.mig_enabled) {
        for device in &view.mig {
            profiles
                .entry(device.resource_profile())
                .or_insert((view, device, 0))
                .2 += 1;
        }
    }
    match plugin.mig_strategy {
        MigStrategy::Single => {
            if single_strategy_problem(plugin.gpus).is_some() {
                let product = format!("{}-MIG-INVALID", label_value(&first_enabled.name));
                for (key, value) in [
                    ("product", product.as_str()),
                    ("count", "0"),
                    ("replicas", "0"),
                    ("sharing-strategy", ""),
                    ("memory", "0"),
                ] {
                    labels.insert(format!("{gpu}.{key}"), value.to_string());
                }
                return;
            }
            if let Some((profile, (parent, device, count))) = profiles.iter().next() {
                resource_labels(
                    labels,
                    gpu,
                    &[&parent.name, "MIG", profile],
                    *count,
                    plugin.sharing,
                    true,
                );
                mig_attribute_labels(labels, gpu, device);
            }
        }
        MigStrategy::Mixed => {
            for (profile, (parent, device, count)) in &profiles {
                let resource = format!("nvidia.com/mig-{profile}");
                resource_labels(
                    labels,
                    &resource,
                    &[&parent.name, "MIG", profile],
                    *count,
                    plugin.sharing,
                    true,
                );
                mig_attribute_labels(labels, &resource, device);
            }
        }
        MigStrategy::None => {}
    }
}

/// The `gpu-feature-discovery` capability: in daemonset mode an operand; in
/// builtin mode the labels themselves (and no GFD static pod).
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    use crate::operands::{self, Operand};
    if ctx.spec.gfd_mode == GfdMode::Daemonset {
        return operands::observe(ctx, Operand::GpuFeatureDiscovery);
    }
    let withdrawn = operands::withdraw(ctx, Operand::GpuFeatureDiscovery)?;
    let inventory = match ctx.facts.nvml(ctx.host) {
        Ok(inventory) => inventory,
        // As gpu-health: a host without the library (a fixture, a node
        // whose driver is not installed yet) has nothing to label.
        Err(super::nvml::NvmlProblem::LibraryNotFound) => {
            let mut obs = Observation::new(
                Outcome::Absent,
                "no NVML library in the host: no GPU feature labels",
            );
            obs.gate = Some(Gate::Pass);
            obs.changes = withdrawn;
            return Ok(obs);
        }
        Err(problem) => {
            return Err(StateError::operator(format!(
                "no GPU features without NVML: {problem}"
            )));
        }
    };
    let machine = ctx.host.read(MACHINE_FILE)?;
    // The config in force (a label naming no config changes nothing; the
    // device-plugin step reports it).
    let (chosen, _) = crate::operands::device_plugin::in_force(ctx.spec, &ctx.facts.node_labels);
    let chosen = match chosen {
        Some(chosen) => chosen,
        None => crate::operands::device_plugin::chosen(ctx.spec, &BTreeMap::new())
            .map_err(StateError::operator)?,
    };
    let gpus = crate::operands::device_plugin::gpus(ctx)
        .map_err(StateError::operator)?
        .unwrap_or_default();
    let view = PluginView {
        gpus: &gpus,
        mig_strategy: chosen.mig_strategy,
        sharing: chosen.sharing(),
    };
    let mut labels = labels(inventory, &ctx.facts.pci, machine.as_deref(), &view);
    let mut notes = String::new();
    // An optional file: one that cannot be read (not a regular file, not
    // UTF-8, too big) costs the two IMEX labels, never the others.
    match ctx.host.read(IMEX_NODES_FILE) {
        Ok(None) => {}
        Ok(Some(peers)) => match imex_labels(&inventory.devices, &peers) {
            Ok(imex) => labels.extend(imex),
            Err(why) => notes = format!("; no IMEX labels: {why}"),
        },
        Err(e) => notes = format!("; no IMEX labels: {}", error_chain(&e)),
    }
    let product = labels
        .get("nvidia.com/gpu.product")
        .cloned()
        .unwrap_or_default();
    let mut obs = Observation::new(
        Outcome::Ready,
        format!(
            "{} GPU labels: {}× {product}{notes}",
            labels.len(),
            inventory.devices.len()
        ),
    );
    obs.labels = labels;
    obs.changes = withdrawn;
    Ok(obs)
}

/// The `gpu-health` capability: NVML must see every GPU the PCI bus has bound
/// to the nvidia driver; fewer means one fell off the bus (`degraded`,
/// published as `gpuprov.io/gpu-health=degraded`).
pub fn observe_health(ctx: &StateContext) -> Result<Observation, StateError> {
    let mut obs = health(ctx)?;
    // A degraded GPU is looked at again once a recent error may be over.
    if obs.outcome == Outcome::Degraded {
        let after = Duration::from_secs(ctx.spec.health.recover_after_seconds + 1);
        obs.look_again = Some(LookAgain::After(after));
    }
    Ok(obs)
}

fn health(ctx: &StateContext) -> Result<Observation, StateError> {
    let on_nvidia: Vec<&PciFunction> = ctx
        .facts
        .gpus()
        .filter(|g| g.driver.as_deref() == Some("nvidia"))
        .collect();
    let inventory = match ctx.facts.nvml(ctx.host) {
        Ok(inventory) => inventory,
        Err(super::nvml::NvmlProblem::LibraryNotFound) => {
            let mut obs = Observation::new(
                Outcome::Absent,
                "no NVML library in the host: GPU health not checked",
            );
            obs.gate = Some(Gate::Pass);
            return Ok(obs);
        }
        Err(problem) => {
            let mut obs = Observation::new(Outcome::Degraded, problem.to_string());
            obs.gate = Some(Gate::Pass);
            return Ok(obs);
        }
    };
    let seen = inventory.devices.len();
    let mut obs = if seen < on_nvidia.len() {
        let missing: Vec<String> = on_nvidia
            .iter()
            .filter(|g| {
                !inventory
                    .devices
                    .iter()
                    .any(|d| d.sysfs_address() == g.address)
            })
            .map(|g| g.address.clone())
            .collect();
        Observation::new(
            Outcome::Degraded,
            format!(
                "the PCI bus has {} GPUs on the nvidia driver but NVML sees {seen} (missing: {})",
                on_nvidia.len(),
                missing.join(", ")
            ),
        )
    } else if let Some(errors) = gpu_errors(ctx) {
        Observation::new(Outcome::Degraded, errors)
    } else {
        Observation::new(
            Outcome::Ready,
            format!(
                "NVML sees all {seen} GPUs (driver {})",
                inventory.driver_version
            ),
        )
    };
    // A degraded node still runs its other GPUs: dependents go on.
    obs.gate = Some(Gate::Pass);
    Ok(obs)
}

/// The GPUs with a critical error (XID, double-bit ECC) in the last
/// `health.recoverAfterSeconds`, as `gpuprov run` recorded them; `None`
/// when there are none (or XIDs are not watched).
fn gpu_errors(ctx: &StateContext) -> Option<String> {
    let health = &ctx.spec.health;
    if !health.xids {
        return None;
    }
    let recent = super::xid::recent(ctx.host, health.recover_after_seconds);
    // The newest error of each GPU.
    let mut newest: BTreeMap<u32, &super::xid::GpuError> = BTreeMap::new();
    for error in recent
        .iter()
        .filter(|e| !health.ignored_xids.contains(&e.xid))
    {
        newest.insert(error.gpu, error);
    }
    if newest.is_empty() {
        return None;
    }
    let said: Vec<String> = newest
        .values()
        .map(|e| {
            format!(
                "GPU {} ({}): XID {} ({}) {} s ago",
                e.gpu,
                e.uuid,
                e.xid,
                super::xid::meaning(e.xid),
                super::xid::age(e)
            )
        })
        .collect();
    Some(format!(
        "{}; healthy again after {} s without a new error",
        said.join("; "),
        health.recover_after_seconds
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(index: u32, name: &str) -> NvmlDevice {
        NvmlDevice {
            index,
            name: name.into(),
            uuid: format!("GPU-{index}"),
            pci_bus_id: format!("00000000:{index:02X}:00.0"),
            memory_total_mib: 1,
            compute_capability: (8, 0),
            mig_capable: false,
            mig_enabled: false,
            mig_pending: false,
            persistence_mode: false,
            minor_number: index,
            fabric: None,
            fabric_state: None,
            brand: "Nvidia".into(),
            architecture: "Ampere".into(),
        }
    }

    #[test]
    fn the_imex_labels_need_one_clique_and_a_peer_list() {
        let on = |index, clique| NvmlDevice {
            fabric: Some(super::super::nvml::Fabric {
                cluster_uuid: "0d1ac7e1-2b3c-4d5e-8f60-000000000001".into(),
                clique_id: clique,
            }),
            ..device(index, "NVIDIA GB200")
        };
        let peers = "10.0.0.2\n10.0.0.1\n\n";
        let labels = imex_labels(&[on(0, 7), on(1, 7)], peers).unwrap();
        assert_eq!(
            labels["nvidia.com/gpu.clique"],
            "0d1ac7e1-2b3c-4d5e-8f60-000000000001.7"
        );
        // GFD's uuid.NewSHA1(uuid.Nil, "10.0.0.1\n10.0.0.2"), the peers
        // sorted (computed apart, with Python's uuid.uuid5).
        assert_eq!(
            labels["nvidia.com/gpu.imex-domain"],
            "d11d919c-29bc-5ad5-ab2d-4a1ca7895fec.7"
        );
        assert!(
            imex_labels(&[on(0, 7), on(1, 8)], peers)
                .unwrap()
                .is_empty()
        );
        assert!(
            imex_labels(&[device(0, "NVIDIA H100")], peers)
                .unwrap()
                .is_empty()
        );
        assert!(imex_labels(&[on(0, 7)], "").unwrap().is_empty());
        let err = imex_labels(&[on(0, 7)], "10.0.0.1\nnode-b\n").unwrap_err();
        assert!(err.ends_with(":2: `node-b` is not an IP address"), "{err}");
    }

    #[test]
    fn families_follow_compute_capability() {
        assert_eq!(family(7, 0), "volta");
        assert_eq!(family(7, 5), "turing");
        assert_eq!(family(8, 6), "ampere");
        assert_eq!(family(8, 9), "ada-lovelace");
        assert_eq!(family(9, 0), "hopper");
        assert_eq!(family(10, 0), "blackwell");
    }

    #[test]
    fn product_names_become_label_values() {
        assert_eq!(
            label_value("NVIDIA H100 80GB HBM3"),
            "NVIDIA-H100-80GB-HBM3"
        );
        assert_eq!(
            label_value("NVIDIA A100-SXM4-40GB"),
            "NVIDIA-A100-SXM4-40GB"
        );
        assert_eq!(label_value(" Tesla T4 "), "Tesla-T4");
        assert_eq!(
            label_value("PowerEdge XE9680 (rev 2)"),
            "PowerEdge-XE9680--rev-2"
        );
    }

    #[test]
    fn the_model_with_most_gpus_wins_then_the_lowest_index() {
        let mixed = [
            device(0, "Tesla T4"),
            device(1, "NVIDIA A10G"),
            device(2, "NVIDIA A10G"),
        ];
        assert_eq!(chosen_model(&mixed).unwrap().name, "NVIDIA A10G");
        let tie = [device(0, "NVIDIA A10G"), device(1, "Tesla T4")];
        assert_eq!(chosen_model(&tie).unwrap().name, "NVIDIA A10G");
        let reversed = [device(0, "Tesla T4"), device(1, "NVIDIA A10G")];
        assert_eq!(chosen_model(&reversed).unwrap().name, "Tesla T4");
    }
}
