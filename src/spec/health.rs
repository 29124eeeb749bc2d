//! `health`: how GPU errors the driver reports (XIDs, double-bit ECC) make
//! `gpu-health` `degraded`, and when a GPU counts as healthy again.

use super::*;

/// The XIDs the device plugin ignores by default: errors of an
/// application, not of the GPU (13 graphics engine exception, 31 memory
/// page fault, 43 a channel stopped, 45 preemptive cleanup, 68 video
/// processor exception, 109 context switch timeout).
pub const DEFAULT_IGNORED_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawHealth {
    xids: Option<bool>,
    ignored_xids: Option<Vec<u64>>,
    recover_after_seconds: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthSpec {
    /// Whether `gpuprov run` watches the driver's error events.
    pub xids: bool,
    /// Errors that say nothing of the GPU's health: the defaults, and the
    /// spec's own.
    pub ignored_xids: Vec<u64>,
    /// A GPU is healthy again once this long has passed without a new
    /// critical error (and NVML and the PCI bus still see it).
    pub recover_after_seconds: u64,
}

pub(super) fn resolve_health(
    raw: &RawHealth,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> HealthSpec {
    let mut ignored_xids = DEFAULT_IGNORED_XIDS.to_vec();
    for xid in raw.ignored_xids.iter().flatten() {
        if !ignored_xids.contains(xid) {
            ignored_xids.push(*xid);
        }
    }
    HealthSpec {
        xids: raw.xids.unwrap_or(true),
        ignored_xids,
        recover_after_seconds: seconds(
            &raw.recover_after_seconds,
            "health.recoverAfterSeconds",
            300,
            source,
            errors,
        ),
    }
}
