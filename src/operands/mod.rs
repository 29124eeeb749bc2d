//! The operands: NVIDIA's device plugin, DCGM exporter and GPU Feature
//! Discovery (`gfd.mode: daemonset`), started on this node and verified;
//! and the vectorAdd validation (`validate`).
//!
//! With an API server, an operand starts when the node carries
//! `nvidia.com/gpu.deploy.<operand>=true`: the GPU Operator's own selector,
//! so its DaemonSets and ours in `deploy/operands` both follow it. The label
//! is published with the run's other labels, and goes (the operand leaves)
//! when the state is disabled or opted out. Without an API server (a
//! bootstrap image), the operand's static pod goes into the kubelet's static
//! pod directory instead, and is removed when the state is disabled.

pub mod device_plugin;
pub mod static_pod;
pub mod validate;

use crate::report::RevertReport;
use crate::spec::{OperandDeploy, OperandSpec, Spec};
use crate::state::{
    Change, Observation, Outcome, RevertContext, StateContext, StateError, error_chain, file_diff,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    DevicePlugin,
    DcgmExporter,
    GpuFeatureDiscovery,
}

/// The allocatable resource the device plugin registers.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The label the DCGM exporter's pods carry (ours and the GPU Operator's).
pub const DCGM_EXPORTER_SELECTOR: &str = crate::kube::view::WATCHED_PODS;
/// The label GFD publishes that shows it ran on the node.
pub const GFD_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

impl Operand {
    pub const ALL: [Operand; 3] = [
        Operand::DevicePlugin,
        Operand::DcgmExporter,
        Operand::GpuFeatureDiscovery,
    ];

    /// The GPU Operator's name for it, in its deploy label.
    pub fn name(self) -> &'static str {
        match self {
            Operand::DevicePlugin => "device-plugin",
            Operand::DcgmExporter => "dcgm-exporter",
            Operand::GpuFeatureDiscovery => "gpu-feature-discovery",
        }
    }

    /// `nvidia.com/gpu.deploy.<operand>`: its DaemonSet's node selector.
    pub fn deploy_label(self) -> String {
        format!("nvidia.com/gpu.deploy.{}", self.name())
    }

    /// Labels its pods carry, ours (`deploy/operands`) and the GPU
    /// Operator's: any one marks a pod as this operand's.
    pub fn pod_labels(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Operand::DevicePlugin => &[
                ("app.kubernetes.io/name", "nvidia-device-plugin"),
                ("app", "nvidia-device-plugin-daemonset"),
            ],
            Operand::DcgmExporter => &[("app", "nvidia-dcgm-exporter")],
            Operand::GpuFeatureDiscovery => &[
                ("app.kubernetes.io/name", "gpu-feature-discovery"),
                ("app", "gpu-feature-discovery"),
            ],
        }
    }

    pub fn spec(self, spec: &Spec) -> &OperandSpec {
        match self {
            Operand::DevicePlugin => &spec.device_plugin,
            Operand::DcgmExporter => &spec.dcgm_exporter,
            Operand::GpuFeatureDiscovery => &spec.gfd,
        }
    }
}

/// Whether operands run as static pods here: asked for, or `auto` without
/// an API server.
pub fn as_static_pods(ctx: &StateContext) -> bool {
    match ctx.spec.operands.deploy {
        OperandDeploy::Auto => ctx.cluster.is_none(),
        OperandDeploy::Labels => false,
        OperandDeploy::StaticPods => true,
    }
}

/// An operand's capability: start it (label or static pod), then verify it.
pub fn observe(ctx: &StateContext, operand: Operand) -> Result<Observation, StateError> {
    let path = static_pod::path(ctx.spec, operand);
    let current = ctx.host.read(&path)?;
    let mut changes = Vec::new();
    let mut labels = std::collections::BTreeMap::new();
    let static_pods = as_static_pods(ctx);
    // The device plugin's config, which GFD (daemonset mode) reads too:
    // whichever of the two runs first hands it over, the other finds it.
    let uses_config = operand != Operand::DcgmExporter;
    let (chosen, problem) = if uses_config {
        device_plugin::in_force(ctx.spec, &ctx.facts.node_labels)
    } else {
        (None, None)
    };
    if let Some(problem) = problem {
        // A label naming no config changes nothing: what was handed over
        // stays, and the step says why it is not what was asked.
        let mut obs = Observation::new(Outcome::Failed, problem);
        if !static_pods {
            obs.labels
                .insert(operand.deploy_label(), "true".to_string());
            if let Some(chosen) = &chosen {
                obs.labels.insert(
                    device_plugin::CHOSEN_LABEL.to_string(),
                    chosen.name.to_string(),
                );
            }
        }
        obs.gate = Some(crate::state::Gate::Pass);
        return Ok(obs);
    }
    if let Some(chosen) = &chosen {
        let (handed, chosen_labels) = device_plugin::hand_over(ctx, chosen, static_pods)?;
        changes.extend(handed);
        labels.extend(chosen_labels);
    }
    if static_pods {
        let cdi_hook = match operand == Operand::DevicePlugin && ctx.spec.cdi.enabled {
            true => Some(crate::toolkit::ctk_binary(ctx.host, ctx.spec)?),
            false => None,
        };
        let wanted = static_pod::render(ctx.spec, operand, chosen.as_ref(), cdi_hook.as_deref())
            .map_err(StateError::operator)?;
        match &current {
            Some(text) if !static_pod::is_ours(text) => {
                return Err(StateError::operator(format!(
                    "{path} exists and gpuprov did not write it; move it away or set operands.staticPodDir"
                )));
            }
            Some(text) if *text == wanted => {}
            _ => changes.push(Change::WriteFile {
                diff: Some(file_diff(&path, current.as_deref().unwrap_or(""), &wanted)),
                path: path.clone(),
                content: wanted.into_bytes(),
                mode: 0o644,
                purpose: format!("{} static pod", operand.name()),
            }),
        }
    } else {
        if current.as_deref().is_some_and(static_pod::is_ours) {
            changes.push(Change::RemoveFile {
                path: path.clone(),
                purpose: format!(
                    "{} static pod: it runs from its DaemonSet now",
                    operand.name()
                ),
            });
        }
        labels.insert(operand.deploy_label(), "true".to_string());
    }
    let (outcome, reason) = verify(ctx, operand, static_pods, &path, chosen.as_ref())?;
    let mut obs = Observation::new(outcome, reason);
    if operand == Operand::DevicePlugin && ctx.cluster.is_some() {
        // What the plugin registered on the node, whole GPUs, shared or
        // MIG devices: the node status metrics' device count.
        let devices: u64 = ctx
            .facts
            .node_allocatable
            .iter()
            .filter(|(name, _)| {
                name.starts_with("nvidia.com/gpu") || name.starts_with("nvidia.com/mig-")
            })
            .filter_map(|(_, count)| count.parse::<u64>().ok())
            .sum();
        obs.details = serde_json::json!({ "devices": devices });
    }
    if !changes.is_empty() {
        // Once the manifest is in place the kubelet starts the pod; with an
        // API server a later converge sees it running.
        obs.outcome = Outcome::Pending;
        obs.on_change = if ctx.cluster.is_some() {
            Outcome::Pending
        } else {
            Outcome::Configured
        };
    }
    obs.changes = changes;
    obs.labels = labels;
    Ok(obs)
}

/// Whether the operand runs: without an API server, `configured` (the
/// manifest or label is in place and the kubelet or a DaemonSet does the
/// rest); with one, `ready` once its effect shows, else `pending`.
fn verify(
    ctx: &StateContext,
    operand: Operand,
    static_pods: bool,
    path: &str,
    chosen: Option<&device_plugin::Chosen>,
) -> Result<(Outcome, String), StateError> {
    let image = &operand.spec(ctx.spec).image;
    let Some(cluster) = ctx.cluster else {
        return Ok((
            Outcome::Configured,
            if static_pods {
                format!("static pod {path} ({image}); the kubelet runs it")
            } else {
                format!(
                    "{}=true for its DaemonSet; not verified without an API server",
                    operand.deploy_label()
                )
            },
        ));
    };
    let label = operand.deploy_label();
    if !static_pods && !ctx.facts.has_label(&format!("{label}=true")) {
        return Ok((
            Outcome::Pending,
            format!("starting: the node gets {label}=true, its DaemonSet's selector"),
        ));
    }
    Ok(match operand {
        Operand::DevicePlugin => {
            let chosen = chosen.ok_or_else(|| {
                StateError::operator("the device plugin has no config in force".to_string())
            })?;
            verify_device_plugin(ctx, chosen)?
        }
        Operand::DcgmExporter => {
            let pods = cluster
                .pods_on_node(DCGM_EXPORTER_SELECTOR)
                .map_err(|e| StateError::operator(error_chain(&e)))?;
            let name = |p: &k8s_openapi::api::core::v1::Pod| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or(""),
                    p.metadata.name.as_deref().unwrap_or("")
                )
            };
            match (
                pods.iter().find(|p| crate::kube::pods::is_ready(p)),
                pods.first(),
            ) {
                (Some(ready), _) => (Outcome::Ready, format!("pod {} is Ready", name(ready))),
                (None, Some(pod)) => (
                    Outcome::Pending,
                    format!(
                        "waiting for pod {} to be Ready: {}",
                        name(pod),
                        crate::kube::pods::describe(pod)
                    ),
                ),
                (None, None) => (
                    Outcome::Pending,
                    format!("waiting for a pod with {DCGM_EXPORTER_SELECTOR} on this node"),
                ),
            }
        }
        Operand::GpuFeatureDiscovery => match ctx.facts.node_labels.get(GFD_PRODUCT_LABEL) {
            Some(product) => (
                Outcome::Ready,
                format!("GFD labelled the node: {GFD_PRODUCT_LABEL}={product}"),
            ),
            None => (
                Outcome::Pending,
                format!("waiting for GFD to label the node with {GFD_PRODUCT_LABEL}"),
            ),
        },
    })
}

/// Ready once the node's allocatable holds every resource the device
/// plugin offers with its config; a config the plugin refuses for these
/// GPUs fails the step with the reason.
fn verify_device_plugin(
    ctx: &StateContext,
    chosen: &device_plugin::Chosen,
) -> Result<(Outcome, String), StateError> {
    let gpus = device_plugin::gpus(ctx).map_err(StateError::operator)?;
    let expected = match &gpus {
        Some(gpus) => device_plugin::expected(gpus, chosen.mig_strategy, chosen.sharing()),
        // Without NVML: the PCI GPUs bound to the nvidia driver, whole.
        None => {
            let whole: Vec<device_plugin::GpuView> = (0..gpu_count(ctx) as u32)
                .map(device_plugin::GpuView::whole)
                .collect();
            device_plugin::expected(&whole, chosen.mig_strategy, chosen.sharing())
        }
    }
    .map_err(|why| {
        StateError::operator(format!("config {} ({}): {why}", chosen.name, chosen.whence))
    })?;
    let config = format!(
        "config {} ({}{})",
        chosen.name,
        chosen.whence,
        chosen
            .sharing()
            .map(|s| format!(", {}", s.strategy.as_str()))
            .unwrap_or_default()
    );
    let missing: Vec<String> = expected
        .iter()
        .filter(|(name, count)| ctx.facts.node_allocatable.get(*name) != Some(&count.to_string()))
        .map(|(name, count)| {
            let have = ctx
                .facts
                .node_allocatable
                .get(name)
                .map_or("none", String::as_str);
            format!("{name} is {have}, want {count}")
        })
        .collect();
    let offered = device_plugin::describe(&expected, chosen.sharing());
    Ok(if missing.is_empty() {
        (
            Outcome::Ready,
            format!("the node offers {offered}; {config}"),
        )
    } else {
        (
            Outcome::Pending,
            format!(
                "waiting for the device plugin to register: allocatable {}; {config}",
                missing.join(", ")
            ),
        )
    })
}

/// What a disabled or opted-out operand takes away: its static pod. (Its
/// deploy label goes by itself: the run no longer publishes it.)
pub fn withdraw(ctx: &StateContext, operand: Operand) -> Result<Vec<Change>, StateError> {
    let path = static_pod::path(ctx.spec, operand);
    // The device plugin's config file stays (GFD may read it); `revert`
    // removes it.
    Ok(match ctx.host.read(&path)? {
        Some(text) if static_pod::is_ours(&text) => vec![Change::RemoveFile {
            path,
            purpose: format!("{} static pod: disabled", operand.name()),
        }],
        _ => Vec::new(),
    })
}

/// The operands' revert (one for all of them: they share the static pod
/// directory): every operand manifest gpuprov wrote, and the device
/// plugin config they read.
pub fn revert(ctx: &RevertContext, report: &mut RevertReport) -> Result<(), StateError> {
    report
        .static_pods_removed
        .extend(static_pod::remove_ours(ctx.host, ctx.spec)?);
    Ok(())
}

/// The GPUs on the node: those NVML sees, or without NVML the PCI GPUs
/// bound to the nvidia driver.
pub fn gpu_count(ctx: &StateContext) -> usize {
    match ctx.facts.nvml(ctx.host) {
        Ok(inventory) => inventory.devices.len(),
        Err(_) => ctx
            .facts
            .gpus()
            .filter(|g| g.driver.as_deref() == Some("nvidia"))
            .count(),
    }
}
