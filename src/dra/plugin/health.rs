//! Device health for the kubelet (KEP-4680, `v1alpha1.DRAResourceHealth`,
//! beta in Kubernetes 1.36): `NodeWatchResources` streams every published
//! device's health, at once and again whenever it changes. A device is
//! unhealthy while its GPU has a critical error younger than
//! `health.recoverAfterSeconds` (the XIDs `gpuprov run` records, as the
//! `gpu-health` state reads them); the kubelet shows it in the pods' status.

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tonic::Status;
use tonic::body::Body;

use super::messages::*;
use crate::dra::Published;
use crate::host::Host;

/// How often the stream looks at the errors again.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// Where health comes from.
#[derive(Clone)]
pub struct Health {
    host: Host,
    recover_after: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Health {
    pub fn new(host: Host, recover_after: u64) -> Health {
        Health {
            host,
            recover_after: std::sync::Arc::new(recover_after.into()),
        }
    }

    pub fn set_recover_after(&self, seconds: u64) {
        self.recover_after
            .store(seconds, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every published device's health now.
    pub fn now(&self) -> NodeWatchResourcesResponse {
        let Ok(Some(published)) = Published::read(&self.host) else {
            return NodeWatchResourcesResponse::default();
        };
        let recover_after = self
            .recover_after
            .load(std::sync::atomic::Ordering::Relaxed);
        let errors = crate::gpu::xid::recent(&self.host, recover_after);
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let devices = published
            .devices
            .iter()
            .map(|device| {
                let error = errors.iter().rev().find(|e| e.uuid == device.gpu);
                DeviceHealth {
                    device: Some(DeviceIdentifier {
                        pool_name: published.pool.clone(),
                        device_name: device.name.clone(),
                    }),
                    health: if error.is_some() { UNHEALTHY } else { HEALTHY },
                    last_updated_time: at,
                    health_check_timeout_seconds: 0,
                    message: error
                        .map(|e| {
                            format!(
                                "XID {} ({}) {}s ago",
                                e.xid,
                                crate::gpu::xid::meaning(e.xid),
                                crate::gpu::xid::age(e)
                            )
                        })
                        .unwrap_or_default(),
                }
            })
            .collect();
        NodeWatchResourcesResponse { devices }
    }
}

type Updates = Pin<Box<dyn Stream<Item = Result<NodeWatchResourcesResponse, Status>> + Send>>;

/// `NodeWatchResources`: the health now, then each change, until the
/// kubelet hangs up.
pub async fn watch(request: http::Request<Body>, health: Health) -> http::Response<Body> {
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
        NodeWatchResourcesResponse,
        NodeWatchResourcesRequest,
    >::default());
    let service = tower::service_fn(move |_: tonic::Request<NodeWatchResourcesRequest>| {
        let health = health.clone();
        async move {
            let updates = futures::stream::unfold(
                (health, None::<Vec<(String, i32, String)>>),
                |(health, last)| async move {
                    loop {
                        if last.is_some() {
                            tokio::time::sleep(LOOK_EVERY).await;
                        }
                        let (now, shown) = {
                            let health = health.clone();
                            tokio::task::spawn_blocking(move || {
                                let now = health.now();
                                let shown = summary(&now);
                                (now, shown)
                            })
                            .await
                            .ok()?
                        };
                        if last.as_ref() != Some(&shown) {
                            return Some((Ok(now), (health, Some(shown))));
                        }
                    }
                },
            );
            Ok::<_, Status>(tonic::Response::new(Box::pin(updates) as Updates))
        }
    });
    grpc.server_streaming(service, request).await
}

/// What a change is judged by: each device's health and message (not the
/// time it was looked at).
fn summary(response: &NodeWatchResourcesResponse) -> Vec<(String, i32, String)> {
    response
        .devices
        .iter()
        .map(|d| {
            (
                d.device
                    .as_ref()
                    .map(|d| d.device_name.clone())
                    .unwrap_or_default(),
                d.health,
                // The age in the message changes every second; the XID
                // does not.
                d.message.split(')').next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
