//! A loopback gRPC server on a real unix socket: HTTP/2, length-prefixed
//! protobuf and the `grpc-status` trailer, each call answered by a
//! handler from its path and request message. The fake kubelet
//! pod-resources server and the hostile CRI runtime use it.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

/// The server; it stops when dropped.
pub struct Server {
    _runtime: tokio::runtime::Runtime,
}

/// A call's answer: the response message, or a gRPC status code.
pub type Answer = Result<Vec<u8>, u32>;

/// Serves `handler(path, request message)` on a socket at `socket`.
pub fn serve(
    socket: &Path,
    handler: impl Fn(&str, &[u8]) -> Answer + Send + Sync + 'static,
) -> Server {
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(socket);
    let handler = Arc::new(handler);
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
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let path = request.uri().path().to_string();
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            // Past the 5-byte frame header: the message.
                            let message = body.get(5..).unwrap_or_default();
                            let mut trailers = hyper::HeaderMap::new();
                            let mut frames = Vec::new();
                            match handler(&path, message) {
                                Ok(answer) => {
                                    let mut framed = vec![0u8];
                                    framed.extend_from_slice(&(answer.len() as u32).to_be_bytes());
                                    framed.extend_from_slice(&answer);
                                    frames.push(Ok::<_, Infallible>(Frame::data(Bytes::from(
                                        framed,
                                    ))));
                                    trailers.insert("grpc-status", "0".parse().unwrap());
                                }
                                Err(code) => {
                                    trailers
                                        .insert("grpc-status", code.to_string().parse().unwrap());
                                }
                            }
                            frames.push(Ok(Frame::trailers(trailers)));
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
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    Server { _runtime: runtime }
}
