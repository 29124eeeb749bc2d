//! The `validator` state: the last mile, a CUDA program runs.
//!
//! With an API server: the seed's `cuda-vectoradd` pod, pinned to this node
//! by node affinity (so the scheduler still checks its `nvidia.com/gpu`
//! request), with the runtime class unless nvidia is containerd's default.
//! gpuprov waits for it to succeed and deletes it. A pass is remembered in
//! a marker under `/run` (gone at reboot) holding what was validated, so a
//! converged node does not run the pod again until it reboots or the
//! driver, runtime class, image or GPU count changes.
//!
//! Without one (or with `validator.mode: cri`): a container through
//! containerd's CRI with the runtime handler (`cri`). Without an API
//! server and without containerd's socket, or with `validator.mode: host`:
//! host checks only (NVML sees every GPU on the nvidia driver, the device
//! nodes exist, the runtime binary runs). A host with no NVML library at
//! all is noted rather than failed, as gpu-health does.

pub mod cri;

use std::time::{Duration, Instant};

use serde_json::json;

use crate::kube::Cluster;
use crate::kube::pods::describe;
use crate::report::RevertReport;
use crate::spec::ValidatorMode;
use crate::state::{
    CapabilityChange, Change, MakeContext, Observation, Outcome, RevertContext, StateContext,
    StateError, error_chain, json_fields,
};

/// Where a pass is remembered until reboot.
pub const MARKER: &str = "/run/gpuprov/validations/cuda-vectoradd.json";
/// Without an API server: the runtime binary that ran, until reboot.
pub const RUNTIME_RAN: &str = "/run/gpuprov/validations/runtime-binary.json";
/// How many log lines a failure quotes.
const LOG_LINES: i64 = 20;

/// Whether vectorAdd passed since boot with this driver version loaded
/// (its remembered pass names the driver).
pub fn passed_with_driver(host: &crate::host::Host, version: &str) -> Result<bool, StateError> {
    let Some(text) = host.read(MARKER)? else {
        return Ok(false);
    };
    let record: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    Ok(record["driver"].as_str() == Some(version))
}

/// The validator, and a rolling driver upgrade waiting on it: once it
/// passes, the same converge uncordons the node and ends the upgrade; if
/// it fails (or times out), the upgrade failed.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let mut obs = validate(ctx)?;
    let finish = crate::upgrade::finishing_changes(ctx);
    if !finish.is_empty() {
        if !obs.changes.is_empty() {
            obs.on_failure = Some(crate::upgrade::failure(ctx, 0));
        }
        if obs.changes.is_empty() && obs.outcome == Outcome::Ready {
            obs.on_change = Outcome::Ready;
            obs.changes = finish;
        } else if obs.on_change == Outcome::Ready {
            obs.changes.extend(finish);
        }
    }
    Ok(obs)
}

fn validate(ctx: &StateContext) -> Result<Observation, StateError> {
    let socket = &crate::runtime::cri_socket(ctx.host, &ctx.spec.containerd);
    match (ctx.spec.validator.mode, ctx.cluster) {
        (ValidatorMode::Auto | ValidatorMode::Pod, Some(cluster)) => observe_pod(ctx, cluster),
        (ValidatorMode::Pod, None) => Ok(Observation::new(
            Outcome::Failed,
            "validator.mode is pod, but gpuprov runs without an API server (give it a kubeconfig, or use validator.mode cri)"
                .to_string(),
        )),
        (ValidatorMode::Cri, _) => cri_or_host(ctx, false),
        // auto probes: a containerd that serves no CRI gets host checks.
        (ValidatorMode::Auto, None) if ctx.host.exists(socket)? => cri_or_host(ctx, true),
        (ValidatorMode::Auto, None) => host_checks(
            ctx,
            &format!("no API server, and no containerd socket at {socket} for a container"),
        ),
        (ValidatorMode::Host, _) => host_checks(ctx, "validator.mode host"),
    }
}

fn cri_or_host(ctx: &StateContext, probe: bool) -> Result<Observation, StateError> {
    match cri::observe(ctx, probe)? {
        Some(obs) => Ok(obs),
        None => host_checks(
            ctx,
            &format!(
                "no API server, and containerd at {} serves no CRI",
                crate::runtime::cri_socket(ctx.host, &ctx.spec.containerd)
            ),
        ),
    }
}

/// The loaded driver's version, part of what a pass validated.
fn driver_version(ctx: &StateContext) -> Result<Option<String>, StateError> {
    Ok(crate::driver::detect::detect(ctx.host)
        .map_err(|e| StateError::operator(error_chain(&e)))?
        .map(|d| d.version))
}

/// The runtime class the validation pod names: none when nvidia is the default.
fn runtime_class(ctx: &StateContext) -> Option<String> {
    let containerd = &ctx.spec.containerd;
    (!containerd.set_as_default).then(|| containerd.runtime_class.clone())
}

fn pod_name(node: &str) -> String {
    // A pod name is a DNS subdomain: 253 characters.
    let mut name = format!("gpuprov-cuda-vectoradd-{node}");
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_string()
}

fn observe_pod(ctx: &StateContext, cluster: &Cluster) -> Result<Observation, StateError> {
    let validator = &ctx.spec.validator;
    let validated = json!({
        "node": cluster.node,
        "image": validator.image,
        "runtimeClass": runtime_class(ctx),
        "gpus": super::gpu_count(ctx),
        "driver": driver_version(ctx)?,
    });
    let record = serde_json::to_string_pretty(&validated).expect("serializes") + "\n";
    let previous = ctx.host.read(MARKER)?;
    if previous.as_deref() == Some(record.as_str()) {
        return Ok(Observation::new(
            Outcome::Ready,
            format!(
                "vectorAdd passed on this node since boot ({})",
                validator.image
            ),
        ));
    }
    let name = pod_name(&cluster.node);
    let manifest = manifest(ctx, &cluster.node, &name);
    let mut obs = Observation::new(
        Outcome::Pending,
        if previous.is_some() {
            "validated before, but the driver, runtime class, image or GPU count changed since"
                .to_string()
        } else {
            "vectorAdd has not run on this node since boot".to_string()
        },
    );
    obs.on_change = Outcome::Ready;
    obs.changes = vec![
        Change::own(ValidationPod {
            namespace: validator.namespace.clone(),
            name,
            image: validator.image.clone(),
            runtime_class: runtime_class(ctx),
            timeout_seconds: validator.timeout_seconds,
            claim_template: (ctx.spec.device_plugin_mode == crate::spec::PluginMode::Dra)
                .then(|| claim_template(&validator.namespace)),
            manifest,
        }),
        Change::WriteFile {
            path: MARKER.to_string(),
            content: record.into_bytes(),
            mode: 0o644,
            purpose: "the pass, remembered until reboot".to_string(),
            diff: None,
        },
    ];
    Ok(obs)
}

/// The seed's `cuda-vectoradd` pod, pinned to `node`. `restartPolicy:
/// Never` (the seed has `OnFailure`) so that a failure is final and its log
/// can be read, instead of a restart loop.
fn manifest(ctx: &StateContext, node: &str, name: &str) -> serde_json::Value {
    let validator = &ctx.spec.validator;
    let dra = ctx.spec.device_plugin_mode == crate::spec::PluginMode::Dra;
    let mut container = json!({
        "name": "cuda-vectoradd",
        "image": validator.image,
        "resources": if dra {
            json!({"claims": [{"name": "gpu"}]})
        } else {
            json!({"limits": {super::GPU_RESOURCE: 1}})
        },
    });
    if let Some(policy) = &validator.image_pull_policy {
        container["imagePullPolicy"] = json!(policy);
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": validator.namespace,
            "labels": {
                "app.kubernetes.io/name": "gpuprov-validation",
                super::static_pod::MANAGED_BY.0: super::static_pod::MANAGED_BY.1,
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [node]}
                ]}]
            }}},
            "tolerations": [{"operator": "Exists"}],
            "containers": [container],
        },
    });
    if let Some(class) = runtime_class(ctx) {
        pod["spec"]["runtimeClassName"] = json!(class);
    }
    if dra {
        // One GPU through a claim made from gpuprov's template: the claim
        // goes with the pod.
        pod["spec"]["resourceClaims"] =
            json!([{"name": "gpu", "resourceClaimTemplateName": CLAIM_TEMPLATE}]);
    }
    pod
}

/// With DRA: the template the validation pod's claim is made from.
pub const CLAIM_TEMPLATE: &str = "gpuprov-validator-gpu";

/// One GPU of the DeviceClass `gpu.nvidia.com` (deploy/dra), pinned to no
/// node: the pod's node affinity puts it here.
fn claim_template(namespace: &str) -> serde_json::Value {
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {
            "name": CLAIM_TEMPLATE,
            "namespace": namespace,
            "labels": {super::static_pod::MANAGED_BY.0: super::static_pod::MANAGED_BY.1},
        },
        "spec": {"spec": {"devices": {"requests": [{
            "name": "gpu",
            "exactly": {"deviceClassName": crate::dra::DRIVER, "count": 1},
        }]}}},
    })
}

/// The validator's revert: the passes it remembered.
pub fn revert(ctx: &RevertContext, _: &mut RevertReport) -> Result<(), StateError> {
    for marker in [MARKER, RUNTIME_RAN, cri::MARKER] {
        ctx.host.remove(marker)?;
    }
    Ok(())
}

/// Run the validation pod on this node and wait for it to succeed; it is
/// deleted afterwards, whatever happened.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationPod {
    pub namespace: String,
    pub name: String,
    pub image: String,
    pub runtime_class: Option<String>,
    pub timeout_seconds: u64,
    /// With DRA: the ResourceClaimTemplate its GPU comes from, applied
    /// first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_template: Option<serde_json::Value>,
    #[serde(skip)]
    pub manifest: serde_json::Value,
}

impl CapabilityChange for ValidationPod {
    fn kind(&self) -> &'static str {
        "validation-pod"
    }

    fn summary(&self) -> String {
        let class = self
            .runtime_class
            .as_deref()
            .map(|c| format!(", runtime class {c}"))
            .unwrap_or_default();
        let gpu = match &self.claim_template {
            Some(_) => format!("1 GPU by a claim from ResourceClaimTemplate {CLAIM_TEMPLATE}"),
            None => "1 nvidia.com/gpu".to_string(),
        };
        format!(
            "run pod {}/{} ({}{class}, {gpu}) on this node, wait up to {}s for it to succeed, delete it",
            self.namespace, self.name, self.image, self.timeout_seconds
        )
    }

    fn fields(&self) -> serde_json::Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        let cluster = on
            .cluster
            .ok_or_else(|| StateError::operator("the validation pod needs an API server"))?;
        if let Some(template) = &self.claim_template {
            cluster
                .apply_resource_claim_template(&self.namespace, CLAIM_TEMPLATE, template)
                .map_err(|e| StateError::operator(error_chain(&e)))?;
        }
        run_pod(
            cluster,
            &self.namespace,
            &self.name,
            &self.manifest,
            Duration::from_secs(self.timeout_seconds),
        )
        .map_err(StateError::operator)
    }
}

/// Creates the validation pod, waits for it to succeed, and deletes it
/// whatever happened. A failure says why, with the pod's last log lines.
pub fn run_pod(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    manifest: &serde_json::Value,
    timeout: Duration,
) -> Result<(), String> {
    let api = |e: crate::kube::KubeError| error_chain(&e);
    let started = Instant::now();
    // A pod left by an interrupted run goes first.
    if !cluster.create_pod(namespace, manifest).map_err(api)? {
        cluster.delete_pod(namespace, name).map_err(api)?;
        while cluster.get_pod(namespace, name).map_err(api)?.is_some() {
            if started.elapsed() > timeout {
                return Err(format!(
                    "an earlier validation pod {namespace}/{name} is still there after {}s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster.create_pod(namespace, manifest).map_err(api)?;
    }
    tracing::info!(pod = %format!("{namespace}/{name}"), "validation pod created; waiting for it to succeed");
    let result = wait_for_pod(cluster, namespace, name, started, timeout);
    let deleted = cluster.delete_pod(namespace, name).map_err(api);
    result.and(deleted)
}

fn wait_for_pod(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    started: Instant,
    timeout: Duration,
) -> Result<(), String> {
    let mut poll = Duration::from_millis(100);
    let mut last_said = Instant::now();
    loop {
        let pod = cluster
            .get_pod(namespace, name)
            .map_err(|e| error_chain(&e))?
            .ok_or_else(|| {
                format!("the validation pod {namespace}/{name} was deleted by someone else")
            })?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        match phase.as_deref() {
            Some("Succeeded") => return Ok(()),
            Some("Failed") => {
                return Err(format!(
                    "the validation pod {namespace}/{name} failed ({}){}",
                    describe(&pod),
                    last_lines(cluster, namespace, name)
                ));
            }
            _ => {}
        }
        if crate::interrupt::requested() {
            return Err(format!(
                "interrupted while waiting for the validation pod {namespace}/{name}"
            ));
        }
        if started.elapsed() >= timeout {
            return Err(format!(
                "the validation pod {namespace}/{name} did not succeed within {}s ({}){}",
                timeout.as_secs(),
                describe(&pod),
                last_lines(cluster, namespace, name)
            ));
        }
        if last_said.elapsed() >= Duration::from_secs(10) {
            tracing::info!(pod = %format!("{namespace}/{name}"), elapsed_s = started.elapsed().as_secs(), "still waiting: {}", describe(&pod));
            last_said = Instant::now();
        }
        std::thread::sleep(poll.min(timeout.saturating_sub(started.elapsed())));
        poll = (poll * 2).min(Duration::from_secs(2));
    }
}

/// `; last log lines: …`, or nothing when there is no log (never started).
fn last_lines(cluster: &Cluster, namespace: &str, name: &str) -> String {
    match cluster.pod_log(namespace, name, LOG_LINES) {
        Ok(log) if !log.trim().is_empty() => {
            format!("; last log lines:\n{}", log.trim_end())
        }
        _ => String::new(),
    }
}

/// Without an API server: what can be checked on the host itself.
fn host_checks(ctx: &StateContext, why: &str) -> Result<Observation, StateError> {
    let mut problems = Vec::new();
    let mut passed = Vec::new();
    let on_nvidia = ctx
        .facts
        .gpus()
        .filter(|g| g.driver.as_deref() == Some("nvidia"))
        .count();
    match ctx.facts.nvml(ctx.host) {
        Ok(inventory) if inventory.devices.len() >= on_nvidia => {
            passed.push(format!("NVML sees all {} GPUs", inventory.devices.len()))
        }
        Ok(inventory) => problems.push(format!(
            "NVML sees {} of the {on_nvidia} GPUs on the nvidia driver",
            inventory.devices.len()
        )),
        // As gpu-health: a host without the library is noted, not failed
        // (the driver may keep it elsewhere); any other NVML error fails.
        Err(crate::gpu::nvml::NvmlProblem::LibraryNotFound) => {
            passed.push("NVML not checked (no libnvidia-ml in the host)".to_string())
        }
        Err(problem) => problems.push(format!("NVML: {problem}")),
    }
    let mut missing: Vec<String> = Vec::new();
    for node in
        std::iter::once("nvidiactl".to_string()).chain((0..on_nvidia).map(|i| format!("nvidia{i}")))
    {
        let path = format!("/dev/{node}");
        if !ctx.host.exists(&path)? {
            missing.push(path);
        }
    }
    if missing.is_empty() {
        passed.push(format!("/dev/nvidiactl and {on_nvidia} GPU device nodes"));
    } else {
        problems.push(format!("missing device nodes: {}", missing.join(", ")));
    }
    let runtime = crate::toolkit::runtime_binary(ctx.host, ctx.spec)?;
    let mut commands = Vec::new();
    let mut changes = Vec::new();
    // The runtime binary's run is remembered until reboot, for as long as
    // the binary is the same file: a converged node spawns nothing.
    let identity = ctx
        .host
        .stat(&runtime)?
        .filter(|info| info.regular)
        .map(|info| {
            format!(
                "{}\n",
                serde_json::json!({"path": runtime, "size": info.size, "mtimeNs": info.mtime_ns})
            )
        });
    let ran_before = identity.is_some() && ctx.host.read(RUNTIME_RAN)? == identity;
    if ran_before {
        passed.push(format!("{runtime} ran since boot and is unchanged"));
    } else if let Some(identity) = identity {
        match ctx.host.run(&[runtime.clone(), "--version".to_string()]) {
            Ok(record) => {
                if record.success() {
                    passed.push(format!("{runtime} runs"));
                    changes.push(Change::WriteFile {
                        path: RUNTIME_RAN.to_string(),
                        content: identity.into_bytes(),
                        mode: 0o644,
                        purpose: "the runtime binary ran; not run again until it changes or the node reboots".to_string(),
                        diff: None,
                    });
                } else {
                    problems.push(format!(
                        "`{runtime} --version` {}",
                        record.failure_summary()
                    ));
                }
                commands.push(record);
            }
            Err(e) => problems.push(error_chain(&e)),
        }
    } else {
        problems.push(format!("no runtime binary at {runtime}"));
    }
    let mut obs = if problems.is_empty() {
        Observation::new(
            Outcome::Ready,
            format!("host checks pass ({why}): {}", passed.join(", ")),
        )
    } else {
        Observation::new(
            Outcome::Failed,
            format!("host checks fail: {}", problems.join("; ")),
        )
    };
    obs.commands = commands;
    if obs.outcome == Outcome::Ready {
        obs.changes = changes;
    }
    Ok(obs)
}
