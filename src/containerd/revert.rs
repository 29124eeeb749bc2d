//! Taking gpuprov's runtime out of containerd's config again.
//!
//! If the file is still exactly what gpuprov last wrote, the original comes
//! back byte for byte (or the file goes, if gpuprov created it). If someone
//! changed it since, only gpuprov's runtime (and a default it set) is
//! removed and their change stays.

use crate::host::Host;
use crate::make::make_changes;
use crate::report::{RevertReport, RuntimeReverted};
use crate::spec::ContainerdOptions;
use crate::state::{Change, RevertContext, StateError, error_chain};

use super::{RECORD, RESTART_PENDING, Record, config, restart_changes, sha256_hex};

/// The `containerd-runtime` capability's revert: containerd's config back
/// as it was (restarting containerd only if it changed), or on a CRI-O
/// node gpuprov's drop-in gone; then the record of the view's check.
pub fn revert(ctx: &RevertContext, report: &mut RevertReport) -> Result<(), StateError> {
    let (host, options) = (ctx.host, &ctx.spec.containerd);
    let (changes, mut summary, mut changed) = plan(host, options).map_err(StateError::operator)?;
    let mut commands = make_changes(host, &changes)?;
    tidy_backups(host, options).map_err(StateError::operator)?;
    if let Some((changes, crio, crio_changed)) =
        crate::crio::revert_plan(host, options).map_err(StateError::operator)?
    {
        changed |= crio_changed;
        commands.extend(make_changes(host, &changes)?);
        summary = format!("{summary}; {crio}");
    }
    report.containerd = RuntimeReverted {
        summary,
        changed,
        commands,
    };
    host.remove(super::effective::VIEW_CHECKED)?;
    Ok(())
}

/// The changes that revert containerd's config, a sentence saying what
/// they do, and whether the config changes; no changes when gpuprov never
/// edited it.
pub fn plan(host: &Host, opts: &ContainerdOptions) -> Result<(Vec<Change>, String, bool), String> {
    let record = Record::load(host).map_err(|e| error_chain(&e))?;
    let target = crate::runtime::containerd_target(host, opts).map_err(|e| error_chain(&e))?;
    // A revert killed between writing the config and restarting containerd
    // left the marker: the restart is still owed, whatever the file says.
    let owed = host.exists(RESTART_PENDING).map_err(|e| error_chain(&e))?
        && opts.restart_mode != crate::spec::RestartMode::None;
    let Some(record) = record else {
        if owed {
            let mut changes = restart_changes(opts, &target);
            changes.push(Change::RemoveFile {
                path: RESTART_PENDING.to_string(),
                purpose: "containerd restarted".to_string(),
            });
            let summary = "containerd: restarted, as an interrupted run owed".to_string();
            return Ok((changes, summary, false));
        }
        let summary = "containerd: gpuprov has not changed its config".to_string();
        return Ok((Vec::new(), summary, false));
    };
    let read = |path: &str| host.read(path).map_err(|e| error_chain(&e));
    let current = read(&record.config)?;
    let original = if record.original_existed {
        read(&record.backup)?
    } else {
        None
    };
    if record.original_existed && original.is_none() {
        return Err(format!(
            "the backup {} of {} is missing; not touching the config",
            record.backup, record.config
        ));
    }

    let mut changes = Vec::new();
    let mut summary;
    match (&current, &original) {
        (Some(now), _) if sha256_hex(now.as_bytes()) == record.written_sha256 => match &original {
            // gpuprov wrote only a drop-in: the config is as it was.
            Some(original) if original == now => {
                summary = format!("containerd: {} is as it was", record.config);
            }
            Some(original) => {
                summary = format!("containerd: restored {} byte for byte", record.config);
                changes.push(write(&record.config, original.clone(), "the original"));
            }
            None => {
                summary = format!("containerd: removed {} (gpuprov created it)", record.config);
                changes.push(Change::RemoveFile {
                    path: record.config.clone(),
                    purpose: "gpuprov created it".to_string(),
                });
            }
        },
        (Some(now), _) => {
            if let Some(text) = &original {
                config::read(text)
                    .and_then(|doc| config::layout(&doc))
                    .map_err(|e| format!("{}:{}", record.backup, e.located(text)))?;
            }
            let in_config =
                |e: config::ConfigError| format!("{}:{}", record.config, e.located(now));
            let mut reverted = config::unconfigure(
                now,
                &record.runtime_class,
                original.as_deref(),
                record
                    .cdi
                    .then(|| config::CdiReverted {
                        runtime_class: record.cdi_runtime_class.clone(),
                    })
                    .as_ref(),
            )
            .map_err(in_config)?;
            if let Some(drop_in) = &record.drop_in {
                reverted = config::remove_import(&reverted, drop_in).map_err(in_config)?;
            }
            if reverted == *now {
                summary = format!(
                    "containerd: {} was changed since gpuprov wrote it and holds nothing of gpuprov's",
                    record.config
                );
            } else {
                summary = format!(
                    "containerd: {} was changed since gpuprov wrote it; removed only {}",
                    record.config,
                    match &record.drop_in {
                        Some(drop_in) => format!(
                            "runtime `{}` and the import of {drop_in}",
                            record.runtime_class
                        ),
                        None => format!("runtime `{}`", record.runtime_class),
                    }
                );
                changes.push(write(&record.config, reverted, "without gpuprov's runtime"));
            }
        }
        (None, _) => summary = format!("containerd: {} is gone; nothing to revert", record.config),
    }
    if let Some(drop_in) = &record.drop_in {
        // Removed only as gpuprov left it: another tool's rewrite stays.
        let now = read(drop_in)?;
        let rewritten = match (&now, &record.drop_in_sha256) {
            (Some(now), Some(sha)) => sha256_hex(now.as_bytes()) != *sha,
            _ => false,
        };
        if rewritten {
            summary =
                format!("{summary}; left {drop_in}, which was changed since gpuprov wrote it");
        } else if now.is_some() {
            changes.insert(
                0,
                Change::RemoveFile {
                    path: drop_in.clone(),
                    purpose: "gpuprov's drop-in".to_string(),
                },
            );
        }
    }
    let changed = !changes.is_empty();
    if changed && opts.restart_mode != crate::spec::RestartMode::None {
        // Written first, removed last: a revert killed in between restarts
        // containerd on its next run.
        changes.insert(
            0,
            Change::WriteFile {
                path: RESTART_PENDING.to_string(),
                content: Vec::new(),
                mode: 0o644,
                purpose: "restart owed until containerd is back".to_string(),
                diff: None,
            },
        );
    }
    if changed || owed {
        changes.extend(restart_changes(opts, &target));
    }
    for path in [RESTART_PENDING, RECORD, record.backup.as_str()] {
        changes.push(Change::RemoveFile {
            path: path.to_string(),
            purpose: "gpuprov's own record".to_string(),
        });
    }
    Ok((changes, summary, changed))
}

/// After `plan`'s changes are made: the backup directories left empty go.
pub fn tidy_backups(host: &Host, opts: &ContainerdOptions) -> Result<(), String> {
    // The backup sits at the path of the file gpuprov edited: the config,
    // or on k3s and RKE2 their template.
    let target = crate::runtime::containerd_target(host, opts).map_err(|e| error_chain(&e))?;
    let edited = [
        Some(opts.config.clone()),
        Some(target.config),
        target.template,
    ];
    for file in edited.into_iter().flatten() {
        let backup = super::backup_path(&file);
        let dir = backup
            .rsplit_once('/')
            .map_or(super::BACKUP_DIR, |(dir, _)| dir);
        host.remove_empty_dirs(dir, super::BACKUP_DIR)
            .map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

fn write(path: &str, content: String, purpose: &str) -> Change {
    Change::WriteFile {
        path: path.to_string(),
        content: content.into_bytes(),
        mode: 0o644,
        purpose: purpose.to_string(),
        diff: None,
    }
}
