//! Fault storms: when more GPU nodes than `remediation.storm.maxFaultingNodes`
//! began faulting within `remediation.storm.windowSeconds` (a bad driver
//! rollout, a cooling failure), the cause is not the nodes' GPUs, and
//! draining, resetting or rebooting them would only take the fleet down.
//! The first node that counts past the threshold creates the storm Lease
//! `gpuprov-remediation-storm`; while it exists no node acts beyond its
//! taint, and each affected node raises an event. A person ends the storm
//! by deleting the Lease, once the cause is found.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use super::{FAULT_SINCE_LABEL, STORM_LEASE};
use crate::kube::{Cluster, KubeError};
use crate::spec::RemediationSpec;
use crate::state::error_chain;

/// Annotations of the storm Lease: what its creator counted.
const FAULTING_ANNOTATION: &str = "gpuprov.io/faulting-nodes";
const THRESHOLD_ANNOTATION: &str = "gpuprov.io/max-faulting-nodes";
/// The label the storm Lease carries.
const STORM_LABEL: &str = "gpuprov.io/remediation-storm";

/// A storm raised.
#[derive(Debug, Clone)]
pub struct Storm {
    /// The Lease's UID: one storm, however often it is read.
    pub uid: String,
    pub raised_by: String,
    pub faulting: String,
    pub threshold: String,
}

impl Storm {
    pub fn describe(&self) -> String {
        format!(
            "{} GPU nodes faulting, more than {} (raised by {}); delete Lease {STORM_LEASE} once the cause is found",
            self.faulting, self.threshold, self.raised_by
        )
    }
}

/// The storm raised in `namespace`, if any.
pub fn raised(cluster: &Cluster, namespace: &str) -> Result<Option<Storm>, KubeError> {
    let Some(lease) = cluster.get_lease(namespace, STORM_LEASE)? else {
        return Ok(None);
    };
    let annotation = |key: &str| {
        lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .cloned()
            .unwrap_or_else(|| "?".to_string())
    };
    Ok(Some(Storm {
        uid: lease.metadata.uid.clone().unwrap_or_default(),
        raised_by: lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default(),
        faulting: annotation(FAULTING_ANNOTATION),
        threshold: annotation(THRESHOLD_ANNOTATION),
    }))
}

/// How many GPU nodes began faulting within the window (their
/// `gpuprov.io/gpu-fault-since` label), counting this one, and the most
/// allowed before it is a storm.
pub fn count(cluster: &Cluster, spec: &RemediationSpec) -> Result<(u64, u64), String> {
    let now = super::now();
    let from = now.saturating_sub(spec.storm_window_seconds);
    let nodes = cluster
        .nodes_labels(FAULT_SINCE_LABEL)
        .map_err(|e| error_chain(&e))?;
    let mut faulting = 0u64;
    for (_, labels) in nodes.iter().filter(|(name, _)| *name != cluster.node) {
        let since = labels
            .get(FAULT_SINCE_LABEL)
            .and_then(|s| s.parse::<u64>().ok());
        if since.is_some_and(|s| s >= from) {
            faulting += 1;
        }
    }
    // This node, faulting now (its label may not be published yet).
    faulting += 1;
    let threshold = crate::slots::of_fleet(cluster, spec.storm_max_faulting_nodes)
        .map_err(|e| e.to_string())?;
    Ok((faulting, threshold))
}

/// Creates the storm Lease, and answers the storm raised; one created
/// meanwhile by another node is the same storm.
pub fn raise(
    cluster: &Cluster,
    namespace: &str,
    faulting: u64,
    threshold: u64,
) -> Result<Storm, String> {
    use k8s_openapi::jiff::{Timestamp, Unit};
    let now = MicroTime(
        Timestamp::now()
            .round(Unit::Microsecond)
            .unwrap_or_else(|_| Timestamp::now()),
    );
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(STORM_LEASE.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([(STORM_LABEL.to_string(), "true".to_string())].into()),
            annotations: Some(
                [
                    (FAULTING_ANNOTATION.to_string(), faulting.to_string()),
                    (THRESHOLD_ANNOTATION.to_string(), threshold.to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(cluster.node.clone()),
            acquire_time: Some(now),
            ..LeaseSpec::default()
        }),
    };
    match cluster
        .create_lease(namespace, &lease)
        .map_err(|e| error_chain(&e))?
    {
        Some(_) => tracing::warn!(
            faulting,
            threshold,
            "GPU fault storm: {faulting} GPU nodes faulting, more than {threshold}; automatic remediation stopped fleet-wide"
        ),
        None => tracing::info!("GPU fault storm raised by another node meanwhile"),
    }
    raised(cluster, namespace)
        .map_err(|e| error_chain(&e))?
        .ok_or_else(|| format!("the storm Lease {STORM_LEASE} was deleted as soon as it was made"))
}
