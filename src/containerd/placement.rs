//! Where the runtime is written on this host: a drop-in in a directory
//! containerd already imports, the config itself, or (forced) a drop-in
//! the config is made to import. Never a drop-in and the config both,
//! unless the spec forces a drop-in that nothing imports yet.

use super::imports::{self, Major};
use super::pattern::Pattern;
use crate::runtime::Target;
use crate::spec::{ContainerdOptions, EditMode, Flavor};
use crate::state::StateError;

/// The name of gpuprov's drop-in in an imported directory.
pub const DROP_IN_NAME: &str = "gpuprov-runtime.toml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The config (or k3s's and RKE2's template) itself.
    Config { why: String },
    /// A drop-in in a directory containerd already reads; the config is
    /// left as it is.
    ImportedDir { drop_in: String, why: String },
    /// A drop-in the config is made to import (`containerd.dropInConfig`,
    /// or a version-1 config under containerd 2).
    Forced { drop_in: String, why: String },
}

impl Placement {
    pub fn drop_in(&self) -> Option<&str> {
        match self {
            Placement::Config { .. } => None,
            Placement::ImportedDir { drop_in, .. } | Placement::Forced { drop_in, .. } => {
                Some(drop_in)
            }
        }
    }

    pub fn is_forced(&self) -> bool {
        matches!(self, Placement::Forced { .. })
    }

    /// The choice and its reason, for `plan` and the report.
    pub fn why(&self) -> String {
        match self {
            Placement::Config { why } => format!("edits the config: {why}"),
            Placement::ImportedDir { drop_in, why } => {
                format!("writes the drop-in {drop_in}: {why}")
            }
            Placement::Forced { drop_in, why } => {
                format!("writes the drop-in {drop_in} and imports it: {why}")
            }
        }
    }
}

/// Chooses where the runtime goes. `config` is the file containerd reads
/// (links followed), `text` what it holds, `rules` whose loading rules
/// apply.
pub fn choose(
    opts: &ContainerdOptions,
    target: &Target,
    config: &str,
    text: Option<&str>,
    rules: Major,
    version1_on_2: bool,
) -> Result<Placement, StateError> {
    if let Some(drop_in) = &opts.drop_in_config {
        return Ok(Placement::Forced {
            drop_in: drop_in.clone(),
            why: "containerd.dropInConfig names it".into(),
        });
    }
    if version1_on_2 {
        return Ok(Placement::Forced {
            drop_in: super::default_drop_in(config),
            why: "a version-1 config's CRI tables are ignored by containerd 2".into(),
        });
    }
    if opts.edit == EditMode::Config {
        return Ok(Placement::Config {
            why: "containerd.edit is config".into(),
        });
    }
    // k0s merges the CRI sections of its drop-ins into the config it
    // generates, whatever containerd's own rules.
    if let Some(dir) = &target.own_drop_in_dir {
        return Ok(Placement::ImportedDir {
            drop_in: format!("{dir}/{DROP_IN_NAME}"),
            why: format!(
                "{} reads {dir}/*.toml and merges their CRI sections into the config it generates",
                flavor_name(target.flavor)
            ),
        });
    }
    let imported = match text {
        Some(text) if !text.trim().is_empty() => imported_dir(text, config, rules)?,
        _ => None,
    };
    match (imported, rules.merges_keys()) {
        (Some((dir, entry)), true) => Ok(Placement::ImportedDir {
            drop_in: format!("{dir}/{DROP_IN_NAME}"),
            why: format!(
                "{config} imports {entry:?} and {} merges imports key by key, so a drop-in with only the runtime leaves the rest as it is",
                rules.name()
            ),
        }),
        (Some((_, entry)), false) if opts.edit == EditMode::Auto => Ok(Placement::Config {
            why: format!(
                "{config} imports {entry:?}, but containerd 1.x replaces a plugin's whole section from an import, so a drop-in would hide the config's own CRI settings"
            ),
        }),
        (None, _) if opts.edit == EditMode::Auto => Ok(Placement::Config {
            why: format!("{config} imports no drop-in directory"),
        }),
        (Some((dir, entry)), false) => Ok(Placement::ImportedDir {
            drop_in: format!("{dir}/{DROP_IN_NAME}"),
            why: format!(
                "containerd.edit is dropIn and {config} imports {entry:?} (containerd 1.x takes the drop-in's CRI section whole: it holds the config's, copied)"
            ),
        }),
        (None, _) if target.template.is_some() => Err(StateError::operator(format!(
            "containerd.edit is dropIn, but {config} imports no drop-in directory and {} writes it again at every start: an import added there would be lost; use edit: auto (the template) or a version that reads config-v3.toml.d",
            flavor_name(target.flavor)
        ))),
        (None, _) => Ok(Placement::Forced {
            drop_in: super::default_drop_in(config),
            why: format!("containerd.edit is dropIn and {config} imports no drop-in directory"),
        }),
    }
}

fn flavor_name(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Containerd => "containerd",
        Flavor::K3s => "k3s",
        Flavor::Rke2 => "RKE2",
        Flavor::K0s => "k0s",
        Flavor::Talos => "Talos",
        Flavor::Bottlerocket => "Bottlerocket",
    }
}

/// The first directory `config` imports with a glob that gpuprov's
/// drop-in name matches (`conf.d/*.toml`), and the entry that names it.
fn imported_dir(
    text: &str,
    config: &str,
    rules: Major,
) -> Result<Option<(String, String)>, StateError> {
    let doc = super::config::parse_shared(text)
        .map_err(|e| StateError::operator(format!("{config}:{}", e.located(text))))?;
    let entries = imports::import_entries(&doc, config).map_err(StateError::operator)?;
    for entry in entries {
        let (dir, name) = entry.rsplit_once('/').unwrap_or(("", entry.as_str()));
        // Only a glob in the file name: a wildcard directory is not one
        // place to write.
        if dir.contains(['*', '?', '[', '\\']) {
            continue;
        }
        let Ok(Some(pattern)) = Pattern::parse(name) else {
            continue;
        };
        if !pattern.matches(DROP_IN_NAME) {
            continue;
        }
        let dir = if dir.starts_with('/') {
            dir.to_string()
        } else if rules == Major::One {
            // containerd 1.x leaves a relative glob relative to `/`.
            format!("/{dir}")
        } else {
            let base = config.rsplit_once('/').map_or("", |(d, _)| d);
            format!("{base}/{dir}")
        };
        let dir = dir.trim_end_matches('/').to_string();
        if dir.is_empty() || dir.split('/').any(|c| c == "..") {
            continue;
        }
        return Ok(Some((dir, entry)));
    }
    Ok(None)
}
