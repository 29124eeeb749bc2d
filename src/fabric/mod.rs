//! The `fabric-manager` capability: NVIDIA's fabric manager on NVSwitch
//! systems (HGX A100/H100/H200, and HGX B200/B300, whose switches are not
//! on the host's PCI bus). Until it runs, at the driver's exact version,
//! and has registered every GPU with the NVLink fabric, CUDA does not
//! start ("system not yet initialized"), so a node must not count as
//! ready before it.
//!
//! The state installs it when it is missing (the package pinned to the
//! driver's version, or NVIDIA's archive through the download cache),
//! starts it (its systemd unit, or the program itself, which daemonizes),
//! and verifies the fabric: NVML's fabric state for each GPU where the
//! driver reports it (Hopper and later), the process otherwise.

use std::time::Duration;

use crate::driver::{kernel, service};
use crate::gpu::nvml::FabricState;
use crate::gpu::pci::NvidiaFunction;
use crate::host::{Host, process};
use crate::spec::FabricManagerInstall;
use crate::state::{
    Change, ErrorKind, LookAgain, Observation, Outcome, StateContext, StateError, error_chain,
};

pub const PROGRAM: &str = "nv-fabricmanager";
/// The unit NVIDIA's packages install.
pub const SERVICE: &str = "nvidia-fabricmanager";
/// Where NVIDIA's packages put its config.
pub const PACKAGE_CONFIG: &str = "/usr/share/nvidia/nvswitch/fabricmanager.cfg";
/// NVIDIA's archive, unpacked: gpuprov's own directory.
pub const ARCHIVE_DIR: &str = "/var/lib/gpuprov/fabric-manager";
/// What gpuprov unpacked there.
pub const ARCHIVE_RECORD: &str = "/var/lib/gpuprov/fabric-manager-installed";
/// The config gpuprov writes for the unpacked archive: its topology files
/// are under the archive, not where the package puts them.
pub const ARCHIVE_CONFIG: &str = "/var/lib/gpuprov/fabric-manager.cfg";
/// How soon to look again while the fabric comes up (training the
/// NVLinks takes tens of seconds on an HGX board).
const COMING_UP: Duration = Duration::from_secs(5);

/// HGX Blackwell GPUs (B200, HGX B200, B300): their NVSwitches are not
/// on the host's PCI bus, so the GPUs themselves say a fabric is there
/// (NVIDIA's gpu-admin-tools and pci.ids).
const HGX_BLACKWELL: &[u16] = &[0x2901, 0x2909, 0x3182];

/// What makes a node an NVLink fabric node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    /// NVSwitch functions on the PCI bus (gen2 on A100, gen3 on H100/H200).
    NvSwitch { switches: usize },
    /// HGX Blackwell GPUs: the fabric manager also needs NVIDIA's NVLink
    /// subnet manager, which its service starts.
    HgxBlackwell { gpus: usize },
}

impl std::fmt::Display for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fabric::NvSwitch { switches } => write!(f, "{switches} NVSwitches on the PCI bus"),
            Fabric::HgxBlackwell { gpus } => write!(f, "{gpus} HGX Blackwell GPUs"),
        }
    }
}

/// The node's NVLink fabric, if it has one.
pub fn fabric_of(facts: &crate::facts::Facts) -> Option<Fabric> {
    let switches = facts
        .pci
        .iter()
        .filter(|f| f.nvidia_kind() == Some(NvidiaFunction::NvSwitch))
        .count();
    if switches > 0 {
        return Some(Fabric::NvSwitch { switches });
    }
    let gpus = facts
        .gpus()
        .filter(|g| HGX_BLACKWELL.contains(&g.device))
        .count();
    (gpus > 0).then_some(Fabric::HgxBlackwell { gpus })
}

/// An installed fabric manager: its program and the config it runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    binary: String,
    config: String,
}

/// The package's program on the host's PATH, else gpuprov's unpacked
/// archive.
fn installed(host: &Host) -> Result<Option<Installed>, StateError> {
    if let Some(binary) = process::on_path(host, PROGRAM)? {
        return Ok(Some(Installed {
            binary,
            config: PACKAGE_CONFIG.to_string(),
        }));
    }
    Ok(archive_binary(host)?.map(|binary| Installed {
        binary,
        config: ARCHIVE_CONFIG.to_string(),
    }))
}

/// `bin/nv-fabricmanager` in the unpacked archive (NVIDIA's archives hold
/// one top directory, `fabricmanager-linux-<arch>-<version>-archive`).
fn archive_binary(host: &Host) -> Result<Option<String>, StateError> {
    for top in host.list_dir(ARCHIVE_DIR)? {
        let binary = format!("{ARCHIVE_DIR}/{top}/bin/{PROGRAM}");
        if host.is_file(&binary)? {
            return Ok(Some(binary));
        }
    }
    Ok(None)
}

/// The `fabric-manager` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let passed_through = ctx.facts.gpus().count() > 0
        && ctx
            .facts
            .gpus()
            .all(|g| g.driver.as_deref() == Some("vfio-pci"));
    if passed_through {
        return Ok(Observation::new(
            Outcome::Disabled,
            "every GPU is bound to vfio-pci for virtual machines: their fabric is managed where they run",
        ));
    }
    let Some(fabric) = fabric_of(ctx.facts) else {
        return Ok(Observation::new(
            Outcome::Disabled,
            "no NVSwitch on the PCI bus and no HGX Blackwell GPU: no NVLink fabric to manage",
        ));
    };
    let loaded = crate::driver::detect::detect(ctx.host)
        .map_err(|e| StateError::operator(error_chain(&e)))?;
    // Before the driver is installed (a plan), the version it will have.
    let Some(driver) = loaded
        .map(|d| d.version)
        .or_else(|| ctx.spec.driver.version.clone())
    else {
        return Ok(Observation::new(
            Outcome::Blocked,
            format!("{fabric}, but no NVIDIA driver is loaded to match the fabric manager to"),
        ));
    };
    if matches!(fabric, Fabric::HgxBlackwell { .. }) && !process::systemd_runs(ctx.host)? {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "{fabric}: their fabric needs NVIDIA's NVLink subnet manager started with the fabric manager, which gpuprov does through the {SERVICE} systemd unit; this host has no systemd"
            ),
        ));
    }
    let Some(found) = installed(ctx.host)? else {
        return install(ctx, fabric, &driver, format!("{PROGRAM} is not installed"));
    };
    let mut commands = Vec::new();
    let record = ctx
        .host
        .run(&[found.binary.clone(), "--version".to_string()])?;
    let printed = service::printed_version(&record.stdout);
    let failure = record.failure_summary();
    let ran = record.success();
    commands.push(record);
    let Some(version) = printed.filter(|_| ran) else {
        let mut obs = Observation::new(
            Outcome::Failed,
            format!(
                "`{} --version` printed no version ({failure})",
                found.binary
            ),
        );
        obs.commands = commands;
        return Ok(obs);
    };
    let running = process::running(ctx.host, PROGRAM)?;
    let mut obs = if version != driver {
        mismatch(ctx, fabric, &driver, &version, &running)?
    } else if running.is_empty() {
        let mut obs = Observation::new(
            Outcome::Absent,
            format!("{fabric}; {PROGRAM} {version} is installed but not running"),
        );
        obs.on_change = Outcome::Ready;
        obs.changes.push(start(ctx.host, &found)?);
        obs
    } else {
        verify(ctx, fabric, &version)
    };
    commands.append(&mut obs.commands);
    obs.commands = commands;
    obs.details = serde_json::json!({
        "fabric": fabric.to_string(),
        "binary": found.binary,
        "version": version,
        "driverVersion": driver,
        "pids": running,
    });
    Ok(obs)
}

/// The fabric manager's version is not the driver's: it refuses to run
/// (and a running one must be stopped by whoever started it).
fn mismatch(
    ctx: &StateContext,
    fabric: Fabric,
    driver: &str,
    version: &str,
    running: &[u32],
) -> Result<Observation, StateError> {
    let why = format!(
        "{PROGRAM} {version} does not match the NVIDIA driver {driver}: the fabric manager runs only at the driver's exact version"
    );
    if !running.is_empty() {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "{why}; it runs (pid {}): stop it (systemctl stop {SERVICE}) and gpuprov installs and starts {driver}",
                running
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    install(ctx, fabric, driver, why)
}

/// Install the fabric manager at `driver`'s version, then start it; a
/// failure naming what to set when nothing says where it comes from.
fn install(
    ctx: &StateContext,
    fabric: Fabric,
    driver: &str,
    why: String,
) -> Result<Observation, StateError> {
    let Some(how) = &ctx.spec.fabric_manager.install else {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "{fabric}; {why}. gpuprov installs it at the driver's version from fabricManager.package (CUDA's nvidia-fabricmanager-{branch}={driver}-1) or fabricManager.url and sha256 (NVIDIA's fabricmanager archive), or install it yourself",
                branch = crate::driver::flavour::branch(driver)
            ),
        ));
    };
    let mut obs = Observation::new(Outcome::Absent, format!("{fabric}; {why}"));
    obs.on_change = Outcome::Ready;
    let installed = match how {
        FabricManagerInstall::Package { package, version } => {
            let manager =
                crate::toolkit::package_manager_for(&ctx.facts.os_ids).ok_or_else(|| {
                    StateError::operator(format!(
                        "no package manager is known for this OS ({}) to install {PROGRAM} with",
                        ctx.facts.os_ids.join(" ")
                    ))
                })?;
            let branch = crate::driver::flavour::branch(driver).to_string();
            let fill = |t: &str| t.replace("{branch}", &branch).replace("{version}", driver);
            let pinned = kernel::pinned(manager, &fill(package), &fill(version));
            obs.changes.push(kernel::install_package(manager, &pinned));
            // The package brings its systemd unit: where systemd runs the
            // host, the unit starts it (on HGX Blackwell, with the NVLink
            // subnet manager).
            if process::systemd_runs(ctx.host)? {
                obs.changes.push(service::systemctl_start(SERVICE));
                return Ok(obs);
            }
            Installed {
                binary: format!("/usr/bin/{PROGRAM}"),
                config: PACKAGE_CONFIG.to_string(),
            }
        }
        FabricManagerInstall::Archive {
            artifact,
            download_timeout_seconds,
        } => {
            let owned = crate::download::unpack::owned(ctx.host, ARCHIVE_RECORD, ARCHIVE_DIR)
                .map_err(StateError::operator)?;
            obs.changes.push(Change::fetch(
                ctx.host,
                artifact,
                *download_timeout_seconds,
                false,
            )?);
            obs.changes.push(Change::Unpack {
                archive: artifact.cache_path(),
                into: ARCHIVE_DIR.to_string(),
                record: ARCHIVE_RECORD.to_string(),
                replaces: owned.is_some() && ctx.host.exists(ARCHIVE_DIR)?,
            });
            let top = format!("fabricmanager-linux-{}-{driver}-archive", arch(ctx));
            obs.changes.push(Change::WriteFile {
                path: ARCHIVE_CONFIG.to_string(),
                content: archive_config(&format!("{ARCHIVE_DIR}/{top}")).into_bytes(),
                mode: 0o644,
                purpose: "the fabric manager's config, its topology files in the archive"
                    .to_string(),
                diff: None,
            });
            Installed {
                binary: format!("{ARCHIVE_DIR}/{top}/bin/{PROGRAM}"),
                config: ARCHIVE_CONFIG.to_string(),
            }
        }
    };
    obs.changes.push(start(ctx.host, &installed)?);
    Ok(obs)
}

/// NVIDIA's name for the machine in archive names.
fn arch(ctx: &StateContext) -> &'static str {
    if ctx
        .facts
        .kernel
        .as_deref()
        .is_some_and(|k| k.contains("aarch64") || k.contains("-64k"))
    {
        "sbsa"
    } else {
        "x86_64"
    }
}

/// The config for the unpacked archive: NVIDIA's defaults, daemonized,
/// logging where the package logs, the topology files from the archive.
fn archive_config(top: &str) -> String {
    format!(
        "# Written by gpuprov for the fabric manager it unpacked into {top}.\n\
         LOG_LEVEL=4\n\
         LOG_FILE_NAME=/var/log/fabricmanager.log\n\
         LOG_APPEND_TO_LOG=1\n\
         LOG_FILE_MAX_SIZE=1024\n\
         LOG_USE_SYSLOG=0\n\
         DAEMONIZE=1\n\
         BIND_INTERFACE_IP=127.0.0.1\n\
         STARTING_TCP_PORT=16000\n\
         FABRIC_MODE=0\n\
         FABRIC_MODE_RESTART=0\n\
         STATE_FILE_NAME=/tmp/fabricmanager.state\n\
         FM_CMD_BIND_INTERFACE=127.0.0.1\n\
         FM_CMD_PORT_NUMBER=6666\n\
         FM_STAY_RESIDENT_ON_FAILURES=0\n\
         ACCESS_LINK_FAILURE_MODE=0\n\
         TRUNK_LINK_FAILURE_MODE=0\n\
         NVSWITCH_FAILURE_MODE=0\n\
         ABORT_CUDA_JOBS_ON_FM_EXIT=1\n\
         TOPOLOGY_FILE_PATH={top}/share/nvidia/nvswitch\n\
         DATABASE_PATH={top}/share/nvidia/nvswitch\n"
    )
}

fn start(host: &Host, installed: &Installed) -> Result<Change, StateError> {
    service::start(
        host,
        SERVICE,
        vec![
            installed.binary.clone(),
            "-c".to_string(),
            installed.config.clone(),
        ],
    )
}

/// The fabric manager runs: is the fabric up? NVML's word for each GPU
/// where the driver reports it; the running process where it does not.
fn verify(ctx: &StateContext, fabric: Fabric, version: &str) -> Observation {
    let running = format!("{fabric}; {PROGRAM} {version} runs");
    let devices = match ctx.facts.nvml(ctx.host) {
        Ok(inventory) => &inventory.devices,
        Err(problem) => {
            return Observation::new(
                Outcome::Ready,
                format!("{running} (NVML cannot say whether the fabric is up: {problem})"),
            );
        }
    };
    let states: Vec<(&str, &FabricState)> = devices
        .iter()
        .filter_map(|d| d.fabric_state.as_ref().map(|s| (d.pci_bus_id.as_str(), s)))
        .collect();
    if states.is_empty() {
        return Observation::new(
            Outcome::Ready,
            format!("{running} (this driver does not report fabric registration)"),
        );
    }
    let failed: Vec<String> = states
        .iter()
        .filter_map(|(gpu, s)| match s {
            FabricState::Failed(why) => Some(format!("{gpu}: {why}")),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        return Observation::new(
            Outcome::Failed,
            format!(
                "{running}, but registering GPUs with the NVLink fabric failed ({}): see /var/log/fabricmanager.log",
                failed.join("; ")
            ),
        );
    }
    let up = states
        .iter()
        .filter(|(_, s)| **s == FabricState::Completed)
        .count();
    if up < states.len() {
        let mut obs = Observation::new(
            Outcome::Pending,
            format!(
                "{running}; the NVLink fabric is coming up: {up} of {} GPUs registered",
                states.len()
            ),
        );
        obs.failure_kind = ErrorKind::Transient;
        obs.look_again = Some(LookAgain::After(COMING_UP));
        return obs;
    }
    Observation::new(
        Outcome::Ready,
        format!("{running}; the NVLink fabric is up on all {up} GPUs"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PackageManager;

    #[test]
    fn packages_are_pinned_in_each_managers_syntax() {
        assert_eq!(
            kernel::pinned(
                PackageManager::Apt,
                "nvidia-fabricmanager-550",
                "550.54.15-1"
            ),
            "nvidia-fabricmanager-550=550.54.15-1"
        );
        assert_eq!(
            kernel::pinned(PackageManager::Dnf, "nvidia-fabric-manager", "550.54.15-1"),
            "nvidia-fabric-manager-550.54.15-1"
        );
        assert_eq!(
            crate::driver::flavour::branch("570.133.07").to_string(),
            "570"
        );
    }
}
