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
        let vendor = read_hex(
            host,
            &format!("{dir}/vendor"),
            0xffff,
            "a 16-bit hex id like 0x10de",
        )? as u16;
        let device = read_hex(
            host,
            &format!("{dir}/device"),
            0xffff,
            "a 16-bit hex id like 0x2330",
        )? as u16;
        let class = read_hex(
            host,
            &format!("{dir}/class"),
            0xff_ffff,
            "a 24-bit hex class like 0x030200",
        )? as u32;
        functions.push(PciFunction {
            driver: host.link_name(&format!("{dir}/driver"))?,
            virtual_function: host.link_name(&format!("{dir}/physfn"))?.is_some(),
            address,
            vendor,
            device,
            class,
        });
    }
    Ok(functions)
}

fn read_hex(host: &Host, path: &str, max: u64, expected: &'static str) -> Result<u64, PciError> {
    let text = host.read(path)?.ok_or_else(|| PciError::BadValue {
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
