//! A fake kubelet pod-resources server: gRPC (HTTP/2, length-prefixed
//! protobuf, `grpc-status` trailer) on a real unix socket, answering
//! `v1.PodResourcesLister/List` with the pods it is given. The protobuf is
//! written out here field by field from the kubelet's `api.proto`, apart
//! from gpuprov's own message types.

use std::path::Path;

/// A pod's container and the devices it holds: `(resource, ids)`.
pub struct Container {
    pub name: &'static str,
    pub devices: Vec<(&'static str, Vec<String>)>,
}

pub struct Pod {
    pub namespace: &'static str,
    pub name: &'static str,
    pub containers: Vec<Container>,
}

/// The server; it stops when dropped.
pub struct PodResources {
    _server: super::grpc::Server,
}

pub fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A length-delimited field (wire type 2): a string or a message.
pub fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(tag << 3 | 2);
    varint(bytes.len(), out);
    out.extend_from_slice(bytes);
}

/// `ListPodResourcesResponse { repeated PodResources pod_resources = 1 }`,
/// `PodResources { name = 1; namespace = 2; repeated ContainerResources
/// containers = 3 }`, `ContainerResources { name = 1; repeated
/// ContainerDevices devices = 2 }`, `ContainerDevices { resource_name = 1;
/// repeated string device_ids = 2 }`.
fn encode(pods: &[Pod]) -> Vec<u8> {
    let mut response = Vec::new();
    for pod in pods {
        let mut message = Vec::new();
        field(1, pod.name.as_bytes(), &mut message);
        field(2, pod.namespace.as_bytes(), &mut message);
        for container in &pod.containers {
            let mut resources = Vec::new();
            field(1, container.name.as_bytes(), &mut resources);
            for (resource, ids) in &container.devices {
                let mut devices = Vec::new();
                field(1, resource.as_bytes(), &mut devices);
                for id in ids {
                    field(2, id.as_bytes(), &mut devices);
                }
                field(2, &devices, &mut resources);
            }
            field(3, &resources, &mut message);
        }
        field(1, &message, &mut response);
    }
    response
}

impl PodResources {
    /// Serves `pods` on a socket at `socket`.
    pub fn serve(socket: &Path, pods: Vec<Pod>) -> PodResources {
        let message = encode(&pods);
        let server = super::grpc::serve(socket, move |path, _| {
            assert_eq!(path, "/v1.PodResourcesLister/List");
            Ok(message.clone())
        });
        PodResources { _server: server }
    }
}
