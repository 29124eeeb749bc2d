//! Applying a MIG layout: the GPU Operator's flow, without its wedges.
//!
//! With an API server: `nvidia.com/mig.config.state=pending`, and each GPU
//! client gpuprov runs (its deploy label `true`) set to
//! `paused-for-mig-change`; then a wait, bounded by `mig.timeoutSeconds`,
//! until their pods have left the node; then the layout through NVML; then
//! the labels restored, with `success` or `failed`. Every path after the
//! pause restores the labels, so a failure never leaves the operands off
//! (GPU Operator #2833: its manager could return without setting `failed`).
//! Without an API server the layout is applied as it stands: the `mig`
//! state runs before any operand starts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::layout::MigLayout;
use super::nvml::{Activation, Session};
use super::{PAUSED, STATE_LABEL};
use crate::kube::Cluster;
use crate::operands::Operand;
use crate::state::error_chain;

/// How often the pods on the node are looked at while waiting.
const POLL: Duration = Duration::from_millis(500);

/// Makes the change; the error says which step failed and why.
pub fn run(cluster: Option<&Cluster>, layout: &MigLayout) -> Result<(), String> {
    let Some(cluster) = cluster else {
        return apply_layout(layout);
    };
    let node = cluster
        .node_labels()
        .map_err(|e| format!("before the MIG change: {}", error_chain(&e)))?;
    // gpuprov's own label set as the node has it: applied again with the
    // deploy labels paused, then as it was.
    let ours: BTreeMap<String, String> = node
        .ours
        .iter()
        .filter_map(|k| node.labels.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    let paused: Vec<Operand> = Operand::ALL
        .into_iter()
        .filter(|op| ours.get(&op.deploy_label()).is_some_and(|v| v == "true"))
        .collect();
    let mut pausing = ours.clone();
    for operand in &paused {
        pausing.insert(operand.deploy_label(), PAUSED.to_string());
    }
    pausing.insert(STATE_LABEL.to_string(), "pending".to_string());
    cluster
        .apply_labels(&pausing)
        .map_err(|e| format!("pausing the GPU clients: {}", error_chain(&e)))?;
    let done = wait_for_clients(
        cluster,
        &paused,
        Duration::from_secs(layout.timeout_seconds),
    )
    .and_then(|()| apply_layout(layout));
    let mut restored = ours;
    let state = if done.is_ok() { "success" } else { "failed" };
    restored.insert(STATE_LABEL.to_string(), state.to_string());
    let restore = cluster.apply_labels(&restored).map_err(|e| {
        format!(
            "restoring the GPU clients' labels: {} (the next converge restores them)",
            error_chain(&e)
        )
    });
    match (done, restore) {
        (Ok(()), restore) => restore,
        (Err(why), Ok(())) => Err(why),
        (Err(why), Err(also)) => Err(format!("{why}; then {also}")),
    }
}

/// Waits until no pod of a paused operand is on the node.
fn wait_for_clients(
    cluster: &Cluster,
    paused: &[Operand],
    timeout: Duration,
) -> Result<(), String> {
    if paused.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    loop {
        let pods = cluster
            .pods_on_node("")
            .map_err(|e| format!("waiting for the GPU clients to stop: {}", error_chain(&e)))?;
        let left: Vec<String> = pods
            .iter()
            .filter(|pod| {
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                paused.iter().any(|op| {
                    op.pod_labels()
                        .iter()
                        .any(|(k, v)| labels.get(*k).is_some_and(|have| have == v))
                })
            })
            .map(|pod| {
                format!(
                    "{}/{}",
                    pod.metadata.namespace.as_deref().unwrap_or(""),
                    pod.metadata.name.as_deref().unwrap_or("")
                )
            })
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if crate::interrupt::requested() {
            return Err("interrupted while waiting for the GPU clients to stop".to_string());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the GPU clients' pods did not leave the node within {}s (mig.timeoutSeconds): {}; no MIG change was made",
                timeout.as_secs(),
                left.join(", ")
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// The layout through NVML, GPU by GPU: instances destroyed, the mode set,
/// instances created where NVML's placements fit them.
fn apply_layout(layout: &MigLayout) -> Result<(), String> {
    let session = Session::open(Path::new(&layout.library)).map_err(|e| e.to_string())?;
    for change in &layout.gpus {
        let index = change.index;
        let fail = |what: &str| {
            let what = format!("GPU {index} ({}): {what}", change.name);
            move |e: nvml_wrapper::error::NvmlError| format!("{what}: {e}")
        };
        let gpu = session.gpu(index).map_err(|e| e.to_string())?;
        if !gpu.instances.is_empty() {
            session
                .destroy_all(&gpu)
                .map_err(fail("destroying its MIG devices"))?;
        }
        if let Some(enabled) = change.set_mode {
            let verb = if enabled { "enabling" } else { "disabling" };
            match session
                .set_mode(index, enabled)
                .map_err(fail(&format!("{verb} MIG")))?
            {
                Activation::Applied => {}
                // The mode waits for a GPU reset: the state reports
                // `reboot-required` once it looks again.
                Activation::Pending(why) => {
                    tracing::warn!(gpu = index, "{verb} MIG is pending a GPU reset: {why}");
                    continue;
                }
            }
            if !enabled {
                continue;
            }
        }
        // Placed again against what the GPU offers now that MIG is on.
        let gpu = session.gpu(index).map_err(|e| e.to_string())?;
        let create = super::placements(&gpu, &change.wanted)
            .map_err(|why| format!("GPU {index} ({}): {why}", change.name))?;
        for c in &create {
            session
                .create(
                    index,
                    c.gpu_instance_profile,
                    (c.start, c.size),
                    c.compute_instance_profile,
                )
                .map_err(fail(&format!(
                    "creating {} at slice {}",
                    c.profile, c.start
                )))?;
        }
    }
    Ok(())
}
