//! The Container Device Interface spec for the node's GPUs, generated from
//! what gpuprov already knows (NVML's GPUs and MIG devices, the driver's
//! files in the host root) and kept current: it is rewritten, atomically,
//! only when its text changes (a driver version, the GPU set or the MIG
//! layout), so a converged node writes nothing.
//!
//! Two files in `cdi.specDir`: `nvidia.yaml` (`nvidia.com/gpu`) and
//! `management.nvidia.com-gpu.yaml`. gpuprov owns a file there only when it
//! begins with its header; anything else at those paths (a spec from
//! `nvidia-ctk cdi generate`, a link) is refused by name and left alone.

pub mod document;
pub mod driver_files;

use crate::host::{Host, HostError};
use crate::make::make_changes;
use crate::report::RevertReport;
use crate::spec::Spec;
use crate::state::{
    Change, Observation, Outcome, RevertContext, StateContext, StateError, file_diff,
};

use document::{Gpu, MigDevice};

/// The files, by name in `cdi.specDir`.
pub const GPU_SPEC_FILE: &str = "nvidia.yaml";
pub const MANAGEMENT_SPEC_FILE: &str = "management.nvidia.com-gpu.yaml";

/// The driver's table of MIG capability minors (`gpu0/gi1/access 12`).
pub const MIG_MINORS: &str = "/proc/driver/nvidia-caps/mig-minors";

/// The host paths of the two spec files.
pub fn spec_paths(spec: &Spec) -> [String; 2] {
    let dir = &spec.cdi.spec_dir;
    [
        format!("{dir}/{GPU_SPEC_FILE}"),
        format!("{dir}/{MANAGEMENT_SPEC_FILE}"),
    ]
}

/// The `cdi` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    // A GPU fallen off the bus is left out; the others stay usable.
    let (inventory, lost) = match ctx.facts.nvml_without_lost(ctx.host) {
        Ok(found) => found,
        Err(problem) => {
            return Ok(Observation::new(
                Outcome::Failed,
                format!("the CDI spec lists NVML's GPUs, and NVML cannot be read: {problem}"),
            ));
        }
    };
    let inventory = inventory.as_ref();
    let version = &inventory.driver_version;
    let files = match driver_files::find(ctx.host, version)? {
        Ok(files) => files,
        Err(missing) => {
            return Ok(Observation::new(
                Outcome::Failed,
                format!("no CDI spec is written for driver {version}: {missing}"),
            ));
        }
    };
    let (gpus, mig_control) = match gpus(ctx, inventory)? {
        Ok(found) => found,
        Err(missing) => {
            return Ok(Observation::new(
                Outcome::Failed,
                format!("no CDI spec is written for driver {version}: {missing}"),
            ));
        }
    };
    let hook = crate::toolkit::ctk_binary(ctx.host, ctx.spec)?;
    let gpu_document = document::gpu_spec(&gpus, &files, &hook);
    let wanted = [
        document::render(&gpu_document).map_err(StateError::operator)?,
        document::render(&document::management_spec(
            &gpus,
            &files,
            &hook,
            &mig_control,
        ))
        .map_err(StateError::operator)?,
    ];

    let mut changes = Vec::new();
    let mut stale = Vec::new();
    for (path, text) in spec_paths(ctx.spec).iter().zip(&wanted) {
        let current = current_of_ours(ctx.host, path)?;
        if current.as_deref() == Some(text.as_str()) {
            continue;
        }
        stale.push(match current {
            None => format!("{path} does not exist"),
            Some(_) => format!("{path} is out of date"),
        });
        changes.push(Change::WriteFile {
            path: path.clone(),
            content: text.clone().into_bytes(),
            mode: 0o644,
            purpose: "CDI spec".to_string(),
            diff: Some(file_diff(path, current.as_deref().unwrap_or(""), text)),
        });
    }

    let names: Vec<&str> = gpu_document
        .devices
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    let what = format!(
        "{} GPU{}{}, driver {version} ({} libraries, {} binaries, {} firmware files)",
        gpus.len(),
        if gpus.len() == 1 { "" } else { "s" },
        match gpus.iter().map(|g| g.mig.len()).sum::<usize>() {
            0 => String::new(),
            n => format!(" and {n} MIG devices"),
        },
        files.libraries.len(),
        files.binaries.len(),
        files.firmware.len(),
    );
    let what = match files.skipped.is_empty() {
        true => what,
        false => format!("{what}; left out: {}", files.skipped.join(", ")),
    };
    let what = match lost.as_slice() {
        [] => what,
        lost => format!(
            "{what}; NVML reports GPU {} lost: left out",
            lost.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let [gpu_path, _] = spec_paths(ctx.spec);
    let mut obs = if changes.is_empty() {
        Observation::new(
            Outcome::Configured,
            format!("CDI spec {gpu_path} is current: {what}"),
        )
    } else {
        let mut obs = Observation::new(
            Outcome::Pending,
            format!("{} (wanted: {what})", stale.join("; ")),
        );
        obs.on_change = Outcome::Configured;
        obs.changes = changes;
        obs
    };
    obs.details = serde_json::json!({
        "specs": spec_paths(ctx.spec),
        "devices": names,
        "bytes": wanted.iter().map(String::len).sum::<usize>(),
    });
    Ok(obs)
}

/// What a disabled or opted-out `cdi` takes away: the spec files gpuprov
/// wrote (someone else's are left).
pub fn withdraw(ctx: &StateContext) -> Result<Vec<Change>, StateError> {
    removals(ctx.host, ctx.spec)
}

/// `revert`: removes the spec files gpuprov wrote, as `withdraw` would.
pub fn revert(ctx: &RevertContext, report: &mut RevertReport) -> Result<(), StateError> {
    let changes = removals(ctx.host, ctx.spec)?;
    make_changes(ctx.host, &changes)?;
    report
        .cdi_specs_removed
        .extend(changes.iter().filter_map(|c| match c {
            Change::RemoveFile { path, .. } => Some(path.clone()),
            _ => None,
        }));
    Ok(())
}

/// Removing the spec files gpuprov wrote (a link never is one).
fn removals(host: &Host, spec: &Spec) -> Result<Vec<Change>, StateError> {
    let mut changes = Vec::new();
    for path in spec_paths(spec) {
        if is_ours_at(host, &path)? {
            changes.push(Change::RemoveFile {
                path,
                purpose: "CDI spec gpuprov wrote; cdi is off".to_string(),
            });
        }
    }
    Ok(changes)
}

/// Whether `path` is a regular file gpuprov wrote (a link never is).
fn is_ours_at(host: &Host, path: &str) -> Result<bool, HostError> {
    if host.link_target(path)?.is_some() {
        return Ok(false);
    }
    Ok(host.read(path)?.is_some_and(|t| document::is_ours(&t)))
}

/// The current text at a spec path when gpuprov may replace it (absent, or
/// written by gpuprov); anything else there is refused by name.
fn current_of_ours(host: &Host, path: &str) -> Result<Option<String>, StateError> {
    if let Some(target) = host.link_target(path)? {
        return Err(StateError::operator(format!(
            "{path} is a symbolic link (to {target}); gpuprov writes its CDI spec only as a file of its own, so it leaves the link: remove it, or set cdi.specDir to another directory"
        )));
    }
    match host.read(path)? {
        Some(text) if !document::is_ours(&text) => Err(StateError::operator(format!(
            "{path} was not written by gpuprov (it lacks the line `{}`; `nvidia-ctk cdi generate` or the GPU Operator's toolkit writes this name): gpuprov leaves it; remove it to let gpuprov keep the spec, or set cdi.specDir to another directory",
            document::MARKER
        ))),
        other => Ok(other),
    }
}

/// NVML's GPUs with their device nodes, and their MIG devices (read
/// afresh: the `mig` state may have just changed the layout), plus the
/// MIG control nodes (`config`, `monitor`) when any GPU has MIG on.
#[allow(clippy::type_complexity)]
fn gpus(
    ctx: &StateContext,
    inventory: &crate::gpu::nvml::Inventory,
) -> Result<Result<(Vec<Gpu>, Vec<String>), driver_files::Missing>, StateError> {
    let mut missing = Vec::new();
    let mut gpus = Vec::new();
    for device in &inventory.devices {
        let node = format!("/dev/nvidia{}", device.minor_number);
        if !ctx.host.exists(&node)? {
            missing.push(format!(
                "device node {node} of GPU {} ({}) does not exist",
                device.index, device.uuid
            ));
        }
        gpus.push(Gpu {
            index: device.index,
            uuid: device.uuid.clone(),
            minor: device.minor_number,
            mig: Vec::new(),
        });
    }
    let mut mig_control = Vec::new();
    let migs = mig_devices(ctx, inventory)?;
    let with_mig: Vec<_> = migs
        .iter()
        .filter(|m| m.current && m.instances.iter().any(|gi| !gi.compute.is_empty()))
        .collect();
    if !with_mig.is_empty() {
        let minors = mig_minors(ctx.host)?;
        // Management pods use these when present; a spec without
        // them still serves every MIG device.
        for name in ["config", "monitor"] {
            if let Some(node) = cap_node(ctx.host, &minors, name, &mut Vec::new())? {
                mig_control.push(node);
            }
        }
        for mig in with_mig {
            let Some(gpu) = gpus.iter_mut().find(|g| g.index == mig.index) else {
                continue;
            };
            for gi in &mig.instances {
                for ci in &gi.compute {
                    if let Some(caps) =
                        mig_caps(ctx.host, &minors, gpu.minor, gi.id, ci.id, &mut missing)?
                    {
                        gpu.mig.push(MigDevice {
                            gpu_instance: gi.id,
                            compute_instance: ci.id,
                            caps,
                        });
                    }
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(Ok((gpus, mig_control)))
    } else {
        Ok(Err(driver_files::Missing(missing)))
    }
}

/// Each GPU's MIG side, read afresh (a second NVML session: the `mig`
/// state may have just changed the layout) where there can be MIG
/// devices: MIG on when the run began, or a layout asked for that the
/// `mig` state may just have applied. Empty elsewhere.
pub fn mig_devices(
    ctx: &StateContext,
    inventory: &crate::gpu::nvml::Inventory,
) -> Result<Vec<crate::mig::nvml::GpuMig>, StateError> {
    let layout_asked = ctx.facts.node_labels.contains_key(crate::mig::CONFIG_LABEL)
        || ctx.spec.mig.default.is_some();
    let mig_seen = inventory
        .devices
        .iter()
        .any(|d| d.mig_enabled || d.mig_pending);
    if !inventory.devices.iter().any(|d| d.mig_capable) || !(mig_seen || layout_asked) {
        return Ok(Vec::new());
    }
    let library = crate::gpu::nvml::find_library(ctx.host, ctx.facts.nvml_lib.as_deref())
        .map_err(|p| StateError::operator(format!("MIG devices cannot be read: {p}")))?;
    crate::mig::nvml::read(&library)
        .map_err(|p| StateError::operator(format!("MIG devices cannot be read: {p}")))
}

/// The driver's table of MIG capability minors, read.
pub fn mig_minors(host: &Host) -> Result<std::collections::BTreeMap<String, u32>, HostError> {
    Ok(parse_mig_minors(
        &host.read(MIG_MINORS)?.unwrap_or_default(),
    ))
}

/// The capability nodes of the MIG device in GPU instance `gi`, compute
/// instance `ci` of the GPU whose node is `/dev/nvidia<minor>`; what is
/// missing is added to `missing`.
pub fn mig_caps(
    host: &Host,
    minors: &std::collections::BTreeMap<String, u32>,
    minor: u32,
    gi: u32,
    ci: u32,
    missing: &mut Vec<String>,
) -> Result<Option<[String; 2]>, HostError> {
    let gi_cap = cap_node(host, minors, &format!("gpu{minor}/gi{gi}/access"), missing)?;
    let ci_cap = cap_node(
        host,
        minors,
        &format!("gpu{minor}/gi{gi}/ci{ci}/access"),
        missing,
    )?;
    Ok(gi_cap.zip(ci_cap).map(|(gi_cap, ci_cap)| [gi_cap, ci_cap]))
}

/// `/proc/driver/nvidia-caps/mig-minors`: `<capability> <minor>` a line.
pub fn parse_mig_minors(text: &str) -> std::collections::BTreeMap<String, u32> {
    text.lines()
        .filter_map(|line| {
            let (name, minor) = line.trim().rsplit_once(' ')?;
            Some((name.trim().to_string(), minor.trim().parse().ok()?))
        })
        .collect()
}

/// The node of one MIG capability, `/dev/nvidia-caps/nvidia-cap<minor>`,
/// when the driver lists it and the node exists; else the gap is noted.
fn cap_node(
    host: &Host,
    minors: &std::collections::BTreeMap<String, u32>,
    name: &str,
    missing: &mut Vec<String>,
) -> Result<Option<String>, HostError> {
    let Some(minor) = minors.get(name) else {
        missing.push(format!("{MIG_MINORS} lists no `{name}`"));
        return Ok(None);
    };
    let node = format!("/dev/nvidia-caps/nvidia-cap{minor}");
    if !host.exists(&node)? {
        missing.push(format!("device node {node} ({name}) does not exist"));
        return Ok(None);
    }
    Ok(Some(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_minors_are_read_as_the_driver_writes_them() {
        let minors = parse_mig_minors(
            "config 1\nmonitor 2\ngpu0/gi0/access 3\ngpu0/gi0/ci0/access 4\ngpu0/gi1/access 12\nbroken line\n",
        );
        assert_eq!(minors["config"], 1);
        assert_eq!(minors["gpu0/gi1/access"], 12);
        assert_eq!(minors["gpu0/gi0/ci0/access"], 4);
        assert!(!minors.contains_key("broken"));
    }
}
