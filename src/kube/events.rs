//! Node events for the steps an `apply` changed or that failed: reason
//! `Converged` for a change in a run that converged, `Changed` for one in a
//! run that did not, `Failed` (a warning) for a failure, and `Waiting` for
//! an optional state that waits on something outside gpuprov (which does
//! not hold `/readyz`, so the event says what is missing).
//!
//! Deduplicated across runs: the last event posted for each step is kept in
//! `/var/lib/gpuprov/events.json`, and the same event is not posted again
//! (a step failing the same way every five minutes posts once). The file is
//! written only when it changes, so a converged run writes nothing.

use std::collections::BTreeMap;

use super::{Cluster, KubeError};
use crate::host::Host;
use crate::report::{Action, StateReport};

pub const POSTED: &str = "/var/lib/gpuprov/events.json";

/// How a posted `Waiting` event is remembered in `POSTED`.
const WAITING: &str = "waiting: ";

/// Posts an event for each changed or failed step not already posted.
pub fn publish(cluster: &Cluster, host: &Host, steps: &[StateReport]) -> Result<(), crate::Error> {
    // `Converged` only when the whole run converged: a step that changed on
    // a node still waiting or failing elsewhere says `Changed`.
    let converged = crate::report::is_converged(steps);
    let mut posted: BTreeMap<String, String> = host
        .read(POSTED)?
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let before = posted.clone();
    for step in steps {
        let (warning, reason) = match step.action {
            Action::Change if converged => (false, "Converged"),
            Action::Change => (false, "Changed"),
            Action::Fail => (true, "Failed"),
            Action::Wait if step.optional => (false, "Waiting"),
            _ => {
                posted.remove(&step.name);
                continue;
            }
        };
        let mut note = format!("{}: {} ({})", step.name, step.reason, step.outcome.as_str());
        let last = posted.get(&step.name);
        // A change is news every time; a failure is posted once for as long
        // as it stays the same; a wait once for as long as it lasts (its
        // reason moves on from "starting" to what the pod lacks, and
        // `/readyz` has the latest).
        let already = match reason {
            "Failed" => last == Some(&note),
            "Waiting" => last.is_some_and(|l| l.starts_with(WAITING)),
            _ => false,
        };
        if already {
            continue;
        }
        if reason == "Waiting" {
            note.push_str("; optional, so gpuprov is ready without it");
        }
        let action = format!("Converge{}", pascal(&step.name));
        cluster
            .post_event(
                warning,
                reason,
                &action,
                &crate::printable::printable(&note, false),
            )
            .map_err(|e: KubeError| crate::Error::Kube(e))?;
        let remembered = if reason == "Waiting" {
            format!("{WAITING}{note}")
        } else {
            note
        };
        posted.insert(step.name.clone(), remembered);
    }
    if posted != before {
        let json = serde_json::to_string_pretty(&posted).expect("serializes") + "\n";
        host.write_atomic(POSTED, json.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// `containerd-runtime` → `ContainerdRuntime`.
fn pascal(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut chars = w.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}
