//! One NVML pass over the GPUs: every field of every GPU, read into
//! buffers that are reused from scrape to scrape.

use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper_sys::bindings::field_id::NVML_FI_DEV_MEMORY_TEMP;

use super::fields::{COUNT, Id};
use crate::gpu::nvml::{NvmlProblem, open, unknown};

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

/// NVML held open for sampling.
pub struct Sampler {
    nvml: Nvml,
    pub driver_version: String,
    pub gpus: Vec<Identity>,
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
        Ok(Sampler {
            nvml,
            driver_version,
            gpus,
        })
    }

    /// Reads every field of every GPU into `values` (one entry per GPU,
    /// in `gpus`' order); a field NVML cannot give is `None`.
    pub fn sample(&self, values: &mut Vec<Values>) {
        values.resize(self.gpus.len(), [None; COUNT]);
        for (gpu, slot) in self.gpus.iter().zip(values.iter_mut()) {
            *slot = [None; COUNT];
            let Ok(device) = self.nvml.device_by_index(gpu.index) else {
                continue;
            };
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
            let field = device.field_values_for(&[FieldId(NVML_FI_DEV_MEMORY_TEMP)]);
            let memory_temp = field
                .ok()
                .and_then(|mut samples| samples.pop())
                .and_then(|sample| sample.ok())
                .and_then(|sample| sample.value.ok())
                .map(|value| match value {
                    SampleValue::U32(v) => f64::from(v),
                    SampleValue::U64(v) => v as f64,
                    SampleValue::I64(v) => v as f64,
                    SampleValue::F64(v) => v,
                });
            put(Id::MemoryTemp, memory_temp);
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
            if let Some((correctable, uncorrectable, failure)) = remapped_rows(&self.nvml, &device)
            {
                put(Id::CorrectableRemappedRows, Some(f64::from(correctable)));
                put(
                    Id::UncorrectableRemappedRows,
                    Some(f64::from(uncorrectable)),
                );
                put(Id::RowRemapFailure, Some(f64::from(u8::from(failure))));
            }
            // The first version where the library lacks the second.
            if let Ok(memory) = crate::gpu::nvml::memory_usage(&self.nvml, &device) {
                let mib = |bytes: u64| (bytes / (1024 * 1024)) as f64;
                put(Id::FbFree, Some(mib(memory.free)));
                put(Id::FbUsed, Some(mib(memory.used)));
            }
        }
    }
}

/// Rows remapped for correctable and uncorrectable errors, and whether a
/// remapping failed (Ampere and later); nvml-wrapper has no call for it.
fn remapped_rows(nvml: &Nvml, device: &nvml_wrapper::Device<'_>) -> Option<(u32, u32, bool)> {
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
