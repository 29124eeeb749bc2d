//! GPU telemetry with the DCGM exporter's names (`dcgmExporter.mode:
//! builtin`): `gpuprov run` samples NVML and serves dcgm-exporter's
//! default fields, as far as NVML gives them, on its own metrics port,
//! instead of a DCGM exporter pod.
//!
//! `fields.rs` is the field table, `sample.rs` the NVML pass, `render.rs`
//! the exposition; this file is the exporter `gpuprov run` holds and the
//! `dcgm-exporter` state in builtin mode.

pub mod fields;
pub mod pods;
pub mod render;
pub mod sample;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sample::{Sample, Sampler};

use crate::host::Host;
use crate::operands::{self, Operand};
use crate::state::{Observation, Outcome, StateContext, StateError};

/// The exporter `gpuprov run` holds: NVML opened at the first scrape
/// (the driver may come later), one NVML pass per scrape, or per
/// `interval` when one is set, into buffers reused every time.
pub struct Exporter {
    host: Host,
    /// `--nvml-lib`; else the host's own library, looked up when opened.
    library: Option<PathBuf>,
    hostname: String,
    interval: Option<Duration>,
    sampler: Option<Sampler>,
    sample: Sample,
    sampled: Option<Instant>,
    /// Why NVML cannot be read, said once.
    problem: Option<String>,
    /// Each GPU's container, from the kubelet's pod resources.
    users: std::collections::BTreeMap<String, pods::User>,
    /// Why the kubelet's pod resources cannot be read, said once.
    pods_problem: Option<String>,
}

impl Exporter {
    pub fn new(
        host: Host,
        library: Option<PathBuf>,
        hostname: String,
        interval: Option<Duration>,
    ) -> Exporter {
        Exporter {
            host,
            library,
            hostname,
            interval,
            sampler: None,
            sample: Sample::default(),
            sampled: None,
            problem: None,
            users: Default::default(),
            pods_problem: None,
        }
    }

    /// Appends dcgm-exporter's series to `out`, sampling first unless the
    /// last sample is younger than the interval.
    pub fn render(&mut self, out: &mut String) {
        if self.sampler.is_none() {
            let opened = crate::gpu::nvml::find_library(&self.host, self.library.as_deref())
                .and_then(|library| Sampler::open(&library));
            match opened {
                Ok(sampler) => {
                    self.sampler = Some(sampler);
                    self.problem = None;
                }
                Err(problem) => {
                    let problem = problem.to_string();
                    if self.problem.as_ref() != Some(&problem) {
                        tracing::warn!("no GPU metrics: {problem}");
                        self.problem = Some(problem);
                    }
                    return;
                }
            }
        }
        let Some(sampler) = &mut self.sampler else {
            return;
        };
        let fresh = match (self.sampled, self.interval) {
            (Some(at), Some(interval)) => at.elapsed() < interval,
            _ => false,
        };
        if !fresh {
            sampler.sample(&mut self.sample);
            // The last XID `gpuprov run` recorded for each GPU, 0 for none,
            // as DCGM reports it.
            let errors = crate::gpu::xid::recorded(&self.host);
            for (gpu, values) in sampler.gpus.iter().zip(self.sample.gpus.iter_mut()) {
                let last = errors.iter().rev().find(|e| e.gpu == gpu.index);
                values[fields::Id::XidErrors as usize] = Some(last.map_or(0, |e| e.xid) as f64);
            }
            match pods::users(&self.host) {
                Ok(users) => {
                    self.users = users;
                    self.pods_problem = None;
                }
                Err(problem) => {
                    if self.pods_problem.as_ref() != Some(&problem) {
                        tracing::warn!("GPU metrics without their pods: {problem}");
                        self.pods_problem = Some(problem);
                    }
                    self.users.clear();
                }
            }
            self.sampled = Some(Instant::now());
        }
        render::render(
            out,
            &sampler.gpus,
            &self.sample,
            &self.users,
            &self.hostname,
            &sampler.driver_version,
        );
    }
}

/// The `dcgm-exporter` state in builtin mode: no operand (its static pod
/// goes, its deploy label is not published); `gpuprov run` serves the
/// metrics.
pub fn observe_builtin(ctx: &StateContext) -> Result<Observation, StateError> {
    let withdrawn = operands::withdraw(ctx, Operand::DcgmExporter)?;
    let gpus = operands::gpu_count(ctx);
    let mut obs = Observation::new(
        Outcome::Ready,
        format!(
            "builtin: `gpuprov run` serves the DCGM exporter's metrics for {gpus} GPUs on its metrics port (/metrics)"
        ),
    );
    obs.changes = withdrawn;
    Ok(obs)
}
