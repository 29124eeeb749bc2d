//! `gpuprov run`: the DaemonSet mode. Converges, then converges again when
//! the node's labels change (a watch on its own Node), when the config file
//! changes, and on a drift interval (another tool rewrote containerd's
//! config: the runtime is put back, and containerd restarts only because the
//! file changed). Failures back off exponentially with jitter. Serves
//! `/healthz`, `/readyz` and `/metrics` (`server`). SIGTERM or SIGINT lets
//! the change in progress finish, then exits 0 (see `interrupt`).

mod config_watch;
mod server;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use crate::converge::{Inputs, NodeOptions, apply};
use crate::state::error_chain;
use crate::{Error, exit};

const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why the loop converges again.
#[derive(Debug)]
enum Trigger {
    NodeLabels(BTreeMap<String, String>),
    ConfigChanged,
    /// The driver reported a critical GPU error.
    GpuError,
    /// The kubelet registered the DRA plugin (again): it may have deleted
    /// the node's slices meanwhile.
    PluginRegistered,
}

/// What `gpuprov run` is given (its flags, converted).
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub node: NodeOptions,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: std::net::SocketAddr,
    /// How often a converged node is looked at again.
    pub drift_interval: Duration,
    /// How soon a node waiting on an operand is looked at again.
    pub pending_interval: Duration,
    /// How often a driver waiting for an upgrade slot looks for one.
    pub slot_wait_interval: Duration,
    /// How long one watch of the Node lasts before it is renewed.
    pub watch_timeout: Duration,
    pub lock_timeout: Duration,
}

pub fn run(args: &DaemonOptions) -> Result<i32, Error> {
    let node_args = &args.node;
    let mut inputs = Inputs::load(node_args)?;
    let Some(cluster) = &inputs.cluster else {
        return Err(Error::NeedsApiServer);
    };
    let requests = cluster.requests.clone();
    crate::interrupt::install();

    let metrics = Arc::new(server::Metrics::new(&requests));
    metrics.set_exporter(exporter(&inputs));
    let listener = TcpListener::bind(args.listen).map_err(|source| Error::Listen {
        addr: args.listen,
        source,
    })?;
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /healthz, /readyz, /metrics");
    server::spawn(listener, metrics.clone()).map_err(|source| Error::Listen {
        addr: args.listen,
        source,
    })?;

    let (triggers, events) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let node_watch = {
        let triggers = triggers.clone();
        cluster.watch(args.watch_timeout, stop.clone(), move |labels| {
            let _ = triggers.send(Trigger::NodeLabels(labels));
        })
    };
    // The spec read at start decides; a config change that turns XIDs on
    // or off takes effect at the next start.
    // A burst of errors is one converge: the trigger is sent only when
    // none is waiting, and the loop takes it back just before converging,
    // so errors during a converge make one more, not one each.
    let gpu_error_waiting = Arc::new(AtomicBool::new(false));
    let _gpu_errors = inputs.spec.health.xids.then(|| {
        let triggers = triggers.clone();
        let waiting = gpu_error_waiting.clone();
        crate::gpu::xid::watch(
            inputs.host.clone(),
            inputs.nvml_lib.clone(),
            inputs.spec.health.ignored_xids.clone(),
            stop.clone(),
            move || {
                if !waiting.swap(true, Ordering::SeqCst) {
                    let _ = triggers.send(Trigger::GpuError);
                }
            },
        )
    });
    let registered: Arc<dyn Fn() + Send + Sync> = {
        let triggers = triggers.clone();
        Arc::new(move || {
            let _ = triggers.send(Trigger::PluginRegistered);
        })
    };
    let _config_watch = node_args.config.as_deref().map(|config| {
        config_watch::watch(config, move || {
            let _ = triggers.send(Trigger::ConfigChanged);
        })
    });
    let mut dra = DraPlugin::default();

    let mut backoff = Duration::from_secs(1);
    let mut foreign: Option<BTreeMap<String, String>> = None;
    let mut last_labels: BTreeMap<String, String> = BTreeMap::new();
    while !crate::interrupt::requested() {
        dra.keep(&inputs, &registered);
        let started = Instant::now();
        let result = apply(&inputs, args.lock_timeout);
        let elapsed = started.elapsed();
        let next = match &result {
            Ok(report) if report.converged => {
                backoff = Duration::from_secs(1);
                args.drift_interval
            }
            // Waiting on an operand is progress, not failure: look again soon.
            Ok(report) if report.only_waiting() => {
                backoff = Duration::from_secs(1);
                args.pending_interval
            }
            _ => {
                let wait = with_jitter(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        // A step that asked to be looked at again by a time (a GPU
        // degraded by a recent error, once it may have recovered) is, not
        // only when the backoff says.
        let next = match result.as_ref().ok().and_then(|r| r.look_again_after()) {
            Some(after) => next.min(after),
            None => next,
        };
        // A step waiting for a slot another node holds (a driver's rolling
        // upgrade) looks again for a free one (converged otherwise: the old
        // driver works meanwhile).
        let next = match &result {
            Ok(report) if report.waits_for_shared_slot() => {
                next.min(with_jitter(args.slot_wait_interval))
            }
            _ => next,
        };
        if let Ok(report) = &result {
            last_labels = report.labels.clone();
        }
        metrics.record(&result, elapsed);
        match &result {
            Ok(report) => tracing::info!(
                converged = report.converged,
                elapsed_ms = elapsed.as_millis() as u64,
                "converge done; next in {next:?} unless something changes"
            ),
            Err(e) => tracing::error!("converge failed: {}; next try in {next:?}", error_chain(e)),
        }

        // Wait for a reason to converge again.
        let due = Instant::now() + next;
        loop {
            if crate::interrupt::requested() {
                break;
            }
            match events.recv_timeout(Duration::from_millis(200)) {
                Ok(Trigger::NodeLabels(labels)) => {
                    // gpuprov's own label writes come back through the watch;
                    // only someone else's change is a reason to converge.
                    let theirs: BTreeMap<String, String> = labels
                        .into_iter()
                        .filter(|(k, _)| !last_labels.contains_key(k))
                        .collect();
                    if foreign.as_ref() != Some(&theirs) {
                        let first = foreign.is_none();
                        foreign = Some(theirs);
                        if !first {
                            tracing::info!("the node's labels changed");
                            break;
                        }
                    }
                }
                Ok(Trigger::PluginRegistered) => {
                    if let Some(cluster) = &inputs.cluster {
                        cluster.forget_resource_slices();
                    }
                    break;
                }
                Ok(Trigger::GpuError) => {
                    gpu_error_waiting.store(false, Ordering::SeqCst);
                    tracing::info!("a GPU reported a critical error");
                    break;
                }
                Ok(Trigger::ConfigChanged) => match Inputs::load(node_args) {
                    Ok(mut reloaded) => {
                        if let (Some(new), Some(old)) = (&mut reloaded.cluster, &inputs.cluster) {
                            new.keep_from(old);
                        }
                        tracing::info!("the config changed");
                        inputs = reloaded;
                        metrics.set_exporter(exporter(&inputs));
                        break;
                    }
                    Err(e) => {
                        tracing::error!("the changed config is not used: {}", error_chain(&e))
                    }
                },
                Err(RecvTimeoutError::Timeout) if Instant::now() >= due => break,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200))
                }
            }
        }
    }
    tracing::info!("stopping");
    stop.store(true, Ordering::SeqCst);
    drop(dra);
    // The watch notices `stop` within 250 ms, unless it is inside a request
    // the server never answers: shutdown does not wait for that one.
    let waited = Instant::now();
    while !node_watch.is_finished() && waited.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(exit::OK)
}

/// The DRA kubelet plugin, while the spec asks for it
/// (`devicePlugin.mode: dra`).
#[derive(Default)]
struct DraPlugin {
    running: Option<(crate::dra::plugin::Plugin, String)>,
    /// Why it could not start, said once.
    problem: Option<String>,
}

impl DraPlugin {
    /// Starts, stops or updates the plugin for the spec in force; one that
    /// cannot start is tried again before the next converge (the
    /// `device-plugin` state says it is not served meanwhile).
    fn keep(&mut self, inputs: &Inputs, registered: &Arc<dyn Fn() + Send + Sync>) {
        let spec = &inputs.spec;
        if spec.device_plugin_mode != crate::spec::PluginMode::Dra {
            if self.running.take().is_some() {
                tracing::info!("the DRA kubelet plugin stops: devicePlugin.mode is not dra");
            }
            return;
        }
        match &self.running {
            Some((plugin, dir)) if *dir == spec.kubelet_dir => {
                plugin.set_spec(spec);
                return;
            }
            Some(_) => self.running = None,
            None => {}
        }
        let Some(cluster) = &inputs.cluster else {
            return;
        };
        let registered = registered.clone();
        match crate::dra::plugin::Plugin::start(&inputs.host, spec, cluster, move || registered()) {
            Ok(plugin) => {
                self.running = Some((plugin, spec.kubelet_dir.clone()));
                self.problem = None;
            }
            Err(problem) => {
                if self.problem.as_ref() != Some(&problem) {
                    tracing::error!("the DRA kubelet plugin cannot start: {problem}");
                    self.problem = Some(problem);
                }
            }
        }
    }
}

/// The built-in DCGM exporter when the spec asks for it; its series are
/// labelled with the node's name, as dcgm-exporter's pod labels them.
fn exporter(inputs: &Inputs) -> Option<crate::telemetry::Exporter> {
    if inputs.spec.dcgm_exporter_mode != crate::spec::ExporterMode::Builtin {
        return None;
    }
    let node = inputs
        .cluster
        .as_ref()
        .map(|c| c.node.clone())
        .unwrap_or_default();
    Some(crate::telemetry::Exporter::new(
        inputs.host.clone(),
        inputs.nvml_lib.clone(),
        node,
        inputs.spec.dcgm_exporter_interval.map(Duration::from_secs),
    ))
}

/// Up to a fifth more than `base`, so that a fleet does not retry in step.
fn with_jitter(base: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    base + base.mul_f64(f64::from(nanos % 1000) / 5000.0)
}
