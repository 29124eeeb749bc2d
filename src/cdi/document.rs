//! The CDI spec documents gpuprov writes: `nvidia.com/gpu` (a device per
//! GPU by index and UUID, per MIG device as `<gpu>:<mig>`, and `all`) and
//! `management.nvidia.com/gpu=all` (every device node, for the GPU
//! Operator's validator and monitoring pods).

use serde::Serialize;

use super::driver_files::DriverFiles;

/// The oldest CDI version that has what these documents use: device
/// names that begin with a digit came in 0.5.0. Older consumers
/// (containerd 1.7, podman 4) read it.
pub const CDI_VERSION: &str = "0.5.0";
pub const GPU_KIND: &str = "nvidia.com/gpu";
pub const MANAGEMENT_KIND: &str = "management.nvidia.com/gpu";

/// How every file gpuprov writes begins: how it knows its own (a later
/// gpuprov may say more after it).
pub const MARKER: &str = "# Written by gpuprov (the cdi state)";
/// The first line of every file gpuprov writes.
pub const HEADER: &str = "# Written by gpuprov (the cdi state) from NVML and the driver files on this node; it is rewritten when they change, so edits here do not last.\n";

/// Where the GPU Operator's driver container puts the driver on the host;
/// in the container its files sit at their usual paths.
const DRIVER_CONTAINER_ROOT: &str = "/run/nvidia/driver";

/// Mount options of the driver's files: read-only bind mounts.
const FILE_MOUNT: [&str; 5] = ["ro", "nosuid", "nodev", "rbind", "rprivate"];
/// Sockets and pipes: as files, and nothing in them runs.
const IPC_MOUNT: [&str; 5] = ["nosuid", "nodev", "rbind", "rprivate", "noexec"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<Device>,
    pub container_edits: Edits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub name: String,
    pub container_edits: Edits,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    pub hook_name: String,
    pub path: String,
    pub args: Vec<String>,
}

/// A whole GPU, as NVML numbers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    /// `/dev/nvidia<minor>`.
    pub minor: u32,
    /// Its MIG devices, in NVML's order, while MIG is on.
    pub mig: Vec<MigDevice>,
}

/// A MIG device: a compute instance in a GPU instance, reached through
/// its parent's node and the two capability nodes the driver made for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDevice {
    pub gpu_instance: u32,
    pub compute_instance: u32,
    /// `/dev/nvidia-caps/nvidia-cap<n>` for the GPU instance's and the
    /// compute instance's `access`.
    pub caps: [String; 2],
}

fn node(path: &str) -> DeviceNode {
    DeviceNode {
        path: path.to_string(),
    }
}

/// The path a host file has in the container.
fn in_container(host_path: &str) -> String {
    match host_path.strip_prefix(DRIVER_CONTAINER_ROOT) {
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        _ => host_path.to_string(),
    }
}

fn mounts(paths: &[String], options: &[&str]) -> Vec<Mount> {
    paths
        .iter()
        .map(|path| Mount {
            host_path: path.clone(),
            container_path: in_container(path),
            options: options.iter().map(|o| o.to_string()).collect(),
        })
        .collect()
}

/// What every container that gets an NVIDIA device also gets: the control
/// nodes, the driver's files, and the hooks that recreate the libraries'
/// links and refresh the container's ldcache (through the toolkit's
/// `nvidia-ctk`, at `hook_binary` on the host).
fn common_edits(files: &DriverFiles, hook_binary: &str) -> Edits {
    let mut mounted = mounts(&files.libraries, &FILE_MOUNT);
    mounted.extend(mounts(&files.binaries, &FILE_MOUNT));
    mounted.extend(mounts(&files.firmware, &FILE_MOUNT));
    mounted.extend(mounts(&files.ipc, &IPC_MOUNT));
    let hook = |args: Vec<String>| Hook {
        hook_name: "createContainer".to_string(),
        path: hook_binary.to_string(),
        args: ["nvidia-ctk", "hook"]
            .iter()
            .map(|a| a.to_string())
            .chain(args)
            .collect(),
    };
    let mut hooks = Vec::new();
    if !files.links.is_empty() {
        let mut args = vec!["create-symlinks".to_string()];
        for (target, link) in &files.links {
            args.push("--link".to_string());
            args.push(format!("{target}::{}", in_container(link)));
        }
        hooks.push(hook(args));
    }
    let mut args = vec!["update-ldcache".to_string()];
    for dir in &files.library_dirs {
        args.push("--folder".to_string());
        args.push(in_container(dir));
    }
    hooks.push(hook(args));
    Edits {
        // The runtime's legacy hook must not add devices of its own.
        env: vec!["NVIDIA_VISIBLE_DEVICES=void".to_string()],
        device_nodes: files.control_nodes.iter().map(|n| node(n)).collect(),
        mounts: mounted,
        hooks,
    }
}

fn gpu_node(gpu: &Gpu) -> String {
    format!("/dev/nvidia{}", gpu.minor)
}

/// `nvidia.com/gpu`: each GPU by index and by UUID, each MIG device as
/// `<gpu index>:<mig index>`, and `all`.
pub fn gpu_spec(gpus: &[Gpu], files: &DriverFiles, hook_binary: &str) -> Document {
    let mut devices = Vec::new();
    let mut all = Vec::new();
    for gpu in gpus {
        let whole = Edits {
            device_nodes: vec![node(&gpu_node(gpu))],
            ..Edits::default()
        };
        for name in [gpu.index.to_string(), gpu.uuid.clone()] {
            devices.push(Device {
                name,
                container_edits: whole.clone(),
            });
        }
        all.push(node(&gpu_node(gpu)));
    }
    for gpu in gpus {
        for (i, mig) in gpu.mig.iter().enumerate() {
            let mut nodes = vec![node(&gpu_node(gpu))];
            nodes.extend(mig.caps.iter().map(|c| node(c)));
            for cap in &mig.caps {
                if !all.iter().any(|n| n.path == *cap) {
                    all.push(node(cap));
                }
            }
            devices.push(Device {
                name: format!("{}:{i}", gpu.index),
                container_edits: Edits {
                    device_nodes: nodes,
                    ..Edits::default()
                },
            });
        }
    }
    devices.push(Device {
        name: "all".to_string(),
        container_edits: Edits {
            device_nodes: all,
            ..Edits::default()
        },
    });
    Document {
        cdi_version: CDI_VERSION.to_string(),
        kind: GPU_KIND.to_string(),
        devices,
        container_edits: common_edits(files, hook_binary),
    }
}

/// `management.nvidia.com/gpu=all`: every NVIDIA device node, whatever
/// is allocated (the validator and monitoring pods see every GPU).
pub fn management_spec(
    gpus: &[Gpu],
    files: &DriverFiles,
    hook_binary: &str,
    mig_control: &[String],
) -> Document {
    let mut nodes: Vec<DeviceNode> = gpus.iter().map(|g| node(&gpu_node(g))).collect();
    for gpu in gpus {
        for mig in &gpu.mig {
            for cap in &mig.caps {
                if !nodes.iter().any(|n| n.path == *cap) {
                    nodes.push(node(cap));
                }
            }
        }
    }
    nodes.extend(mig_control.iter().map(|c| node(c)));
    Document {
        cdi_version: CDI_VERSION.to_string(),
        kind: MANAGEMENT_KIND.to_string(),
        devices: vec![Device {
            name: "all".to_string(),
            container_edits: Edits {
                device_nodes: nodes,
                ..Edits::default()
            },
        }],
        container_edits: common_edits(files, hook_binary),
    }
}

/// The file's text: gpuprov's header, then the document as YAML.
pub fn render(document: &Document) -> Result<String, String> {
    render_with(HEADER, document)
}

/// The file's text under another header (a DRA claim's spec).
pub fn render_with(header: &str, document: &Document) -> Result<String, String> {
    let yaml = serde_saphyr::to_string(document).map_err(|e| {
        format!(
            "the CDI spec {} cannot be written as YAML: {e}",
            document.kind
        )
    })?;
    Ok(format!("{header}{yaml}"))
}

/// The devices one DRA claim was allocated, each by the name the claim's
/// containers ask for (`<claim uid>-<device>`), with the driver's files and
/// hooks every NVIDIA container gets.
pub fn claim_spec(
    kind: &str,
    devices: Vec<Device>,
    files: &DriverFiles,
    hook_binary: &str,
) -> Document {
    Document {
        cdi_version: CDI_VERSION.to_string(),
        kind: kind.to_string(),
        devices,
        container_edits: common_edits(files, hook_binary),
    }
}

/// A whole GPU's own edit: its device node.
pub fn gpu_edits(minor: u32) -> Edits {
    Edits {
        device_nodes: vec![node(&format!("/dev/nvidia{minor}"))],
        ..Edits::default()
    }
}

/// A MIG device's own edits: its GPU's node and its two capability nodes.
pub fn mig_edits(minor: u32, caps: &[String; 2]) -> Edits {
    let mut nodes = vec![node(&format!("/dev/nvidia{minor}"))];
    nodes.extend(caps.iter().map(|c| node(c)));
    Edits {
        device_nodes: nodes,
        ..Edits::default()
    }
}

/// Whether a file at a spec's path is one gpuprov wrote.
pub fn is_ours(text: &str) -> bool {
    text.starts_with(MARKER)
}
