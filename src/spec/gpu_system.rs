//! What a GPU system needs besides the driver: `fabricManager:` (NVIDIA's
//! fabric manager on NVSwitch systems) and `persistence:`
//! (nvidia-persistenced).

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFabricManager {
    enabled: Option<bool>,
    package: Option<Spanned<String>>,
    package_version: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    #[serde(default)]
    allow_insecure_http: bool,
    download_timeout_seconds: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPersistence {
    enabled: Option<bool>,
}

/// `fabricManager:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricManagerSpec {
    /// false: the `fabric-manager` state is disabled everywhere.
    pub enabled: bool,
    /// Where the fabric manager comes from when it is not installed.
    pub install: Option<FabricManagerInstall>,
}

/// How gpuprov installs the fabric manager, always at the driver's exact
/// version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "camelCase")]
pub enum FabricManagerInstall {
    /// The package manager: `package` and `version` with `{branch}` and
    /// `{version}` standing for the driver's (`nvidia-fabricmanager-550`,
    /// `550.54.15-1`).
    Package { package: String, version: String },
    /// NVIDIA's `fabricmanager-linux-<arch>-<version>-archive.tar.xz`,
    /// pinned by sha256 and unpacked into a directory gpuprov owns.
    Archive {
        artifact: crate::download::Artifact,
        download_timeout_seconds: u64,
    },
}

/// The package CUDA's repositories ship the fabric manager in, per branch.
pub const FABRIC_MANAGER_PACKAGE: &str = "nvidia-fabricmanager-{branch}";
/// Its version there: the driver's, packaged once.
pub const FABRIC_MANAGER_PACKAGE_VERSION: &str = "{version}-1";

/// `persistence:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceSpec {
    /// false: gpuprov leaves persistence to the node.
    pub enabled: bool,
}

pub(super) fn resolve_persistence(raw: &RawPersistence) -> PersistenceSpec {
    PersistenceSpec {
        enabled: raw.enabled.unwrap_or(true),
    }
}

/// `fabricManager:` checked. Without `package` or `url`, the fabric
/// manager follows `driver.install`: a package install brings CUDA's
/// package at the driver's version; a runfile needs `url` and `sha256`.
pub(super) fn resolve_fabric_manager(
    raw: &RawFabricManager,
    driver_install: Option<&DriverInstall>,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> FabricManagerSpec {
    let at = |v: &Spanned<String>, message: String| {
        Diagnostic::at_location(source, v.referenced, message)
    };
    for template in [&raw.package, &raw.package_version].into_iter().flatten() {
        if template.value.is_empty()
            || template.value.starts_with('-')
            || template.value.chars().any(char::is_whitespace)
        {
            errors.push(at(
                template,
                format!(
                    "fabricManager: `{}` must be one package name or version, `{{branch}}` and `{{version}}` standing for the driver's",
                    template.value
                ),
            ));
        }
    }
    let install = match (&raw.url, &raw.package) {
        (Some(url), Some(package)) => {
            errors.push(
                at(
                    package,
                    "fabricManager.package and fabricManager.url are two ways to install it: give one".to_string(),
                )
                .with_help(format!("url is `{}`", url.value)),
            );
            None
        }
        (Some(url), None) => artifact(
            "fabricManager",
            url,
            raw.sha256.as_ref(),
            raw.allow_insecure_http,
            source,
            errors,
        )
        .map(|artifact| FabricManagerInstall::Archive {
            artifact,
            download_timeout_seconds: seconds(
                &raw.download_timeout_seconds,
                "fabricManager.downloadTimeoutSeconds",
                600,
                source,
                errors,
            ),
        }),
        (None, package)
            if package.is_some()
                || matches!(driver_install, Some(DriverInstall::Package { .. })) =>
        {
            Some(FabricManagerInstall::Package {
                package: package
                    .as_ref()
                    .map_or(FABRIC_MANAGER_PACKAGE.to_string(), |p| p.value.clone()),
                version: raw
                    .package_version
                    .as_ref()
                    .map_or(FABRIC_MANAGER_PACKAGE_VERSION.to_string(), |v| {
                        v.value.clone()
                    }),
            })
        }
        (None, _) => None,
    };
    if raw.url.is_none()
        && let Some(sha) = &raw.sha256
    {
        errors.push(at(
            sha,
            "fabricManager.sha256 pins fabricManager.url, which is not set".to_string(),
        ));
    }
    FabricManagerSpec {
        enabled: raw.enabled.unwrap_or(true),
        install,
    }
}
