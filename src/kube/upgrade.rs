//! What a rolling driver upgrade asks of the API server: the fleet's
//! upgrade slots (coordination.k8s.io Leases, taken and given back with
//! optimistic concurrency), the fleet's size, cordoning the Node, the pods
//! on it, and evictions (which a PodDisruptionBudget may refuse).

use ::kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use ::kube::core::Request;
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;

use super::{Cluster, KubeError};

/// The label every slot Lease carries, to list them in one request.
pub const SLOT_LABEL: &str = "gpuprov.io/driver-upgrade-slot";
/// The annotation that remembers a Node was unschedulable before gpuprov
/// cordoned it, so that the upgrade leaves it so.
pub const WAS_UNSCHEDULABLE: &str = "gpuprov.io/driver-upgrade.was-unschedulable";

/// A Node's name and labels.
pub type NodeLabelsOf = (String, std::collections::BTreeMap<String, String>);

/// How an eviction went.
#[derive(Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Accepted (or the pod is gone already).
    Done,
    /// Refused for now (429: a PodDisruptionBudget allows no disruption),
    /// with the server's message.
    Refused(String),
}

fn leases(namespace: &str) -> Request {
    Request::new(format!(
        "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    ))
}

impl Cluster {
    /// The fleet's slot Leases in `namespace` (those labelled `label`), in one list: from the API
    /// server's watch cache when `cached` (`resourceVersion=0`, no etcd
    /// read: what a waiting node polls; a stale answer costs only a failed
    /// take, for taking is optimistic), else as they are now.
    pub fn slot_leases(
        &self,
        namespace: &str,
        label: &str,
        cached: bool,
    ) -> Result<Vec<Lease>, KubeError> {
        let what = format!("GET leases in {namespace} ({label})");
        let params = ListParams::default().labels(label);
        let params = if cached { params.match_any() } else { params };
        let request = leases(namespace).list(&params).expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        if code != 200 {
            return Err(self.refused(&what, code, &body));
        }
        let list: k8s_openapi::List<Lease> =
            serde_json::from_slice(&body).map_err(|e| self.not_a(&what, code, "LeaseList", &e))?;
        Ok(list.items)
    }

    /// A Lease by name; `None` when there is none.
    pub fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, KubeError> {
        let what = format!("GET lease {namespace}/{name}");
        let request = leases(namespace)
            .get(name, &Default::default())
            .expect("a valid request");
        match self.send(&what, request)? {
            (200, body) => self.lease_answered(&what, 200, &body).map(Some),
            (404, _) => Ok(None),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// Creates a Lease and answers it as created; `Ok(None)` when one of
    /// that name exists (someone else was first).
    pub fn create_lease(&self, namespace: &str, lease: &Lease) -> Result<Option<Lease>, KubeError> {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        let what = format!("POST lease {namespace}/{name}");
        let request = leases(namespace)
            .create(
                &PostParams::default(),
                serde_json::to_vec(lease).expect("serializes"),
            )
            .expect("a valid request");
        match self.send(&what, request)? {
            (code @ 200..=202, body) => self.lease_answered(&what, code, &body).map(Some),
            (409, _) => Ok(None),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    fn lease_answered(&self, what: &str, code: u16, body: &[u8]) -> Result<Lease, KubeError> {
        serde_json::from_slice(body).map_err(|e| self.not_a(what, code, "Lease", &e))
    }

    /// Replaces a Lease if it is still at the resourceVersion `lease`
    /// carries, and answers it as replaced; `Ok(None)` when it changed
    /// meanwhile (409) or is gone.
    pub fn replace_lease(
        &self,
        namespace: &str,
        lease: &Lease,
    ) -> Result<Option<Lease>, KubeError> {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        let what = format!("PUT lease {namespace}/{name}");
        let request = leases(namespace)
            .replace(
                name,
                &PostParams::default(),
                serde_json::to_vec(lease).expect("serializes"),
            )
            .expect("a valid request");
        match self.send(&what, request)? {
            (code @ (200 | 201), body) => self.lease_answered(&what, code, &body).map(Some),
            (404 | 409, _) => Ok(None),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// Deletes a Lease if it is still at `resource_version`; a Lease gone
    /// or changed meanwhile is left as it is.
    pub fn delete_lease(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
    ) -> Result<(), KubeError> {
        let what = format!("DELETE lease {namespace}/{name}");
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(resource_version.to_string()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let request = leases(namespace)
            .delete(name, &params)
            .expect("a valid request");
        match self.send(&what, request)? {
            (200 | 202 | 404 | 409, _) => Ok(()),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// How many Nodes carry `label_selector` (metadata only, in pages).
    pub fn count_nodes(&self, label_selector: &str) -> Result<u64, KubeError> {
        Ok(self.nodes_labels(label_selector)?.len() as u64)
    }

    /// The name and labels of each Node that carries `label_selector`
    /// (metadata only, in pages).
    pub fn nodes_labels(&self, label_selector: &str) -> Result<Vec<NodeLabelsOf>, KubeError> {
        let what = format!("GET nodes ({label_selector})");
        // 500 a page: 200 pages is a 100,000-node fleet; a server whose
        // continue tokens never end is refused, not followed for ever.
        const MAX_PAGES: usize = 200;
        let mut nodes = Vec::new();
        let mut next: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = ListParams::default().labels(label_selector).limit(500);
            if let Some(token) = &next {
                params = params.continue_token(token);
            }
            let request = Request::new("/api/v1/nodes")
                .list_metadata(&params)
                .expect("a valid request");
            let (code, body) = self.send(&what, request)?;
            if code != 200 {
                return Err(self.refused(&what, code, &body));
            }
            let page: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| self.not_a(&what, code, "list", &e))?;
            for item in page["items"].as_array().into_iter().flatten() {
                let labels = item["metadata"]["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect();
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                nodes.push((name.to_string(), labels));
            }
            next = page["metadata"]["continue"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if next.is_none() {
                return Ok(nodes);
            }
        }
        Err(KubeError::Api {
            server: self.server.clone(),
            what,
            code: 200,
            message: format!("still more nodes after {MAX_PAGES} pages of 500"),
        })
    }

    /// Cordons the Node (remembering whether it was unschedulable
    /// already), or uncordons it unless it was so before gpuprov came.
    pub fn set_unschedulable(&self, cordon: bool) -> Result<(), KubeError> {
        let node = self.node()?;
        let annotations = node.metadata.annotations.clone().unwrap_or_default();
        let now = node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let patch = if cordon {
            if now {
                // Cordoned already: by gpuprov (a resumed upgrade, the
                // annotation says so) or by someone else (say so).
                if annotations.contains_key(WAS_UNSCHEDULABLE) {
                    return Ok(());
                }
                json!({"metadata": {"annotations": {WAS_UNSCHEDULABLE: "true"}}})
            } else {
                json!({"spec": {"unschedulable": true},
                       "metadata": {"annotations": {WAS_UNSCHEDULABLE: "false"}}})
            }
        } else {
            let before = annotations.get(WAS_UNSCHEDULABLE).map(String::as_str);
            match before {
                None => return Ok(()),
                Some("true") => json!({"metadata": {"annotations": {WAS_UNSCHEDULABLE: null}}}),
                Some(_) => json!({"spec": {"unschedulable": null},
                                  "metadata": {"annotations": {WAS_UNSCHEDULABLE: null}}}),
            }
        };
        let what = format!(
            "PATCH node {} ({})",
            self.node,
            if cordon { "cordon" } else { "uncordon" }
        );
        let request = Request::new("/api/v1/nodes")
            .patch(
                &self.node,
                &Default::default(),
                &::kube::api::Patch::Merge(&patch),
            )
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        self.ok_or_refused(&what, code, &body)?;
        self.written_node(&body);
        Ok(())
    }

    /// Asks the Eviction API to evict a pod (PodDisruptionBudgets honoured).
    pub fn evict(&self, namespace: &str, name: &str) -> Result<Eviction, KubeError> {
        let what = format!("POST eviction of pod {namespace}/{name}");
        let eviction = json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        });
        let request = http::Request::post(format!(
            "/api/v1/namespaces/{namespace}/pods/{name}/eviction"
        ))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&eviction).unwrap_or_default());
        let request = self.formed(&what, request)?;
        match self.send_answering_429(&what, request)? {
            (200..=202 | 404, _) => Ok(Eviction::Done),
            (429, body) => Ok(Eviction::Refused(super::status_message(&body))),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }
}
