//! The DCGM exporter's default fields that NVML can give, with its names,
//! types and help texts (dcgm-exporter 3.3.9's `etc/default-counters.csv`,
//! the version `deploy/operands` runs), in its order.

/// A Prometheus metric type, as dcgm-exporter declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        }
    }
}

/// One of dcgm-exporter's fields.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// Where each field's value sits in a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Id {
    SmClock,
    MemClock,
    GpuTemp,
    PowerUsage,
    TotalEnergy,
    PcieReplays,
    GpuUtil,
    MemCopyUtil,
    EncUtil,
    DecUtil,
    FbFree,
    FbUsed,
    XidErrors,
}

/// How many fields a sample holds.
pub const COUNT: usize = 13;

/// Indexed by `Id`.
pub const FIELDS: [Field; COUNT] = [
    Field {
        name: "DCGM_FI_DEV_SM_CLOCK",
        kind: Kind::Gauge,
        help: "SM clock frequency (in MHz).",
    },
    Field {
        name: "DCGM_FI_DEV_MEM_CLOCK",
        kind: Kind::Gauge,
        help: "Memory clock frequency (in MHz).",
    },
    Field {
        name: "DCGM_FI_DEV_GPU_TEMP",
        kind: Kind::Gauge,
        help: "GPU temperature (in C).",
    },
    Field {
        name: "DCGM_FI_DEV_POWER_USAGE",
        kind: Kind::Gauge,
        help: "Power draw (in W).",
    },
    Field {
        name: "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        kind: Kind::Counter,
        help: "Total energy consumption since boot (in mJ).",
    },
    Field {
        name: "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        kind: Kind::Counter,
        help: "Total number of PCIe retries.",
    },
    Field {
        name: "DCGM_FI_DEV_GPU_UTIL",
        kind: Kind::Gauge,
        help: "GPU utilization (in %).",
    },
    Field {
        name: "DCGM_FI_DEV_MEM_COPY_UTIL",
        kind: Kind::Gauge,
        help: "Memory utilization (in %).",
    },
    Field {
        name: "DCGM_FI_DEV_ENC_UTIL",
        kind: Kind::Gauge,
        help: "Encoder utilization (in %).",
    },
    Field {
        name: "DCGM_FI_DEV_DEC_UTIL",
        kind: Kind::Gauge,
        help: "Decoder utilization (in %).",
    },
    Field {
        name: "DCGM_FI_DEV_FB_FREE",
        kind: Kind::Gauge,
        help: "Frame buffer memory free (in MB).",
    },
    Field {
        name: "DCGM_FI_DEV_FB_USED",
        kind: Kind::Gauge,
        help: "Frame buffer memory used (in MB).",
    },
    Field {
        name: "DCGM_FI_DEV_XID_ERRORS",
        kind: Kind::Gauge,
        help: "Value of the last XID error encountered.",
    },
];
