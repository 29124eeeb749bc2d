//! Labels on the Node object by server-side apply.
//!
//! gpuprov applies its whole label set as field manager `gpuprov`, never
//! forcing: labels it applied before and no longer wants disappear (that is
//! what apply does with a manager's field set), and a label another manager
//! set to a different value is left as they set it, with a note saying so.
//! When the node already carries exactly gpuprov's set, nothing is sent.

use std::collections::BTreeMap;

use super::{LabelError, LabelSink};
use crate::kube::{Cluster, NodeLabels};
use crate::report::SinkPreview;

pub struct ApiLabelSink<'a> {
    pub cluster: &'a Cluster,
}

/// What to apply, given the node as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyPlan {
    /// gpuprov's label set after the apply.
    pub apply: BTreeMap<String, String>,
    /// Whether the node differs from that (a PATCH is needed).
    pub needed: bool,
    pub notes: Vec<String>,
}

/// Leaves out labels another manager set to a different value, and decides
/// whether anything needs sending at all.
pub fn plan_apply(node: &NodeLabels, wanted: &BTreeMap<String, String>) -> ApplyPlan {
    let mut apply = BTreeMap::new();
    let mut notes = Vec::new();
    for (key, value) in wanted {
        match (node.labels.get(key), node.others.get(key)) {
            (Some(theirs), Some(manager)) if theirs != value && !node.ours.contains(key) => {
                notes.push(format!(
                    "{key}={theirs} was set by {manager}; left as it is (gpuprov would set {value})"
                ));
            }
            _ => {
                apply.insert(key.clone(), value.clone());
            }
        }
    }
    let owned_now: Vec<&String> = node.ours.iter().collect();
    let owned_after: Vec<&String> = apply.keys().collect();
    let needed =
        owned_now != owned_after || apply.iter().any(|(k, v)| node.labels.get(k) != Some(v));
    ApplyPlan {
        apply,
        needed,
        notes,
    }
}

impl ApiLabelSink<'_> {
    fn target(&self) -> String {
        format!(
            "node {} on {} (server-side apply, field manager gpuprov)",
            self.cluster.node, self.cluster.server
        )
    }

    fn plan(
        &self,
        wanted: &BTreeMap<String, String>,
    ) -> Result<(NodeLabels, ApplyPlan), LabelError> {
        let node = self.cluster.node_labels()?;
        let plan = plan_apply(&node, wanted);
        Ok((node, plan))
    }
}

impl ApiLabelSink<'_> {
    fn preview_of(&self, node: &NodeLabels, plan: ApplyPlan) -> SinkPreview {
        let mut after = node.labels.clone();
        for key in &node.ours {
            if !plan.apply.contains_key(key) {
                after.remove(key);
            }
        }
        after.extend(plan.apply.clone());
        let render = |labels: &BTreeMap<String, String>| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}\n"))
                .collect::<String>()
        };
        let (now, then) = (render(&node.labels), render(&after));
        let diff = similar::TextDiff::from_lines(&now, &then)
            .unified_diff()
            .context_radius(1)
            .header("node labels now", "node labels after apply")
            .to_string();
        SinkPreview {
            target: self.target(),
            changes: plan.needed,
            diff: Some(diff),
            notes: plan.notes,
        }
    }
}

impl LabelSink for ApiLabelSink<'_> {
    fn preview(&self, wanted: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        let (node, plan) = self.plan(wanted)?;
        Ok(self.preview_of(&node, plan))
    }

    /// One GET, and one apply only if the node differs. If another manager
    /// took a label between the two (409), the node is read again and the
    /// apply tried once more without it.
    fn publish(&self, wanted: &BTreeMap<String, String>) -> Result<SinkPreview, LabelError> {
        let (node, plan) = self.plan(wanted)?;
        if !plan.needed {
            return Ok(self.preview_of(&node, plan));
        }
        match self.cluster.apply_labels(&plan.apply) {
            Err(crate::kube::KubeError::Api { code: 409, .. }) => {
                tracing::warn!("a label conflict: reading the node again");
                self.cluster.view.forget_node();
                let (node, plan) = self.plan(wanted)?;
                if plan.needed {
                    self.cluster.apply_labels(&plan.apply)?;
                }
                Ok(self.preview_of(&node, plan))
            }
            result => {
                result?;
                Ok(self.preview_of(&node, plan))
            }
        }
    }

    fn withdraw(&self) -> Result<bool, LabelError> {
        let node = self.cluster.node_labels()?;
        if node.ours.is_empty() {
            return Ok(false);
        }
        self.cluster.apply_labels(&BTreeMap::new())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_is_sent_when_the_node_carries_gpuprovs_set() {
        let wanted = labels(&[("gpuprov.io/driver", "preinstalled")]);
        let node = NodeLabels {
            labels: wanted.clone(),
            ours: ["gpuprov.io/driver".to_string()].into(),
            others: BTreeMap::new(),
            allocatable: BTreeMap::new(),
            ..Default::default()
        };
        assert!(!plan_apply(&node, &wanted).needed);
        // A label gpuprov applied before and no longer wants: an apply removes it.
        let fewer = BTreeMap::new();
        assert!(plan_apply(&node, &fewer).needed);
    }

    #[test]
    fn a_label_someone_else_set_differently_is_left_and_noted() {
        let wanted = labels(&[
            ("nvidia.com/gpu.present", "true"),
            ("gpuprov.io/driver", "preinstalled"),
        ]);
        let node = NodeLabels {
            labels: labels(&[("nvidia.com/gpu.present", "maybe")]),
            ours: Default::default(),
            others: [(
                "nvidia.com/gpu.present".to_string(),
                "kubectl-label".to_string(),
            )]
            .into(),
            allocatable: BTreeMap::new(),
            ..Default::default()
        };
        let plan = plan_apply(&node, &wanted);
        assert_eq!(plan.apply, labels(&[("gpuprov.io/driver", "preinstalled")]));
        assert!(
            plan.notes[0].contains("set by kubectl-label"),
            "{:?}",
            plan.notes
        );
    }
}
