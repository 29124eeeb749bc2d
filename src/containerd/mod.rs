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
pub mod restart;
pub mod revert;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::{Host, HostError};
use crate::spec::{ContainerdOptions, RestartMode};
use crate::step::{Change, Observation, Outcome, StepContext, StepError, error_chain};
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
    pub fn load(host: &Host) -> Result<Option<Record>, StepError> {
        match host.read(RECORD)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                StepError::Observe(format!("{RECORD}: {e} (move it away to start over)"))
            }),
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The config version the host's containerd wants for a new file: 2 for
/// containerd 1.x, 3 for 2.x, from `containerd --version` in the host.
pub fn wanted_config_version(host: &Host) -> Result<i64, String> {
    let record = host
        .run(&["containerd".to_string(), "--version".to_string()])
        .map_err(|e| {
            format!(
                "cannot tell which config version containerd wants: {}",
                error_chain(&e)
            )
        })?;
    if !record.success() {
        return Err(format!(
            "cannot tell which config version containerd wants: `containerd --version` {}",
            record.failure_summary()
        ));
    }
    let major = record
        .stdout
        .split_whitespace()
        .filter_map(|word| {
            let word = word.strip_prefix('v').unwrap_or(word);
            let (major, rest) = word.split_once('.')?;
            rest.starts_with(|c: char| c.is_ascii_digit())
                .then(|| major.parse::<u32>().ok())?
        })
        .next()
        .ok_or_else(|| {
            format!(
                "no version in `containerd --version` output {:?}",
                record.stdout.trim()
            )
        })?;
    Ok(if major >= 2 { 3 } else { 2 })
}

/// The host path of containerd's binary, on the host's PATH directories.
pub fn containerd_binary(host: &Host) -> Option<String> {
    crate::host::HOST_PATH
        .iter()
        .map(|dir| format!("/{dir}/containerd"))
        .find(|path| host.is_file(path).unwrap_or(false))
}

fn has_containerd(host: &Host) -> bool {
    containerd_binary(host).is_some()
}

/// The `containerd-runtime` handler.
pub fn observe(ctx: &StepContext) -> Result<Observation, StepError> {
    let opts = &ctx.spec.containerd;
    let binary = crate::toolkit::runtime_binary(ctx.host, ctx.spec)?;
    let record = Record::load(ctx.host)?;
    // A config that is a symlink (distros and k3s do this) is edited at its
    // target inside the root, and the link stays.
    let config_path = ctx.host.follow_links(&opts.config)?;
    if config_path != opts.config && !ctx.host.exists(&config_path)? {
        return Err(StepError::Observe(format!(
            "{} is a symlink to {config_path}, which does not exist in the host root: gpuprov does not create a file at a link's target",
            opts.config
        )));
    }
    let current = ctx.host.read(&config_path)?;
    let original = match &record {
        Some(r) if r.original_existed => ctx.host.read(&r.backup)?,
        Some(_) => None,
        None => current.clone(),
    };
    // An error names the file and, where it can, the line and column.
    let in_file = |text: &str| {
        let text = text.to_string();
        let config_path = &config_path;
        move |e: config::ConfigError| {
            StepError::Observe(format!("{}:{}", config_path, e.located(&text)))
        }
    };
    let original_default = match &original {
        Some(text) => config::default_runtime_name(text).map_err(in_file(text))?,
        None => None,
    };
    let default = if opts.set_as_default {
        DefaultRuntime::Set
    } else if original_default.as_deref() == Some(opts.runtime_class.as_str()) {
        DefaultRuntime::Keep
    } else {
        DefaultRuntime::Clear
    };
    let text = current.as_deref().unwrap_or("");
    if text.trim().is_empty() && !has_containerd(ctx.host) {
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
    let file_version = if text.trim().is_empty() {
        None
    } else {
        let doc = config::parse_shared(text).map_err(in_file(text))?;
        Some(config::layout(&doc).map_err(in_file(text))?.0)
    };
    // containerd 2 ignores a version-1 file's CRI tables: the runtime goes
    // into a version-3 drop-in the file imports.
    let version1_on_2 = file_version == Some(1)
        && has_containerd(ctx.host)
        && wanted_config_version(ctx.host).map_err(StepError::Observe)? == 3;
    let fresh_version = match file_version {
        None => wanted_config_version(ctx.host).map_err(StepError::Observe)?,
        Some(_) => 2,
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
    .map_err(in_file(text))?;
    let drop_in_path = match &opts.drop_in_config {
        Some(path) => Some(path.clone()),
        None if version1_on_2 => Some(default_drop_in(&config_path)),
        None => None,
    };
    if let Some(drop_in) = &drop_in_path
        && ctx.host.follow_links(drop_in)? == config_path
    {
        return Err(StepError::Observe(format!(
            "containerd.dropInConfig {drop_in} is containerd's config {config_path} itself: the config would import itself; name a file of its own (such as {})",
            default_drop_in(&config_path)
        )));
    }
    // What each file should hold: the main config with the runtime, or, in
    // drop-in mode, the main config importing a drop-in that has it.
    let mut files: Vec<(String, Option<String>, String, String)> = Vec::new();
    match &drop_in_path {
        None => files.push((
            config_path.clone(),
            current.clone(),
            edited.text.clone(),
            format!("runtime `{}`", opts.runtime_class),
        )),
        Some(drop_in) => {
            let section = if version1_on_2 {
                config::version3_drop_in(&wanted)
            } else {
                config::drop_in(&edited.text)
            }
            .map_err(in_file(text))?;
            // A link there is never written through (and is named as one).
            if let Some(target) = ctx.host.link_target(drop_in)? {
                return Err(HostError::Symlink {
                    path: drop_in.clone(),
                    target,
                }
                .into());
            }
            let existing = ctx.host.read(drop_in)?;
            refuse_foreign_drop_in(drop_in, existing.as_deref(), record.as_ref(), &section)?;
            files.push((
                drop_in.clone(),
                existing,
                section,
                format!("runtime `{}`", opts.runtime_class),
            ));
            let main = config::add_import(text, drop_in, fresh_version).map_err(in_file(text))?;
            files.push((
                config_path.clone(),
                current.clone(),
                main,
                format!("import {drop_in}"),
            ));
        }
    }
    let changed = files
        .iter()
        .any(|(_, now, wanted, _)| now.as_deref() != Some(wanted.as_str()));
    let pending = ctx.host.exists(RESTART_PENDING)?;

    let mut reason = format!(
        "runtime `{}` runs {binary} ({} in {})",
        opts.runtime_class,
        edited.layout.plugin(),
        drop_in_path.as_deref().unwrap_or(&config_path)
    );
    if opts.set_as_default {
        reason.push_str(", the default runtime");
    }
    if version1_on_2 {
        reason.push_str(&format!(
            "; containerd 2 ignores the CRI tables of {config_path}, a version-1 config, so the runtime is in a version-3 drop-in it imports (`containerd config migrate` converts the file so its own settings apply again)"
        ));
    }
    if config_path != opts.config {
        reason.push_str(&format!("; {} is a link to it", opts.config));
    }
    for note in &edited.notes {
        reason.push_str(&format!("; {note}"));
    }
    // containerd's own view is checked once per boot and after every
    // change: the marker holds what it was checked for.
    let wanted_files: Vec<(&str, &str)> = files
        .iter()
        .map(|(path, _, wanted, _)| (path.as_str(), wanted.as_str()))
        .collect();
    let view_key = effective::view_key(ctx.host, &wanted, &config_path, &wanted_files);
    let view_checked =
        ctx.host.read(effective::VIEW_CHECKED)?.as_deref() == Some(view_key.as_str());
    let check_view = Change::CheckContainerdView {
        config: config_path.clone(),
        class: opts.runtime_class.clone(),
        binary: binary.clone(),
        set_as_default: opts.set_as_default,
        cdi: wanted.cdi.clone(),
    };
    let remember_view = Change::WriteFile {
        path: effective::VIEW_CHECKED.to_string(),
        content: view_key.clone().into_bytes(),
        mode: 0o644,
        purpose: "containerd's view was checked; not again until a change or a reboot".to_string(),
        diff: None,
    };
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
        if let Err(why) = effective::verify(ctx.host, &config_path, &wanted, &mut commands) {
            let mut obs = Observation::new(Outcome::Failed, why);
            obs.commands = commands;
            return Ok(obs);
        }
        let mut obs = Observation::new(Outcome::Pending, reason);
        obs.commands = commands;
        obs.on_change = outcome;
        obs.changes.push(remember_view);
        return Ok(obs);
    }

    // What is there now, for the plan and for the "(was: …)" of the report.
    let now: Vec<String> = files
        .iter()
        .filter(|(_, now, wanted, _)| now.as_deref() != Some(wanted.as_str()))
        .map(|(path, now, _, purpose)| match now {
            None => format!("{path} does not exist"),
            Some(_) => format!("{path} lacks {purpose} as wanted"),
        })
        .chain((!changed && pending).then(|| {
            "containerd has not restarted since gpuprov's last edit (a run was interrupted)"
                .to_string()
        }))
        .collect();
    let mut obs = Observation::new(Outcome::Pending, now.join("; "));
    obs.on_change = Outcome::Configured;
    if changed {
        if record.is_none()
            && let Some(original) = &current
        {
            obs.changes.push(Change::WriteFile {
                path: backup_path(&config_path),
                content: original.clone().into_bytes(),
                mode: 0o600,
                purpose: "backup of the original, for revert".to_string(),
                diff: None,
            });
        }
        let main_written = &files.last().expect("the main config is always listed").2;
        let new_record = Record {
            config: config_path.clone(),
            original_existed: record
                .as_ref()
                .map_or(current.is_some(), |r| r.original_existed),
            backup: record
                .as_ref()
                .map_or_else(|| backup_path(&config_path), |r| r.backup.clone()),
            written_sha256: sha256_hex(main_written.as_bytes()),
            runtime_class: opts.runtime_class.clone(),
            drop_in: drop_in_path.clone(),
            drop_in_sha256: files
                .iter()
                .find(|(path, ..)| drop_in_path.as_ref() == Some(path))
                .map(|(_, _, wanted, _)| sha256_hex(wanted.as_bytes())),
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
        for (path, now, wanted, purpose) in files {
            if now.as_deref() == Some(wanted.as_str()) {
                continue;
            }
            let diff = crate::step::file_diff(&path, now.as_deref().unwrap_or(""), &wanted);
            obs.changes.push(Change::WriteFile {
                path,
                content: wanted.into_bytes(),
                mode: 0o644,
                purpose,
                diff: Some(diff),
            });
        }
    }
    // Before the restart (an owed one too): containerd is not restarted
    // into a config whose view lacks the runtime.
    obs.changes.push(check_view);
    obs.changes.extend(restart_changes(opts));
    if opts.restart_mode == RestartMode::None {
        obs.reason
            .push_str("; restartMode is none: containerd loads the runtime at its next restart");
    } else {
        obs.changes.push(Change::RemoveFile {
            path: RESTART_PENDING.to_string(),
            purpose: "containerd restarted".to_string(),
        });
    }
    obs.changes.push(remember_view);
    Ok(obs)
}

/// How containerd is made to load the config, per `restartMode`.
pub fn restart_changes(opts: &ContainerdOptions) -> Vec<Change> {
    let timeout_seconds = opts.restart_timeout_seconds;
    match opts.restart_mode {
        RestartMode::Systemd => vec![
            Change::Run {
                argv: ["systemctl", "restart", "containerd"]
                    .map(String::from)
                    .to_vec(),
                display: "systemctl restart containerd".to_string(),
            },
            Change::WaitSocket {
                socket: opts.socket.clone(),
                timeout_seconds,
            },
        ],
        RestartMode::Signal => vec![Change::SignalSocketOwner {
            socket: opts.socket.clone(),
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
) -> Result<(), StepError> {
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
    Err(StepError::Observe(format!(
        "{path} {why}: gpuprov does not overwrite another tool's drop-in; move it away, or name another file in containerd.dropInConfig"
    )))
}

/// Where the original of a config file is kept.
pub fn backup_path(config: &str) -> String {
    format!("{BACKUP_DIR}{config}")
}
