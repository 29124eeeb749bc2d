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
    LIBRARY_DIRS
        .iter()
        .filter_map(|dir| host.resolve(&format!("/{dir}/{LIBRARY}")).ok())
        .find(|path| path.exists())
        .ok_or(NvmlProblem::LibraryNotFound)
}

/// Everything NVML reports about the node's GPUs.
pub fn inventory(library: &Path) -> Result<Inventory, NvmlProblem> {
    let shown = library.display().to_string();
    let nvml = Nvml::builder()
        .lib_path(library.as_os_str())
        .init()
        .map_err(|e| match e {
            NvmlError::LibloadingError(e) => NvmlProblem::LibraryUnusable {
                library: shown.clone(),
                reason: e.to_string(),
            },
            NvmlError::DriverNotLoaded => NvmlProblem::DriverNotLoaded {
                library: shown.clone(),
            },
            NvmlError::NoPermission => NvmlProblem::NoPermission {
                library: shown.clone(),
            },
            other => unknown("nvmlInit", other),
        })?;
    let driver_version = nvml
        .sys_driver_version()
        .map_err(|e| unknown("the driver version", e))?;
    let cuda = nvml
        .sys_cuda_driver_version()
        .map_err(|e| unknown("the CUDA driver version", e))?;
    let count = nvml
        .device_count()
        .map_err(|e| unknown("the device count", e))?;
    let mut devices = Vec::new();
    for index in 0..count {
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
        let (mig_capable, mig_enabled, mig_pending) = match device.mig_mode() {
            Ok(mode) => (true, mode.current == 1, mode.pending == 1),
            Err(NvmlError::NotSupported) => (false, false, false),
            Err(e) => return Err(lost("its MIG mode")(e)),
        };
        let persistence_mode = match device.is_in_persistent_mode() {
            Ok(enabled) => enabled,
            Err(NvmlError::NotSupported) => false,
            Err(e) => return Err(lost("its persistence mode")(e)),
        };
        let capability = device
            .cuda_compute_capability()
            .map_err(lost("its compute capability"))?;
        devices.push(NvmlDevice {
            index,
            name: device.name().map_err(lost("its name"))?,
            uuid: device.uuid().map_err(lost("its UUID"))?,
            pci_bus_id: device.pci_info().map_err(lost("its PCI info"))?.bus_id,
            memory_total_mib: device.memory_info().map_err(lost("its memory size"))?.total
                / (1024 * 1024),
            compute_capability: (capability.major, capability.minor),
            mig_capable,
            mig_enabled,
            mig_pending,
            persistence_mode,
        });
    }
    Ok(Inventory {
        library: shown,
        driver_version,
        cuda_driver_version: format!("{}.{}", cuda / 1000, (cuda % 1000) / 10),
        devices,
    })
}

fn unknown(what: &str, e: NvmlError) -> NvmlProblem {
    NvmlProblem::Unknown {
        what: what.to_string(),
        reason: e.to_string(),
    }
}
