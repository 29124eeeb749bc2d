//! A fake kubelet's side of DRA, speaking the real protocols over the
//! plugin's unix sockets: it finds the registration socket under
//! `var/lib/kubelet/plugins_registry/`, calls `GetInfo` and
//! `NotifyRegistrationStatus` as the kubelet's plugin watcher does, then
//! `NodePrepareResources` / `NodeUnprepareResources` (v1 or v1beta1) and
//! `NodeWatchResources` on the endpoint the plugin named. The messages are
//! written here from the kubelet's published `.proto` files (field
//! numbers), not taken from gpuprov.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Clone, PartialEq, prost::Message)]
pub struct InfoRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginInfo {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub endpoint: String,
    #[prost(string, repeated, tag = "4")]
    pub supported_versions: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RegistrationStatus {
    #[prost(bool, tag = "1")]
    pub plugin_registered: bool,
    #[prost(string, tag = "2")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RegistrationStatusResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Claim {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClaimsRequest {
    #[prost(message, repeated, tag = "1")]
    pub claims: Vec<Claim>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PrepareResponse {
    #[prost(map = "string, message", tag = "1")]
    pub claims: HashMap<String, PrepareResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PrepareResult {
    #[prost(message, repeated, tag = "1")]
    pub devices: Vec<Device>,
    #[prost(string, tag = "2")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Device {
    #[prost(string, repeated, tag = "1")]
    pub request_names: Vec<String>,
    #[prost(string, tag = "2")]
    pub pool_name: String,
    #[prost(string, tag = "3")]
    pub device_name: String,
    #[prost(string, repeated, tag = "4")]
    pub cdi_device_ids: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UnprepareResponse {
    #[prost(map = "string, message", tag = "1")]
    pub claims: HashMap<String, UnprepareResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UnprepareResult {
    #[prost(string, tag = "1")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceIdentifier {
    #[prost(string, tag = "1")]
    pub pool_name: String,
    #[prost(string, tag = "2")]
    pub device_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceHealth {
    #[prost(message, optional, tag = "1")]
    pub device: Option<DeviceIdentifier>,
    /// 0 unknown, 1 healthy, 2 unhealthy.
    #[prost(int32, tag = "2")]
    pub health: i32,
    #[prost(int64, tag = "3")]
    pub last_updated_time: i64,
    #[prost(int64, tag = "4")]
    pub health_check_timeout_seconds: i64,
    #[prost(string, tag = "5")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    #[prost(message, repeated, tag = "1")]
    pub devices: Vec<DeviceHealth>,
}

/// The kubelet of the host at `root`.
pub struct Kubelet {
    root: PathBuf,
    runtime: tokio::runtime::Runtime,
    /// The plugin's endpoint, a host path, once registered.
    pub endpoint: Option<String>,
}

async fn channel(socket: PathBuf) -> Result<Channel, String> {
    Endpoint::from_static("http://unix.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn call<Req, Resp>(socket: PathBuf, path: &str, request: Req) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let channel = channel(socket).await.map_err(tonic::Status::unavailable)?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        tonic::Request::new(request),
        path.parse::<http::uri::PathAndQuery>().unwrap(),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

impl Kubelet {
    pub fn new(root: &Path) -> Kubelet {
        Kubelet {
            root: root.to_path_buf(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            endpoint: None,
        }
    }

    /// Another client of the same registered plugin (for calls from
    /// several threads at once, as the kubelet makes them).
    pub fn another(&self) -> Kubelet {
        Kubelet {
            endpoint: self.endpoint.clone(),
            ..Kubelet::new(&self.root)
        }
    }

    fn in_root(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// The plugin registry's sockets.
    pub fn registry_sockets(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::FileTypeExt;
        let dir = self.root.join("var/lib/kubelet/plugins_registry");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }

    /// What the plugin watcher does with a new socket: `GetInfo`, then
    /// `NotifyRegistrationStatus` (registered when it is a DRA plugin
    /// offering a DRA service this kubelet speaks, `versions`).
    pub fn register(&mut self, versions: &[&str], within: Duration) -> PluginInfo {
        let started = Instant::now();
        let socket = loop {
            if let Some(socket) = self.registry_sockets().into_iter().next() {
                break socket;
            }
            assert!(
                started.elapsed() < within,
                "no plugin registration socket appeared in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let info: PluginInfo = loop {
            match self.runtime.block_on(call(
                socket.clone(),
                "/pluginregistration.Registration/GetInfo",
                InfoRequest {},
            )) {
                Ok(info) => break info,
                Err(e) if started.elapsed() < within => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("GetInfo failed: {e}"),
            }
        };
        let speaks = info
            .supported_versions
            .iter()
            .any(|v| versions.contains(&v.as_str()));
        let ok = info.r#type == "DRAPlugin" && speaks;
        let status = RegistrationStatus {
            plugin_registered: ok,
            error: if ok {
                String::new()
            } else {
                format!(
                    "none of the plugin's versions {:?} is supported",
                    info.supported_versions
                )
            },
        };
        let answer: Result<RegistrationStatusResponse, _> = self.runtime.block_on(call(
            socket,
            "/pluginregistration.Registration/NotifyRegistrationStatus",
            status,
        ));
        if ok {
            answer.expect("NotifyRegistrationStatus is answered");
            self.endpoint = Some(info.endpoint.clone());
        }
        info
    }

    fn endpoint(&self) -> PathBuf {
        self.in_root(self.endpoint.as_deref().expect("registered first"))
    }

    fn claims(claims: &[(&str, &str, &str)]) -> ClaimsRequest {
        ClaimsRequest {
            claims: claims
                .iter()
                .map(|(namespace, name, uid)| Claim {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    uid: uid.to_string(),
                })
                .collect(),
        }
    }

    /// `NodePrepareResources` in `version` (`v1` or `v1beta1`) for
    /// `(namespace, name, uid)` claims.
    pub fn prepare(
        &self,
        version: &str,
        claims: &[(&str, &str, &str)],
    ) -> Result<PrepareResponse, tonic::Status> {
        self.runtime.block_on(call(
            self.endpoint(),
            &format!("/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodePrepareResources"),
            Self::claims(claims),
        ))
    }

    pub fn unprepare(
        &self,
        version: &str,
        claims: &[(&str, &str, &str)],
    ) -> Result<UnprepareResponse, tonic::Status> {
        self.runtime.block_on(call(
            self.endpoint(),
            &format!("/k8s.io.kubelet.pkg.apis.dra.{version}.DRAPlugin/NodeUnprepareResources"),
            Self::claims(claims),
        ))
    }

    /// `NodeWatchResources`: its first message, then (after `change`) the
    /// next one.
    pub fn watch_health(
        &self,
        within: Duration,
        change: impl FnOnce(),
    ) -> (WatchResponse, WatchResponse) {
        let socket = self.endpoint();
        self.runtime.block_on(async move {
            let channel = channel(socket).await.unwrap();
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<WatchRequest, WatchResponse>::default();
            let mut stream = grpc
                .server_streaming(
                    tonic::Request::new(WatchRequest {}),
                    "/v1alpha1.DRAResourceHealth/NodeWatchResources"
                        .parse::<http::uri::PathAndQuery>()
                        .unwrap(),
                    codec,
                )
                .await
                .unwrap()
                .into_inner();
            let mut next = async || match tokio::time::timeout(within, stream.message()).await {
                Ok(Ok(Some(message))) => message,
                other => panic!("the health stream ended or stalled: {other:?}"),
            };
            let first = next().await;
            change();
            (first, next().await)
        })
    }
}
