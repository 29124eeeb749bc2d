//! Which pod uses which GPU, as dcgm-exporter finds it: the kubelet's
//! pod-resources API (`List` on `/var/lib/kubelet/pod-resources/kubelet.sock`)
//! gives each container's devices; the device plugin's device ids are the
//! GPUs' UUIDs (`GPU-…`, `MIG-…`), with `::<n>` for a time-sliced replica.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::host::Host;

/// The kubelet's pod-resources socket, a host path.
pub const SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// A kubelet that does not answer within this does not delay a scrape more.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The longest name kept from the kubelet: Kubernetes' own limit for a
/// pod's name (a namespace's and a container's are shorter). A longer one
/// from a hostile kubelet is cut here, so a scrape's answer stays small.
const NAME_CAP: usize = 253;
/// The most devices whose users are kept: far more than a node's GPUs and
/// their MIG devices and replicas.
const DEVICES_CAP: usize = 4096;

/// A container using a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

// The `v1` pod-resources messages, the fields read (prost skips others).
#[derive(Clone, PartialEq, prost::Message)]
struct ListPodResourcesRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct ListPodResourcesResponse {
    #[prost(message, repeated, tag = "1")]
    pod_resources: Vec<PodResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PodResources {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    namespace: String,
    #[prost(message, repeated, tag = "3")]
    containers: Vec<ContainerResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerResources {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, repeated, tag = "2")]
    devices: Vec<ContainerDevices>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerDevices {
    #[prost(string, tag = "1")]
    resource_name: String,
    #[prost(string, repeated, tag = "2")]
    device_ids: Vec<String>,
}

/// Each NVIDIA device's UUID → the container using it (the first, by
/// namespace, pod and container, when replicas share it). No socket: no
/// users; a kubelet that fails or does not answer in time is an error.
pub fn users(host: &Host) -> Result<BTreeMap<String, User>, String> {
    let Ok(real) = host.resolve(SOCKET) else {
        return Ok(BTreeMap::new());
    };
    if !real.exists() {
        return Ok(BTreeMap::new());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let response = runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, list(real))
            .await
            .map_err(|_| {
                format!("the kubelet's pod resources ({SOCKET}) did not answer within {TIMEOUT:?}")
            })?
    })?;
    let mut users = BTreeMap::new();
    let mut pods = response.pod_resources;
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for pod in pods {
        for container in &pod.containers {
            for devices in container
                .devices
                .iter()
                .filter(|d| d.resource_name.starts_with("nvidia.com/"))
            {
                for id in &devices.device_ids {
                    let uuid = clipped(id.split("::").next().unwrap_or(id));
                    if users.len() >= DEVICES_CAP && !users.contains_key(&uuid) {
                        continue;
                    }
                    users.entry(uuid).or_insert_with(|| User {
                        namespace: clipped(&pod.namespace),
                        pod: clipped(&pod.name),
                        container: clipped(&container.name),
                    });
                }
            }
        }
    }
    Ok(users)
}

/// A name from the kubelet, at most `NAME_CAP` bytes.
fn clipped(name: &str) -> String {
    let mut end = name.len().min(NAME_CAP);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

async fn list(real: std::path::PathBuf) -> Result<ListPodResourcesResponse, String> {
    let channel = crate::cri::unix_channel(real)
        .await
        .map_err(|e| format!("cannot reach the kubelet's pod resources ({SOCKET}): {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| format!("the kubelet's pod resources ({SOCKET}): {e}"))?;
    let path = "/v1.PodResourcesLister/List"
        .parse::<http::uri::PathAndQuery>()
        .expect("a gRPC method path");
    let codec =
        tonic_prost::ProstCodec::<ListPodResourcesRequest, ListPodResourcesResponse>::default();
    grpc.unary(tonic::Request::new(ListPodResourcesRequest {}), path, codec)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| {
            format!(
                "the kubelet's pod resources ({SOCKET}) refused List: {:?} {}",
                status.code(),
                status.message()
            )
        })
}
