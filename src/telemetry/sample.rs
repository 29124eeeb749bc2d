//! One NVML pass over the GPUs: every field of every GPU, and each GPU
//! instance of a GPU with MIG on, read into buffers that are reused from
//! scrape to scrape.

use std::path::Path;

use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::field_id::{
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_NVLINK_LINK_COUNT, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
};
use nvml_wrapper_sys::bindings::{
    nvmlFieldValue_t, nvmlGpuInstance_t, nvmlGpuInstanceInfo_t,
    nvmlValueType_enum_NVML_VALUE_TYPE_DOUBLE, nvmlValueType_enum_NVML_VALUE_TYPE_SIGNED_INT,
    nvmlValueType_enum_NVML_VALUE_TYPE_SIGNED_LONG_LONG,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
};

use super::fields::{COUNT, Id};
use crate::gpu::nvml::{NvmlProblem, open, unknown};
use crate::mig::nvml::GiProfile;

/// A GPU's identity, as dcgm-exporter labels its series; read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub index: u32,
    pub uuid: String,
    /// NVML's form, `00000000:18:00.0`.
    pub pci_bus_id: String,
    /// `nvidia<minor>`: its device node.
    pub device: String,
    pub model: String,
}

/// One GPU's readings, by field `Id`; `None`: NVML cannot give it (no
/// such sensor, an older driver, the GPU gone).
pub type Values = [Option<f64>; COUNT];

/// A GPU instance of a GPU with MIG on: dcgm-exporter gives it its own
/// series (`GPU_I_ID`, `GPU_I_PROFILE`) instead of its GPU's.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Its GPU, by position in `Sampler::gpus`.
    pub gpu: usize,
    /// NVML's GPU instance id (`GPU_I_ID`), and as the label writes it.
    pub id: u32,
    id_text: String,
    /// Its profile as nvidia-smi names it (`GPU_I_PROFILE`: `1g.10gb`).
    pub profile: String,
    /// The UUIDs of its MIG devices (one per compute instance), as the
    /// device plugin hands them to containers.
    pub devices: Vec<String>,
    /// Its own frame buffer, MiB.
    pub fb_free: Option<f64>,
    pub fb_used: Option<f64>,
}

/// One pass: each GPU's readings (in `Sampler::gpus`' order) and the GPU
/// instances of GPUs with MIG on.
#[derive(Debug, Default)]
pub struct Sample {
    pub gpus: Vec<Values>,
    pub instances: Vec<Instance>,
}

impl Instance {
    pub fn new(gpu: usize, id: u32, profile: String) -> Instance {
        Instance {
            gpu,
            id,
            id_text: id.to_string(),
            profile,
            devices: Vec::new(),
            fb_free: None,
            fb_used: None,
        }
    }

    /// `GPU_I_ID`'s value.
    pub fn id_label(&self) -> &str {
        &self.id_text
    }
}

impl Sample {
    /// The GPU instances of the GPU at `gpu`, by id.
    pub fn instances_of(&self, gpu: usize) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(move |i| i.gpu == gpu)
    }
}

/// NVML says a GPU has at most 7 MIG devices; this bounds what a broken
/// library's count can make a scrape ask for.
const MAX_MIG_DEVICES: u32 = 64;

/// NVML held open for sampling.
pub struct Sampler {
    nvml: Nvml,
    pub driver_version: String,
    pub gpus: Vec<Identity>,
    /// Each GPU's MIG profile table, read the first time it has a GPU
    /// instance (a GPU's profiles never change).
    profiles: Vec<Option<Vec<GiProfile>>>,
}

impl Sampler {
    /// Opens the library and reads the GPUs' identities.
    pub fn open(library: &Path) -> Result<Sampler, NvmlProblem> {
        let nvml = open(library)?;
        let driver_version = nvml
            .sys_driver_version()
            .map_err(|e| unknown("the driver version", e))?;
        let count = nvml
            .device_count()
            .map_err(|e| unknown("the device count", e))?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let read = |e| unknown(&format!("GPU {index}"), e);
            let device = nvml.device_by_index(index).map_err(read)?;
            gpus.push(Identity {
                index,
                uuid: device.uuid().map_err(read)?,
                pci_bus_id: device.pci_info().map_err(read)?.bus_id,
                // dcgm-exporter's `device`: the node's /dev/nvidia<minor>.
                device: format!("nvidia{}", device.minor_number().unwrap_or(index)),
                model: device.name().map_err(read)?,
            });
        }
        let profiles = vec![None; gpus.len()];
        Ok(Sampler {
            nvml,
            driver_version,
            gpus,
            profiles,
        })
    }

    /// Reads every field of every GPU, and the GPU instances of those
    /// with MIG on, into `sample`; a field NVML cannot give is `None`.
    pub fn sample(&mut self, sample: &mut Sample) {
        let Sampler {
            nvml,
            gpus,
            profiles,
            ..
        } = self;
        sample.gpus.resize(gpus.len(), [None; COUNT]);
        sample.instances.clear();
        for (position, (gpu, slot)) in gpus.iter().zip(sample.gpus.iter_mut()).enumerate() {
            *slot = [None; COUNT];
            let Ok(device) = nvml.device_by_index(gpu.index) else {
                continue;
            };
            mig_instances(
                nvml,
                &device,
                position,
                &mut profiles[position],
                &mut sample.instances,
            );
            let mut put = |id: Id, value: Option<f64>| slot[id as usize] = value;
            put(
                Id::SmClock,
                device.clock_info(Clock::SM).ok().map(f64::from),
            );
            put(
                Id::MemClock,
                device.clock_info(Clock::Memory).ok().map(f64::from),
            );
            put(
                Id::GpuTemp,
                device
                    .temperature(TemperatureSensor::Gpu)
                    .ok()
                    .map(f64::from),
            );
            // NVML says milliwatts; DCGM, watts.
            put(
                Id::PowerUsage,
                device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            );
            put(
                Id::TotalEnergy,
                device.total_energy_consumption().ok().map(|mj| mj as f64),
            );
            put(
                Id::PcieReplays,
                device.pcie_replay_counter().ok().map(f64::from),
            );
            if let Ok(rates) = device.utilization_rates() {
                put(Id::GpuUtil, Some(f64::from(rates.gpu)));
                put(Id::MemCopyUtil, Some(f64::from(rates.memory)));
            }
            put(
                Id::EncUtil,
                device
                    .encoder_utilization()
                    .ok()
                    .map(|u| f64::from(u.utilization)),
            );
            put(
                Id::DecUtil,
                device
                    .decoder_utilization()
                    .ok()
                    .map(|u| f64::from(u.utilization)),
            );
            let [memory_temp, links, tx, rx] = field_values(
                nvml,
                &device,
                [
                    (NVML_FI_DEV_MEMORY_TEMP, 0),
                    (NVML_FI_DEV_NVLINK_LINK_COUNT, 0),
                    // Every link's, summed by the driver.
                    (NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, u32::MAX),
                    (NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, u32::MAX),
                ],
            );
            put(Id::MemoryTemp, memory_temp);
            // NVLink's data counters, both ways, in KiB; a GPU without
            // NVLink (no links, or no counters) has no series.
            if links.is_some_and(|n| n > 0.0)
                && let (Some(tx), Some(rx)) = (tx, rx)
            {
                put(Id::NvlinkBandwidthTotal, Some(tx + rx));
            }
            for (id, error, counter) in [
                (
                    Id::EccSbeVolatile,
                    MemoryError::Corrected,
                    EccCounter::Volatile,
                ),
                (
                    Id::EccDbeVolatile,
                    MemoryError::Uncorrected,
                    EccCounter::Volatile,
                ),
                (
                    Id::EccSbeAggregate,
                    MemoryError::Corrected,
                    EccCounter::Aggregate,
                ),
                (
                    Id::EccDbeAggregate,
                    MemoryError::Uncorrected,
                    EccCounter::Aggregate,
                ),
            ] {
                put(
                    id,
                    device
                        .total_ecc_errors(error, counter)
                        .ok()
                        .map(|n| n as f64),
                );
            }
            for (id, cause) in [
                (Id::RetiredSbe, RetirementCause::MultipleSingleBitEccErrors),
                (Id::RetiredDbe, RetirementCause::DoubleBitEccError),
            ] {
                put(
                    id,
                    device
                        .retired_pages(cause)
                        .ok()
                        .map(|pages| pages.len() as f64),
                );
            }
            put(
                Id::RetiredPending,
                device
                    .are_pages_pending_retired()
                    .ok()
                    .map(|p| f64::from(u8::from(p))),
            );
            if let Some((correctable, uncorrectable, failure)) = remapped_rows(nvml, &device) {
                put(Id::CorrectableRemappedRows, Some(f64::from(correctable)));
                put(
                    Id::UncorrectableRemappedRows,
                    Some(f64::from(uncorrectable)),
                );
                put(Id::RowRemapFailure, Some(f64::from(u8::from(failure))));
            }
            // The first version where the library lacks the second.
            if let Some((free, used)) = frame_buffer(nvml, &device) {
                put(Id::FbFree, Some(free));
                put(Id::FbUsed, Some(used));
            }
        }
    }
}

/// Free and used frame buffer, in MiB (DCGM's "MB").
fn frame_buffer(nvml: &Nvml, device: &Device<'_>) -> Option<(f64, f64)> {
    let memory = crate::gpu::nvml::memory_usage(nvml, device).ok()?;
    let mib = |bytes: u64| (bytes / (1024 * 1024)) as f64;
    Some((mib(memory.free), mib(memory.used)))
}

/// Appends the GPU instances of a GPU with MIG on, found through its MIG
/// devices (a handful of calls, so they follow a layout gpuprov or
/// anyone else changes while running); nothing for a GPU with MIG off,
/// or a library or GPU without MIG.
fn mig_instances(
    nvml: &Nvml,
    device: &Device<'_>,
    gpu: usize,
    profiles: &mut Option<Vec<GiProfile>>,
    out: &mut Vec<Instance>,
) {
    if !device.mig_mode().is_ok_and(|mode| mode.current == 1) {
        return;
    }
    let first = out.len();
    let count = device.mig_device_count().unwrap_or(0).min(MAX_MIG_DEVICES);
    for n in 0..count {
        // "Not found": no MIG device at that index.
        let Ok(mig) = device.mig_device_by_index(n) else {
            continue;
        };
        let (Ok(id), Ok(uuid)) = (gpu_instance_id(nvml, &mig), mig.uuid()) else {
            continue;
        };
        if let Some(known) = out[first..].iter_mut().find(|i| i.id == id) {
            known.devices.push(uuid);
            continue;
        }
        let mut instance = Instance::new(gpu, id, profile_name(nvml, device, id, profiles));
        (instance.fb_free, instance.fb_used) = frame_buffer(nvml, &mig).unzip();
        instance.devices.push(uuid);
        out.push(instance);
    }
    out[first..].sort_by_key(|i| i.id);
}

/// A MIG device's GPU instance id; nvml-wrapper has no call for it.
fn gpu_instance_id(nvml: &Nvml, mig: &Device<'_>) -> Result<u32, NvmlError> {
    let function = nvml
        .lib()
        .nvmlDeviceGetGpuInstanceId
        .as_ref()
        .map_err(|_| NvmlError::FunctionNotFound)?;
    let mut id = 0;
    // SAFETY: NVML's symbol with nvml.h's signature; the handle is NVML's
    // own and the pointer is to a local.
    nvml_try(unsafe { function(mig.handle(), &mut id) })?;
    Ok(id)
}

/// A GPU instance's profile name (`1g.10gb`), as nvidia-smi and
/// dcgm-exporter write it; `unknown-profile-<n>` when the library does
/// not say.
fn profile_name(
    nvml: &Nvml,
    device: &Device<'_>,
    id: u32,
    profiles: &mut Option<Vec<GiProfile>>,
) -> String {
    let profile_id = match gpu_instance_profile(nvml, device, id) {
        Ok(profile_id) => profile_id,
        Err(e) => {
            tracing::debug!("GPU instance {id}: its profile: {e}");
            return "unknown-profile".to_string();
        }
    };
    if profiles.is_none() {
        // SAFETY: the handle stays valid while NVML is initialised.
        let handle = unsafe { device.handle() };
        let total = crate::gpu::nvml::memory_total(nvml, device).unwrap_or(0) / (1024 * 1024);
        *profiles = crate::mig::nvml::profiles(nvml, handle, total).ok();
    }
    profiles
        .iter()
        .flatten()
        .find(|p| p.id == profile_id)
        .map_or_else(
            || format!("unknown-profile-{profile_id}"),
            |p| p.name.clone(),
        )
}

/// A GPU instance's NVML profile id.
fn gpu_instance_profile(nvml: &Nvml, device: &Device<'_>, id: u32) -> Result<u32, NvmlError> {
    let lib = nvml.lib();
    let by_id = lib
        .nvmlDeviceGetGpuInstanceById
        .as_ref()
        .map_err(|_| NvmlError::FunctionNotFound)?;
    let info = lib
        .nvmlGpuInstanceGetInfo
        .as_ref()
        .map_err(|_| NvmlError::FunctionNotFound)?;
    let mut instance: nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: NVML's symbols with nvml.h's signatures; the handles are
    // NVML's own, the pointers to locals, and a zeroed C struct is a valid
    // value for NVML to fill in.
    unsafe {
        nvml_try(by_id(device.handle(), id, &mut instance))?;
        let mut found: nvmlGpuInstanceInfo_t = std::mem::zeroed();
        nvml_try(info(instance, &mut found))?;
        Ok(found.profileId)
    }
}

/// Several NVML fields (id, scope) in one call; a field NVML cannot give
/// is `None`.
fn field_values<const N: usize>(
    nvml: &Nvml,
    device: &Device<'_>,
    fields: [(u32, u32); N],
) -> [Option<f64>; N] {
    let Ok(function) = nvml.lib().nvmlDeviceGetFieldValues.as_ref() else {
        return [None; N];
    };
    // SAFETY: a zeroed C struct is a valid value for NVML to fill in.
    let mut values: [nvmlFieldValue_t; N] = unsafe { std::mem::zeroed() };
    for (value, (id, scope)) in values.iter_mut().zip(fields) {
        value.fieldId = id;
        value.scopeId = scope;
    }
    // SAFETY: NVML's symbol with nvml.h's signature; `values` holds N
    // entries.
    if nvml_try(unsafe { function(device.handle(), N as i32, values.as_mut_ptr()) }).is_err() {
        return [None; N];
    }
    values.map(|v| {
        if v.nvmlReturn != 0 {
            return None;
        }
        // SAFETY: the member NVML's value type names.
        unsafe {
            #[allow(non_upper_case_globals)]
            match v.valueType {
                nvmlValueType_enum_NVML_VALUE_TYPE_DOUBLE => Some(v.value.dVal),
                nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT => Some(f64::from(v.value.uiVal)),
                nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG => Some(v.value.ulVal as f64),
                nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG => {
                    Some(v.value.ullVal as f64)
                }
                nvmlValueType_enum_NVML_VALUE_TYPE_SIGNED_LONG_LONG => Some(v.value.sllVal as f64),
                nvmlValueType_enum_NVML_VALUE_TYPE_SIGNED_INT => Some(f64::from(v.value.siVal)),
                _ => None,
            }
        }
    })
}

/// Rows remapped for correctable and uncorrectable errors, and whether a
/// remapping failed (Ampere and later); nvml-wrapper has no call for it.
fn remapped_rows(nvml: &Nvml, device: &Device<'_>) -> Option<(u32, u32, bool)> {
    let function = nvml.lib().nvmlDeviceGetRemappedRows.as_ref().ok()?;
    let (mut correctable, mut uncorrectable, mut pending, mut failure) = (0, 0, 0, 0);
    // SAFETY: NVML's symbol with nvml.h's signature; the handle is the
    // device's own and the pointers are to locals that outlive the call.
    let code = unsafe {
        function(
            device.handle(),
            &mut correctable,
            &mut uncorrectable,
            &mut pending,
            &mut failure,
        )
    };
    (code == 0).then_some((correctable, uncorrectable, failure != 0))
}
