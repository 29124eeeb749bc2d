//! The catalogue of states: one YAML file per built-in state under
//! `states/`, embedded at build time, plus `--states-dir` files that add or
//! override states, plus the user's own `states:` from the spec.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::diagnostic::{Diagnostic, Diagnostics, Source, nearest};
use crate::spec::{RawUserState, SWITCHES, Spec, check_label_selector, check_state_name};

// `BUILTIN_STATES`: every `states/*.yaml`, listed by build.rs.
include!(concat!(env!("OUT_DIR"), "/builtin_states.rs"));

/// The operands' static pod templates, by operand (see `operands::static_pod`).
pub const OPERAND_TEMPLATES: &[(&str, &str)] = &[
    (
        "states/templates/device-plugin.yaml",
        include_str!("../states/templates/device-plugin.yaml"),
    ),
    (
        "states/templates/dcgm-exporter.yaml",
        include_str!("../states/templates/dcgm-exporter.yaml"),
    ),
    (
        "states/templates/gpu-feature-discovery.yaml",
        include_str!("../states/templates/gpu-feature-discovery.yaml"),
    ),
];

/// The capability that runs a state: its file's `handler`. The known ones
/// are those the built-in states name, and `exec`; the registry maps each
/// to its code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CapabilityId(String);

impl CapabilityId {
    /// The capability that runs a user's own `check` and `apply`
    /// commands: the spec's own states are its.
    pub fn exec() -> CapabilityId {
        CapabilityId("exec".to_string())
    }

    /// The capability a state file names by its `handler`.
    pub fn named(name: &str) -> CapabilityId {
        CapabilityId(name.to_string())
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read states directory {path}")]
    ReadDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid state definition\n{0}")]
    Invalid(Diagnostics),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStateFile {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    handler: Spanned<String>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    enabled_by: Option<Spanned<String>>,
    #[serde(default)]
    opt_out_labels: Vec<Spanned<String>>,
    label: Option<Spanned<String>>,
    check: Option<Spanned<String>>,
    apply: Option<Spanned<String>>,
    #[serde(default)]
    optional: bool,
}

/// One state of the catalogue, wherever it was defined.
#[derive(Debug, Clone)]
pub struct StateDef {
    pub name: String,
    pub description: String,
    /// The capability that runs it (its file's `handler`).
    pub capability: CapabilityId,
    pub after: Vec<Spanned<String>>,
    /// The spec switch that turns it on (`gfd.enabled`); always on when absent.
    pub enabled_by: Option<String>,
    /// `key=value` node labels that opt a node out of this state.
    pub opt_out_labels: Vec<String>,
    /// The node label that publishes its outcome.
    pub label: String,
    /// Waiting on something outside gpuprov, it does not hold `gpuprov
    /// run`'s readiness (a metrics exporter, GFD's DaemonSet): `/readyz`
    /// and a Node event say what it waits for instead.
    pub optional: bool,
    pub check: Option<String>,
    pub apply: Option<String>,
    /// Where it was defined, for error messages.
    pub origin: Arc<Source>,
    pub name_at: serde_saphyr::Location,
}

impl StateDef {
    pub fn from_user(user: RawUserState, handler: CapabilityId, origin: Arc<Source>) -> StateDef {
        StateDef {
            label: format!("gpuprov.io/{}", user.name.value),
            name: user.name.value,
            description: user.description,
            capability: handler,
            after: user.after,
            enabled_by: None,
            optional: false,
            opt_out_labels: user.opt_out_labels.into_iter().map(|l| l.value).collect(),
            check: Some(user.check.value),
            apply: user.apply.map(|a| a.value),
            origin,
            name_at: user.name.referenced,
        }
    }

    /// The place an error about this state's `after` entry points at.
    pub fn diagnostic_at(
        &self,
        location: serde_saphyr::Location,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::at_location(&self.origin, location, message)
    }
}

/// The catalogue in order: built-ins, then `--states-dir` additions in file
/// name order (an override keeps the built-in's place).
#[derive(Debug, Clone)]
pub struct Catalog {
    pub states: Vec<StateDef>,
}

impl Catalog {
    pub fn builtin() -> Catalog {
        Catalog::load(None).expect("the built-in states are valid")
    }

    pub fn load(states_dir: Option<&Path>) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog { states: Vec::new() };
        for (name, text) in BUILTIN_STATES {
            catalog.add(parse_state(
                &Source {
                    name: format!("<embedded {name}>"),
                    text: text.to_string(),
                },
                None,
            )?);
        }
        let known = catalog.capabilities();
        if let Some(dir) = states_dir {
            for source in read_states_dir(dir)? {
                catalog.add(parse_state(&source, Some(&known))?);
            }
        }
        Ok(catalog)
    }

    /// The capabilities a state may name: those the built-in states name,
    /// in their order, then `exec`.
    pub fn capabilities(&self) -> Vec<CapabilityId> {
        let mut known: Vec<CapabilityId> = Vec::new();
        for id in self
            .states
            .iter()
            .map(|s| s.capability.clone())
            .chain([CapabilityId::exec()])
        {
            if !known.contains(&id) {
                known.push(id);
            }
        }
        known
    }

    fn add(&mut self, state: StateDef) {
        match self.states.iter_mut().find(|s| s.name == state.name) {
            Some(existing) => *existing = state,
            None => self.states.push(state),
        }
    }

    /// The catalogue with the spec's own states appended. A user state may
    /// not reuse a catalogue name: overriding is what `--states-dir` is for.
    pub fn with_user_states(&self, spec: &Spec) -> Result<Vec<StateDef>, Diagnostics> {
        let mut states = self.states.clone();
        let mut errors = Vec::new();
        for user in &spec.states {
            let user = StateDef::from_user(
                user.clone(),
                CapabilityId::exec(),
                spec.states_source.clone(),
            );
            if let Some(existing) = states.iter().find(|s| s.name == user.name) {
                errors.push(Diagnostic::at_location(
                    &user.origin,
                    user.name_at,
                    format!(
                        "state `{}` is already defined by {}",
                        user.name, existing.origin.name
                    ),
                ));
            } else {
                states.push(user);
            }
        }
        if errors.is_empty() {
            Ok(states)
        } else {
            Err(Diagnostics(errors))
        }
    }
}

fn read_states_dir(dir: &Path) -> Result<Vec<Source>, CatalogError> {
    let read_err = |source| CatalogError::ReadDir {
        path: dir.display().to_string(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = crate::host::read_user_file(&path, crate::host::USER_FILE_CAP).map_err(
                |source| CatalogError::ReadDir {
                    path: path.display().to_string(),
                    source,
                },
            )?;
            Ok(Source {
                name: path.display().to_string(),
                text,
            })
        })
        .collect()
}

/// One state file, parsed and checked (public for the fuzz target).
/// A state file; its `handler` must be one of `known` (built-in states
/// may name any: the registry's test checks each has its code).
pub fn parse_state(
    source: &Source,
    known: Option<&[CapabilityId]>,
) -> Result<StateDef, CatalogError> {
    let invalid = |d: Diagnostic| CatalogError::Invalid(d.into());
    let raw: RawStateFile =
        serde_saphyr::from_str_with_options(&source.text, crate::spec::strict_yaml())
            .map_err(|e| invalid(Diagnostic::from_yaml(source, &e)))?;
    let at = |spanned_at, message: String| Diagnostic::at_location(source, spanned_at, message);

    check_state_name(&raw.name.value).map_err(|why| {
        invalid(at(
            raw.name.referenced,
            format!("state name `{}` {why}", raw.name.value),
        ))
    })?;
    let handler = CapabilityId(raw.handler.value.clone());
    match known {
        Some(known) if !known.contains(&handler) => {
            let names: Vec<&str> = known.iter().map(CapabilityId::name).collect();
            let mut d = at(
                raw.handler.referenced,
                format!("unknown handler `{}`", raw.handler.value),
            );
            d = d.with_help(match nearest(&raw.handler.value, names.iter().copied()) {
                Some(near) => format!("did you mean `{near}`? handlers: {}", names.join(", ")),
                None => format!("handlers: {}", names.join(", ")),
            });
            return Err(invalid(d));
        }
        _ => {}
    }
    if let Some(switch) = &raw.enabled_by
        && !SWITCHES.contains(&switch.value.as_str())
    {
        let mut d = at(
            switch.referenced,
            format!("unknown spec switch `{}`", switch.value),
        );
        if let Some(near) = nearest(&switch.value, SWITCHES.iter().copied()) {
            d = d.with_help(format!("did you mean `{near}`?"));
        }
        return Err(invalid(d));
    }
    for label in &raw.opt_out_labels {
        check_label_selector(&label.value).map_err(|why| invalid(at(label.referenced, why)))?;
    }
    let exec = handler == CapabilityId::exec();
    match (exec, &raw.check) {
        (true, None) => {
            return Err(invalid(at(
                raw.handler.referenced,
                "an exec state needs a `check` command".to_string(),
            )));
        }
        (false, Some(check)) => {
            return Err(invalid(at(
                check.referenced,
                format!(
                    "`check` and `apply` belong to exec states, not `{}`",
                    handler.name()
                ),
            )));
        }
        _ => {}
    }
    if let Some(label) = &raw.label {
        crate::label_syntax::check_label_key(&label.value)
            .map_err(|why| invalid(at(label.referenced, why)))?;
    }
    Ok(StateDef {
        label: raw
            .label
            .map_or_else(|| format!("gpuprov.io/{}", raw.name.value), |l| l.value),
        name: raw.name.value,
        description: raw.description,
        capability: handler,
        after: raw.after,
        enabled_by: raw.enabled_by.map(|s| s.value),
        optional: raw.optional,
        opt_out_labels: raw.opt_out_labels.into_iter().map(|l| l.value).collect(),
        check: raw.check.map(|c| c.value),
        apply: raw.apply.map(|a| a.value),
        origin: Arc::new(source.clone()),
        name_at: raw.name.referenced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &str) -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut files: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn every_file_in_states_is_embedded() {
        let embedded: Vec<String> = BUILTIN_STATES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(files_in("states"), embedded);
        let mut templates: Vec<String> = OPERAND_TEMPLATES
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        templates.sort();
        assert_eq!(files_in("states/templates"), templates);
    }

    #[test]
    fn builtins_load_in_order() {
        let names: Vec<String> = Catalog::builtin()
            .states
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "detect-gpu",
                "driver",
                "fabric-manager",
                "persistence",
                "gpudirect-rdma",
                "container-toolkit",
                "containerd-runtime",
                "gpu-health",
                "gpu-remediation",
                "mig",
                "cdi",
                "gpu-feature-discovery",
                "device-plugin",
                "dcgm-exporter",
                "validator"
            ]
        );
    }
}
