//! A driver whose modules are not loaded: after a boot that did not load
//! them (they are on disk for the running kernel: load them, install
//! nothing), or after the node booted a kernel the driver gpuprov
//! installed has no modules for (the record names the kernel it was built
//! for): build them for the running kernel with DKMS, the runfile's
//! `--kernel-module-only`, or the package manager's kernel-specific
//! package, then load them. The version stays; nothing is downloaded when
//! the runfile is in the cache.

use crate::host::Host;
use crate::spec::{DriverInstall, PackageManager};
use crate::state::{Change, Gate, Observation, Outcome, StateContext, StateError};

use super::{RECORD, RUNFILE_FLAGS, Record, load_modules, record_change, run};

/// Where DKMS keeps a module's registered source, per version.
const DKMS_TREE: &str = "/var/lib/dkms/nvidia";

/// The kernel headers a module is built against (a link into /usr/src).
fn headers(kernel: &str) -> String {
    format!("/lib/modules/{kernel}/build")
}

/// Whether modprobe finds an `nvidia` module for `kernel`: a line of the
/// kernel's `modules.dep` (what depmod wrote and modprobe reads) whose file
/// is `nvidia.ko`, compressed or not, at any path.
pub fn has_nvidia_module(host: &Host, kernel: &str) -> Result<bool, StateError> {
    let path = format!("/lib/modules/{kernel}/modules.dep");
    let Some(text) = host.read(&path)? else {
        return Ok(false);
    };
    Ok(text.lines().any(|line| {
        let file = line.split(':').next().unwrap_or_default();
        let name = file.rsplit('/').next().unwrap_or_default();
        ["nvidia.ko", "nvidia.ko.xz", "nvidia.ko.zst", "nvidia.ko.gz"].contains(&name)
    }))
}

/// The `driver` step when no NVIDIA driver is loaded and nouveau is not in
/// the way: `None` when this is not about modules on disk or a kernel
/// change (then the driver is installed as usual, if configured).
pub fn observe_unloaded(
    ctx: &StateContext,
    record: Option<&Record>,
) -> Result<Option<Observation>, StateError> {
    let spec = &ctx.spec.driver;
    let Some(kernel) = ctx.facts.kernel.as_deref() else {
        return Ok(None);
    };
    if !spec.enabled {
        return Ok(None);
    }
    // gpuprov's own install, of the version the spec asks (if it asks).
    let ours = record.filter(|r| spec.version.as_deref().is_none_or(|v| v == r.version));
    if has_nvidia_module(ctx.host, kernel)? {
        if ours.is_none() && spec.install.is_some() {
            // Someone else's modules, and the spec says what to install.
            return Ok(None);
        }
        let mut obs = Observation::new(
            Outcome::Absent,
            format!(
                "no NVIDIA kernel driver is loaded, but kernel {kernel} has its modules ({}): loading them",
                match ours {
                    Some(r) => format!("NVIDIA {}, installed by gpuprov", r.version),
                    None => "pre-installed".to_string(),
                }
            ),
        );
        obs.on_change = if ours.is_some() {
            Outcome::Installed
        } else {
            Outcome::Preinstalled
        };
        obs.changes = load_modules();
        return Ok(Some(obs));
    }
    let Some(record) = ours else {
        return Ok(None);
    };
    let built_for = match &record.kernel {
        Some(k) if k != kernel => format!(" for kernel {k}"),
        _ => String::new(),
    };
    let why = format!(
        "the node runs kernel {kernel}, and NVIDIA {} (installed by gpuprov{built_for}) has no module for it",
        record.version
    );
    let (how, build) = match rebuild(ctx, spec.install.as_ref(), record, kernel)? {
        Ok(found) => found,
        Err(refusal) => {
            let reason = format!("{why}; {refusal}");
            let mut obs = Observation::new(Outcome::Failed, reason.clone());
            obs.gate = Some(Gate::Block(format!("driver is absent: {reason}")));
            return Ok(Some(obs));
        }
    };
    let mut obs = Observation::new(Outcome::Absent, format!("{why}: rebuilding it ({how})"));
    obs.on_change = Outcome::Installed;
    obs.changes = build;
    obs.changes.extend(load_modules());
    let rebuilt = Record {
        kernel: Some(kernel.to_string()),
        ..record.clone()
    };
    obs.changes.push(record_change(
        RECORD,
        &rebuilt,
        "what gpuprov installed, and for which kernel",
    ));
    Ok(Some(obs))
}

/// How the modules of the recorded driver are built for `kernel`, in the
/// flavour it was installed as: what it is called and its changes; `Err`
/// says what the node lacks.
fn rebuild(
    ctx: &StateContext,
    install: Option<&DriverInstall>,
    record: &Record,
    kernel: &str,
) -> Result<Result<(String, Vec<Change>), String>, StateError> {
    let host = ctx.host;
    let version = record.version.as_str();
    let flavour = match record.kernel_module_type.as_deref() {
        Some("open") => Some(super::flavour::Flavour::Open),
        Some("proprietary") => Some(super::flavour::Flavour::Proprietary),
        _ => None,
    };
    let needs_headers = || -> Result<Option<String>, StateError> {
        Ok((!host.exists(&headers(kernel))?).then(|| {
            format!(
                "{} is missing: install the headers of kernel {kernel} (linux-headers-{kernel} or kernel-devel-{kernel}) and gpuprov builds the module",
                headers(kernel)
            )
        }))
    };
    if host.exists(&format!("{DKMS_TREE}/{version}"))? {
        if let Some(missing) = needs_headers()? {
            return Ok(Err(missing));
        }
        let version_arg = version.to_string();
        return Ok(Ok((
            "DKMS".to_string(),
            vec![run(&[
                "dkms",
                "install",
                "-m",
                "nvidia",
                "-v",
                &version_arg,
                "-k",
                kernel,
            ])],
        )));
    }
    match install {
        None => Ok(Err(format!(
            "DKMS has no nvidia/{version} to build it with ({DKMS_TREE}/{version}), and no driver.install is configured to build or install it from"
        ))),
        Some(DriverInstall::Runfile {
            artifact,
            args,
            download_timeout_seconds,
        }) => {
            if let Some(missing) = needs_headers()? {
                return Ok(Err(missing));
            }
            let mut argv = vec![artifact.cache_path()];
            argv.extend(RUNFILE_FLAGS.iter().map(|f| f.to_string()));
            argv.push("--kernel-module-only".to_string());
            argv.extend(flavour.and_then(|f| super::runfile_flavour_flag(f, version)));
            argv.push(format!("--kernel-source-path={}", headers(kernel)));
            argv.extend(args.iter().cloned());
            Ok(Ok((
                "the runfile's --kernel-module-only".to_string(),
                vec![
                    Change::fetch(host, artifact, *download_timeout_seconds, true)?,
                    Change::Run {
                        display: argv.join(" "),
                        argv,
                    },
                ],
            )))
        }
        Some(DriverInstall::Package {
            kernel_module_package: Some(template),
            ..
        }) => {
            let manager = super::package_manager(ctx)?;
            let package = match flavour {
                Some(flavour) => super::flavoured_module_package(manager, template, flavour),
                None => template.clone(),
            }
            .replace("{kernel}", kernel);
            Ok(Ok((
                format!("the package {package}"),
                vec![install_package(manager, &package)],
            )))
        }
        Some(DriverInstall::Package { .. }) => Ok(Err(format!(
            "DKMS has no nvidia/{version} to build it with ({DKMS_TREE}/{version}); set driver.install.kernelModulePackage to the package with the modules for a kernel (`linux-modules-nvidia-550-server-{{kernel}}` on Ubuntu)"
        ))),
    }
}

/// `package` pinned to `version` in the manager's own syntax.
pub fn pinned(manager: PackageManager, package: &str, version: &str) -> String {
    match manager {
        PackageManager::Apt | PackageManager::Zypper => format!("{package}={version}"),
        PackageManager::Dnf | PackageManager::Yum => format!("{package}-{version}"),
    }
}

/// The change that installs `package` (pinned or not), unattended.
pub fn install_package(manager: PackageManager, package: &str) -> Change {
    run(&package_install(manager, package))
}

/// The package manager's unattended install of `package` (pinned or not).
pub fn package_install(manager: PackageManager, package: &str) -> Vec<&str> {
    match manager {
        PackageManager::Apt => vec![
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            package,
        ],
        PackageManager::Dnf => vec!["dnf", "install", "-y", package],
        PackageManager::Yum => vec!["yum", "install", "-y", package],
        PackageManager::Zypper => vec!["zypper", "--non-interactive", "install", package],
    }
}
