//! containerd's nvidia runtime: the `containerd-runtime` state.
//!
//! The config is edited in place (see `config`), the original is backed up
//! before the first change, and containerd is restarted only when the file
//! changed. A marker written before the config and removed after the
//! restart makes a restart that was interrupted (a crash, a reboot) happen
//! on the next run, although the file is then already right.

pub mod config;
pub mod effective;
pub mod imports;
pub mod pattern;
pub mod placement;
pub mod revert;

use serde::{Deserialize, Serialize};

pub use crate::digest::sha256_hex;
pub use crate::runtime::containerd_binary;

use crate::host::{Host, HostError};
use crate::spec::{ContainerdOptions, RestartMode};
use crate::state::{Change, Observation, Outcome, StateContext, StateError, error_chain};
use config::{DefaultRuntime, RuntimeWanted};

/// What gpuprov did to containerd's config, for revert.
pub const RECORD: &str = "/var/lib/gpuprov/containerd.json";
/// Present from before a config write until containerd has restarted.
pub const RESTART_PENDING: &str = "/var/lib/gpuprov/containerd-restart-pending";
/// Backups of originals live under here, at their own path.
pub const BACKUP_DIR: &str = "/var/lib/gpuprov/backup";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The config file gpuprov edited.
    pub config: String,
    /// Whether it existed before gpuprov's first write.
    pub original_existed: bool,
    /// Where the original's bytes are kept.
    pub backup: String,
    /// sha256 of what gpuprov last wrote: a file that still has it is
    /// restored byte for byte on revert.
    pub written_sha256: String,
    pub runtime_class: String,
    /// The drop-in file gpuprov wrote and imports, in drop-in mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_in: Option<String>,
    /// sha256 of what gpuprov last wrote to the drop-in: one that another
    /// tool rewrote since is neither overwritten nor removed. (Records
    /// from before it was kept have none.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_in_sha256: Option<String>,
    /// Whether gpuprov turned CDI on (`enable_cdi`, `cdi_spec_dirs`):
    /// revert puts those keys back as the original had them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cdi: bool,
    /// The CDI runtime (`nvidia-cdi`) gpuprov added or set, which revert
    /// removes (or gives back as the original had it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdi_runtime_class: Option<String>,
}

impl Record {
    pub fn load(host: &Host) -> Result<Option<Record>, StateError> {
        match host.read(RECORD)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                StateError::operator(format!("{RECORD}: {e} (move it away to start over)"))
            }),
        }
    }
}

/// The containerd version `binary --version` prints (`major.minor`).
pub fn containerd_version(host: &Host, binary: &str) -> Result<(u32, u32), String> {
    let record = host
        .run(&[binary.to_string(), "--version".to_string()])
        .map_err(|e| format!("cannot tell which containerd runs: {}", error_chain(&e)))?;
    if !record.success() {
        return Err(format!(
            "cannot tell which containerd runs: `{binary} --version` {}",
            record.failure_summary()
        ));
    }
    record
        .stdout
        .split_whitespace()
        .find_map(|word| {
            let word = word.strip_prefix('v').unwrap_or(word);
            let (major, rest) = word.split_once('.')?;
            let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
        })
        .ok_or_else(|| {
            format!(
                "no version in `{binary} --version` output {:?}",
                record.stdout.trim()
            )
        })
}

/// The config version containerd `major.minor` writes for a new file: 2
/// for 1.x, 3 for 2.0 to 2.2, 4 for 2.3 and later.
pub fn config_version_for((major, minor): (u32, u32)) -> i64 {
    match (major, minor) {
        (0 | 1, _) => 2,
        (2, 0..=2) => 3,
        _ => 4,
    }
}

/// Whether the config's `imports` name a glob (a directory of drop-ins,
/// where gpuprov may put its own).
fn imports_a_glob(text: &str) -> bool {
    config::parse_shared(text)
        .ok()
        .and_then(|doc| {
            imports::import_entries(&doc, "")
                .ok()
                .map(|entries| entries.iter().any(|e| e.contains(['*', '?', '['])))
        })
        .unwrap_or(false)
}

/// One file the edit writes: its path, what it holds now, what it should
/// hold, and what it is for.
struct Planned {
    path: String,
    now: Option<String>,
    wanted: String,
    purpose: String,
}

impl Planned {
    fn changes(&self) -> bool {
        self.now.as_deref() != Some(self.wanted.as_str())
    }
}

/// The `containerd-runtime` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let opts = &ctx.spec.containerd;
    if let Some(why) = crate::runtime::crio_chosen(ctx.host, opts)? {
        return crate::crio::observe(ctx, &why);
    }
    let target = crate::runtime::containerd_target(ctx.host, opts)?;
    let flavor_note = format!(
        "{} ({})",
        serde_json::to_value(target.flavor)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        target.detected_by
    );
    let binary = crate::toolkit::runtime_binary(ctx.host, ctx.spec)?;
    if let Some(why) = &target.read_only {
        // Set by the operator the way the OS wants it: converged as it is.
        let wanted = RuntimeWanted {
            class: opts.runtime_class.clone(),
            binary: binary.clone(),
            default: if opts.set_as_default {
                DefaultRuntime::Set
            } else {
                DefaultRuntime::Keep
            },
            cdi: None,
        };
        let mut commands = Vec::new();
        let there = effective::verify(ctx.host, None, &target.config, &wanted, &mut commands);
        let mut obs = match there {
            Ok(()) => Observation::new(
                Outcome::Preinstalled,
                format!(
                    "runtime `{}` is in {}, as the OS's own settings put it there; {flavor_note}: gpuprov writes nothing",
                    opts.runtime_class, target.config
                ),
            ),
            Err(_) => Observation::new(
                Outcome::Absent,
                format!(
                    "containerd's config is not gpuprov's to write on {flavor_note}, and runtime `{}` is not in {}: {why}",
                    opts.runtime_class, target.config
                ),
            ),
        };
        obs.commands = commands;
        return Ok(obs);
    }
    let record = Record::load(ctx.host)?;
    // A config that is a symlink (distros and k3s do this) is edited at its
    // target inside the root, and the link stays.
    let config_path = ctx.host.follow_links(&target.config)?;
    if config_path != target.config && !ctx.host.exists(&config_path)? {
        return Err(StateError::operator(format!(
            "{} is a symlink to {config_path}, which does not exist in the host root: gpuprov does not create a file at a link's target",
            target.config
        )));
    }
    let current = ctx.host.read(&config_path)?;
    // k3s and RKE2 write the config again at every start: a whole-file
    // edit goes into their template, made from the config they generated.
    let edit_path = match &target.template {
        Some(template) => ctx.host.follow_links(template)?,
        None => config_path.clone(),
    };
    let current_edit = if edit_path == config_path {
        current.clone()
    } else {
        ctx.host.read(&edit_path)?
    };
    if let Some(text) = &current_edit
        && edit_path != config_path
        && text.contains("{{")
    {
        return Err(StateError::operator(format!(
            "{edit_path} is a Go template ({{{{ … }}}}): gpuprov edits only a template that is plain TOML; add runtime `{}` there yourself, or move it away so gpuprov makes one from {config_path}",
            opts.runtime_class
        )));
    }
    // What the edit starts from: the template once there is one.
    let source = current_edit.clone().or_else(|| current.clone());
    let original = match &record {
        Some(r) if r.original_existed => ctx.host.read(&r.backup)?,
        Some(_) => None,
        None => source.clone(),
    };
    // An error names the file and, where it can, the line and column.
    let in_file = |path: &str, text: &str| {
        let (path, text) = (path.to_string(), text.to_string());
        move |e: config::ConfigError| StateError::operator(format!("{path}:{}", e.located(&text)))
    };
    let original_default = match &original {
        Some(text) => config::default_runtime_name(text).map_err(in_file(&edit_path, text))?,
        None => None,
    };
    let default = if opts.set_as_default {
        DefaultRuntime::Set
    } else if original_default.as_deref() == Some(opts.runtime_class.as_str()) {
        DefaultRuntime::Keep
    } else {
        DefaultRuntime::Clear
    };
    let text = source.as_deref().unwrap_or("");
    if text.trim().is_empty() && target.binary.is_none() && !target.is_embedded() {
        // Nothing to configure: containerd is simply not installed here.
        return Ok(Observation::new(
            Outcome::Absent,
            format!(
                "containerd is not installed: no containerd binary in the host's {} and {} {}",
                crate::host::HOST_PATH
                    .iter()
                    .map(|d| format!("/{d}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                config_path,
                if current.is_some() {
                    "is empty"
                } else {
                    "does not exist"
                }
            ),
        ));
    }
    if text.trim().is_empty() && target.is_embedded() {
        return Err(StateError::operator(format!(
            "{config_path} does not exist yet on {flavor_note}: it is written when the service first starts; start it, then run gpuprov again"
        )));
    }
    let file_version = if text.trim().is_empty() {
        None
    } else {
        let doc = config::parse_shared(text).map_err(in_file(&edit_path, text))?;
        Some(config::layout(&doc).map_err(in_file(&edit_path, text))?.0)
    };
    // Whose rules load the files: the running containerd's, asked when
    // the host has its binary, else what the config's version says.
    // (A binary that cannot be asked leaves the rules to the version; a
    // new file's version then needs it, and says why it cannot be had.)
    // Asked only where the answer matters (a new file's version, a
    // version-1 file, a directory of drop-ins): a converged node runs no
    // command.
    let version_matters = file_version.is_none_or(|v| v == 1) || imports_a_glob(text);
    let asked = target
        .binary
        .as_ref()
        .filter(|_| version_matters)
        .map(|binary| containerd_version(ctx.host, binary));
    let running = asked
        .as_ref()
        .and_then(|answer| answer.as_ref().ok().copied());
    let rules = match running {
        Some((major, minor)) => imports::Major::of(major, minor),
        None => imports::Major::guess(file_version.unwrap_or(1)),
    };
    // containerd 2 ignores a version-1 file's CRI tables: the runtime goes
    // into a version-3 drop-in the file imports.
    let version1_on_2 = file_version == Some(1) && rules.merges_keys() && running.is_some();
    if version1_on_2 && rules == imports::Major::TwoThree {
        return Err(StateError::operator(format!(
            "{config_path} is a version-1 config, whose CRI tables containerd 2 ignores, and {} refuses a drop-in with a higher version than the main config's: convert it with `containerd config migrate` (then gpuprov edits it as it is)",
            rules.name()
        )));
    }
    let fresh_version = match (file_version, running) {
        (Some(_), _) => 2,
        (None, Some(version)) => config_version_for(version),
        (None, None) => {
            return Err(StateError::operator(match asked {
                Some(Err(why)) => why,
                _ => format!(
                    "{config_path} is empty and no containerd binary in the host says which config version it wants"
                ),
            }));
        }
    };
    let wanted = RuntimeWanted {
        class: opts.runtime_class.clone(),
        binary: binary.clone(),
        default,
        cdi: match ctx.spec.cdi.enabled {
            false => None,
            true => Some(config::CdiWanted {
                spec_dir: ctx.spec.cdi.spec_dir.clone(),
                runtime: match &ctx.spec.cdi.runtime_class {
                    Some(class) => Some(config::CdiRuntime {
                        class: class.clone(),
                        binary: crate::toolkit::cdi_runtime_binary(ctx.host, ctx.spec)?,
                    }),
                    None => None,
                },
            }),
        },
    };
    let edited = if version1_on_2 {
        config::configure("", &wanted, 3)
    } else {
        config::configure(text, &wanted, fresh_version)
    }
    .map_err(in_file(&edit_path, text))?;
    let placement = placement::choose(
        opts,
        &target,
        &config_path,
        current.as_deref(),
        rules,
        version1_on_2,
    )?;
    if let Some(drop_in) = placement.drop_in()
        && ctx.host.follow_links(drop_in)? == config_path
    {
        return Err(StateError::operator(format!(
            "containerd.dropInConfig {drop_in} is containerd's config {config_path} itself: the config would import itself; name a file of its own (such as {})",
            default_drop_in(&config_path)
        )));
    }
    let purpose = format!("runtime `{}`", opts.runtime_class);
    // What each file should hold: the config (or template) with the
    // runtime; a drop-in in a directory containerd imports; or, forced, a
    // drop-in and the config importing it.
    let mut files: Vec<Planned> = Vec::new();
    let drop_in_section = match &placement {
        placement::Placement::Config { .. } => None,
        placement::Placement::ImportedDir { drop_in, .. } => {
            // The runtime copies the default one as containerd sees it,
            // wherever that is set (k0s: in the CRI file it generates).
            let view = imports::load(ctx.host, &config_path, &[], rules)
                .map(|files| imports::merge(&files, rules).doc.to_string())
                .unwrap_or_else(|_| text.to_string());
            let base = config::configure(&view, &wanted, fresh_version)
                .map_err(in_file(&config_path, &view))?;
            let version = file_version.unwrap_or(fresh_version);
            Some((
                drop_in,
                config::runtime_drop_in(&base.text, &wanted, version),
            ))
        }
        placement::Placement::Forced { drop_in, .. } if version1_on_2 => {
            Some((drop_in, config::version3_drop_in(&wanted)))
        }
        placement::Placement::Forced { drop_in, .. } => {
            Some((drop_in, config::drop_in(&edited.text)))
        }
    };
    match drop_in_section {
        None => files.push(Planned {
            path: edit_path.clone(),
            now: current_edit.clone(),
            wanted: edited.text.clone(),
            purpose: purpose.clone(),
        }),
        Some((drop_in, section)) => {
            let section = section.map_err(in_file(&edit_path, text))?;
            files.push(drop_in_file(
                ctx.host,
                drop_in,
                record.as_ref(),
                section,
                &purpose,
            )?);
            // A forced drop-in is imported by the config; one in an
            // imported directory leaves the config as it is.
            if placement.is_forced() {
                let main = config::add_import(text, drop_in, fresh_version)
                    .map_err(in_file(&edit_path, text))?;
                files.push(Planned {
                    path: edit_path.clone(),
                    now: current_edit.clone(),
                    wanted: main,
                    purpose: format!("import {drop_in}"),
                });
            }
        }
    }
    let mut changed = files.iter().any(Planned::changes);
    let pending = ctx.host.exists(RESTART_PENDING)?;

    let mut reason = format!(
        "runtime `{}` runs {binary} ({} in {})",
        opts.runtime_class,
        edited.layout.plugin(),
        placement.drop_in().unwrap_or(&edit_path)
    );
    if opts.set_as_default {
        reason.push_str(", the default runtime");
    }
    // Where the edit goes and why, for the plan and the report.
    let placed = match &placement {
        placement::Placement::Config { .. } if edit_path != config_path => {
            placement.why().replacen(
                "edits the config",
                &format!(
                    "edits {edit_path}, the template {} writes {config_path} from at every start",
                    target.service
                ),
                1,
            )
        }
        _ => placement.why(),
    };
    reason.push_str(&format!("; {flavor_note}; {placed}"));
    if version1_on_2 {
        reason.push_str(&format!(
            "; containerd 2 ignores the CRI tables of {config_path}, a version-1 config, so the runtime is in a version-3 drop-in it imports (`containerd config migrate` converts the file so its own settings apply again)"
        ));
    }
    if config_path != target.config {
        reason.push_str(&format!("; {} is a link to it", target.config));
    }
    for note in &edited.notes {
        reason.push_str(&format!("; {note}"));
    }
    // The file containerd's view is checked at: the template, which k3s
    // and RKE2 make the config from, or the config.
    let view_config = match &placement {
        placement::Placement::Config { .. } => edit_path.clone(),
        // k0s merges its drop-ins into a config it writes at start: the
        // drop-in is what there is to check before then.
        placement::Placement::ImportedDir { drop_in, .. } if target.own_drop_in_dir.is_some() => {
            drop_in.clone()
        }
        _ => config_path.clone(),
    };
    let check_view = Change::own(effective::ViewCheck {
        config: view_config.clone(),
        class: opts.runtime_class.clone(),
        binary: binary.clone(),
        set_as_default: opts.set_as_default,
        cdi: wanted.cdi.clone(),
        containerd: target.binary.clone(),
    });
    let remember = |key: String| Change::WriteFile {
        path: effective::VIEW_CHECKED.to_string(),
        content: key.into_bytes(),
        mode: 0o644,
        purpose: "containerd's view was checked; not again until a change or a reboot".to_string(),
        diff: None,
    };
    // Before gpuprov's first write: a runtime that another file (the
    // toolkit's drop-in) or the distribution itself (k3s, when it finds
    // the toolkit at start) already gives containerd, as wanted, is
    // converged as it is: nothing is written next to it.
    if changed && record.is_none() && !pending && !placement.is_forced() {
        let key = effective::view_key(
            ctx.host,
            target.binary.as_deref(),
            &wanted,
            &config_path,
            &[],
        );
        let checked = ctx.host.read(effective::VIEW_CHECKED)?.as_deref() == Some(key.as_str());
        let mut commands = Vec::new();
        if checked
            || effective::verify(
                ctx.host,
                target.binary.as_deref(),
                &config_path,
                &wanted,
                &mut commands,
            )
            .is_ok()
        {
            let mut obs = Observation::new(
                Outcome::Preinstalled,
                format!(
                    "runtime `{}` is already in containerd's view of {config_path}, as wanted; {flavor_note}: nothing written",
                    opts.runtime_class
                ),
            );
            obs.commands = commands;
            if !checked {
                obs.outcome = Outcome::Pending;
                obs.on_change = Outcome::Preinstalled;
                obs.changes.push(remember(key));
            }
            return Ok(obs);
        }
        changed = true;
    }
    // containerd's own view is checked once per boot and after every
    // change: the marker holds what it was checked for.
    let wanted_files: Vec<(&str, &str)> = files
        .iter()
        .map(|f| (f.path.as_str(), f.wanted.as_str()))
        .collect();
    let view_key = effective::view_key(
        ctx.host,
        target.binary.as_deref(),
        &wanted,
        &view_config,
        &wanted_files,
    );
    let view_checked =
        ctx.host.read(effective::VIEW_CHECKED)?.as_deref() == Some(view_key.as_str());
    if !changed && !pending {
        let outcome = if record.is_some() {
            Outcome::Configured
        } else {
            Outcome::Preinstalled
        };
        if view_checked {
            return Ok(Observation::new(outcome, reason));
        }
        // Checked now, before anything is decided: a view that does not
        // have the runtime fails the step with the key that wins.
        let mut commands = Vec::new();
        if let Err(why) = effective::verify(
            ctx.host,
            target.binary.as_deref(),
            &view_config,
            &wanted,
            &mut commands,
        ) {
            let mut obs = Observation::new(Outcome::Failed, why);
            obs.commands = commands;
            return Ok(obs);
        }
        let mut obs = Observation::new(Outcome::Pending, reason);
        obs.commands = commands;
        obs.on_change = outcome;
        obs.changes.push(remember(view_key));
        return Ok(obs);
    }

    // What is there now, for the plan and for the "(was: …)" of the report.
    let now: Vec<String> = files
        .iter()
        .filter(|f| f.changes())
        .map(|f| match f.now {
            None => format!("{} does not exist", f.path),
            Some(_) => format!("{} lacks {} as wanted", f.path, f.purpose),
        })
        .chain((!changed && pending).then(|| {
            "containerd has not restarted since gpuprov's last edit (a run was interrupted)"
                .to_string()
        }))
        .collect();
    let mut obs = Observation::new(
        Outcome::Pending,
        format!("{}; {flavor_note}; {placed}", now.join("; ")),
    );
    obs.on_change = Outcome::Configured;
    if changed {
        // The file the record names: the one gpuprov edits whole (the
        // config, or the template), or with a drop-in beside it, the
        // config, which stays as it is.
        let (edited_file, edited_now) = match &placement {
            placement::Placement::ImportedDir { .. } => (&config_path, &current),
            _ => (&edit_path, &current_edit),
        };
        if record.is_none()
            && let Some(original) = edited_now
        {
            obs.changes.push(Change::WriteFile {
                path: backup_path(edited_file),
                content: original.clone().into_bytes(),
                mode: 0o600,
                purpose: "backup of the original, for revert".to_string(),
                diff: None,
            });
        }
        let main_written = files
            .iter()
            .find(|f| f.path == *edited_file)
            .map(|f| f.wanted.clone())
            .or_else(|| edited_now.clone())
            .unwrap_or_default();
        let drop_in_path = placement.drop_in().map(str::to_string);
        let new_record = Record {
            config: edited_file.clone(),
            original_existed: record
                .as_ref()
                .map_or(edited_now.is_some(), |r| r.original_existed),
            backup: record
                .as_ref()
                .map_or_else(|| backup_path(edited_file), |r| r.backup.clone()),
            written_sha256: sha256_hex(main_written.as_bytes()),
            runtime_class: opts.runtime_class.clone(),
            drop_in: drop_in_path.clone(),
            drop_in_sha256: files
                .iter()
                .find(|f| drop_in_path.as_ref() == Some(&f.path))
                .map(|f| sha256_hex(f.wanted.as_bytes())),
            cdi: wanted.cdi.is_some() || record.as_ref().is_some_and(|r| r.cdi),
            cdi_runtime_class: wanted
                .cdi
                .as_ref()
                .and_then(|c| c.runtime.as_ref())
                .map(|r| r.class.clone())
                .or_else(|| record.as_ref().and_then(|r| r.cdi_runtime_class.clone())),
        };
        obs.changes.push(Change::WriteFile {
            path: RECORD.to_string(),
            content: (serde_json::to_string_pretty(&new_record).expect("serializes") + "\n")
                .into_bytes(),
            mode: 0o644,
            purpose: "what gpuprov changed, for revert".to_string(),
            diff: None,
        });
        if opts.restart_mode != RestartMode::None {
            obs.changes.push(Change::WriteFile {
                path: RESTART_PENDING.to_string(),
                content: Vec::new(),
                mode: 0o644,
                purpose: "restart owed until containerd is back".to_string(),
                diff: None,
            });
        }
        // The drop-in first, so the import never names a missing file.
        for file in files {
            if !file.changes() {
                continue;
            }
            let diff = crate::state::file_diff(
                &file.path,
                file.now.as_deref().unwrap_or(""),
                &file.wanted,
            );
            obs.changes.push(Change::WriteFile {
                path: file.path,
                content: file.wanted.into_bytes(),
                mode: 0o644,
                purpose: file.purpose,
                diff: Some(diff),
            });
        }
    }
    // Before the restart (an owed one too): containerd is not restarted
    // into a config whose view lacks the runtime.
    obs.changes.push(check_view);
    obs.changes.extend(restart_changes(opts, &target));
    if opts.restart_mode == RestartMode::None {
        obs.reason
            .push_str("; restartMode is none: containerd loads the runtime at its next restart");
    } else {
        obs.changes.push(Change::RemoveFile {
            path: RESTART_PENDING.to_string(),
            purpose: "containerd restarted".to_string(),
        });
    }
    obs.changes.push(remember(view_key));
    Ok(obs)
}

/// A drop-in to write at `path`, refused when it is a link or another
/// tool's file.
fn drop_in_file(
    host: &Host,
    path: &str,
    record: Option<&Record>,
    wanted: String,
    purpose: &str,
) -> Result<Planned, StateError> {
    // A link there is never written through (and is named as one), nor
    // is a directory that is a link: gpuprov's file would land in
    // whatever it points at.
    if let Some(target) = host.link_target(path)? {
        return Err(HostError::Symlink {
            path: path.to_string(),
            target,
        }
        .into());
    }
    crate::runtime::refuse_linked_dir(host, path)?;
    let now = host.read(path)?;
    refuse_foreign_drop_in(path, now.as_deref(), record, &wanted)?;
    Ok(Planned {
        path: path.to_string(),
        now,
        wanted,
        purpose: purpose.to_string(),
    })
}

/// How containerd is made to load the config, per `restartMode`: its
/// service restarted (k3s's, RKE2's or k0s's where containerd is their
/// child), or, for containerd of its own, SIGHUP to it.
pub fn restart_changes(opts: &ContainerdOptions, target: &crate::runtime::Target) -> Vec<Change> {
    let timeout_seconds = opts.restart_timeout_seconds;
    let systemd = || {
        vec![
            Change::Run {
                argv: vec![
                    "systemctl".to_string(),
                    "restart".to_string(),
                    target.service.clone(),
                ],
                display: format!("systemctl restart {}", target.service),
            },
            Change::WaitSocket {
                socket: target.socket.clone(),
                timeout_seconds,
            },
        ]
    };
    match opts.restart_mode {
        RestartMode::Systemd => systemd(),
        // containerd there is the child of a service that would stop with
        // it (k3s) or start it again on its own terms: the service is
        // restarted instead.
        RestartMode::Signal if target.is_embedded() => systemd(),
        RestartMode::Signal => vec![Change::SignalSocketOwner {
            socket: target.socket.clone(),
            timeout_seconds,
        }],
        RestartMode::None => Vec::new(),
    }
}

/// Where gpuprov puts the version-3 drop-in for a version-1 config under
/// containerd 2 when the spec names none: `conf.d/` beside the config.
pub fn default_drop_in(config: &str) -> String {
    let dir = config.rsplit_once('/').map_or("", |(dir, _)| dir);
    format!("{dir}/conf.d/gpuprov-runtime.toml")
}

/// A drop-in gpuprov may write: none there yet, one that already holds
/// what it would write, or the one it wrote, unchanged since (its record
/// names the file and its hash). Anything else, another tool's file or
/// gpuprov's rewritten by one, is not replaced.
fn refuse_foreign_drop_in(
    path: &str,
    existing: Option<&str>,
    record: Option<&Record>,
    wanted: &str,
) -> Result<(), StateError> {
    let Some(existing) = existing else {
        return Ok(());
    };
    if existing == wanted {
        return Ok(());
    }
    let recorded = record.filter(|r| r.drop_in.as_deref() == Some(path));
    let why = match recorded {
        Some(r) => match &r.drop_in_sha256 {
            None => return Ok(()),
            Some(sha) if *sha == sha256_hex(existing.as_bytes()) => return Ok(()),
            Some(_) => "was changed since gpuprov wrote it",
        },
        None => "exists and gpuprov did not write it",
    };
    Err(StateError::operator(format!(
        "{path} {why}: gpuprov does not overwrite another tool's drop-in; move it away, or name another file in containerd.dropInConfig"
    )))
}

/// Where the original of a config file is kept.
pub fn backup_path(config: &str) -> String {
    format!("{BACKUP_DIR}{config}")
}
