//! The driver's files a container needs, found in the host root: the
//! user-space libraries of the loaded version with their links, the
//! binaries, the GSP firmware, the IPC sockets and the device nodes.
//!
//! The set is the one `nvidia-ctk cdi generate` finds: every library named
//! `*.so.<driver version>` in the directories drivers install to (and their
//! `vdpau/`), the tools NVIDIA's packages ship, `gsp*.bin` under
//! `/lib/firmware/nvidia/<version>`, the persistence and fabric manager
//! sockets and MPS's pipe directory.

use crate::gpu::nvml::LIBRARY_DIRS;
use crate::host::{HOST_PATH, Host, HostDir, HostError};
use rustix::fs::FileType;

/// Libraries without which no CUDA container works: their absence is a
/// broken install, reported by name rather than written into a spec.
pub const REQUIRED_LIBRARIES: [&str; 3] = [
    "libcuda.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
];

/// The driver's tools, mounted where found; `nvidia-smi` is required.
pub const BINARIES: [&str; 7] = [
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
    "nvidia-imex",
    "nvidia-imex-ctl",
];

/// Sockets and pipes of the driver's daemons, mounted when they exist.
pub const IPC: [&str; 3] = [
    "/run/nvidia-persistenced/socket",
    "/run/nvidia-fabricmanager/socket",
    "/tmp/nvidia-mps",
];

/// Device nodes every GPU container gets: the control device and UVM are
/// required, the others (UVM tools, modeset) mounted when present.
pub const CONTROL_NODES: [(&str, bool); 4] = [
    ("/dev/nvidiactl", true),
    ("/dev/nvidia-uvm", true),
    ("/dev/nvidia-uvm-tools", false),
    ("/dev/nvidia-modeset", false),
];

/// Where the GSP firmware of a driver version lives.
const FIRMWARE_DIRS: [&str; 2] = ["/lib/firmware/updates/nvidia", "/lib/firmware/nvidia"];

/// What was found, as host paths, in a stable order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFiles {
    /// `/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15`, …
    pub libraries: Vec<String>,
    /// The links beside them that lead to one of them, as written:
    /// (`libcuda.so.550.54.15`, `/usr/lib/x86_64-linux-gnu/libcuda.so.1`).
    pub links: Vec<(String, String)>,
    /// The directories the libraries are in, for the ldcache update.
    pub library_dirs: Vec<String>,
    pub binaries: Vec<String>,
    pub firmware: Vec<String>,
    pub ipc: Vec<String>,
    /// The control nodes present.
    pub control_nodes: Vec<String>,
    /// Files left out of the spec because no consumer could use their
    /// paths, each with why.
    pub skipped: Vec<String>,
}

/// Why a host path cannot go into a CDI spec, or `None` when it can. A
/// mount's path must be one the runtime can open and the hook arguments
/// (`--link <target>::<link>`, `--folder <dir>`) must parse in nvidia-ctk:
/// no `::` (its separator), no control characters, no `,` or `=` (its
/// flag syntax), and valid UTF-8 (checked where the name is read).
pub fn unexpressible(path: &str) -> Option<&'static str> {
    if path.contains("::") {
        Some("it holds `::`, nvidia-ctk's link separator")
    } else if path.chars().any(char::is_control) {
        Some("it holds a control character")
    } else if path.contains([',', '=']) {
        Some("it holds `,` or `=`, which nvidia-ctk's arguments cannot carry")
    } else {
        None
    }
}

/// A driver install a spec cannot be written for, each part named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub Vec<String>);

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// The driver `version`'s files in the host root.
pub fn find(host: &Host, version: &str) -> Result<Result<DriverFiles, Missing>, HostError> {
    let suffix = format!(".so.{version}");
    let mut libraries: Vec<String> = Vec::new();
    let mut links = Vec::new();
    let mut library_dirs = Vec::new();
    let mut seen_names = std::collections::BTreeSet::new();
    let mut skipped = Vec::new();
    // A path no consumer can use is left out and named, never written.
    let mut usable = |dir: &HostDir, name: &str| {
        let path = format!("{}/{name}", dir.host_path());
        let why = match dir.not_utf8.contains(name) {
            true => Some("its name is not UTF-8"),
            false => unexpressible(&path),
        };
        match why {
            Some(why) => {
                skipped.push(format!(
                    "{} ({why})",
                    crate::printable::printable(&path, false)
                ));
                false
            }
            None => true,
        }
    };
    for dir in LIBRARY_DIRS {
        for dir in [format!("/{dir}"), format!("/{dir}/vdpau")] {
            // One open directory for its listing and its links: a library
            // directory is resolved once, not once per name.
            let Some(listing) = host.read_dir(&dir)? else {
                continue;
            };
            let mut found_here = Vec::new();
            for (name, kind) in &listing.entries {
                let legacy_nvvm = name.starts_with("libnvidia-nvvm70.so.");
                if !(name.ends_with(&suffix) || legacy_nvvm) {
                    continue;
                }
                // A second directory holding the same library is the
                // same install seen twice (`/lib64` → `/usr/lib64`).
                if *kind == FileType::RegularFile
                    && usable(&listing, name)
                    && seen_names.insert(name.clone())
                {
                    found_here.push(name.clone());
                }
            }
            if found_here.is_empty() {
                continue;
            }
            // Only names a link to one of them can have (`libcuda.so`,
            // `libcuda.so.1`) are read as links: a library directory holds
            // thousands of other files.
            let stems: Vec<&str> = found_here
                .iter()
                .filter_map(|name| Some(&name[..name.find(".so.")? + 3]))
                .collect();
            for (name, kind) in &listing.entries {
                if *kind != FileType::Symlink || !stems.iter().any(|stem| name.starts_with(stem)) {
                    continue;
                }
                if let Some(target) = link_to(&listing, name, &found_here)?
                    && usable(&listing, name)
                    && unexpressible(&target).is_none()
                {
                    links.push((target, format!("{dir}/{name}")));
                }
            }
            libraries.extend(found_here.iter().map(|name| format!("{dir}/{name}")));
            library_dirs.push(dir);
        }
    }

    let mut missing = Vec::new();
    for required in REQUIRED_LIBRARIES {
        let name = format!("{required}.{version}");
        if !seen_names.contains(&name) {
            missing.push(format!(
                "{name} (driver {version}'s library) is in none of /{}",
                LIBRARY_DIRS.join(", /")
            ));
        }
    }

    let mut binaries = Vec::new();
    for binary in BINARIES {
        let mut found = None;
        for dir in HOST_PATH {
            let path = format!("/{dir}/{binary}");
            if host.is_file(&path)? {
                found = Some(path);
                break;
            }
        }
        match found {
            Some(path) => binaries.push(path),
            None if binary == "nvidia-smi" => missing.push(format!(
                "nvidia-smi is in none of /{}",
                HOST_PATH.join(", /")
            )),
            None => {}
        }
    }

    let mut firmware = Vec::new();
    for dir in FIRMWARE_DIRS {
        let Some(listing) = host.read_dir(&format!("{dir}/{version}"))? else {
            continue;
        };
        for (name, kind) in &listing.entries {
            let path = format!("{}/{name}", listing.host_path());
            // A file, or a link to one (as `is_file` follows it, inside the root).
            let file = match kind {
                FileType::RegularFile => true,
                FileType::Symlink => host.is_file(&path)?,
                _ => false,
            };
            if name.starts_with("gsp") && name.ends_with(".bin") && file && usable(&listing, name) {
                firmware.push(path);
            }
        }
    }

    let mut ipc = Vec::new();
    for path in IPC {
        if host.exists(path)? {
            ipc.push(path.to_string());
        }
    }

    let mut control_nodes = Vec::new();
    for (node, required) in CONTROL_NODES {
        if host.exists(node)? {
            control_nodes.push(node.to_string());
        } else if required {
            missing.push(format!("device node {node} does not exist"));
        }
    }

    if !missing.is_empty() {
        return Ok(Err(Missing(missing)));
    }
    Ok(Ok(DriverFiles {
        libraries,
        links,
        library_dirs,
        binaries,
        firmware,
        ipc,
        control_nodes,
        skipped,
    }))
}

/// When `name` in `dir` is a link that leads, within `dir`, to one of
/// `libraries` (`libcuda.so` → `libcuda.so.1` → `libcuda.so.550.54.15`):
/// where it points, as written. Links elsewhere are someone else's.
fn link_to(dir: &HostDir, name: &str, libraries: &[String]) -> Result<Option<String>, HostError> {
    let Some(first) = dir.link_target(name)? else {
        return Ok(None);
    };
    let mut hop = first.clone();
    // A chain of links in one directory is short; a loop ends here.
    for _ in 0..8 {
        if hop.contains('/') {
            return Ok(None);
        }
        if libraries.contains(&hop) {
            return Ok(Some(first));
        }
        match dir.link_target(&hop)? {
            Some(next) => hop = next,
            None => return Ok(None),
        }
    }
    Ok(None)
}
