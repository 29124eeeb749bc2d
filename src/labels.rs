//! Node labels computed from a run, and the sinks they are written to.
//!
//! Every step publishes `gpuprov.io/<state>=<outcome>`; steps add the GPU
//! Operator's own labels (`nvidia.com/gpu.present`, …) so its DaemonSets and
//! habits keep working. A label the node already carries as an opt-out
//! (`…=false`) is obeyed and never overwritten.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::exec::StepReport;
use crate::host::{Host, HostError};
use crate::plan::Graph;

/// NFD's local feature file: NFD's worker turns each `key=value` line into a
/// node label, so bootstrap images without an API server still label nodes.
pub const NFD_FEATURE_FILE: &str = "/etc/kubernetes/node-feature-discovery/features.d/gpuprov";
const NFD_HEADER: &str = "# Written by gpuprov from its last apply; edits are overwritten.\n";

/// The labels a run publishes, ordered by key.
pub fn compute(
    steps: &[StepReport],
    graph: &Graph,
    node_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for (step, state) in steps.iter().zip(&graph.steps) {
        labels.insert(state.label.clone(), step.outcome.as_str().to_string());
        for (key, value) in &step.labels {
            labels.insert(key.clone(), value.clone());
        }
    }
    labels.retain(|key, value| match node_labels.get(key) {
        Some(theirs) if theirs == "false" && value != "false" => {
            tracing::debug!(label = %key, "kept the node's opt-out label");
            false
        }
        _ => true,
    });
    labels
}

/// What writing the labels would do, for `plan`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkPreview {
    /// Where labels go: a file under the host root, `stdout` or `none`.
    pub target: String,
    pub changes: bool,
    /// Unified diff of the feature file, when the sink is one.
    pub diff: Option<String>,
}

/// Where labels are written. An API-server sink joins these later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelTarget {
    /// NFD's local feature file under the host root.
    Nfd,
    /// Standard output, one `key=value` per line.
    #[value(name = "-")]
    Stdout,
    /// Nowhere.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("cannot write labels to stdout")]
    Stdout(#[source] std::io::Error),
}

pub trait LabelSink {
    /// What `publish` would change, without changing it.
    fn preview(&self, labels: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError>;
    /// Writes the labels; returns whether anything changed.
    fn publish(&self, labels: &BTreeMap<String, String>) -> Result<bool, LabelError>;
    /// Takes back every label gpuprov published (`gpuprov revert`);
    /// returns whether anything changed. Sinks that keep nothing have
    /// nothing to take back.
    fn withdraw(&self) -> Result<bool, LabelError> {
        Ok(false)
    }
}

pub fn sink_for<'a>(target: LabelTarget, host: &'a Host) -> Box<dyn LabelSink + 'a> {
    match target {
        LabelTarget::Nfd => Box::new(NfdFileSink { host }),
        LabelTarget::Stdout => Box::new(StdoutSink),
        LabelTarget::None => Box::new(NoSink),
    }
}

pub struct NfdFileSink<'a> {
    pub host: &'a Host,
}

impl NfdFileSink<'_> {
    fn render(labels: &BTreeMap<String, String>) -> String {
        let mut text = NFD_HEADER.to_string();
        for (key, value) in labels {
            text.push_str(&format!("{key}={value}\n"));
        }
        text
    }
}

impl LabelSink for NfdFileSink<'_> {
    fn preview(&self, labels: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        let current = self.host.read(NFD_FEATURE_FILE)?.unwrap_or_default();
        let wanted = NfdFileSink::render(labels);
        let diff = similar::TextDiff::from_lines(&current, &wanted)
            .unified_diff()
            .context_radius(2)
            .header(NFD_FEATURE_FILE, NFD_FEATURE_FILE)
            .to_string();
        Ok(SinkPreview {
            target: NFD_FEATURE_FILE.to_string(),
            changes: current != wanted,
            diff: Some(diff),
        })
    }

    fn publish(&self, labels: &BTreeMap<String, String>) -> Result<bool, LabelError> {
        Ok(self.host.write_atomic(
            NFD_FEATURE_FILE,
            NfdFileSink::render(labels).as_bytes(),
            0o644,
        )?)
    }

    fn withdraw(&self) -> Result<bool, LabelError> {
        let existed = self.host.exists(NFD_FEATURE_FILE)?;
        self.host.remove(NFD_FEATURE_FILE)?;
        Ok(existed)
    }
}

struct StdoutSink;

impl LabelSink for StdoutSink {
    fn preview(&self, _: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        Ok(SinkPreview {
            target: "stdout".to_string(),
            changes: false,
            diff: None,
        })
    }

    fn publish(&self, labels: &BTreeMap<String, String>) -> Result<bool, LabelError> {
        let mut out = std::io::stdout().lock();
        for (key, value) in labels {
            writeln!(out, "{key}={value}").map_err(LabelError::Stdout)?;
        }
        Ok(false)
    }
}

struct NoSink;

impl LabelSink for NoSink {
    fn preview(&self, _: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        Ok(SinkPreview {
            target: "none".to_string(),
            changes: false,
            diff: None,
        })
    }

    fn publish(&self, _: &BTreeMap<String, String>) -> Result<bool, LabelError> {
        Ok(false)
    }
}
