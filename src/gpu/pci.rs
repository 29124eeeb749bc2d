//! PCI functions as sysfs shows them under `/sys/bus/pci/devices`.

use serde::Serialize;

use crate::host::{Host, HostError};

pub const NVIDIA_VENDOR: u16 = 0x10de;
const DEVICES: &str = "/sys/bus/pci/devices";
/// NVSwitch device ids: gen2 (A100 boards) and gen3 (H100/H200 boards).
const NVSWITCH_DEVICES: &[u16] = &[0x1af1, 0x22a3];

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{path}: expected {expected}, found {found:?}")]
    BadValue {
        path: String,
        expected: &'static str,
        found: String,
    },
}

/// One PCI function. `class` is sysfs's 24-bit form, prog-if included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PciFunction {
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    /// The bound kernel driver (`nvidia`, `nouveau`, `vfio-pci`), if any.
    pub driver: Option<String>,
    /// An SR-IOV virtual function (it has a `physfn` link).
    pub virtual_function: bool,
    /// A vGPU (the function a VM sees), from its PCI config space.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vgpu: Option<VgpuInfo>,
}

/// What an NVIDIA vGPU's vendor-specific PCI capability says about the
/// host's driver (GFD's `vgpu.host-driver-*` labels).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct VgpuInfo {
    pub host_driver_version: String,
    pub host_driver_branch: String,
}

/// The vGPU capability in a function's config space: the vendor-specific
/// capability (id 0x09) whose bytes 3 and 4 are `V`, `F`, as NVIDIA's
/// vGPU manager exposes it. `None` for any other device, or a config space
/// too short to hold one.
pub fn vgpu_info(config: &[u8]) -> Option<VgpuInfo> {
    const STATUS: usize = 0x06;
    const CAPABILITIES: usize = 0x34;
    const VENDOR_SPECIFIC: u8 = 0x09;
    if config.len() < 0x40 || config[STATUS] & 0x10 == 0 {
        return None;
    }
    let mut at = usize::from(config[CAPABILITIES] & 0xfc);
    // The list is at most 48 capabilities of 4 bytes; a loop is corrupt.
    for _ in 0..48 {
        if at < 0x40 || at + 3 > config.len() {
            return None;
        }
        if config[at] == VENDOR_SPECIFIC {
            let end = (at + usize::from(config[at + 2])).min(config.len());
            let capability = &config[at..end];
            if capability.len() >= 5 && capability[3] == b'V' && capability[4] == b'F' {
                return Some(vgpu_records(capability));
            }
        }
        at = usize::from(config[at + 1] & 0xfc);
    }
    None
}

/// The host driver's version and branch, in the capability's record list
/// (from byte 5: a record id and its length, until a record id 0, which
/// holds 10 bytes of version and 10 of branch); empty when absent.
fn vgpu_records(capability: &[u8]) -> VgpuInfo {
    let byte = |i: usize| capability.get(i).copied().unwrap_or(0);
    let mut at = 5;
    while byte(at) != 0 && at < capability.len() {
        let length = usize::from(byte(at + 1));
        if length == 0 {
            return VgpuInfo::default();
        }
        at += length;
    }
    let text = |from: usize| {
        let bytes = capability.get(from..from + 10).unwrap_or_default();
        String::from_utf8_lossy(bytes)
            .trim_matches('\0')
            .to_string()
    };
    if byte(at) == 0 && at + 22 <= capability.len() {
        VgpuInfo {
            host_driver_version: text(at + 2),
            host_driver_branch: text(at + 12),
        }
    } else {
        VgpuInfo::default()
    }
}

/// What an NVIDIA function is, for counting and for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NvidiaFunction {
    Gpu,
    VirtualFunction,
    NvSwitch,
    Audio,
    Usb,
    PciBridge,
    Other,
}

impl NvidiaFunction {
    pub fn describe(self) -> &'static str {
        match self {
            NvidiaFunction::Gpu => "GPU",
            NvidiaFunction::VirtualFunction => "SR-IOV virtual function",
            NvidiaFunction::NvSwitch => "NVSwitch",
            NvidiaFunction::Audio => "HDMI/DP audio",
            NvidiaFunction::Usb => "USB controller",
            NvidiaFunction::PciBridge => "PCI bridge (e.g. Grace root port)",
            NvidiaFunction::Other => "other NVIDIA function",
        }
    }
}

impl PciFunction {
    /// Class and subclass, without the programming interface (0x0302).
    pub fn class_code(&self) -> u16 {
        (self.class >> 8) as u16
    }

    /// `None` for another vendor's function, whatever its subsystem vendor.
    pub fn nvidia_kind(&self) -> Option<NvidiaFunction> {
        if self.vendor != NVIDIA_VENDOR {
            return None;
        }
        let kind = match self.class_code() {
            0x0300 | 0x0302 if self.virtual_function => NvidiaFunction::VirtualFunction,
            0x0300 | 0x0302 => NvidiaFunction::Gpu,
            0x0680 if NVSWITCH_DEVICES.contains(&self.device) => NvidiaFunction::NvSwitch,
            0x0403 => NvidiaFunction::Audio,
            0x0c03 | 0x0c80 => NvidiaFunction::Usb,
            0x0604 => NvidiaFunction::PciBridge,
            _ => NvidiaFunction::Other,
        };
        Some(kind)
    }

    pub fn is_gpu(&self) -> bool {
        self.nvidia_kind() == Some(NvidiaFunction::Gpu)
    }

    /// NFD labels `pci-<vendor>.present` for functions in its default class
    /// list: display (03), co-processor (0b40) and accelerator (12) classes.
    pub fn counts_for_nfd(&self) -> bool {
        let class = self.class_code();
        class >> 8 == 0x03 || class == 0x0b40 || class >> 8 == 0x12
    }
}

/// Every PCI function of the host, in address order.
pub fn scan(host: &Host) -> Result<Vec<PciFunction>, PciError> {
    let mut functions = Vec::new();
    for address in host.list_dir(DEVICES)? {
        let dir = format!("{DEVICES}/{address}");
        // Each function's directory is resolved once and its attributes
        // read beside its listing: a big server has hundreds of functions.
        let listing = host.read_dir(&dir)?;
        let read = |name: &str| match &listing {
            Some(listing) => host.read_entry(listing, name),
            None => Ok(None),
        };
        let link_name = |name: &str| -> Result<Option<String>, HostError> {
            let Some(listing) = &listing else {
                return Ok(None);
            };
            if listing.kind(name) != Some(rustix::fs::FileType::Symlink) {
                return Ok(None);
            }
            Ok(listing.link_target(name)?.and_then(|target| {
                std::path::Path::new(&target)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            }))
        };
        let vendor = read_hex(
            read("vendor")?,
            &format!("{dir}/vendor"),
            0xffff,
            "a 16-bit hex id like 0x10de",
        )? as u16;
        let device = read_hex(
            read("device")?,
            &format!("{dir}/device"),
            0xffff,
            "a 16-bit hex id like 0x2330",
        )? as u16;
        let class = read_hex(
            read("class")?,
            &format!("{dir}/class"),
            0xff_ffff,
            "a 24-bit hex class like 0x030200",
        )? as u32;
        // Only NVIDIA's display functions can be vGPUs; a config space
        // that cannot be read (not root, not there) is not one.
        let vgpu = if vendor == NVIDIA_VENDOR && class >> 16 == 0x03 {
            host.read_bytes(&format!("{dir}/config"))
                .ok()
                .flatten()
                .and_then(|config| vgpu_info(&config))
        } else {
            None
        };
        functions.push(PciFunction {
            vgpu,
            driver: link_name("driver")?,
            virtual_function: link_name("physfn")?.is_some(),
            address,
            vendor,
            device,
            class,
        });
    }
    Ok(functions)
}

/// A sysfs attribute's text (`None`: not there) as a hex number.
fn read_hex(
    text: Option<String>,
    path: &str,
    max: u64,
    expected: &'static str,
) -> Result<u64, PciError> {
    let text = text.ok_or_else(|| PciError::BadValue {
        path: path.to_string(),
        expected,
        found: "no such file".to_string(),
    })?;
    let bad = || PciError::BadValue {
        path: path.to_string(),
        expected,
        found: text.clone(),
    };
    let digits = text.trim().strip_prefix("0x").ok_or_else(bad)?;
    match u64::from_str_radix(digits, 16) {
        Ok(value) if value <= max && !digits.is_empty() => Ok(value),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 256-byte config space whose capability list holds a power
    /// management capability at 0x60, then `vendor` at 0x68.
    fn config_with(vendor: &[u8]) -> Vec<u8> {
        let mut config = vec![0u8; 256];
        config[0x06] = 0x10; // the status register: a capability list
        config[0x34] = 0x60;
        config[0x60] = 0x01; // power management, next at 0x68
        config[0x61] = 0x68;
        config[0x68..0x68 + vendor.len()].copy_from_slice(vendor);
        config
    }

    #[test]
    fn a_vgpu_capability_gives_the_host_driver() {
        // id 9, no next, length 32, "VF", then one record (id 1, 4 bytes)
        // and the terminating record 0 with version and branch.
        let mut vendor = vec![0x09, 0x00, 32, b'V', b'F', 0x01, 4, 0, 0];
        vendor.extend([0, 0]);
        vendor.extend(b"550.54.15\0");
        vendor.extend(b"r550_00\0\0\0");
        assert_eq!(
            vgpu_info(&config_with(&vendor)),
            Some(VgpuInfo {
                host_driver_version: "550.54.15".to_string(),
                host_driver_branch: "r550_00".to_string(),
            })
        );
    }

    #[test]
    fn other_config_spaces_are_not_vgpus() {
        // Another vendor-specific capability.
        assert_eq!(vgpu_info(&config_with(&[0x09, 0x00, 8, b'N', b'V'])), None);
        // No capability list.
        let mut plain = config_with(&[0x09, 0x00, 8, b'V', b'F']);
        plain[0x06] = 0;
        assert_eq!(vgpu_info(&plain), None);
        // The 64 bytes an unprivileged reader gets, and nothing.
        assert_eq!(vgpu_info(&plain[..64]), None);
        assert_eq!(vgpu_info(&[]), None);
        // A list that loops on itself ends.
        let mut looped = config_with(&[0x01, 0x60]);
        looped[0x61] = 0x68;
        assert_eq!(vgpu_info(&looped), None);
    }

    #[test]
    fn a_vgpu_without_the_driver_record_is_still_a_vgpu() {
        let info = vgpu_info(&config_with(&[0x09, 0x00, 5, b'V', b'F'])).unwrap();
        assert_eq!(info, VgpuInfo::default());
    }
}
