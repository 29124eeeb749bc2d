//! What is observed once per run and shared by every step.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::gpu::pci::{self, PciError, PciFunction};
use crate::host::{Host, HostError};

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "{root} does not look like a node's root: it has no {missing}. Nothing was changed and no label was published (a GPU node's labels stay). Point --host-root at the node's / (in a pod: mount the node's / at /host, with its /sys and /proc)"
    )]
    NotAHost { root: String, missing: String },
    #[error(
        "{path}: `{value}` is not a kernel release (at most 64 letters, digits and `.` `_` `+` `~` `-`, as uname prints it); nothing was changed"
    )]
    KernelRelease { path: String, value: String },
}

/// Where the running kernel's release is read.
const KERNEL_RELEASE: &str = "/proc/sys/kernel/osrelease";

/// The kernel release as uname gives it (`6.8.0-45-generic`,
/// `5.14.0-427.13.1.el9_4.x86_64`, `6.1.0-26-cloud-amd64`): it goes into
/// package names and paths, so anything else is refused, not spliced.
fn check_kernel_release(value: &str) -> Result<(), FactsError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FactsError::KernelRelease {
            path: KERNEL_RELEASE.to_string(),
            value: crate::printable::printable(value, false).into_owned(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    pub pci: Vec<PciFunction>,
    /// The node's current labels (from `--node-labels` until an API server is wired in).
    pub node_labels: BTreeMap<String, String>,
    /// Label keys gpuprov applied to the node earlier (known with an API server).
    #[serde(skip)]
    pub own_labels: std::collections::BTreeSet<String>,
    /// The node's allocatable resources (known with an API server).
    #[serde(skip)]
    pub node_allocatable: BTreeMap<String, String>,
    /// The Node's `nvidia.com/GPUReady` condition and its taints (known
    /// with an API server), for the readiness gate.
    #[serde(skip)]
    pub node_gpu_ready: Option<crate::kube::node_status::Condition>,
    #[serde(skip)]
    pub node_taints: Vec<k8s_openapi::api::core::v1::Taint>,
    /// The Node's UID (known with an API server).
    #[serde(skip)]
    pub node_uid: Option<String>,
    /// `PRETTY_NAME` from `/etc/os-release`, if there is one.
    pub os: Option<String>,
    /// `ID` then each of `ID_LIKE` from `/etc/os-release` (`ubuntu`, `debian`).
    pub os_ids: Vec<String>,
    /// The running kernel's release.
    pub kernel: Option<String>,
    /// Whether the firmware booted with Secure Boot on.
    pub secure_boot: crate::host::secure_boot::SecureBoot,
    /// `--nvml-lib`, when given.
    #[serde(skip)]
    pub nvml_lib: Option<std::path::PathBuf>,
    /// NVML's inventory, asked for once by the first step that needs it.
    #[serde(skip)]
    nvml: std::sync::OnceLock<Result<crate::gpu::nvml::Inventory, crate::gpu::nvml::NvmlProblem>>,
}

/// A root without sysfs's PCI bus or without procfs is a wrong mount (an
/// empty directory, `/host` without its submounts), not a node without
/// GPUs: taken at its word it would publish `gpu.present=false` and
/// withdraw a GPU node's labels.
fn check_is_a_host(host: &Host) -> Result<(), FactsError> {
    let missing: Vec<&str> = [
        ("/sys/bus/pci/devices", "/sys/bus/pci/devices (sysfs)"),
        ("/proc", "/proc"),
    ]
    .into_iter()
    .filter(|(path, _)| {
        !host
            .stat(path)
            .ok()
            .flatten()
            .is_some_and(|info| info.directory)
    })
    .map(|(_, shown)| shown)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(FactsError::NotAHost {
        root: host.root().display().to_string(),
        missing: missing.join(" and no "),
    })
}

/// What facts are gathered from besides the host itself.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The Node as the API server has it (empty without one).
    pub node: crate::kube::NodeLabels,
    /// Labels given on the command line: they win over the node's own.
    pub given_labels: BTreeMap<String, String>,
    /// The NVML library asked for (`--nvml-lib`), else found in the host.
    pub nvml_lib: Option<std::path::PathBuf>,
}

impl Facts {
    /// The host's facts, with `node_labels` as the node's labels and no
    /// API server.
    pub fn gather(host: &Host, node_labels: BTreeMap<String, String>) -> Result<Facts, FactsError> {
        Facts::gather_from(
            host,
            Sources {
                given_labels: node_labels,
                ..Sources::default()
            },
        )
    }

    /// The one place facts are gathered: the host, then what `from` says
    /// of the node.
    pub fn gather_from(host: &Host, from: Sources) -> Result<Facts, FactsError> {
        let mut node_labels = from.node.labels;
        node_labels.extend(from.given_labels);
        check_is_a_host(host)?;
        let os_release = host.read("/etc/os-release")?.unwrap_or_default();
        let field = |name: &str| {
            os_release
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_string())
        };
        let os = field("PRETTY_NAME");
        let os_ids = [field("ID"), field("ID_LIKE")]
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect();
        let kernel = host
            .read(KERNEL_RELEASE)?
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty());
        if let Some(kernel) = &kernel {
            check_kernel_release(kernel)?;
        }
        Ok(Facts {
            pci: pci::scan(host)?,
            node_labels,
            own_labels: from.node.ours,
            node_allocatable: from.node.allocatable,
            node_gpu_ready: from.node.gpu_ready,
            node_taints: from.node.taints,
            node_uid: from.node.uid,
            os,
            os_ids,
            kernel,
            secure_boot: crate::host::secure_boot::detect(host),
            nvml_lib: from.nvml_lib,
            nvml: std::sync::OnceLock::new(),
        })
    }

    /// What NVML reports (loaded on first use, then kept for the run).
    pub fn nvml(
        &self,
        host: &Host,
    ) -> &Result<crate::gpu::nvml::Inventory, crate::gpu::nvml::NvmlProblem> {
        self.nvml.get_or_init(|| {
            crate::gpu::nvml::find_library(host, self.nvml_lib.as_deref())
                .and_then(|library| crate::gpu::nvml::inventory(&library))
        })
    }

    /// NVML's inventory, or where a GPU is lost (fallen off the bus) the
    /// GPUs it can still read and the lost ones' indexes: what a device
    /// list offers meanwhile (the CDI spec, DRA's slice).
    pub fn nvml_without_lost(
        &self,
        host: &Host,
    ) -> Result<
        (std::borrow::Cow<'_, crate::gpu::nvml::Inventory>, Vec<u32>),
        crate::gpu::nvml::NvmlProblem,
    > {
        match self.nvml(host) {
            Ok(inventory) => Ok((std::borrow::Cow::Borrowed(inventory), Vec::new())),
            Err(crate::gpu::nvml::NvmlProblem::GpuLost { .. }) => {
                let library = crate::gpu::nvml::find_library(host, self.nvml_lib.as_deref())?;
                let (inventory, lost) = crate::gpu::nvml::inventory_without_lost(&library)?;
                Ok((std::borrow::Cow::Owned(inventory), lost))
            }
            Err(problem) => Err(problem.clone()),
        }
    }

    pub fn gpus(&self) -> impl Iterator<Item = &PciFunction> {
        self.pci.iter().filter(|f| f.is_gpu())
    }

    /// True when the node carries `selector` (`key=value`).
    pub fn has_label(&self, selector: &str) -> bool {
        selector
            .split_once('=')
            .is_some_and(|(k, v)| self.node_labels.get(k).is_some_and(|have| have == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_what_uname_prints() {
        for good in [
            "6.8.0-45-generic",
            "5.14.0-427.13.1.el9_4.x86_64",
            "6.1.0-26-cloud-amd64",
            "6.6.87.2-microsoft-standard-WSL2+",
        ] {
            assert!(check_kernel_release(good).is_ok(), "{good}");
        }
        for bad in [
            "6.8.0-45-generic=0.0.1~evil /x",
            "-6.8.0",
            "6.8.0\n",
            "6.8.0;reboot",
            &"6".repeat(65),
        ] {
            assert!(check_kernel_release(bad).is_err(), "{bad}");
        }
    }
}
