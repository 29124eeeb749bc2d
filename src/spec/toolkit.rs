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
    ("RUNTIME", "runtime"),
    ("CRIO_CONFIG", "crioConfig"),
    ("CRIO_SOCKET", "crioSocket"),
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
            // Written one way (`/opt//toolkit/` is `/opt/toolkit`), so the
            // record of what gpuprov unpacked names it as the spec does.
            Ok(()) => Some(normalized(&dir.value)),
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
            Some(given) => artifact(
                "toolkit.artifact",
                &given.value.url,
                Some(&given.value.sha256),
                given.value.allow_insecure_http,
                source,
                errors,
            ),
        },
        Some((other, method)) => {
            errors.push(at(
                method,
                format!("toolkit.method must be package or artifact, not `{other}`"),
            ));
            None
        }
    };
    // The artifact method replaces its directory whole: a system
    // directory (or gpuprov's own) would be lost with it, so it is refused
    // here, before anything runs.
    if artifact.is_some()
        && let (Some(dir), Some(raw_dir)) = (&install_dir, &raw.install_dir)
        && let Some(why) = system_directory(dir)
    {
        errors.push(
            at(
                raw_dir,
                format!(
                    "toolkit.installDir `{}` is {why}: the artifact method replaces its directory whole",
                    raw_dir.value
                ),
            )
            .with_help(format!("give the toolkit a directory of its own, such as {DEFAULT_TOOLKIT_DIR}")),
        );
    }
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

/// Directories that hold the system's (or gpuprov's own) files: the
/// filesystem hierarchy's top and its standard directories, and anything
/// under those that are never a place for a program of one's own.
const SYSTEM_DIRS: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
    "/usr/lib32",
    "/usr/lib64",
    "/usr/libexec",
    "/usr/include",
    "/usr/share",
    "/usr/src",
    "/usr/local",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/local/lib",
    "/usr/local/lib64",
    "/usr/local/libexec",
    "/usr/local/include",
    "/usr/local/share",
    "/usr/local/etc",
    "/usr/local/src",
    "/usr/local/nvidia",
    "/var/lib",
    "/var/log",
    "/var/cache",
    "/var/tmp",
    "/var/spool",
    "/var/opt",
    "/var/local",
    "/var/mail",
    "/var/run",
    "/opt/bin",
];
/// Trees nothing installs a program into.
const SYSTEM_TREES: &[&str] = &["/boot", "/dev", "/etc", "/proc", "/run", "/sys", "/var/run"];

/// An absolute path without `..`, with its empty and `.` components
/// dropped: `/opt//toolkit/.` is `/opt/toolkit`, `/` stays `/`.
fn normalized(dir: &str) -> String {
    let parts: Vec<&str> = dir
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Why `dir` (an absolute path without `..`) is no directory of the
/// toolkit's own, or `None` when it may be.
pub fn system_directory(dir: &str) -> Option<String> {
    let dir = normalized(dir);
    if dir == "/" {
        return Some("the root directory".to_string());
    }
    if SYSTEM_DIRS.contains(&dir.as_str()) {
        return Some("a system directory".to_string());
    }
    let below = |top: &str| dir.starts_with(&format!("{top}/"));
    if let Some(top) = SYSTEM_TREES.iter().find(|top| below(top)) {
        return Some(format!("under {top}, which holds no programs"));
    }
    if let Some(own) = crate::host::OWN_DIRS.iter().find(|own| {
        let own = format!("/{own}");
        dir == own || below(&own)
    }) {
        return Some(format!("gpuprov's own directory /{own}"));
    }
    None
}
