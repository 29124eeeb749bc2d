//! Making changes: the arms for the host changes every capability
//! shares, and a capability's own change made through its trait. The
//! executor makes a step's changes here; a capability's `revert` makes its
//! own.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::host::socket;
use crate::host::{CommandRecord, FileWrite, Host};
use crate::kube::{Cluster, MANAGED_BY};
use crate::state::{Change, LabelsSet, MakeContext, StateError, error_chain};

/// Makes changes in order, stopping at the first that fails.
pub fn make_changes(host: &Host, changes: &[Change]) -> Result<Vec<CommandRecord>, StateError> {
    let mut commands = Vec::new();
    let labels_set = LabelsSet::default();
    let mut done = 0;
    while done < changes.len() {
        done += make_next(host, None, &changes[done..], &mut commands, &labels_set)?;
    }
    Ok(commands)
}

/// Makes the first of `changes` and returns how many it made: the file
/// writes that follow one another are one batch (`Host::write_files`), made
/// durable together in a few syncs instead of two each.
pub fn make_next(
    host: &Host,
    cluster: Option<&Cluster>,
    changes: &[Change],
    commands: &mut Vec<CommandRecord>,
    labels_set: &LabelsSet,
) -> Result<usize, StateError> {
    let writes: Vec<FileWrite> = changes
        .iter()
        .map_while(|change| match change {
            Change::WriteFile {
                path,
                content,
                mode,
                ..
            } => Some(FileWrite {
                path,
                content,
                mode: *mode,
            }),
            _ => None,
        })
        .collect();
    if writes.is_empty() {
        make_change(host, cluster, &changes[0], commands, labels_set)?;
        return Ok(1);
    }
    host.write_files(&writes)?;
    Ok(writes.len())
}

pub fn make_change(
    host: &Host,
    cluster: Option<&Cluster>,
    change: &Change,
    commands: &mut Vec<CommandRecord>,
    labels_set: &LabelsSet,
) -> Result<(), StateError> {
    match change {
        Change::Run { argv, display } => {
            let record = host.run(argv)?;
            let ok = record.success();
            let summary = record.failure_summary();
            commands.push(record);
            if ok {
                Ok(())
            } else {
                Err(StateError::operator(format!("`{display}` {summary}")))
            }
        }
        Change::WriteFile {
            path,
            content,
            mode,
            ..
        } => Ok(host.write_atomic(path, content, *mode).map(drop)?),
        Change::RemoveFile { path, .. } => Ok(host.remove(path)?),
        Change::SignalSocketOwner {
            socket,
            timeout_seconds,
        } => {
            let path = host.resolve(socket)?;
            socket::signal_and_wait(&path, Duration::from_secs(*timeout_seconds))
                .map_err(StateError::operator)
        }
        Change::WaitSocket {
            socket,
            timeout_seconds,
        } => {
            let path = host.resolve(socket)?;
            socket::wait_for_socket(&path, Duration::from_secs(*timeout_seconds), None)
                .map_err(StateError::operator)
        }
        Change::Unpack {
            archive,
            into,
            record,
            ..
        } => crate::download::unpack::unpack(host, archive, into, record)
            .map_err(StateError::operator),
        Change::ApplyConfigMap {
            namespace,
            name,
            data,
            ..
        } => {
            let cluster =
                cluster.ok_or_else(|| StateError::operator("a ConfigMap needs an API server"))?;
            let labels = BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())]);
            cluster
                .apply_config_map(namespace, name, &labels, data)
                .map_err(|e| StateError::operator(error_chain(&e)))
        }
        Change::Fetch {
            artifact,
            timeout_seconds,
            executable,
            ..
        } => crate::download::fetch(
            host,
            artifact,
            Duration::from_secs(*timeout_seconds),
            *executable,
        )
        .map(|_| ())
        .map_err(|e| StateError::operator(error_chain(&e))),
        Change::Own(change) => change.make(&mut MakeContext {
            host,
            cluster,
            commands,
            labels_set,
        }),
    }
}
