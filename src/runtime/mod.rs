//! Which container runtime a node runs, and how its distribution lays it
//! out: where the config containerd reads is, where an edit survives the
//! next start, which socket it serves and which service restarts it.
//!
//! Detected from the host root (os-release, the distributions' own
//! directories and binaries), unless the spec names the flavour. The
//! `containerd-runtime` state edits through the `Target` this returns.

use serde::Serialize;

use crate::host::Host;
use crate::spec::{ContainerdOptions, Flavor, RuntimeChoice};
use crate::state::StateError;

/// containerd's own config and socket.
const STOCK_CONFIG: &str = "/etc/containerd/config.toml";
const STOCK_SOCKET: &str = "/run/containerd/containerd.sock";

/// k3s's and RKE2's containerd directory, below their data directory.
const RANCHER_CONTAINERD: &str = "agent/etc/containerd";

/// Where one flavour's containerd is and how gpuprov edits it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub flavor: Flavor,
    /// How the flavour was told: the spec, or what the host has.
    pub detected_by: String,
    /// The config containerd reads (for k3s and RKE2, the one they
    /// generate at every start).
    pub config: String,
    /// Where a whole-file edit goes so that it survives a restart: the
    /// config itself, or k3s's and RKE2's template. None where no file
    /// edit is kept (Talos, Bottlerocket: see `read_only`).
    pub template: Option<String>,
    /// A drop-in directory the flavour reads on its own (k0s), used even
    /// when the config does not import it.
    pub own_drop_in_dir: Option<String>,
    /// The socket containerd serves.
    pub socket: String,
    /// The systemd unit whose restart restarts containerd.
    pub service: String,
    /// The containerd binary that answers `config dump` for this config.
    pub binary: Option<String>,
    /// Why gpuprov must not write here, and what to set instead.
    pub read_only: Option<String>,
}

impl Target {
    /// Whether containerd is a child of a distribution's own service
    /// (k3s, RKE2, k0s), which rewrites or merges its config.
    pub fn is_embedded(&self) -> bool {
        matches!(self.flavor, Flavor::K3s | Flavor::Rke2 | Flavor::K0s)
    }
}

/// `ID` from the host's os-release, lowercased.
fn os_id(host: &Host) -> Result<Option<String>, StateError> {
    Ok(host.read("/etc/os-release")?.and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("ID="))
            .map(|v| v.trim().trim_matches('"').to_ascii_lowercase())
    }))
}

/// The first of `paths` that is a file in the host root.
fn first_file(host: &Host, paths: &[&str]) -> Result<Option<String>, StateError> {
    for path in paths {
        if host.is_file(path)? {
            return Ok(Some(path.to_string()));
        }
    }
    Ok(None)
}

/// A command on the host's PATH directories.
pub fn on_path(host: &Host, name: &str) -> Result<Option<String>, StateError> {
    Ok(crate::host::process::on_path(host, name)?)
}

/// The flavour the host looks like, and what gave it away.
pub fn detect_flavor(host: &Host) -> Result<(Flavor, String), StateError> {
    match os_id(host)?.as_deref() {
        Some("talos") => return Ok((Flavor::Talos, "/etc/os-release says ID=talos".into())),
        Some("bottlerocket") => {
            return Ok((
                Flavor::Bottlerocket,
                "/etc/os-release says ID=bottlerocket".into(),
            ));
        }
        _ => {}
    }
    for (flavor, name) in [(Flavor::Rke2, "rke2"), (Flavor::K3s, "k3s")] {
        let generated = format!("/var/lib/rancher/{name}/{RANCHER_CONTAINERD}/config.toml");
        if host.exists(&generated)? {
            return Ok((flavor, format!("{generated} exists ({name} generates it)")));
        }
        if let Some(binary) = on_path(host, name)? {
            return Ok((flavor, format!("{binary} exists")));
        }
    }
    if host.exists("/etc/k0s/containerd.toml")? {
        return Ok((Flavor::K0s, "/etc/k0s/containerd.toml exists".into()));
    }
    if let Some(binary) = on_path(host, "k0s")? {
        return Ok((Flavor::K0s, format!("{binary} exists")));
    }
    Ok((
        Flavor::Containerd,
        "no k3s, RKE2, k0s, Talos or Bottlerocket found".into(),
    ))
}

/// Where the flavour's containerd is. The spec's `config` and `socket`
/// (or `CONTAINERD_CONFIG` and `CONTAINERD_SOCKET`), when given, win over
/// the flavour's own.
pub fn containerd_target(host: &Host, opts: &ContainerdOptions) -> Result<Target, StateError> {
    let (flavor, detected_by) = match opts.flavor {
        Some(flavor) => (flavor, "containerd.flavor in the spec".to_string()),
        None => detect_flavor(host)?,
    };
    // The stock paths (the seed's CONTAINERD_CONFIG and CONTAINERD_SOCKET
    // name them) mean "containerd's own" on every flavour: another path is
    // the operator's choice and wins.
    let config_given =
        (opts.config_given && opts.config != STOCK_CONFIG).then(|| opts.config.clone());
    let socket_given =
        (opts.socket_given && opts.socket != STOCK_SOCKET).then(|| opts.socket.clone());
    let given = |value: &Option<String>, default: &str| {
        value.clone().unwrap_or_else(|| default.to_string())
    };
    let target = match flavor {
        Flavor::Containerd => Target {
            flavor,
            detected_by,
            config: given(&config_given, STOCK_CONFIG),
            template: None,
            own_drop_in_dir: None,
            socket: given(&socket_given, STOCK_SOCKET),
            service: "containerd".into(),
            binary: containerd_binary(host),
            read_only: None,
        },
        Flavor::K3s | Flavor::Rke2 => {
            let name = if flavor == Flavor::K3s { "k3s" } else { "rke2" };
            let dir = format!("/var/lib/rancher/{name}/{RANCHER_CONTAINERD}");
            // A template named as the config (the GPU Operator's way on
            // k3s) is the template of the config beside it.
            let (config, template) = match &config_given {
                Some(given) if given.ends_with(".tmpl") => {
                    let beside = given.rsplit_once('/').map_or("", |(d, _)| d);
                    (format!("{beside}/config.toml"), Some(given.clone()))
                }
                _ => (given(&config_given, &format!("{dir}/config.toml")), None),
            };
            let binary = if flavor == Flavor::K3s {
                first_file(host, &["/var/lib/rancher/k3s/data/current/bin/containerd"])?
            } else {
                first_file(host, &["/var/lib/rancher/rke2/bin/containerd"])?
            };
            Target {
                flavor,
                detected_by,
                template: Some(match template {
                    Some(template) => template,
                    None => template_for(host, &config)?,
                }),
                config,
                own_drop_in_dir: None,
                // RKE2's containerd listens where k3s's does.
                socket: given(&socket_given, "/run/k3s/containerd/containerd.sock"),
                service: rancher_service(host, name)?,
                binary,
                read_only: None,
            }
        }
        Flavor::K0s => Target {
            flavor,
            detected_by,
            config: given(&config_given, "/etc/k0s/containerd.toml"),
            template: None,
            own_drop_in_dir: Some("/etc/k0s/containerd.d".into()),
            socket: given(&socket_given, "/run/k0s/containerd.sock"),
            service: first_unit(host, &["k0sworker", "k0scontroller"])?
                .unwrap_or_else(|| "k0sworker".into()),
            binary: first_file(host, &["/var/lib/k0s/bin/containerd"])?,
            read_only: None,
        },
        Flavor::Talos => Target {
            flavor,
            detected_by,
            config: "/etc/cri/containerd.toml".into(),
            template: None,
            own_drop_in_dir: None,
            socket: STOCK_SOCKET.into(),
            service: "cri".into(),
            binary: None,
            read_only: Some(
                "Talos's containerd config is read-only and set through the machine config: add the runtime with a machine-config patch that writes /etc/cri/conf.d/20-customization.part (Talos's NVIDIA system extensions, nvidia-container-toolkit and the driver, ship one), then reboot or apply it".into(),
            ),
        },
        Flavor::Bottlerocket => Target {
            flavor,
            detected_by,
            config: "/etc/containerd/config.toml".into(),
            template: None,
            own_drop_in_dir: None,
            socket: STOCK_SOCKET.into(),
            service: "containerd".into(),
            binary: None,
            read_only: Some(
                "Bottlerocket renders containerd's config from its API settings: use one of its NVIDIA variants (aws-k8s-*-nvidia), which configure the runtime themselves, and set settings.kubelet-device-plugins.nvidia through its API or user data".into(),
            ),
        },
    };
    Ok(target)
}

/// k3s's or RKE2's template for `config`: `config-v3.toml.tmpl` for a
/// version-3 (or later) config, `config.toml.tmpl` before; an existing one
/// of either is used as it is (k3s prefers the v3 one when both exist).
fn template_for(host: &Host, config: &str) -> Result<String, StateError> {
    let dir = config.rsplit_once('/').map_or("", |(dir, _)| dir);
    let v3 = format!("{dir}/config-v3.toml.tmpl");
    let v2 = format!("{dir}/config.toml.tmpl");
    if host.exists(&v3)? {
        return Ok(v3);
    }
    if host.exists(&v2)? {
        return Ok(v2);
    }
    let version = host
        .read(config)?
        .and_then(|text| {
            crate::containerd::config::parse_shared(&text)
                .ok()
                .and_then(|doc| doc.get("version").and_then(toml_edit::Item::as_integer))
        })
        .unwrap_or(2);
    Ok(if version >= 3 { v3 } else { v2 })
}

/// The unit k3s or RKE2 runs as: the server's or the agent's, whichever
/// the host has (the server when it has neither unit file).
fn rancher_service(host: &Host, name: &str) -> Result<String, StateError> {
    let (server, agent) = if name == "k3s" {
        ("k3s", "k3s-agent")
    } else {
        ("rke2-server", "rke2-agent")
    };
    Ok(first_unit(host, &[agent, server])?.unwrap_or_else(|| server.to_string()))
}

/// The first of `units` with a unit file in the host's systemd directories.
fn first_unit(host: &Host, units: &[&str]) -> Result<Option<String>, StateError> {
    for unit in units {
        for dir in [
            "/etc/systemd/system",
            "/usr/local/lib/systemd/system",
            "/usr/lib/systemd/system",
            "/lib/systemd/system",
        ] {
            if host.exists(&format!("{dir}/{unit}.service"))? {
                return Ok(Some(unit.to_string()));
            }
        }
    }
    Ok(None)
}

/// Why the node's runtime is CRI-O (the spec's `runtime`, or what the
/// host has), or `None` for containerd.
pub fn crio_chosen(host: &Host, opts: &ContainerdOptions) -> Result<Option<String>, StateError> {
    Ok(match opts.runtime {
        RuntimeChoice::Crio => Some("runtime: crio in the spec".to_string()),
        RuntimeChoice::Containerd => None,
        RuntimeChoice::Auto => crio_detected(host)?,
    })
}

/// The CRI socket of the node's runtime, for the validator: CRI-O's, or
/// the spec's `containerd.socket` when given, else the detected flavour's
/// (its own when detection fails: the validator then says what is
/// missing there).
pub fn cri_socket(host: &Host, opts: &ContainerdOptions) -> String {
    if let Ok(Some(_)) = crio_chosen(host, opts) {
        return opts.crio_socket.clone();
    }
    containerd_target(host, opts)
        .map(|target| target.socket)
        .unwrap_or_else(|_| opts.socket.clone())
}

/// The host path of containerd's binary, on the host's PATH directories.
pub fn containerd_binary(host: &Host) -> Option<String> {
    on_path(host, "containerd").ok().flatten()
}

/// Whether the host runs CRI-O rather than containerd: a crio binary or
/// /etc/crio and no containerd binary, or CRI-O's socket and not
/// containerd's.
pub fn crio_detected(host: &Host) -> Result<Option<String>, StateError> {
    let crio = on_path(host, "crio")?;
    let crio_config =
        host.exists("/etc/crio/crio.conf")? || host.exists("/etc/crio/crio.conf.d")?;
    if crio.is_none() && !crio_config {
        return Ok(None);
    }
    if containerd_binary(host).is_none() {
        return Ok(match crio {
            Some(binary) => Some(format!("{binary} exists and no containerd")),
            // Without either binary (a bootstrap image), containerd's own
            // config says containerd.
            None if host.exists(STOCK_CONFIG)? => None,
            None => Some("/etc/crio exists and no containerd".to_string()),
        });
    }
    if host.exists("/var/run/crio/crio.sock")? && !host.exists(STOCK_SOCKET)? {
        return Ok(Some(
            "CRI-O's socket is there and containerd's is not".to_string(),
        ));
    }
    Ok(None)
}

/// Refuses a drop-in whose directory is a symlink: gpuprov writes its own
/// file only into a directory that is where it says it is.
pub fn refuse_linked_dir(host: &Host, drop_in: &str) -> Result<(), StateError> {
    let Some((dir, _)) = drop_in.rsplit_once('/') else {
        return Ok(());
    };
    match host.link_target(dir)? {
        Some(target) => Err(StateError::operator(format!(
            "{dir}, where the drop-in {drop_in} goes, is a symlink to {target}: gpuprov does not write its drop-in through a link; make it a directory, or name another place"
        ))),
        None => Ok(()),
    }
}
