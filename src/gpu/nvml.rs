//! The GPUs as the driver sees them, through NVML (nvml-wrapper).
//!
//! The library is the host's own `libnvidia-ml.so.1`, looked up in the
//! directories drivers install it to under the host root, or the one named
//! by `--nvml-lib`. NVML errors become problems a person can act on: no
//! library, driver not loaded, no permission, a GPU lost, or unknown.

use std::path::{Path, PathBuf};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use serde::Serialize;

use crate::host::Host;

/// Where drivers install `libnvidia-ml.so.1`, relative to the host root.
pub const LIBRARY_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "lib64",
    "usr/local/nvidia/lib64",
    "run/nvidia/driver/usr/lib/x86_64-linux-gnu",
    "run/nvidia/driver/usr/lib64",
];
pub const LIBRARY: &str = "libnvidia-ml.so.1";

/// What NVML says about the node.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub library: String,
    pub driver_version: String,
    /// `12.4`: the newest CUDA the driver supports.
    pub cuda_driver_version: String,
    pub devices: Vec<NvmlDevice>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NvmlDevice {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    /// NVML's form, `00000000:18:00.0`.
    pub pci_bus_id: String,
    pub memory_total_mib: u64,
    pub compute_capability: (i32, i32),
    pub mig_capable: bool,
    pub mig_enabled: bool,
    pub mig_pending: bool,
    pub persistence_mode: bool,
    /// The minor number of its device node, `/dev/nvidia<minor>`.
    pub minor_number: u32,
    /// Its NVLink fabric membership, once the fabric manager has
    /// registered it (GB200 NVL and the like); GFD's `gpu.clique`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fabric: Option<Fabric>,
    /// Where its registration with the NVLink fabric stands (Hopper and
    /// later on NVSwitch systems); absent where NVML does not report it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fabric_state: Option<FabricState>,
    /// NVML's brand and architecture, in go-nvlib's words (`Nvidia`,
    /// `Hopper`): NVIDIA's DRA driver publishes them as attributes.
    pub brand: String,
    pub architecture: String,
}

/// A GPU's NVLink fabric registration, as `nvmlDeviceGetGpuFabricInfo`
/// reports it: the fabric manager registers each GPU once it has
/// trained the NVLinks, and CUDA starts only after that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "error")]
pub enum FabricState {
    NotStarted,
    InProgress,
    Completed,
    /// Completed with an error: the NVML return code's text.
    Failed(String),
}

/// A GPU's place in an NVLink fabric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fabric {
    pub cluster_uuid: String,
    pub clique_id: u32,
}

impl NvmlDevice {
    /// The bus id as sysfs writes it: `0000:18:00.0`, lower case.
    pub fn sysfs_address(&self) -> String {
        let id = self.pci_bus_id.to_lowercase();
        match id.split_once(':') {
            Some((domain, rest)) if domain.len() > 4 => {
                format!("{}:{rest}", &domain[domain.len() - 4..])
            }
            _ => id,
        }
    }
}

/// Why there is no inventory, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "problem", rename_all = "kebab-case")]
pub enum NvmlProblem {
    #[error("NVML library not found: no {LIBRARY} in the host's library directories")]
    LibraryNotFound,
    #[error("NVML cannot be loaded from {library}: {reason}")]
    LibraryUnusable { library: String, reason: String },
    #[error("driver not loaded: NVML found no NVIDIA kernel driver ({library})")]
    DriverNotLoaded { library: String },
    #[error("no permission to use the GPUs through NVML ({library}); run privileged or as root")]
    NoPermission { library: String },
    #[error("GPU {index} is lost (fell off the bus or is inaccessible); {what} failed")]
    GpuLost { index: u32, what: String },
    #[error("NVML failed: {what}: {reason}")]
    Unknown { what: String, reason: String },
}

/// The NVML library to use: `explicit`, or the host's own.
pub fn find_library(host: &Host, explicit: Option<&Path>) -> Result<PathBuf, NvmlProblem> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    // Only a regular file (after links) is a candidate: dlopen on a FIFO
    // would block, and on a device do whatever opening it does.
    LIBRARY_DIRS
        .iter()
        .map(|dir| format!("/{dir}/{LIBRARY}"))
        .filter(|path| host.is_file(path).unwrap_or(false))
        .find_map(|path| host.resolve(&path).ok())
        .ok_or(NvmlProblem::LibraryNotFound)
}

/// NVML loaded from `library` and initialised: a regular file, and a
/// library whose loading does not panic nvml-wrapper.
pub fn open(library: &Path) -> Result<Nvml, NvmlProblem> {
    let shown = library.display().to_string();
    match std::fs::metadata(library) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(NvmlProblem::LibraryUnusable {
                library: shown,
                reason: "not a regular file".to_string(),
            });
        }
        Err(e) => {
            return Err(NvmlProblem::LibraryUnusable {
                library: shown,
                reason: e.to_string(),
            });
        }
    }
    // nvml-wrapper loads every symbol lazily and panics when a function the
    // library lacks is called; an older driver's or a broken install's
    // library is checked by the callers first, and nothing it lacks is
    // called.
    let nvml = std::panic::catch_unwind(|| init(library)).unwrap_or_else(|_| {
        Err(NvmlProblem::LibraryUnusable {
            library: shown.clone(),
            reason: "nvml-wrapper panicked while loading it".to_string(),
        })
    })?;
    if nvml.lib().nvmlShutdown.is_err() {
        // Dropping it would call the missing nvmlShutdown, and panic.
        std::mem::forget(nvml);
        return Err(NvmlProblem::LibraryUnusable {
            library: shown,
            reason: "it lacks nvmlShutdown (an older driver's library, or a broken install)"
                .to_string(),
        });
    }
    Ok(nvml)
}

/// Everything NVML reports about the node's GPUs; a GPU that is lost is
/// an error.
pub fn inventory(library: &Path) -> Result<Inventory, NvmlProblem> {
    read_inventory(library, false).map(|(inventory, _)| inventory)
}

/// The GPUs NVML can still read, and the indexes of those it reports lost
/// (fallen off the bus): what a DRA driver offers while one is gone.
pub fn inventory_without_lost(library: &Path) -> Result<(Inventory, Vec<u32>), NvmlProblem> {
    read_inventory(library, true)
}

fn read_inventory(library: &Path, skip_lost: bool) -> Result<(Inventory, Vec<u32>), NvmlProblem> {
    let shown = library.display().to_string();
    let nvml = open(library)?;
    let lib = nvml.lib();
    let missing: Vec<&str> = [
        (
            "nvmlSystemGetDriverVersion",
            lib.nvmlSystemGetDriverVersion.is_ok(),
        ),
        ("nvmlDeviceGetCount_v2", lib.nvmlDeviceGetCount_v2.is_ok()),
        (
            "nvmlDeviceGetHandleByIndex_v2",
            lib.nvmlDeviceGetHandleByIndex_v2.is_ok(),
        ),
        ("nvmlDeviceGetName", lib.nvmlDeviceGetName.is_ok()),
        ("nvmlDeviceGetUUID", lib.nvmlDeviceGetUUID.is_ok()),
        (
            "nvmlDeviceGetPciInfo_v3",
            lib.nvmlDeviceGetPciInfo_v3.is_ok(),
        ),
        (
            "nvmlDeviceGetCudaComputeCapability",
            lib.nvmlDeviceGetCudaComputeCapability.is_ok(),
        ),
        (
            "nvmlSystemGetCudaDriverVersion",
            lib.nvmlSystemGetCudaDriverVersion_v2.is_ok()
                || lib.nvmlSystemGetCudaDriverVersion.is_ok(),
        ),
        (
            "nvmlDeviceGetMemoryInfo",
            lib.nvmlDeviceGetMemoryInfo_v2.is_ok() || lib.nvmlDeviceGetMemoryInfo.is_ok(),
        ),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Err(NvmlProblem::LibraryUnusable {
            library: shown,
            reason: format!(
                "it lacks {} (an older driver's library, or a broken install)",
                missing.join(", ")
            ),
        });
    }
    let has_mig_mode = lib.nvmlDeviceGetMigMode.is_ok();
    let has_persistence_mode = lib.nvmlDeviceGetPersistenceMode.is_ok();
    let driver_version = nvml
        .sys_driver_version()
        .map_err(|e| unknown("the driver version", e))?;
    let cuda = cuda_driver_version(&nvml).map_err(|e| unknown("the CUDA driver version", e))?;
    let count = nvml
        .device_count()
        .map_err(|e| unknown("the device count", e))?;
    let mut devices = Vec::new();
    let mut lost_gpus = Vec::new();
    for index in 0..count {
        match read_device(&nvml, index, has_mig_mode, has_persistence_mode) {
            Ok(device) => devices.push(device),
            Err(NvmlProblem::GpuLost { index, .. }) if skip_lost => lost_gpus.push(index),
            Err(problem) => return Err(problem),
        }
    }
    Ok((
        Inventory {
            library: shown,
            driver_version,
            cuda_driver_version: format!("{}.{}", cuda / 1000, (cuda % 1000) / 10),
            devices,
        },
        lost_gpus,
    ))
}

/// One GPU's answers.
fn read_device(
    nvml: &Nvml,
    index: u32,
    has_mig_mode: bool,
    has_persistence_mode: bool,
) -> Result<NvmlDevice, NvmlProblem> {
    let lost = |what: &str| {
        let what = what.to_string();
        move |e: NvmlError| match e {
            NvmlError::GpuLost => NvmlProblem::GpuLost {
                index,
                what: what.clone(),
            },
            other => unknown(&format!("GPU {index}: {what}"), other),
        }
    };
    let device = nvml.device_by_index(index).map_err(lost("its handle"))?;
    let (mig_capable, mig_enabled, mig_pending) = match has_mig_mode.then(|| device.mig_mode()) {
        Some(Ok(mode)) => (true, mode.current == 1, mode.pending == 1),
        None | Some(Err(NvmlError::NotSupported)) => (false, false, false),
        Some(Err(e)) => return Err(lost("its MIG mode")(e)),
    };
    let persistence_mode = match has_persistence_mode.then(|| device.is_in_persistent_mode()) {
        Some(Ok(enabled)) => enabled,
        None | Some(Err(NvmlError::NotSupported)) => false,
        Some(Err(e)) => return Err(lost("its persistence mode")(e)),
    };
    // Every driver NVIDIA ships answers this; a library that cannot is
    // taken to number its nodes by index, as drivers do by default.
    let minor_number = match device.minor_number() {
        Ok(minor) => minor,
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => index,
        Err(e) => return Err(lost("its minor number")(e)),
    };
    let fabric = fabric(nvml, &device);
    let capability = device
        .cuda_compute_capability()
        .map_err(lost("its compute capability"))?;
    Ok(NvmlDevice {
        index,
        name: device.name().map_err(lost("its name"))?,
        uuid: device.uuid().map_err(lost("its UUID"))?,
        pci_bus_id: device.pci_info().map_err(lost("its PCI info"))?.bus_id,
        memory_total_mib: memory_total(nvml, &device).map_err(lost("its memory size"))?
            / (1024 * 1024),
        compute_capability: (capability.major, capability.minor),
        mig_capable,
        mig_enabled,
        mig_pending,
        persistence_mode,
        minor_number,
        fabric: fabric.1,
        fabric_state: fabric.0,
        brand: brand(nvml, &device),
        architecture: architecture(nvml, &device),
    })
}

/// The CUDA version the driver supports: `_v2` where the library has it,
/// the first version (drivers before R450) otherwise.
fn cuda_driver_version(nvml: &Nvml) -> Result<i32, NvmlError> {
    if nvml.lib().nvmlSystemGetCudaDriverVersion_v2.is_ok() {
        return nvml.sys_cuda_driver_version();
    }
    let mut version = 0;
    let Ok(function) = nvml.lib().nvmlSystemGetCudaDriverVersion.as_ref() else {
        return Err(NvmlError::FunctionNotFound);
    };
    // SAFETY: the symbol is NVML's, with nvml.h's signature; the pointer is
    // to a local that outlives the call.
    nvml_result(unsafe { function(&mut version) })?;
    Ok(version)
}

/// A GPU's total memory in bytes.
pub fn memory_total(nvml: &Nvml, device: &nvml_wrapper::Device<'_>) -> Result<u64, NvmlError> {
    memory_usage(nvml, device).map(|m| m.total)
}

/// A GPU's memory, in bytes: total, free and used.
#[derive(Debug, Clone, Copy)]
pub struct MemoryUsage {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// A GPU's memory: `_v2` where the library has it, the first version
/// (drivers before R510) otherwise.
pub fn memory_usage(
    nvml: &Nvml,
    device: &nvml_wrapper::Device<'_>,
) -> Result<MemoryUsage, NvmlError> {
    if nvml.lib().nvmlDeviceGetMemoryInfo_v2.is_ok() {
        return device.memory_info().map(|m| MemoryUsage {
            total: m.total,
            free: m.free,
            used: m.used,
        });
    }
    let Ok(function) = nvml.lib().nvmlDeviceGetMemoryInfo.as_ref() else {
        return Err(NvmlError::FunctionNotFound);
    };
    let mut memory = nvml_wrapper_sys::bindings::nvmlMemory_t {
        total: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: as above; the handle is the device's own, valid while `nvml`
    // is initialised.
    nvml_result(unsafe { function(device.handle(), &mut memory) })?;
    Ok(MemoryUsage {
        total: memory.total,
        free: memory.free,
        used: memory.used,
    })
}

/// The GPU's fabric registration: where it stands, and its membership
/// as go-nvlib's `IsFabricAttached` takes it (present only when
/// registration completed and succeeded). A library without the
/// function, a GPU that does not support it, or an error is no state (an
/// error is logged).
fn fabric(nvml: &Nvml, device: &nvml_wrapper::Device<'_>) -> (Option<FabricState>, Option<Fabric>) {
    use nvml_wrapper_sys::bindings::{
        NVML_GPU_FABRIC_STATE_COMPLETED, NVML_GPU_FABRIC_STATE_IN_PROGRESS,
        NVML_GPU_FABRIC_STATE_NOT_STARTED, nvmlGpuFabricInfo_t,
    };
    let Ok(function) = nvml.lib().nvmlDeviceGetGpuFabricInfo.as_ref() else {
        return (None, None);
    };
    let mut info = nvmlGpuFabricInfo_t {
        clusterUuid: [0; 16],
        status: 0,
        cliqueId: 0,
        state: 0,
    };
    // SAFETY: NVML's symbol with nvml.h's signature; the handle is the
    // device's own and the pointer is to a local that outlives the call.
    match nvml_result(unsafe { function(device.handle(), &mut info) }) {
        Ok(()) => {}
        Err(NvmlError::NotSupported) => return (None, None),
        Err(e) => {
            tracing::warn!("NVML could not say whether a GPU is on an NVLink fabric: {e}");
            return (None, None);
        }
    }
    let state = match u32::from(info.state) {
        NVML_GPU_FABRIC_STATE_NOT_STARTED => FabricState::NotStarted,
        NVML_GPU_FABRIC_STATE_IN_PROGRESS => FabricState::InProgress,
        NVML_GPU_FABRIC_STATE_COMPLETED if info.status == 0 => FabricState::Completed,
        NVML_GPU_FABRIC_STATE_COMPLETED => FabricState::Failed(
            nvml_result(info.status)
                .err()
                .map_or_else(|| "unknown".to_string(), |e| e.to_string()),
        ),
        // NVML_GPU_FABRIC_STATE_NOT_SUPPORTED, or a state newer than this
        // build knows.
        _ => return (None, None),
    };
    let member = (state == FabricState::Completed).then(|| Fabric {
        cluster_uuid: uuid::Uuid::from_bytes(info.clusterUuid).to_string(),
        clique_id: info.cliqueId,
    });
    (Some(state), member)
}

/// `nvmlDeviceGetBrand` in go-nvlib's words; `Unknown` where the
/// library lacks it or the driver does not say.
fn brand(nvml: &Nvml, device: &nvml_wrapper::Device<'_>) -> String {
    let Ok(function) = nvml.lib().nvmlDeviceGetBrand.as_ref() else {
        return "Unknown".to_string();
    };
    let mut brand = 0;
    // SAFETY: NVML's own symbol with nvml.h's signature; the handle is live
    // while `nvml` is and the pointer is to a local.
    if nvml_result(unsafe { function(device.handle(), &mut brand) }).is_err() {
        return "Unknown".to_string();
    }
    match brand {
        1 => "Quadro",
        2 => "Tesla",
        3 => "NVS",
        4 => "Grid",
        5 => "GeForce",
        6 => "Titan",
        7 => "NvidiaVApps",
        8 => "NvidiaVPC",
        9 => "NvidiaVCS",
        10 => "NvidiaVWS",
        11 => "NvidiaCloudGaming",
        12 => "QuadroRTX",
        13 => "NvidiaRTX",
        14 => "Nvidia",
        15 => "GeForceRTX",
        16 => "TitanRTX",
        _ => "Unknown",
    }
    .to_string()
}

/// `nvmlDeviceGetArchitecture` in go-nvlib's words; `Unknown` where the
/// library lacks it or the driver does not say.
fn architecture(nvml: &Nvml, device: &nvml_wrapper::Device<'_>) -> String {
    let Ok(function) = nvml.lib().nvmlDeviceGetArchitecture.as_ref() else {
        return "Unknown".to_string();
    };
    let mut architecture = 0;
    // SAFETY: as in `brand`.
    if nvml_result(unsafe { function(device.handle(), &mut architecture) }).is_err() {
        return "Unknown".to_string();
    }
    match architecture {
        2 => "Kepler",
        3 => "Maxwell",
        4 => "Pascal",
        5 => "Volta",
        6 => "Turing",
        7 => "Ampere",
        8 => "Ada Lovelace",
        9 => "Hopper",
        10 => "Blackwell",
        13 => "Rubin",
        _ => "Unknown",
    }
    .to_string()
}

fn nvml_result(code: nvml_wrapper_sys::bindings::nvmlReturn_t) -> Result<(), NvmlError> {
    nvml_wrapper::error::nvml_try(code)
}

fn init(library: &Path) -> Result<Nvml, NvmlProblem> {
    let shown = library.display().to_string();
    Nvml::builder()
        .lib_path(library.as_os_str())
        .init()
        .map_err(|e| match e {
            NvmlError::LibloadingError(e) => NvmlProblem::LibraryUnusable {
                library: shown.clone(),
                reason: e.to_string(),
            },
            NvmlError::FailedToLoadSymbol(symbol) => NvmlProblem::LibraryUnusable {
                library: shown.clone(),
                reason: format!(
                    "it lacks nvmlInit_v2 ({symbol}): not an NVML library, or a broken install"
                ),
            },
            NvmlError::DriverNotLoaded => NvmlProblem::DriverNotLoaded {
                library: shown.clone(),
            },
            NvmlError::NoPermission => NvmlProblem::NoPermission {
                library: shown.clone(),
            },
            other => unknown("nvmlInit", other),
        })
}

pub fn unknown(what: &str, e: NvmlError) -> NvmlProblem {
    NvmlProblem::Unknown {
        what: what.to_string(),
        reason: e.to_string(),
    }
}
