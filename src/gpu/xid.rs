//! The driver's GPU error events: `gpuprov run` waits on an NVML event set
//! for critical XIDs and double-bit ECC errors, and keeps the recent ones
//! in a file of its own (`/run/gpuprov/gpu-errors.json`, gone at reboot);
//! `gpu-health` reads it, so a GPU with a recent critical error is
//! `degraded` until `health.recoverAfterSeconds` have passed without a
//! new one, and is `ready` again after.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use serde::{Deserialize, Serialize};

use crate::host::Host;

/// The recent errors, a host path gpuprov owns.
pub const ERRORS_FILE: &str = "/run/gpuprov/gpu-errors.json";
/// At most this many are kept: the newest.
const KEPT: usize = 64;
/// How often the watch tries again when the events cannot be read yet.
const RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// The record is written at most this often: a burst of errors (a GPU
/// falling apart reports thousands) is one write a second, not one each.
const WRITE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One error the driver reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuError {
    pub gpu: u32,
    pub uuid: String,
    /// The XID; 48 for a double-bit ECC error event (the XID the driver
    /// logs for one).
    pub xid: u64,
    /// Seconds since the epoch.
    pub at: u64,
}

/// What NVIDIA's XID catalog says an XID means, for the ones a node sees;
/// others are named by number alone.
pub fn meaning(xid: u64) -> &'static str {
    match xid {
        13 => "graphics engine exception",
        31 => "GPU memory page fault",
        32 => "invalid or corrupted push buffer stream",
        43 => "GPU stopped processing",
        45 => "preemptive cleanup, due to a previous error",
        48 => "double-bit ECC error",
        61 => "internal micro-controller breakpoint or warning",
        62 => "internal micro-controller halt",
        63 => "ECC page retirement or row remapping recording event",
        64 => "ECC page retirement or row remapper recording failure",
        68 => "video processor exception",
        69 => "graphics engine class error",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        109 => "context switch timeout",
        119 => "GSP RPC timeout",
        120 => "GSP error",
        121 => "C2C link corrected error",
        140 => "unrecovered ECC error",
        _ => "see NVIDIA's XID catalog",
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The errors recorded so far; an unreadable or malformed file is none
/// (it is gpuprov's own, rewritten whole at the next error).
pub fn recorded(host: &Host) -> Vec<GpuError> {
    host.read(ERRORS_FILE)
        .ok()
        .flatten()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// Adds `new` to the record, in one write.
fn record(host: &Host, new: &mut Vec<GpuError>) -> Result<(), String> {
    let mut errors = recorded(host);
    errors.append(new);
    let drop = errors.len().saturating_sub(KEPT);
    errors.drain(..drop);
    let text = serde_json::to_vec_pretty(&errors).map_err(|e| e.to_string())?;
    host.make_dirs("/run/gpuprov")
        .and_then(|()| host.write_atomic(ERRORS_FILE, &text, 0o644).map(|_| ()))
        .map_err(|e| crate::error_chain::error_chain(&e))
}

/// The critical errors of the last `recover_after` seconds, newest last.
pub fn recent(host: &Host, recover_after: u64) -> Vec<GpuError> {
    let since = now().saturating_sub(recover_after);
    recorded(host)
        .into_iter()
        .filter(|e| e.at >= since)
        .collect()
}

/// How long ago, for a reason.
pub fn age(error: &GpuError) -> u64 {
    now().saturating_sub(error.at)
}

/// Waits on the driver's events until `stop`, from a thread of its own:
/// each critical XID not in `ignored`, and each double-bit ECC error, is
/// recorded, then `reported` is called (the daemon converges again). No
/// library yet, a library without events or GPUs that support none: a
/// warning (once per reason), health is what NVML and the PCI bus say, and
/// the watch tries again every 30 s.
pub fn watch(
    host: Host,
    library: Option<PathBuf>,
    ignored: Vec<u64>,
    stop: Arc<AtomicBool>,
    reported: impl Fn() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // The driver may come after `gpuprov run` starts (a fresh node
        // installing it): until the events can be read, try again.
        let mut said = String::new();
        while !stop.load(Ordering::Relaxed) {
            let watched = super::nvml::find_library(&host, library.as_deref())
                .map_err(|problem| problem.to_string())
                .and_then(|found| wait_for_errors(&host, &found, &ignored, &stop, &reported));
            if let Err(why) = watched {
                if why != said {
                    tracing::warn!("no GPU error events yet: {why}; trying again every {RETRY:?}");
                    said = why;
                }
                let until = std::time::Instant::now() + RETRY;
                while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
            }
        }
    })
}

fn wait_for_errors(
    host: &Host,
    library: &Path,
    ignored: &[u64],
    stop: &AtomicBool,
    reported: &impl Fn(),
) -> Result<(), String> {
    let nvml = super::nvml::open(library).map_err(|p| p.to_string())?;
    let watched = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
    let mut set = nvml.create_event_set().map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut uuids = Vec::new();
    for index in 0..count {
        let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        uuids.push(device.uuid().unwrap_or_default());
        let supported = device
            .supported_event_types()
            .unwrap_or(EventTypes::empty());
        let wanted = supported & watched;
        if wanted.is_empty() {
            continue;
        }
        set = device
            .register_events(wanted, set)
            .map_err(|e| format!("GPU {index}: {}", e.error))?;
    }
    // Errors not yet written, and when the record was last written.
    let mut pending: Vec<GpuError> = Vec::new();
    let mut written = std::time::Instant::now() - WRITE_EVERY;
    let flush = |pending: &mut Vec<GpuError>, written: &mut std::time::Instant| {
        if pending.is_empty() {
            return Ok(());
        }
        record(host, pending)?;
        *written = std::time::Instant::now();
        reported();
        Ok::<(), String>(())
    };
    while !stop.load(Ordering::Relaxed) {
        if written.elapsed() >= WRITE_EVERY {
            flush(&mut pending, &mut written)?;
        }
        let event = match set.wait(if pending.is_empty() { 500 } else { 100 }) {
            Ok(event) => event,
            Err(NvmlError::Timeout) => continue,
            Err(e) => return Err(format!("waiting for events: {e}")),
        };
        let xid = if event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            match event.event_data {
                Some(XidError::Value(xid)) => xid,
                // The driver could not say which: counted as critical.
                Some(XidError::Unknown) | None => 999,
            }
        } else {
            48
        };
        if ignored.contains(&xid) {
            continue;
        }
        let gpu = event.device.index().unwrap_or(u32::MAX);
        let uuid = uuids.get(gpu as usize).cloned().unwrap_or_default();
        tracing::warn!(gpu, xid, "GPU error: XID {xid} ({})", meaning(xid));
        pending.push(GpuError {
            gpu,
            uuid,
            xid,
            at: now(),
        });
        // The record keeps the newest `KEPT`: more waiting is never kept.
        let drop = pending.len().saturating_sub(KEPT);
        pending.drain(..drop);
    }
    flush(&mut pending, &mut written)
}
