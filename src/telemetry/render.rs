//! The exposition, as dcgm-exporter writes it: Prometheus' text format
//! (0.0.4), each field's `# HELP` and `# TYPE`, then a series per GPU
//! labelled `gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`,
//! `Hostname` and `DCGM_FI_DRIVER_VERSION`. A counter keeps its own name
//! (no `_total`), as dcgm-exporter's do, so its dashboards and alerts work.

use std::fmt::Write;

use std::collections::BTreeMap;

use super::fields::FIELDS;
use super::pods::User;
use super::sample::{Identity, Values};

/// Appends the series of every field NVML gave for at least one GPU; a
/// GPU a container uses carries its `container`, `namespace` and `pod`
/// (dcgm-exporter's attributes, after its labels, in that order).
pub fn render(
    out: &mut String,
    gpus: &[Identity],
    values: &[Values],
    users: &BTreeMap<String, User>,
    hostname: &str,
    driver_version: &str,
) {
    for (i, field) in FIELDS.iter().enumerate() {
        if !values.iter().any(|v| v[i].is_some()) {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}", field.name, field.help);
        let _ = writeln!(out, "# TYPE {} {}", field.name, field.kind.as_str());
        for (gpu, value) in gpus.iter().zip(values) {
            let Some(value) = value[i] else { continue };
            let _ = write!(out, "{}{{gpu=\"{}\"", field.name, gpu.index);
            let user = users.get(&gpu.uuid);
            let labels = [
                ("UUID", gpu.uuid.as_str()),
                ("pci_bus_id", &gpu.pci_bus_id),
                ("device", &gpu.device),
                ("modelName", &gpu.model),
                ("Hostname", hostname),
                ("DCGM_FI_DRIVER_VERSION", driver_version),
            ];
            let attributes = user.map(|u| {
                [
                    ("container", u.container.as_str()),
                    ("namespace", &u.namespace),
                    ("pod", &u.pod),
                ]
            });
            for (key, value) in labels.iter().chain(attributes.iter().flatten()) {
                let _ = write!(out, ",{key}=\"");
                escaped(out, value);
                out.push('"');
            }
            let _ = writeln!(out, "}} {value}");
        }
    }
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
    use super::super::fields::{COUNT, Id};
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
            &[values],
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
