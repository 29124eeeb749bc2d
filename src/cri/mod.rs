//! A client for containerd's CRI (`runtime.v1`, containerd 1.6 and later)
//! over its unix socket: gRPC by tonic, messages in `messages`.
//!
//! Only what the validator needs: the runtime's version, pod sandboxes,
//! one container, image status and pull. Answers are bounded by tonic's
//! 4 MiB message limit; callers bound the time.

pub mod messages;

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use messages::*;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to containerd's CRI socket {socket}")]
    Connect {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd's CRI {method} failed: {message}")]
    Call {
        method: &'static str,
        code: tonic::Code,
        message: String,
    },
}

impl CriError {
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Call { code, .. } => Some(*code),
            CriError::Connect { .. } => None,
        }
    }
}

/// A gRPC channel to the unix socket at `real` (containerd's CRI, the
/// kubelet's pod resources).
pub async fn unix_channel(real: PathBuf) -> Result<Channel, tonic::transport::Error> {
    // The URI is required by the API and never used: the connector dials
    // the socket.
    Endpoint::from_static("http://unix.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let real = real.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(real).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

pub struct Cri {
    grpc: tonic::client::Grpc<Channel>,
}

const RUNTIME: &str = "runtime.v1.RuntimeService";
const IMAGES: &str = "runtime.v1.ImageService";

impl Cri {
    /// Connects to the socket at `real` (a path on this machine; `shown`
    /// is the host path the user knows).
    pub async fn connect(real: PathBuf, shown: &str) -> Result<Cri, CriError> {
        let channel = unix_channel(real)
            .await
            .map_err(|source| CriError::Connect {
                socket: shown.to_string(),
                source,
            })?;
        Ok(Cri {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    async fn call<Req, Resp>(
        &mut self,
        service: &str,
        method: &'static str,
        request: Req,
    ) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let failed = |status: tonic::Status| CriError::Call {
            method,
            code: status.code(),
            message: status_text(&status),
        };
        self.grpc
            .ready()
            .await
            .map_err(|e| failed(tonic::Status::unavailable(e.to_string())))?;
        let path = format!("/{service}/{method}")
            .parse::<http::uri::PathAndQuery>()
            .expect("a gRPC method path");
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        self.grpc
            .unary(tonic::Request::new(request), path, codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(failed)
    }

    pub async fn version(&mut self) -> Result<VersionResponse, CriError> {
        let request = VersionRequest {
            version: "v1".to_string(),
        };
        self.call(RUNTIME, "Version", request).await
    }

    pub async fn run_pod_sandbox(
        &mut self,
        config: PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, CriError> {
        let request = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: runtime_handler.to_string(),
        };
        let response: RunPodSandboxResponse = self.call(RUNTIME, "RunPodSandbox", request).await?;
        Ok(response.pod_sandbox_id)
    }

    pub async fn pod_sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<PodSandboxStatusResponse, CriError> {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        self.call(RUNTIME, "PodSandboxStatus", request).await
    }

    /// The sandboxes carrying all of `labels`.
    pub async fn list_pod_sandboxes(
        &mut self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<PodSandbox>, CriError> {
        let request = ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
        };
        let response: ListPodSandboxResponse =
            self.call(RUNTIME, "ListPodSandbox", request).await?;
        Ok(response.items)
    }

    /// Stops a sandbox and its containers, then removes them all.
    pub async fn stop_and_remove_pod_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        let request = PodSandboxIdRequest {
            pod_sandbox_id: id.to_string(),
        };
        let _: Empty = self
            .call(RUNTIME, "StopPodSandbox", request.clone())
            .await?;
        let _: Empty = self.call(RUNTIME, "RemovePodSandbox", request).await?;
        Ok(())
    }

    pub async fn create_container(
        &mut self,
        sandbox: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String, CriError> {
        let request = CreateContainerRequest {
            pod_sandbox_id: sandbox.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let response: CreateContainerResponse =
            self.call(RUNTIME, "CreateContainer", request).await?;
        Ok(response.container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<(), CriError> {
        let request = ContainerIdRequest {
            container_id: id.to_string(),
        };
        let _: Empty = self.call(RUNTIME, "StartContainer", request).await?;
        Ok(())
    }

    pub async fn container_status(&mut self, id: &str) -> Result<ContainerStatus, CriError> {
        let request = ContainerIdRequest {
            container_id: id.to_string(),
        };
        let response: ContainerStatusResponse =
            self.call(RUNTIME, "ContainerStatus", request).await?;
        response.status.ok_or(CriError::Call {
            method: "ContainerStatus",
            code: tonic::Code::Internal,
            message: format!("no status for container {id}"),
        })
    }

    /// Whether containerd has the image (in its `k8s.io` namespace).
    pub async fn has_image(&mut self, image: &str) -> Result<bool, CriError> {
        let request = ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
            }),
        };
        let response: ImageStatusResponse = self.call(IMAGES, "ImageStatus", request).await?;
        Ok(response.image.is_some_and(|image| !image.id.is_empty()))
    }

    /// Pulls the image into containerd (its `k8s.io` namespace).
    pub async fn pull_image(
        &mut self,
        image: &str,
        sandbox_config: PodSandboxConfig,
    ) -> Result<(), CriError> {
        let request = PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
            }),
            sandbox_config: Some(sandbox_config),
        };
        // Its answer, the image's reference, is not needed.
        let _: Empty = self.call(IMAGES, "PullImage", request).await?;
        Ok(())
    }
}

/// containerd's message, with the transport's causes when the call never
/// reached it (`transport error: … connection reset by peer`).
fn status_text(status: &tonic::Status) -> String {
    let mut text = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    };
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        let said = error.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        cause = error.source();
    }
    text
}
