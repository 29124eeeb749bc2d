//! The step contract: what a capability's handler sees (`StepContext`) and
//! returns (`Observation`, its `Change`s, `Outcome`, `Gate`, `StepError`).
//! Below every capability and above none: a handler imports this, never
//! the executor that walks the plan.

use std::collections::BTreeMap;

use serde::Serialize;

pub use crate::error_chain::error_chain;

use crate::catalog::StateDef;
use crate::facts::Facts;
use crate::host::{CommandRecord, Host, HostError};
use crate::kube::Cluster;
use crate::spec::Spec;

/// How a step ended: published as `gpuprov.io/<state>=<outcome>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ready,
    Preinstalled,
    Installed,
    Configured,
    Disabled,
    OptedOut,
    Blocked,
    Pending,
    Failed,
    RebootRequired,
    Absent,
    /// Working, but not wholly: a GPU fell off the bus.
    Degraded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ready => "ready",
            Outcome::Preinstalled => "preinstalled",
            Outcome::Installed => "installed",
            Outcome::Configured => "configured",
            Outcome::Disabled => "disabled",
            Outcome::OptedOut => "opted-out",
            Outcome::Blocked => "blocked",
            Outcome::Pending => "pending",
            Outcome::Failed => "failed",
            Outcome::RebootRequired => "reboot-required",
            Outcome::Absent => "absent",
            Outcome::Degraded => "degraded",
        }
    }

    /// Whether dependents may run after a step that ended this way.
    pub fn lets_dependents_run(self) -> bool {
        matches!(
            self,
            Outcome::Ready
                | Outcome::Preinstalled
                | Outcome::Installed
                | Outcome::Configured
                | Outcome::Disabled
                | Outcome::OptedOut
        )
    }
}

/// What dependents of a finished step do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Dependents are blocked, with the reason.
    Block(String),
    /// Dependents are disabled (and so theirs), with the reason: `no GPU`.
    Disable(String),
}

/// One change a step needs, as data: `plan` prints it, `apply` makes it.
#[derive(Debug, Clone, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum Change {
    /// Run a command in the host.
    Run {
        argv: Vec<String>,
        /// How a person reads it (a user's own command as written).
        display: String,
    },
    /// Write a file atomically.
    WriteFile {
        path: String,
        #[serde(skip)]
        content: Vec<u8>,
        #[serde(skip)]
        mode: u32,
        /// Why, in a few words (`backup of the original`).
        purpose: String,
        /// Unified diff from the current content, where a person wants to
        /// read it (a config file; not a backup).
        #[serde(skip_serializing_if = "Option::is_none")]
        diff: Option<String>,
    },
    /// Remove a file gpuprov wrote (a marker); a missing file is fine.
    RemoveFile { path: String, purpose: String },
    /// Stop the process serving a unix socket (found by the socket's peer
    /// credentials) so its service manager starts it again, then wait for a
    /// new process to answer.
    SignalSocketOwner {
        socket: String,
        timeout_seconds: u64,
    },
    /// Check containerd's own view of its config (`containerd config dump`
    /// in the host) for the runtime: it must exist, run `binary`, carry
    /// runc's SystemdCgroup, and be the default when `set_as_default`.
    CheckContainerdView {
        config: String,
        class: String,
        binary: String,
        set_as_default: bool,
        /// With `cdi.enabled`: CDI must be on, reading gpuprov's spec
        /// directory, and the CDI runtime there.
        #[serde(skip_serializing_if = "Option::is_none")]
        cdi: Option<crate::containerd::config::CdiWanted>,
        /// The containerd binary whose `config dump` is asked (none: the
        /// files are merged by containerd's rules).
        #[serde(skip_serializing_if = "Option::is_none")]
        containerd: Option<String>,
    },
    /// Check CRI-O's view of its config (its `crio config` when the host
    /// has the binary, else its files merged) for the runtime.
    CheckCrioView {
        config: String,
        dir: String,
        class: String,
        binary: String,
        set_as_default: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        cdi_spec_dir: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        crio: Option<String>,
    },
    /// Wait until something answers on a unix socket.
    WaitSocket {
        socket: String,
        timeout_seconds: u64,
    },
    /// Run the validation pod on this node and wait for it to succeed; it is
    /// deleted afterwards, whatever happened.
    ValidationPod {
        namespace: String,
        name: String,
        image: String,
        runtime_class: Option<String>,
        timeout_seconds: u64,
        #[serde(skip)]
        manifest: serde_json::Value,
    },
    /// Run a container through containerd's CRI with the runtime handler
    /// and remember the pass (`validator.mode: cri`, or no API server).
    CriValidation(CriValidation),
    /// Apply a MIG layout through NVML, pausing the GPU clients first.
    MigLayout(MigLayout),
    /// A step of a rolling driver upgrade (`upgrade::Action`).
    Upgrade(crate::upgrade::action::Action),
    /// Write a ConfigMap gpuprov owns, whole (server-side apply).
    ApplyConfigMap {
        namespace: String,
        name: String,
        /// Keys added, changed or removed, for the plan.
        keys: Vec<String>,
        purpose: String,
        #[serde(skip)]
        data: BTreeMap<String, String>,
    },
    /// Unpack a cached `.tar.gz` into a directory gpuprov owns,
    /// atomically, recording what it put there in `record`.
    Unpack {
        archive: String,
        into: String,
        record: String,
        /// Whether it replaces gpuprov's earlier unpack (else `into` is new).
        replaces: bool,
    },
    /// Put a pinned artifact into the cache (a no-op when it is there).
    Fetch {
        #[serde(flatten)]
        artifact: crate::download::Artifact,
        /// Where it is kept, a host path.
        path: String,
        /// Whether the cache already has it (no network then).
        cached: bool,
        /// Its size, when known (cached).
        size: Option<u64>,
        timeout_seconds: u64,
        executable: bool,
    },
}

impl Change {
    /// Fetch `artifact` into its cache path, saying whether the cache
    /// already holds it (and how big it is) so a plan shows whether the
    /// network is needed.
    pub fn fetch(
        host: &Host,
        artifact: &crate::download::Artifact,
        timeout_seconds: u64,
        executable: bool,
    ) -> Result<Change, StepError> {
        let path = artifact.cache_path();
        let cached = crate::download::cached(host, artifact)
            .map_err(|e| StepError::Observe(error_chain(&e)))?;
        let size = if cached {
            host.stat(&path)?.map(|info| info.size)
        } else {
            None
        };
        Ok(Change::Fetch {
            artifact: artifact.clone(),
            path,
            cached,
            size,
            timeout_seconds,
            executable,
        })
    }

    pub fn summary(&self) -> String {
        match self {
            Change::Run { display, .. } => format!("run: {display}"),
            Change::Upgrade(action) => action.summary(),
            Change::WriteFile { path, purpose, .. } => format!("write {path} ({purpose})"),
            Change::RemoveFile { path, purpose } => format!("remove {path} ({purpose})"),
            Change::SignalSocketOwner { socket, .. } => {
                format!(
                    "SIGTERM the process serving {socket}, wait for its service manager to start it again"
                )
            }
            Change::WaitSocket {
                socket,
                timeout_seconds,
            } => {
                format!("wait up to {timeout_seconds}s for {socket} to answer")
            }
            Change::CheckContainerdView {
                config,
                class,
                containerd,
                ..
            } => match containerd {
                Some(binary) => format!(
                    "check runtime `{class}` in containerd's own view of {config} ({binary} config dump)"
                ),
                None => format!(
                    "check runtime `{class}` in containerd's view of {config} (its imports merged by containerd's rules)"
                ),
            },
            Change::CheckCrioView {
                dir, class, crio, ..
            } => match crio {
                Some(binary) => format!(
                    "check runtime `{class}` in CRI-O's own view of its config and {dir} ({binary} config)"
                ),
                None => format!(
                    "check runtime `{class}` in CRI-O's view of its config and {dir} (merged as CRI-O does)"
                ),
            },
            Change::Unpack {
                archive,
                into,
                record,
                replaces,
            } => {
                let how = if *replaces {
                    "replacing gpuprov's earlier unpack there"
                } else {
                    "a new directory"
                };
                format!("unpack {archive} into {into} (atomically, {how}; recorded in {record})")
            }
            Change::ValidationPod {
                namespace,
                name,
                image,
                runtime_class,
                timeout_seconds,
                ..
            } => {
                let class = runtime_class
                    .as_deref()
                    .map(|c| format!(", runtime class {c}"))
                    .unwrap_or_default();
                format!(
                    "run pod {namespace}/{name} ({image}{class}, 1 nvidia.com/gpu) on this node, wait up to {timeout_seconds}s for it to succeed, delete it"
                )
            }
            Change::CriValidation(v) => {
                format!(
                    "run `{}` in {} through containerd's CRI ({}) with runtime handler {} on the node's network, wait up to {}s for it to exit 0, remove its sandbox, remember the pass in {} until reboot",
                    v.command.join(" "),
                    v.image,
                    v.socket,
                    v.runtime_handler,
                    v.timeout_seconds,
                    v.marker,
                )
            }
            Change::MigLayout(layout) => layout.summary(),
            Change::ApplyConfigMap {
                namespace,
                name,
                keys,
                purpose,
                ..
            } => format!(
                "apply configmap {namespace}/{name} ({purpose}): {}",
                keys.join(", ")
            ),
            Change::Fetch {
                artifact,
                path,
                cached,
                size,
                ..
            } => {
                let size = size
                    .map(|s| format!(", {:.1} MiB", s as f64 / 1048576.0))
                    .unwrap_or_default();
                let how = if *cached {
                    "cache hit, no download"
                } else {
                    "download"
                };
                format!(
                    "fetch {} (sha256 {}{size}) → {path} ({how})",
                    artifact.url, artifact.sha256
                )
            }
        }
    }
}

/// What one CRI validation runs (a `Change::CriValidation`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CriValidation {
    pub socket: String,
    pub runtime_handler: String,
    pub image: String,
    pub command: Vec<String>,
    pub image_pull_policy: Option<String>,
    pub namespace: String,
    pub timeout_seconds: u64,
    /// Where a pass is remembered until reboot.
    pub marker: String,
    /// What is validated, kept in the marker: another value means another
    /// validation.
    #[serde(skip)]
    pub validated: serde_json::Value,
}

/// What one MIG layout change does (a `Change::MigLayout`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigLayout {
    /// The layout's name (`all-1g.10gb`).
    pub layout: String,
    /// The NVML library the change goes through.
    pub library: String,
    /// Per GPU that changes, in index order.
    pub gpus: Vec<MigGpuChange>,
    /// How long the GPU clients' pods may take to leave the node.
    pub timeout_seconds: u64,
}

/// One GPU's part of a layout change.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigGpuChange {
    pub index: u32,
    pub name: String,
    /// Turn MIG on or off first.
    pub set_mode: Option<bool>,
    /// The MIG devices destroyed, by profile name.
    pub destroy: Vec<String>,
    /// The MIG devices created, in order.
    pub create: Vec<MigCreate>,
    /// What the GPU is to hold: profile name → count (0: as many as fit).
    #[serde(skip)]
    pub wanted: BTreeMap<String, u32>,
}

/// One GPU instance (with one compute instance) to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigCreate {
    pub profile: String,
    pub gpu_instance_profile: u32,
    pub compute_instance_profile: u32,
    pub start: u32,
    pub size: u32,
}

impl MigLayout {
    /// `MIG layout all-1g.10gb: GPUs 0,1: enable MIG, create 7× 1g.10gb
    /// (slices 0,1,2,3,4,5,6); …`: GPUs with the same change told once.
    pub fn summary(&self) -> String {
        let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
        for gpu in &self.gpus {
            let mut parts = Vec::new();
            match gpu.set_mode {
                Some(true) => parts.push("enable MIG".to_string()),
                Some(false) => parts.push("disable MIG".to_string()),
                None => {}
            }
            if !gpu.destroy.is_empty() {
                parts.push(format!("destroy {}", gpu.destroy.join(" + ")));
            }
            let mut made: Vec<(String, Vec<u32>)> = Vec::new();
            for c in &gpu.create {
                match made.iter_mut().find(|(p, _)| *p == c.profile) {
                    Some((_, starts)) => starts.push(c.start),
                    None => made.push((c.profile.clone(), vec![c.start])),
                }
            }
            if !made.is_empty() {
                let made: Vec<String> = made
                    .iter()
                    .map(|(profile, starts)| {
                        let starts: Vec<String> = starts.iter().map(u32::to_string).collect();
                        format!("{}× {profile} (slices {})", starts.len(), starts.join(","))
                    })
                    .collect();
                parts.push(format!("create {}", made.join(" + ")));
            }
            let what = parts.join(", ");
            match groups.iter_mut().find(|(w, _)| *w == what) {
                Some((_, indices)) => indices.push(gpu.index),
                None => groups.push((what, vec![gpu.index])),
            }
        }
        let gpus: Vec<String> = groups
            .iter()
            .map(|(what, indices)| {
                let noun = if indices.len() == 1 { "GPU" } else { "GPUs" };
                let list: Vec<String> = indices.iter().map(u32::to_string).collect();
                format!("{noun} {}: {what}", list.join(","))
            })
            .collect();
        format!(
            "MIG layout {}: {}; GPU clients paused while it changes (their pods given {}s to leave)",
            self.layout,
            gpus.join("; "),
            self.timeout_seconds
        )
    }
}

/// What a step leaves when making its changes fails: the labels it then
/// publishes and whether its dependents still run.
#[derive(Debug, Clone)]
pub struct OnFailure {
    pub labels: BTreeMap<String, String>,
    pub gate: Gate,
    /// Made, as far as they go, when a change fails after the first
    /// `changes_after` changes were made (a rolling upgrade says it failed
    /// once it held a slot).
    pub changes: Vec<Change>,
    pub changes_after: usize,
}

/// What a handler saw on the node.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The outcome when nothing needs to change.
    pub outcome: Outcome,
    /// The outcome expected once `changes` are made (what `plan` shows);
    /// `apply` reports what it observes afterwards.
    pub on_change: Outcome,
    pub reason: String,
    pub changes: Vec<Change>,
    /// Labels the step publishes besides its outcome label (GPU Operator
    /// compatibility labels).
    pub labels: BTreeMap<String, String>,
    /// Overrides the gate the outcome implies.
    pub gate: Option<Gate>,
    /// Commands run while observing (an exec state's check).
    pub commands: Vec<CommandRecord>,
    pub details: serde_json::Value,
    /// What a failure to make `changes` leaves (default: no labels, and
    /// dependents blocked).
    pub on_failure: Option<OnFailure>,
}

impl Observation {
    pub fn new(outcome: Outcome, reason: impl Into<String>) -> Observation {
        Observation {
            outcome,
            on_change: outcome,
            reason: reason.into(),
            changes: Vec::new(),
            labels: BTreeMap::new(),
            gate: None,
            commands: Vec::new(),
            details: serde_json::Value::Null,
            on_failure: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{0}")]
    Observe(String),
}

/// Everything a handler may look at.
pub struct StepContext<'a> {
    pub host: &'a Host,
    pub spec: &'a Spec,
    pub facts: &'a Facts,
    pub state: &'a StateDef,
    /// The API server, when there is one.
    pub cluster: Option<&'a Cluster>,
}

/// A unified diff of a file's content, for a `WriteFile` change.
pub fn file_diff(path: &str, now: &str, wanted: &str) -> String {
    similar::TextDiff::from_lines(now, wanted)
        .unified_diff()
        .context_radius(3)
        .header(path, path)
        .to_string()
}
