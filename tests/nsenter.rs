//! `--host-exec nsenter`, the DaemonSet's mode, for real: a stand-in node
//! is PID 1 of a new PID namespace, in a mount namespace whose root is a
//! fixture host (pivot_root) and a UTS namespace with its own hostname.
//! gpuprov runs beside it, in its PID namespace with its own /proc but in
//! the machine's mount namespace, with the fixture as --host-root. Host
//! commands (systemctl, modprobe, the validator's runtime check) must run
//! in the stand-in's namespaces and root.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::daemon::eventually;
use support::{copy_host, fake_nvml_library, install_shell, steps, write_spec};

const HOSTNAME: &str = "standin-node";

/// A stand-in host command: records who ran it, in which root (the
/// marker file) and under which hostname, with the shell's builtins only.
const RECORDER: &str = "#!/bin/sh\n\
read marker < /etc/standin-marker\n\
read host < /proc/sys/kernel/hostname\n\
echo \"$marker $host $0 $*\" >> /var/log/standin.log\n";

/// The stand-in node: PID 1 of new PID, mount and UTS namespaces, its root
/// the fixture at `root`; killed when dropped.
struct StandIn(Child);

impl StandIn {
    fn start(root: &Path) -> StandIn {
        let script = format!(
            "set -e; hostname {HOSTNAME}; mount --bind \"$1\" \"$1\"; \
             mount -t proc proc \"$1/proc\"; cd \"$1\"; mkdir -p .oldroot; \
             pivot_root . .oldroot; exec /bin/sh -c 'echo up > /standin-ready; read x'"
        );
        let child = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--propagation",
                "private",
            ])
            .args(["/bin/sh", "-c", &script, "standin"])
            .arg(root)
            .stdin(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) is installed");
        let standin = StandIn(child);
        eventually(
            "the stand-in to pivot into the fixture",
            Duration::from_secs(10),
            || root.join("standin-ready").exists(),
        );
        standin
    }

    /// The stand-in's PID as the machine sees it: unshare's one child.
    fn pid(&self) -> u32 {
        let unshare = self.0.id();
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A copy of the A100 fixture that a stand-in can run from: a shell, the
/// recorder as systemctl and modprobe, and the marker.
fn standin_root() -> tempfile::TempDir {
    let host = copy_host("a100-preinstalled");
    install_shell(host.path());
    for program in ["usr/bin/systemctl", "usr/sbin/modprobe"] {
        let path = host.path().join(program);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, RECORDER).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    std::fs::write(host.path().join("etc/standin-marker"), "fixture-root\n").unwrap();
    std::fs::create_dir_all(host.path().join("var/log")).unwrap();
    host
}

/// `gpuprov <args>` in the stand-in's PID namespace with a /proc of its
/// own (so /proc/1 is the stand-in), in the machine's mount namespace,
/// started through `wrapper` (`setpriv …`) when given.
fn gpuprov_beside(standin: &StandIn, wrapper: &[&str], args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg("--target")
        .arg(standin.pid().to_string())
        .args([
            "--pid",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--mount-proc",
            "--",
        ])
        .args(wrapper)
        .arg(assert_cmd::cargo::cargo_bin("gpuprov"))
        .args(args)
        .env(
            "GPUPROV_FAKE_NVML",
            support::repo().join("fixtures/nvml/a100-mig.yaml"),
        )
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "namespaces need root: run as root (CI and scripts/test do)"
)]
fn host_commands_run_in_pid_1s_namespaces_and_root() {
    let host = standin_root();
    let standin = StandIn::start(host.path());
    // Only what runs host commands: the site's own states, and the
    // validator's host checks (no API server); containerd is left alone.
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "devicePlugin:\n  enabled: false\ndcgmExporter:\n  enabled: false\ngfd:\n  enabled: false\n\
         states:\n  - name: kubelet-unit\n    check: systemctl is-active kubelet\n\
         \x20 - name: nvidia-module\n    check: modprobe --dry-run nvidia\n",
    );
    let nvml = fake_nvml_library();
    let output = gpuprov_beside(
        &standin,
        &[],
        &[
            "apply",
            "--output",
            "json",
            "--host-exec",
            "nsenter",
            "--host-root",
            host.path().to_str().unwrap(),
            "--config",
            spec.to_str().unwrap(),
            "--nvml-lib",
            nvml.to_str().unwrap(),
            "--node-labels",
            "nvidia.com/gpu.deploy.container-toolkit=false",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}):\n{stderr}"));
    let steps = steps(&report);
    assert_eq!(steps["kubelet-unit"].1, "ready", "{stderr}\n{report}");
    assert_eq!(steps["nvidia-module"].1, "ready", "{stderr}\n{report}");
    assert_eq!(steps["validator"].1, "ready", "{report}");
    assert!(
        steps["validator"]
            .2
            .contains("/usr/bin/nvidia-container-runtime runs"),
        "{:?}",
        steps["validator"]
    );
    // Each ran in the stand-in's root (its marker, its /var/log) under its
    // hostname: its mount and UTS namespaces.
    let log = std::fs::read_to_string(host.path().join("var/log/standin.log")).unwrap();
    assert!(
        log.contains(&format!(
            "fixture-root {HOSTNAME} /usr/bin/systemctl is-active kubelet"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "fixture-root {HOSTNAME} /usr/sbin/modprobe --dry-run nvidia"
        )),
        "{log}"
    );
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "namespaces need root: run as root (CI and scripts/test do)"
)]
fn a_failure_to_join_names_the_namespace_and_the_cause() {
    let host = standin_root();
    let standin = StandIn::start(host.path());
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "states:\n  - name: kubelet-unit\n    check: systemctl is-active kubelet\n",
    );
    // gpuprov without privilege: PID 1's namespaces cannot be opened.
    let output = gpuprov_beside(
        &standin,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        &[
            "plan",
            "--host-exec",
            "nsenter",
            "--host-root",
            host.path().to_str().unwrap(),
            "--config",
            spec.to_str().unwrap(),
        ],
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        all.contains("cannot enter the host's namespaces through /proc/1/ns/mnt"),
        "{all}"
    );
    assert!(all.contains("Permission denied"), "{all}");
}
