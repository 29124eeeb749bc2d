//! A MIG layout change as data: what `plan` shows and `apply::run` makes.

use std::collections::BTreeMap;

use serde::Serialize;

/// What one MIG layout change does (a change of the `mig` capability).
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
