//! The NVIDIA kernel driver: detect it, install it (a pinned runfile or a
//! pinned package), load its modules, and deal with nouveau.

pub mod detect;
pub mod flavour;
pub mod kernel;
pub mod service;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::host::Host;
use crate::host::secure_boot::SecureBoot;
use crate::spec::{DriverInstall, PackageManager, UpgradePolicy};
use crate::state::{Change, Gate, Observation, Outcome, StateContext, StateError, error_chain};

/// The GPU Operator's label for a node whose driver it must not deploy.
pub const DEPLOY_DRIVER_LABEL: &str = "nvidia.com/gpu.deploy.driver";
/// What gpuprov installed, so later runs say `installed` and verify it.
pub const RECORD: &str = "/var/lib/gpuprov/driver.json";
/// The install in progress, written before it starts and removed once the
/// record is written: a run killed in between leaves it, and the next run
/// that finds that driver loaded finishes the bookkeeping instead of
/// calling gpuprov's own driver pre-installed.
pub const INSTALLING: &str = "/var/lib/gpuprov/driver-installing.json";
pub const NOUVEAU_BLACKLIST: &str = "/etc/modprobe.d/gpuprov-blacklist-nouveau.conf";
/// Loaded in this order, unloaded in the reverse.
const MODULES: [&str; 3] = ["nvidia", "nvidia-uvm", "nvidia-modeset"];
/// The runfile's flags for an unattended install.
pub const RUNFILE_FLAGS: [&str; 4] = [
    "--silent",
    "--accept-license",
    "--no-questions",
    "--ui=none",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: String,
    pub method: String,
    /// The runfile's sha256, or the package and its version.
    pub source: String,
    /// The kernel release its modules were built for (absent in records
    /// written before gpuprov noted it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// `open` or `proprietary` (absent in records written before gpuprov
    /// chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_module_type: Option<String>,
}

fn load_record(host: &Host, path: &str) -> Result<Option<Record>, StateError> {
    match host.read(path)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::operator(format!("{path}: {e}"))),
    }
}

fn record_change(path: &str, record: &Record, purpose: &str) -> Change {
    Change::WriteFile {
        path: path.to_string(),
        content: (serde_json::to_string_pretty(record).expect("serializes") + "\n").into_bytes(),
        mode: 0o644,
        purpose: purpose.to_string(),
        diff: None,
    }
}

/// The node label with the loaded driver's kernel module flavour.
pub const KERNEL_MODULE_TYPE_LABEL: &str = "gpuprov.io/driver.kernel-module-type";
/// The node label saying whether the node booted with Secure Boot.
pub const SECURE_BOOT_LABEL: &str = "gpuprov.io/secure-boot";

/// The `driver` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    // A failure is reported with the label too: Secure Boot is often why.
    let mut obs = observe_driver(ctx).unwrap_or_else(|e| Observation::failed(&e));
    obs.labels.insert(
        SECURE_BOOT_LABEL.to_string(),
        ctx.facts.secure_boot.label().to_string(),
    );
    Ok(obs)
}

fn observe_driver(ctx: &StateContext) -> Result<Observation, StateError> {
    let loaded = detect::detect(ctx.host).map_err(|e| StateError::operator(error_chain(&e)))?;
    let mut record = load_record(ctx.host, RECORD)?;
    let installing = load_record(ctx.host, INSTALLING)?;
    // An install a killed run left behind: once its driver is loaded, it
    // is gpuprov's. The run may have stopped between modules, so the
    // loading steps (each a no-op when done) run again, then the record.
    let mut bookkeeping = Vec::new();
    if let (Some(intent), Some(driver)) = (&installing, &loaded)
        && intent.version == driver.version
    {
        bookkeeping.extend(load_modules());
        if record.as_ref() != Some(intent) {
            bookkeeping.push(record_change(
                RECORD,
                intent,
                "what gpuprov installed (an interrupted install)",
            ));
            record = Some(intent.clone());
        }
        bookkeeping.push(Change::RemoveFile {
            path: INSTALLING.to_string(),
            purpose: "the install is done".to_string(),
        });
    }
    match loaded {
        Some(driver) => {
            let mut obs = observe_loaded(ctx, driver, record)?;
            if !bookkeeping.is_empty() {
                if obs.changes.is_empty() {
                    obs.on_change = obs.outcome;
                }
                bookkeeping.append(&mut obs.changes);
                obs.changes = bookkeeping;
            }
            Ok(obs)
        }
        None if nouveau_holds_the_gpu(ctx)? => observe_nouveau(ctx),
        None => match kernel::observe_unloaded(ctx, record.as_ref())? {
            Some(obs) => Ok(obs),
            None => not_loaded(ctx),
        },
    }
}

/// No driver loaded, none on disk to load: install the one configured.
fn not_loaded(ctx: &StateContext) -> Result<Observation, StateError> {
    let spec = &ctx.spec.driver;
    match &spec.install {
        _ if !spec.enabled => Ok(absent(ctx, "driver.enabled is false, so gpuprov will not install one".to_string())),
        None => Ok(absent(
            ctx,
            "no driver.install is configured: pre-install the driver or configure a runfile or package".to_string(),
        )),
        Some(install) => {
            let (changes, how) = install_changes(ctx, install)?;
            let mut obs = Observation::new(
                Outcome::Absent,
                format!("no NVIDIA kernel driver is loaded; installing {how}"),
            );
            obs.on_change = Outcome::Installed;
            obs.changes = changes;
            Ok(obs)
        }
    }
}

/// A loaded driver, labelled with its kernel module flavour whatever
/// else is decided about it.
fn observe_loaded(
    ctx: &StateContext,
    driver: detect::LoadedDriver,
    record: Option<Record>,
) -> Result<Observation, StateError> {
    let kind = if driver.open_kernel_module {
        flavour::Flavour::Open
    } else {
        flavour::Flavour::Proprietary
    };
    let mut obs = observe_loaded_driver(ctx, driver, record, kind)?;
    obs.labels.insert(
        KERNEL_MODULE_TYPE_LABEL.to_string(),
        kind.as_str().to_string(),
    );
    Ok(obs)
}

fn observe_loaded_driver(
    ctx: &StateContext,
    driver: detect::LoadedDriver,
    record: Option<Record>,
    loaded_flavour: flavour::Flavour,
) -> Result<Observation, StateError> {
    let spec = &ctx.spec.driver;
    let kind = loaded_flavour.as_str();
    if let Some(why) = flavour::cannot_drive(loaded_flavour, &flavour::gpus(ctx)) {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "NVIDIA {} is loaded, but {why}: install the driver with driver.kernelModuleType set for these GPUs",
                driver.version
            ),
        ));
    }
    let ours = record.as_ref().is_some_and(|r| r.version == driver.version);
    if let Some(record) = &record
        && !ours
        && spec.version.as_deref() == Some(record.version.as_str())
    {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "gpuprov installed {} but {} is loaded",
                record.version, driver.version
            ),
        ));
    }
    let outcome = if ours {
        Outcome::Installed
    } else {
        Outcome::Preinstalled
    };
    if spec.upgrade_policy == UpgradePolicy::Rolling
        && spec.enabled
        && let (Some(wanted), Some(install)) = (&spec.version, &spec.install)
        && let Some(mut obs) = crate::upgrade::observe(
            ctx,
            &driver.version,
            wanted,
            replace_changes(ctx, install)?,
            outcome,
        )?
    {
        if obs.outcome == Outcome::Preinstalled {
            obs.labels
                .insert(DEPLOY_DRIVER_LABEL.to_string(), "pre-installed".to_string());
        }
        let upgrade = std::mem::take(&mut obs.details);
        obs.details = serde_json::to_value(&driver).expect("serializes");
        if let (Some(details), serde_json::Value::Object(more)) =
            (obs.details.as_object_mut(), upgrade)
        {
            details.extend(more);
        }
        return Ok(obs);
    }
    let mut reason = format!("NVIDIA {} ({kind} kernel module) is loaded", driver.version);
    let mut changes = Vec::new();
    if let Some(wanted) = &spec.version
        && *wanted != driver.version
    {
        match (spec.upgrade_policy, &spec.install, spec.enabled) {
            (UpgradePolicy::IfDifferent, Some(install), true) => {
                let users = gpu_users(ctx.host)?;
                if !users.is_empty() && !spec.force {
                    return Ok(Observation::new(
                        Outcome::Failed,
                        format!(
                            "refusing to replace {} with {wanted} while GPU processes run ({}); stop them or set driver.force",
                            driver.version,
                            users.join(", ")
                        ),
                    ));
                }
                changes.extend(replace_changes(ctx, install)?);
                reason.push_str(&format!(
                    "; driver.upgradePolicy ifDifferent replaces it with {wanted}"
                ));
            }
            _ => reason.push_str(&format!(
                "; driver.version asks {wanted}, the loaded driver is kept"
            )),
        }
    }
    let elsewhere: Vec<String> = ctx
        .facts
        .gpus()
        .filter(|g| g.driver.as_deref() != Some("nvidia"))
        .map(|g| {
            format!(
                "{} ({})",
                g.address,
                g.driver.as_deref().unwrap_or("no driver")
            )
        })
        .collect();
    if !elsewhere.is_empty() {
        reason.push_str(&format!(
            "; GPUs not bound to nvidia are left alone: {}",
            elsewhere.join(", ")
        ));
    }
    let mut obs = Observation::new(outcome, reason);
    if !changes.is_empty() {
        obs.on_change = Outcome::Installed;
        obs.changes = changes;
    }
    if outcome == Outcome::Preinstalled {
        obs.labels
            .insert(DEPLOY_DRIVER_LABEL.to_string(), "pre-installed".to_string());
    }
    obs.details = serde_json::to_value(&driver).expect("serializes");
    Ok(obs)
}

fn absent(ctx: &StateContext, why: String) -> Observation {
    let bound = bound_drivers(ctx);
    let mut reason = "no NVIDIA kernel driver is loaded".to_string();
    if !bound.is_empty() {
        reason.push_str(&format!(" (GPUs bound to {bound})"));
    }
    reason.push_str(&format!("; {why}"));
    let mut obs = Observation::new(Outcome::Absent, reason.clone());
    obs.gate = Some(Gate::Block(format!("driver is absent: {reason}")));
    obs
}

/// nouveau is loaded, or holds a GPU.
fn nouveau_holds_the_gpu(ctx: &StateContext) -> Result<bool, StateError> {
    Ok(ctx.host.exists("/sys/module/nouveau")?
        || ctx
            .facts
            .gpus()
            .any(|g| g.driver.as_deref() == Some("nouveau")))
}

/// nouveau must go before NVIDIA's driver can load: blacklist it (with
/// `driver.blacklistNouveau`) and reboot, or say how.
fn observe_nouveau(ctx: &StateContext) -> Result<Observation, StateError> {
    if ctx.host.exists(NOUVEAU_BLACKLIST)? {
        let mut obs = Observation::new(
            Outcome::RebootRequired,
            format!(
                "nouveau is blacklisted ({NOUVEAU_BLACKLIST}) but still loaded: reboot the node"
            ),
        );
        obs.gate = Some(Gate::Block(
            "the node must reboot to unload nouveau".to_string(),
        ));
        return Ok(obs);
    }
    if !ctx.spec.driver.blacklist_nouveau || !ctx.spec.driver.enabled {
        let mut obs = Observation::new(
            Outcome::Failed,
            "nouveau holds the GPU, so NVIDIA's driver cannot load; set driver.blacklistNouveau: true \
             (gpuprov then blacklists nouveau and the node needs a reboot)",
        );
        obs.gate = Some(Gate::Block("nouveau holds the GPU".to_string()));
        return Ok(obs);
    }
    let mut obs = Observation::new(Outcome::Absent, "nouveau holds the GPU");
    obs.on_change = Outcome::RebootRequired;
    obs.changes.push(Change::WriteFile {
        path: NOUVEAU_BLACKLIST.to_string(),
        content: b"# Written by gpuprov: NVIDIA's driver needs nouveau gone.\nblacklist nouveau\noptions nouveau modeset=0\n".to_vec(),
        mode: 0o644,
        purpose: "blacklist nouveau".to_string(),
        diff: None,
    });
    match initramfs_command(&ctx.facts.os_ids) {
        Some(argv) => obs.changes.push(run(&argv)),
        None => obs
            .reason
            .push_str("; no initramfs tool known for this OS: regenerate it before rebooting"),
    }
    Ok(obs)
}

/// The command that rebuilds the initramfs, so the blacklist holds at boot.
fn initramfs_command(os_ids: &[String]) -> Option<Vec<&'static str>> {
    os_ids.iter().find_map(|id| match id.as_str() {
        "debian" | "ubuntu" => Some(vec!["update-initramfs", "-u"]),
        "rhel" | "centos" | "fedora" | "rocky" | "almalinux" | "amzn" | "ol" | "sles" | "suse"
        | "opensuse" => Some(vec!["dracut", "--force"]),
        _ => None,
    })
}

/// Unload the loaded driver's modules, then install and load the wanted one.
pub fn replace_changes(
    ctx: &StateContext,
    install: &DriverInstall,
) -> Result<Vec<Change>, StateError> {
    let mut changes: Vec<Change> = MODULES
        .iter()
        .rev()
        .map(|module| run(&["modprobe", "-r", module]))
        .collect();
    changes.extend(install_changes(ctx, install)?.0);
    Ok(changes)
}

/// Download, install, load the modules, create the device nodes, record;
/// and what is installed, in words for the plan. The kernel module
/// flavour is chosen, and Secure Boot checked, before anything else: a
/// driver that could not drive the GPUs or would not load is never
/// installed.
fn install_changes(
    ctx: &StateContext,
    install: &DriverInstall,
) -> Result<(Vec<Change>, String), StateError> {
    let spec = &ctx.spec.driver;
    let version = spec.version.clone().unwrap_or_default();
    let (flavour, why) = flavour::choose(
        spec.kernel_module_type,
        &flavour::gpus(ctx),
        flavour::branch(&version),
    )
    .map_err(|e| StateError::operator(format!("{e}; nothing was installed")))?;
    let mut how = format!(
        "NVIDIA {version} with the {} kernel modules ({why})",
        flavour.as_str()
    );
    let mut install_steps = Vec::new();
    let (method, source) = match install {
        DriverInstall::Runfile {
            artifact,
            args,
            download_timeout_seconds,
        } => {
            let path = artifact.cache_path();
            let signing = runfile_signing(ctx)?;
            install_steps.push(Change::fetch(
                ctx.host,
                artifact,
                *download_timeout_seconds,
                true,
            )?);
            let mut argv = vec![path];
            argv.extend(RUNFILE_FLAGS.iter().map(|f| f.to_string()));
            argv.extend(runfile_flavour_flag(flavour, &version));
            if let Some((flags, note)) = signing {
                argv.extend(flags);
                how.push_str(&format!("; {note}"));
            }
            argv.extend(args.iter().cloned());
            install_steps.push(Change::Run {
                display: argv.join(" "),
                argv,
            });
            ("runfile", artifact.sha256.clone())
        }
        DriverInstall::Package {
            package,
            version: package_version,
            kernel_module_package,
        } => {
            let manager = package_manager(ctx)?;
            let package = flavoured_package(manager, package, flavour);
            if let Some(signed) =
                package_signing(ctx, manager, kernel_module_package.as_deref(), flavour)?
            {
                how.push_str(&format!(
                    "; Secure Boot is on: the distribution's signed modules, {signed}"
                ));
                install_steps.push(kernel::install_package(manager, &signed));
            }
            let pinned = kernel::pinned(manager, &package, package_version);
            install_steps.push(kernel::install_package(manager, &pinned));
            ("package", pinned.clone())
        }
    };
    let record = Record {
        version,
        method: method.to_string(),
        source,
        kernel: ctx.facts.kernel.clone(),
        kernel_module_type: Some(flavour.as_str().to_string()),
    };
    // The intent goes after the download and before the installer runs: a
    // run killed from there on is finished by the next.
    let downloads = install_steps
        .iter()
        .take_while(|c| matches!(c, Change::Fetch { .. }))
        .count();
    let mut changes: Vec<Change> = install_steps.drain(..downloads).collect();
    changes.push(record_change(
        INSTALLING,
        &record,
        "the install in progress, finished by the next run if this one is killed",
    ));
    changes.append(&mut install_steps);
    changes.extend(load_modules());
    changes.push(record_change(RECORD, &record, "what gpuprov installed"));
    changes.push(Change::RemoveFile {
        path: INSTALLING.to_string(),
        purpose: "the install is done".to_string(),
    });
    Ok((changes, how))
}

/// The runfile's flag for the flavour: `--kernel-module-type` from 560
/// (where open became the default), `-m=kernel-open` before.
fn runfile_flavour_flag(flavour: flavour::Flavour, version: &str) -> Option<String> {
    if flavour::branch(version) >= 560 {
        Some(format!("--kernel-module-type={}", flavour.as_str()))
    } else {
        (flavour == flavour::Flavour::Open).then(|| "-m=kernel-open".to_string())
    }
}

/// A Debian or Ubuntu package named for the flavour: their open builds
/// are the same name with `-open` (`nvidia-driver-550-server-open`).
/// Other distributions name theirs differently: the spec's name is kept.
fn flavoured_package(manager: PackageManager, package: &str, flavour: flavour::Flavour) -> String {
    if manager != PackageManager::Apt {
        return package.to_string();
    }
    let base = package.strip_suffix("-open").unwrap_or(package);
    match flavour {
        flavour::Flavour::Open => format!("{base}-open"),
        flavour::Flavour::Proprietary => base.to_string(),
    }
}

/// Whether Secure Boot is on; an unreadable answer installs nothing.
fn secure_boot_on(ctx: &StateContext) -> Result<bool, StateError> {
    match &ctx.facts.secure_boot {
        SecureBoot::Enabled => Ok(true),
        SecureBoot::Unreadable(problem) => Err(StateError::operator(format!(
            "cannot tell whether Secure Boot is on ({problem}); nothing was installed"
        ))),
        SecureBoot::Disabled | SecureBoot::NotEfi => Ok(false),
    }
}

/// With Secure Boot on, the runfile signs what it builds with
/// `driver.signing`'s key: its flags and a note for the plan. Without a
/// key, or when Secure Boot cannot be read, nothing is installed.
fn runfile_signing(ctx: &StateContext) -> Result<Option<(Vec<String>, String)>, StateError> {
    if !secure_boot_on(ctx)? {
        return Ok(None);
    }
    let Some(signing) = &ctx.spec.driver.signing else {
        return Err(StateError::operator(format!(
            "Secure Boot is on ({}), and the modules the runfile builds are unsigned: the kernel would not load them; nothing was installed. Set driver.signing (a key and its certificate in the host, the certificate enrolled with mokutil --import), or install with method package and the distribution's signed modules (driver.install.kernelModulePackage)",
            crate::host::secure_boot::SECURE_BOOT_VARIABLE
        )));
    };
    for path in [&signing.key, &signing.certificate] {
        if !ctx.host.is_file(path)? {
            return Err(StateError::operator(format!(
                "Secure Boot is on, and driver.signing names {path}, which is not a file in the host; nothing was installed"
            )));
        }
    }
    Ok(Some((
        vec![
            format!("--module-signing-secret-key={}", signing.key),
            format!("--module-signing-public-key={}", signing.certificate),
        ],
        format!(
            "Secure Boot is on: the modules are signed with {} (its certificate {} must be enrolled in the machine's MOK list, which is the operator's job)",
            signing.key, signing.certificate
        ),
    )))
}

/// With Secure Boot on, a package install takes the distribution's signed
/// precompiled modules for the running kernel (`kernelModulePackage`);
/// without them, nothing is installed.
fn package_signing(
    ctx: &StateContext,
    manager: PackageManager,
    template: Option<&str>,
    flavour: flavour::Flavour,
) -> Result<Option<String>, StateError> {
    if !secure_boot_on(ctx)? {
        return Ok(None);
    }
    let (Some(template), Some(kernel)) = (template, ctx.facts.kernel.as_deref()) else {
        return Err(StateError::operator(format!(
            "Secure Boot is on ({}), and the package's modules would be built on the node, unsigned: the kernel would not load them; nothing was installed. Set driver.install.kernelModulePackage to the distribution's signed precompiled modules (linux-modules-nvidia-550-server-{{kernel}} on Ubuntu)",
            crate::host::secure_boot::SECURE_BOOT_VARIABLE
        )));
    };
    Ok(Some(
        flavoured_module_package(manager, template, flavour).replace("{kernel}", kernel),
    ))
}

/// Ubuntu's precompiled modules for the flavour: the open build is
/// `linux-modules-nvidia-550-server-open-{kernel}`.
pub fn flavoured_module_package(
    manager: PackageManager,
    template: &str,
    flavour: flavour::Flavour,
) -> String {
    if manager != PackageManager::Apt {
        return template.to_string();
    }
    let base = template.replace("-open-{kernel}", "-{kernel}");
    match flavour {
        flavour::Flavour::Open => base.replace("-{kernel}", "-open-{kernel}"),
        flavour::Flavour::Proprietary => base,
    }
}

fn package_manager(ctx: &StateContext) -> Result<PackageManager, StateError> {
    crate::toolkit::package_manager_for(&ctx.facts.os_ids).ok_or_else(|| {
        StateError::operator(format!(
            "no package manager is known for this OS ({})",
            ctx.facts.os_ids.join(" ")
        ))
    })
}

/// Load the modules and create the device nodes.
fn load_modules() -> Vec<Change> {
    MODULES
        .iter()
        .map(|module| run(&["modprobe", module]))
        .chain([run(&["nvidia-modprobe", "-u", "-c=0"])])
        .collect()
}

fn run(argv: &[&str]) -> Change {
    Change::Run {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        display: argv.join(" "),
    }
}

/// Processes holding an NVIDIA device open: `pid (comm)`.
fn gpu_users(host: &Host) -> Result<Vec<String>, StateError> {
    let mut users = Vec::new();
    for pid in host
        .list_dir("/proc")?
        .into_iter()
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
    {
        let fds = host.list_dir(&format!("/proc/{pid}/fd"))?;
        let uses_gpu = fds.iter().any(|fd| {
            host.link_name(&format!("/proc/{pid}/fd/{fd}"))
                .ok()
                .flatten()
                .is_some_and(|name| name.starts_with("nvidia"))
        });
        if uses_gpu {
            let comm = host.read(&format!("/proc/{pid}/comm"))?.unwrap_or_default();
            users.push(format!("{pid} ({})", comm.trim()));
        }
    }
    Ok(users)
}

/// "nouveau ×1, vfio-pci ×2" for GPUs that some other driver holds.
fn bound_drivers(ctx: &StateContext) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for gpu in ctx.facts.gpus() {
        if let Some(driver) = gpu.driver.as_deref() {
            *counts.entry(driver).or_default() += 1;
        }
    }
    counts
        .iter()
        .map(|(d, n)| format!("{d} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
