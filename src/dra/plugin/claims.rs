//! Preparing and unpreparing claims: `NodePrepareResources` reads the
//! claim's allocation from the API server, checks every device it names
//! against what this node published and what other claims hold, writes a
//! CDI spec for exactly those devices and records the claim;
//! `NodeUnprepareResources` removes both. Each claim's record is a file of
//! its own under `/var/lib/gpuprov/dra/claims/`, written after its spec,
//! so a restart between the two calls loses nothing and a repeated call
//! answers as the first did.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::messages;
use crate::cdi::document::{self, Device as CdiDevice};
use crate::dra::{DRIVER, Published, devices::DraDevice};
use crate::host::{Host, HostError};
use crate::kube::Cluster;
use crate::spec::Spec;

/// Where each prepared claim is recorded, one file per claim UID.
pub const CLAIMS_DIR: &str = "/var/lib/gpuprov/dra/claims";
/// The CDI vendor and class of the claims' devices, as NVIDIA's driver
/// names them (`k8s.gpu.nvidia.com/claim=<uid>-gpu-0`).
pub const CDI_KIND: &str = "k8s.gpu.nvidia.com/claim";
/// How a claim's CDI spec begins: how gpuprov knows its own.
pub const SPEC_MARKER: &str = "# Written by gpuprov (a DRA claim)";
/// More claims than this recorded at once is a host gpuprov does not read
/// further (each pod with a GPU has one or a few).
const MAX_CLAIMS: usize = 4096;

/// A claim as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// A prepared claim, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prepared {
    pub claim: ClaimRef,
    pub devices: Vec<PreparedDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    pub device: String,
    pub pool: String,
    pub requests: Vec<String>,
    pub cdi_device_id: String,
    /// Allocated with admin access or as a share of its capacity: other
    /// claims may hold it too.
    pub shared: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
}

impl Prepared {
    /// The kubelet's answer for this claim.
    pub fn answer(&self) -> Vec<messages::Device> {
        self.devices
            .iter()
            .map(|d| messages::Device {
                request_names: d.requests.clone(),
                pool_name: d.pool.clone(),
                device_name: d.device.clone(),
                cdi_device_ids: vec![d.cdi_device_id.clone()],
                share_id: d.share_id.clone(),
            })
            .collect()
    }
}

/// What preparing needs: the node, its spec, the API server, and the
/// lock that makes taking devices one step.
pub struct Preparer<'a> {
    pub host: &'a Host,
    pub spec: &'a Spec,
    pub cluster: &'a Cluster,
    pub claims: &'a std::sync::Mutex<()>,
}

impl Preparer<'_> {
    /// Prepares a claim (again: the recorded answer, its spec rewritten if
    /// it went).
    pub fn prepare(&self, claim: &ClaimRef) -> Result<Prepared, String> {
        check_claim(claim)?;
        if let Some(prepared) = self.prepared_before(claim)? {
            return Ok(prepared);
        }
        // Read outside the lock: another claim's call need not wait on it.
        let object = self
            .cluster
            .resource_claim(&claim.namespace, &claim.name)
            .map_err(|e| crate::error_chain::error_chain(&e))?
            .ok_or_else(|| format!("ResourceClaim {claim} does not exist"))?;
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        if uid != claim.uid {
            return Err(format!(
                "ResourceClaim {}/{} has UID {uid}, not {} (it was deleted and made again)",
                claim.namespace, claim.name, claim.uid
            ));
        }
        let _taking = self
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The same claim, prepared by a call that held the lock meanwhile.
        if let Some(prepared) = self.prepared_before(claim)? {
            return Ok(prepared);
        }
        let published = Published::read(self.host)?.ok_or_else(|| {
            "this node has published no devices yet (the device-plugin state has not run)"
                .to_string()
        })?;
        let devices = self.allocated(claim, &object, &published)?;
        self.check_not_held(claim, &devices)?;
        let prepared = Prepared {
            claim: claim.clone(),
            devices,
        };
        self.write_spec(&prepared)?;
        let record = serde_json::to_vec_pretty(&prepared).expect("serializes");
        self.host
            .make_dirs(CLAIMS_DIR)
            .and_then(|()| {
                self.host
                    .write_atomic(&record_path(&claim.uid), &record, 0o600)
            })
            .and_then(|_| self.host.make_durable())
            .map_err(|e| crate::error_chain::error_chain(&e))?;
        Ok(prepared)
    }

    /// The claim's recorded answer, its spec written again if it went.
    fn prepared_before(&self, claim: &ClaimRef) -> Result<Option<Prepared>, String> {
        let Some(prepared) = self.recorded(&claim.uid)? else {
            return Ok(None);
        };
        if prepared.claim != *claim {
            return Err(format!(
                "claim UID {} is recorded as {}, and the kubelet names it {claim}",
                claim.uid, prepared.claim
            ));
        }
        self.write_spec(&prepared)?;
        Ok(Some(prepared))
    }

    /// Unprepares a claim: its spec, then its record. One not prepared
    /// here is done already.
    pub fn unprepare(&self, claim: &ClaimRef) -> Result<(), String> {
        check_claim(claim)?;
        let _taking = self
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        remove_claim(self.host, self.spec, &claim.uid)
            .and_then(|_| self.host.make_durable())
            .map_err(|e| crate::error_chain::error_chain(&e))
    }

    /// Every prepared claim, by UID.
    pub fn all_recorded(&self) -> Result<BTreeMap<String, Prepared>, String> {
        let names = self
            .host
            .list_dir(CLAIMS_DIR)
            .map_err(|e| crate::error_chain::error_chain(&e))?;
        if names.len() > MAX_CLAIMS {
            return Err(format!(
                "{CLAIMS_DIR} holds {} entries, more than the {MAX_CLAIMS} gpuprov reads",
                names.len()
            ));
        }
        let mut all = BTreeMap::new();
        for name in names {
            let Some(uid) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some(prepared) = self.recorded(uid)? {
                all.insert(uid.to_string(), prepared);
            }
        }
        Ok(all)
    }

    fn recorded(&self, uid: &str) -> Result<Option<Prepared>, String> {
        let path = record_path(uid);
        let Some(text) = self
            .host
            .read(&path)
            .map_err(|e| crate::error_chain::error_chain(&e))?
        else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{path} is not a record gpuprov wrote: {e}"))
    }

    /// The claim's devices of this driver, each checked against what this
    /// node published.
    fn allocated(
        &self,
        claim: &ClaimRef,
        object: &Value,
        published: &Published,
    ) -> Result<Vec<PreparedDevice>, String> {
        let results = object["status"]["allocation"]["devices"]["results"]
            .as_array()
            .ok_or_else(|| format!("ResourceClaim {claim} is not allocated"))?;
        let known = crate::dra::devices::by_name(&published.devices);
        let mut devices: Vec<PreparedDevice> = Vec::new();
        for result in results {
            if result["driver"].as_str() != Some(DRIVER) {
                continue;
            }
            let text = |key: &str| result[key].as_str().unwrap_or_default().to_string();
            let (pool, device, request) = (text("pool"), text("device"), text("request"));
            if pool != published.pool {
                return Err(format!(
                    "ResourceClaim {claim} is allocated {device} from pool `{pool}`, and this node's pool is `{}`",
                    published.pool
                ));
            }
            if !known.contains_key(device.as_str()) {
                let names: Vec<&str> = known.keys().copied().collect();
                return Err(format!(
                    "ResourceClaim {claim} is allocated device `{device}`, which this node does not have (it has {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ));
            }
            let share_id = result["shareID"].as_str().map(str::to_string);
            let shared = result["adminAccess"].as_bool() == Some(true) || share_id.is_some();
            match devices.iter_mut().find(|d| d.device == device) {
                Some(seen) => {
                    if !seen.requests.contains(&request) {
                        seen.requests.push(request);
                    }
                }
                None => devices.push(PreparedDevice {
                    cdi_device_id: format!("{CDI_KIND}={}-{device}", claim.uid),
                    device,
                    pool,
                    requests: vec![request],
                    shared,
                    share_id,
                }),
            }
        }
        if devices.is_empty() {
            return Err(format!(
                "ResourceClaim {claim} is allocated no device of {DRIVER}"
            ));
        }
        Ok(devices)
    }

    /// A device another claim holds, unless both may share it.
    fn check_not_held(&self, claim: &ClaimRef, devices: &[PreparedDevice]) -> Result<(), String> {
        for (uid, other) in self.all_recorded()? {
            if uid == claim.uid {
                continue;
            }
            for held in &other.devices {
                if let Some(wanted) = devices.iter().find(|d| d.device == held.device)
                    && !(wanted.shared && held.shared)
                {
                    return Err(format!(
                        "device {} is prepared for claim {} already, and neither claim shares it",
                        held.device, other.claim
                    ));
                }
            }
        }
        Ok(())
    }

    /// The claim's CDI spec, written when it is not there as it should be.
    fn write_spec(&self, prepared: &Prepared) -> Result<(), String> {
        let published = Published::read(self.host)?.ok_or_else(|| {
            "this node has published no devices yet (the device-plugin state has not run)"
                .to_string()
        })?;
        let known = crate::dra::devices::by_name(&published.devices);
        let error = |e: crate::host::HostError| crate::error_chain::error_chain(&e);
        let files = crate::cdi::driver_files::find(self.host, &published.driver_version)
            .map_err(error)?
            .map_err(|missing| {
                format!(
                    "no CDI spec for driver {}: {missing}",
                    published.driver_version
                )
            })?;
        let hook = crate::toolkit::ctk_binary(self.host, self.spec).map_err(error)?;
        let minors = crate::cdi::mig_minors(self.host).map_err(error)?;
        let mut cdi_devices = Vec::new();
        for prepared_device in &prepared.devices {
            let device: &DraDevice =
                known.get(prepared_device.device.as_str()).ok_or_else(|| {
                    format!(
                        "device {} of claim {} is no longer published on this node",
                        prepared_device.device, prepared.claim
                    )
                })?;
            let edits = match device.mig {
                None => document::gpu_edits(device.minor),
                Some((gi, ci)) => {
                    let mut missing = Vec::new();
                    let caps = crate::cdi::mig_caps(
                        self.host,
                        &minors,
                        device.minor,
                        gi,
                        ci,
                        &mut missing,
                    )
                    .map_err(error)?
                    .ok_or_else(|| format!("MIG device {}: {}", device.name, missing.join("; ")))?;
                    document::mig_edits(device.minor, &caps)
                }
            };
            cdi_devices.push(CdiDevice {
                name: format!("{}-{}", prepared.claim.uid, device.name),
                container_edits: edits,
            });
        }
        let document = document::claim_spec(CDI_KIND, cdi_devices, &files, &hook);
        let header = format!(
            "{SPEC_MARKER} for claim {}/{}; removed when the kubelet unprepares it.\n",
            prepared.claim.namespace, prepared.claim.name
        );
        let text = document::render_with(&header, &document)?;
        let path = spec_path(self.spec, &prepared.claim.uid);
        match self.host.read(&path).map_err(error)? {
            Some(current) if current == text => return Ok(()),
            Some(current) if !current.starts_with(SPEC_MARKER) => {
                return Err(format!(
                    "{path} exists and gpuprov did not write it; it is left alone"
                ));
            }
            _ => {}
        }
        self.host
            .make_dirs(&self.spec.cdi.spec_dir)
            .and_then(|()| self.host.write_atomic(&path, text.as_bytes(), 0o644))
            .and_then(|_| self.host.make_durable())
            .map_err(error)
    }
}

/// Removes what preparing a claim left: its CDI spec (only if gpuprov
/// wrote it), then its record. The spec's path when it was removed.
pub fn remove_claim(host: &Host, spec: &Spec, uid: &str) -> Result<Option<String>, HostError> {
    let path = spec_path(spec, uid);
    let ours = host
        .read(&path)?
        .is_some_and(|text| text.starts_with(SPEC_MARKER));
    if ours {
        host.remove(&path)?;
    }
    host.remove(&record_path(uid))?;
    Ok(ours.then_some(path))
}

/// The claim's CDI spec file, named as CDI names transient specs.
pub fn spec_path(spec: &Spec, uid: &str) -> String {
    format!("{}/k8s.gpu.nvidia.com-claim_{uid}.yaml", spec.cdi.spec_dir)
}

fn record_path(uid: &str) -> String {
    format!("{CLAIMS_DIR}/{uid}.json")
}

/// A claim's names become a file name and a request path: a UID of
/// letters, digits and dashes, names as Kubernetes allows them.
fn check_claim(claim: &ClaimRef) -> Result<(), String> {
    let uid_ok = !claim.uid.is_empty()
        && claim.uid.len() <= 64
        && claim
            .uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let name_ok = |name: &str| {
        !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !uid_ok {
        return Err(format!(
            "claim UID `{}` is not a UID",
            crate::printable::printable(&claim.uid, false)
        ));
    }
    if !name_ok(&claim.namespace) || !name_ok(&claim.name) {
        return Err(format!(
            "claim `{}/{}` is not a namespace and name Kubernetes allows",
            crate::printable::printable(&claim.namespace, false),
            crate::printable::printable(&claim.name, false)
        ));
    }
    Ok(())
}
