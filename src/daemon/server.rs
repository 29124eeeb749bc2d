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
    exporter: Mutex<Option<crate::telemetry::Exporter>>,
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
        }
    }

    /// Serves the DCGM exporter's metrics from now on, or stops (`None`).
    pub fn set_exporter(&self, exporter: Option<crate::telemetry::Exporter>) {
        *self.exporter.lock().expect("not poisoned") = exporter;
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
                    crate::step::error_chain(e)
                ),
            ),
        };
        self.ready.set(i64::from(ready));
        *self.readiness.lock().expect("not poisoned") = body;
        if let Ok(report) = result {
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
        if let Some(exporter) = self.exporter.lock().expect("not poisoned").as_mut() {
            exporter.render(&mut out);
        }
        out
    }
}

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves on `listener` from a thread of its own until the process ends.
/// One response per connection, as the kubelet's probes ask, and a client
/// that does not send its request within `HEADER_READ_TIMEOUT` is
/// dropped: no connection is held open, whoever connects.
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
        loop {
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
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
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
