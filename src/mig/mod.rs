//! The `mig` state: the node's MIG layout, in mig-parted's format, applied
//! through NVML with the GPU Operator's flow and labels.
//!
//! The layout comes from the node label `nvidia.com/mig.config` (the GPU
//! Operator's), else `mig.default`; with neither, MIG is left as it is.
//! `nvidia.com/mig.config.state` says how it went: `pending` while a change
//! runs, then `success`, `failed` (with the reason in the step's), or
//! `rebooting` when a mode change waits for a GPU reset. A failure never
//! blocks the operands: their labels are restored and they run on whatever
//! the GPUs hold.

pub mod apply;
pub mod layout;
pub mod nvml;

use std::collections::BTreeMap;

use crate::spec::{MigEntry, generated_layout};
use crate::state::{
    CapabilityChange, Change, Gate, MakeContext, Observation, OnFailure, Outcome, StateContext,
    StateError, json_fields,
};
pub use layout::{MigCreate, MigGpuChange, MigLayout};
use nvml::{GiProfile, GpuMig};

impl CapabilityChange for MigLayout {
    fn kind(&self) -> &'static str {
        "mig-layout"
    }

    fn summary(&self) -> String {
        MigLayout::summary(self)
    }

    fn fields(&self) -> serde_json::Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        apply::run(on.cluster, self).map_err(StateError::operator)
    }
}

/// The GPU Operator's label naming the layout a node wants.
pub const CONFIG_LABEL: &str = "nvidia.com/mig.config";
/// The GPU Operator's label saying how applying it went.
pub const STATE_LABEL: &str = "nvidia.com/mig.config.state";
/// What the GPU Operator sets an operand's deploy label to while MIG changes.
pub const PAUSED: &str = "paused-for-mig-change";

fn state_labels(state: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(STATE_LABEL.to_string(), state.to_string())])
}

/// A failed layout: `failed`, with the reason, and the operands still run.
fn failed(reason: String) -> Observation {
    let mut obs = Observation::new(Outcome::Failed, reason);
    obs.labels = state_labels("failed");
    obs.gate = Some(Gate::Pass);
    obs
}

/// The `mig` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let label = ctx.facts.node_labels.get(CONFIG_LABEL);
    let Some(name) = label.or(ctx.spec.mig.default.as_ref()) else {
        return Ok(Observation::new(
            Outcome::Disabled,
            format!(
                "no MIG layout asked for (no {CONFIG_LABEL} label, no mig.default): MIG is left as it is"
            ),
        ));
    };
    let whence = if label.is_some() {
        format!("{CONFIG_LABEL}={name}")
    } else {
        format!("mig.default {name}")
    };
    let Some(entries) = ctx
        .spec
        .mig
        .configs
        .get(name)
        .cloned()
        .or_else(|| generated_layout(name))
    else {
        let known: Vec<&str> = ctx.spec.mig.configs.keys().map(String::as_str).collect();
        return Ok(failed(format!(
            "{whence} names no layout in {} (layouts: {}; built in: all-disabled, all-enabled, all-<profile>)",
            ctx.spec.mig.configs_source,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    let library = match crate::gpu::nvml::find_library(ctx.host, ctx.facts.nvml_lib.as_deref()) {
        Ok(library) => library,
        Err(problem) => {
            let mut obs = Observation::new(
                Outcome::Absent,
                format!("{whence}, but MIG cannot be read: {problem}"),
            );
            obs.labels = state_labels("failed");
            obs.gate = Some(Gate::Pass);
            return Ok(obs);
        }
    };
    let gpus = match nvml::read(&library) {
        Ok(gpus) => gpus,
        Err(problem) => return Ok(failed(format!("{whence}: MIG cannot be read: {problem}"))),
    };
    let mut changes = Vec::new();
    let mut waiting = Vec::new();
    for gpu in &gpus {
        // As mig-parted applies entries in order, a later entry naming the
        // same GPU wins.
        let Some(entry) = entries
            .iter()
            .rev()
            .find(|e| e.selects(gpu.index, gpu.pci_id))
        else {
            continue;
        };
        match plan_gpu(gpu, entry) {
            Ok(GpuPlan::Converged) => {}
            Ok(GpuPlan::AwaitsReset) => waiting.push(format!(
                "GPU {}: MIG mode {} is pending until the GPU is reset",
                gpu.index,
                if gpu.pending { "enabled" } else { "disabled" }
            )),
            Ok(GpuPlan::Change(change)) => changes.push(change),
            Err(why) => return Ok(failed(format!("{whence}: {why}"))),
        }
    }
    let held = describe(&gpus);
    if !waiting.is_empty() && changes.is_empty() {
        let mut obs = Observation::new(
            Outcome::RebootRequired,
            format!(
                "{whence}: {}; reboot the node (or reset the GPUs) to finish it",
                waiting.join("; ")
            ),
        );
        obs.labels = state_labels("rebooting");
        obs.gate = Some(Gate::Pass);
        return Ok(obs);
    }
    if changes.is_empty() {
        let mut obs = Observation::new(Outcome::Ready, format!("layout {name} ({whence}): {held}"));
        obs.labels = state_labels("success");
        obs.details = serde_json::to_value(&gpus).unwrap_or_default();
        return Ok(obs);
    }
    let mut obs = Observation::new(
        Outcome::Pending,
        format!("layout {name} ({whence}) differs: now {held}"),
    );
    obs.on_change = Outcome::Ready;
    obs.labels = state_labels("success");
    obs.on_failure = Some(OnFailure {
        labels: state_labels("failed"),
        gate: Gate::Pass,
        changes: Vec::new(),
        changes_after: 0,
    });
    obs.changes = vec![Change::own(MigLayout {
        layout: name.clone(),
        library: library.display().to_string(),
        gpus: changes,
        timeout_seconds: ctx.spec.mig.timeout_seconds,
    })];
    Ok(obs)
}

/// What the GPUs hold, grouped: `8 GPUs: 7× 1g.10gb`.
fn describe(gpus: &[GpuMig]) -> String {
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for gpu in gpus {
        let what = if !gpu.capable {
            "no MIG".to_string()
        } else if !gpu.current {
            "MIG disabled".to_string()
        } else {
            let counts = gpu.device_counts();
            if counts.is_empty() {
                "MIG enabled, no MIG devices".to_string()
            } else {
                counts
                    .iter()
                    .map(|(name, n)| format!("{n}× {name}"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            }
        };
        groups.entry(what).or_default().push(gpu.index);
    }
    groups
        .iter()
        .map(|(what, indices)| match indices.as_slice() {
            [one] => format!("GPU {one}: {what}"),
            many => format!(
                "GPUs {}: {what}",
                many.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub enum GpuPlan {
    Converged,
    /// The mode asked for is set and waits for a GPU reset.
    AwaitsReset,
    Change(MigGpuChange),
}

/// What one GPU needs to hold `entry`'s layout.
pub fn plan_gpu(gpu: &GpuMig, entry: &MigEntry) -> Result<GpuPlan, String> {
    let gpu_name = format!("GPU {} ({})", gpu.index, gpu.name);
    if !gpu.capable {
        return if entry.mig_enabled {
            Err(format!("{gpu_name} cannot run MIG"))
        } else {
            Ok(GpuPlan::Converged)
        };
    }
    let want = entry.mig_enabled;
    let destroy: Vec<String> = gpu
        .device_counts()
        .iter()
        .map(|(name, n)| format!("{n}× {name}"))
        .collect();
    if gpu.pending == want && gpu.current != want {
        return Ok(GpuPlan::AwaitsReset);
    }
    if !want {
        if !gpu.current && !gpu.pending {
            return Ok(GpuPlan::Converged);
        }
        return Ok(GpuPlan::Change(MigGpuChange {
            index: gpu.index,
            name: gpu.name.clone(),
            set_mode: Some(false),
            destroy,
            create: Vec::new(),
            wanted: BTreeMap::new(),
        }));
    }
    let create = placements(gpu, &entry.mig_devices).map_err(|why| format!("{gpu_name}: {why}"))?;
    let mut wanted_counts: BTreeMap<String, u32> = BTreeMap::new();
    for c in &create {
        *wanted_counts.entry(c.profile.clone()).or_default() += 1;
    }
    if gpu.current && gpu.device_counts() == wanted_counts {
        return Ok(GpuPlan::Converged);
    }
    Ok(GpuPlan::Change(MigGpuChange {
        index: gpu.index,
        name: gpu.name.clone(),
        set_mode: (!gpu.current).then_some(true),
        destroy: if gpu.current { destroy } else { Vec::new() },
        create,
        wanted: entry.mig_devices.clone(),
    }))
}

/// Normalises a profile name's attributes (`+me,gfx` and `+gfx,me` are one).
fn canonical(name: &str) -> String {
    match name.find(['+', '-']) {
        Some(i) => {
            let mut attributes: Vec<&str> = name[i + 1..].split(',').collect();
            attributes.sort_unstable();
            format!("{}{}{}", &name[..i], &name[i..=i], attributes.join(","))
        }
        None => name.to_string(),
    }
}

/// The GPU instance profile and compute instance size a name asks for.
fn resolve<'g>(gpu: &'g GpuMig, name: &str) -> Result<(&'g GiProfile, u32), String> {
    let wanted = canonical(name);
    let (compute, gi_name) = match wanted.split_once("c.") {
        Some((c, rest)) if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) => {
            // A number that does not parse is an error, never "all slices".
            let slices = c
                .parse::<u32>()
                .map_err(|_| format!("`{name}`: `{c}c` is not a number of compute slices"))?;
            (Some(slices), rest.to_string())
        }
        _ => (None, wanted.clone()),
    };
    let profile = gpu
        .profiles
        .iter()
        .find(|p| canonical(&p.name) == gi_name)
        .ok_or_else(|| {
            let offered: Vec<&str> = gpu.profiles.iter().map(|p| p.name.as_str()).collect();
            format!(
                "has no MIG profile `{name}`; it offers {}",
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            )
        })?;
    let slices = compute.unwrap_or(profile.slices);
    if slices == 0 || slices > profile.slices || nvml::ci_profile_for(slices).is_none() {
        return Err(format!(
            "`{name}`: a compute instance of {slices} slices does not fit a {}",
            profile.name
        ));
    }
    Ok((profile, slices))
}

/// Where each wanted MIG device goes: GPU instances placed largest first,
/// trying every placement NVML offers (a first fit fails on layouts such as
/// 4g + 3g, where the 3g must take the upper half).
pub fn placements(gpu: &GpuMig, wanted: &BTreeMap<String, u32>) -> Result<Vec<MigCreate>, String> {
    let mut items: Vec<(&GiProfile, u32, String)> = Vec::new();
    for (name, count) in wanted {
        let (profile, slices) = resolve(gpu, name)?;
        // At most one instance per memory slice, whatever a library says.
        let most = profile.instances.min(8);
        let n = if *count == 0 { most } else { *count };
        if n > most {
            return Err(format!(
                "{n}× {name} asked for, but it holds at most {most}"
            ));
        }
        let shown = if slices == profile.slices {
            profile.name.clone()
        } else {
            format!("{slices}c.{}", profile.name)
        };
        items.extend((0..n).map(|_| (profile, slices, shown.clone())));
    }
    items.sort_by_key(|(p, _, _)| (std::cmp::Reverse(p.slices), p.id));
    let mut chosen: Vec<(u32, u32)> = Vec::new();
    if !fit(&items, &mut chosen) {
        // `all-<profile>` asks for as many as fit: fewer, then.
        if wanted.values().all(|c| *c == 0) {
            while items.pop().is_some() {
                chosen.clear();
                if fit(&items, &mut chosen) {
                    break;
                }
            }
        } else {
            let asked: Vec<String> = wanted.iter().map(|(n, c)| format!("{c}× {n}")).collect();
            return Err(format!(
                "{} do not fit together on its memory slices",
                asked.join(" + ")
            ));
        }
    }
    Ok(items
        .iter()
        .zip(chosen)
        .map(|((profile, slices, shown), (start, size))| MigCreate {
            profile: shown.clone(),
            gpu_instance_profile: profile.id,
            compute_instance_profile: nvml::ci_profile_for(*slices).unwrap_or(0),
            start,
            size,
        })
        .collect())
}

/// How many placements a search may try: real GPUs need a few hundred at
/// most; a broken library's answer must not make it run for ever.
const PLACEMENT_BUDGET: u32 = 100_000;

/// A placement for each item that overlaps no earlier one, by
/// backtracking within `PLACEMENT_BUDGET` tries.
fn fit(items: &[(&GiProfile, u32, String)], chosen: &mut Vec<(u32, u32)>) -> bool {
    fn search(
        items: &[(&GiProfile, u32, String)],
        chosen: &mut Vec<(u32, u32)>,
        budget: &mut u32,
    ) -> bool {
        let Some((profile, _, _)) = items.get(chosen.len()) else {
            return true;
        };
        for &(start, size) in &profile.placements {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let end = start.saturating_add(size);
            let free = chosen
                .iter()
                .all(|&(s, z)| end <= s || s.saturating_add(z) <= start);
            if free {
                chosen.push((start, size));
                if search(items, chosen, budget) {
                    return true;
                }
                chosen.pop();
            }
        }
        false
    }
    search(items, chosen, &mut PLACEMENT_BUDGET.clone())
}
