//! Dynamic Resource Allocation's objects (`resource.k8s.io/v1`, Kubernetes
//! 1.34 and later): this node's ResourceSlices (listed, created, replaced,
//! deleted), the ResourceClaims the kubelet asks the plugin to prepare
//! (read), and the validation pod's ResourceClaimTemplate (applied).
//!
//! The slice gpuprov last wrote or read is remembered, so that a converged
//! node sends nothing: it is read again only when `gpuprov run` restarts,
//! or when the kubelet registers the plugin again (it may have deleted the
//! slices meanwhile, as it does for a driver that is gone).

use std::sync::PoisonError;

use ::kube::api::{DeleteParams, ListParams, PatchParams, PostParams};
use ::kube::core::Request;
use serde_json::Value;

use super::{Cluster, FIELD_MANAGER, KubeError};

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

/// A slice write the server refused because another writer changed the
/// slice first (409): read it again and decide again.
#[derive(Debug)]
pub struct Conflict;

impl Cluster {
    /// This node's slices of `driver`, as the API server has them: the
    /// remembered ones when there are.
    pub fn resource_slices(&self, driver: &str) -> Result<Vec<Value>, KubeError> {
        if let Some(slices) = self.remembered_slices() {
            return Ok(slices);
        }
        let what = format!("GET resourceslices of {driver} on node {}", self.node);
        let params = ListParams::default()
            .fields(&format!("spec.nodeName={},spec.driver={driver}", self.node));
        let request = Request::new(SLICES).list(&params).expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        match code {
            200 => {}
            404 => {
                return Err(KubeError::Api {
                    server: self.server.clone(),
                    what,
                    code,
                    message: "the API server does not serve resource.k8s.io/v1 (DRA needs \
                              Kubernetes 1.34 or later)"
                        .to_string(),
                });
            }
            _ => return Err(self.refused(&what, code, &body)),
        }
        let list: Value =
            serde_json::from_slice(&body).map_err(|e| self.not_a(&what, code, "list", &e))?;
        let items = match list.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => {
                return Err(KubeError::Api {
                    server: self.server.clone(),
                    what,
                    code,
                    message: "the answer's items are not a list".to_string(),
                });
            }
        };
        // The field selector is the server's to apply; a server that
        // ignored it must not hand gpuprov another node's slices.
        let items: Vec<Value> = items
            .into_iter()
            .filter(|s| {
                s["spec"]["nodeName"].as_str() == Some(self.node.as_str())
                    && s["spec"]["driver"].as_str() == Some(driver)
            })
            .collect();
        self.remember_slices(Some(items.clone()));
        Ok(items)
    }

    /// Creates a slice (its name generated from `metadata.generateName`);
    /// the slice as stored.
    pub fn create_resource_slice(&self, slice: &Value) -> Result<Value, KubeError> {
        let what = format!("POST resourceslice for node {}", self.node);
        let request = Request::new(SLICES)
            .create(
                &PostParams::default(),
                serde_json::to_vec(slice).expect("serializes"),
            )
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        if code != 201 && code != 200 {
            self.remember_slices(None);
            return Err(self.refused(&what, code, &body));
        }
        let stored: Value = serde_json::from_slice(&body)
            .map_err(|e| self.not_a(&what, code, "ResourceSlice", &e))?;
        self.remember_slices(Some(vec![as_sent(slice, &stored)]));
        Ok(stored)
    }

    /// Replaces a slice at the `metadata.resourceVersion` it carries; a
    /// conflict when someone changed it since.
    pub fn replace_resource_slice(
        &self,
        name: &str,
        slice: &Value,
    ) -> Result<Result<Value, Conflict>, KubeError> {
        let what = format!("PUT resourceslice {name}");
        let request = Request::new(SLICES)
            .replace(
                name,
                &PostParams::default(),
                serde_json::to_vec(slice).expect("serializes"),
            )
            .map_err(|e| e.to_string());
        let request = self.formed(&what, request)?;
        let (code, body) = self.send(&what, request)?;
        match code {
            200 | 201 => {
                let stored: Value = serde_json::from_slice(&body)
                    .map_err(|e| self.not_a(&what, code, "ResourceSlice", &e))?;
                self.remember_slices(Some(vec![as_sent(slice, &stored)]));
                Ok(Ok(stored))
            }
            409 | 404 => {
                self.remember_slices(None);
                Ok(Err(Conflict))
            }
            _ => {
                self.remember_slices(None);
                Err(self.refused(&what, code, &body))
            }
        }
    }

    /// Deletes a slice (its UID as a precondition, so that a slice of that
    /// name made since is left); one already gone is fine.
    pub fn delete_resource_slice(&self, name: &str, uid: Option<&str>) -> Result<(), KubeError> {
        let what = format!("DELETE resourceslice {name}");
        let params = DeleteParams {
            preconditions: uid.map(|uid| ::kube::api::Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let request = Request::new(SLICES)
            .delete(name, &params)
            .map_err(|e| e.to_string());
        let request = self.formed(&what, request)?;
        self.remember_slices(None);
        match self.send(&what, request)? {
            (200 | 202 | 404, _) => Ok(()),
            (409, _) => Ok(()),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// Forgets the slices remembered: the next converge reads them again.
    pub fn forget_resource_slices(&self) {
        self.remember_slices(None);
    }

    /// A ResourceClaim, or `None` when there is none of that name.
    pub fn resource_claim(&self, namespace: &str, name: &str) -> Result<Option<Value>, KubeError> {
        let what = format!("GET resourceclaim {namespace}/{name}");
        let request = Request::new(format!(
            "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims"
        ))
        .get(name, &Default::default())
        .map_err(|e| e.to_string());
        let request = self.formed(&what, request)?;
        match self.send(&what, request)? {
            (200, body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.not_a(&what, 200, "ResourceClaim", &e)),
            (404, _) => Ok(None),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// Applies a ResourceClaimTemplate (server-side apply, field manager
    /// `gpuprov`).
    pub fn apply_resource_claim_template(
        &self,
        namespace: &str,
        name: &str,
        template: &Value,
    ) -> Result<(), KubeError> {
        let what = format!("PATCH (apply) resourceclaimtemplate {namespace}/{name}");
        let params = PatchParams::apply(FIELD_MANAGER);
        let request = Request::new(format!(
            "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaimtemplates"
        ))
        .patch(name, &params, &::kube::api::Patch::Apply(template))
        .map_err(|e| e.to_string());
        let request = self.formed(&what, request)?;
        let (code, body) = self.send(&what, request)?;
        self.ok_or_refused(&what, code, &body)
    }

    fn remembered_slices(&self) -> Option<Vec<Value>> {
        self.resource_slices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn remember_slices(&self, slices: Option<Vec<Value>>) {
        *self
            .resource_slices
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = slices;
    }
}

/// The slice as gpuprov sent it, with the identity the server gave it
/// (name, UID, resourceVersion): what a later converge compares with, so
/// that a field the server drops or fills in (a taint's `timeAdded`; taints
/// on a server without device taints) does not make every converge write.
fn as_sent(sent: &Value, stored: &Value) -> Value {
    let mut remembered = sent.clone();
    for key in ["name", "uid", "resourceVersion"] {
        if let Some(value) = stored["metadata"].get(key) {
            remembered["metadata"][key] = value.clone();
        }
    }
    remembered
}
