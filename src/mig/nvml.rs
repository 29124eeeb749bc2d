//! MIG through NVML: each GPU's mode, the GPU and compute instance
//! profiles it offers (with their placements), the instances it has; and
//! the three things a layout change does: set the mode, destroy instances,
//! create them at a placement.
//!
//! nvml-wrapper wraps only part of NVML's MIG API (and its placement query
//! returns an empty list), so these calls go through the library's own
//! symbols, which nvml-wrapper loads; each is checked for presence first, so
//! an older driver's library reports "no MIG" instead of panicking.

use std::collections::BTreeMap;
use std::ffi::c_uint;
use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper_sys::bindings::{
    nvmlComputeInstance_t, nvmlComputeInstanceInfo_t, nvmlComputeInstanceProfileInfo_t,
    nvmlDevice_t, nvmlGpuInstance_t, nvmlGpuInstanceInfo_t, nvmlGpuInstancePlacement_t,
    nvmlGpuInstanceProfileInfo_t,
};
use serde::Serialize;

use crate::gpu::nvml::{NvmlProblem, open};

/// NVML's GPU instance profile ids (`NVML_GPU_INSTANCE_PROFILE_*`) go up to
/// this; unknown ids answer "not supported" and are skipped.
const GI_PROFILE_IDS: c_uint = 18;
/// Likewise for compute instance profiles.
const CI_PROFILE_IDS: c_uint = 9;
/// The array NVML fills with a profile's instances must hold its
/// instance count (7 at most on real GPUs); this bounds what a broken
/// library's count can make gpuprov allocate.
const MAX_INSTANCES: u32 = 64;
/// `NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED`.
const ENGINE_SHARED: c_uint = 0;

/// A MIG device as the device plugin and GFD see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDevice {
    /// Its profile as nvidia-smi writes it (`1g.10gb`, `1c.3g.40gb`,
    /// `1g.10gb+me`).
    pub name: String,
    pub memory_mib: u64,
    pub multiprocessors: u32,
    pub slices_gi: u32,
    pub slices_ci: u32,
    pub copy_engines: u32,
    pub decoders: u32,
    pub encoders: u32,
    pub jpegs: u32,
    pub ofas: u32,
}

impl MigDevice {
    /// The name in resources and labels: `+` becomes `.` (`1g.10gb.me`).
    pub fn resource_profile(&self) -> String {
        self.name.replace('+', ".")
    }
}

/// A GPU's MIG side.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuMig {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// `(device << 16) | vendor`, as mig-parted's `device-filter` writes it.
    pub pci_id: u32,
    pub memory_total_mib: u64,
    pub capable: bool,
    pub current: bool,
    pub pending: bool,
    /// What it offers, in NVML's profile id order.
    pub profiles: Vec<GiProfile>,
    /// What it has now (none while MIG is off).
    pub instances: Vec<GpuInstance>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GiProfile {
    pub id: u32,
    /// nvidia-smi's name: `1g.10gb`, `1g.10gb+me`.
    pub name: String,
    pub slices: u32,
    pub instances: u32,
    pub multiprocessors: u32,
    pub memory_mib: u64,
    pub copy_engines: u32,
    pub decoders: u32,
    pub encoders: u32,
    pub jpegs: u32,
    pub ofas: u32,
    /// `(start, size)` in memory slices.
    pub placements: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInstance {
    pub id: u32,
    pub profile_id: u32,
    pub start: u32,
    pub size: u32,
    pub compute: Vec<ComputeInstance>,
}

/// A compute instance: a MIG device, as the device plugin sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputeInstance {
    pub id: u32,
    pub profile_id: u32,
    pub slices: u32,
    pub multiprocessors: u32,
    pub shared_copy_engines: u32,
    pub shared_decoders: u32,
    pub shared_encoders: u32,
    pub shared_jpegs: u32,
    pub shared_ofas: u32,
    /// The MIG device's UUID (`MIG-…`); empty where NVML does not give it.
    pub uuid: String,
}

impl GpuMig {
    pub fn profile(&self, id: u32) -> Option<&GiProfile> {
        self.profiles.iter().find(|p| p.id == id)
    }

    /// A compute instance's profile name: the GPU instance's, with `<c>c.`
    /// in front when it uses only part of it (`1c.3g.20gb`).
    pub fn device_name(&self, gi: &GpuInstance, ci: &ComputeInstance) -> String {
        let Some(profile) = self.profile(gi.profile_id) else {
            return format!("unknown-profile-{}", gi.profile_id);
        };
        if ci.slices == profile.slices {
            profile.name.clone()
        } else {
            format!("{}c.{}", ci.slices, profile.name)
        }
    }

    /// Its MIG devices (a compute instance in a GPU instance), with the
    /// attributes GFD labels them by.
    pub fn devices(&self) -> Vec<MigDevice> {
        let mut devices = Vec::new();
        for gi in &self.instances {
            let profile = self.profile(gi.profile_id);
            for ci in &gi.compute {
                devices.push(MigDevice {
                    name: self.device_name(gi, ci),
                    memory_mib: profile.map_or(0, |p| p.memory_mib),
                    multiprocessors: ci.multiprocessors,
                    slices_gi: profile.map_or(gi.size, |p| p.slices),
                    slices_ci: ci.slices,
                    copy_engines: ci.shared_copy_engines,
                    decoders: ci.shared_decoders,
                    encoders: ci.shared_encoders,
                    jpegs: ci.shared_jpegs,
                    ofas: ci.shared_ofas,
                });
            }
        }
        devices
    }

    /// Its MIG devices by profile name, counted.
    pub fn device_counts(&self) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for gi in &self.instances {
            for ci in &gi.compute {
                *counts.entry(self.device_name(gi, ci)).or_default() += 1;
            }
        }
        counts
    }
}

/// How many slices a GPU instance profile id spans (go-nvlib's table).
fn gi_slices_of(id: c_uint) -> Option<u32> {
    Some(match id {
        0 | 7 | 9 | 10 | 13 | 15 => 1,
        1 | 8 | 11 | 14 | 16 => 2,
        2 | 17 => 3,
        3 | 12 => 4,
        6 => 6,
        4 => 7,
        5 => 8,
        _ => return None,
    })
}

/// The attribute nvidia-smi appends to a profile's name.
fn attribute_of(id: c_uint) -> &'static str {
    match id {
        7 | 8 => "+me",
        15 | 16 => "+me.all",
        10..=12 | 17 => "+gfx",
        13 | 14 => "-me",
        _ => "",
    }
}

/// The compute instance profile id for a size in slices.
pub fn ci_profile_for(slices: u32) -> Option<u32> {
    Some(match slices {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        7 => 4,
        8 => 5,
        6 => 6,
        _ => return None,
    })
}

/// nvidia-smi's memory figure in a profile name: the instance's share of
/// the GPU's memory rounded up to eighths, times the GPU's whole GiB
/// (NVIDIA's own rule, so names match nvidia-smi's and mig-parted's).
pub fn memory_gb(memory_mib: u64, total_mib: u64) -> u64 {
    if total_mib == 0 {
        return 0;
    }
    // Saturating: the figures are the library's, and a broken one's must
    // not overflow.
    let eighths = memory_mib.saturating_mul(8).div_ceil(total_mib);
    let total_gb = total_mib.div_ceil(1024);
    // round(eighths / 8 * total_gb), halves away from zero.
    eighths
        .saturating_mul(total_gb)
        .saturating_mul(2)
        .saturating_add(8)
        / 16
}

/// A function of the library, or `FunctionNotFound` when an older
/// driver's library lacks it (nvml-wrapper would panic on calling it).
macro_rules! symbol {
    ($nvml:expr, $name:ident) => {
        $nvml.lib().$name.as_ref().map_err(|_| {
            tracing::debug!("the NVML library lacks {}", stringify!($name));
            NvmlError::FunctionNotFound
        })?
    };
}

/// A GPU's MIG side, read from NVML; an error names the GPU and the call.
pub fn read(library: &Path) -> Result<Vec<GpuMig>, NvmlProblem> {
    Session::open(library)?.gpus()
}

/// NVML, open for reading and changing MIG.
pub struct Session {
    nvml: Nvml,
}

/// How a MIG mode change went.
pub enum Activation {
    Applied,
    /// Set, but pending until the GPU is reset; the driver's reason.
    Pending(NvmlError),
}

impl Session {
    pub fn open(library: &Path) -> Result<Session, NvmlProblem> {
        Ok(Session {
            nvml: open(library)?,
        })
    }

    /// Every GPU's MIG side.
    pub fn gpus(&self) -> Result<Vec<GpuMig>, NvmlProblem> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| crate::gpu::nvml::unknown("the device count", e))?;
        (0..count).map(|index| self.gpu(index)).collect()
    }

    /// One GPU's MIG side.
    pub fn gpu(&self, index: u32) -> Result<GpuMig, NvmlProblem> {
        let fail = |what: &str| {
            let what = format!("GPU {index}: {what}");
            move |e: NvmlError| crate::gpu::nvml::unknown(&what, e)
        };
        let nvml = &self.nvml;
        let device = nvml.device_by_index(index).map_err(fail("its handle"))?;
        let pci = device.pci_info().map_err(fail("its PCI info"))?;
        let memory =
            crate::gpu::nvml::memory_total(nvml, &device).map_err(fail("its memory size"))?;
        // SAFETY: the handle stays valid while NVML is initialised.
        let handle = unsafe { device.handle() };
        let mut gpu = GpuMig {
            index,
            uuid: device.uuid().map_err(fail("its UUID"))?,
            name: device.name().map_err(fail("its name"))?,
            pci_id: pci.pci_device_id,
            memory_total_mib: memory / (1024 * 1024),
            capable: false,
            current: false,
            pending: false,
            profiles: Vec::new(),
            instances: Vec::new(),
        };
        match mode(nvml, handle) {
            Ok((current, pending)) => {
                gpu.capable = true;
                gpu.current = current;
                gpu.pending = pending;
            }
            Err(NvmlError::NotSupported | NvmlError::FunctionNotFound) => return Ok(gpu),
            Err(e) => return Err(fail("its MIG mode")(e)),
        }
        gpu.profiles =
            profiles(nvml, handle, gpu.memory_total_mib).map_err(fail("its MIG profiles"))?;
        if gpu.current {
            gpu.instances =
                instances(nvml, handle, &gpu.profiles).map_err(fail("its MIG instances"))?;
        }
        Ok(gpu)
    }

    fn device(&self, index: u32) -> Result<nvmlDevice_t, NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        // SAFETY: the handle stays valid while NVML is initialised.
        Ok(unsafe { device.handle() })
    }

    /// Sets the MIG mode.
    pub fn set_mode(&self, index: u32, enabled: bool) -> Result<Activation, NvmlError> {
        let device = self.device(index)?;
        let set = symbol!(self.nvml, nvmlDeviceSetMigMode);
        let mut activation = 0;
        // SAFETY: NVML's signature; the pointer is to a local.
        nvml_try(unsafe { set(device, c_uint::from(enabled), &mut activation) })?;
        Ok(match nvml_try(activation) {
            Ok(()) => Activation::Applied,
            Err(why) => Activation::Pending(why),
        })
    }

    /// Destroys every compute and GPU instance on `gpu`.
    pub fn destroy_all(&self, gpu: &GpuMig) -> Result<(), NvmlError> {
        let device = self.device(gpu.index)?;
        let destroy_ci = symbol!(self.nvml, nvmlComputeInstanceDestroy);
        let destroy_gi = symbol!(self.nvml, nvmlGpuInstanceDestroy);
        for profile in &gpu.profiles {
            for gi in gpu_instance_handles(&self.nvml, device, profile)? {
                for (ci, _) in compute_instance_handles(&self.nvml, gi)? {
                    // SAFETY: NVML's own handle.
                    nvml_try(unsafe { destroy_ci(ci) })?;
                }
                // SAFETY: NVML's own handle.
                nvml_try(unsafe { destroy_gi(gi) })?;
            }
        }
        Ok(())
    }

    /// Creates a GPU instance at a placement and one compute instance in it.
    pub fn create(
        &self,
        index: u32,
        gi_profile: u32,
        placement: (u32, u32),
        ci_profile: u32,
    ) -> Result<(), NvmlError> {
        let device = self.device(index)?;
        let create_gi = symbol!(self.nvml, nvmlDeviceCreateGpuInstanceWithPlacement);
        let create_ci = symbol!(self.nvml, nvmlGpuInstanceCreateComputeInstance);
        let at = nvmlGpuInstancePlacement_t {
            start: placement.0,
            size: placement.1,
        };
        let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: NVML's signature; pointers to locals.
        nvml_try(unsafe { create_gi(device, gi_profile, &at, &mut gi) })?;
        let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
        // SAFETY: as above; `gi` was just made by NVML.
        nvml_try(unsafe { create_ci(gi, ci_profile, &mut ci) })?;
        Ok(())
    }
}

fn mode(nvml: &Nvml, device: nvmlDevice_t) -> Result<(bool, bool), NvmlError> {
    let get = symbol!(nvml, nvmlDeviceGetMigMode);
    let (mut current, mut pending) = (0, 0);
    // SAFETY: NVML's signature; the pointers are to locals.
    nvml_try(unsafe { get(device, &mut current, &mut pending) })?;
    Ok((current == 1, pending == 1))
}

pub(crate) fn profiles(
    nvml: &Nvml,
    device: nvmlDevice_t,
    total_mib: u64,
) -> Result<Vec<GiProfile>, NvmlError> {
    let info = symbol!(nvml, nvmlDeviceGetGpuInstanceProfileInfo);
    let placements = symbol!(nvml, nvmlDeviceGetGpuInstancePossiblePlacements_v2);
    let mut profiles = Vec::new();
    for id in 0..GI_PROFILE_IDS {
        // SAFETY: a zeroed C struct is a valid value for NVML to fill in.
        let mut p: nvmlGpuInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        match nvml_try(unsafe { info(device, id, &mut p) }) {
            Ok(()) => {}
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => continue,
            Err(e) => return Err(e),
        }
        let Some(slices) = gi_slices_of(p.id) else {
            continue;
        };
        let mut count: c_uint = 0;
        // SAFETY: a null array asks for the count only.
        nvml_try(unsafe { placements(device, id, std::ptr::null_mut(), &mut count) })?;
        // A count is a handful; the bound keeps a broken answer small.
        let count = count.min(64);
        let mut found = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
        let mut filled = count;
        // SAFETY: `found` holds `filled` entries.
        nvml_try(unsafe { placements(device, id, found.as_mut_ptr(), &mut filled) })?;
        found.truncate(filled.min(count) as usize);
        profiles.push(GiProfile {
            id: p.id,
            name: format!(
                "{slices}g.{}gb{}",
                memory_gb(p.memorySizeMB, total_mib),
                attribute_of(p.id)
            ),
            slices,
            instances: p.instanceCount,
            multiprocessors: p.multiprocessorCount,
            memory_mib: p.memorySizeMB,
            copy_engines: p.copyEngineCount,
            decoders: p.decoderCount,
            encoders: p.encoderCount,
            jpegs: p.jpegCount,
            ofas: p.ofaCount,
            placements: found.iter().map(|p| (p.start, p.size)).collect(),
        });
    }
    Ok(profiles)
}

/// The GPU instances of one profile on a device.
fn gpu_instance_handles(
    nvml: &Nvml,
    device: nvmlDevice_t,
    profile: &GiProfile,
) -> Result<Vec<nvmlGpuInstance_t>, NvmlError> {
    let list = symbol!(nvml, nvmlDeviceGetGpuInstances);
    // NVML writes up to the profile's instance count; the array is that
    // long.
    let mut handles: Vec<nvmlGpuInstance_t> =
        vec![std::ptr::null_mut(); profile.instances.clamp(1, MAX_INSTANCES) as usize];
    let mut count: c_uint = 0;
    // SAFETY: `handles` is as long as NVML writes.
    nvml_try(unsafe { list(device, profile.id, handles.as_mut_ptr(), &mut count) })?;
    handles.truncate((count as usize).min(handles.len()));
    Ok(handles)
}

/// The compute instances in a GPU instance, each with its profile.
fn compute_instance_handles(
    nvml: &Nvml,
    gi: nvmlGpuInstance_t,
) -> Result<Vec<(nvmlComputeInstance_t, nvmlComputeInstanceProfileInfo_t)>, NvmlError> {
    let profile_info = symbol!(nvml, nvmlGpuInstanceGetComputeInstanceProfileInfo);
    let list = symbol!(nvml, nvmlGpuInstanceGetComputeInstances);
    let mut found = Vec::new();
    for id in 0..CI_PROFILE_IDS {
        // SAFETY: zeroed C struct for NVML to fill in.
        let mut p: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        match nvml_try(unsafe { profile_info(gi, id, ENGINE_SHARED, &mut p) }) {
            Ok(()) => {}
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => continue,
            Err(e) => return Err(e),
        }
        let mut handles: Vec<nvmlComputeInstance_t> =
            vec![std::ptr::null_mut(); p.instanceCount.clamp(1, MAX_INSTANCES) as usize];
        let mut count: c_uint = 0;
        // SAFETY: `handles` is as long as NVML writes.
        nvml_try(unsafe { list(gi, id, handles.as_mut_ptr(), &mut count) })?;
        handles.truncate((count as usize).min(handles.len()));
        found.extend(handles.into_iter().map(|ci| (ci, p)));
    }
    Ok(found)
}

fn instances(
    nvml: &Nvml,
    device: nvmlDevice_t,
    profiles: &[GiProfile],
) -> Result<Vec<GpuInstance>, NvmlError> {
    let gi_info = symbol!(nvml, nvmlGpuInstanceGetInfo);
    let ci_info = symbol!(nvml, nvmlComputeInstanceGetInfo_v2);
    let uuids = mig_device_uuids(nvml, device);
    let mut found = Vec::new();
    for profile in profiles {
        for gi in gpu_instance_handles(nvml, device, profile)? {
            // SAFETY: zeroed C struct; the handle is NVML's own.
            let mut i: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
            nvml_try(unsafe { gi_info(gi, &mut i) })?;
            let mut compute = Vec::new();
            for (ci, p) in compute_instance_handles(nvml, gi)? {
                // SAFETY: zeroed C struct; the handle is NVML's own.
                let mut c: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
                nvml_try(unsafe { ci_info(ci, &mut c) })?;
                compute.push(ComputeInstance {
                    id: c.id,
                    profile_id: c.profileId,
                    slices: p.sliceCount,
                    multiprocessors: p.multiprocessorCount,
                    shared_copy_engines: p.sharedCopyEngineCount,
                    shared_decoders: p.sharedDecoderCount,
                    shared_encoders: p.sharedEncoderCount,
                    shared_jpegs: p.sharedJpegCount,
                    shared_ofas: p.sharedOfaCount,
                    uuid: uuids.get(&(i.id, c.id)).cloned().unwrap_or_default(),
                });
            }
            compute.sort_by_key(|c| c.id);
            found.push(GpuInstance {
                id: i.id,
                profile_id: i.profileId,
                start: i.placement.start,
                size: i.placement.size,
                compute,
            });
        }
    }
    found.sort_by_key(|g| (g.start, g.id));
    Ok(found)
}

/// Each MIG device's UUID by (GPU instance, compute instance), through
/// the MIG device handles; a library or driver that lacks them gives none.
fn mig_device_uuids(nvml: &Nvml, device: nvmlDevice_t) -> BTreeMap<(u32, u32), String> {
    let mut uuids = BTreeMap::new();
    let lib = nvml.lib();
    let (Ok(max), Ok(by_index), Ok(gi_id), Ok(ci_id), Ok(uuid)) = (
        lib.nvmlDeviceGetMaxMigDeviceCount.as_ref(),
        lib.nvmlDeviceGetMigDeviceHandleByIndex.as_ref(),
        lib.nvmlDeviceGetGpuInstanceId.as_ref(),
        lib.nvmlDeviceGetComputeInstanceId.as_ref(),
        lib.nvmlDeviceGetUUID.as_ref(),
    ) else {
        return uuids;
    };
    let mut count = 0;
    // SAFETY: NVML's own symbols with nvml.h's signatures, on its own
    // handles; every pointer is to a local that outlives the call.
    if nvml_try(unsafe { max(device, &mut count) }).is_err() {
        return uuids;
    }
    for index in 0..count.min(MAX_INSTANCES) {
        let mut mig: nvmlDevice_t = std::ptr::null_mut();
        if nvml_try(unsafe { by_index(device, index, &mut mig) }).is_err() {
            continue;
        }
        let (mut gi, mut ci) = (0, 0);
        let mut text = [0 as std::ffi::c_char; 96];
        let read = nvml_try(unsafe { gi_id(mig, &mut gi) })
            .and_then(|()| nvml_try(unsafe { ci_id(mig, &mut ci) }))
            .and_then(|()| {
                nvml_try(unsafe { uuid(mig, text.as_mut_ptr(), (text.len() - 1) as c_uint) })
            });
        if read.is_ok() {
            // SAFETY: NVML wrote a NUL-terminated string within the buffer
            // (its last byte is never written: the length leaves room).
            let value = unsafe { std::ffi::CStr::from_ptr(text.as_ptr()) };
            uuids.insert((gi, ci), value.to_string_lossy().into_owned());
        }
    }
    uuids
}

#[cfg(test)]
mod tests {
    use super::memory_gb;

    #[test]
    fn memory_figures_match_nvidia_smi_names() {
        // A100 40GB: 1g.5gb, 3g.20gb, 7g.40gb.
        assert_eq!(memory_gb(4864, 40960), 5);
        assert_eq!(memory_gb(19968, 40960), 20);
        assert_eq!(memory_gb(40192, 40960), 40);
        // H100 80GB HBM3 (81559 MiB): 1g.10gb, 1g.20gb, 7g.80gb.
        assert_eq!(memory_gb(9984, 81559), 10);
        assert_eq!(memory_gb(20096, 81559), 20);
        assert_eq!(memory_gb(81152, 81559), 80);
        // H200 (143771 MiB): 1g.18gb, 1g.35gb, 3g.71gb, 7g.141gb.
        assert_eq!(memory_gb(16384, 143771), 18);
        assert_eq!(memory_gb(33280, 143771), 35);
        assert_eq!(memory_gb(71424, 143771), 71);
        assert_eq!(memory_gb(143104, 143771), 141);
    }
}
