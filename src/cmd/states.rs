//! `gpuprov states`: the catalogue, the spec's own states and their order.

use serde::Serialize;

use crate::cli::{ReportFormat, StatesArgs};
use crate::converge::compile;
use crate::spec::Spec;
use crate::{Error, exit};

use super::print;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StateRow {
    name: String,
    handler: String,
    after: Vec<String>,
    enabled_by: Option<String>,
    opt_out_labels: Vec<String>,
    label: String,
    description: String,
    source: String,
}

pub fn run_states(args: &StatesArgs) -> Result<i32, Error> {
    let spec = match &args.config {
        Some(path) => Spec::load(path)?,
        None => Spec::default_spec(),
    };
    let graph = compile(&spec, args.states_dir.as_deref())?;
    let rows: Vec<StateRow> = graph
        .states
        .iter()
        .map(|s| StateRow {
            name: s.name.clone(),
            handler: s.capability.name().to_string(),
            after: s.after.iter().map(|a| a.value.clone()).collect(),
            enabled_by: s.enabled_by.clone(),
            opt_out_labels: s.opt_out_labels.clone(),
            label: s.label.clone(),
            description: s.description.clone(),
            source: s.origin.name.clone(),
        })
        .collect();
    let text = match args.output {
        ReportFormat::Json => serde_json::to_string_pretty(&rows).expect("serializes") + "\n",
        ReportFormat::Text => {
            let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
            let mut out = String::new();
            for (i, row) in rows.iter().enumerate() {
                out.push_str(&format!(
                    "{:>2}. {:width$}  {}\n",
                    i + 1,
                    row.name,
                    row.description
                ));
                let mut facts = vec![format!("handler {}", row.handler)];
                if !row.after.is_empty() {
                    facts.push(format!("after {}", row.after.join(", ")));
                }
                if let Some(switch) = &row.enabled_by {
                    facts.push(format!("enabled by {switch}"));
                }
                if !row.opt_out_labels.is_empty() {
                    facts.push(format!("opt-out {}", row.opt_out_labels.join(", ")));
                }
                facts.push(format!("label {}", row.label));
                facts.push(format!("from {}", row.source));
                out.push_str(&format!("    {:width$}  {}\n", "", facts.join(" · ")));
            }
            out
        }
    };
    print(&text)?;
    Ok(exit::OK)
}
