//! A fake kubelet pod-resources server: gRPC (HTTP/2, length-prefixed
//! protobuf, `grpc-status` trailer) on a real unix socket, answering
//! `v1.PodResourcesLister/List` with the pods it is given. The protobuf is
//! written out here field by field from the kubelet's `api.proto`, apart
//! from gpuprov's own message types.

use std::convert::Infallible;
use std::path::Path;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;

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
    _runtime: tokio::runtime::Runtime,
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A length-delimited field (wire type 2): a string or a message.
fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
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
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let message = encode(&pods);
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let framed = Bytes::from(framed);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(socket).unwrap()
        };
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let framed = framed.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let framed = framed.clone();
                            async move {
                                assert_eq!(request.uri().path(), "/v1.PodResourcesLister/List");
                                let mut trailers = hyper::HeaderMap::new();
                                trailers.insert("grpc-status", "0".parse().unwrap());
                                let frames = vec![
                                    Ok::<_, Infallible>(Frame::data(framed)),
                                    Ok(Frame::trailers(trailers)),
                                ];
                                let body = StreamBody::new(futures::stream::iter(frames));
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .header("content-type", "application/grpc")
                                        .body(body)
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        PodResources { _runtime: runtime }
    }
}
