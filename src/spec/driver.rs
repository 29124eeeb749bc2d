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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpgradePolicy {
    /// A loaded driver stays, whatever its version (the plan notes a mismatch).
    Never,
    /// A loaded driver of another version is replaced.
    IfDifferent,
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
    Package { package: String, version: String },
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
                (Some(package), Some(version)) => Some(DriverInstall::Package {
                    package: package.value.clone(),
                    version: version.value.clone(),
                }),
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
    DriverSpec {
        enabled: raw.enabled.unwrap_or(true),
        version,
        upgrade_policy,
        force: raw.force,
        blacklist_nouveau: raw.blacklist_nouveau,
        install,
    }
}
