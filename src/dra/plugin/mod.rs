//! The DRA kubelet plugin `gpuprov run` serves with `devicePlugin.mode:
//! dra`: the kubelet's plugin registration (`GetInfo`,
//! `NotifyRegistrationStatus`) on `<kubeletDir>/plugins_registry/`, and
//! the DRA service (`v1` and `v1beta1` `NodePrepareResources` and
//! `NodeUnprepareResources`) with the device health stream (`v1alpha1`)
//! on `<kubeletDir>/plugins/gpu.nvidia.com/dra.sock`. gRPC by tonic's
//! server, the messages in `messages.rs`, the claims in `claims.rs`.
//!
//! Whether the kubelet registered the plugin is kept in
//! `/run/gpuprov/dra-registration.json`, which the `device-plugin` state
//! reads (with the socket answering) for its readiness.

pub mod claims;
pub mod health;
pub mod messages;

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::body::Body;

use crate::dra::DRIVER;
use crate::host::Host;
use crate::kube::Cluster;
use crate::spec::Spec;
use claims::{ClaimRef, Preparer};
use messages::*;

/// Where the registration's outcome is kept (gone at reboot, as the
/// registration is).
pub const REGISTRATION_RECORD: &str = "/run/gpuprov/dra-registration.json";
/// How long a stop waits for calls in progress.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// The most claims one call may name (the kubelet sends a pod's).
const MAX_CLAIMS_PER_CALL: usize = 1024;

/// The sockets, as host paths (what the kubelet sees).
pub fn registration_socket(spec: &Spec) -> String {
    format!("{}/plugins_registry/{DRIVER}-reg.sock", spec.kubelet_dir)
}

pub fn plugin_socket(spec: &Spec) -> String {
    format!("{}/plugins/{DRIVER}/dra.sock", spec.kubelet_dir)
}

/// What the plugin last heard from the kubelet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub socket: String,
    pub registered: bool,
    /// The kubelet's reason, when it refused the plugin.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Whether something answers at a socket (a host path).
pub fn answers(host: &Host, socket: &str) -> bool {
    host.resolve(socket)
        .is_ok_and(|real| crate::host::socket::answers(&real))
}

/// Whether a plugin answers at the registration socket and the kubelet
/// registered it: `Ok` with the registration, else why not.
pub fn serving(host: &Host, spec: &Spec) -> Result<Registration, String> {
    let socket = registration_socket(spec);
    if !answers(host, &socket) {
        return Err(format!(
            "no DRA kubelet plugin answers at {socket}: `gpuprov run` serves it"
        ));
    }
    let record = host
        .read(REGISTRATION_RECORD)
        .map_err(|e| crate::error_chain::error_chain(&e))?
        .and_then(|text| serde_json::from_str::<Registration>(&text).ok())
        .filter(|r| r.socket == socket)
        .unwrap_or_default();
    Ok(Registration { socket, ..record })
}

/// The running plugin; it stops, and takes its sockets away, when dropped
/// (the kubelet then unregisters it).
pub struct Plugin {
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

struct Shared {
    host: Host,
    spec: Mutex<Spec>,
    /// Its own connection, shared by the calls in flight (each reads its
    /// claim at once; a slow API server holds only the calls that wait on
    /// it).
    cluster: Cluster,
    /// Held from the check that a claim's devices are free to the record
    /// that takes them, so two claims never take one device.
    claims: Mutex<()>,
    registration: String,
    endpoint: String,
    /// Told when the kubelet registers the plugin (again): it may have
    /// deleted the node's slices meanwhile.
    on_registered: Box<dyn Fn() + Send + Sync>,
    health: health::Health,
}

impl Plugin {
    /// Binds both sockets and serves them on a thread of its own. A plugin
    /// already answering there (NVIDIA's DRA driver) is refused; a dead
    /// socket of the same name is replaced.
    pub fn start(
        host: &Host,
        spec: &Spec,
        cluster: &Cluster,
        on_registered: impl Fn() + Send + Sync + 'static,
    ) -> Result<Plugin, String> {
        let registration = registration_socket(spec);
        let endpoint = plugin_socket(spec);
        let registry = format!("{}/plugins_registry", spec.kubelet_dir);
        let error = |e: crate::host::HostError| crate::error_chain::error_chain(&e);
        if !host
            .stat(&registry)
            .map_err(error)?
            .is_some_and(|s| s.directory)
        {
            return Err(format!(
                "the kubelet's plugin registry {registry} does not exist (is devicePlugin.kubeletDir the kubelet's root directory?)"
            ));
        }
        host.make_dirs(&format!("{}/plugins/{DRIVER}", spec.kubelet_dir))
            .map_err(error)?;
        // The DRA socket first: the kubelet dials it once registered.
        let plugin_listener = bind(host, &endpoint)?;
        let registration_listener = bind(host, &registration)?;
        let mut own =
            Cluster::connect(&cluster.options).map_err(|e| crate::error_chain::error_chain(&e))?;
        own.requests = cluster.requests.clone();
        let shared = Arc::new(Shared {
            host: host.clone(),
            spec: Mutex::new(spec.clone()),
            cluster: own,
            claims: Mutex::new(()),
            registration: registration.clone(),
            endpoint: endpoint.clone(),
            on_registered: Box::new(on_registered),
            health: health::Health::new(host.clone(), spec.health.recover_after_seconds),
        });
        shared.record(&Registration {
            socket: registration.clone(),
            registered: false,
            error: String::new(),
        });
        let stop = Arc::new(tokio::sync::Notify::new());
        let thread = {
            let stop = stop.clone();
            let shared = shared.clone();
            crate::background::spawn("the DRA kubelet plugin", move || async move {
                let serve = |listener: std::os::unix::net::UnixListener, registration: bool| {
                    let shared = shared.clone();
                    let stop = stop.clone();
                    async move {
                        let listener = match tokio::net::UnixListener::from_std(listener) {
                            Ok(listener) => listener,
                            Err(e) => {
                                tracing::error!("the DRA kubelet plugin cannot listen: {e}");
                                return;
                            }
                        };
                        let incoming = futures::stream::unfold(listener, |listener| async move {
                            let accepted = listener.accept().await.map(|(stream, _)| stream);
                            Some((accepted, listener))
                        });
                        let service = Endpoint {
                            shared,
                            registration,
                        };
                        let served = tonic::transport::Server::builder()
                            // A kubelet makes a few calls at once; a
                            // peer opening streams without end gets no more.
                            .concurrency_limit_per_connection(64)
                            .serve_with_incoming_shutdown(service, incoming, async move {
                                stop.notified().await
                            })
                            .await;
                        if let Err(e) = served {
                            tracing::error!(
                                "the DRA kubelet plugin stopped: {}",
                                crate::error_chain::error_chain(&e)
                            );
                        }
                    }
                };
                // The kubelet keeps its connections open: a stop lets calls
                // in progress finish, for a moment, then drops them.
                let grace = {
                    let stop = stop.clone();
                    async move {
                        stop.notified().await;
                        tokio::time::sleep(STOP_GRACE).await;
                    }
                };
                tokio::select! {
                    _ = async {
                        tokio::join!(
                            serve(plugin_listener, false),
                            serve(registration_listener, true)
                        )
                    } => {}
                    () = grace => {}
                }
            })
        };
        tracing::info!(registration = %registration, endpoint = %endpoint, "serving the DRA kubelet plugin");
        Ok(Plugin {
            stop,
            thread: Some(thread),
            shared,
        })
    }

    /// The spec a reloaded config brings (CDI directory, hook, health).
    pub fn set_spec(&self, spec: &Spec) {
        self.shared
            .health
            .set_recover_after(spec.health.recover_after_seconds);
        *self
            .shared
            .spec
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = spec.clone();
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop.notify_waiters();
        self.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The sockets are gpuprov's; gone, the kubelet unregisters the
        // plugin.
        for socket in [&self.shared.registration, &self.shared.endpoint] {
            if let Err(e) = remove_socket(&self.shared.host, socket) {
                tracing::warn!("{e}");
            }
        }
        self.shared.record(&Registration {
            socket: self.shared.registration.clone(),
            registered: false,
            error: String::new(),
        });
    }
}

impl Shared {
    fn record(&self, registration: &Registration) {
        let text = serde_json::to_vec(registration).expect("serializes");
        let written = self
            .host
            .make_dirs("/run/gpuprov")
            .and_then(|()| self.host.write_atomic(REGISTRATION_RECORD, &text, 0o644));
        if let Err(e) = written {
            tracing::warn!(
                "the DRA plugin's registration is not recorded: {}",
                crate::error_chain::error_chain(&e)
            );
        }
    }

    fn spec(&self) -> Spec {
        self.spec
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn prepare(&self, claims: Vec<Claim>) -> NodePrepareResourcesResponse {
        let spec = self.spec();
        let preparer = Preparer {
            host: &self.host,
            spec: &spec,
            cluster: &self.cluster,
            claims: &self.claims,
        };
        let mut answer = NodePrepareResourcesResponse::default();
        for claim in claims {
            let claim = claim_ref(claim);
            let response = match preparer.prepare(&claim) {
                Ok(prepared) => {
                    let names: Vec<&str> =
                        prepared.devices.iter().map(|d| d.device.as_str()).collect();
                    tracing::info!(claim = %claim, devices = ?names, "prepared");
                    NodePrepareResourceResponse {
                        devices: prepared.answer(),
                        error: String::new(),
                    }
                }
                Err(error) => {
                    tracing::warn!(claim = %claim, "not prepared: {error}");
                    NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    }
                }
            };
            answer.claims.insert(claim.uid, response);
        }
        answer
    }

    fn unprepare(&self, claims: Vec<Claim>) -> NodeUnprepareResourcesResponse {
        let spec = self.spec();
        let preparer = Preparer {
            host: &self.host,
            spec: &spec,
            cluster: &self.cluster,
            claims: &self.claims,
        };
        let mut answer = NodeUnprepareResourcesResponse::default();
        for claim in claims {
            let claim = claim_ref(claim);
            let error = match preparer.unprepare(&claim) {
                Ok(()) => {
                    tracing::info!(claim = %claim, "unprepared");
                    String::new()
                }
                Err(error) => {
                    tracing::warn!(claim = %claim, "not unprepared: {error}");
                    error
                }
            };
            answer
                .claims
                .insert(claim.uid, NodeUnprepareResourceResponse { error });
        }
        answer
    }
}

fn claim_ref(claim: Claim) -> ClaimRef {
    ClaimRef {
        namespace: claim.namespace,
        name: claim.name,
        uid: claim.uid,
    }
}

/// One socket's gRPC service: the registration's calls on the
/// registration socket, the DRA service's and the health stream on the
/// plugin's.
#[derive(Clone)]
struct Endpoint {
    shared: Arc<Shared>,
    registration: bool,
}

impl tonic::server::NamedService for Endpoint {
    const NAME: &'static str = "gpuprov.DRAPlugin";
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl tower::Service<http::Request<Body>> for Endpoint {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Answer {
        let shared = self.shared.clone();
        let path = request.uri().path().to_string();
        let registration = self.registration;
        Box::pin(async move {
            Ok(match (registration, path.as_str()) {
                (true, GET_INFO) => {
                    unary(request, move |_: InfoRequest| {
                        let shared = shared.clone();
                        async move {
                            Ok(PluginInfo {
                                r#type: DRA_PLUGIN_TYPE.to_string(),
                                name: DRIVER.to_string(),
                                endpoint: shared.endpoint.clone(),
                                supported_versions: vec![
                                    DRA_V1.to_string(),
                                    DRA_V1BETA1.to_string(),
                                    HEALTH_V1ALPHA1.to_string(),
                                ],
                            })
                        }
                    })
                    .await
                }
                (true, NOTIFY_REGISTRATION_STATUS) => {
                    unary(request, move |status: RegistrationStatus| {
                        let shared = shared.clone();
                        async move {
                            let registration = Registration {
                                socket: shared.registration.clone(),
                                registered: status.plugin_registered,
                                error: crate::printable::printable(&status.error, false)
                                    .into_owned(),
                            };
                            tokio::task::spawn_blocking(move || {
                                shared.record(&registration);
                                if registration.registered {
                                    tracing::info!("the kubelet registered the DRA plugin");
                                    (shared.on_registered)();
                                    Ok(RegistrationStatusResponse {})
                                } else {
                                    tracing::error!(
                                        "the kubelet refused the DRA plugin: {}",
                                        registration.error
                                    );
                                    Err(Status::failed_precondition(format!(
                                        "registration failed: {}",
                                        registration.error
                                    )))
                                }
                            })
                            .await
                            .map_err(|e| Status::internal(e.to_string()))?
                        }
                    })
                    .await
                }
                (false, PREPARE_V1 | PREPARE_V1BETA1) => {
                    claims_call(
                        request,
                        shared,
                        |call: NodePrepareResourcesRequest| call.claims,
                        Shared::prepare,
                    )
                    .await
                }
                (false, UNPREPARE_V1 | UNPREPARE_V1BETA1) => {
                    claims_call(
                        request,
                        shared,
                        |call: NodeUnprepareResourcesRequest| call.claims,
                        Shared::unprepare,
                    )
                    .await
                }
                (false, WATCH_HEALTH) => health::watch(request, shared.health.clone()).await,
                _ => Status::unimplemented(format!("{path} is not served here")).into_http(),
            })
        })
    }
}

/// A call naming claims (prepare, unprepare), answered on a blocking
/// thread: it reads the API server and writes files.
async fn claims_call<Req, Resp>(
    request: http::Request<Body>,
    shared: Arc<Shared>,
    claims_of: fn(Req) -> Vec<Claim>,
    work: fn(&Shared, Vec<Claim>) -> Resp,
) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    unary(request, move |call: Req| {
        let shared = shared.clone();
        async move {
            let claims = claims_of(call);
            if claims.len() > MAX_CLAIMS_PER_CALL {
                return Err(Status::invalid_argument(format!(
                    "{} claims in one call, more than the {MAX_CLAIMS_PER_CALL} gpuprov takes",
                    claims.len()
                )));
            }
            tokio::task::spawn_blocking(move || work(&shared, claims))
                .await
                .map_err(|e| Status::internal(e.to_string()))
        }
    })
    .await
}

/// A unary call answered by `handler`.
async fn unary<Req, Resp, F, Fut>(request: http::Request<Body>, handler: F) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: Fn(Req) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default());
    let service = tower::service_fn(move |call: tonic::Request<Req>| {
        let answer = handler(call.into_inner());
        async move { answer.await.map(tonic::Response::new) }
    });
    grpc.unary(service, request).await
}

/// Binds a unix socket at a host path: a dead socket there (a plugin that
/// stopped without removing it) is replaced; one that answers, or
/// anything that is not a socket, is refused.
fn bind(host: &Host, socket: &str) -> Result<std::os::unix::net::UnixListener, String> {
    let real = host
        .resolve(socket)
        .map_err(|e| crate::error_chain::error_chain(&e))?;
    if let Ok(meta) = std::fs::symlink_metadata(&real) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{socket} exists and is not a socket; gpuprov leaves it"
            ));
        }
        if crate::host::socket::answers(&real) {
            return Err(format!(
                "another plugin answers at {socket} (NVIDIA's DRA driver?): gpuprov serves {DRIVER} only where nothing else does"
            ));
        }
        remove_socket(host, socket)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(&real)
        .map_err(|e| format!("cannot listen on {socket}: {e}"))?;
    // The kubelet (root) is the only caller.
    crate::host::socket::set_socket_mode(&real, 0o600)?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {socket}: {e}"))?;
    Ok(listener)
}

/// Removes a socket at a host path; anything else there is left.
fn remove_socket(host: &Host, socket: &str) -> Result<(), String> {
    let real = host
        .resolve(socket)
        .map_err(|e| crate::error_chain::error_chain(&e))?;
    match std::fs::symlink_metadata(&real) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(&real)
            .map_err(|e| format!("cannot remove the socket {socket}: {e}")),
        _ => Ok(()),
    }
}
