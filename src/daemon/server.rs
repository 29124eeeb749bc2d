//! The health and metrics server of `gpuprov run`: `/healthz`, `/readyz`
//! and `/metrics`, routed by axum and served by hyper, the metrics in the OpenMetrics text
//! format through `prometheus-client`. It runs on its own thread and
//! runtime, so a slow scrape never delays a converge.

use std::net::TcpListener;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::kube::RequestCounts;
use crate::report::RunReport;
use crate::state::Outcome;

/// Upper bounds of the converge-duration histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateOutcome {
    state: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConvergeResult {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

/// GPU fault remediation, from the `gpu-remediation` step's details: the
/// totals its record keeps on the node (they survive restarts, so they
/// are gauges), the stage, whether a slot is held.
struct Remediation {
    faults: Family<FaultClassLabel, Gauge>,
    actions: Family<ActionLabel, Gauge>,
    storms: Gauge,
    slot_held: Gauge,
    stage: Family<StageLabel, Gauge>,
}

impl Remediation {
    fn register(registry: &mut Registry) -> Remediation {
        let remediation = Remediation {
            faults: Family::default(),
            actions: Family::default(),
            storms: Gauge::default(),
            slot_held: Gauge::default(),
            stage: Family::default(),
        };
        registry.register(
            "gpuprov_remediation_faults_seen",
            "GPU faults seen on this node, by class (kept in its remediation record)",
            remediation.faults.clone(),
        );
        registry.register(
            "gpuprov_remediation_actions_taken",
            "Remediation actions taken on this node (taint, draining, resetting, rebooting)",
            remediation.actions.clone(),
        );
        registry.register(
            "gpuprov_remediation_storms_seen",
            "GPU fault storms that stopped this node's remediation",
            remediation.storms.clone(),
        );
        registry.register(
            "gpuprov_remediation_slot_held",
            "Whether this node holds a remediation slot",
            remediation.slot_held.clone(),
        );
        registry.register(
            "gpuprov_remediation_stage",
            "The node's remediation stage (1 for the current one)",
            remediation.stage.clone(),
        );
        remediation
    }

    fn record(&self, report: &RunReport) {
        let Some(step) = report
            .steps
            .iter()
            .find(|s| s.capability.name() == "gpu-remediation")
        else {
            return;
        };
        let details = &step.details;
        let counts = |key: &str| -> Vec<(String, i64)> {
            details[key]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                .collect()
        };
        for (class, n) in counts("faultsSeen") {
            self.faults.get_or_create(&FaultClassLabel { class }).set(n);
        }
        for (action, n) in counts("actionsTaken") {
            self.actions.get_or_create(&ActionLabel { action }).set(n);
        }
        self.storms.set(details["stormsSeen"].as_i64().unwrap_or(0));
        self.slot_held
            .set(i64::from(details["slotHeld"].as_bool().unwrap_or(false)));
        if let Some(stage) = details["stage"].as_str() {
            self.stage.clear();
            self.stage
                .get_or_create(&StageLabel {
                    stage: stage.to_string(),
                })
                .set(1);
        }
    }
}

/// What `/readyz` and `/metrics` report, updated after every converge.
pub struct Metrics {
    registry: Mutex<Registry>,
    outcomes: Family<StateOutcome, Gauge>,
    converged: Gauge,
    ready: Gauge,
    /// `/readyz`'s body: why it is (not) ready.
    readiness: Mutex<String>,
    converges: Family<ConvergeResult, Counter>,
    duration: Histogram,
    /// Registered at the first success: before it there is no such time.
    last_success: Mutex<Option<Gauge<f64, AtomicU64>>>,
    /// `dcgmExporter.mode: builtin`: the GPUs' metrics, sampled per scrape.
    /// The outer lock is only held to swap or clone the exporter, never
    /// while it samples, so the converge loop never waits on a scrape.
    exporter: Mutex<Option<Arc<Mutex<crate::telemetry::Exporter>>>>,
    /// The GPUs' series as last rendered: what a scrape serves while
    /// another is sampling (a silent kubelet holds one for its timeout).
    last_gpu_series: Mutex<String>,
    node_status: NodeStatus,
    remediation: Remediation,
}

/// The GPU Operator's node-status-exporter metrics, with its names and
/// help texts, derived from gpuprov's states, so its alerts work.
struct NodeStatus {
    driver_ready: Gauge,
    toolkit_ready: Gauge,
    plugin_ready: Gauge,
    cuda_ready: Gauge,
    driver_validation: Gauge,
    driver_validation_last_success: Gauge,
    plugin_devices: Gauge,
    plugin_validation_last_success: Gauge,
}

impl NodeStatus {
    fn register(registry: &mut Registry) -> NodeStatus {
        let mut gauge = |name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let started = gauge(
            "gpu_operator_node_metrics_ready_ts_seconds",
            "timestamp (in seconds) of the launch time of the GPU Operator node metrics Pod",
        );
        started.set(now_seconds());
        NodeStatus {
            driver_ready: gauge(
                "gpu_operator_node_driver_ready",
                "1 if the driver synchronization barrier of the the local node is open, 0 otherwise",
            ),
            toolkit_ready: gauge(
                "gpu_operator_node_toolkit_ready",
                "1 if the container-toolkit synchronization barrier on the local node is open, 0 otherwise",
            ),
            plugin_ready: gauge(
                "gpu_operator_node_plugin_ready",
                "1 if the device plugin synchronization barrier on the local is open, 0 otherwise",
            ),
            cuda_ready: gauge(
                "gpu_operator_node_cuda_ready",
                "1 if cuda synchronization barrier on the local node is open, 0 otherwise",
            ),
            driver_validation: gauge(
                "gpu_operator_node_driver_validation",
                "1 if the driver validation test passed on the local node, 0 otherwise",
            ),
            driver_validation_last_success: gauge(
                "gpu_operator_node_driver_validation_last_success_ts_seconds",
                "timestamp (in seconds) of the last successful driver test validation",
            ),
            plugin_devices: gauge(
                "gpu_operator_node_device_plugin_devices_total",
                "number of GPU devices exposed by the DevicePlugin on the local node. -1 if failing to inspect the node spec.",
            ),
            plugin_validation_last_success: gauge(
                "gpu_operator_node_device_plugin_validation_last_success_ts_seconds",
                "timestamp (in seconds) of the last time GPU devices were found on the local node spec",
            ),
        }
    }

    /// From a converge's states, found by the capability that ran them
    /// (the GPU Operator's metrics name what they do, whatever a states
    /// directory calls them): the driver is loaded or installed, the
    /// toolkit and containerd's runtime are in place, the device plugin is
    /// ready, the CUDA validation passed; NVML answering is the driver's
    /// validation.
    fn record(&self, report: &RunReport) {
        let step = |capability: &str| {
            report
                .steps
                .iter()
                .find(|s| s.capability.name() == capability)
        };
        let fine = |name: &str| step(name).is_some_and(|s| s.outcome.lets_dependents_run());
        let ready = |name: &str| step(name).is_some_and(|s| s.outcome == Outcome::Ready);
        self.driver_ready.set(i64::from(fine("driver")));
        self.toolkit_ready.set(i64::from(
            fine("container-toolkit") && fine("containerd-runtime"),
        ));
        self.plugin_ready.set(i64::from(ready("device-plugin")));
        self.cuda_ready.set(i64::from(ready("validator")));
        let validated = ready("gpu-health");
        self.driver_validation.set(i64::from(validated));
        if validated {
            self.driver_validation_last_success.set(now_seconds());
        }
        let devices = step("device-plugin")
            .and_then(|s| s.details["devices"].as_i64())
            .unwrap_or(-1);
        self.plugin_devices.set(devices);
        if devices > 0 {
            self.plugin_validation_last_success.set(now_seconds());
        }
    }
}

fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

impl Metrics {
    pub fn new(requests: &RequestCounts) -> Metrics {
        let mut registry = Registry::default();
        let outcomes = Family::<StateOutcome, Gauge>::default();
        registry.register(
            "gpuprov_state_outcome",
            "The outcome of each state in the last converge",
            outcomes.clone(),
        );
        let converged = Gauge::default();
        registry.register(
            "gpuprov_converged",
            "Whether the last converge left the node converged",
            converged.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "gpuprov_ready",
            "Whether /readyz answers ready: converged, or waiting only on optional states",
            ready.clone(),
        );
        let converges = Family::<ConvergeResult, Counter>::default();
        registry.register(
            "gpuprov_converges",
            "Converges by result",
            converges.clone(),
        );
        let duration = Histogram::new(BUCKETS.iter().copied());
        registry.register(
            "gpuprov_converge_duration_seconds",
            "How long a converge took",
            duration.clone(),
        );
        registry.register(
            "gpuprov_api_requests",
            "API server requests by verb and status code (0: no answer)",
            requests.clone(),
        );
        let node_status = NodeStatus::register(&mut registry);
        let remediation = Remediation::register(&mut registry);
        Metrics {
            registry: Mutex::new(registry),
            outcomes,
            converged,
            ready,
            readiness: Mutex::new("not ready\nthe first converge has not finished\n".into()),
            converges,
            duration,
            last_success: Mutex::new(None),
            exporter: Mutex::new(None),
            last_gpu_series: Mutex::new(String::new()),
            node_status,
            remediation,
        }
    }

    /// Serves the DCGM exporter's metrics from now on, or stops (`None`).
    pub fn set_exporter(&self, exporter: Option<crate::telemetry::Exporter>) {
        *self.exporter.lock().expect("not poisoned") = exporter.map(|e| Arc::new(Mutex::new(e)));
        self.last_gpu_series.lock().expect("not poisoned").clear();
    }

    /// Records one converge's result.
    pub fn record(&self, result: &Result<RunReport, crate::Error>, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let converged = matches!(result, Ok(report) if report.converged);
        let (ready, body) = match result {
            Ok(report) => {
                let readiness = crate::report::Readiness::of(&report.steps);
                (readiness.ready, readiness.body())
            }
            Err(e) => (
                false,
                format!(
                    "not ready\nthe converge failed: {}\n",
                    crate::state::error_chain(e)
                ),
            ),
        };
        self.ready.set(i64::from(ready));
        *self.readiness.lock().expect("not poisoned") = body;
        if let Ok(report) = result {
            self.node_status.record(report);
            self.remediation.record(report);
            // Only this converge's outcomes: a state's old one goes.
            self.outcomes.clear();
            for step in &report.steps {
                let labels = StateOutcome {
                    state: step.name.clone(),
                    outcome: step.outcome.as_str().to_string(),
                };
                self.outcomes.get_or_create(&labels).set(1);
            }
        }
        if converged {
            self.succeeded();
        }
        self.converged.set(i64::from(converged));
        let kind = match result {
            Ok(_) if converged => "converged",
            Ok(_) => "not_converged",
            Err(_) => "error",
        };
        let result = ConvergeResult {
            result: kind.to_string(),
        };
        self.converges.get_or_create(&result).inc();
    }

    fn succeeded(&self) {
        let seconds = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut last = self.last_success.lock().expect("not poisoned");
        let gauge = last.get_or_insert_with(|| {
            let gauge = Gauge::<f64, AtomicU64>::default();
            self.registry.lock().expect("not poisoned").register(
                "gpuprov_last_success_timestamp_seconds",
                "When the node was last converged",
                gauge.clone(),
            );
            gauge
        });
        gauge.set(seconds);
    }

    /// Prometheus' text format (0.0.4): gpuprov's own metrics, then the
    /// GPUs' when the built-in exporter is on.
    fn encode(&self) -> String {
        let mut openmetrics = String::new();
        {
            let registry = self.registry.lock().expect("not poisoned");
            prometheus_client::encoding::text::encode(&mut openmetrics, &registry)
                .expect("writing to a String cannot fail");
        }
        let mut out = text_format(&openmetrics);
        out.push_str(&self.gpu_series());
        out
    }

    /// The GPUs' series: sampled now, or, while another scrape is
    /// sampling, the last ones (so no scrape queues behind another, and
    /// each waits on the kubelet at most once).
    fn gpu_series(&self) -> String {
        let Some(exporter) = self.exporter.lock().expect("not poisoned").clone() else {
            return String::new();
        };
        let Ok(mut exporter) = exporter.try_lock() else {
            return self.last_gpu_series.lock().expect("not poisoned").clone();
        };
        let mut series = String::new();
        exporter.render(&mut series);
        drop(exporter);
        series.clone_into(&mut self.last_gpu_series.lock().expect("not poisoned"));
        series
    }
}

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection may last, its answer read: a client that never
/// reads its answer does not hold it (nor its memory) longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections served at once; more wait in the listen backlog.
/// Prometheus and the kubelet's probes need a few.
const MAX_CONNECTIONS: usize = 32;

/// Serves on `listener` from a thread of its own until the process ends.
/// One response per connection, as the kubelet's probes ask; a client
/// that does not send its request within `HEADER_READ_TIMEOUT`, or whose
/// connection outlasts `CONNECTION_TIMEOUT` (an answer it never reads), is
/// dropped, and at most `MAX_CONNECTIONS` are served at once: no
/// connection is held open, whoever connects.
pub fn spawn(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    crate::background::spawn("the health and metrics server", move || async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => return tracing::error!("the health and metrics server stopped: {e}"),
        };
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(exposition))
            .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
            .with_state(metrics);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!("the health and metrics server cannot accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                drop(slot);
            });
        }
    });
    Ok(())
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    let status = if metrics.ready.get() == 1 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        metrics.readiness.lock().expect("not poisoned").clone(),
    )
}

async fn exposition(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    // Sampling NVML blocks: off the runtime's async threads.
    let body = tokio::task::spawn_blocking(move || metrics.encode())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// prometheus-client's OpenMetrics as Prometheus' text format, which is
/// what dcgm-exporter serves and what lets its counters keep their names:
/// no `# EOF`, no `# UNIT`, and a counter's `# HELP`/`# TYPE` named like
/// its samples (`gpuprov_converges_total`).
fn text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let lines: Vec<&str> = openmetrics.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let counter_named = |text: &str| {
            text.strip_prefix("# TYPE ")
                .and_then(|rest| rest.strip_suffix(" counter"))
                .map(str::to_string)
        };
        let renamed = if let Some(name) = counter_named(line) {
            Some(format!("# TYPE {name}_total counter"))
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            let next_is_counter = lines
                .get(i + 1)
                .and_then(|next| counter_named(next))
                .is_some_and(|counter| counter == name);
            next_is_counter.then(|| format!("# HELP {name}_total{}", &rest[name.len()..]))
        } else {
            None
        };
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let openmetrics = "# HELP a_runs Runs.\n# TYPE a_runs counter\na_runs_total{r=\"x\"} 2\n# HELP b Ready.\n# TYPE b gauge\nb 1\n# EOF\n";
        assert_eq!(
            text_format(openmetrics),
            "# HELP a_runs_total Runs.\n# TYPE a_runs_total counter\na_runs_total{r=\"x\"} 2\n# HELP b Ready.\n# TYPE b gauge\nb 1\n"
        );
    }
}
