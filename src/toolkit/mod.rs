//! The NVIDIA container toolkit: its runtime binaries on the host, and
//! installing them with the host's own package manager.
//!
//! gpuprov never adds a package repository: the host's configured sources
//! (often a local mirror) are used as they are.

use std::collections::BTreeMap;

use crate::download::unpack as artifact;
use crate::host::{HOST_PATH, Host, HostError};
use crate::spec::{PackageManager, Spec};
use crate::state::{Change, Gate, Observation, Outcome, StateContext, StateError};

/// The binaries a working toolkit has.
pub const BINARIES: [&str; 3] = [
    "nvidia-container-runtime",
    "nvidia-ctk",
    "nvidia-container-runtime-hook",
];
/// The packages installed, all at the pinned version when one is given.
pub const PACKAGES: [&str; 4] = [
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
];
/// Written when gpuprov installs the toolkit (before the packages, after
/// a tarball), so later runs report `installed` rather than `preinstalled`.
pub const INSTALLED_RECORD: &str = "/var/lib/gpuprov/toolkit-installed";

/// The directories searched: the configured install dir, else the host's PATH.
fn search_dirs(spec: &Spec) -> Vec<String> {
    match &spec.toolkit.install_dir {
        Some(dir) => vec![dir.trim_end_matches('/').to_string()],
        None => HOST_PATH.iter().map(|d| format!("/{d}")).collect(),
    }
}

/// Where each toolkit binary is on the host (a host path), if anywhere.
pub fn locate(
    host: &Host,
    spec: &Spec,
) -> Result<BTreeMap<&'static str, Option<String>>, HostError> {
    let mut found = BTreeMap::new();
    for binary in BINARIES {
        found.insert(binary, find(host, spec, binary)?);
    }
    Ok(found)
}

/// Where one binary of the toolkit's is on the host: the first searched
/// directory that has it as a file.
fn find(host: &Host, spec: &Spec, name: &str) -> Result<Option<String>, HostError> {
    for dir in search_dirs(spec) {
        let candidate = format!("{dir}/{name}");
        if host.is_file(&candidate)? {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// The host path of `nvidia-container-runtime`, the runtime containerd
/// runs: where it is, or where installing the toolkit puts it (so a plan
/// can show the containerd change before the toolkit is there).
pub fn runtime_binary(host: &Host, spec: &Spec) -> Result<String, HostError> {
    binary(host, spec, BINARIES[0])
}

/// The host path of `nvidia-ctk`, whose hooks a CDI spec runs.
pub fn ctk_binary(host: &Host, spec: &Spec) -> Result<String, HostError> {
    binary(host, spec, BINARIES[1])
}

/// The toolkit's runtime in CDI mode, `nvidia-container-runtime.cdi`
/// (nvidia-container-toolkit-base ships it beside the runtime): where it
/// is, or where the runtime's directory would have it.
pub fn cdi_runtime_binary(host: &Host, spec: &Spec) -> Result<String, HostError> {
    match find(host, spec, "nvidia-container-runtime.cdi")? {
        Some(found) => Ok(found),
        None => Ok(format!("{}.cdi", runtime_binary(host, spec)?)),
    }
}

/// Where one of the toolkit's `BINARIES` is, or will be once installed.
fn binary(host: &Host, spec: &Spec, name: &'static str) -> Result<String, HostError> {
    // Only this binary is looked for: the containerd, CDI and validator
    // steps each ask for one, and a converge asks several times.
    Ok(find(host, spec, name)?.unwrap_or_else(|| {
        let dir = spec.toolkit.install_dir.as_deref().unwrap_or("/usr/bin");
        format!("{}/{}", dir.trim_end_matches('/'), name)
    }))
}

/// The `container-toolkit` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let found = locate(ctx.host, ctx.spec)?;
    let missing: Vec<&str> = found
        .iter()
        .filter(|(_, at)| at.is_none())
        .map(|(b, _)| *b)
        .collect();
    if let Some(artifact) = &ctx.spec.toolkit.artifact
        && ctx.spec.toolkit.enabled
    {
        let dir = artifact_dir(ctx.spec);
        let owned =
            artifact::owned(ctx.host, INSTALLED_RECORD, &dir).map_err(StateError::operator)?;
        let current = owned
            .as_ref()
            .is_some_and(|o| o.sha256.as_deref() == Some(artifact.sha256.as_str()));
        if !missing.is_empty() || !current {
            artifact::check_owned(ctx.host, &dir, owned.as_ref(), "toolkit.installDir")
                .map_err(StateError::operator)?;
            return artifact_install(ctx, artifact, &dir, owned.is_some(), &missing, found);
        }
    }
    let details = serde_json::to_value(&found).expect("serializes");
    if missing.is_empty() {
        let runtime = found[BINARIES[0]].as_deref().unwrap_or_default();
        let outcome = if ctx.host.exists(INSTALLED_RECORD)? {
            Outcome::Installed
        } else {
            Outcome::Preinstalled
        };
        let mut obs = Observation::new(
            outcome,
            format!("container toolkit found: {runtime} and its hook and nvidia-ctk"),
        );
        obs.details = details;
        return Ok(obs);
    }

    let where_ = search_dirs(ctx.spec).join(", ");
    let absent = |why: String| {
        let reason = format!("{} not found in {where_}; {why}", missing.join(", "));
        let mut obs = Observation::new(Outcome::Absent, reason.clone());
        obs.gate = Some(Gate::Block(format!(
            "container toolkit is absent: {reason}"
        )));
        obs.details = details.clone();
        Ok(obs)
    };
    if !ctx.spec.toolkit.enabled {
        return absent("toolkit.enabled is false, so gpuprov will not install it".to_string());
    }
    if ctx.spec.toolkit.install_dir.is_some() {
        return absent("packages install to /usr/bin, not toolkit.installDir: install it there or drop installDir".to_string());
    }
    let manager = match ctx
        .spec
        .toolkit
        .package_manager
        .or_else(|| package_manager_for(&ctx.facts.os_ids))
    {
        Some(manager) => manager,
        None => {
            return absent(format!(
                "no package manager is known for this OS ({}): set toolkit.packageManager",
                ctx.facts.os_ids.join(" ")
            ));
        }
    };
    let program = program(manager);
    if !HOST_PATH.iter().any(|dir| {
        ctx.host
            .is_file(&format!("/{dir}/{program}"))
            .unwrap_or(false)
    }) {
        return absent(format!("cannot install it: `{program}` is not in the host"));
    }

    let version = ctx.spec.toolkit.version.as_deref();
    let mut obs = Observation::new(
        Outcome::Absent,
        format!("{} not found in {where_}", missing.join(", ")),
    );
    obs.on_change = Outcome::Installed;
    // The record first: a run killed during the install (whose packages may
    // still land) leaves the toolkit gpuprov's, not pre-installed.
    obs.changes.push(Change::WriteFile {
        path: INSTALLED_RECORD.to_string(),
        content: format!("{program} {}\n", version.unwrap_or("newest")).into_bytes(),
        mode: 0o644,
        purpose: "record that gpuprov installs the toolkit".to_string(),
        diff: None,
    });
    for argv in install_commands(manager, version) {
        obs.changes.push(Change::Run {
            display: argv.join(" "),
            argv,
        });
    }
    obs.details = details;
    Ok(obs)
}

/// The package manager of an OS, from `/etc/os-release`'s ID and ID_LIKE.
pub fn package_manager_for(os_ids: &[String]) -> Option<PackageManager> {
    os_ids.iter().find_map(|id| match id.as_str() {
        "debian" | "ubuntu" => Some(PackageManager::Apt),
        "rhel" | "centos" | "fedora" | "rocky" | "almalinux" | "amzn" | "ol" => {
            Some(PackageManager::Dnf)
        }
        "sles" | "suse" | "opensuse" | "opensuse-leap" => Some(PackageManager::Zypper),
        _ => None,
    })
}

fn program(manager: PackageManager) -> &'static str {
    match manager {
        PackageManager::Apt => "apt-get",
        PackageManager::Dnf => "dnf",
        PackageManager::Yum => "yum",
        PackageManager::Zypper => "zypper",
    }
}

/// The commands that install the toolkit, every package pinned to `version`
/// (in each manager's own syntax) when one is given.
pub fn install_commands(manager: PackageManager, version: Option<&str>) -> Vec<Vec<String>> {
    let pinned = |separator: &str| -> Vec<String> {
        PACKAGES
            .iter()
            .map(|p| match version {
                Some(v) => format!("{p}{separator}{v}"),
                None => p.to_string(),
            })
            .collect()
    };
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    match manager {
        PackageManager::Apt => vec![
            words("env DEBIAN_FRONTEND=noninteractive apt-get update -q"),
            [words("env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"), pinned("=")].concat(),
        ],
        PackageManager::Dnf => vec![[words("dnf install -y"), pinned("-")].concat()],
        PackageManager::Yum => vec![[words("yum install -y"), pinned("-")].concat()],
        PackageManager::Zypper => vec![[words("zypper --non-interactive install"), pinned("=")].concat()],
    }
}

/// Where `toolkit.method: artifact` unpacks: the spec's `installDir`,
/// normalised there, and set to the default for this method.
fn artifact_dir(spec: &Spec) -> String {
    spec.toolkit
        .install_dir
        .clone()
        .unwrap_or_else(|| crate::spec::DEFAULT_TOOLKIT_DIR.to_string())
}

/// `toolkit.method: artifact`: fetch the pinned tarball and unpack it into
/// the install dir atomically (`download::unpack`, which records what is
/// there). `dir` is new, or gpuprov's (`ours`): `observe` checked.
fn artifact_install(
    ctx: &StateContext,
    artifact: &crate::download::Artifact,
    dir: &str,
    ours: bool,
    missing: &[&str],
    found: BTreeMap<&'static str, Option<String>>,
) -> Result<Observation, StateError> {
    let reason = if missing.is_empty() {
        format!(
            "{dir} holds another toolkit artifact than sha256 {}",
            artifact.sha256
        )
    } else {
        format!("{} not found in {dir}", missing.join(", "))
    };
    let mut obs = Observation::new(Outcome::Absent, reason);
    obs.on_change = Outcome::Installed;
    obs.changes = vec![
        Change::fetch(ctx.host, artifact, 600, false)?,
        Change::Unpack {
            archive: artifact.cache_path(),
            into: dir.to_string(),
            record: INSTALLED_RECORD.to_string(),
            replaces: ours && ctx.host.exists(dir)?,
        },
    ];
    obs.details = serde_json::to_value(&found).expect("serializes");
    Ok(obs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_package_is_pinned_in_the_managers_syntax() {
        let apt = install_commands(PackageManager::Apt, Some("1.17.8-1"));
        assert!(
            apt[1].contains(&"libnvidia-container1=1.17.8-1".to_string()),
            "{apt:?}"
        );
        let dnf = install_commands(PackageManager::Dnf, Some("1.17.8-1"));
        assert!(
            dnf[0].contains(&"nvidia-container-toolkit-base-1.17.8-1".to_string()),
            "{dnf:?}"
        );
        let zypper = install_commands(PackageManager::Zypper, None);
        assert_eq!(
            zypper[0].last().map(String::as_str),
            Some("libnvidia-container1")
        );
    }

    #[test]
    fn package_manager_follows_os_release() {
        let ids = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            package_manager_for(&ids("ubuntu debian")),
            Some(PackageManager::Apt)
        );
        assert_eq!(
            package_manager_for(&ids("rocky rhel centos fedora")),
            Some(PackageManager::Dnf)
        );
        assert_eq!(
            package_manager_for(&ids("opensuse-leap suse opensuse")),
            Some(PackageManager::Zypper)
        );
        assert_eq!(package_manager_for(&ids("talos")), None);
    }
}
