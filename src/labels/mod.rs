//! Node labels computed from a run, and the sinks they are written to.
//!
//! Every step publishes `gpuprov.io/<state>=<outcome>`; steps add the GPU
//! Operator's own labels (`nvidia.com/gpu.present`, …) so its DaemonSets and
//! habits keep working. A label the node already carries as an opt-out
//! (`…=false`) is obeyed and never overwritten.

mod api_sink;

use std::collections::BTreeMap;
use std::io::Write;

use crate::host::{Host, HostError};
use crate::label_syntax::check_label;
use crate::plan::Graph;
use crate::report::{SinkPreview, StateReport};

/// NFD's local feature file: NFD's worker turns each `key=value` line into a
/// node label, so bootstrap images without an API server still label nodes.
pub const NFD_FEATURE_FILE: &str = "/etc/kubernetes/node-feature-discovery/features.d/gpuprov";
const NFD_HEADER: &str = "# Written by gpuprov from its last apply; edits are overwritten.\n";

/// The labels a run publishes, ordered by key. `facts.own_labels` are keys
/// gpuprov itself set earlier: a `false` there is gpuprov's own, not an
/// opt-out.
pub fn compute(
    steps: &[StateReport],
    graph: &Graph,
    facts: &crate::facts::Facts,
) -> BTreeMap<String, String> {
    let node_labels = &facts.node_labels;
    let mut labels = BTreeMap::new();
    for (step, state) in steps.iter().zip(&graph.states) {
        labels.insert(state.label.clone(), step.outcome.as_str().to_string());
        for (key, value) in &step.labels {
            labels.insert(key.clone(), value.clone());
        }
    }
    // A label Kubernetes would refuse is never published: it would fail
    // the whole apply on an API server, and a newline in it would inject
    // lines into NFD's feature file.
    labels.retain(|key, value| match check_label(key, value) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(label = %key, "not published: {why}");
            false
        }
    });
    labels.retain(|key, value| match node_labels.get(key) {
        Some(theirs)
            if theirs == "false" && value != "false" && !facts.own_labels.contains(key) =>
        {
            tracing::debug!(label = %key, "kept the node's opt-out label");
            false
        }
        _ => true,
    });
    labels
}

/// Where labels are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelTarget {
    /// The API server when one is configured, else the NFD feature file.
    Auto,
    /// The Node object, by server-side apply (field manager `gpuprov`).
    Api,
    /// NFD's local feature file under the host root.
    File,
    /// Standard output, one `key=value` per line.
    Stdout,
    /// Nowhere.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
    #[error("cannot write labels to stdout")]
    Stdout(#[source] std::io::Error),
}

pub trait LabelSink {
    /// What `publish` would change, without changing it.
    fn preview(&self, labels: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError>;
    /// Writes the labels; says what changed (`changes`) and what was left alone.
    fn publish(&self, labels: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError>;
    /// Takes back every label gpuprov published (`gpuprov revert`);
    /// returns whether anything changed. Sinks that keep nothing have
    /// nothing to take back.
    fn withdraw(&self) -> Result<bool, LabelError> {
        Ok(false)
    }
}

/// The sink for a resolved target (`Auto` and `Api` need the cluster).
pub fn sink_for<'a>(
    target: LabelTarget,
    host: &'a Host,
    cluster: Option<&'a crate::kube::Cluster>,
) -> Box<dyn LabelSink + 'a> {
    match (target, cluster) {
        (LabelTarget::Api | LabelTarget::Auto, Some(cluster)) => {
            Box::new(api_sink::ApiLabelSink { cluster })
        }
        (LabelTarget::Stdout, _) => Box::new(StdoutSink),
        (LabelTarget::None, _) => Box::new(NoSink),
        _ => Box::new(NfdFileSink { host }),
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
            notes: Vec::new(),
        })
    }

    fn publish(&self, labels: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        let mut preview = self.preview(labels)?;
        preview.changes = self.host.write_atomic(
            NFD_FEATURE_FILE,
            NfdFileSink::render(labels).as_bytes(),
            0o644,
        )?;
        Ok(preview)
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
            ..SinkPreview::default()
        })
    }

    fn publish(&self, labels: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        let mut out = std::io::stdout().lock();
        for (key, value) in labels {
            writeln!(out, "{key}={value}").map_err(LabelError::Stdout)?;
        }
        self.preview(labels)
    }
}

struct NoSink;

impl LabelSink for NoSink {
    fn preview(&self, _: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        Ok(SinkPreview {
            target: "none".to_string(),
            ..SinkPreview::default()
        })
    }

    fn publish(&self, labels: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        self.preview(labels)
    }
}
