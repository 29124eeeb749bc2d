//! Making a rolling upgrade's actions: each one API call or a loop of
//! them, on this node only.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use super::{Action, SLOTS, STATE_LABEL};
use crate::kube::upgrade::Eviction;
use crate::kube::{Cluster, KubeError};
use crate::slots;
use crate::state::{LabelsSet, error_chain};

/// How often a wait looks again (jobs to finish, evictions a
/// PodDisruptionBudget refused).
const POLL: Duration = Duration::from_secs(2);
/// The field manager of the state label, apart from gpuprov's label set:
/// the state is published as each stage starts, not at a converge's end.
const STATE_MANAGER: &str = "gpuprov-driver-upgrade";

fn api(e: KubeError) -> String {
    error_chain(&e)
}

pub fn make(
    cluster: Option<&Cluster>,
    action: &Action,
    labels_set: &LabelsSet,
) -> Result<(), String> {
    let cluster = cluster.ok_or("a rolling driver upgrade needs an API server")?;
    match action {
        Action::TakeSlot {
            namespace,
            slots,
            lease_seconds,
        } => slots::take(cluster, &SLOTS, namespace, *slots, *lease_seconds),
        Action::ReleaseSlot { namespace } => slots::release(cluster, &SLOTS, namespace),
        Action::Publish { state } => {
            // Each stage that disrupts the node starts only while its slot
            // is held: one lost (the API server unreachable for longer than
            // the Lease) may be another node's by now.
            if state.disrupts() && !slots::renewing(cluster, &SLOTS) {
                return Err(format!(
                    "the upgrade slot was lost before {}: another node may hold it now; stopping here",
                    state.as_str()
                ));
            }
            let labels = BTreeMap::from([(STATE_LABEL.to_string(), state.as_str().to_string())]);
            cluster
                .apply_labels_forced(STATE_MANAGER, &labels)
                .map_err(api)?;
            labels_set.record(STATE_LABEL, state.as_str());
            tracing::info!("{STATE_LABEL}={}", state.as_str());
            Ok(())
        }
        Action::Cordon => cluster.set_unschedulable(true).map_err(api),
        Action::Uncordon => cluster.set_unschedulable(false).map_err(api),
        Action::WaitForJobs {
            selector,
            timeout_seconds,
        } => wait_for_jobs(cluster, selector, *timeout_seconds),
        Action::DeleteGpuPods { operands_namespace } => {
            for pod in cluster.list_pods_on_node("").map_err(api)? {
                if uses_gpus(&pod) && !is_operand(&pod, operands_namespace) && !finished(&pod) {
                    let (namespace, name) = key(&pod);
                    // With its own grace period: a job gets its SIGTERM.
                    cluster
                        .delete_pod_within(&namespace, &name, None)
                        .map_err(api)?;
                    tracing::info!("deleted GPU pod {namespace}/{name}");
                }
            }
            Ok(())
        }
        Action::Drain {
            selector,
            timeout_seconds,
            delete_empty_dir,
            force,
        } => drain(
            cluster,
            &|_| true,
            selector,
            Duration::from_secs(*timeout_seconds),
            *delete_empty_dir,
            *force,
            "driver.upgrade.drain",
        ),
    }
}

fn key(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// A container of the pod asks for an NVIDIA device (`nvidia.com/gpu`,
/// a MIG profile, a shared replica), or the pod has DRA resource claims
/// (on a GPU node, its devices are GPUs).
pub fn uses_gpus(pod: &Pod) -> bool {
    let claims = pod
        .spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_ref())
        .is_some_and(|c| !c.is_empty());
    claims
        || pod.spec.iter().flat_map(|s| &s.containers).any(|c| {
            c.resources.as_ref().is_some_and(|r| {
                r.limits
                    .iter()
                    .chain(r.requests.iter())
                    .flat_map(|m| m.iter())
                    .any(|(k, q)| k.starts_with("nvidia.com/") && q.0.trim() != "0")
            })
        })
}

/// The operands' own pods (the device plugin, GFD, the exporter…): they
/// follow the driver and are not the workload.
pub fn is_operand(pod: &Pod, operands_namespace: &str) -> bool {
    pod.metadata.namespace.as_deref() == Some(operands_namespace)
        || pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get("app").is_some_and(|a| a.starts_with("nvidia-")))
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn owned_by_daemon_set(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet")
}

fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
}

fn has_empty_dir(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| v.empty_dir.is_some())
}

/// Whether `pod` carries every `key=value` (and none of the `key!=value`)
/// of an equality-based selector.
fn selects(selector: &str, pod: &Pod) -> bool {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

/// Waits for the pods `selector` names on this node to finish, up to
/// `timeout_seconds` (0: as long as it takes); then goes on regardless.
pub fn wait_for_jobs(
    cluster: &Cluster,
    selector: &str,
    timeout_seconds: u64,
) -> Result<(), String> {
    let deadline =
        (timeout_seconds > 0).then(|| Instant::now() + Duration::from_secs(timeout_seconds));
    loop {
        let running: Vec<String> = cluster
            .list_pods_on_node("")
            .map_err(api)?
            .iter()
            .filter(|p| selects(selector, p) && !finished(p))
            .map(|p| {
                let (ns, name) = key(p);
                format!("{ns}/{name}")
            })
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // As k8s-operator-libs does: after the wait, the pods are deleted.
            tracing::warn!(
                "waited {timeout_seconds}s for jobs ({}); going on",
                running.join(", ")
            );
            return Ok(());
        }
        if crate::interrupt::requested() {
            return Err(format!(
                "interrupted while waiting for jobs: {}",
                running.join(", ")
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Evicts the pods on this node that `selector` names and `which` takes
/// (DaemonSets' and mirror pods never) through the Eviction API, as
/// `kubectl drain` does, until none is left or `timeout` passed; `spec_key` is
/// the spec section, for the refusals' help.
pub fn drain(
    cluster: &Cluster,
    which: &dyn Fn(&Pod) -> bool,
    selector: &str,
    timeout: Duration,
    delete_empty_dir: bool,
    force: bool,
    spec_key: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let pods: Vec<Pod> = cluster
            .list_pods_on_node("")
            .map_err(api)?
            .into_iter()
            .filter(|p| !owned_by_daemon_set(p) && !is_mirror(p) && !finished(p))
            .filter(|p| selects(selector, p) && which(p))
            .collect();
        if pods.is_empty() {
            return Ok(());
        }
        // kubectl drain's refusals: what no controller would bring back,
        // and local data, unless told.
        for pod in &pods {
            let (ns, name) = key(pod);
            if !force
                && pod
                    .metadata
                    .owner_references
                    .as_ref()
                    .is_none_or(Vec::is_empty)
            {
                return Err(format!(
                    "drain: pod {ns}/{name} has no controller (set {spec_key}.force to evict it)"
                ));
            }
            if !delete_empty_dir && has_empty_dir(pod) {
                return Err(format!(
                    "drain: pod {ns}/{name} has an emptyDir volume (set {spec_key}.deleteEmptyDir to evict it)"
                ));
            }
        }
        let mut refused = Vec::new();
        for pod in &pods {
            let (ns, name) = key(pod);
            match cluster.evict(&ns, &name).map_err(api)? {
                Eviction::Done => tracing::info!("evicted pod {ns}/{name}"),
                Eviction::Refused(why) => refused.push(format!("{ns}/{name}: {why}")),
            }
        }
        if Instant::now() >= deadline {
            let left: Vec<String> = if refused.is_empty() {
                pods.iter()
                    .map(|p| {
                        let (ns, name) = key(p);
                        format!("{ns}/{name}")
                    })
                    .collect()
            } else {
                refused
            };
            return Err(format!(
                "drain: not done within {}s: {}",
                timeout.as_secs(),
                left.join("; ")
            ));
        }
        if crate::interrupt::requested() {
            return Err("interrupted while draining".to_string());
        }
        std::thread::sleep(POLL);
    }
}
