//! A loopback Kubernetes API server for tests: Nodes (get, list, watch,
//! JSON merge patch, server-side apply of labels with managedFields and
//! conflicts between managers), events, fault injection and a request log.
//! The real kube client talks to it over HTTP.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde_json::{Value, json};

#[path = "fake_dra.rs"]
mod dra;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub uri: String,
    pub content_type: String,
    pub user_agent: String,
    pub body: String,
}

/// A fault to answer with instead of handling a request.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    /// Matches requests whose method is this (`None`: any).
    pub method: Option<&'static str>,
    /// Matches requests whose path starts with this.
    pub path_prefix: &'static str,
    pub status: u16,
    /// `Retry-After` seconds, for 429.
    pub retry_after: Option<u64>,
    /// How many requests it answers; then it is gone.
    pub times: usize,
    /// Wait this long first; with `status` 0 the request is then handled
    /// as usual (a slow API server).
    pub delay_ms: u64,
    /// The body to answer with instead of a Status object.
    pub body: Option<String>,
    /// Matches only requests whose query has this (`watch=true`).
    pub query: Option<&'static str>,
    /// A hostile answer streamed instead (with `status` 200).
    pub flood: Option<Flood>,
}

/// Answers a hostile or broken API server streams.
#[derive(Debug, Clone, Copy)]
pub enum Flood {
    /// A Node whose JSON goes on for this many bytes (a label value that
    /// never ends), on one line.
    Node(u64),
    /// A watch whose first event is one line that never ends.
    EndlessLine,
    /// A pod list whose every page has 100 new pods and a `continue`.
    EndlessPages,
}

impl Flood {
    /// The fault that floods where this kind belongs: a Node's GET, the
    /// Node watch, or the pod lists; for as long as a test runs.
    #[allow(dead_code)]
    pub fn fault(self) -> Fault {
        let (path_prefix, query) = match self {
            Flood::Node(_) => ("/api/v1/nodes/", None),
            Flood::EndlessLine => ("/api/v1/nodes", Some("watch=true")),
            Flood::EndlessPages => ("/api/v1/pods", None),
        };
        Fault {
            method: Some("GET"),
            path_prefix,
            query,
            status: 200,
            times: usize::MAX,
            flood: Some(self),
            ..Default::default()
        }
    }

    fn answer(self, uri: &str) -> Response {
        use futures::StreamExt;
        const CHUNK: usize = 64 << 10;
        let filler = Bytes::from(vec![b'a'; CHUNK]);
        let endless = move |head: &'static str, total: u64| {
            let chunks = (total / CHUNK as u64) as usize;
            let head =
                futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) });
            let filler = filler.clone();
            Body::from_stream(head.chain(futures::stream::iter(
                std::iter::repeat_n(filler, chunks).map(Ok),
            )))
        };
        let body = match self {
            Flood::Node(bytes) => endless(
                r#"{"kind":"Node","apiVersion":"v1","metadata":{"name":"n","labels":{"a":""#,
                bytes,
            ),
            Flood::EndlessLine => endless(
                r#"{"type":"ADDED","object":{"kind":"Node","metadata":{"name":""#,
                1 << 40,
            ),
            Flood::EndlessPages => {
                let page: u64 = uri
                    .split(['?', '&'])
                    .find_map(|p| p.strip_prefix("continue=page-"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let pods: Vec<Value> = (0..100)
                    .map(|i| {
                        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {
                            "name": format!("pod-{page}-{i}"), "namespace": "default",
                            "resourceVersion": "1", "uid": format!("{page}-{i}"),
                        }})
                    })
                    .collect();
                Body::from(
                    json!({"apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": "1", "continue": format!("page-{}", page + 1)},
                        "items": pods})
                    .to_string(),
                )
            }
        };
        (StatusCode::OK, [("content-type", "application/json")], body).into_response()
    }
}

/// What an injected fault does to a request.
enum Injected {
    Answer(Response),
    Delay(Duration),
}

#[derive(Debug, Default, Clone)]
struct NodeState {
    labels: BTreeMap<String, String>,
    /// label key → manager → operation (`Apply` or `Update`).
    owners: BTreeMap<String, BTreeMap<String, String>>,
    /// `status.allocatable`, as the kubelet reports it.
    allocatable: BTreeMap<String, String>,
    /// `spec.taints`, replaced whole by a merge patch.
    taints: Vec<Value>,
    /// `status.conditions`, merged by type through the status subresource.
    conditions: Vec<Value>,
    /// `spec.unschedulable`: cordoned.
    unschedulable: bool,
    annotations: BTreeMap<String, String>,
    resource_version: u64,
}

/// What the cluster does when gpuprov labels a node for an operand, as the
/// operands' DaemonSets would: the device plugin registers the node's GPUs,
/// the DCGM exporter's pod becomes Ready, GFD labels the product.
#[derive(Debug, Clone)]
pub struct Operands {
    pub gpus: usize,
    pub product: String,
    /// False: the DCGM exporter's pod is scheduled but never Ready (its
    /// image cannot be pulled, say).
    pub exporter_ready: bool,
}

/// What the kubelet does with a validation pod (a pod whose name starts
/// with `gpuprov-cuda-vectoradd`).
#[derive(Debug, Clone)]
pub enum Kubelet {
    /// It runs, and ends in this phase (`Succeeded`, `Failed`) after a while,
    /// having logged this.
    Runs {
        phase: &'static str,
        after_ms: u64,
        log: String,
        exit_code: i32,
    },
    /// It is never scheduled: not enough nvidia.com/gpu.
    NeverSchedules,
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, NodeState>,
    events: Vec<Value>,
    /// (namespace, name) → pod; each carries the resourceVersion of its
    /// last change (`put_pod`).
    pods: BTreeMap<(String, String), Value>,
    /// Pods deleted, with the resourceVersion of their deletion, so that a
    /// watch resumed from before it sees the DELETED event.
    deleted_pods: BTreeMap<(String, String), (u64, Value)>,
    /// (namespace, name) → ConfigMap.
    config_maps: BTreeMap<(String, String), Value>,
    /// (namespace, name) → Lease, with its resourceVersion.
    leases: BTreeMap<(String, String), Value>,
    /// Pods (by namespace and name prefix) whose eviction a
    /// PodDisruptionBudget refuses with 429.
    protected: Vec<(String, String)>,
    /// (namespace, name) → its log.
    pod_logs: BTreeMap<(String, String), String>,
    operands: Option<Operands>,
    kubelet: Option<Kubelet>,
    log: Vec<Logged>,
    faults: VecDeque<Fault>,
    version: u64,
    /// Bumped to end every open watch (a dropped connection).
    watch_generation: u64,
    /// Open watches send nothing more and never close (a server gone
    /// silent: hung, or the link cut without a reset).
    watches_silent: bool,
    /// Watches from a resourceVersion older than this are answered
    /// 410 Gone (the server compacted its history).
    compacted: u64,
    /// `resource.k8s.io/v1` (`fake_dra.rs`): slices by name, claims and
    /// claim templates by namespace and name.
    resource_slices: BTreeMap<String, Value>,
    slice_counter: u64,
    resource_claims: BTreeMap<(String, String), Value>,
    claim_templates: BTreeMap<(String, String), Value>,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Inner>>);

impl Inner {
    /// Stores a pod as changed now: the store's resourceVersion moves on and
    /// the pod carries it.
    fn put_pod(&mut self, key: (String, String), mut pod: Value) {
        self.version += 1;
        pod["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.deleted_pods.remove(&key);
        self.pods.insert(key, pod);
    }

    /// Changes a pod in place, as `put_pod`.
    fn change_pod(&mut self, key: &(String, String), change: impl FnOnce(&mut Value)) {
        if let Some(mut pod) = self.pods.get(key).cloned() {
            change(&mut pod);
            self.put_pod(key.clone(), pod);
        }
    }

    fn remove_pod(&mut self, key: &(String, String)) -> Option<Value> {
        let pod = self.pods.remove(key)?;
        self.version += 1;
        self.deleted_pods
            .insert(key.clone(), (self.version, pod.clone()));
        Some(pod)
    }
}

pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Shared,
    /// Holds the kubeconfig naming this server.
    dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl FakeApi {
    pub fn start() -> FakeApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shared = Shared::default();
        let app = Router::new()
            .route("/api/v1/nodes", get(list_nodes))
            .route("/api/v1/nodes/{name}", get(get_node).patch(patch_node))
            .route("/api/v1/nodes/{name}/status", patch(patch_node_status))
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/events",
                post(create_event),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods",
                get(list_pods).post(create_pod),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_pod).delete(delete_pod),
            )
            .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
            .route("/api/v1/pods", get(list_all_pods))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/eviction",
                post(evict_pod),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                get(list_leases).post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                get(get_lease).put(replace_lease).delete(delete_lease),
            )
            .route(
                "/api/v1/namespaces/{ns}/configmaps/{name}",
                get(get_config_map).patch(apply_config_map),
            )
            .route(
                "/apis/resource.k8s.io/v1/resourceslices",
                get(dra::list_slices).post(dra::create_slice),
            )
            .route(
                "/apis/resource.k8s.io/v1/resourceslices/{name}",
                axum::routing::put(dra::replace_slice).delete(dra::delete_slice),
            )
            .route(
                "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims/{name}",
                get(dra::get_claim),
            )
            .route(
                "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaimtemplates/{name}",
                patch(dra::apply_claim_template),
            )
            .fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                log_and_inject,
            ))
            .with_state(shared.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeApi {
            addr,
            shared,
            dir: tempfile::tempdir().unwrap(),
            _runtime: runtime,
        }
    }

    /// A kubeconfig file naming this server.
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("kubeconfig");
        if path.exists() {
            // Written once: agents that start meanwhile read it whole.
            return path;
        }
        let partial = self.dir.path().join("kubeconfig.partial");
        std::fs::write(
            &partial,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n\
                 users:\n- name: fake\n  user:\n    token: fake-token\n",
                self.addr
            ),
        )
        .unwrap();
        std::fs::rename(&partial, &path).unwrap();
        path
    }

    /// Adds a node with labels set by `manager` (an Update, as `kubectl label` does).
    pub fn add_node(&self, name: &str, labels: &[(&str, &str)], manager: &str) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        let mut node = NodeState {
            resource_version: inner.version,
            ..NodeState::default()
        };
        for (k, v) in labels {
            node.labels.insert(k.to_string(), v.to_string());
            node.owners
                .entry(k.to_string())
                .or_default()
                .insert(manager.to_string(), "Update".to_string());
        }
        inner.nodes.insert(name.to_string(), node);
    }

    /// Sets the node's taints, as its registration (`--register-with-taints`)
    /// or a node pool would.
    pub fn set_taints(&self, node: &str, taints: &[(&str, &str)]) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        let version = inner.version;
        let node = inner.nodes.get_mut(node).unwrap();
        node.taints = taints
            .iter()
            .map(|(key, effect)| json!({"key": key, "effect": effect}))
            .collect();
        node.resource_version = version;
    }

    /// The node's taints, as `key:effect`.
    pub fn taints(&self, node: &str) -> Vec<String> {
        self.shared.0.lock().unwrap().nodes[node]
            .taints
            .iter()
            .map(|t| {
                format!(
                    "{}:{}",
                    t["key"].as_str().unwrap(),
                    t["effect"].as_str().unwrap()
                )
            })
            .collect()
    }

    /// The node's condition of this type.
    pub fn condition(&self, node: &str, kind: &str) -> Option<Value> {
        self.shared.0.lock().unwrap().nodes[node]
            .conditions
            .iter()
            .find(|c| c["type"] == kind)
            .cloned()
    }

    /// Sets a label as `manager` would with `kubectl label --overwrite`.
    pub fn set_label(&self, node: &str, key: &str, value: &str, manager: &str) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        let version = inner.version;
        let node = inner.nodes.get_mut(node).unwrap();
        node.labels.insert(key.to_string(), value.to_string());
        let owners = node.owners.entry(key.to_string()).or_default();
        owners.clear();
        owners.insert(manager.to_string(), "Update".to_string());
        node.resource_version = version;
    }

    /// Removes a label, as `kubectl label node <node> <key>-` does.
    pub fn remove_label(&self, node: &str, key: &str) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        let version = inner.version;
        let node = inner.nodes.get_mut(node).unwrap();
        node.labels.remove(key);
        node.owners.remove(key);
        node.resource_version = version;
    }

    pub fn labels(&self, node: &str) -> BTreeMap<String, String> {
        self.shared.0.lock().unwrap().nodes[node].labels.clone()
    }

    /// Label keys `manager` owns on `node`.
    pub fn owned_by(&self, node: &str, manager: &str) -> Vec<String> {
        let inner = self.shared.0.lock().unwrap();
        inner.nodes[node]
            .owners
            .iter()
            .filter(|(_, m)| m.contains_key(manager))
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn events(&self) -> Vec<Value> {
        self.shared.0.lock().unwrap().events.clone()
    }

    pub fn log(&self) -> Vec<Logged> {
        self.shared.0.lock().unwrap().log.clone()
    }

    /// Each node's values of the node label `label` as field manager
    /// `manager` applied them, in the order the server got them (`absent`
    /// where an apply left it out), and the most nodes whose latest value
    /// `busy` took at any moment: what a fleet's coordination is proven by.
    #[allow(dead_code)]
    pub fn walks(
        &self,
        manager: &str,
        label: &str,
        absent: &str,
        busy: impl Fn(&str) -> bool,
    ) -> (BTreeMap<String, Vec<String>>, usize) {
        let mut walks: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut now: BTreeMap<String, String> = BTreeMap::new();
        let mut most = 0;
        let applied = format!("fieldManager={manager}");
        for l in self.log() {
            if l.method != "PATCH" || !l.uri.contains(&applied) {
                continue;
            }
            let node = l.uri["/api/v1/nodes/".len()..]
                .split('?')
                .next()
                .unwrap()
                .to_string();
            let body: Value = serde_json::from_str(&l.body).unwrap();
            let value = body["metadata"]["labels"][label]
                .as_str()
                .unwrap_or(absent)
                .to_string();
            walks.entry(node.clone()).or_default().push(value.clone());
            now.insert(node, value);
            most = most.max(now.values().filter(|v| busy(v)).count());
        }
        (walks, most)
    }

    pub fn clear_log(&self) {
        self.shared.0.lock().unwrap().log.clear();
    }

    /// Requests that change something (anything but GET).
    pub fn writes(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.method != "GET")
            .collect()
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.0.lock().unwrap().faults.push_back(fault);
    }

    /// Sets a pod's `status.phase`, as the kubelet would.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) {
        let mut inner = self.shared.0.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        assert!(inner.pods.contains_key(&key), "no pod {namespace}/{name}");
        inner.change_pod(&key, |pod| pod["status"]["phase"] = json!(phase));
    }

    /// Whether the node is cordoned (`spec.unschedulable`).
    pub fn unschedulable(&self, node: &str) -> bool {
        self.shared.0.lock().unwrap().nodes[node].unschedulable
    }

    /// The Leases in a namespace: name → holder (empty: none).
    pub fn leases(&self, namespace: &str) -> BTreeMap<String, String> {
        let inner = self.shared.0.lock().unwrap();
        inner
            .leases
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, name), lease)| {
                let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
                (name.clone(), holder.to_string())
            })
            .collect()
    }

    /// A Lease `holder` holds (renewed now, for `seconds`), as another
    /// node's agent would have taken it.
    pub fn hold_lease(&self, namespace: &str, name: &str, holder: &str, seconds: u64) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let label = if name.starts_with("gpuprov-remediation") {
            "gpuprov.io/remediation-slot"
        } else {
            "gpuprov.io/driver-upgrade-slot"
        };
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace,
                         "resourceVersion": inner.version.to_string(),
                         "uid": format!("lease-uid-{}", inner.version),
                         "labels": {label: "true"}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds,
                     "acquireTime": now, "renewTime": now},
        });
        inner
            .leases
            .insert((namespace.to_string(), name.to_string()), lease);
    }

    /// Deletes a Lease, as `kubectl delete lease` does.
    pub fn delete_lease(&self, namespace: &str, name: &str) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        inner
            .leases
            .remove(&(namespace.to_string(), name.to_string()));
    }

    /// A PodDisruptionBudget that allows no disruption of the pods in
    /// `namespace` whose names start with `prefix`: their evictions get 429.
    pub fn protect_pods(&self, namespace: &str, prefix: &str) {
        let mut inner = self.shared.0.lock().unwrap();
        inner
            .protected
            .push((namespace.to_string(), prefix.to_string()));
    }

    /// Adds a pod bound to `node` that holds `gpus` nvidia.com/gpu (none:
    /// an ordinary pod), owned by a ReplicaSet (so a drain may evict it).
    pub fn add_gpu_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
        gpus: u32,
    ) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let mut pod = running_pod(namespace, name, node, &labels, true);
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"), "uid": format!("uid-{name}-rs")}]);
        pod["spec"]["containers"][0]["resources"] =
            json!({"limits": {"nvidia.com/gpu": gpus.to_string()}});
        self.shared
            .0
            .lock()
            .unwrap()
            .put_pod((namespace.to_string(), name.to_string()), pod);
    }

    /// Turns a pod's Ready condition on or off (its container crashed, say).
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) {
        let mut inner = self.shared.0.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        assert!(inner.pods.contains_key(&key), "no pod {namespace}/{name}");
        let status = if ready { "True" } else { "False" };
        inner.change_pod(&key, |pod| {
            pod["status"]["conditions"] = json!([{"type": "Ready", "status": status}]);
        });
    }

    /// The requests one node's agent made: gpuprov names its node in its
    /// User-Agent (`gpuprov/0.1.0 (node gpu-node-1)`).
    pub fn log_of(&self, node: &str) -> Vec<Logged> {
        let agent = format!("(node {node})");
        self.log()
            .into_iter()
            .filter(|l| l.user_agent.ends_with(&agent))
            .collect()
    }

    /// A node's allocatable resources.
    pub fn node_allocatable(&self, node: &str) -> BTreeMap<String, String> {
        self.shared.0.lock().unwrap().nodes[node]
            .allocatable
            .clone()
    }

    /// A ConfigMap's data, if it exists.
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let inner = self.shared.0.lock().unwrap();
        let map = inner
            .config_maps
            .get(&(namespace.to_string(), name.to_string()))?;
        serde_json::from_value(map["data"].clone()).ok()
    }

    pub fn pods(&self) -> Vec<Value> {
        self.shared
            .0
            .lock()
            .unwrap()
            .pods
            .values()
            .cloned()
            .collect()
    }

    /// A server with one node, `name`, as its kubelet registers it (with
    /// its hostname label), carrying `labels` besides.
    pub fn with_node(name: &str, labels: &[(&str, &str)]) -> FakeApi {
        let fake = FakeApi::start();
        let mut all = vec![("kubernetes.io/hostname", name)];
        all.extend_from_slice(labels);
        fake.add_node(name, &all, "kubelet");
        fake
    }

    /// The cluster's side of a working node, at once: the operands follow
    /// gpuprov's deploy labels (`gpus` GPUs, GFD's `product`), and the
    /// validation pod succeeds.
    pub fn run_working_cluster(&self, gpus: usize, product: &str) {
        self.run_operands(Operands {
            gpus,
            product: product.to_string(),
            exporter_ready: true,
        });
        self.kubelet(Kubelet::Runs {
            phase: "Succeeded",
            after_ms: 0,
            log: "[Vector addition of 50000 elements]\nTest PASSED\nDone\n".to_string(),
            exit_code: 0,
        });
    }

    /// From now on, the cluster starts operands on the labels gpuprov sets.
    pub fn run_operands(&self, operands: Operands) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.operands = Some(operands);
        let names: Vec<String> = inner.nodes.keys().cloned().collect();
        for name in names {
            simulate_operands(&mut inner, &name);
        }
    }

    /// From now on, the kubelet treats validation pods this way.
    pub fn kubelet(&self, kubelet: Kubelet) {
        self.shared.0.lock().unwrap().kubelet = Some(kubelet);
    }

    /// Sets an allocatable resource of a node, as the kubelet would.
    pub fn set_allocatable(&self, node: &str, resource: &str, value: &str) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        let version = inner.version;
        let node = inner.nodes.get_mut(node).unwrap();
        node.allocatable
            .insert(resource.to_string(), value.to_string());
        node.resource_version = version;
    }

    /// Adds a pod bound to `node`, Ready or not, as a DaemonSet's would be.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
        ready: bool,
    ) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let pod = running_pod(namespace, name, node, &labels, ready);
        self.shared
            .0
            .lock()
            .unwrap()
            .put_pod((namespace.to_string(), name.to_string()), pod);
    }

    /// Ends every open watch, as a dropped connection would.
    pub fn drop_watches(&self) {
        self.shared.0.lock().unwrap().watch_generation += 1;
    }

    /// Moves the store on, forgets the history before that (as etcd's
    /// compaction does) and drops every open watch, at once: a watch that
    /// resumes from what it had seen gets a 410 Gone ERROR event.
    pub fn compact_and_drop_watches(&self) {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        inner.compacted = inner.version;
        inner.watch_generation += 1;
    }

    /// Changes something that is not a watched Node (another object), so
    /// that the store's resourceVersion moves on: only a bookmark tells a
    /// watcher of it.
    pub fn bump_version(&self) -> u64 {
        let mut inner = self.shared.0.lock().unwrap();
        inner.version += 1;
        inner.version
    }

    /// The store's resourceVersion now.
    pub fn version(&self) -> u64 {
        self.shared.0.lock().unwrap().version
    }

    /// Goes silent: open watches send nothing more and stay open, and
    /// every new request waits an hour before it is answered.
    pub fn hang(&self) {
        self.shared.0.lock().unwrap().watches_silent = true;
        self.inject(Fault {
            method: None,
            path_prefix: "/",
            status: 0,
            retry_after: None,
            times: usize::MAX,
            delay_ms: 3_600_000,
            body: None,
            ..Default::default()
        });
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Every request: logged, then answered by an injected fault (or delayed)
/// when one matches, else handled.
async fn log_and_inject(
    State(shared): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    if let Some(fault) = intercept(
        &shared,
        &parts.method,
        &parts.uri.to_string(),
        &parts.headers,
        &bytes,
    )
    .await
    {
        return fault;
    }
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Logs the request; answers with an injected fault, or waits first, if one
/// matches.
async fn intercept(
    shared: &Shared,
    method: &Method,
    uri: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Option<Response> {
    match log_and_match(shared, method, uri, headers, body)? {
        Injected::Answer(response) => Some(response),
        Injected::Delay(delay) => {
            tokio::time::sleep(delay).await;
            None
        }
    }
}

fn log_and_match(
    shared: &Shared,
    method: &Method,
    uri: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Option<Injected> {
    let mut inner = shared.0.lock().unwrap();
    inner.log.push(Logged {
        method: method.to_string(),
        uri: uri.to_string(),
        content_type: header(headers, "content-type"),
        user_agent: headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: String::from_utf8_lossy(body).into_owned(),
    });
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let position = inner.faults.iter().position(|f| {
        f.method.is_none_or(|m| m == method.as_str())
            && path.starts_with(f.path_prefix)
            && f.query.is_none_or(|q| query.split('&').any(|p| p == q))
    })?;
    let fault = &mut inner.faults[position];
    fault.times -= 1;
    let (code, retry_after) = (fault.status, fault.retry_after);
    let body = fault.body.clone();
    let flood = fault.flood;
    let delay = Duration::from_millis(fault.delay_ms);
    if fault.times == 0 {
        inner.faults.remove(position);
    }
    if code == 0 {
        return Some(Injected::Delay(delay));
    }
    if let Some(flood) = flood {
        return Some(Injected::Answer(flood.answer(uri)));
    }
    let mut response = match body {
        Some(body) => (
            StatusCode::from_u16(code).unwrap(),
            [("content-type", "application/json")],
            body,
        )
            .into_response(),
        None => status(code, "InjectedFault", format!("injected fault {code}")),
    };
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", seconds.to_string().parse().unwrap());
    }
    Some(Injected::Answer(response))
}

fn node_json(name: &str, node: &NodeState) -> Value {
    let mut managers: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (key, owners) in &node.owners {
        for (manager, operation) in owners {
            managers
                .entry((manager.clone(), operation.clone()))
                .or_default()
                .push(key.clone());
        }
    }
    let managed: Vec<Value> = managers
        .into_iter()
        .map(|((manager, operation), keys)| {
            let labels: serde_json::Map<String, Value> = keys
                .into_iter()
                .map(|k| (format!("f:{k}"), json!({})))
                .collect();
            json!({
                "manager": manager, "operation": operation, "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": labels}},
            })
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": format!("uid-{name}"),
            "resourceVersion": node.resource_version.to_string(),
            "labels": node.labels, "managedFields": managed,
            "annotations": node.annotations,
        },
        "spec": {"taints": node.taints, "unschedulable": node.unschedulable},
        "status": {"allocatable": node.allocatable, "conditions": node.conditions},
    })
}

async fn get_node(State(shared): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    let inner = shared.0.lock().unwrap();
    match inner.nodes.get(&name) {
        Some(node) => axum::Json(node_json(&name, node)).into_response(),
        None => status(404, "NotFound", format!("nodes \"{name}\" not found")),
    }
}

async fn list_nodes(
    State(shared): State<Shared>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let watched = Watched {
        kind: "Node",
        name: query
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("metadata.name="))
            .map(str::to_string),
        node: None,
        label: query
            .get("labelSelector")
            .and_then(|s| s.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string())),
    };
    if let Some(watch) = watch_of(&shared, &query, &watched) {
        return watch;
    }
    // An existence selector (`key`), as the API server takes it.
    let exists = query
        .get("labelSelector")
        .filter(|s| !s.contains(['=', '!', ',', ' ', '(']))
        .cloned();
    let inner = shared.0.lock().unwrap();
    let items: Vec<Value> = match &exists {
        // Selected before each Node is rendered: a fleet of thousands
        // answers a few.
        Some(key) => inner
            .nodes
            .iter()
            .filter(|(_, node)| node.labels.contains_key(key))
            .map(|(name, node)| node_json(name, node))
            .collect(),
        None => watched
            .objects(&inner)
            .into_values()
            .map(|(_, o)| o)
            .collect(),
    };
    axum::Json(json!({
        "apiVersion": "v1", "kind": "NodeList",
        "metadata": {"resourceVersion": inner.version.to_string()}, "items": items,
    }))
    .into_response()
}

/// What a list or watch selects: Nodes by name, or Pods by node and one
/// `key=value` label.
#[derive(Clone)]
struct Watched {
    kind: &'static str,
    name: Option<String>,
    node: Option<String>,
    label: Option<(String, String)>,
}

impl Watched {
    /// The selected objects now: key → (resourceVersion, object).
    fn objects(&self, inner: &Inner) -> BTreeMap<String, (u64, Value)> {
        if self.kind == "Node" {
            let nodes: Box<dyn Iterator<Item = (&String, &NodeState)>> = match &self.name {
                Some(name) => Box::new(inner.nodes.get_key_value(name).into_iter()),
                None => Box::new(inner.nodes.iter()),
            };
            return nodes
                .filter(|(_, node)| {
                    self.label
                        .as_ref()
                        .is_none_or(|(k, v)| node.labels.get(k) == Some(v))
                })
                .map(|(name, node)| (name.clone(), (node.resource_version, node_json(name, node))))
                .collect();
        }
        inner
            .pods
            .iter()
            .filter(|(_, pod)| self.selects(pod))
            .map(|((ns, name), pod)| (format!("{ns}/{name}"), (version_of(pod), pod.clone())))
            .collect()
    }

    /// Selected pods deleted: key → (the deletion's resourceVersion, the
    /// pod as it last was).
    fn deleted(&self, inner: &Inner) -> BTreeMap<String, (u64, Value)> {
        inner
            .deleted_pods
            .iter()
            .filter(|(_, (_, pod))| self.kind == "Pod" && self.selects(pod))
            .map(|((ns, name), gone)| (format!("{ns}/{name}"), gone.clone()))
            .collect()
    }

    fn selects(&self, pod: &Value) -> bool {
        self.node
            .as_ref()
            .is_none_or(|n| pod["spec"]["nodeName"] == json!(n))
            && self
                .label
                .as_ref()
                .is_none_or(|(k, v)| pod["metadata"]["labels"][k] == json!(v))
    }
}

fn version_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A watch, when the query asks for one: from resourceVersion "0" (or
/// none) the selected objects as ADDED, from a later one only what changed
/// after it; then changes (ADDED, MODIFIED, DELETED), polled from the
/// store, until the client goes away or `timeoutSeconds` pass. With
/// bookmarks allowed, a BOOKMARK when the store moved on but nothing
/// watched did, and at least every `BOOKMARK_EVERY`, as a real API server.
fn watch_of(
    shared: &Shared,
    query: &BTreeMap<String, String>,
    watched: &Watched,
) -> Option<Response> {
    if !query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return None;
    }
    let from = query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let stream = async_stream(shared.clone(), watched.clone(), from, bookmarks, timeout);
    Some(
        Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap(),
    )
}

/// How often a quiet watch gets a bookmark (a real API server's cacher
/// sends one every minute).
const BOOKMARK_EVERY: Duration = Duration::from_secs(60);

fn async_stream(
    shared: Shared,
    watched: Watched,
    from: u64,
    bookmarks: bool,
    timeout: Option<Duration>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let (generation, seen, gone) = {
        let inner = shared.0.lock().unwrap();
        // What the client has seen: every watched object as of `from`,
        // those deleted since included.
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        if from > 0 {
            for (key, (version, _)) in watched.objects(&inner) {
                if version <= from {
                    seen.insert(key, version);
                }
            }
            for (key, (deleted_at, pod)) in watched.deleted(&inner) {
                if version_of(&pod) <= from && deleted_at > from {
                    seen.insert(key, version_of(&pod));
                }
            }
        }
        (
            inner.watch_generation,
            seen,
            from > 0 && from < inner.compacted,
        )
    };
    if gone {
        // One ERROR event, then the watch ends.
        let status = json!({
            "type": "ERROR",
            "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from}"),
            },
        });
        let line = Bytes::from(format!("{status}\n"));
        return futures::StreamExt::left_stream(futures::stream::once(async move { Ok(line) }));
    }
    // The resourceVersion the client knows: the last event's or bookmark's.
    let bookmarked = from;
    let changes = futures::stream::unfold(
        (shared, seen, bookmarked, tokio::time::Instant::now()),
        move |(shared, mut seen, mut bookmarked, mut last_bookmark)| {
            let watched = watched.clone();
            async move {
                let mut idle = 0;
                loop {
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        return None;
                    }
                    let event = {
                        let inner = shared.0.lock().unwrap();
                        if inner.watch_generation != generation {
                            return None;
                        }
                        if inner.watches_silent {
                            None
                        } else {
                            let objects = watched.objects(&inner);
                            let changed = objects
                                .iter()
                                .find(|(key, (version, _))| seen.get(*key) != Some(version))
                                .map(|(key, (version, object))| {
                                    let kind = if seen.contains_key(key) {
                                        "MODIFIED"
                                    } else {
                                        "ADDED"
                                    };
                                    (
                                        Some((key.clone(), Some(*version))),
                                        json!({"type": kind, "object": object}),
                                    )
                                });
                            let deleted = || {
                                let key = seen.keys().find(|k| !objects.contains_key(*k))?;
                                let (at, object) = watched
                                    .deleted(&inner)
                                    .remove(key)
                                    .unwrap_or((inner.version, json!({"metadata": {}})));
                                let mut object = object;
                                object["metadata"]["resourceVersion"] = json!(at.to_string());
                                Some((
                                    Some((key.clone(), None)),
                                    json!({"type": "DELETED", "object": object}),
                                ))
                            };
                            // A bookmark after a quiet half second in which the
                            // store moved on, or a quiet minute.
                            changed.or_else(deleted).or_else(|| {
                                let due = inner.version > bookmarked
                                    || last_bookmark.elapsed() >= BOOKMARK_EVERY;
                                (bookmarks && idle >= 25 && due).then(|| {
                                    bookmarked = inner.version;
                                    last_bookmark = tokio::time::Instant::now();
                                    (
                                        None,
                                        json!({"type": "BOOKMARK", "object": {
                                            "kind": watched.kind, "apiVersion": "v1",
                                            "metadata": {"resourceVersion": inner.version.to_string()},
                                        }}),
                                    )
                                })
                            })
                        }
                    };
                    match event {
                        Some((object, event)) => {
                            match object {
                                Some((key, Some(version))) => {
                                    bookmarked = bookmarked.max(version);
                                    seen.insert(key, version);
                                }
                                Some((key, None)) => {
                                    seen.remove(&key);
                                }
                                None => {}
                            }
                            let line = format!("{event}\n");
                            return Some((
                                Ok(Bytes::from(line)),
                                (shared, seen, bookmarked, last_bookmark),
                            ));
                        }
                        None => {
                            idle += 1;
                            // Quick while things move, slower once quiet:
                            // thousands of watches (the fleet benchmark)
                            // would otherwise keep the server busy.
                            let poll = if idle > 50 { 100 } else { 20 };
                            tokio::time::sleep(Duration::from_millis(poll)).await
                        }
                    }
                }
            }
        },
    );
    futures::StreamExt::right_stream(changes)
}

async fn patch_node(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header(&headers, "content-type");
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "patch body is not JSON".to_string());
    };
    let manager = query
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| "unknown".to_string());
    let force = query.get("force").is_some_and(|f| f == "true");
    let mut inner = shared.0.lock().unwrap();
    inner.version += 1;
    let version = inner.version;
    let Some(node) = inner.nodes.get_mut(&name) else {
        return status(404, "NotFound", format!("nodes \"{name}\" not found"));
    };
    // A resourceVersion in the patch is a precondition, as on a real server.
    if let Some(wanted) = patch["metadata"]["resourceVersion"].as_str()
        && wanted != node.resource_version.to_string()
    {
        return status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified"
            ),
        );
    }
    if let Some(taints) = patch["spec"]["taints"].as_array() {
        node.taints = taints.clone();
    }
    match &patch["spec"]["unschedulable"] {
        Value::Bool(cordoned) => node.unschedulable = *cordoned,
        Value::Null if patch["spec"].get("unschedulable").is_some() => node.unschedulable = false,
        _ => {}
    }
    if let Some(annotations) = patch["metadata"]["annotations"].as_object() {
        for (key, value) in annotations {
            match value.as_str() {
                Some(value) => node.annotations.insert(key.clone(), value.to_string()),
                None => node.annotations.remove(key),
            };
        }
    }
    let labels: BTreeMap<String, Option<String>> = patch["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string)))
                .collect()
        })
        .unwrap_or_default();

    if content_type.starts_with("application/apply-patch") {
        // Server-side apply: the applied set is everything this manager owns.
        let conflicts: Vec<String> = labels
            .iter()
            .filter_map(|(key, value)| {
                let others = node.owners.get(key)?;
                let other = others.keys().find(|m| **m != manager)?;
                (node.labels.get(key) != value.as_ref())
                    .then(|| format!("conflict with \"{other}\": .metadata.labels.{key}"))
            })
            .collect();
        if !conflicts.is_empty() && !force {
            return status(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join("; ")
                ),
            );
        }
        let previously: Vec<String> = node
            .owners
            .iter()
            .filter(|(_, m)| m.contains_key(&manager))
            .map(|(k, _)| k.clone())
            .collect();
        for key in previously.iter().filter(|k| !labels.contains_key(*k)) {
            let owners = node.owners.get_mut(key).unwrap();
            owners.remove(&manager);
            if owners.is_empty() {
                node.owners.remove(key);
                node.labels.remove(key);
            }
        }
        for (key, value) in &labels {
            let Some(value) = value else { continue };
            node.labels.insert(key.clone(), value.clone());
            let owners = node.owners.entry(key.clone()).or_default();
            if force {
                owners.clear();
            }
            owners.insert(manager.clone(), "Apply".to_string());
        }
    } else {
        // JSON merge patch: an Update that takes the fields it sets.
        for (key, value) in &labels {
            match value {
                Some(value) => {
                    node.labels.insert(key.clone(), value.clone());
                    let owners = node.owners.entry(key.clone()).or_default();
                    owners.clear();
                    owners.insert(manager.clone(), "Update".to_string());
                }
                None => {
                    node.labels.remove(key);
                    node.owners.remove(key);
                }
            }
        }
    }
    node.resource_version = version;
    simulate_operands(&mut inner, &name);
    axum::Json(node_json(&name, &inner.nodes[&name])).into_response()
}

/// The status subresource: a strategic merge patch of `conditions`, merged
/// by `type` (the kubelet's own conditions stay).
async fn patch_node_status(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header(&headers, "content-type");
    if !content_type.starts_with("application/strategic-merge-patch+json") {
        return status(415, "UnsupportedMediaType", content_type.to_string());
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "patch body is not JSON".to_string());
    };
    let mut inner = shared.0.lock().unwrap();
    inner.version += 1;
    let version = inner.version;
    let Some(node) = inner.nodes.get_mut(&name) else {
        return status(404, "NotFound", format!("nodes \"{name}\" not found"));
    };
    for condition in patch["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        match node
            .conditions
            .iter_mut()
            .find(|c| c["type"] == condition["type"])
        {
            Some(existing) => {
                for (k, v) in condition.as_object().unwrap() {
                    existing[k] = v.clone();
                }
            }
            None => node.conditions.push(condition.clone()),
        }
    }
    node.resource_version = version;
    axum::Json(node_json(&name, &inner.nodes[&name])).into_response()
}

/// A pod on `node` in phase Running, with its Ready condition.
fn running_pod(
    namespace: &str,
    name: &str,
    node: &str,
    labels: &BTreeMap<&str, &str>,
    ready: bool,
) -> Value {
    let ready = if ready { "True" } else { "False" };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"), "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "operand"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": ready}]},
    })
}

/// Makes the node's operands follow its deploy labels (see `Operands`).
fn simulate_operands(inner: &mut Inner, name: &str) {
    let Some(operands) = inner.operands.clone() else {
        return;
    };
    inner.version += 1;
    let version = inner.version;
    let Some(node) = inner.nodes.get_mut(name) else {
        return;
    };
    let on = |key: &str| {
        node.labels
            .get(&format!("nvidia.com/gpu.deploy.{key}"))
            .is_some_and(|v| v == "true")
    };
    let (plugin, exporter, gfd) = (
        on("device-plugin"),
        on("dcgm-exporter"),
        on("gpu-feature-discovery"),
    );
    let before = (node.allocatable.clone(), node.labels.clone());
    node.allocatable
        .retain(|k, _| !k.starts_with("nvidia.com/gpu"));
    if plugin {
        let (resource, count) = offered(&inner.config_maps, &node.labels, operands.gpus);
        node.allocatable.insert(resource, count.to_string());
    }
    let product = "nvidia.com/gpu.product".to_string();
    if gfd {
        node.labels
            .insert(product.clone(), operands.product.clone());
        node.owners
            .entry(product)
            .or_default()
            .insert("nfd-worker".into(), "Update".into());
    } else if node
        .owners
        .get(&product)
        .is_some_and(|o| o.contains_key("nfd-worker"))
    {
        node.labels.remove(&product);
        node.owners.remove(&product);
    }
    if before != (node.allocatable.clone(), node.labels.clone()) {
        node.resource_version = version;
    }
    let key = (
        "gpuprov".to_string(),
        format!("nvidia-dcgm-exporter-{name}"),
    );
    if exporter {
        let labels = BTreeMap::from([("app", "nvidia-dcgm-exporter")]);
        let pod = running_pod(&key.0, &key.1, name, &labels, operands.exporter_ready);
        if !inner.pods.contains_key(&key) {
            inner.put_pod(key, pod);
        }
    } else {
        inner.remove_pod(&key);
    }
}

/// What the device plugin offers with the config its sidecar follows (the
/// node label `gpuprov.io/device-plugin.config`, a key of the ConfigMap
/// gpuprov/gpuprov-device-plugin-configs): whole GPUs, times the replicas
/// of a shared `nvidia.com/gpu`, renamed `.shared` by `renameByDefault`.
fn offered(
    config_maps: &BTreeMap<(String, String), Value>,
    labels: &BTreeMap<String, String>,
    gpus: usize,
) -> (String, usize) {
    let plain = ("nvidia.com/gpu".to_string(), gpus);
    let Some(name) = labels.get("gpuprov.io/device-plugin.config") else {
        return plain;
    };
    let key = (
        "gpuprov".to_string(),
        "gpuprov-device-plugin-configs".to_string(),
    );
    let Some(text) = config_maps
        .get(&key)
        .and_then(|map| map["data"][name].as_str())
    else {
        return plain;
    };
    let config: Value = serde_saphyr::from_str(text).expect("gpuprov hands over YAML");
    let sharing = &config["sharing"];
    let replicated = if sharing["mps"].is_object() {
        &sharing["mps"]
    } else {
        &sharing["timeSlicing"]
    };
    let shared = replicated["resources"].as_array().and_then(|resources| {
        resources
            .iter()
            .find(|r| r["name"] == "nvidia.com/gpu" || r["name"] == "gpu")
    });
    match shared {
        Some(resource) => {
            let replicas = resource["replicas"].as_u64().unwrap() as usize;
            let name = if replicated["renameByDefault"] == true {
                "nvidia.com/gpu.shared"
            } else {
                "nvidia.com/gpu"
            };
            (name.to_string(), gpus * replicas)
        }
        None => plain,
    }
}

/// A header's value as text; empty when absent or not text.
fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn get_config_map(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    match shared
        .0
        .lock()
        .unwrap()
        .config_maps
        .get(&(ns, name.clone()))
    {
        Some(map) => axum::Json(map.clone()).into_response(),
        None => status(404, "NotFound", format!("configmaps \"{name}\" not found")),
    }
}

/// Server-side apply by one manager: the applied data replaces the old.
async fn apply_config_map(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header(&headers, "content-type");
    if content_type != "application/apply-patch+yaml" {
        return status(415, "UnsupportedMediaType", content_type.to_string());
    }
    let Ok(applied) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "configmap is not JSON".to_string());
    };
    let mut inner = shared.0.lock().unwrap();
    inner.version += 1;
    let map = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": name, "namespace": ns,
            "labels": applied["metadata"]["labels"],
            "resourceVersion": inner.version.to_string(),
        },
        "data": applied["data"],
    });
    // As the real server: server-side apply that creates answers 201.
    let created = inner.config_maps.insert((ns, name), map.clone()).is_none();
    let names: Vec<String> = inner.nodes.keys().cloned().collect();
    for node in names {
        simulate_operands(&mut inner, &node);
    }
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (code, axum::Json(map)).into_response()
}

async fn create_event(
    State(shared): State<Shared>,
    UrlPath(_ns): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "event is not JSON".to_string());
    };
    shared.0.lock().unwrap().events.push(event.clone());
    (StatusCode::CREATED, axum::Json(event)).into_response()
}

async fn create_pod(
    State(shared): State<Shared>,
    UrlPath(ns): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Ok(mut pod) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "pod is not JSON".to_string());
    };
    let Some(name) = pod["metadata"]["name"].as_str().map(str::to_string) else {
        return status(422, "Invalid", "a pod needs metadata.name".to_string());
    };
    let mut inner = shared.0.lock().unwrap();
    let key = (ns.clone(), name.clone());
    if inner.pods.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("pods \"{name}\" already exists"),
        );
    }
    pod["metadata"]["namespace"] = json!(ns);
    pod["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
    pod["status"] = json!({"phase": "Pending"});
    let mut kubelet = inner
        .kubelet
        .clone()
        .filter(|_| name.starts_with("gpuprov-cuda-vectoradd"));
    // A claim from a template that is not there is never made, and the
    // pod is never scheduled (the resource claim controller's way).
    let missing_template = pod["spec"]["resourceClaims"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["resourceClaimTemplateName"].as_str())
        .find(|t| {
            !inner
                .claim_templates
                .contains_key(&(ns.clone(), t.to_string()))
        })
        .map(str::to_string);
    if missing_template.is_some() {
        kubelet = Some(Kubelet::NeverSchedules);
    }
    match kubelet {
        Some(Kubelet::NeverSchedules) => {
            pod["status"]["conditions"] = json!([{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
            }]);
        }
        Some(Kubelet::Runs {
            phase,
            after_ms,
            log,
            exit_code,
        }) => {
            let shared = shared.clone();
            let key = key.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                let mut inner = shared.0.lock().unwrap();
                inner.pod_logs.insert(key.clone(), log);
                inner.change_pod(&key, |pod| pod["status"] = json!({
                        "phase": phase,
                        "containerStatuses": [{
                            "name": "cuda-vectoradd", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                            "state": {"terminated": {"exitCode": exit_code, "reason": if exit_code == 0 { "Completed" } else { "Error" }}},
                        }],
                    }));
            });
        }
        None => {}
    }
    inner.put_pod(key.clone(), pod);
    (StatusCode::CREATED, axum::Json(inner.pods[&key].clone())).into_response()
}

async fn pod_log(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let inner = shared.0.lock().unwrap();
    let key = (ns, name.clone());
    if !inner.pods.contains_key(&key) {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    }
    let log = inner.pod_logs.get(&key).cloned().unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = query
        .get("tailLines")
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(lines.len())
        .min(lines.len());
    let mut text = lines[lines.len() - tail..].join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    (StatusCode::OK, text).into_response()
}

/// Pods in every namespace, filtered by `spec.nodeName=` and one `k=v` label.
async fn list_all_pods(
    State(shared): State<Shared>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let watched = Watched {
        kind: "Pod",
        name: None,
        node: query
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("spec.nodeName="))
            .map(str::to_string),
        label: query
            .get("labelSelector")
            .and_then(|s| s.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string())),
    };
    if let Some(watch) = watch_of(&shared, &query, &watched) {
        return watch;
    }
    let inner = shared.0.lock().unwrap();
    let items: Vec<Value> = watched
        .objects(&inner)
        .into_values()
        .map(|(_, o)| o)
        .collect();
    axum::Json(json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": inner.version.to_string()}, "items": items,
    }))
    .into_response()
}

async fn get_pod(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    match shared.0.lock().unwrap().pods.get(&(ns, name.clone())) {
        Some(pod) => axum::Json(pod.clone()).into_response(),
        None => status(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

async fn list_pods(State(shared): State<Shared>, UrlPath(ns): UrlPath<String>) -> Response {
    let inner = shared.0.lock().unwrap();
    let items: Vec<Value> = inner
        .pods
        .iter()
        .filter(|((n, _), _)| *n == ns)
        .map(|(_, p)| p.clone())
        .collect();
    axum::Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}))
        .into_response()
}

async fn delete_pod(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    match shared.0.lock().unwrap().remove_pod(&(ns, name.clone())) {
        Some(pod) => axum::Json(pod).into_response(),
        None => status(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

async fn not_found(method: Method, OriginalUri(uri): OriginalUri) -> Response {
    status(
        404,
        "NotFound",
        format!("the fake API server has no {method} {uri}"),
    )
}

/// The Eviction API: the pod goes, unless a PodDisruptionBudget (see
/// `protect_pods`) allows no disruption: 429, as a real server answers.
async fn evict_pod(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    let mut inner = shared.0.lock().unwrap();
    if inner
        .protected
        .iter()
        .any(|(n, prefix)| *n == ns && name.starts_with(prefix.as_str()))
    {
        return status(
            429,
            "TooManyRequests",
            "Cannot evict pod as it would violate the pod's disruption budget.".to_string(),
        );
    }
    match inner.remove_pod(&(ns, name.clone())) {
        Some(_) => (
            StatusCode::CREATED,
            axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
        )
            .into_response(),
        None => status(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

fn lease_not_found(name: &str) -> Response {
    status(
        404,
        "NotFound",
        format!("leases.coordination.k8s.io \"{name}\" not found"),
    )
}

async fn list_leases(
    State(shared): State<Shared>,
    UrlPath(ns): UrlPath<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let inner = shared.0.lock().unwrap();
    let label = query.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<Value> = inner
        .leases
        .iter()
        .filter(|((n, _), _)| *n == ns)
        .filter(|(_, l)| label.is_empty() || l["metadata"]["labels"].get(&label).is_some())
        .map(|(_, l)| l.clone())
        .collect();
    axum::Json(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
        "metadata": {"resourceVersion": inner.version.to_string()}, "items": items,
    }))
    .into_response()
}

async fn get_lease(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    match shared.0.lock().unwrap().leases.get(&(ns, name.clone())) {
        Some(lease) => axum::Json(lease.clone()).into_response(),
        None => lease_not_found(&name),
    }
}

/// Creates a Lease: 409 AlreadyExists when one of that name is there.
async fn create_lease(
    State(shared): State<Shared>,
    UrlPath(ns): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON".to_string());
    };
    let name = lease["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut inner = shared.0.lock().unwrap();
    let key = (ns.clone(), name.clone());
    if inner.leases.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    inner.version += 1;
    // As the API server: a resourceVersion, a UID of its own.
    lease["metadata"]["resourceVersion"] = json!(inner.version.to_string());
    lease["metadata"]["uid"] = json!(format!("lease-uid-{}", inner.version));
    lease["metadata"]["namespace"] = json!(ns);
    inner.leases.insert(key, lease.clone());
    (StatusCode::CREATED, axum::Json(lease)).into_response()
}

/// Replaces a Lease if the resourceVersion given is its own: else 409,
/// the optimistic concurrency slots rely on.
async fn replace_lease(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON".to_string());
    };
    let mut inner = shared.0.lock().unwrap();
    let key = (ns, name.clone());
    let Some(current) = inner.leases.get(&key) else {
        return lease_not_found(&name);
    };
    if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified"
            ),
        );
    }
    inner.version += 1;
    lease["metadata"]["resourceVersion"] = json!(inner.version.to_string());
    inner.leases.insert(key, lease.clone());
    axum::Json(lease).into_response()
}

/// Deletes a Lease, with a resourceVersion precondition when one is given.
async fn delete_lease(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let options: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut inner = shared.0.lock().unwrap();
    let key = (ns, name.clone());
    let Some(current) = inner.leases.get(&key) else {
        return lease_not_found(&name);
    };
    if let Some(wanted) = options["preconditions"]["resourceVersion"].as_str()
        && current["metadata"]["resourceVersion"].as_str() != Some(wanted)
    {
        return status(
            409,
            "Conflict",
            format!("Precondition failed: ResourceVersion in precondition: {wanted}"),
        );
    }
    inner.version += 1;
    let lease = inner.leases.remove(&key).unwrap();
    axum::Json(lease).into_response()
}
