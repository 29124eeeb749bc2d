//! The exposition, as dcgm-exporter writes it: Prometheus' text format
//! (0.0.4), each field's `# HELP` and `# TYPE`, then a series per GPU
//! labelled `gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`,
//! `Hostname` and `DCGM_FI_DRIVER_VERSION`. A GPU with MIG on has, as in
//! dcgm-exporter's default (flex) mode, a series per GPU instance instead,
//! with `GPU_I_PROFILE` and `GPU_I_ID` after `modelName`. A counter keeps
//! its own name (no `_total`), as dcgm-exporter's do, so its dashboards
//! and alerts work.

use std::fmt::Write;

use std::collections::BTreeMap;

use super::fields::{FIELDS, Id};
use super::pods::User;
use super::sample::{Identity, Instance, Sample};

/// Appends the series of every field NVML gave for at least one GPU or
/// GPU instance; one a container uses carries its `container`,
/// `namespace` and `pod` (dcgm-exporter's attributes, after its labels,
/// in that order).
pub fn render(
    out: &mut String,
    gpus: &[Identity],
    sample: &Sample,
    users: &BTreeMap<String, User>,
    hostname: &str,
    driver_version: &str,
) {
    for (i, field) in FIELDS.iter().enumerate() {
        let value_of =
            |(gpu, instance): (usize, Option<&Instance>)| value(sample, i, gpu, instance);
        if !series(gpus.len(), sample).any(|s| value_of(s).is_some()) {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}", field.name, field.help);
        let _ = writeln!(out, "# TYPE {} {}", field.name, field.kind.as_str());
        for (position, instance) in series(gpus.len(), sample) {
            let Some(value) = value_of((position, instance)) else {
                continue;
            };
            let gpu = &gpus[position];
            let _ = write!(out, "{}{{gpu=\"{}\"", field.name, gpu.index);
            let mut label = |key: &str, value: &str| {
                let _ = write!(out, ",{key}=\"");
                escaped(out, value);
                out.push('"');
            };
            label("UUID", &gpu.uuid);
            label("pci_bus_id", &gpu.pci_bus_id);
            label("device", &gpu.device);
            label("modelName", &gpu.model);
            if let Some(instance) = instance {
                label("GPU_I_PROFILE", &instance.profile);
                label("GPU_I_ID", instance.id_label());
            }
            label("Hostname", hostname);
            label("DCGM_FI_DRIVER_VERSION", driver_version);
            if let Some(user) = user(users, gpu, instance) {
                label("container", &user.container);
                label("namespace", &user.namespace);
                label("pod", &user.pod);
            }
            let _ = writeln!(out, "}} {value}");
        }
    }
}

/// Every series' GPU (by position) and GPU instance: a GPU's own, or, for
/// a GPU with MIG on, one per GPU instance.
fn series(gpus: usize, sample: &Sample) -> impl Iterator<Item = (usize, Option<&Instance>)> {
    (0..gpus).flat_map(move |gpu| {
        let mut instances = sample.instances_of(gpu).map(Some).peekable();
        let whole = instances.peek().is_none().then_some(None);
        whole.into_iter().chain(instances).map(move |i| (gpu, i))
    })
}

/// A field's value for a GPU or one of its GPU instances: the instance's
/// own frame buffer; no utilization (NVML and DCGM give none for a MIG
/// instance); the GPU's reading for the rest (clocks, temperatures,
/// power and errors are the whole GPU's), as DCGM reports them.
fn value(sample: &Sample, field: usize, gpu: usize, instance: Option<&Instance>) -> Option<f64> {
    let whole = sample.gpus.get(gpu)?[field];
    let Some(instance) = instance else {
        return whole;
    };
    match field {
        f if f == Id::FbFree as usize => instance.fb_free,
        f if f == Id::FbUsed as usize => instance.fb_used,
        f if [Id::GpuUtil, Id::MemCopyUtil, Id::EncUtil, Id::DecUtil]
            .iter()
            .any(|id| *id as usize == f) =>
        {
            None
        }
        _ => whole,
    }
}

/// The container using a GPU, or a GPU instance: one of its MIG devices'
/// UUIDs, or GKE's `nvidia<gpu>/gi<id>` device id.
fn user<'a>(
    users: &'a BTreeMap<String, User>,
    gpu: &Identity,
    instance: Option<&Instance>,
) -> Option<&'a User> {
    if users.is_empty() {
        return None;
    }
    let Some(instance) = instance else {
        return users.get(&gpu.uuid);
    };
    instance
        .devices
        .iter()
        .find_map(|uuid| users.get(uuid))
        .or_else(|| users.get(&format!("nvidia{}/gi{}", gpu.index, instance.id)))
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fields::COUNT;
    use super::*;

    #[test]
    fn series_carry_dcgm_exporters_labels_and_types() {
        let gpu = Identity {
            index: 0,
            uuid: "GPU-1".into(),
            pci_bus_id: "00000000:18:00.0".into(),
            device: "nvidia0".into(),
            model: "NVIDIA \"H100\"".into(),
        };
        let mut values = [None; COUNT];
        values[Id::GpuTemp as usize] = Some(54.0);
        values[Id::PowerUsage as usize] = Some(312.45);
        values[Id::TotalEnergy as usize] = Some(123456789.0);
        let mut out = String::new();
        render(
            &mut out,
            &[gpu],
            &Sample {
                gpus: vec![values],
                instances: Vec::new(),
            },
            &BTreeMap::new(),
            "node-1",
            "550.54.15",
        );
        let labels = "gpu=\"0\",UUID=\"GPU-1\",pci_bus_id=\"00000000:18:00.0\",device=\"nvidia0\",modelName=\"NVIDIA \\\"H100\\\"\",Hostname=\"node-1\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"";
        assert_eq!(
            out,
            format!(
                "# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).\n# TYPE DCGM_FI_DEV_GPU_TEMP gauge\nDCGM_FI_DEV_GPU_TEMP{{{labels}}} 54\n\
                 # HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).\n# TYPE DCGM_FI_DEV_POWER_USAGE gauge\nDCGM_FI_DEV_POWER_USAGE{{{labels}}} 312.45\n\
                 # HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).\n# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{labels}}} 123456789\n"
            )
        );
    }
}
