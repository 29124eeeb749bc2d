//! The fleet's slots: `maxUnavailable` Leases named `<prefix>-<n>` in
//! gpuprov's namespace, one set for rolling driver upgrades
//! (`gpuprov-driver-upgrade-<n>`) and one for fault remediation
//! (`gpuprov-remediation-<n>`). A node takes a
//! free one (absent, or expired: its holder stopped renewing it) with
//! optimistic concurrency: creating it fails if another node created it
//! first, and replacing an expired one fails if it changed since it was
//! read. So however the nodes' timing falls, no more than `maxUnavailable`
//! hold one. The holder renews it every third of its duration from a
//! thread of `gpuprov run` (long waits and installs included); a node that
//! dies stops renewing, and once its Lease expires another node may take
//! the slot, unless the node is still out of service for what it took
//! the slot for (its published state says so).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use crate::kube::{Cluster, ClusterOptions};
use crate::spec::MaxUnavailable;
use crate::state::{StateError, error_chain};

/// One set of slots: what its Leases are called and what they are for.
#[derive(Debug)]
pub struct SlotKind {
    /// Its Leases are `<prefix>-0`, `<prefix>-1`, …
    pub prefix: &'static str,
    /// The label each Lease carries, to list them in one request.
    pub label: &'static str,
    /// What a slot is for, in messages: `upgrade`, `remediation`.
    pub purpose: &'static str,
    /// Whether a node whose Lease expired is still out of service for
    /// this purpose (it died mid-way): its slot is not free until it comes
    /// back and finishes, or someone brings it back.
    pub still_out: fn(&Node) -> bool,
}
/// The fleet's GPU nodes, for a percentage: gpuprov labels each.
const GPU_NODES: &str = "nvidia.com/gpu.present=true";
/// A fleet's size is read again after this long.
const FLEET_SIZE_KEPT: Duration = Duration::from_secs(600);

fn observe_error(e: crate::kube::KubeError) -> StateError {
    StateError::operator(error_chain(&e))
}

/// The most slots a fleet has: far more than any fleet's nodes. A Lease
/// named past it (by hand, or by a hostile client) is no slot.
const MAX_SLOTS: u64 = 1 << 20;

fn slot_index(kind: &SlotKind, lease: &Lease) -> Option<u64> {
    let digits = lease
        .metadata
        .name
        .as_deref()?
        .strip_prefix(kind.prefix)?
        .strip_prefix('-')?;
    // Written as gpuprov writes it: decimal, no sign, no leading zero.
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok().filter(|i| *i < MAX_SLOTS)
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

/// Whether a Lease's holder stopped renewing it (by this node's clock).
fn expired(lease: &Lease, now: SystemTime) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let renewed = SystemTime::from(renewed.0);
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
    renewed + duration < now
}

/// The slots as listed now.
pub struct Fleet {
    kind: &'static SlotKind,
    /// How many slots there are (`maxUnavailable`, scaled for a percentage).
    pub slots: u64,
    leases: Vec<Lease>,
    now: SystemTime,
    /// Slots whose Lease expired while its node is still out of service
    /// (`SlotKind::still_out`).
    held_out: BTreeMap<u64, String>,
}

impl Fleet {
    pub fn read(
        cluster: &Cluster,
        kind: &'static SlotKind,
        namespace: &str,
        max_unavailable: MaxUnavailable,
    ) -> Result<Fleet, StateError> {
        let slots = of_fleet(cluster, max_unavailable)?;
        let leases = cluster
            .slot_leases(namespace, kind.label, true)
            .map_err(observe_error)?;
        Fleet::of(cluster, kind, slots, leases).map_err(observe_error)
    }

    /// The fleet's slots from their Leases; the holder of an expired one
    /// is read to see whether it is still out (`held_out`).
    fn of(
        cluster: &Cluster,
        kind: &'static SlotKind,
        slots: u64,
        leases: Vec<Lease>,
    ) -> Result<Fleet, crate::kube::KubeError> {
        let now = SystemTime::now();
        let mut held_out = BTreeMap::new();
        for lease in &leases {
            let (Some(index), Some(node)) = (slot_index(kind, lease), holder(lease)) else {
                continue;
            };
            if node == cluster.node || !expired(lease, now) {
                continue;
            }
            if let Some(holder_node) = cluster.node_named(node)?
                && (kind.still_out)(&holder_node)
            {
                held_out.insert(index, node.to_string());
            }
        }
        Ok(Fleet {
            kind,
            slots,
            leases,
            now,
            held_out,
        })
    }

    fn lease(&self, index: u64) -> Option<&Lease> {
        self.leases
            .iter()
            .find(|l| slot_index(self.kind, l) == Some(index))
    }

    /// The slot this node holds (even past `slots`, if the fleet shrank).
    pub fn ours(&self, node: &str) -> Option<u64> {
        self.leases
            .iter()
            .filter(|l| holder(l) == Some(node))
            .find_map(|l| slot_index(self.kind, l))
    }

    /// The first slot nobody holds: no Lease, no holder, or expired (and
    /// its node not still out of service).
    pub fn free(&self) -> Option<u64> {
        (0..self.slots).find(|i| {
            !self.held_out.contains_key(i)
                && self
                    .lease(*i)
                    .is_none_or(|l| holder(l).is_none() || expired(l, self.now))
        })
    }

    /// Who holds the slots, for a reason: `2 of 2 held (node-3, node-5)`.
    pub fn describe(&self) -> String {
        let holders: Vec<String> = (0..self.slots)
            .filter_map(|i| {
                let node = holder(self.lease(i)?)?;
                Some(match self.held_out.contains_key(&i) {
                    true => format!(
                        "{node}, out of service mid-{}, its Lease expired",
                        self.kind.purpose
                    ),
                    false => node.to_string(),
                })
            })
            .collect();
        format!(
            "{} of {} held ({})",
            holders.len(),
            self.slots,
            holders.join(", ")
        )
    }
}

/// How many slots `max_unavailable` gives the fleet now.
pub fn of_fleet(cluster: &Cluster, max_unavailable: MaxUnavailable) -> Result<u64, StateError> {
    Ok(match max_unavailable {
        MaxUnavailable::Count(n) => n,
        percent => percent.slots(fleet_size(cluster)?),
    })
}

/// How many GPU nodes the fleet has, read at most every 10 minutes.
pub fn fleet_size(cluster: &Cluster) -> Result<u64, StateError> {
    let mut known = cluster
        .fleet_size
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((at, size)) = *known
        && at.elapsed() < FLEET_SIZE_KEPT
    {
        return Ok(size);
    }
    let size = cluster.count_nodes(GPU_NODES).map_err(observe_error)?;
    *known = Some((Instant::now(), size));
    Ok(size)
}

/// The slot Lease this node holds, if any.
pub fn held_by(
    cluster: &Cluster,
    kind: &SlotKind,
    namespace: &str,
) -> Result<Option<Lease>, StateError> {
    Ok(cluster
        .slot_leases(namespace, kind.label, false)
        .map_err(observe_error)?
        .into_iter()
        .find(|l| holder(l) == Some(cluster.node.as_str())))
}

fn now() -> MicroTime {
    use k8s_openapi::jiff::{Timestamp, Unit};
    MicroTime(
        Timestamp::now()
            .round(Unit::Microsecond)
            .unwrap_or_else(|_| Timestamp::now()),
    )
}

/// Takes a free slot, or keeps the one this node holds, and renews it from
/// then on; an error when every slot was taken meanwhile.
pub fn take(
    cluster: &Cluster,
    kind: &'static SlotKind,
    namespace: &str,
    slots: u64,
    lease_seconds: u64,
) -> Result<(), String> {
    let api = |e: crate::kube::KubeError| error_chain(&e);
    if renewing(cluster, kind) {
        return Ok(());
    }
    let leases = cluster
        .slot_leases(namespace, kind.label, false)
        .map_err(api)?;
    let fleet = Fleet::of(cluster, kind, slots, leases).map_err(api)?;
    let purpose = kind.purpose;
    let spec = |acquired: Option<MicroTime>, transitions: i32| LeaseSpec {
        holder_identity: Some(cluster.node.clone()),
        lease_duration_seconds: Some(lease_seconds.min(i32::MAX as u64) as i32),
        acquire_time: Some(acquired.unwrap_or_else(now)),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    if let Some(old) = fleet.ours(&cluster.node).and_then(|i| fleet.lease(i)) {
        // Held before this process (a restart): renewed now, not a third
        // of its duration from now, for it may have expired meanwhile, and
        // then another node that took it wins.
        let name = old.metadata.name.clone().unwrap_or_default();
        let mut lease = old.clone();
        let held = lease.spec.as_ref();
        lease.spec = Some(spec(
            held.and_then(|s| s.acquire_time.clone()),
            held.and_then(|s| s.lease_transitions).unwrap_or(0),
        ));
        return match cluster.replace_lease(namespace, &lease).map_err(api)? {
            Some(renewed) => keep_renewing(cluster, kind, namespace, renewed, lease_seconds),
            None => Err(format!(
                "{purpose} slot {name} was taken by another node after it expired; trying again at the next converge"
            )),
        };
    }
    let Some(index) = fleet.free() else {
        return Err(format!(
            "every {purpose} slot was taken meanwhile ({}); trying again at the next converge",
            fleet.describe()
        ));
    };
    let name = format!("{}-{index}", kind.prefix);
    let taken = match fleet.lease(index) {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.to_string()),
                    labels: Some([(kind.label.to_string(), "true".to_string())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(None, 0)),
            };
            cluster.create_lease(namespace, &lease).map_err(api)?
        }
        Some(old) => {
            let transitions = old
                .spec
                .as_ref()
                .and_then(|s| s.lease_transitions)
                .unwrap_or(0);
            let mut lease = old.clone();
            lease.spec = Some(spec(None, transitions.saturating_add(1)));
            cluster.replace_lease(namespace, &lease).map_err(api)?
        }
    };
    let Some(lease) = taken else {
        return Err(format!(
            "{purpose} slot {name} was taken by another node meanwhile; trying again at the next converge"
        ));
    };
    tracing::info!(slot = %name, "took a {purpose} slot");
    keep_renewing(cluster, kind, namespace, lease, lease_seconds)
}

/// Whether this process renews a slot of `kind` for the cluster's node
/// (and has not lost it).
pub fn renewing(cluster: &Cluster, kind: &SlotKind) -> bool {
    cluster
        .lease_renewal
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(kind.prefix)
        .is_some_and(|stop| !stop.load(Ordering::Relaxed))
}

fn keep_renewing(
    cluster: &Cluster,
    kind: &SlotKind,
    namespace: &str,
    lease: Lease,
    lease_seconds: u64,
) -> Result<(), String> {
    let mut running = cluster
        .lease_renewal
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(old) = running.remove(kind.prefix) {
        old.store(true, Ordering::Relaxed);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let options: ClusterOptions = cluster.options.clone();
    let (halt, namespace) = (stop.clone(), namespace.to_string());
    let every = Duration::from_secs((lease_seconds / 3).max(1));
    let purpose = kind.purpose;
    std::thread::Builder::new()
        .name(format!("{purpose} slot"))
        .spawn(move || renew_loop(options, purpose, namespace, lease, halt, every))
        .map_err(|e| format!("the {purpose} slot's renewing thread cannot start: {e}"))?;
    running.insert(kind.prefix, stop);
    Ok(())
}

fn renew_loop(
    options: ClusterOptions,
    purpose: &'static str,
    namespace: String,
    mut lease: Lease,
    stop: Arc<AtomicBool>,
    every: Duration,
) {
    let cluster = match Cluster::connect(&options) {
        Ok(cluster) => cluster,
        Err(e) => {
            tracing::error!("the {purpose} slot cannot be renewed: {}", error_chain(&e));
            stop.store(true, Ordering::Relaxed);
            return;
        }
    };
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next = Instant::now() + every;
        let mut renewed = lease.clone();
        if let Some(spec) = renewed.spec.as_mut() {
            spec.renew_time = Some(now());
        }
        match cluster.replace_lease(&namespace, &renewed) {
            Ok(Some(fresh)) => lease = fresh,
            Ok(None) => {
                tracing::error!(
                    "the {purpose} slot {} was lost (another node took it after it expired)",
                    renewed.metadata.name.as_deref().unwrap_or_default()
                );
                stop.store(true, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("the {purpose} slot was not renewed: {}", error_chain(&e)),
        }
    }
}

/// Stops renewing and gives this node's slot of `kind` back.
pub fn release(cluster: &Cluster, kind: &SlotKind, namespace: &str) -> Result<(), String> {
    if let Some(stop) = cluster
        .lease_renewal
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(kind.prefix)
    {
        stop.store(true, Ordering::Relaxed);
    }
    let Some(lease) = held_by(cluster, kind, namespace).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let name = lease.metadata.name.clone().unwrap_or_default();
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    cluster
        .delete_lease(namespace, &name, &version)
        .map_err(|e| error_chain(&e))?;
    tracing::info!(slot = %name, "gave the {} slot back", kind.purpose);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            spec: None,
        }
    }

    static KIND: SlotKind = SlotKind {
        prefix: "gpuprov-driver-upgrade",
        label: "gpuprov.io/driver-upgrade-slot",
        purpose: "upgrade",
        still_out: |_| false,
    };

    #[test]
    fn only_plain_slot_numbers_name_a_slot() {
        let kind = &KIND;
        assert_eq!(
            slot_index(kind, &named("gpuprov-driver-upgrade-0")),
            Some(0)
        );
        assert_eq!(
            slot_index(kind, &named("gpuprov-driver-upgrade-17")),
            Some(17)
        );
        for hostile in [
            "gpuprov-driver-upgrade-18446744073709551615",
            "gpuprov-driver-upgrade-1048576",
            "gpuprov-driver-upgrade-007",
            "gpuprov-driver-upgrade-+1",
            "gpuprov-driver-upgrade-",
        ] {
            assert_eq!(slot_index(kind, &named(hostile)), None, "{hostile}");
        }
    }
}
