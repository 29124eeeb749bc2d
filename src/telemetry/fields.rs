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
    MemoryTemp,
    EccSbeVolatile,
    EccDbeVolatile,
    EccSbeAggregate,
    EccDbeAggregate,
    RetiredSbe,
    RetiredDbe,
    RetiredPending,
    NvlinkBandwidthTotal,
    UncorrectableRemappedRows,
    CorrectableRemappedRows,
    RowRemapFailure,
}

/// How many fields a sample holds.
pub const COUNT: usize = 25;

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
    // In dcgm-exporter's file but commented out by default; served here
    // because fleets alert on them (issue 16 asks for them).
    Field {
        name: "DCGM_FI_DEV_MEMORY_TEMP",
        kind: Kind::Gauge,
        help: "Memory temperature (in C).",
    },
    Field {
        name: "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        kind: Kind::Counter,
        help: "Total number of single-bit volatile ECC errors.",
    },
    Field {
        name: "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        kind: Kind::Counter,
        help: "Total number of double-bit volatile ECC errors.",
    },
    Field {
        name: "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        kind: Kind::Counter,
        help: "Total number of single-bit persistent ECC errors.",
    },
    Field {
        name: "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        kind: Kind::Counter,
        help: "Total number of double-bit persistent ECC errors.",
    },
    Field {
        name: "DCGM_FI_DEV_RETIRED_SBE",
        kind: Kind::Counter,
        help: "Total number of retired pages due to single-bit errors.",
    },
    Field {
        name: "DCGM_FI_DEV_RETIRED_DBE",
        kind: Kind::Counter,
        help: "Total number of retired pages due to double-bit errors.",
    },
    Field {
        name: "DCGM_FI_DEV_RETIRED_PENDING",
        kind: Kind::Counter,
        help: "Total number of pages pending retirement.",
    },
    // In the default set; a GPU without NVLink has no series.
    Field {
        name: "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        kind: Kind::Counter,
        help: "Total number of NVLink bandwidth counters for all lanes",
    },
    Field {
        name: "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        kind: Kind::Counter,
        help: "Number of remapped rows for uncorrectable errors",
    },
    Field {
        name: "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        kind: Kind::Counter,
        help: "Number of remapped rows for correctable errors",
    },
    Field {
        name: "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        kind: Kind::Gauge,
        help: "Whether remapping of rows has failed",
    },
];
