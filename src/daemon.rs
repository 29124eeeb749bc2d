//! `gpuprov run`: the DaemonSet mode. Converges, then converges again when
//! the node's labels change (a watch on its own Node), when the config file
//! changes, and on a drift interval (another tool rewrote containerd's
//! config: the runtime is put back, and containerd restarts only because the
//! file changed). Failures back off exponentially with jitter. Serves
//! `/healthz`, `/readyz` and `/metrics`. SIGTERM or SIGINT lets the change
//! in progress finish, then exits 0 (see `interrupt`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::cli::RunArgs;
use crate::converge::{Inputs, apply};
use crate::kube::RequestCounts;
use crate::report::RunReport;
use crate::step::error_chain;
use crate::{Error, exit};

/// Upper bounds of the converge-duration histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why the loop converges again.
#[derive(Debug)]
enum Trigger {
    NodeLabels(BTreeMap<String, String>),
    ConfigChanged,
}

/// What `/readyz` and `/metrics` report.
#[derive(Debug, Default)]
struct Status {
    converged: bool,
    last_success: Option<SystemTime>,
    outcomes: BTreeMap<String, String>,
    histogram: Vec<u64>,
    duration_sum: f64,
    converges: BTreeMap<&'static str, u64>,
}

pub fn run(args: &RunArgs) -> Result<i32, Error> {
    let node_args = &args.node;
    let mut inputs = Inputs::load(node_args)?;
    let Some(cluster) = &inputs.cluster else {
        return Err(Error::NeedsApiServer);
    };
    let requests = cluster.requests.clone();
    crate::interrupt::install();

    let status = Arc::new(Mutex::new(Status {
        histogram: vec![0; BUCKETS.len()],
        ..Status::default()
    }));
    let listener = TcpListener::bind(args.listen).map_err(|source| Error::Listen {
        addr: args.listen,
        source,
    })?;
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /healthz, /readyz, /metrics");
    {
        let status = status.clone();
        let requests = requests.clone();
        std::thread::spawn(move || serve(listener, status, requests));
    }

    let (triggers, events) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let node_watch = {
        let triggers = triggers.clone();
        cluster.watch_labels(stop.clone(), move |labels| {
            let _ = triggers.send(Trigger::NodeLabels(labels));
        })
    };
    if let Some(config) = node_args.config.clone() {
        let stop = stop.clone();
        std::thread::spawn(move || watch_file(&config, &stop, &triggers));
    }

    let mut backoff = Duration::from_secs(1);
    let mut foreign: Option<BTreeMap<String, String>> = None;
    let mut last_labels: BTreeMap<String, String> = BTreeMap::new();
    while !crate::interrupt::requested() {
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
        if let Ok(report) = &result {
            last_labels = report.labels.clone();
        }
        record(&status, &result, elapsed);
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
                Ok(Trigger::ConfigChanged) => match Inputs::load(node_args) {
                    Ok(reloaded) => {
                        tracing::info!("the config changed");
                        inputs = reloaded;
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
    // The watch notices `stop` within 250 ms, unless it is inside a request
    // the server never answers: shutdown does not wait for that one.
    let waited = Instant::now();
    while !node_watch.is_finished() && waited.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(exit::OK)
}

/// Up to a fifth more than `base`, so that a fleet does not retry in step.
fn with_jitter(base: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    base + base.mul_f64(f64::from(nanos % 1000) / 5000.0)
}

/// Polls the config file (size, mtime and bytes) every two seconds.
fn watch_file(path: &Path, stop: &AtomicBool, triggers: &mpsc::Sender<Trigger>) {
    let read = |p: &Path| std::fs::read(p).ok();
    let mut last = read(path);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(2));
        let now = read(path);
        if now != last {
            last = now;
            if triggers.send(Trigger::ConfigChanged).is_err() {
                return;
            }
        }
    }
}

fn record(status: &Mutex<Status>, result: &Result<RunReport, Error>, elapsed: Duration) {
    let mut status = status.lock().expect("not poisoned");
    let seconds = elapsed.as_secs_f64();
    for (i, bound) in BUCKETS.iter().enumerate() {
        if seconds <= *bound {
            status.histogram[i] += 1;
        }
    }
    status.duration_sum += seconds;
    let kind = match result {
        Ok(report) => {
            status.converged = report.converged;
            status.outcomes = report
                .steps
                .iter()
                .map(|s| (s.name.clone(), s.outcome.as_str().to_string()))
                .collect();
            if report.converged {
                status.last_success = Some(SystemTime::now());
                "converged"
            } else {
                "not_converged"
            }
        }
        Err(_) => {
            status.converged = false;
            "error"
        }
    };
    *status.converges.entry(kind).or_default() += 1;
}

fn serve(listener: TcpListener, status: Arc<Mutex<Status>>, requests: RequestCounts) {
    for stream in listener.incoming().flatten() {
        let _ = answer(stream, &status, &requests);
    }
}

/// A minimal HTTP/1.1 responder: three GET paths, one response per connection.
fn answer(
    mut stream: TcpStream,
    status: &Mutex<Status>,
    requests: &RequestCounts,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buffer = [0u8; 4096];
    let mut request = Vec::new();
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, body) = match path {
        "/healthz" => (200, "ok\n".to_string()),
        "/readyz" if status.lock().expect("not poisoned").converged => {
            (200, "converged\n".to_string())
        }
        "/readyz" => (503, "not converged\n".to_string()),
        "/metrics" => (
            200,
            metrics(&status.lock().expect("not poisoned"), requests),
        ),
        _ => (404, "not found\n".to_string()),
    };
    let reason = match code {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Prometheus text exposition.
fn metrics(status: &Status, requests: &RequestCounts) -> String {
    let mut out = String::new();
    out.push_str("# HELP gpuprov_state_outcome The outcome of each state in the last converge.\n# TYPE gpuprov_state_outcome gauge\n");
    for (state, outcome) in &status.outcomes {
        out.push_str(&format!(
            "gpuprov_state_outcome{{state=\"{state}\",outcome=\"{outcome}\"}} 1\n"
        ));
    }
    out.push_str("# HELP gpuprov_converged Whether the last converge left the node converged.\n# TYPE gpuprov_converged gauge\n");
    out.push_str(&format!(
        "gpuprov_converged {}\n",
        u8::from(status.converged)
    ));
    out.push_str("# HELP gpuprov_converges_total Converges by result.\n# TYPE gpuprov_converges_total counter\n");
    for (result, n) in &status.converges {
        out.push_str(&format!(
            "gpuprov_converges_total{{result=\"{result}\"}} {n}\n"
        ));
    }
    out.push_str("# HELP gpuprov_converge_duration_seconds How long a converge took.\n# TYPE gpuprov_converge_duration_seconds histogram\n");
    for (bound, n) in BUCKETS.iter().zip(&status.histogram) {
        out.push_str(&format!(
            "gpuprov_converge_duration_seconds_bucket{{le=\"{bound}\"}} {n}\n"
        ));
    }
    let total: u64 = status.converges.values().sum();
    out.push_str(&format!(
        "gpuprov_converge_duration_seconds_bucket{{le=\"+Inf\"}} {total}\n"
    ));
    out.push_str(&format!(
        "gpuprov_converge_duration_seconds_sum {}\n",
        status.duration_sum
    ));
    out.push_str(&format!(
        "gpuprov_converge_duration_seconds_count {total}\n"
    ));
    out.push_str("# HELP gpuprov_api_requests_total API server requests by verb and status code (0: no answer).\n# TYPE gpuprov_api_requests_total counter\n");
    for ((verb, code), n) in requests.lock().expect("not poisoned").iter() {
        out.push_str(&format!(
            "gpuprov_api_requests_total{{verb=\"{verb}\",code=\"{code}\"}} {n}\n"
        ));
    }
    if let Some(at) = status.last_success {
        let seconds = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        out.push_str("# HELP gpuprov_last_success_timestamp_seconds When the node was last converged.\n# TYPE gpuprov_last_success_timestamp_seconds gauge\n");
        out.push_str(&format!(
            "gpuprov_last_success_timestamp_seconds {seconds}\n"
        ));
    }
    out
}
