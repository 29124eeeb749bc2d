//! The state contract: what a capability sees (`StateContext`) and returns
//! (`Observation`, its `Change`s, `Outcome`, `Gate`, `StateError` with its
//! `ErrorKind`). Below every capability and above none: it names no
//! capability (`tests/layout.rs`), and a capability's own kind of change
//! comes in through the `CapabilityChange` trait.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

pub use crate::error_chain::error_chain;

use crate::catalog::StateDef;
use crate::download::Artifact;
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
/// The host changes every capability shares are variants here; a change
/// only one capability knows how to make is `Own`, made through the
/// `CapabilityChange` trait that the capability implements in its folder.
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
    /// Wait until something answers on a unix socket.
    WaitSocket {
        socket: String,
        timeout_seconds: u64,
    },
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
        artifact: Artifact,
        /// Where it is kept, a host path.
        path: String,
        /// Whether the cache already has it (no network then).
        cached: bool,
        /// Its size, when known (cached).
        size: Option<u64>,
        timeout_seconds: u64,
        executable: bool,
    },
    /// A change of one capability's own (a MIG layout, a step of a rolling
    /// upgrade, a check of the runtime's own view of its config).
    #[serde(untagged, serialize_with = "own_as_json")]
    Own(Arc<dyn CapabilityChange>),
}

/// A change that only its capability knows how to make. The executor
/// prints and makes it through this trait alone, so a capability with a
/// new kind of change touches nothing outside its folder.
pub trait CapabilityChange: std::fmt::Debug + Send + Sync {
    /// Its `kind` in `plan --output json` (`mig-layout`).
    fn kind(&self) -> &'static str;
    /// One line for `plan`.
    fn summary(&self) -> String;
    /// Its fields in `plan --output json`, after `kind` (see `json_fields`).
    fn fields(&self) -> serde_json::Value;
    /// Makes it on the node; commands it runs go into `on.commands`.
    fn make(&self, on: &mut MakeContext) -> Result<(), StateError>;
}

/// What making a change may use.
pub struct MakeContext<'a> {
    pub host: &'a Host,
    /// The API server, when there is one.
    pub cluster: Option<&'a Cluster>,
    /// The commands run so far, for the report.
    pub commands: &'a mut Vec<CommandRecord>,
    /// Where a change records the node labels it set.
    pub labels_set: &'a LabelsSet,
}

/// The node labels this run set while making changes (a rolling upgrade's
/// state), and gpuprov's own taints it put on or took away (keyed
/// `taint:<key>`): newer than the facts for the rest of the run, and gone
/// with it.
#[derive(Debug, Default)]
pub struct LabelsSet(RefCell<BTreeMap<String, String>>);

impl LabelsSet {
    pub fn record(&self, key: &str, value: &str) {
        self.0
            .borrow_mut()
            .insert(key.to_string(), value.to_string());
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.0.borrow().get(key).cloned()
    }
}

/// A capability change's fields as `plan --output json` shows them.
pub fn json_fields(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
}

fn own_as_json<S: serde::Serializer>(
    change: &Arc<dyn CapabilityChange>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let fields = change.fields();
    let fields = fields.as_object();
    let mut map = serializer.serialize_map(Some(1 + fields.map_or(0, |f| f.len())))?;
    map.serialize_entry("kind", change.kind())?;
    for (key, value) in fields.into_iter().flatten() {
        map.serialize_entry(key, value)?;
    }
    map.end()
}

impl Change {
    /// A capability's own change.
    pub fn own(change: impl CapabilityChange + 'static) -> Change {
        Change::Own(Arc::new(change))
    }

    /// Fetch `artifact` into its cache path, saying whether the cache
    /// already holds it (and how big it is) so a plan shows whether the
    /// network is needed.
    pub fn fetch(
        host: &Host,
        artifact: &Artifact,
        timeout_seconds: u64,
        executable: bool,
    ) -> Result<Change, StateError> {
        let path = artifact.cache_path();
        let cached = crate::download::cached(host, artifact)
            .map_err(|e| StateError::operator(error_chain(&e)))?;
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
            Change::Own(change) => change.summary(),
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

/// What a capability saw on the node.
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
    /// What this step's failure means: whether waiting may help.
    pub failure_kind: ErrorKind,
    /// When the step wants to be looked at again, whatever else converged.
    pub look_again: Option<LookAgain>,
}

/// When a step wants the daemon to look at it again sooner than it would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookAgain {
    /// What it waits for may be over by then (a GPU's recent error).
    After(std::time::Duration),
    /// It waits for a slot another node holds (a rolling upgrade's): the
    /// daemon looks for a free one at its slot-wait interval.
    SharedSlot,
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
            failure_kind: ErrorKind::NeedsOperator,
            look_again: None,
        }
    }

    /// A step that failed with `error`.
    pub fn failed(error: &StateError) -> Observation {
        let mut obs = Observation::new(Outcome::Failed, error.to_string());
        obs.failure_kind = error.kind();
        obs
    }
}

/// Whether waiting can help with a failure: the one thing the pipeline,
/// `apply --wait` and the daemon decide from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// It may pass by itself (a user's check that waits on something).
    Transient,
    /// A person must change the node or the spec.
    NeedsOperator,
    /// The node must reboot.
    NeedsReboot,
}

/// A failure to observe or to make a change: its kind and its cause
/// chain, as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    kind: ErrorKind,
    chain: String,
}

impl StateError {
    pub fn new(kind: ErrorKind, chain: impl Into<String>) -> StateError {
        StateError {
            kind,
            chain: chain.into(),
        }
    }

    /// A failure a person must fix.
    pub fn operator(chain: impl Into<String>) -> StateError {
        StateError::new(ErrorKind::NeedsOperator, chain)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The same failure, of another kind.
    pub fn of_kind(self, kind: ErrorKind) -> StateError {
        StateError { kind, ..self }
    }
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.chain)
    }
}

impl std::error::Error for StateError {}

impl From<HostError> for StateError {
    fn from(e: HostError) -> StateError {
        StateError::operator(error_chain(&e))
    }
}

/// What a node lacks for a step to go on (kernel headers, a device node):
/// the step's finding, reported as its outcome, not a failure of gpuprov's.
/// A capability that can find either returns
/// `Result<Result<T, Lacks>, StateError>`: the outer for failures, the
/// inner for what the node lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lacks(pub Vec<String>);

impl std::fmt::Display for Lacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// Everything a capability may look at.
pub struct StateContext<'a> {
    pub host: &'a Host,
    pub spec: &'a Spec,
    pub facts: &'a Facts,
    pub state: &'a StateDef,
    /// The API server, when there is one.
    pub cluster: Option<&'a Cluster>,
    /// The node labels this run set so far.
    pub labels_set: &'a LabelsSet,
}

impl StateContext<'_> {
    /// A node label as it is now: as this run set it, else as read at
    /// the start of the run.
    pub fn node_label(&self, key: &str) -> Option<String> {
        self.labels_set
            .get(key)
            .or_else(|| self.facts.node_labels.get(key).cloned())
    }
}

/// What a capability's `revert` may use: the host and the spec, nothing
/// observed (a revert works on a node whose GPU or driver is gone).
pub struct RevertContext<'a> {
    pub host: &'a Host,
    pub spec: &'a Spec,
}

/// A unified diff of a file's content, for a `WriteFile` change.
pub fn file_diff(path: &str, now: &str, wanted: &str) -> String {
    similar::TextDiff::from_lines(now, wanted)
        .unified_diff()
        .context_radius(3)
        .header(path, path)
        .to_string()
}
