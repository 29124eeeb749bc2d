//! Dynamic Resource Allocation (`devicePlugin.mode: dra`): gpuprov is the
//! node's DRA driver for whole GPUs and MIG devices, `gpu.nvidia.com`, in
//! place of NVIDIA's device plugin (the two never run on one node: this
//! mode withdraws the plugin's pod and label, the other mode this one's
//! slices).
//!
//! * The `device-plugin` state publishes the node's devices
//!   (`devices.rs`) in one ResourceSlice, a pool named after the node,
//!   written only when it differs (its generation then bumped), and is
//!   ready once the kubelet has registered the plugin.
//! * `gpuprov run` serves the kubelet plugin (`plugin/`): registration,
//!   `NodePrepareResources` (a CDI spec per claim), health.
//!
//! What was published is kept in `/var/lib/gpuprov/dra/devices.json`,
//! which the plugin prepares claims against.

pub mod devices;
pub mod plugin;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::kube::MANAGED_BY;
use crate::operands::{self, Operand};
use crate::report::RevertReport;
use crate::state::{
    CapabilityChange, Change, ErrorKind, MakeContext, Observation, Outcome, RevertContext,
    StateContext, StateError, json_fields,
};
use devices::DraDevice;

/// The driver's name, NVIDIA's: claims and DeviceClasses written for
/// NVIDIA's DRA driver select gpuprov's devices unchanged.
pub const DRIVER: &str = "gpu.nvidia.com";
/// What this node published, for the plugin.
pub const PUBLISHED: &str = "/var/lib/gpuprov/dra/devices.json";
/// The taint a device with a recent critical error carries in its slice.
pub const XID_TAINT: &str = "gpu.nvidia.com/xid";
/// The most devices one ResourceSlice may hold (`ResourceSliceMaxDevices`).
const MAX_DEVICES: usize = 128;

/// The node's published devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    /// The pool: the node's name.
    pub pool: String,
    pub driver_version: String,
    pub devices: Vec<DraDevice>,
}

impl Published {
    pub fn read(host: &crate::host::Host) -> Result<Option<Published>, String> {
        let Some(text) = host
            .read(PUBLISHED)
            .map_err(|e| crate::error_chain::error_chain(&e))?
        else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{PUBLISHED} is not a record gpuprov wrote: {e}"))
    }
}

/// The `device-plugin` state in DRA mode.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    // NVIDIA's device plugin leaves: its static pod goes, and its deploy
    // label is not published.
    let mut changes = operands::withdraw(ctx, Operand::DevicePlugin)?;
    // A GPU fallen off the bus leaves the pool; the others stay.
    let (inventory, lost) = match ctx.facts.nvml_without_lost(ctx.host) {
        Ok(found) => found,
        Err(problem) => {
            return Ok(Observation::new(
                Outcome::Failed,
                format!("DRA publishes NVML's GPUs, and NVML cannot be read: {problem}"),
            ));
        }
    };
    let inventory = inventory.as_ref();
    let migs = crate::cdi::mig_devices(ctx, inventory)?;
    let found = devices::devices(ctx.host, inventory, &migs);
    if found.devices.len() > MAX_DEVICES {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "{} devices, more than the {MAX_DEVICES} one ResourceSlice holds",
                found.devices.len()
            ),
        ));
    }
    let entries = with_taints(ctx, &found);
    let mut shown = describe(&found.devices);
    if !lost.is_empty() {
        let lost: Vec<String> = lost.iter().map(u32::to_string).collect();
        shown.push_str(&format!(
            " (NVML reports GPU {} lost: not offered)",
            lost.join(", ")
        ));
    }
    let Some(cluster) = ctx.cluster else {
        let mut obs = Observation::new(
            Outcome::Failed,
            format!(
                "devicePlugin.mode dra needs an API server (ResourceSlices, ResourceClaims); it would publish {shown}"
            ),
        );
        obs.details = json!({ "devices": entries });
        return Ok(obs);
    };
    let node = cluster.node.clone();
    let published = Published {
        pool: node.clone(),
        driver_version: inventory.driver_version.clone(),
        devices: found.devices.clone(),
    };
    let slices = cluster
        .resource_slices(DRIVER)
        .map_err(|e| StateError::new(ErrorKind::Transient, crate::error_chain::error_chain(&e)))?;
    let (ours, theirs): (Vec<&Value>, Vec<&Value>) = slices.iter().partition(|s| is_ours(s));
    if let Some(foreign) = theirs.first() {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "ResourceSlice {} publishes {DRIVER} devices for this node and gpuprov did not write it (NVIDIA's DRA driver runs here?): gpuprov publishes none beside it",
                foreign["metadata"]["name"].as_str().unwrap_or("?")
            ),
        ));
    }
    for extra in ours.iter().skip(1) {
        changes.push(Change::own(DeleteSlice::of(extra)));
    }
    let current = ours.first().copied();
    let generation = current
        .and_then(|s| s["spec"]["pool"]["generation"].as_i64())
        .unwrap_or(0);
    let changed = match current {
        Some(current) => differs(current, &node, &entries),
        None => true,
    };
    if Published::read(ctx.host).ok().flatten().as_ref() != Some(&published) {
        changes.push(Change::WriteFile {
            path: PUBLISHED.to_string(),
            content: serde_json::to_vec_pretty(&published).expect("serializes"),
            mode: 0o644,
            purpose: "the devices published, which the DRA plugin prepares claims against"
                .to_string(),
            diff: None,
        });
    }
    if changed {
        let slice = slice(
            &node,
            ctx.facts.node_uid.as_deref(),
            generation.saturating_add(1),
            &entries,
        );
        changes.push(Change::own(PublishSlice {
            name: current.and_then(|c| c["metadata"]["name"].as_str().map(str::to_string)),
            resource_version: current.and_then(|c| {
                c["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string)
            }),
            pool: node.clone(),
            generation: generation.saturating_add(1),
            devices: found.devices.iter().map(|d| d.name.clone()).collect(),
            shown: shown.clone(),
            registration_socket: plugin::registration_socket(ctx.spec),
            slice,
        }));
    }
    let (outcome, reason) = match plugin::serving(ctx.host, ctx.spec) {
        Ok(registration) if registration.registered => (
            Outcome::Ready,
            format!("published {shown}; the kubelet registered the DRA plugin"),
        ),
        Ok(registration) if !registration.error.is_empty() => (
            Outcome::Failed,
            format!("the kubelet refused the DRA plugin: {}", registration.error),
        ),
        Ok(_) => (
            Outcome::Pending,
            format!(
                "waiting for the kubelet to register the DRA plugin at {}; {shown}",
                plugin::registration_socket(ctx.spec)
            ),
        ),
        Err(why) => (Outcome::Pending, format!("{why}; {shown}")),
    };
    let mut obs = Observation::new(outcome, reason);
    if !changes.is_empty() {
        obs.on_change = outcome;
        if obs.outcome == Outcome::Ready {
            obs.outcome = Outcome::Pending;
        }
    }
    obs.changes = changes;
    obs.details = json!({ "devices": found.devices.len() });
    Ok(obs)
}

/// What the other mode, or a disabled state, takes away: the slices
/// gpuprov published (known from its record: a node that never published
/// asks the API server nothing).
pub fn withdraw(ctx: &StateContext) -> Result<Vec<Change>, StateError> {
    if !ctx.host.exists(PUBLISHED)? {
        return Ok(Vec::new());
    }
    let mut changes = Vec::new();
    if let Some(cluster) = ctx.cluster {
        let slices = cluster.resource_slices(DRIVER).map_err(|e| {
            StateError::new(ErrorKind::Transient, crate::error_chain::error_chain(&e))
        })?;
        for slice in slices.iter().filter(|s| is_ours(s)) {
            changes.push(Change::own(DeleteSlice::of(slice)));
        }
    }
    changes.push(Change::RemoveFile {
        path: PUBLISHED.to_string(),
        purpose: "DRA's record of the devices published: DRA is off".to_string(),
    });
    Ok(changes)
}

/// `revert`: the claims' CDI specs and records, and what was published
/// (the kubelet deletes the slices once the plugin is gone).
pub fn revert(ctx: &RevertContext, report: &mut RevertReport) -> Result<(), StateError> {
    for name in ctx.host.list_dir(plugin::claims::CLAIMS_DIR)? {
        if let Some(uid) = name.strip_suffix(".json")
            && let Some(spec) = plugin::claims::remove_claim(ctx.host, ctx.spec, uid)?
        {
            report.cdi_specs_removed.push(spec);
        }
    }
    ctx.host.remove(PUBLISHED)?;
    Ok(())
}

fn is_ours(slice: &Value) -> bool {
    slice["metadata"]["labels"][MANAGED_BY.0].as_str() == Some(MANAGED_BY.1)
}

/// `8 devices: gpu-0 … gpu-7`.
fn describe(devices: &[DraDevice]) -> String {
    match devices {
        [] => "no devices (no GPU, or MIG on without MIG devices)".to_string(),
        [one] => format!("1 device: {}", one.name),
        [first, .., last] => format!("{} devices: {} … {}", devices.len(), first.name, last.name),
    }
}

/// The slices' device entries, a device whose GPU had a recent critical
/// error tainted (`gpu.nvidia.com/xid=<xid>:NoSchedule`): the scheduler
/// puts no new claim on it (where the cluster has device taints, beta in
/// 1.36).
fn with_taints(ctx: &StateContext, found: &devices::Devices) -> Vec<Value> {
    let errors = if ctx.spec.health.xids {
        crate::gpu::xid::recent(ctx.host, ctx.spec.health.recover_after_seconds)
    } else {
        Vec::new()
    };
    found
        .devices
        .iter()
        .zip(&found.entries)
        .map(|(device, entry)| {
            let mut entry = entry.clone();
            if let Some(error) = errors.iter().rev().find(|e| e.uuid == device.gpu) {
                entry["taints"] = json!([{
                    "key": XID_TAINT,
                    "value": error.xid.to_string(),
                    "effect": "NoSchedule",
                }]);
            }
            entry
        })
        .collect()
}

/// The node's slice: one pool, named after the node, owned by the Node
/// (so it goes with it).
fn slice(node: &str, node_uid: Option<&str>, generation: i64, entries: &[Value]) -> Value {
    let mut metadata = json!({
        "generateName": format!("{node}-{DRIVER}-"),
        "labels": {MANAGED_BY.0: MANAGED_BY.1},
    });
    if let Some(uid) = node_uid {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "v1",
            "kind": "Node",
            "name": node,
            "uid": uid,
            "controller": true,
        }]);
    }
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": metadata,
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": entries,
        },
    })
}

/// Whether the slice as the server has it (or as gpuprov sent it) says
/// other than `entries` for `node`.
fn differs(current: &Value, node: &str, entries: &[Value]) -> bool {
    let spec = &current["spec"];
    let devices = spec["devices"].as_array().cloned().unwrap_or_default();
    spec["driver"].as_str() != Some(DRIVER)
        || spec["nodeName"].as_str() != Some(node)
        || spec["pool"]["name"].as_str() != Some(node)
        || spec["pool"]["resourceSliceCount"].as_i64() != Some(1)
        || devices::canonical_entries(&devices) != devices::canonical_entries(entries)
}

/// Publish the node's devices: the slice replaced at the version read
/// (another writer since: read again and write once more), or created.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishSlice {
    /// The existing slice's name; none: a new one.
    pub name: Option<String>,
    #[serde(skip)]
    pub resource_version: Option<String>,
    pub pool: String,
    pub generation: i64,
    pub devices: Vec<String>,
    #[serde(skip)]
    pub shown: String,
    /// The plugin's registration socket, which must answer first.
    #[serde(skip)]
    pub registration_socket: String,
    /// The ResourceSlice as it would be written.
    pub slice: Value,
}

impl CapabilityChange for PublishSlice {
    fn kind(&self) -> &'static str {
        "resource-slice"
    }

    fn summary(&self) -> String {
        match &self.name {
            Some(name) => format!(
                "update ResourceSlice {name} (pool {}, generation {}): {}",
                self.pool, self.generation, self.shown
            ),
            None => format!(
                "publish a ResourceSlice for {DRIVER} (pool {}, generation {}): {}",
                self.pool, self.generation, self.shown
            ),
        }
    }

    fn fields(&self) -> Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        let cluster = on.cluster.ok_or_else(|| {
            StateError::operator("publishing a ResourceSlice needs an API server".to_string())
        })?;
        // Slices attract claims: none while no plugin could prepare them.
        if !plugin::answers(on.host, &self.registration_socket) {
            return Err(StateError::new(
                ErrorKind::Transient,
                format!(
                    "not published: no DRA kubelet plugin answers at {}, and `gpuprov run` serves it",
                    self.registration_socket
                ),
            ));
        }
        let transient = |e: crate::kube::KubeError| {
            StateError::new(ErrorKind::Transient, crate::error_chain::error_chain(&e))
        };
        let mut slice = self.slice.clone();
        if let (Some(name), Some(version)) = (&self.name, &self.resource_version) {
            slice["metadata"]["name"] = json!(name);
            slice["metadata"]["resourceVersion"] = json!(version);
            if cluster
                .replace_resource_slice(name, &slice)
                .map_err(transient)?
                .is_ok()
            {
                return Ok(());
            }
            // Someone else wrote it since it was read: publish over what
            // is there now, at its next generation.
            let now = cluster.resource_slices(DRIVER).map_err(transient)?;
            let Some(current) = now
                .iter()
                .find(|s| is_ours(s) && s["metadata"]["name"].as_str() == Some(name.as_str()))
            else {
                slice["metadata"] = self.slice["metadata"].clone();
                cluster.create_resource_slice(&slice).map_err(transient)?;
                return Ok(());
            };
            slice["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
            slice["spec"]["pool"]["generation"] = json!(
                current["spec"]["pool"]["generation"]
                    .as_i64()
                    .unwrap_or(0)
                    .saturating_add(1)
            );
            return match cluster
                .replace_resource_slice(name, &slice)
                .map_err(transient)?
            {
                Ok(_) => Ok(()),
                Err(_) => Err(StateError::new(
                    ErrorKind::Transient,
                    format!("ResourceSlice {name} keeps changing under gpuprov; next converge"),
                )),
            };
        }
        cluster.create_resource_slice(&slice).map_err(transient)?;
        Ok(())
    }
}

/// Delete one of gpuprov's slices (a second one, or all of them when DRA
/// is off).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteSlice {
    pub name: String,
    #[serde(skip)]
    pub uid: Option<String>,
}

impl DeleteSlice {
    fn of(slice: &Value) -> DeleteSlice {
        DeleteSlice {
            name: slice["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            uid: slice["metadata"]["uid"].as_str().map(str::to_string),
        }
    }
}

impl CapabilityChange for DeleteSlice {
    fn kind(&self) -> &'static str {
        "resource-slice-delete"
    }

    fn summary(&self) -> String {
        format!(
            "delete ResourceSlice {} (gpuprov's {DRIVER} devices)",
            self.name
        )
    }

    fn fields(&self) -> Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        let cluster = on.cluster.ok_or_else(|| {
            StateError::operator("deleting a ResourceSlice needs an API server".to_string())
        })?;
        cluster
            .delete_resource_slice(&self.name, self.uid.as_deref())
            .map_err(|e| StateError::new(ErrorKind::Transient, crate::error_chain::error_chain(&e)))
    }
}
