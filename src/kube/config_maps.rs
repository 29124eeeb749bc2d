//! ConfigMaps gpuprov owns: the device plugin's configs, read and written
//! whole by server-side apply (field manager `gpuprov`).

use std::collections::BTreeMap;
use std::sync::PoisonError;

use ::kube::api::PatchParams;
use ::kube::core::Request;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::json;

use super::{Cluster, FIELD_MANAGER, KubeError};

impl Cluster {
    /// The ConfigMap's data, or `None` when there is none of that name.
    /// Under `gpuprov run`'s watches, the data gpuprov last read or wrote:
    /// a converged node does not read it again (until `gpuprov run`
    /// restarts or its config changes).
    pub fn config_map_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, KubeError> {
        let key = (namespace.to_string(), name.to_string());
        if self.view.active()
            && let Some(data) = self.remembered(&key)
        {
            return Ok(Some(data));
        }
        let what = format!("GET configmap {namespace}/{name}");
        let request = Request::new(format!("/api/v1/namespaces/{namespace}/configmaps"))
            .get(name, &Default::default())
            .expect("a valid request");
        match self.send(&what, request)? {
            (200, body) => {
                let data = serde_json::from_slice::<ConfigMap>(&body)
                    .map(|map| map.data.unwrap_or_default())
                    .map_err(|e| self.not_a(&what, 200, "ConfigMap", &e))?;
                self.remember(key, data.clone());
                Ok(Some(data))
            }
            (404, _) => Ok(None),
            (code, body) => Err(self.refused(&what, code, &body)),
        }
    }

    /// Applies exactly `data` as the ConfigMap's (creating it): keys gpuprov
    /// wrote before and no longer wants go away.
    pub fn apply_config_map(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        data: &BTreeMap<String, String>,
    ) -> Result<(), KubeError> {
        let what = format!("PATCH (apply) configmap {namespace}/{name}");
        let patch = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "data": data,
        });
        let params = PatchParams::apply(FIELD_MANAGER);
        let request = Request::new(format!("/api/v1/namespaces/{namespace}/configmaps"))
            .patch(name, &params, &::kube::api::Patch::Apply(&patch))
            .expect("a valid request");
        let (code, body) = self.send(&what, request)?;
        self.ok_or_refused(&what, code, &body)?;
        self.remember((namespace.to_string(), name.to_string()), data.clone());
        Ok(())
    }

    fn remembered(&self, key: &(String, String)) -> Option<BTreeMap<String, String>> {
        let maps = self
            .config_maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        maps.get(key).cloned()
    }

    fn remember(&self, key: (String, String), data: BTreeMap<String, String>) {
        let mut maps = self
            .config_maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        maps.insert(key, data);
    }
}
