//! The `driver:` section: whether and how the driver is installed, its
//! version and upgrade policy.

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawDriver {
    pub(super) enabled: Option<bool>,
    pub(super) version: Option<Spanned<String>>,
    pub(super) upgrade_policy: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) force: bool,
    #[serde(default)]
    pub(super) blacklist_nouveau: bool,
    pub(super) install: Option<Spanned<RawDriverInstall>>,
    pub(super) upgrade: Option<Spanned<RawUpgrade>>,
    pub(super) kernel_module_type: Option<Spanned<String>>,
    pub(super) signing: Option<Spanned<RawSigning>>,
    #[serde(default)]
    pub(super) rdma: RawRdma,
}

/// `driver.signing`: the key the modules are signed with on a Secure
/// Boot node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSigning {
    pub(super) key: Spanned<String>,
    pub(super) certificate: Spanned<String>,
}

/// `driver.rdma` (the GPU Operator's): GPUDirect RDMA.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRdma {
    pub(super) enabled: Option<bool>,
}

/// `driver.upgrade`: how `rolling` coordinates (k8s-operator-libs' keys).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawUpgrade {
    pub(super) max_unavailable: Option<Spanned<IntOrPercent>>,
    pub(super) lease_duration_seconds: Option<Spanned<u64>>,
    pub(super) failure_policy: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) drain: RawDrain,
    #[serde(default)]
    pub(super) wait_for_jobs: RawWaitForJobs,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum IntOrPercent {
    Int(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawDrain {
    #[serde(default)]
    pub(super) enable: bool,
    pub(super) pod_selector: Option<Spanned<String>>,
    pub(super) timeout_seconds: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) delete_empty_dir: bool,
    #[serde(default)]
    pub(super) force: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawWaitForJobs {
    pub(super) pod_selector: Option<Spanned<String>>,
    pub(super) timeout_seconds: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawDriverInstall {
    pub(super) method: Spanned<String>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) sha256: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default)]
    pub(super) allow_insecure_http: bool,
    pub(super) package: Option<Spanned<String>>,
    pub(super) package_version: Option<Spanned<String>>,
    pub(super) kernel_module_package: Option<Spanned<String>>,
    pub(super) download_timeout_seconds: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverSpec {
    /// false: gpuprov never installs a driver; one must be pre-installed.
    pub enabled: bool,
    /// The driver version to install when none is loaded (`535.161.08`).
    pub version: Option<String>,
    /// What to do when a different driver is loaded.
    pub upgrade_policy: UpgradePolicy,
    /// With `ifDifferent`: replace the driver even while GPU processes run.
    pub force: bool,
    /// Blacklist nouveau when it holds the GPU (then a reboot is needed).
    pub blacklist_nouveau: bool,
    pub install: Option<DriverInstall>,
    /// How `rolling` coordinates with the fleet.
    pub upgrade: UpgradeSpec,
    /// Which kernel modules to install: NVIDIA's open ones or the
    /// proprietary ones (`auto`: what the GPUs and the branch need).
    pub kernel_module_type: KernelModuleType,
    /// The key and certificate the modules are signed with (Secure Boot).
    pub signing: Option<ModuleSigning>,
    /// GPUDirect RDMA: load nvidia-peermem where an RDMA NIC is.
    pub rdma: bool,
}

/// `driver.kernelModuleType`, with the GPU Operator's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum KernelModuleType {
    /// Chosen from the GPUs on the bus and the driver branch.
    Auto,
    Open,
    Proprietary,
}

/// Host paths of the module signing key and its certificate (DER), as the
/// runfile's `--module-signing-secret-key` and `--module-signing-public-key`
/// take them. Enrolling the certificate (MOK) is the operator's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSigning {
    pub key: String,
    pub certificate: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpgradePolicy {
    /// A loaded driver stays, whatever its version (the plan notes a mismatch).
    Never,
    /// A loaded driver of another version is replaced.
    IfDifferent,
    /// Replaced one slot at a time across the fleet: cordon, wait for GPU
    /// jobs, delete GPU pods, drain, install, validate, uncordon.
    Rolling,
}

/// How many GPU nodes may upgrade at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MaxUnavailable {
    Count(u64),
    /// Of the fleet's GPU nodes, rounded up (at least one).
    Percent(u64),
}

impl MaxUnavailable {
    /// The number of upgrade slots for a fleet of `nodes` GPU nodes.
    pub fn slots(self, nodes: u64) -> u64 {
        match self {
            MaxUnavailable::Count(n) => n,
            MaxUnavailable::Percent(p) => (nodes * p).div_ceil(100).max(1),
        }
    }
}

impl std::fmt::Display for MaxUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxUnavailable::Count(n) => write!(f, "{n}"),
            MaxUnavailable::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What happens to the upgrade slot of a node whose upgrade failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FailurePolicy {
    /// The node keeps it: the fleet stops there until someone looks.
    HoldSlot,
    /// The node gives it back: the next node goes on.
    ReleaseSlot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeSpec {
    pub max_unavailable: MaxUnavailable,
    /// A slot's Lease expires this long after its last renewal.
    pub lease_duration_seconds: u64,
    pub failure_policy: FailurePolicy,
    pub drain: DrainSpec,
    pub wait_for_jobs: WaitForJobsSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    pub enable: bool,
    /// Which pods to evict (a label selector; empty: every pod but
    /// DaemonSets' and mirror pods).
    pub pod_selector: String,
    pub timeout_seconds: u64,
    /// Evict pods with emptyDir volumes (their data is lost).
    pub delete_empty_dir: bool,
    /// Evict pods no controller would recreate.
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaitForJobsSpec {
    /// The pods to wait for (a label selector); empty: no waiting.
    pub pod_selector: String,
    /// Then go on regardless; 0: wait as long as it takes.
    pub timeout_seconds: u64,
}

/// How gpuprov installs the driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "camelCase")]
pub enum DriverInstall {
    /// NVIDIA's `.run` installer, pinned by sha256.
    Runfile {
        artifact: crate::download::Artifact,
        args: Vec<String>,
        download_timeout_seconds: u64,
    },
    /// The host's package manager, with the package pinned to a version.
    Package {
        package: String,
        version: String,
        /// The package with the modules for one kernel, `{kernel}` standing
        /// for it (`linux-modules-nvidia-550-server-{kernel}`): installed
        /// when the node boots a kernel the driver has no modules for and
        /// DKMS cannot build them.
        kernel_module_package: Option<String>,
    },
}

/// NVIDIA driver versions are two or three dot-separated numbers.
pub fn is_driver_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The `driver:` section checked: its errors go to `errors`.
pub(super) fn resolve_driver(
    raw: &RawDriver,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> DriverSpec {
    let version = raw.version.as_ref().and_then(|v| {
        if is_driver_version(&v.value) {
            Some(v.value.clone())
        } else {
            errors.push(
                Diagnostic::at_location(
                    source,
                    v.referenced,
                    format!("driver.version `{}` is not a driver version", v.value),
                )
                .with_help("write it as NVIDIA prints it, for example 535.161.08 or 550.54.15 (quote it in YAML)"),
            );
            None
        }
    });

    let upgrade_policy = choose(
        "driver.upgradePolicy",
        &raw.upgrade_policy,
        &[
            ("never", UpgradePolicy::Never),
            ("ifDifferent", UpgradePolicy::IfDifferent),
            ("rolling", UpgradePolicy::Rolling),
        ],
        UpgradePolicy::Never,
        source,
        errors,
    );
    let install = raw.install.as_ref().and_then(|install| {
        let at = |location, message: String| Diagnostic::at_location(source, location, message);
        let spec = &install.value;
        match spec.method.value.as_str() {
            "runfile" => {
                if let Some(template) = &spec.kernel_module_package {
                    errors.push(at(
                        template.referenced,
                        "driver.install.kernelModulePackage is for method package; a runfile rebuilds its modules for a new kernel itself".to_string(),
                    ));
                    return None;
                }
                let url = match &spec.url {
                    Some(url) if ["https://", "http://", "file://"].iter().any(|s| url.value.starts_with(s)) => url.value.clone(),
                    Some(url) => {
                        errors.push(at(url.referenced, format!("driver.install.url `{}` is not https://, http:// or file://", url.value)));
                        return None;
                    }
                    None => {
                        errors.push(at(install.referenced, "driver.install with method runfile needs a url".to_string()));
                        return None;
                    }
                };
                let sha256 = match &spec.sha256 {
                    Some(sha) if sha.value.len() == 64 && sha.value.bytes().all(|b| b.is_ascii_hexdigit()) => sha.value.to_lowercase(),
                    Some(sha) => {
                        errors.push(at(sha.referenced, format!("driver.install.sha256 `{}` is not 64 hex digits", sha.value)));
                        return None;
                    }
                    None => {
                        errors.push(
                            at(install.referenced, "driver.install with method runfile needs its sha256".to_string())
                                .with_help("gpuprov runs nothing it cannot verify: add `sha256: <64 hex digits>`"),
                        );
                        return None;
                    }
                };
                Some(DriverInstall::Runfile {
                    artifact: crate::download::Artifact {
                        url,
                        sha256,
                        allow_insecure_http: spec.allow_insecure_http,
                    },
                    args: spec.args.clone(),
                    download_timeout_seconds: seconds(
                        &spec.download_timeout_seconds,
                        "driver.install.downloadTimeoutSeconds",
                        600,
                        source,
                        errors,
                    ),
                })
            }
            "package" => match (&spec.package, &spec.package_version) {
                (Some(package), Some(version)) => {
                    let kernel_module_package = match &spec.kernel_module_package {
                        Some(template) if !template.value.contains("{kernel}") || template.value.starts_with('-') || template.value.chars().any(char::is_whitespace) => {
                            errors.push(at(
                                template.referenced,
                                format!("driver.install.kernelModulePackage `{}` must be one package name with `{{kernel}}` where the kernel release goes", template.value),
                            ).with_help("for example `linux-modules-nvidia-550-server-{kernel}` on Ubuntu"));
                            return None;
                        }
                        template => template.as_ref().map(|t| t.value.clone()),
                    };
                    Some(DriverInstall::Package {
                        package: package.value.clone(),
                        version: version.value.clone(),
                        kernel_module_package,
                    })
                }
                _ => {
                    errors.push(at(
                        install.referenced,
                        "driver.install with method package needs package and packageVersion".to_string(),
                    ));
                    None
                }
            },
            other => {
                errors.push(at(spec.method.referenced, format!("driver.install.method must be runfile or package, not `{other}`")));
                None
            }
        }
    });
    if let (Some(_), None, Some(at)) = (&install, &version, &raw.install) {
        errors.push(Diagnostic::at_location(
            source,
            at.referenced,
            "driver.install needs driver.version: the version to verify once installed",
        ));
    }
    let upgrade = resolve_upgrade(raw.upgrade.as_ref(), source, errors);
    if let (Some(at), false) = (&raw.upgrade, upgrade_policy == UpgradePolicy::Rolling) {
        errors.push(
            Diagnostic::at_location(
                source,
                at.referenced,
                "driver.upgrade is read only with driver.upgradePolicy: rolling".to_string(),
            )
            .with_help("set driver.upgradePolicy: rolling, or remove driver.upgrade"),
        );
    }
    let kernel_module_type = choose(
        "driver.kernelModuleType",
        &raw.kernel_module_type,
        &[
            ("auto", KernelModuleType::Auto),
            ("open", KernelModuleType::Open),
            ("proprietary", KernelModuleType::Proprietary),
        ],
        KernelModuleType::Auto,
        source,
        errors,
    );
    let signing = raw.signing.as_ref().and_then(|signing| {
        let mut ok = true;
        for path in [&signing.value.key, &signing.value.certificate] {
            if !path.value.starts_with('/') || path.value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errors.push(Diagnostic::at_location(
                    source,
                    path.referenced,
                    format!("driver.signing: `{}` is not an absolute path in the host", path.value),
                ));
                ok = false;
            }
        }
        if matches!(install, Some(DriverInstall::Package { .. })) {
            errors.push(
                Diagnostic::at_location(
                    source,
                    signing.referenced,
                    "driver.signing signs what the runfile builds; a package install on a Secure Boot node takes the distribution's signed modules",
                )
                .with_help("set driver.install.kernelModulePackage (`linux-modules-nvidia-550-server-{kernel}` on Ubuntu), or install with the runfile"),
            );
            ok = false;
        }
        ok.then(|| ModuleSigning {
            key: signing.value.key.value.clone(),
            certificate: signing.value.certificate.value.clone(),
        })
    });
    DriverSpec {
        kernel_module_type,
        signing,
        rdma: raw.rdma.enabled.unwrap_or(false),
        enabled: raw.enabled.unwrap_or(true),
        version,
        upgrade_policy,
        force: raw.force,
        blacklist_nouveau: raw.blacklist_nouveau,
        install,
        upgrade,
    }
}

/// `driver.upgrade` checked, with k8s-operator-libs' defaults.
fn resolve_upgrade(
    raw: Option<&Spanned<RawUpgrade>>,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> UpgradeSpec {
    let default = RawUpgrade::default();
    let raw = raw.map_or(&default, |r| &r.value);
    let max_unavailable = max_unavailable(
        "driver.upgrade.maxUnavailable",
        raw.max_unavailable.as_ref(),
        source,
        errors,
    );
    let failure_policy = choose(
        "driver.upgrade.failurePolicy",
        &raw.failure_policy,
        &[
            ("holdSlot", FailurePolicy::HoldSlot),
            ("releaseSlot", FailurePolicy::ReleaseSlot),
        ],
        FailurePolicy::HoldSlot,
        source,
        errors,
    );
    let selector = |given: &Option<Spanned<String>>, key: &str, errors: &mut Vec<Diagnostic>| {
        pod_selector(given.as_ref(), key, source, errors)
    };
    UpgradeSpec {
        max_unavailable,
        lease_duration_seconds: seconds(
            &raw.lease_duration_seconds,
            "driver.upgrade.leaseDurationSeconds",
            60,
            source,
            errors,
        ),
        failure_policy,
        drain: DrainSpec {
            enable: raw.drain.enable,
            pod_selector: selector(
                &raw.drain.pod_selector,
                "driver.upgrade.drain.podSelector",
                errors,
            ),
            timeout_seconds: seconds(
                &raw.drain.timeout_seconds,
                "driver.upgrade.drain.timeoutSeconds",
                300,
                source,
                errors,
            ),
            delete_empty_dir: raw.drain.delete_empty_dir,
            force: raw.drain.force,
        },
        wait_for_jobs: wait_for_jobs(
            &raw.wait_for_jobs,
            "driver.upgrade.waitForJobs",
            source,
            errors,
        ),
    }
}

/// `<key>.podSelector` and `<key>.timeoutSeconds` checked: the pods to wait
/// for, and how long (0, the default: as long as it takes).
pub(super) fn wait_for_jobs(
    raw: &RawWaitForJobs,
    key: &str,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> WaitForJobsSpec {
    let timeout_seconds = match &raw.timeout_seconds {
        // 0 is allowed here: wait as long as it takes.
        Some(t) if t.value == 0 => 0,
        other => seconds(other, &format!("{key}.timeoutSeconds"), 0, source, errors),
    };
    WaitForJobsSpec {
        pod_selector: pod_selector(
            raw.pod_selector.as_ref(),
            &format!("{key}.podSelector"),
            source,
            errors,
        ),
        timeout_seconds,
    }
}

/// A count of GPU nodes (at least 1) or a percentage of them (1% to 100%),
/// as `maxUnavailable` is written; 1 when not given.
pub(super) fn max_unavailable(
    key: &str,
    given: Option<&Spanned<IntOrPercent>>,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> MaxUnavailable {
    let Some(given) = given else {
        return MaxUnavailable::Count(1);
    };
    match &given.value {
        IntOrPercent::Int(n) if *n >= 1 => MaxUnavailable::Count(*n),
        IntOrPercent::Text(text)
            if text
                .strip_suffix('%')
                .and_then(|p| p.parse::<u64>().ok())
                .is_some_and(|p| (1..=100).contains(&p)) =>
        {
            MaxUnavailable::Percent(text.trim_end_matches('%').parse().unwrap_or(1))
        }
        other => {
            let shown = match other {
                IntOrPercent::Int(n) => n.to_string(),
                IntOrPercent::Text(t) => t.clone(),
            };
            errors.push(
                Diagnostic::at_location(
                    source,
                    given.referenced,
                    format!("{key} must be a count of at least 1 or a percentage from 1% to 100%, not `{shown}`"),
                )
                .with_help("for example 2, or \"10%\" (quoted in YAML)"),
            );
            MaxUnavailable::Count(1)
        }
    }
}

/// A pod selector from the spec, checked (empty when not given).
pub(super) fn pod_selector(
    given: Option<&Spanned<String>>,
    key: &str,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> String {
    let Some(given) = given else {
        return String::new();
    };
    if let Err(why) = check_pod_selector(&given.value) {
        errors.push(Diagnostic::at_location(
            source,
            given.referenced,
            format!("{key} `{}`: {why}", given.value),
        ));
    }
    given.value.clone()
}

/// An equality-based label selector as the API server takes it:
/// comma-separated `key=value`, `key!=value`, `key` or `!key`.
pub fn check_pod_selector(selector: &str) -> Result<(), String> {
    for term in selector.split(',').map(str::trim) {
        if term.is_empty() {
            return Err("an empty term".to_string());
        }
        let (key, value) = if let Some((k, v)) = term.split_once("!=") {
            (k, Some(v))
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k, Some(v))
        } else {
            (term.strip_prefix('!').unwrap_or(term), None)
        };
        match value {
            Some(value) => crate::label_syntax::check_label(key.trim(), value.trim())?,
            None => crate::label_syntax::check_label_key(key.trim())?,
        }
    }
    Ok(())
}
