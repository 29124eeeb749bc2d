//! Pods: the operands' pods on this node (read), and the validation pod
//! (created, watched by polling, its log read, deleted).

use ::kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use ::kube::core::Request;
use k8s_openapi::api::core::v1::Pod;

use super::{Cluster, KubeError};

impl Cluster {
    /// Pods on this node carrying `label_selector`, in every namespace
    /// (the GPU Operator runs its operands in its own namespace, we in ours).
    /// Under `gpuprov run`, the pods its watch follows come from the watch.
    pub fn pods_on_node(&self, label_selector: &str) -> Result<Vec<Pod>, KubeError> {
        if label_selector == super::view::WATCHED_PODS
            && let Some(pods) = self.view.pods()
        {
            return Ok(pods);
        }
        self.list_pods_on_node(label_selector)
    }

    /// Pods bound to this node carrying `label_selector` (empty: all),
    /// from the API server.
    pub fn list_pods_on_node(&self, label_selector: &str) -> Result<Vec<Pod>, KubeError> {
        let what = if label_selector.is_empty() {
            format!("GET pods on node {}", self.node)
        } else {
            format!("GET pods on node {} ({label_selector})", self.node)
        };
        let mut params = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        if !label_selector.is_empty() {
            params = params.labels(label_selector);
        }
        let request = Request::new("/api/v1/pods")
            .list(&params)
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        if code != 200 {
            return Err(self.refused(&what, code, &body));
        }
        let list: k8s_openapi::List<Pod> =
            serde_json::from_slice(&body).map_err(|e| self.not_a(&what, code, "PodList", &e))?;
        Ok(list.items)
    }

    /// Creates a pod; `Ok(false)` when one of that name exists already.
    pub fn create_pod(&self, namespace: &str, pod: &serde_json::Value) -> Result<bool, KubeError> {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("POST pod {namespace}/{name}");
        let request = Request::new(format!("/api/v1/namespaces/{namespace}/pods"))
            .create(
                &PostParams::default(),
                serde_json::to_vec(pod).expect("serializes"),
            )
            .expect("a valid request");
        match self.send(&what, request)? {
            (200..=202, _) => Ok(true),
            (409, _) => Ok(false),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// The pod, or `None` once it is gone.
    pub fn get_pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, KubeError> {
        let what = format!("GET pod {namespace}/{name}");
        let request = Request::new(format!("/api/v1/namespaces/{namespace}/pods"))
            .get(name, &Default::default())
            .expect("a valid request");
        match self.send(&what, request)? {
            (200, body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.not_a(&what, 200, "Pod", &e)),
            (404, _) => Ok(None),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// Deletes the pod at once (no grace period); a missing pod is fine.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), KubeError> {
        self.delete_pod_within(namespace, name, Some(0))
    }

    /// Deletes a pod with `grace` seconds to stop (`None`: its own
    /// `terminationGracePeriodSeconds`, as a workload's should get).
    pub fn delete_pod_within(
        &self,
        namespace: &str,
        name: &str,
        grace: Option<u32>,
    ) -> Result<(), KubeError> {
        let what = format!("DELETE pod {namespace}/{name}");
        let params = DeleteParams {
            grace_period_seconds: grace,
            ..DeleteParams::default()
        };
        let request =
            Request::new(format!("/api/v1/namespaces/{namespace}/pods")).delete(name, &params);
        let request = self.formed(&what, request)?;
        match self.send(&what, request)? {
            (200 | 202 | 404, _) => Ok(()),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// The last `lines` lines of the pod's log.
    pub fn pod_log(&self, namespace: &str, name: &str, lines: i64) -> Result<String, KubeError> {
        let what = format!("GET log of pod {namespace}/{name}");
        let params = LogParams {
            tail_lines: Some(lines),
            ..LogParams::default()
        };
        let request = Request::new(format!("/api/v1/namespaces/{namespace}/pods"))
            .logs(name, &params)
            .expect("a valid request");
        match self.send(&what, request)? {
            (200, body) => Ok(String::from_utf8_lossy(&body).into_owned()),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `phase` and, where there is one, why it is not further along: the first
/// condition that is not True, or a container's waiting or terminated reason.
pub fn describe(pod: &Pod) -> String {
    let Some(status) = &pod.status else {
        return "no status yet".to_string();
    };
    let mut text = status
        .phase
        .clone()
        .unwrap_or_else(|| "no phase".to_string());
    let condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.status != "True")
        .map(|c| {
            let why = [c.reason.as_deref(), c.message.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            format!(
                "{} {}{}",
                c.type_,
                c.status,
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                }
            )
        });
    let container = status.container_statuses.iter().flatten().find_map(|c| {
        let state = c.state.as_ref()?;
        if let Some(waiting) = &state.waiting {
            return waiting.reason.clone().map(|r| format!("{}: {r}", c.name));
        }
        state.terminated.as_ref().map(|t| {
            format!(
                "{}: exit code {}{}",
                c.name,
                t.exit_code,
                t.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        })
    });
    for part in [condition, container].into_iter().flatten() {
        text.push_str(", ");
        text.push_str(&part);
    }
    text
}
