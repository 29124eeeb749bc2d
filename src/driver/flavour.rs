//! Which kernel modules a node's GPUs need: NVIDIA's open modules drive
//! Turing and later and are the only ones for Blackwell; GPUs before
//! Turing (Maxwell, Pascal, Volta) need the proprietary ones. From driver
//! 560 on, open is NVIDIA's default.

use serde::Serialize;

use crate::spec::KernelModuleType;

/// A GPU generation, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Kepler,
    Maxwell,
    Pascal,
    Volta,
    Turing,
    Ampere,
    Ada,
    Hopper,
    Blackwell,
}

impl Architecture {
    /// From the PCI device id: NVIDIA numbers each generation's chips in
    /// blocks (pci.ids): GP100 0x15f0, GV100 0x1d80, TU10x 0x1e00, GA100
    /// 0x2080, GA10x 0x2200 and 0x2400, GH100 0x2300, AD10x 0x2600, GB100 0x2900, GB20x 0x2b00,
    /// GB110 0x3100. `None` for an id outside the known blocks.
    pub fn of_device(device: u16) -> Option<Architecture> {
        use Architecture::*;
        Some(match device {
            0x0fc0..=0x12ff => Kepler,
            0x1340..=0x13ff | 0x1400..=0x15ef | 0x1600..=0x17ff => Maxwell,
            0x15f0..=0x15ff | 0x1b00..=0x1d7f => Pascal,
            0x1d80..=0x1dff => Volta,
            0x1e00..=0x1fff | 0x2180..=0x21ff => Turing,
            0x2080..=0x20ff | 0x2200..=0x22ff | 0x2400..=0x25ff => Ampere,
            0x2300..=0x23ff => Hopper,
            0x2600..=0x28ff => Ada,
            0x2900..=0x29ff | 0x2b00..=0x2fff | 0x3100..=0x31ff => Blackwell,
            _ => return None,
        })
    }

    /// From the CUDA compute capability NVML reports.
    pub fn of_capability((major, minor): (i32, i32)) -> Option<Architecture> {
        use Architecture::*;
        Some(match (major, minor) {
            (3, _) => Kepler,
            (5, _) => Maxwell,
            (6, _) => Pascal,
            (7, 0..=4) => Volta,
            (7, _) => Turing,
            (8, 9) => Ada,
            (8, _) => Ampere,
            (9, _) => Hopper,
            (10.., _) => Blackwell,
            _ => return None,
        })
    }

    /// NVIDIA's open modules cannot drive it.
    pub fn needs_proprietary(self) -> bool {
        self < Architecture::Turing
    }

    /// The proprietary modules cannot drive it.
    pub fn needs_open(self) -> bool {
        self >= Architecture::Blackwell
    }

    fn name(self) -> &'static str {
        match self {
            Architecture::Kepler => "Kepler",
            Architecture::Maxwell => "Maxwell",
            Architecture::Pascal => "Pascal",
            Architecture::Volta => "Volta",
            Architecture::Turing => "Turing",
            Architecture::Ampere => "Ampere",
            Architecture::Ada => "Ada",
            Architecture::Hopper => "Hopper",
            Architecture::Blackwell => "Blackwell",
        }
    }
}

/// The kernel modules a driver is built as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    Open,
    Proprietary,
}

impl Flavour {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavour::Open => "open",
            Flavour::Proprietary => "proprietary",
        }
    }
}

/// A GPU on the bus and its generation, if known.
#[derive(Debug, Clone)]
pub struct Gpu {
    pub address: String,
    pub architecture: Option<Architecture>,
}

/// The first driver branch with open modules.
const FIRST_OPEN_BRANCH: u32 = 515;
/// From this branch on, open is the default.
const OPEN_BY_DEFAULT: u32 = 560;
/// The last branch that drives Maxwell, Pascal and Volta.
const LAST_PRE_TURING_BRANCH: u32 = 580;

/// The node's GPUs, their generation from the PCI id, else from NVML's
/// compute capability (matched by bus id).
pub fn gpus(ctx: &crate::state::StateContext) -> Vec<Gpu> {
    let nvml = ctx.facts.nvml(ctx.host).as_ref().ok();
    ctx.facts
        .gpus()
        .map(|g| Gpu {
            address: g.address.clone(),
            architecture: Architecture::of_device(g.device).or_else(|| {
                nvml?
                    .devices
                    .iter()
                    .find(|d| d.sysfs_address() == g.address)
                    .and_then(|d| Architecture::of_capability(d.compute_capability))
            }),
        })
        .collect()
}

/// `0000:04:00.0 (Pascal)`, or `8 Blackwell GPUs (0000:18:00.0 and 7
/// more)`: one entry a generation.
fn listed(gpus: &[&Gpu]) -> String {
    let mut by_generation: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for gpu in gpus {
        by_generation
            .entry(gpu.architecture.map_or("unknown", Architecture::name))
            .or_default()
            .push(&gpu.address);
    }
    by_generation
        .iter()
        .map(|(generation, addresses)| match addresses.as_slice() {
            [one] => format!("{one} ({generation})"),
            [first, rest @ ..] => format!(
                "{} {generation} GPUs ({first} and {} more)",
                addresses.len(),
                rest.len()
            ),
            [] => String::new(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The flavour to install for `wanted` on these GPUs with driver `branch`,
/// and why; `Err` says why none can serve them.
pub fn choose(
    wanted: KernelModuleType,
    gpus: &[Gpu],
    branch: u32,
) -> Result<(Flavour, String), String> {
    let arch = |pick: fn(Architecture) -> bool| -> Vec<&Gpu> {
        gpus.iter()
            .filter(|g| g.architecture.is_some_and(pick))
            .collect()
    };
    let (open_only, proprietary_only) = (
        arch(Architecture::needs_open),
        arch(Architecture::needs_proprietary),
    );
    if !proprietary_only.is_empty() && branch > LAST_PRE_TURING_BRANCH {
        return Err(format!(
            "driver {branch} does not support GPUs before Turing ({}); {LAST_PRE_TURING_BRANCH} is the last branch that does",
            listed(&proprietary_only)
        ));
    }
    let open_check = |why: String| {
        if branch < FIRST_OPEN_BRANCH {
            Err(format!(
                "{why}, but driver {branch} has no open kernel modules (they start at {FIRST_OPEN_BRANCH})"
            ))
        } else {
            Ok((Flavour::Open, why))
        }
    };
    match wanted {
        KernelModuleType::Open if !proprietary_only.is_empty() => Err(format!(
            "driver.kernelModuleType is open, but NVIDIA's open kernel modules cannot drive {}: they need the proprietary ones",
            listed(&proprietary_only)
        )),
        KernelModuleType::Open => open_check("driver.kernelModuleType is open".to_string()),
        KernelModuleType::Proprietary if !open_only.is_empty() => Err(format!(
            "driver.kernelModuleType is proprietary, but {} need NVIDIA's open kernel modules",
            listed(&open_only)
        )),
        KernelModuleType::Proprietary => Ok((
            Flavour::Proprietary,
            "driver.kernelModuleType is proprietary".to_string(),
        )),
        KernelModuleType::Auto => match (open_only.is_empty(), proprietary_only.is_empty()) {
            (false, false) => Err(format!(
                "no kernel module flavour drives every GPU here: {} need the open modules and {} the proprietary ones",
                listed(&open_only),
                listed(&proprietary_only)
            )),
            (false, true) => open_check(format!("{} need the open modules", listed(&open_only))),
            (true, false) => Ok((
                Flavour::Proprietary,
                format!("{} need the proprietary modules", listed(&proprietary_only)),
            )),
            (true, true) if branch >= OPEN_BY_DEFAULT => {
                Ok((Flavour::Open, format!("open is driver {branch}'s default")))
            }
            (true, true) => Ok((
                Flavour::Proprietary,
                format!("proprietary is driver {branch}'s default"),
            )),
        },
    }
}

/// A loaded flavour that cannot drive one of the GPUs: why.
pub fn cannot_drive(loaded: Flavour, gpus: &[Gpu]) -> Option<String> {
    let (cannot, needs): (fn(Architecture) -> bool, &str) = match loaded {
        Flavour::Open => (Architecture::needs_proprietary, "the proprietary ones"),
        Flavour::Proprietary => (Architecture::needs_open, "the open ones"),
    };
    let stuck: Vec<&Gpu> = gpus
        .iter()
        .filter(|g| g.architecture.is_some_and(cannot))
        .collect();
    (!stuck.is_empty()).then(|| {
        format!(
            "the {} kernel modules are loaded, but {} need {needs}",
            loaded.as_str(),
            listed(&stuck)
        )
    })
}

/// The branch of a driver version (`550` of `550.54.15`).
pub fn branch(version: &str) -> u32 {
    version
        .split('.')
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(device: u16) -> Gpu {
        Gpu {
            address: format!("0000:{:02x}:00.0", device & 0xff),
            architecture: Architecture::of_device(device),
        }
    }

    #[test]
    fn device_ids_name_their_generation() {
        use Architecture::*;
        for (device, arch) in [
            (0x15f8, Pascal),
            (0x1b80, Pascal),
            (0x13c2, Maxwell),
            (0x1db1, Volta),
            (0x1eb8, Turing),
            (0x1e04, Turing),
            (0x20b2, Ampere),
            (0x2236, Ampere),
            (0x2330, Hopper),
            (0x2342, Hopper),
            (0x27b8, Ada),
            (0x26b9, Ada),
            (0x2901, Blackwell),
            (0x2b85, Blackwell),
            (0x3182, Blackwell),
        ] {
            assert_eq!(Architecture::of_device(device), Some(arch), "{device:04x}");
        }
        assert_eq!(Architecture::of_capability((10, 0)), Some(Blackwell));
        assert_eq!(Architecture::of_capability((7, 5)), Some(Turing));
        assert_eq!(Architecture::of_capability((7, 0)), Some(Volta));
    }

    #[test]
    fn auto_chooses_what_the_gpus_and_the_branch_need() {
        let auto = KernelModuleType::Auto;
        assert_eq!(choose(auto, &[gpu(0x2901)], 570).unwrap().0, Flavour::Open);
        assert_eq!(
            choose(auto, &[gpu(0x15f8)], 550).unwrap().0,
            Flavour::Proprietary
        );
        assert_eq!(
            choose(auto, &[gpu(0x2330)], 550).unwrap().0,
            Flavour::Proprietary
        );
        assert_eq!(choose(auto, &[gpu(0x2330)], 570).unwrap().0, Flavour::Open);
        let mixed = choose(auto, &[gpu(0x2901), gpu(0x15f8)], 570).unwrap_err();
        assert!(mixed.contains("no kernel module flavour"), "{mixed}");
        assert!(choose(KernelModuleType::Open, &[gpu(0x15f8)], 550).is_err());
        assert!(choose(KernelModuleType::Proprietary, &[gpu(0x2901)], 570).is_err());
        assert!(choose(KernelModuleType::Open, &[gpu(0x2330)], 510).is_err());
        assert!(
            choose(auto, &[gpu(0x15f8)], 590)
                .unwrap_err()
                .contains("580")
        );
    }

    #[test]
    fn a_loaded_flavour_that_cannot_drive_a_gpu_says_so() {
        assert!(cannot_drive(Flavour::Open, &[gpu(0x15f8)]).is_some());
        assert!(cannot_drive(Flavour::Proprietary, &[gpu(0x2901)]).is_some());
        assert!(cannot_drive(Flavour::Open, &[gpu(0x2330)]).is_none());
    }
}
