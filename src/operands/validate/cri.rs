//! The validation through containerd's CRI, for nodes without an API
//! server (bootstrap images) or with `validator.mode: cri`.
//!
//! gpuprov does what the kubelet would: a pod sandbox on the node's
//! network (no CNI needed) with the configured runtime handler, one
//! container from `validator.image` running `validator.command`
//! (`nvidia-smi -L` by default), and waits for it to exit. It passes when
//! the container exited 0 and containerd reports that the sandbox ran with
//! that runtime handler. The sandbox is stopped and removed whatever
//! happened; a sandbox an interrupted run left is removed first. The pass
//! is remembered under `/run` (gone at reboot) with what was validated and
//! what the container printed.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use serde_json::json;

use crate::cri::messages::*;
use crate::cri::{Cri, CriError};
use crate::host::Host;
use crate::state::{
    CapabilityChange, Change, MakeContext, Observation, Outcome, StateContext, StateError,
    error_chain, json_fields,
};

/// Where a pass is remembered until reboot.
pub const MARKER: &str = "/run/gpuprov/validations/cri.json";
/// Where containerd writes the container's output, one folder per run.
const LOG_DIR: &str = "/run/gpuprov/validations/cri-logs";
const LOG_FILE: &str = "validator.log";
/// The label on every sandbox gpuprov starts, and the one naming its run.
const LABEL: (&str, &str) = ("gpuprov.io/validation", "cri");
const RUN_LABEL: &str = "gpuprov.io/validation-run";
/// The name of every sandbox gpuprov starts.
const SANDBOX_NAME: &str = "gpuprov-validation";
/// How many output lines are kept and quoted.
const OUTPUT_LINES: usize = 20;
/// How much of one output line is kept.
const LINE_CHARS: usize = 500;
/// How much of the log's end is read: the output can be anything.
const LOG_TAIL_BYTES: u64 = 64 << 10;
/// Stopping and removing the sandbox gets its own time, after the
/// validator's timeout if that ran out.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The marker's content.
#[derive(Debug, Serialize, Deserialize)]
struct Passed {
    validated: serde_json::Value,
    /// How containerd ran the sandbox (`nvidia (io.containerd.runc.v2, …)`).
    ran_with: String,
    output: Vec<String>,
}

/// How long `validator.mode: auto` waits for containerd to say whether it
/// serves the CRI.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The CRI validation's observation; with `probe` (`validator.mode:
/// auto`), `None` when containerd answers that it serves no CRI (its CRI
/// plugin disabled, as in Docker's containerd): the host is checked then.
pub fn observe(ctx: &StateContext, probe: bool) -> Result<Option<Observation>, StateError> {
    let validator = &ctx.spec.validator;
    let runtime_handler = ctx.spec.containerd.runtime_class.clone();
    let socket = crate::runtime::cri_socket(ctx.host, &ctx.spec.containerd);
    let command = validator.command.clone().unwrap_or_else(|| {
        crate::spec::CRI_DEFAULT_COMMAND
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    // What a pass validated: another value means validating again.
    let validated = json!({
        "image": validator.image,
        "gpus": super::super::gpu_count(ctx),
        "driver": super::driver_version(ctx)?,
        "socket": socket,
        "runtimeHandler": runtime_handler,
        "command": command,
    });
    let previous = ctx.host.read(MARKER)?;
    let passed = previous
        .as_deref()
        .and_then(|text| serde_json::from_str::<Passed>(text).ok());
    if let Some(passed) = passed.as_ref().filter(|p| p.validated == validated) {
        let output = match passed.output.first() {
            Some(first) if passed.output.len() > 1 => {
                format!(": {first} (+{} lines)", passed.output.len() - 1)
            }
            Some(first) => format!(": {first}"),
            None => String::new(),
        };
        return Ok(Some(Observation::new(
            Outcome::Ready,
            format!(
                "`{}` passed through containerd's CRI with runtime handler {} since boot ({}){output}",
                command.join(" "),
                passed.ran_with,
                validator.image,
            ),
        )));
    }
    if probe && !serves_cri(ctx.host, &socket) {
        return Ok(None);
    }
    let mut obs = Observation::new(
        Outcome::Pending,
        if previous.is_some() {
            "validated through the CRI before, but the driver, runtime handler, image, command or GPU count changed since".to_string()
        } else {
            "no container has run through containerd's CRI with the runtime handler since boot"
                .to_string()
        },
    );
    obs.on_change = Outcome::Ready;
    obs.changes = vec![Change::own(CriValidation {
        socket: socket.clone(),
        runtime_handler,
        image: validator.image.clone(),
        command,
        image_pull_policy: validator.image_pull_policy.clone(),
        namespace: validator.namespace.clone(),
        timeout_seconds: validator.timeout_seconds,
        marker: MARKER.to_string(),
        validated,
    })];
    Ok(Some(obs))
}

/// Whether containerd at `socket` serves the CRI: false only when it
/// answers UNIMPLEMENTED. Any other failure is left for the validation to
/// report in full.
fn serves_cri(host: &Host, socket: &str) -> bool {
    let Ok(real) = host.resolve(socket) else {
        return true;
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return true;
    };
    let answer = runtime.block_on(async {
        tokio::time::timeout(PROBE_TIMEOUT, async {
            Cri::connect(real, socket).await?.version().await
        })
        .await
    });
    match answer {
        Ok(Err(e)) if e.code() == Some(tonic::Code::Unimplemented) => false,
        // Gone since it was seen: nothing serves it.
        Ok(Err(CriError::Connect { .. })) => host.exists(socket).unwrap_or(true),
        _ => true,
    }
}

/// What one CRI validation runs (a change of the validator's own).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CriValidation {
    pub socket: String,
    pub runtime_handler: String,
    pub image: String,
    pub command: Vec<String>,
    pub image_pull_policy: Option<String>,
    pub namespace: String,
    pub timeout_seconds: u64,
    /// Where a pass is remembered until reboot.
    pub marker: String,
    /// What is validated, kept in the marker: another value means another
    /// validation.
    #[serde(skip)]
    pub validated: serde_json::Value,
}

impl CapabilityChange for CriValidation {
    fn kind(&self) -> &'static str {
        "cri-validation"
    }

    fn summary(&self) -> String {
        format!(
            "run `{}` in {} through containerd's CRI ({}) with runtime handler {} on the node's network, wait up to {}s for it to exit 0, remove its sandbox, remember the pass in {} until reboot",
            self.command.join(" "),
            self.image,
            self.socket,
            self.runtime_handler,
            self.timeout_seconds,
            self.marker,
        )
    }

    fn fields(&self) -> serde_json::Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        run(on.host, self).map_err(StateError::operator)
    }
}

/// Runs the validation and remembers a pass; the error says what failed,
/// in containerd's words where containerd refused.
pub fn run(host: &Host, validation: &CriValidation) -> Result<(), String> {
    if !host
        .exists(&validation.socket)
        .map_err(|e| error_chain(&e))?
    {
        return Err(format!(
            "the runtime's CRI socket {} is not there (containerd.socket, or crio.socket on CRI-O): is the runtime running?",
            validation.socket
        ));
    }
    let socket = host
        .resolve(&validation.socket)
        .map_err(|e| error_chain(&e))?;
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let log_dir = format!("{LOG_DIR}/{run_id}");
    let log_file = format!("{log_dir}/{LOG_FILE}");
    host.make_dirs(&log_dir).map_err(|e| error_chain(&e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the CRI client's runtime: {e}"))?;
    let timeout = Duration::from_secs(validation.timeout_seconds);
    let started = Instant::now();
    let timed_out = || {
        format!(
            "the validation through containerd's CRI did not finish within {}s (validator.timeoutSeconds)",
            timeout.as_secs()
        )
    };
    let result = runtime.block_on(async {
        // A containerd that accepts but never answers is bounded too.
        let mut cri = tokio::time::timeout(timeout, Cri::connect(socket, &validation.socket))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| error_chain(&e))?;
        let left = timeout.saturating_sub(started.elapsed());
        let ran = tokio::time::timeout(left, validate(&mut cri, validation, &run_id, &log_dir))
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        let cleaned = tokio::time::timeout(
            CLEANUP_TIMEOUT,
            remove_sandboxes(&mut cri, RUN_LABEL, &run_id),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "removing the validation sandbox did not finish within {}s",
                CLEANUP_TIMEOUT.as_secs()
            ))
        });
        match (ran, cleaned) {
            (Ok(ran), Ok(())) => Ok(ran),
            (Err(e), Ok(())) => Err(e),
            (Ok(_), Err(e)) => Err(format!("the container passed, but {e}")),
            (Err(e), Err(cleanup)) => Err(format!("{e}; and {cleanup}")),
        }
    });
    let output = log_tail(host, &log_file);
    // This run's log, and those of runs killed before they cleaned up
    // (their sandboxes were removed at this run's start).
    for run in host.list_dir(LOG_DIR).unwrap_or_default() {
        let dir = format!("{LOG_DIR}/{run}");
        let _ = host.remove(&format!("{dir}/{LOG_FILE}"));
        let _ = host.remove_empty_dirs(&dir, LOG_DIR);
    }
    let ran = result.map_err(|e| match output.is_empty() {
        true => e,
        false => format!("{e}; its last output lines:\n{}", output.join("\n")),
    })?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        handler = %validation.runtime_handler,
        runtime = %ran,
        "the validation container passed through containerd's CRI: {}",
        output.join(" | ")
    );
    let passed = Passed {
        validated: validation.validated.clone(),
        ran_with: ran,
        output,
    };
    let content = serde_json::to_string_pretty(&passed).expect("serializes") + "\n";
    host.write_atomic(&validation.marker, content.as_bytes(), 0o644)
        .map(drop)
        .map_err(|e| error_chain(&e))
}

fn sandbox_config(validation: &CriValidation, run_id: &str, log_dir: &str) -> PodSandboxConfig {
    let labels = [LABEL, (RUN_LABEL, run_id)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: SANDBOX_NAME.to_string(),
            uid: run_id.to_string(),
            namespace: validation.namespace.clone(),
            attempt: 0,
        }),
        log_directory: log_dir.to_string(),
        labels,
        // No cgroup parent: containerd's default.
        linux: Some(LinuxPodSandboxConfig {
            // The node's network: no CNI is needed, and none may be there
            // yet in a bootstrap image.
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Pod as i32,
                    ipc: NamespaceMode::Pod as i32,
                }),
            }),
        }),
    }
}

/// The sandbox and container, up to the container's exit; returns how
/// containerd ran the sandbox (`nvidia (io.containerd.runc.v2, …)`).
async fn validate(
    cri: &mut Cri,
    validation: &CriValidation,
    run_id: &str,
    log_dir: &str,
) -> Result<String, String> {
    let failed = |e: CriError| error_chain(&e);
    let version = cri.version().await.map_err(|e| match e.code() {
        Some(tonic::Code::Unimplemented) => format!(
            "{} (containerd answers, but not the CRI runtime.v1: its CRI plugin is disabled or older than containerd 1.6)",
            error_chain(&e)
        ),
        _ => error_chain(&e),
    })?;
    tracing::debug!(runtime = %version.runtime_name, version = %version.runtime_version, "CRI connected");
    // What an interrupted run left (gpuprov's label, never another's).
    remove_sandboxes(cri, LABEL.0, LABEL.1).await?;

    let config = sandbox_config(validation, run_id, log_dir);
    let policy = validation.image_pull_policy.as_deref();
    let present = cri.has_image(&validation.image).await.map_err(failed)?;
    match (present, policy) {
        (false, Some("Never")) => {
            return Err(format!(
                "containerd does not have the image {} and validator.imagePullPolicy is Never (import it into containerd's k8s.io namespace)",
                validation.image
            ));
        }
        (false, _) | (true, Some("Always")) => {
            tracing::info!(image = %validation.image, "pulling the validation image through containerd's CRI");
            cri.pull_image(&validation.image, config.clone())
                .await
                .map_err(failed)?;
        }
        (true, _) => {}
    }

    let sandbox = cri
        .run_pod_sandbox(config.clone(), &validation.runtime_handler)
        .await
        .map_err(failed)?;
    let ran_with = ran_with(cri, &sandbox, &validation.runtime_handler).await?;

    let labels = config.labels.clone();
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "validator".to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: validation.image.clone(),
        }),
        command: validation.command.clone(),
        // What the device plugin would hand a pod asking for every GPU;
        // `utility` brings nvidia-smi.
        envs: [
            ("NVIDIA_VISIBLE_DEVICES", "all"),
            ("NVIDIA_DRIVER_CAPABILITIES", "compute,utility"),
        ]
        .into_iter()
        .map(|(key, value)| KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        })
        .collect(),
        labels,
        log_path: LOG_FILE.to_string(),
    };
    let id = cri
        .create_container(&sandbox, container, config)
        .await
        .map_err(failed)?;
    cri.start_container(&id).await.map_err(failed)?;
    let mut poll = Duration::from_millis(20);
    loop {
        let status = cri.container_status(&id).await.map_err(failed)?;
        if status.state == ContainerState::ContainerExited as i32 {
            if status.exit_code == 0 {
                return Ok(ran_with);
            }
            let why = [status.reason, status.message]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            return Err(format!(
                "`{}` in {} exited {}{} (runtime handler {ran_with})",
                validation.command.join(" "),
                validation.image,
                status.exit_code,
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                }
            ));
        }
        if crate::interrupt::requested() {
            return Err("interrupted while the validation container ran".to_string());
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(Duration::from_millis(500));
    }
}

/// How containerd says it ran the sandbox; an error when that is not the
/// runtime handler asked for, or containerd does not say.
async fn ran_with(cri: &mut Cri, sandbox: &str, handler: &str) -> Result<String, String> {
    let status = cri
        .pod_sandbox_status(sandbox)
        .await
        .map_err(|e| error_chain(&e))?;
    // containerd's verbose record: `runtimeHandler`, `runtimeType` and
    // `runtimeOptions` (runc's, with the binary the handler runs).
    let info: serde_json::Value = status
        .info
        .get("info")
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let reported = status
        .status
        .as_ref()
        .map(|s| s.runtime_handler.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| info["runtimeHandler"].as_str().map(str::to_string));
    match reported {
        Some(reported) if reported == handler => {}
        Some(reported) => {
            return Err(format!(
                "containerd ran the validation sandbox with runtime handler `{reported}`, not `{handler}`"
            ));
        }
        None => {
            return Err(format!(
                "containerd did not say which runtime handler ran the validation sandbox (asked for `{handler}`)"
            ));
        }
    }
    let options = &info["runtimeOptions"];
    let binary = options["binary_name"]
        .as_str()
        .or(options["BinaryName"].as_str())
        .map(|b| format!(", {b}"))
        .unwrap_or_default();
    Ok(match info["runtimeType"].as_str() {
        Some(kind) => format!("{handler} ({kind}{binary})"),
        None => handler.to_string(),
    })
}

/// Stops and removes the sandboxes labelled `key=value` that are
/// gpuprov's. The runtime filters by label, but a buggy or hostile one may
/// not: each sandbox's own labels and name are checked before it is
/// touched, and one that is not gpuprov's is left alone and named.
async fn remove_sandboxes(cri: &mut Cri, key: &str, value: &str) -> Result<(), String> {
    let found = cri
        .list_pod_sandboxes(&[(key, value)])
        .await
        .map_err(|e| error_chain(&e))?;
    for sandbox in found {
        if !ours(&sandbox, key, value) {
            let name = sandbox
                .metadata
                .as_ref()
                .map(|m| format!("{}/{}", m.namespace, m.name))
                .unwrap_or_default();
            tracing::warn!(
                id = %crate::printable::printable(&sandbox.id, false),
                "the CRI listed sandbox {} for the label {key}={value}, but it is not gpuprov's: left alone",
                crate::printable::printable(&name, false)
            );
            continue;
        }
        cri.stop_and_remove_pod_sandbox(&sandbox.id)
            .await
            .map_err(|e| {
                format!(
                    "removing validation sandbox {}: {}",
                    sandbox.id,
                    error_chain(&e)
                )
            })?;
    }
    Ok(())
}

/// Whether a listed sandbox is one gpuprov started: its own labels say so
/// (gpuprov's label, and `key=value`), and so does its name.
fn ours(sandbox: &PodSandbox, key: &str, value: &str) -> bool {
    let labelled = |k: &str, v: &str| sandbox.labels.get(k).is_some_and(|l| l == v);
    labelled(LABEL.0, LABEL.1)
        && labelled(key, value)
        && sandbox
            .metadata
            .as_ref()
            .is_some_and(|m| m.name == SANDBOX_NAME)
}

/// The last lines of the container's output, from containerd's CRI log
/// (`<time> <stream> <F|P> <text>` per line); empty when there is none.
fn log_tail(host: &Host, log_file: &str) -> Vec<String> {
    let Ok(Some((mut file, info))) = host.open_regular(log_file) else {
        return Vec::new();
    };
    let start = info.size.saturating_sub(LOG_TAIL_BYTES);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err()
        || file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes).is_err()
    {
        return Vec::new();
    }
    // A line cut by the tail's start has no prefix to strip.
    let skip = usize::from(start > 0);
    let mut lines = output_lines(&String::from_utf8_lossy(&bytes), skip);
    let cut = lines.len().saturating_sub(OUTPUT_LINES);
    lines.drain(..cut);
    lines
}

/// The text of CRI log lines, a partial line (`P`) joined to the rest of it
/// (`F`), blank lines dropped, each cut at `LINE_CHARS`; the first `skip`
/// lines are left out.
fn output_lines(log: &str, skip: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut partial = String::new();
    for line in log.lines().skip(skip) {
        match line.splitn(4, ' ').collect::<Vec<_>>()[..] {
            [_, "stdout" | "stderr", "P", text] => partial.push_str(text),
            [_, "stdout" | "stderr", _, text] => {
                partial.push_str(text);
                lines.push(std::mem::take(&mut partial));
            }
            _ => lines.push(line.to_string()),
        }
    }
    if !partial.is_empty() {
        lines.push(partial);
    }
    lines
        .into_iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| match line.char_indices().nth(LINE_CHARS) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_joined_and_stripped_of_their_prefix() {
        let log = "2026-12-04T18:42:21.1Z stdout F GPU 0: NVIDIA H200 (UUID: GPU-1)\n\
                   2026-12-04T18:42:21.2Z stderr P half \n\
                   2026-12-04T18:42:21.3Z stderr F and the rest\n\
                   2026-12-04T18:42:21.4Z stdout F \n\
                   not a CRI line\n";
        assert_eq!(
            output_lines(log, 0),
            [
                "GPU 0: NVIDIA H200 (UUID: GPU-1)",
                "half and the rest",
                "not a CRI line"
            ]
        );
        assert_eq!(output_lines(log, 1)[0], "half and the rest");
    }

    #[test]
    fn a_long_line_is_cut() {
        let long = format!("t stdout F {}", "é".repeat(LINE_CHARS + 10));
        let lines = output_lines(&long, 0);
        assert_eq!(lines[0].chars().count(), LINE_CHARS + 1);
        assert!(lines[0].ends_with('…'));
    }
}
