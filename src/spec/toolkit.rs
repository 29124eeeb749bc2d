//! The `toolkit:` section: the NVIDIA container toolkit, how it is
//! installed, and its `env` (the GPU Operator's names).

use super::*;

/// Where `toolkit.method: artifact` unpacks the toolkit by default.
pub const DEFAULT_TOOLKIT_DIR: &str = "/usr/local/nvidia/toolkit";

/// `toolkit.env` names gpuprov understands (the GPU Operator's containerd
/// options), each with the `containerd:` key that says the same.
pub const TOOLKIT_ENV: &[(&str, &str)] = &[
    ("CONTAINERD_CONFIG", "config"),
    ("CONTAINERD_SOCKET", "socket"),
    ("CONTAINERD_RUNTIME_CLASS", "runtimeClass"),
    ("CONTAINERD_SET_AS_DEFAULT", "setAsDefault"),
    ("RUNTIME_DROP_IN_CONFIG", "dropInConfig"),
    ("RUNTIME_RESTART_MODE", "restartMode"),
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawToolkit {
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) env: Vec<RawEnvVar>,
    pub(super) install_dir: Option<Spanned<String>>,
    pub(super) version: Option<Spanned<String>>,
    pub(super) package_manager: Option<Spanned<String>>,
    pub(super) method: Option<Spanned<String>>,
    pub(super) artifact: Option<Spanned<RawArtifact>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawArtifact {
    pub(super) url: Spanned<String>,
    pub(super) sha256: Spanned<String>,
    #[serde(default)]
    pub(super) allow_insecure_http: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolkitSpec {
    /// false: the toolkit is pre-installed; gpuprov only checks it is there.
    pub enabled: bool,
    /// Where the toolkit's binaries are; the host's PATH when absent.
    pub install_dir: Option<String>,
    /// The package version to install (`1.17.8-1`); the newest when absent.
    pub version: Option<String>,
    /// The host's package manager; read from `/etc/os-release` when absent.
    pub package_manager: Option<PackageManager>,
    /// `toolkit.method: artifact`: a tarball of the binaries, pinned by
    /// sha256, unpacked into the install dir (instead of packages).
    pub artifact: Option<crate::download::Artifact>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageManager {
    Apt,
    Dnf,
    Yum,
    Zypper,
}

pub(super) fn resolve_toolkit(
    raw: &RawToolkit,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> ToolkitSpec {
    let at = |v: &Spanned<String>, message: String| {
        Diagnostic::at_location(source, v.referenced, message)
    };
    let install_dir = raw
        .install_dir
        .as_ref()
        .and_then(|dir| match check_host_path(&dir.value) {
            Ok(()) => Some(dir.value.clone()),
            Err(why) => {
                errors.push(at(dir, format!("toolkit.installDir {why}")));
                None
            }
        });
    let version = raw.version.as_ref().and_then(|v| {
        let ok = !v.value.is_empty()
            && v.value.chars().next().is_some_and(|c| c.is_ascii_digit())
            && v.value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~:-_".contains(c));
        if ok {
            Some(v.value.clone())
        } else {
            errors.push(
                at(
                    v,
                    format!("toolkit.version `{}` is not a package version", v.value),
                )
                .with_help("write it as the package manager shows it, for example 1.17.8-1"),
            );
            None
        }
    });
    let package_manager = raw.package_manager.as_ref().and_then(|pm| {
        let known = [
            ("apt", PackageManager::Apt),
            ("dnf", PackageManager::Dnf),
            ("yum", PackageManager::Yum),
            ("zypper", PackageManager::Zypper),
        ];
        match known.iter().find(|(name, _)| *name == pm.value) {
            Some((_, manager)) => Some(*manager),
            None => {
                let mut d = at(
                    pm,
                    format!(
                        "toolkit.packageManager `{}` is not apt, dnf, yum or zypper",
                        pm.value
                    ),
                );
                if let Some(near) = nearest(&pm.value, known.iter().map(|(n, _)| *n)) {
                    d = d.with_help(format!("did you mean `{near}`?"));
                }
                errors.push(d);
                None
            }
        }
    });
    let artifact = match raw.method.as_ref().map(|m| (m.value.as_str(), m)) {
        None | Some(("package", _)) => None,
        Some(("artifact", method)) => match &raw.artifact {
            None => {
                errors.push(at(
                    method,
                    "toolkit.method artifact needs toolkit.artifact (url and sha256)".to_string(),
                ));
                None
            }
            Some(artifact) => {
                let (url, sha) = (&artifact.value.url, &artifact.value.sha256);
                if !["https://", "http://", "file://"]
                    .iter()
                    .any(|p| url.value.starts_with(p))
                {
                    errors.push(at(
                        url,
                        format!(
                            "toolkit.artifact.url `{}` is not https://, http:// or file://",
                            url.value
                        ),
                    ));
                    None
                } else if sha.value.len() != 64 || !sha.value.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    errors.push(at(
                        sha,
                        format!(
                            "toolkit.artifact.sha256 `{}` is not 64 hex digits",
                            sha.value
                        ),
                    ));
                    None
                } else {
                    Some(crate::download::Artifact {
                        url: url.value.clone(),
                        sha256: sha.value.to_lowercase(),
                        allow_insecure_http: artifact.value.allow_insecure_http,
                    })
                }
            }
        },
        Some((other, method)) => {
            errors.push(at(
                method,
                format!("toolkit.method must be package or artifact, not `{other}`"),
            ));
            None
        }
    };
    ToolkitSpec {
        enabled: raw.enabled.unwrap_or(true),
        install_dir: if artifact.is_some() {
            install_dir.or_else(|| Some(DEFAULT_TOOLKIT_DIR.to_string()))
        } else {
            install_dir
        },
        version,
        package_manager,
        artifact,
    }
}
