//! The validator without an API server: a real container through Debian's
//! real containerd's CRI, with the runtime handler gpuprov configured (the
//! node: tests/support/cri_node.rs).

mod support;

use support::cri_node::Node;

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "containerd needs root: run as root (CI and scripts/test do)"
)]
fn validator_runs_a_container_through_the_runtime_handler_without_an_api_server() {
    let node = Node::start(true);
    let (code, report, stderr) = node.apply(
        "  command: [\"/bin/sh\", \"-c\", \"echo GPU 0: visible=$NVIDIA_VISIBLE_DEVICES caps=$NVIDIA_DRIVER_CAPABILITIES\"]\n",
    );
    let steps = support::steps(&report);
    assert_eq!(code, 0, "{stderr}\n{report:#}\n{}", node.containerd_log());
    assert_eq!(steps["containerd-runtime"].0, "change", "{report:#}");
    let (action, outcome, reason) = &steps["validator"];
    assert_eq!(
        (action.as_str(), outcome.as_str()),
        ("change", "ready"),
        "{reason}\n{stderr}"
    );
    // containerd's own record of the sandbox names the runtime's binary.
    assert!(
        reason.contains(
            "through containerd's CRI with runtime handler nvidia (io.containerd.runc.v2, /usr/local/nvidia/toolkit/nvidia-container-runtime)"
        ),
        "{reason}"
    );
    assert!(
        reason.contains("GPU 0: visible=all caps=compute,utility"),
        "{reason}"
    );

    // The runtime class was used: containerd ran the sandbox and the
    // container through the nvidia runtime's binary.
    let calls = node.runtime_calls();
    let creates = calls
        .iter()
        .filter(|c| c.contains("create") && c.contains("--bundle"));
    assert_eq!(
        creates.count(),
        2,
        "the sandbox and the container: {calls:#?}"
    );
    // Its sandbox is gone.
    assert_eq!(node.containers(), "", "nothing left in containerd");
    assert!(
        !node
            .root()
            .join("run/gpuprov/validations/cri-logs")
            .exists(),
        "the container's log folder is removed"
    );

    // Remembered until reboot: a converged node runs nothing.
    let (code, report, stderr) = node.apply(
        "  command: [\"/bin/sh\", \"-c\", \"echo GPU 0: visible=$NVIDIA_VISIBLE_DEVICES caps=$NVIDIA_DRIVER_CAPABILITIES\"]\n",
    );
    assert_eq!(code, 0, "{stderr}");
    let (action, outcome, reason) = &support::steps(&report)["validator"];
    assert_eq!(
        (action.as_str(), outcome.as_str()),
        ("unchanged", "ready"),
        "{reason}"
    );
    assert!(reason.contains("since boot"), "{reason}");
    assert_eq!(node.runtime_calls(), calls, "no container ran again");

    // Another command is another validation; a failing one says its exit
    // code and its output, and leaves nothing behind.
    let (code, report, _) =
        node.apply("  command: [\"/bin/sh\", \"-c\", \"echo no GPU here >&2; exit 3\"]\n");
    assert_ne!(code, 0);
    let (_, outcome, reason) = &support::steps(&report)["validator"];
    assert_eq!(outcome, "failed", "{reason}");
    assert!(reason.contains("exited 3"), "{reason}");
    assert!(reason.contains("no GPU here"), "{reason}");
    assert_eq!(node.containers(), "", "nothing left in containerd");

    // Still running when validator.timeoutSeconds runs out: failed, and
    // its sandbox is removed all the same.
    let (code, report, _) =
        node.apply("  timeoutSeconds: 2\n  command: [\"/bin/sleep\", \"600\"]\n");
    assert_ne!(code, 0);
    let (_, outcome, reason) = &support::steps(&report)["validator"];
    assert_eq!(outcome, "failed", "{reason}");
    assert!(reason.contains("did not finish within 2s"), "{reason}");
    assert_eq!(node.containers(), "", "nothing left in containerd");
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "containerd needs root: run as root (CI and scripts/test do)"
)]
fn a_sandbox_left_by_a_killed_run_is_removed_by_the_next() {
    let node = Node::start(true);
    let spec = node.spec("  command: [\"/bin/sleep\", \"600\"]\n");
    let mut killed = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"))
        .args(["apply", "--host-exec", "prefix", "--host-root"])
        .arg(node.root())
        .arg("--config")
        .arg(&spec)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The sandbox and its container are up: gpuprov dies without cleaning.
    support::daemon::eventually(
        "the validation container to run",
        std::time::Duration::from_secs(60),
        || node.containers().lines().count() == 2,
    );
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(node.containers().lines().count(), 2, "left behind");

    let (code, report, stderr) = node.apply("  command: [\"/bin/true\"]\n");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(support::steps(&report)["validator"].1, "ready");
    assert_eq!(node.containers(), "", "the leftover sandbox is gone too");
    assert!(
        !node
            .root()
            .join("run/gpuprov/validations/cri-logs")
            .exists(),
        "and its log folder"
    );
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "containerd needs root: run as root (CI and scripts/test do)"
)]
fn a_runtime_binary_containerd_cannot_find_fails_with_containerds_error() {
    let node = Node::start(false);
    let (code, report, _) = node.apply("  mode: cri\n");
    assert_ne!(code, 0);
    let (_, outcome, reason) = &support::steps(&report)["validator"];
    assert_eq!(outcome, "failed", "{reason}");
    assert!(
        reason.contains("RunPodSandbox failed")
            && reason.contains("/usr/local/nvidia/toolkit/nvidia-container-runtime"),
        "containerd's own words, naming the binary: {reason}"
    );
    assert!(node.runtime_calls().is_empty());
    assert_eq!(node.containers(), "", "nothing left in containerd");

    // An image containerd lacks, with imagePullPolicy Never, is named.
    let (code, report, _) = node.apply("  mode: cri\n  image: absent\n  version: \"1\"\n");
    assert_ne!(code, 0);
    let (_, outcome, reason) = &support::steps(&report)["validator"];
    assert_eq!(outcome, "failed", "{reason}");
    assert!(
        reason.contains("containerd does not have the image gpuprov.test/absent:1"),
        "{reason}"
    );
}
