//! The device plugin's config and the resources it offers.
//!
//! A node's config is chosen by gpuprov (the `nvidia.com/device-plugin.config`
//! label, else `devicePlugin.config.default`) and handed over:
//! * with an API server, every config goes into the ConfigMap
//!   `gpuprov-device-plugin-configs` in the operands' namespace, and the
//!   chosen name into the node label `gpuprov.io/device-plugin.config`; the
//!   DaemonSet's config-manager sidecar (`deploy/operands`) follows that
//!   label, swaps the file and signals the plugin, which reloads in place:
//!   a config change restarts no pod and nothing else on the node;
//! * without one, the chosen file goes to `/var/lib/gpuprov/device-plugin/`
//!   and the static pod reads it (`CONFIG_FILE`); its manifest carries the
//!   file's digest, so a change rewrites the manifest and the kubelet
//!   restarts that pod alone.
//!
//! Readiness then expects what the plugin offers with that config: every
//! GPU as `nvidia.com/gpu` (× replicas when shared), or its MIG devices as
//! the strategy exposes them.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::mig::nvml::MigDevice;
use crate::spec::{MigStrategy, PluginConfig, Sharing, SharingStrategy, Spec};
use crate::state::{Change, StateContext, StateError, error_chain};

/// The ConfigMap holding every config, in the operands' namespace.
pub const CONFIG_MAP: &str = "gpuprov-device-plugin-configs";
/// The node label naming the config in force (what the sidecar follows).
pub const CHOSEN_LABEL: &str = "gpuprov.io/device-plugin.config";
/// Without an API server: the chosen config, a host path gpuprov owns.
pub const HOST_CONFIG_DIR: &str = "/var/lib/gpuprov/device-plugin";
pub const HOST_CONFIG_FILE: &str = "/var/lib/gpuprov/device-plugin/config.yaml";
/// Where the static pods see that directory.
pub const POD_CONFIG_DIR: &str = "/etc/gpuprov-device-plugin";
/// The static pod annotation carrying the config's name and digest.
pub const CONFIG_ANNOTATION: &str = "gpuprov.io/device-plugin-config";

/// The config in force on this node.
#[derive(Debug, Clone)]
pub struct Chosen<'a> {
    pub name: &'a str,
    pub config: &'a PluginConfig,
    /// Why this one (`nvidia.com/device-plugin.config=shared`).
    pub whence: String,
    /// The config's `flags.migStrategy`, else `mig.strategy`.
    pub mig_strategy: MigStrategy,
}

impl Chosen<'_> {
    /// The file the device plugin reads.
    pub fn text(&self) -> String {
        self.config.file_text(self.mig_strategy)
    }

    /// `<name> sha256:<first 12>`: changes whenever the file does.
    pub fn annotation(&self) -> String {
        let digest = Sha256::digest(self.text().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} sha256:{}", self.name, &hex[..12])
    }

    pub fn sharing(&self) -> Option<&Sharing> {
        self.config.sharing.as_ref()
    }
}

/// The node's config; a label naming no config is an error with the names.
pub fn chosen<'a>(
    spec: &'a Spec,
    node_labels: &BTreeMap<String, String>,
) -> Result<Chosen<'a>, String> {
    let (name, config, whence) = spec.device_plugin_config.chosen(node_labels)?;
    Ok(Chosen {
        name,
        config,
        whence,
        mig_strategy: config.mig_strategy.unwrap_or(spec.mig.strategy),
    })
}

/// The config in force: the one the labels choose; when the
/// `nvidia.com/device-plugin.config` label names no config, the one handed
/// over before (gpuprov's label on the node) stays, with the problem to
/// report. `None` with a problem: nothing was handed over yet.
pub fn in_force<'a>(
    spec: &'a Spec,
    node_labels: &BTreeMap<String, String>,
) -> (Option<Chosen<'a>>, Option<String>) {
    match chosen(spec, node_labels) {
        Ok(chosen) => (Some(chosen), None),
        Err(problem) => {
            let before = node_labels
                .get(CHOSEN_LABEL)
                .and_then(|name| spec.device_plugin_config.configs.get_key_value(name));
            match before {
                Some((name, config)) => (
                    Some(Chosen {
                        name,
                        config,
                        whence: format!("kept: {CHOSEN_LABEL}={name}"),
                        mig_strategy: config.mig_strategy.unwrap_or(spec.mig.strategy),
                    }),
                    Some(format!("{problem}; config {name} stays in force")),
                ),
                None => (None, Some(problem)),
            }
        }
    }
}

/// Every config's file, by name: the ConfigMap's data.
pub fn config_map_data(spec: &Spec) -> BTreeMap<String, String> {
    spec.device_plugin_config
        .configs
        .iter()
        .map(|(name, config)| {
            let strategy = config.mig_strategy.unwrap_or(spec.mig.strategy);
            (name.clone(), config.file_text(strategy))
        })
        .collect()
}

/// What hands the config over, and the label that names it.
pub fn hand_over(
    ctx: &StateContext,
    chosen: &Chosen,
    static_pods: bool,
) -> Result<(Vec<Change>, BTreeMap<String, String>), StateError> {
    let mut changes = Vec::new();
    let mut labels = BTreeMap::new();
    if static_pods {
        let wanted = chosen.text();
        let current = ctx.host.read(HOST_CONFIG_FILE)?;
        if current.as_deref() != Some(wanted.as_str()) {
            changes.push(Change::WriteFile {
                diff: Some(crate::state::file_diff(
                    HOST_CONFIG_FILE,
                    current.as_deref().unwrap_or(""),
                    &wanted,
                )),
                path: HOST_CONFIG_FILE.to_string(),
                content: wanted.into_bytes(),
                mode: 0o644,
                purpose: format!("device plugin config `{}` ({})", chosen.name, chosen.whence),
            });
        }
        return Ok((changes, labels));
    }
    labels.insert(CHOSEN_LABEL.to_string(), chosen.name.to_string());
    if let Some(cluster) = ctx.cluster {
        let namespace = &ctx.spec.operands.namespace;
        let wanted = config_map_data(ctx.spec);
        let current = cluster
            .config_map_data(namespace, CONFIG_MAP)
            .map_err(|e| StateError::operator(error_chain(&e)))?;
        if current.as_ref() != Some(&wanted) {
            let current = current.unwrap_or_default();
            let keys: Vec<String> = wanted
                .keys()
                .chain(current.keys())
                .filter(|k| wanted.get(*k) != current.get(*k))
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            changes.push(Change::ApplyConfigMap {
                namespace: namespace.clone(),
                name: CONFIG_MAP.to_string(),
                keys,
                purpose: "the device plugin's configs".to_string(),
                data: wanted,
            });
        }
    }
    Ok((changes, labels))
}

/// A GPU as the device plugin sees it.
#[derive(Debug, Clone)]
pub struct GpuView {
    pub index: u32,
    /// NVML's name (`NVIDIA A100-SXM4-40GB`).
    pub name: String,
    pub memory_mib: u64,
    pub compute_capability: (i32, i32),
    pub mig_enabled: bool,
    pub mig: Vec<MigDevice>,
}

impl GpuView {
    /// A GPU known only from the PCI bus (no NVML): whole, no MIG.
    pub fn whole(index: u32) -> GpuView {
        GpuView {
            index,
            name: String::new(),
            memory_mib: 0,
            compute_capability: (0, 0),
            mig_enabled: false,
            mig: Vec::new(),
        }
    }
}

/// The node's GPUs with their MIG devices, read now (a layout applied
/// earlier in this run shows); `None` without NVML.
pub fn gpus(ctx: &StateContext) -> Result<Option<Vec<GpuView>>, String> {
    let Ok(inventory) = ctx.facts.nvml(ctx.host) else {
        return Ok(None);
    };
    let mut views: Vec<GpuView> = inventory
        .devices
        .iter()
        .map(|d| GpuView {
            index: d.index,
            name: d.name.clone(),
            memory_mib: d.memory_total_mib,
            compute_capability: d.compute_capability,
            mig_enabled: d.mig_enabled,
            mig: Vec::new(),
        })
        .collect();
    if inventory.devices.iter().any(|d| d.mig_capable) {
        let library = std::path::Path::new(&inventory.library);
        let migs = crate::mig::nvml::read(library)
            .map_err(|problem| format!("cannot read the GPUs' MIG devices: {problem}"))?;
        for mig in migs {
            if let Some(view) = views.iter_mut().find(|v| v.index == mig.index) {
                view.mig_enabled = mig.current;
                view.mig = mig.devices();
            }
        }
    }
    Ok(Some(views))
}

/// The resources the device plugin offers for these GPUs with this
/// config, by name; an error where the plugin itself refuses to start.
pub fn expected(
    gpus: &[GpuView],
    strategy: MigStrategy,
    sharing: Option<&Sharing>,
) -> Result<BTreeMap<String, u64>, String> {
    let gpu = crate::operands::GPU_RESOURCE;
    let enabled: Vec<&GpuView> = gpus.iter().filter(|g| g.mig_enabled).collect();
    let mut base: BTreeMap<String, u64> = BTreeMap::new();
    match strategy {
        MigStrategy::Single if !enabled.is_empty() => {
            if enabled.len() != gpus.len() {
                return Err(format!(
                    "mig-strategy single needs every GPU alike, but GPUs {} have MIG enabled and the others not (use mixed, or one layout for all)",
                    indices(&enabled)
                ));
            }
            let empty: Vec<&GpuView> = enabled
                .iter()
                .copied()
                .filter(|g| g.mig.is_empty())
                .collect();
            if !empty.is_empty() {
                return Err(format!(
                    "mig-strategy single: GPUs {} have MIG enabled but no MIG devices",
                    indices(&empty)
                ));
            }
            let profiles: std::collections::BTreeSet<&str> = enabled
                .iter()
                .flat_map(|g| g.mig.iter().map(|m| m.name.as_str()))
                .collect();
            if profiles.len() > 1 {
                return Err(format!(
                    "mig-strategy single needs one MIG profile on the node, but it has {} (use mixed)",
                    profiles.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            let count = enabled.iter().map(|g| g.mig.len() as u64).sum();
            base.insert(gpu.to_string(), count);
        }
        MigStrategy::Mixed => {
            let whole = gpus.iter().filter(|g| !g.mig_enabled).count() as u64;
            if whole > 0 {
                base.insert(gpu.to_string(), whole);
            }
            for device in enabled.iter().flat_map(|g| &g.mig) {
                *base
                    .entry(format!("nvidia.com/mig-{}", device.resource_profile()))
                    .or_default() += 1;
            }
        }
        MigStrategy::None | MigStrategy::Single => {
            if !gpus.is_empty() {
                base.insert(gpu.to_string(), gpus.len() as u64);
            }
        }
    }
    if base.is_empty() && !gpus.is_empty() {
        return Err(format!(
            "with mig-strategy {} these GPUs offer nothing: GPUs {} have MIG enabled but no MIG devices (apply a MIG layout, or disable MIG)",
            strategy.as_str(),
            indices(&enabled)
        ));
    }
    let Some(sharing) = sharing else {
        return Ok(base);
    };
    if sharing.strategy == SharingStrategy::Mps && !enabled.is_empty() {
        return Err(format!(
            "MPS sharing does not support MIG devices, and GPUs {} have MIG enabled",
            indices(&enabled)
        ));
    }
    let mut offered = BTreeMap::new();
    for (name, count) in base {
        *offered.entry(sharing.offered_name(&name)).or_default() += count * sharing.replicas(&name);
    }
    Ok(offered)
}

fn indices(gpus: &[&GpuView]) -> String {
    gpus.iter()
        .map(|g| g.index.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `nvidia.com/gpu: 32 (8 × 4 replicas)` for the readiness reason.
pub fn describe(expected: &BTreeMap<String, u64>, sharing: Option<&Sharing>) -> String {
    expected
        .iter()
        .map(|(name, count)| {
            let replicas = sharing
                .map(|s| {
                    let base = name.strip_suffix(".shared").unwrap_or(name);
                    s.replicas(base)
                })
                .unwrap_or(1);
            if replicas > 1 {
                format!(
                    "{name}: {count} ({} × {replicas} replicas)",
                    count / replicas
                )
            } else {
                format!("{name}: {count}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::SharedResource;

    fn gpu(index: u32, mig: &[&str]) -> GpuView {
        GpuView {
            index,
            name: "NVIDIA A100-SXM4-40GB".into(),
            memory_mib: 40960,
            compute_capability: (8, 0),
            mig_enabled: !mig.is_empty(),
            mig: mig
                .iter()
                .map(|name| MigDevice {
                    name: name.to_string(),
                    memory_mib: 4864,
                    multiprocessors: 14,
                    slices_gi: 1,
                    slices_ci: 1,
                    copy_engines: 1,
                    decoders: 0,
                    encoders: 0,
                    jpegs: 0,
                    ofas: 0,
                })
                .collect(),
        }
    }

    fn sharing(strategy: SharingStrategy, rename: bool, resources: &[(&str, u64)]) -> Sharing {
        Sharing {
            strategy,
            rename_by_default: rename,
            resources: resources
                .iter()
                .map(|(name, replicas)| SharedResource {
                    name: name.to_string(),
                    replicas: *replicas,
                })
                .collect(),
        }
    }

    #[test]
    fn replicas_multiply_and_renaming_moves_the_resource() {
        let gpus = [gpu(0, &[]), gpu(1, &[])];
        let ts = sharing(
            SharingStrategy::TimeSlicing,
            false,
            &[("nvidia.com/gpu", 4)],
        );
        assert_eq!(
            expected(&gpus, MigStrategy::Single, Some(&ts)).unwrap(),
            BTreeMap::from([("nvidia.com/gpu".to_string(), 8)])
        );
        let renamed = sharing(SharingStrategy::Mps, true, &[("nvidia.com/gpu", 3)]);
        assert_eq!(
            expected(&gpus, MigStrategy::None, Some(&renamed)).unwrap(),
            BTreeMap::from([("nvidia.com/gpu.shared".to_string(), 6)])
        );
    }

    #[test]
    fn mig_strategies_expose_what_the_plugin_does() {
        let single = [gpu(0, &["1g.5gb", "1g.5gb"]), gpu(1, &["1g.5gb"])];
        assert_eq!(
            expected(&single, MigStrategy::Single, None).unwrap(),
            BTreeMap::from([("nvidia.com/gpu".to_string(), 3)])
        );
        let mixed = [gpu(0, &["3g.20gb", "1g.5gb+me"]), gpu(1, &[])];
        assert_eq!(
            expected(&mixed, MigStrategy::Mixed, None).unwrap(),
            BTreeMap::from([
                ("nvidia.com/gpu".to_string(), 1),
                ("nvidia.com/mig-1g.5gb.me".to_string(), 1),
                ("nvidia.com/mig-3g.20gb".to_string(), 1),
            ])
        );
        let err = expected(&mixed, MigStrategy::Single, None).unwrap_err();
        assert!(err.contains("GPUs 0 have MIG enabled"), "{err}");
        let two = [gpu(0, &["3g.20gb", "1g.5gb"])];
        assert!(
            expected(&two, MigStrategy::Single, None)
                .unwrap_err()
                .contains("3g.20gb")
        );
        let mps = sharing(SharingStrategy::Mps, false, &[("nvidia.com/gpu", 2)]);
        assert!(
            expected(&single, MigStrategy::Single, Some(&mps))
                .unwrap_err()
                .contains("MPS")
        );
        // Strategy none offers MIG-enabled GPUs whole.
        assert_eq!(
            expected(&mixed, MigStrategy::None, None).unwrap(),
            BTreeMap::from([("nvidia.com/gpu".to_string(), 2)])
        );
    }
}
