//! The Kubernetes API server: the node's labels (read, and written by
//! server-side apply as field manager `gpuprov`) and node events.
//!
//! Requests go through the kube client's `send`, so that status codes and
//! `Retry-After` headers are seen as they are: 429, 5xx and connection
//! errors are retried with backoff; a configured API server that stays
//! unreachable is an error, never a silent fallback to another sink.

/// The label on everything gpuprov creates in the cluster or the node's
/// static pod directory.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "gpuprov");

pub mod capped;
pub mod config_maps;
pub mod events;
pub mod node_status;
pub mod pods;
pub mod resources;
pub mod upgrade;
pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ::kube::api::{PatchParams, PostParams};
use ::kube::client::Body;
use ::kube::core::Request;
use k8s_openapi::api::core::v1::Node;
use serde_json::json;

/// The field manager gpuprov applies labels as.
pub const FIELD_MANAGER: &str = "gpuprov";
/// How many times a request is tried before the API server counts as unreachable.
const ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read the kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "no API server found: not in a pod, and no kubeconfig (KUBECONFIG, ~/.kube/config); give --kubeconfig FILE, or --labels-sink file to label through NFD's feature file without one"
    )]
    NotFound(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot configure the API client")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the API server {server} did not answer {what} after {ATTEMPTS} tries: {last}")]
    Unreachable {
        server: String,
        what: String,
        last: String,
    },
    #[error("the API server {server} answered {what} with too much: {why}")]
    TooLarge {
        server: String,
        what: String,
        why: String,
    },
    #[error("the API server {server} refused {what}: {code} {message}")]
    Api {
        server: String,
        what: String,
        code: u16,
        message: String,
    },
    #[error("node {node} does not exist on {server} (set --node-name or NODE_NAME)")]
    NodeNotFound { node: String, server: String },
    #[error("no node name: set --node-name or NODE_NAME")]
    NoNodeName,
    #[error("stopped by SIGTERM or SIGINT while waiting on the API server for {what}")]
    Interrupted { what: String },
}

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
}

impl ClusterOptions {
    /// Whether any API server is configured: a kubeconfig flag, `KUBECONFIG`,
    /// `~/.kube/config`, or the in-cluster service environment.
    pub fn configured(&self) -> bool {
        self.kubeconfig.is_some()
            || std::env::var_os("KUBECONFIG").is_some()
            || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            || std::env::var_os("HOME")
                .is_some_and(|home| PathBuf::from(home).join(".kube/config").is_file())
    }
}

/// The node's labels and which of them gpuprov's field manager owns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeLabels {
    pub labels: BTreeMap<String, String>,
    /// Keys gpuprov applied (its server-side-apply field set).
    pub ours: BTreeSet<String>,
    /// For each key someone else set: who (their field manager).
    pub others: BTreeMap<String, String>,
    /// The node's allocatable resources (`nvidia.com/gpu` → `8`).
    pub allocatable: BTreeMap<String, String>,
    /// Its `nvidia.com/GPUReady` condition, when it has one.
    pub gpu_ready: Option<node_status::Condition>,
    pub taints: Vec<k8s_openapi::api::core::v1::Taint>,
    /// The Node object's UID: what owns its ResourceSlices.
    pub uid: Option<String>,
}

/// API requests by verb and status code (0: no answer), for `/metrics`.
pub type RequestCounts = prometheus_client::metrics::family::Family<
    ApiRequest,
    prometheus_client::metrics::counter::Counter,
>;

/// One kind of API request, as `gpuprov_api_requests_total` counts it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ApiRequest {
    pub verb: String,
    /// The status code; 0: no answer.
    pub code: String,
}

/// A connection to the API server, for one node.
pub struct Cluster {
    runtime: tokio::runtime::Runtime,
    client: ::kube::Client,
    /// For the watch's own client, on its own thread's runtime: a client's
    /// connections run on the runtime it was made on.
    config: ::kube::Config,
    pub node: String,
    pub server: String,
    pub requests: RequestCounts,
    /// How it was reached, for a second connection (the upgrade slot's
    /// renewing thread).
    pub options: ClusterOptions,
    /// The Node and its pods as `gpuprov run`'s watches see them.
    pub view: Arc<view::View>,
    /// ConfigMaps' data as gpuprov last read or wrote them, by namespace
    /// and name: under the watches a converge does not read them again.
    config_maps: std::sync::Mutex<BTreeMap<(String, String), BTreeMap<String, String>>>,
    /// This node's DRA ResourceSlices as gpuprov last read or wrote them
    /// (`resources.rs`).
    resource_slices: std::sync::Mutex<Option<Vec<serde_json::Value>>>,
    /// The stop flags of the threads renewing the Leases this node holds
    /// (an upgrade slot, a remediation slot), by slot prefix: shared with a reconnected `Cluster`
    /// (`keep_from`), so a reloaded spec keeps renewing the slot.
    pub lease_renewal:
        Arc<std::sync::Mutex<BTreeMap<&'static str, Arc<std::sync::atomic::AtomicBool>>>>,
    /// How many GPU nodes the fleet has, and when that was read.
    pub fleet_size: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl Cluster {
    pub fn connect(options: &ClusterOptions) -> Result<Cluster, KubeError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime starts");
        let config = runtime.block_on(async {
            match &options.kubeconfig {
                Some(path) => {
                    let kubeconfig = ::kube::config::Kubeconfig::read_from(path).map_err(|e| {
                        KubeError::Kubeconfig {
                            path: path.display().to_string(),
                            source: Box::new(e),
                        }
                    })?;
                    ::kube::Config::from_custom_kubeconfig(
                        kubeconfig,
                        &::kube::config::KubeConfigOptions::default(),
                    )
                    .await
                    .map_err(|e| KubeError::Kubeconfig {
                        path: path.display().to_string(),
                        source: Box::new(e),
                    })
                }
                None => ::kube::Config::infer()
                    .await
                    .map_err(|e| KubeError::NotFound(Box::new(e))),
            }
        })?;
        let node = match &options.node_name {
            Some(name) => name.clone(),
            None => match std::env::var("NODE_NAME") {
                Ok(name) if !name.is_empty() => name,
                _ => nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .filter(|h| !h.is_empty())
                    .ok_or(KubeError::NoNodeName)?,
            },
        };
        let mut config = config;
        // Who is asking, in the API server's audit log and metrics: which
        // node's agent, so that one node's requests can be told apart.
        let agent = format!("gpuprov/{} (node {node})", env!("CARGO_PKG_VERSION"));
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_str(&agent).unwrap_or_else(|_| {
                http::HeaderValue::from_static(concat!("gpuprov/", env!("CARGO_PKG_VERSION")))
            }),
        ));
        // A server that never accepts must not hold a converge; one that
        // accepts and never answers is `REQUEST_TIMEOUT`'s. The watch's
        // requests have no such bound: nothing read for `WATCH_READ_TIMEOUT`
        // ends a list or a watch that hangs (the server ends a healthy
        // watch sooner, after its 290 s timeout).
        config
            .connect_timeout
            .get_or_insert(Duration::from_secs(10));
        config.read_timeout.get_or_insert(WATCH_READ_TIMEOUT);
        // `send` retries 429 and 5xx itself (with Retry-After, five tries,
        // each within REQUEST_TIMEOUT) and hands an eviction's 429 to its
        // caller; kube's own retry layer (15 tries, up to 1000 s apart)
        // would hold a request past that and hide the 429.
        config.default_retry = false;
        let server = config.cluster_url.to_string();
        let client = {
            let _guard = runtime.enter();
            capped::client(config.clone()).map_err(|e| KubeError::Config(Box::new(e)))?
        };
        Ok(Cluster {
            runtime,
            client,
            config,
            node: node.clone(),
            server,
            requests: RequestCounts::default(),
            options: ClusterOptions {
                kubeconfig: options.kubeconfig.clone(),
                node_name: Some(node.clone()),
            },
            view: Default::default(),
            config_maps: Default::default(),
            resource_slices: Default::default(),
            lease_renewal: Default::default(),
            fleet_size: Default::default(),
        })
    }

    /// Sends a request, retrying connection errors, 429 (after its
    /// `Retry-After`) and 5xx with exponential backoff.
    fn send(
        &self,
        what: &str,
        request: http::Request<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        self.send_retrying(what, request, true)
    }

    /// `send`, but a 429 is the answer (an eviction a PodDisruptionBudget
    /// refuses says so, and its caller decides when to ask again).
    fn send_answering_429(
        &self,
        what: &str,
        request: http::Request<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        self.send_retrying(what, request, false)
    }

    fn send_retrying(
        &self,
        what: &str,
        request: http::Request<Vec<u8>>,
        retry_429: bool,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        let request = without_empty_query(request);
        let verb = request.method().to_string();
        let count = |code: u16| {
            let request = ApiRequest {
                verb: verb.clone(),
                code: code.to_string(),
            };
            self.requests.get_or_create(&request).inc();
        };
        self.runtime.block_on(async {
            let mut last = String::new();
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tracing::warn!(server = %self.server, %what, attempt, "retrying: {last}");
                }
                let backoff = Duration::from_millis(200 << attempt);
                let exchange = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(&request));
                let answer = tokio::select! {
                    answer = exchange => answer,
                    () = stop_requested() => {
                        return Err(KubeError::Interrupted { what: what.to_string() });
                    }
                };
                match answer {
                    Err(_) => {
                        count(0);
                        last = format!("no answer within {REQUEST_TIMEOUT:?}");
                        tokio::time::sleep(backoff).await;
                    }
                    Ok(Ok((code, retry_after, body))) => {
                        count(code);
                        if (code == 429 && retry_429) || code >= 500 {
                            last = format!("{code} {}", status_message(&body));
                            let wait =
                                retry_after.map_or(backoff, |s| Duration::from_secs(s.min(30)));
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        return Ok((code, body));
                    }
                    Ok(Err(e)) => {
                        count(0);
                        last = crate::error_chain::error_chain(&e);
                        // The same request gets the same answer: an answer
                        // over the cap is not asked for again.
                        if let Some(why) = capped::too_large(&e) {
                            return Err(KubeError::TooLarge {
                                server: self.server.clone(),
                                what: what.to_string(),
                                why,
                            });
                        }
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
            Err(KubeError::Unreachable {
                server: self.server.clone(),
                what: what.to_string(),
                last,
            })
        })
    }

    /// One request and its whole answer: status, `Retry-After` seconds
    /// and body.
    async fn exchange(
        &self,
        request: &http::Request<Vec<u8>>,
    ) -> Result<(u16, Option<u64>, Vec<u8>), ::kube::Error> {
        let response = self.client.send(request.clone().map(Body::from)).await?;
        let code = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = response.into_body().collect_bytes().await?.to_vec();
        Ok((code, retry_after, body))
    }

    fn refused(&self, what: &str, code: u16, body: &[u8]) -> KubeError {
        KubeError::Api {
            server: self.server.clone(),
            what: what.to_string(),
            code,
            message: status_message(body),
        }
    }

    /// A 200 (or a 201: server-side apply that creates the object answers
    /// 201), or the server's refusal as an error.
    fn ok_or_refused(&self, what: &str, code: u16, body: &[u8]) -> Result<(), KubeError> {
        if code == 200 || code == 201 {
            Ok(())
        } else {
            Err(self.refused(what, code, body))
        }
    }

    /// A request formed from names the API server gave (a pod's): a name
    /// no URI can carry is an error, not a panic.
    fn formed<E: std::fmt::Display>(
        &self,
        what: &str,
        request: Result<http::Request<Vec<u8>>, E>,
    ) -> Result<http::Request<Vec<u8>>, KubeError> {
        request.map_err(|e| KubeError::Api {
            server: self.server.clone(),
            what: what.to_string(),
            code: 0,
            message: format!("cannot form the request: {e}"),
        })
    }

    /// An answer that does not parse as the `kind` asked for.
    fn not_a(&self, what: &str, code: u16, kind: &str, e: &serde_json::Error) -> KubeError {
        KubeError::Api {
            server: self.server.clone(),
            what: what.to_string(),
            code,
            message: format!("the answer is not a {kind}: {e}"),
        }
    }

    /// The node's labels and who set them: as the Node watch last saw
    /// them, else read now.
    /// Takes over what a connection it replaces keeps running (the
    /// renewal of a Lease this node holds).
    pub fn keep_from(&mut self, old: &Cluster) {
        self.lease_renewal = old.lease_renewal.clone();
    }

    pub fn node_labels(&self) -> Result<NodeLabels, KubeError> {
        match self.view.node() {
            Some(node) => Ok(read_labels(&node)),
            None => Ok(read_labels(&self.node()?)),
        }
    }

    /// A write's answer: the Node as it now is, for the view.
    fn written_node(&self, body: &[u8]) {
        if let Ok(node) = serde_json::from_slice::<Node>(body) {
            self.view.offer_node(node);
        }
    }

    /// Applies exactly `labels` as gpuprov's label set (server-side apply,
    /// never forced): keys gpuprov owned before and no longer wants go away.
    pub fn apply_labels(&self, labels: &BTreeMap<String, String>) -> Result<(), KubeError> {
        let what = format!("PATCH (apply) node {}", self.node);
        self.apply_labels_with(&what, PatchParams::apply(FIELD_MANAGER), labels)
    }

    /// Applies `labels` as `manager`'s whole label set, taking them from
    /// whoever set them before (the driver upgrade's state label, which a
    /// person may set by hand to retry).
    pub fn apply_labels_forced(
        &self,
        manager: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), KubeError> {
        let what = format!("PATCH (apply) node {} as {manager}", self.node);
        self.apply_labels_with(&what, PatchParams::apply(manager).force(), labels)
    }

    fn apply_labels_with(
        &self,
        what: &str,
        params: PatchParams,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), KubeError> {
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node, "labels": labels},
        });
        let request = Request::new("/api/v1/nodes")
            .patch(&self.node, &params, &::kube::api::Patch::Apply(&patch))
            .expect("a valid request");
        let (code, body) = self.send(what, request)?;
        self.ok_or_refused(what, code, &body)?;
        self.written_node(&body);
        Ok(())
    }

    /// Posts a node event (events.k8s.io/v1) in the `default` namespace.
    pub fn post_event(
        &self,
        warning: bool,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), KubeError> {
        let what = format!("POST event {reason}");
        let now = std::time::SystemTime::now();
        let nanos = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let event = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": format!("{}.{nanos:x}", self.node), "namespace": "default"},
            "eventTime": humantime::format_rfc3339_micros(now).to_string(),
            "reportingController": "gpuprov.io/gpuprov",
            "reportingInstance": format!("gpuprov-{}", self.node),
            "action": action,
            "reason": reason,
            "note": truncate(note, 1000),
            "type": if warning { "Warning" } else { "Normal" },
            "regarding": {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.node},
        });
        let request = Request::new("/apis/events.k8s.io/v1/namespaces/default/events")
            .create(
                &PostParams::default(),
                serde_json::to_vec(&event).expect("serializes"),
            )
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(self.refused(&what, code, &body))
        }
    }
}

impl Cluster {
    /// Watches this Node and the pods on it that gpuprov reads, on a
    /// thread until `stop` (see `view`); `changed` gets every new set of
    /// the Node's labels.
    pub fn watch(
        &self,
        timeout: Duration,
        stop: Arc<AtomicBool>,
        changed: impl Fn(BTreeMap<String, String>) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let mut last: Option<BTreeMap<String, String>> = None;
        self.view.watch(
            self.config.clone(),
            self.node.clone(),
            timeout,
            stop,
            move |node| {
                let labels = read_labels(node).labels;
                if last.as_ref() != Some(&labels) {
                    changed(labels.clone());
                }
                last = Some(labels);
            },
        )
    }
}

/// kube's request builders end a path with `?` when no parameter is set
/// (`/api/v1/nodes/n?`); the request goes out without it.
fn without_empty_query(mut request: http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    let uri = request.uri().to_string();
    let trimmed = uri.trim_end_matches(['?', '&']).replace("?&", "?");
    if trimmed != uri
        && let Ok(fixed) = trimmed.parse()
    {
        *request.uri_mut() = fixed;
    }
    request
}

/// How long one request (but the watch) may take, its whole answer read:
/// a server that accepts the connection and never answers must not hold a
/// converge. Real requests answer in milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves when SIGTERM or SIGINT has been received: a request left
/// waiting on the API server is dropped then, whatever the server does.
/// (A label PATCH dropped mid-flight is applied or not; server-side apply
/// makes the next run's the same either way.)
async fn stop_requested() {
    while !crate::interrupt::requested() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a list or watch may go without a byte read: longer than the
/// 290 s after which the server ends a healthy watch.
const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// Labels, the keys gpuprov's apply owns, and who set the others.
pub fn read_labels(node: &Node) -> NodeLabels {
    let labels: BTreeMap<String, String> = node
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut ours = BTreeSet::new();
    let mut others = BTreeMap::new();
    for entry in node.metadata.managed_fields.iter().flatten() {
        let manager = entry.manager.clone().unwrap_or_default();
        let keys = entry
            .fields_v1
            .as_ref()
            .and_then(|f| f.0.get("f:metadata"))
            .and_then(|m| m.get("f:labels"))
            .and_then(|l| l.as_object())
            .map(|l| {
                l.keys()
                    .filter_map(|k| k.strip_prefix("f:"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for key in keys {
            if manager == FIELD_MANAGER && entry.operation.as_deref() == Some("Apply") {
                ours.insert(key);
            } else {
                others.entry(key).or_insert_with(|| manager.clone());
            }
        }
    }
    let allocatable = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default();
    NodeLabels {
        labels,
        ours,
        others,
        allocatable,
        gpu_ready: node_status::gpu_ready_of(node),
        taints: node_status::taints_of(node),
        uid: node.metadata.uid.clone(),
    }
}

/// A Status answer's message, or the body itself.
fn status_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| truncate(&String::from_utf8_lossy(body), 200))
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}
