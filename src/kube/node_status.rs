//! The Node's GPU readiness: its `nvidia.com/GPUReady` condition (through
//! the status subresource, merged by type so that the kubelet's own
//! conditions stay as they are) and its taints (the whole list, replaced
//! only if nobody changed the Node since it was read).

use ::kube::api::{Patch, PatchParams};
use ::kube::core::Request;
use k8s_openapi::api::core::v1::{Node, Taint};
use serde_json::json;

use super::{Cluster, KubeError};

/// The condition's type: the name the GPU Operator's example uses.
pub const GPU_READY: &str = "nvidia.com/GPUReady";

/// A Node condition as gpuprov sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub status: bool,
    /// CamelCase: `ValidatorPassed`, `DevicePluginPending`, ….
    pub reason: String,
    pub message: String,
}

/// The Node's `GPU_READY` condition, if it has one.
pub fn gpu_ready_of(node: &Node) -> Option<Condition> {
    let condition = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == GPU_READY)?;
    Some(Condition {
        status: condition.status == "True",
        reason: condition.reason.clone().unwrap_or_default(),
        message: condition.message.clone().unwrap_or_default(),
    })
}

pub fn taints_of(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

impl Cluster {
    /// Sets the `GPU_READY` condition; `transition` when its status
    /// changes (the condition's `lastTransitionTime` moves only then).
    pub fn patch_gpu_ready(&self, wanted: &Condition, transition: bool) -> Result<(), KubeError> {
        let what = format!("PATCH node {} status ({GPU_READY})", self.node);
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let mut condition = json!({
            "type": GPU_READY,
            "status": if wanted.status { "True" } else { "False" },
            "reason": wanted.reason,
            "message": wanted.message,
            "lastHeartbeatTime": now,
        });
        if transition {
            condition["lastTransitionTime"] = now.into();
        }
        let patch = json!({"status": {"conditions": [condition]}});
        let request = Request::new("/api/v1/nodes")
            .patch_subresource(
                "status",
                &self.node,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        self.ok_or_refused(&what, code, &body)?;
        self.written_node(&body);
        Ok(())
    }

    /// The Node as it is now (its taints and resourceVersion).
    pub fn node(&self) -> Result<Node, KubeError> {
        let what = format!("GET node {}", self.node);
        let request = Request::new("/api/v1/nodes")
            .get(&self.node, &Default::default())
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        if code == 404 {
            return Err(KubeError::NodeNotFound {
                node: self.node.clone(),
                server: self.server.clone(),
            });
        }
        if code != 200 {
            return Err(self.refused(&what, code, &body));
        }
        serde_json::from_slice(&body).map_err(|e| self.not_a(&what, code, "Node", &e))
    }

    /// Another Node, by name; `None` when there is none.
    pub fn node_named(&self, name: &str) -> Result<Option<Node>, KubeError> {
        let what = format!("GET node {name}");
        let request = self.formed(
            &what,
            Request::new("/api/v1/nodes").get(name, &Default::default()),
        )?;
        match self.send(&what, request)? {
            (200, body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.not_a(&what, 200, "Node", &e)),
            (404, _) => Ok(None),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// Replaces the Node's taints with `taints`, if the Node is still at
    /// `resource_version` (a taint list is replaced whole, so a change
    /// someone made meanwhile must not be lost: the server answers 409).
    pub fn replace_taints(
        &self,
        resource_version: &str,
        taints: &[Taint],
    ) -> Result<(), KubeError> {
        let what = format!("PATCH node {} taints", self.node);
        let patch = json!({
            "metadata": {"resourceVersion": resource_version},
            "spec": {"taints": taints},
        });
        let request = Request::new("/api/v1/nodes")
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        self.ok_or_refused(&what, code, &body)?;
        self.written_node(&body);
        Ok(())
    }
}
