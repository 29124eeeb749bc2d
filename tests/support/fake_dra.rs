//! The fake API server's `resource.k8s.io/v1`: ResourceSlices (list with
//! the field selectors the real server supports, create with
//! `generateName`, replace at a resourceVersion, delete with a UID
//! precondition), ResourceClaims (get; tests add them allocated, as the
//! scheduler would) and ResourceClaimTemplates (server-side apply).
//!
//! Slices are validated as the real server validates them (device names,
//! one value per attribute, semantic versions, at most 128 devices and 32
//! attributes and capacities per device, taint effects) and stored as it
//! stores them: quantities canonical, a taint's `timeAdded` filled in.

use super::*;

/// The validation the real server does on `ResourceSlice.spec`; the
/// first problem, as its message would say it.
fn invalid(slice: &Value) -> Option<String> {
    let spec = &slice["spec"];
    if spec["driver"].as_str().is_none_or(str::is_empty) {
        return Some("spec.driver: Required value".into());
    }
    if spec["pool"]["name"].as_str().is_none_or(str::is_empty) {
        return Some("spec.pool.name: Required value".into());
    }
    if spec["pool"]["generation"].as_i64().is_none_or(|g| g < 0) {
        return Some("spec.pool.generation: Invalid value".into());
    }
    if spec["pool"]["resourceSliceCount"]
        .as_i64()
        .is_none_or(|c| c < 1)
    {
        return Some(
            "spec.pool.resourceSliceCount: Invalid value: must be greater than zero".into(),
        );
    }
    if spec["nodeName"].as_str().is_none_or(str::is_empty) {
        return Some("spec: Required value: exactly one of `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection` is required".into());
    }
    let devices = spec["devices"].as_array().cloned().unwrap_or_default();
    if devices.len() > 128 {
        return Some(format!(
            "spec.devices: Too many: {}: must have at most 128 items",
            devices.len()
        ));
    }
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    for (i, device) in devices.iter().enumerate() {
        let name = device["name"].as_str().unwrap_or_default();
        if !dns_label(name) {
            return Some(format!(
                "spec.devices[{i}].name: Invalid value: \"{name}\": a lowercase RFC 1123 label"
            ));
        }
        let attributes = device["attributes"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let capacity = device["capacity"].as_object().cloned().unwrap_or_default();
        if attributes.len() + capacity.len() > 32 {
            return Some(format!(
                "spec.devices[{i}]: Too many: {}: must have at most 32 attributes and capacities",
                attributes.len() + capacity.len()
            ));
        }
        for (key, value) in &attributes {
            let Some(value) = value.as_object() else {
                return Some(format!(
                    "spec.devices[{i}].attributes[{key}]: not an object"
                ));
            };
            let kinds: Vec<&String> = value.keys().collect();
            if kinds.len() != 1 {
                return Some(format!(
                    "spec.devices[{i}].attributes[{key}]: Invalid value: exactly one value must be specified"
                ));
            }
            match (kinds[0].as_str(), &value[kinds[0]]) {
                ("string", Value::String(s)) if s.len() <= 64 => {}
                ("int", Value::Number(n)) if n.is_i64() => {}
                ("bool", Value::Bool(_)) => {}
                ("version", Value::String(v)) if semver(v) => {}
                (kind, v) => {
                    return Some(format!(
                        "spec.devices[{i}].attributes[{key}].{kind}: Invalid value: {v}"
                    ));
                }
            }
        }
        for (key, value) in &capacity {
            if value["value"].as_str().and_then(quantity).is_none() {
                return Some(format!(
                    "spec.devices[{i}].capacity[{key}].value: Invalid value"
                ));
            }
        }
        for (t, taint) in device["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let effect = taint["effect"].as_str().unwrap_or_default();
            if !["NoSchedule", "NoExecute", "None"].contains(&effect) {
                return Some(format!(
                    "spec.devices[{i}].taints[{t}].effect: Unsupported value: \"{effect}\""
                ));
            }
            if taint["key"].as_str().is_none_or(str::is_empty) {
                return Some(format!("spec.devices[{i}].taints[{t}].key: Required value"));
            }
        }
    }
    None
}

/// Semantic versioning 2.0: three numbers without leading zeros (and
/// what may follow).
fn semver(text: &str) -> bool {
    let core = text.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        })
}

/// A whole-number quantity, in bytes or units.
fn quantity(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// As the real server stores a quantity given in binary form.
fn canonical(n: u64) -> String {
    let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let (mut m, mut e) = (n, 0);
    while m != 0 && m % 1024 == 0 && e < 6 {
        m /= 1024;
        e += 1;
    }
    format!("{m}{}", suffixes[e])
}

/// The slice as stored: quantities canonical, taints dated.
fn stored(mut slice: Value, inner: &mut Inner, name: &str, uid: &str) -> Value {
    inner.version += 1;
    slice["apiVersion"] = json!("resource.k8s.io/v1");
    slice["kind"] = json!("ResourceSlice");
    slice["metadata"]["name"] = json!(name);
    slice["metadata"]["uid"] = json!(uid);
    slice["metadata"]["resourceVersion"] = json!(inner.version.to_string());
    if let Some(obj) = slice["metadata"].as_object_mut() {
        obj.remove("generateName");
    }
    if let Some(devices) = slice["spec"]["devices"].as_array_mut() {
        for device in devices {
            if let Some(capacity) = device.get_mut("capacity").and_then(Value::as_object_mut) {
                for value in capacity.values_mut() {
                    if let Some(n) = value["value"].as_str().and_then(quantity) {
                        value["value"] = json!(canonical(n));
                    }
                }
            }
            if let Some(taints) = device.get_mut("taints").and_then(Value::as_array_mut) {
                for taint in taints {
                    if taint.get("timeAdded").is_none() {
                        taint["timeAdded"] = json!("2026-12-07T00:00:00Z");
                    }
                }
            }
        }
    }
    slice
}

pub(super) async fn list_slices(
    State(shared): State<Shared>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let mut wanted: Vec<(String, String)> = Vec::new();
    if let Some(selector) = query.get("fieldSelector") {
        for term in selector.split(',').filter(|t| !t.is_empty()) {
            let Some((field, value)) = term.split_once('=') else {
                return status(400, "BadRequest", format!("invalid field selector {term}"));
            };
            if !["spec.nodeName", "spec.driver", "spec.pool.name"].contains(&field) {
                return status(
                    400,
                    "BadRequest",
                    format!("field label not supported: {field}"),
                );
            }
            wanted.push((field.to_string(), value.to_string()));
        }
    }
    let inner = shared.0.lock().unwrap();
    let items: Vec<Value> = inner
        .resource_slices
        .values()
        .filter(|slice| {
            wanted.iter().all(|(field, value)| {
                let got = match field.as_str() {
                    "spec.nodeName" => &slice["spec"]["nodeName"],
                    "spec.driver" => &slice["spec"]["driver"],
                    _ => &slice["spec"]["pool"]["name"],
                };
                got.as_str() == Some(value.as_str())
            })
        })
        .cloned()
        .collect();
    axum::Json(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
        "metadata": {"resourceVersion": inner.version.to_string()},
        "items": items,
    }))
    .into_response()
}

pub(super) async fn create_slice(State(shared): State<Shared>, body: Bytes) -> Response {
    let Ok(slice) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON".to_string());
    };
    if let Some(problem) = invalid(&slice) {
        return status(
            422,
            "Invalid",
            format!("ResourceSlice.resource.k8s.io is invalid: {problem}"),
        );
    }
    let mut inner = shared.0.lock().unwrap();
    let name = match (
        slice["metadata"]["name"].as_str(),
        slice["metadata"]["generateName"].as_str(),
    ) {
        (Some(name), _) => name.to_string(),
        (None, Some(prefix)) => {
            inner.slice_counter += 1;
            format!("{prefix}{:05x}", inner.slice_counter)
        }
        (None, None) => return status(422, "Invalid", "metadata.name: Required value".into()),
    };
    if inner.resource_slices.contains_key(&name) {
        return status(
            409,
            "AlreadyExists",
            format!("resourceslices.resource.k8s.io \"{name}\" already exists"),
        );
    }
    let uid = format!("uid-slice-{name}");
    let slice = stored(slice, &mut inner, &name, &uid);
    inner.resource_slices.insert(name, slice.clone());
    (StatusCode::CREATED, axum::Json(slice)).into_response()
}

pub(super) async fn replace_slice(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Ok(slice) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON".to_string());
    };
    if let Some(problem) = invalid(&slice) {
        return status(
            422,
            "Invalid",
            format!("ResourceSlice.resource.k8s.io \"{name}\" is invalid: {problem}"),
        );
    }
    let mut inner = shared.0.lock().unwrap();
    let Some(current) = inner.resource_slices.get(&name).cloned() else {
        return status(
            404,
            "NotFound",
            format!("resourceslices.resource.k8s.io \"{name}\" not found"),
        );
    };
    if slice["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on resourceslices.resource.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    let uid = current["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let slice = stored(slice, &mut inner, &name, &uid);
    inner.resource_slices.insert(name, slice.clone());
    axum::Json(slice).into_response()
}

pub(super) async fn delete_slice(
    State(shared): State<Shared>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    let options: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut inner = shared.0.lock().unwrap();
    let Some(current) = inner.resource_slices.get(&name).cloned() else {
        return status(
            404,
            "NotFound",
            format!("resourceslices.resource.k8s.io \"{name}\" not found"),
        );
    };
    if let Some(uid) = options["preconditions"]["uid"].as_str()
        && Some(uid) != current["metadata"]["uid"].as_str()
    {
        return status(
            409,
            "Conflict",
            format!("Precondition failed: UID in precondition: {uid}"),
        );
    }
    inner.resource_slices.remove(&name);
    inner.version += 1;
    axum::Json(current).into_response()
}

pub(super) async fn get_claim(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    let inner = shared.0.lock().unwrap();
    match inner.resource_claims.get(&(ns, name.clone())) {
        Some(claim) => axum::Json(claim.clone()).into_response(),
        None => status(
            404,
            "NotFound",
            format!("resourceclaims.resource.k8s.io \"{name}\" not found"),
        ),
    }
}

pub(super) async fn apply_claim_template(
    State(shared): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header(&headers, "content-type");
    if content_type != "application/apply-patch+yaml" {
        return status(415, "UnsupportedMediaType", content_type.to_string());
    }
    let Ok(mut template) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON".to_string());
    };
    let mut inner = shared.0.lock().unwrap();
    inner.version += 1;
    template["metadata"]["resourceVersion"] = json!(inner.version.to_string());
    let created = inner
        .claim_templates
        .insert((ns, name), template.clone())
        .is_none();
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (code, axum::Json(template)).into_response()
}

impl FakeApi {
    /// Every ResourceSlice, by name.
    pub fn resource_slices(&self) -> BTreeMap<String, Value> {
        self.shared.0.lock().unwrap().resource_slices.clone()
    }

    /// Stores a slice as another writer made it.
    pub fn put_resource_slice(&self, mut slice: Value) {
        let mut inner = self.shared.0.lock().unwrap();
        let name = slice["metadata"]["name"].as_str().unwrap().to_string();
        inner.version += 1;
        slice["metadata"]["uid"] = json!(format!("uid-slice-{name}"));
        slice["metadata"]["resourceVersion"] = json!(inner.version.to_string());
        inner.resource_slices.insert(name, slice);
    }

    /// Deletes every slice, as the kubelet does for a driver that went.
    pub fn wipe_resource_slices(&self) {
        self.shared.0.lock().unwrap().resource_slices.clear();
    }

    /// A ResourceClaim allocated as the scheduler allocates it: each
    /// `(request, device)` from `driver`'s pool `pool`.
    pub fn add_claim(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        driver: &str,
        pool: &str,
        results: &[(&str, &str)],
    ) {
        let results: Vec<Value> = results
            .iter()
            .map(|(request, device)| {
                json!({"request": request, "driver": driver, "pool": pool, "device": device})
            })
            .collect();
        let claim = json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"devices": {"requests": []}},
            "status": {"allocation": {"devices": {"results": results}}},
        });
        self.shared
            .0
            .lock()
            .unwrap()
            .resource_claims
            .insert((namespace.to_string(), name.to_string()), claim);
    }

    /// A ResourceClaim as given, however it looks.
    pub fn put_claim(&self, namespace: &str, name: &str, claim: Value) {
        self.shared
            .0
            .lock()
            .unwrap()
            .resource_claims
            .insert((namespace.to_string(), name.to_string()), claim);
    }

    /// A ResourceClaimTemplate as applied.
    pub fn claim_template(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .0
            .lock()
            .unwrap()
            .claim_templates
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }
}
