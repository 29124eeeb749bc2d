//! Test support: the real `gpuprov` binary run on copies of fixture hosts.
#![allow(dead_code)]

pub mod artifact_server;
pub mod cdi_schema;
pub mod containerd;
pub mod cri_node;
pub mod daemon;
pub mod dra_node;
pub mod fake_api;
pub mod grpc;
pub mod kubelet;
pub mod oci;
pub mod pod_resources;
pub mod podman;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary, run from the repository root so relative fixture paths work.
pub fn gpuprov() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("gpuprov").expect("binary built");
    // No API server unless a test names one: nothing from the machine's
    // own Kubernetes set-up may leak in.
    cmd.current_dir(repo())
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("NODE_NAME")
        .env("HOME", "/nonexistent-gpuprov-test-home");
    cmd
}

/// Every fixture host, by name.
pub fn fixture_hosts() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(repo().join("fixtures/hosts"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A private copy of a fixture host (symlinks and modes kept).
pub fn copy_host(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&repo().join("fixtures/hosts").join(name), dir.path());
    dir
}

pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

/// What a file looks like, for "nothing changed" checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    pub bytes: Vec<u8>,
    pub mtime_ns: i128,
    pub mode: u32,
    pub link: Option<PathBuf>,
}

/// Every file, directory and symlink under `root`, by relative path.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, FileState> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, FileState>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let link = meta
            .file_type()
            .is_symlink()
            .then(|| fs::read_link(&path).unwrap());
        let bytes = if meta.is_file() {
            fs::read(&path).unwrap()
        } else {
            Vec::new()
        };
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        out.insert(
            rel,
            FileState {
                bytes,
                mtime_ns,
                mode: meta.mode(),
                link,
            },
        );
        if meta.is_dir() {
            walk(root, &path, out);
        }
    }
}

/// The paths whose state differs between two trees (added, removed or changed).
pub fn changed(
    before: &BTreeMap<PathBuf, FileState>,
    after: &BTreeMap<PathBuf, FileState>,
) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .cloned()
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Points `cmd` at `fake` as node `node`; without a fake, no API server
/// and no labels published.
pub fn against(cmd: &mut assert_cmd::Command, fake: Option<&fake_api::FakeApi>, node: &str) {
    match fake {
        Some(fake) => {
            cmd.args(["--node-name", node])
                .arg("--kubeconfig")
                .arg(fake.kubeconfig());
        }
        None => {
            cmd.args(["--labels-sink", "none"]);
        }
    }
}

/// Writes a spec into `dir` and returns its path.
pub fn write_spec(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, yaml).unwrap();
    path
}

/// `gpuprov <command> --host-exec prefix --config <spec> --host-root <host>`.
pub fn run_on(command: &str, host: &Path, spec: &Path) -> std::process::Output {
    gpuprov()
        .args([command, "--host-exec", "prefix", "--config"])
        .arg(spec)
        .arg("--host-root")
        .arg(host)
        .output()
        .unwrap()
}

/// Runs `apply --output json` and returns the exit code and the report.
pub fn apply_json(host: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let output = gpuprov()
        .args([
            "apply",
            "--output",
            "json",
            "--host-exec",
            "prefix",
            "--host-root",
        ])
        .arg(host)
        .args(extra)
        .output()
        .unwrap();
    json_report(&output)
}

/// An `apply --output json` run's exit code, report and stderr.
pub fn json_report(output: &std::process::Output) -> (i32, serde_json::Value, String) {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("apply printed no JSON report ({e}); stderr:\n{stderr}"));
    (output.status.code().unwrap(), report, stderr)
}

/// `apply --output json --config <spec>`: the exit code and the report.
pub fn apply_config(host: &Path, spec: &Path) -> (i32, serde_json::Value, String) {
    apply_json(host, &["--config", spec.to_str().unwrap()])
}

/// `step name → (action, outcome, reason)` from a report or plan.
pub fn steps(report: &serde_json::Value) -> BTreeMap<String, (String, String, String)> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                (
                    s["action"].as_str().unwrap().to_string(),
                    s["outcome"].as_str().unwrap().to_string(),
                    s["reason"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// How often the fixture's fake systemctl restarted containerd.
pub fn containerd_restarts(host: &Path) -> usize {
    fs::read_to_string(host.join("var/log/fake-systemctl.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == "restart containerd")
        .count()
}

/// `gpuprov` reading NVML through the fake library, which answers from
/// `fixtures/nvml/<fixture>`.
pub fn gpuprov_with_fake_nvml(fixture: &str) -> assert_cmd::Command {
    let mut cmd = gpuprov();
    cmd.env(
        "GPUPROV_FAKE_NVML",
        repo().join("fixtures/nvml").join(fixture),
    );
    cmd
}

/// `gpuprov <command>` on the host at `root` with `spec`, its NVML the
/// fake library answering from `nvml` and keeping its MIG state in
/// `state`, host commands run by prefix.
pub fn on_fake_nvml_host(
    command: &str,
    root: &Path,
    nvml: &Path,
    state: &Path,
    spec: &Path,
) -> assert_cmd::Command {
    let mut cmd = gpuprov();
    cmd.env("GPUPROV_FAKE_NVML", nvml)
        .env("GPUPROV_FAKE_NVML_STATE", state)
        .args([command, "--host-exec", "prefix", "--nvml-lib"])
        .arg(fake_nvml_library())
        .arg("--host-root")
        .arg(root)
        .arg("--config")
        .arg(spec);
    cmd
}

/// The fake libnvidia-ml (fixtures/fake-nvml), which scripts/test builds.
pub fn fake_nvml_library() -> PathBuf {
    let path = repo().join("target/debug/libfake_nvml.so");
    assert!(
        path.exists(),
        "{} is missing: scripts/test builds it (cargo build -p fake-nvml)",
        path.display()
    );
    path
}

/// Sends SIGTERM to `child` and waits for it to exit, at most `within`:
/// its exit status, or `None` when it is still running then.
pub fn sigterm_and_wait(
    child: &mut std::process::Child,
    within: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// Copies `/bin/sh` and the libraries it links into `root`.
pub fn install_shell(root: &Path) {
    let shell = fs::canonicalize("/bin/sh").unwrap();
    let mut files = vec![shell.clone()];
    let ldd = std::process::Command::new("ldd")
        .arg(&shell)
        .output()
        .expect("ldd is installed");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        files.extend(path.map(Into::into));
    }
    for file in files {
        let target = root.join(file.strip_prefix("/").unwrap());
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::copy(&file, &target).unwrap();
    }
    fs::create_dir_all(root.join("bin")).unwrap();
    if !root.join("bin/sh").exists() {
        std::os::unix::fs::symlink(&shell, root.join("bin/sh")).unwrap();
    }
}

/// The 8× H100 fixture, each GPU given readings that depend on its index;
/// GPU 7 has no encoder, decoder, energy, memory temperature, ECC, retired
/// page or remapped row readings (they answer "not supported"), as a GPU
/// without them.
pub fn telemetry_fixture(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("fixtures/nvml/h100x8.yaml")).unwrap();
    let mut out = String::new();
    let mut index = 0;
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line == "    persistenceMode: true" {
            let optional = if index == 7 {
                String::new()
            } else {
                // 18 NVLinks, link l: 1000·i + l KiB sent, 2000·i + l received.
                let links: Vec<String> = (0..18)
                    .map(|l| format!("[{}, {}]", 1000 * index + l, 2000 * index + l))
                    .collect();
                format!(
                    ", encUtil: {index}, decUtil: {}, energyMj: {}, memoryTemp: {}, ecc: {{sbeVolatile: {index}, dbeVolatile: 0, sbeAggregate: {}, dbeAggregate: 1}}, retiredPages: {{sbe: {index}, dbe: 1, pending: true}}, remappedRows: {{correctable: {index}, uncorrectable: 2, pending: false, failure: false}}, nvlinkDataKiB: [{}]",
                    2 * index,
                    1_000_000_000u64 + index,
                    50 + index,
                    10 * index,
                    links.join(", "),
                )
            };
            out.push_str(&format!(
                "    telemetry: {{gpuUtil: {}, memUtil: {}, memoryUsedMiB: {}, gpuTemp: {}, powerMw: {}, smClock: 1980, memClock: 2619, pcieReplays: {}{optional}}}\n",
                10 + index,
                20 + index,
                1024 * (index + 1),
                40 + index,
                300_000 + 125 * index,
                index,
            ));
            index += 1;
        }
    }
    assert_eq!(index, 8);
    let path = dir.join("telemetry.yaml");
    std::fs::write(&path, out).unwrap();
    path
}

/// A stand-in for NVIDIA's .run installer: records its flags, puts a
/// module of `version` in place (the fixture's modprobe loads it) and
/// brings nvidia-modprobe along.
pub fn fake_driver_installer(version: &str) -> Vec<u8> {
    format!(
        r#"#!/bin/sh
root="$GPUPROV_HOST_ROOT"
mkdir -p "$root/var/log"
echo "$*" >> "$root/var/log/fake-installer.log"
kernel=$(cat "$root/proc/sys/kernel/osrelease")
only=
flavour=
for arg in "$@"; do
  case "$arg" in
    --kernel-module-only) only=1 ;;
    --kernel-module-type=open|-m=kernel-open) flavour=" open" ;;
    --kernel-source-path=*)
      # (a link inside the host root points at an absolute host path: -L)
      source="$root${{arg#--kernel-source-path=}}"
      [ -L "$source" ] || [ -d "$source" ] || {{ echo "ERROR: Unable to find the kernel source tree" >&2; exit 1; }} ;;
  esac
done
mkdir -p "$root/lib/modules/$kernel/kernel/drivers/video"
echo "{version}$flavour" > "$root/lib/modules/$kernel/kernel/drivers/video/nvidia.ko"
grep -qx "kernel/drivers/video/nvidia.ko:" "$root/lib/modules/$kernel/modules.dep" 2>/dev/null || echo "kernel/drivers/video/nvidia.ko:" >> "$root/lib/modules/$kernel/modules.dep"
[ -n "$only" ] || cp "$root/usr/local/lib/fixture/nvidia-modprobe" "$root/usr/bin/nvidia-modprobe"
[ -n "$only" ] || [ ! -f "$root/usr/local/lib/fixture/nvidia-persistenced" ] || cp "$root/usr/local/lib/fixture/nvidia-persistenced" "$root/usr/bin/nvidia-persistenced"
"#
    )
    .into_bytes()
}

/// A sha256 in lower-case hex, as specs pin artifacts.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Waits for `child` and returns its exit code and peak RSS in KiB
/// (`wait4`'s own count, so nothing is sampled; the commands it ran and
/// waited for count too).
// The child is reaped by wait4, which also gives its rusage.
#[allow(clippy::zombie_processes, dead_code)]
pub fn peak_rss(child: std::process::Child) -> (Option<i32>, u64) {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the child is ours and not yet waited for; `child` is not
    // waited on afterwards (it is forgotten).
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    std::mem::forget(child);
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, usage.ru_maxrss as u64)
}

/// A running process's own peak RSS so far (`VmHWM`), in KiB: the
/// commands it started are not counted.
#[allow(dead_code)]
pub fn own_peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The driver's table of MIG capability minors under `root`
/// (`/proc/driver/nvidia-caps/mig-minors`) and their device nodes, as
/// nvidia-modprobe makes them: config, monitor, then per GPU minor each GPU
/// instance's access and each of its compute instances'. The table.
pub fn mig_capability_nodes(root: &Path) -> String {
    let mut table = String::from("config 1\nmonitor 2\n");
    let mut minor = 3;
    for gpu in 0..8 {
        for gi in 0..15 {
            table.push_str(&format!("gpu{gpu}/gi{gi}/access {minor}\n"));
            minor += 1;
            for ci in 0..8 {
                table.push_str(&format!("gpu{gpu}/gi{gi}/ci{ci}/access {minor}\n"));
                minor += 1;
            }
        }
    }
    fs::create_dir_all(root.join("proc/driver/nvidia-caps")).unwrap();
    fs::write(root.join("proc/driver/nvidia-caps/mig-minors"), &table).unwrap();
    fs::create_dir_all(root.join("dev/nvidia-caps")).unwrap();
    for m in 1..minor {
        fs::write(root.join(format!("dev/nvidia-caps/nvidia-cap{m}")), "").unwrap();
    }
    table
}
