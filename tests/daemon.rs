//! `gpuprov run` against the fake API server: it converges, serves its
//! probes and metrics, converges again when the node's labels change and
//! when containerd's config drifts, and stops cleanly on SIGTERM.

mod support;

use support::containerd_restarts;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::daemon::{Daemon, eventually, free_port, get};
use support::fake_api::{FakeApi, Kubelet, Operands};
use support::{copy_host, repo};

const NODE: &str = "gpu-node-1";

/// `gpuprov run` on the A100 fixture against a working loopback cluster
/// (the operands' DaemonSets follow the labels, the validation pod
/// passes), once `/readyz` says converged: the first converge labels the
/// node for its operands and waits; the next (a pending interval later)
/// finds them running and validates.
fn converged_daemon() -> (FakeApi, tempfile::TempDir, u16, Daemon) {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    let host = copy_host("a100-preinstalled");
    let port = free_port();
    let daemon = Daemon::spawn(&fake, NODE, host.path(), "1s", port);
    eventually("/readyz to say converged", Duration::from_secs(30), || {
        get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    (fake, host, port, daemon)
}

#[test]
fn run_keeps_the_node_converged_and_stops_on_sigterm() {
    let (fake, host, port, mut daemon) = converged_daemon();
    assert_eq!(get(port, "/healthz").unwrap().0, 200);
    let (_, metrics) = get(port, "/metrics").unwrap();
    for line in [
        "gpuprov_state_outcome{state=\"driver\",outcome=\"preinstalled\"} 1",
        "gpuprov_state_outcome{state=\"device-plugin\",outcome=\"ready\"} 1",
        "gpuprov_state_outcome{state=\"validator\",outcome=\"ready\"} 1",
        "gpuprov_converged 1",
        // Two label applies and the GPUReady condition twice (False
        // while the operands start, True once validated); the device
        // plugin's ConfigMap once, created by server-side apply: 201.
        "gpuprov_api_requests_total{verb=\"PATCH\",code=\"200\"} 4",
        "gpuprov_api_requests_total{verb=\"PATCH\",code=\"201\"} 1",
        "gpuprov_api_requests_total{verb=\"POST\",code=\"201\"}",
        "gpuprov_converge_duration_seconds_count",
        "gpuprov_last_success_timestamp_seconds",
        // The GPU Operator's node-status-exporter names, from the states.
        "\ngpu_operator_node_driver_ready 1\n",
        "\ngpu_operator_node_toolkit_ready 1\n",
        "\ngpu_operator_node_plugin_ready 1\n",
        "\ngpu_operator_node_cuda_ready 1\n",
        // No NVML library given: the driver is not validated.
        "\ngpu_operator_node_driver_validation 0\n",
        "\ngpu_operator_node_device_plugin_devices_total 1\n",
        "# TYPE gpu_operator_node_device_plugin_devices_total gauge\n",
        "\ngpu_operator_node_metrics_ready_ts_seconds 1",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    let labels = fake.labels(NODE);
    assert_eq!(labels["gpuprov.io/driver"], "preinstalled");
    assert_eq!(labels["nvidia.com/gpu.deploy.device-plugin"], "true");
    assert_eq!(labels["gpuprov.io/validator"], "ready");
    assert!(
        fake.pods().iter().all(|p| !p["metadata"]["name"]
            .as_str()
            .unwrap()
            .contains("vectoradd")),
        "the validation pod is deleted"
    );
    assert_eq!(containerd_restarts(host.path()), 1);

    // The watch connection drops; the daemon opens it again. Then someone
    // opts the node out of operands: the daemon follows the watch.
    fake.drop_watches();
    std::thread::sleep(Duration::from_millis(500));
    fake.set_label(
        NODE,
        "nvidia.com/gpu.deploy.operands",
        "false",
        "kubectl-label",
    );
    eventually("the opt-out to be applied", Duration::from_secs(15), || {
        fake.labels(NODE)
            .get("gpuprov.io/driver")
            .map(String::as_str)
            == Some("opted-out")
    });
    let labels = fake.labels(NODE);
    assert!(
        !labels.contains_key("nvidia.com/gpu.deploy.device-plugin"),
        "the operands leave: {labels:?}"
    );
    assert!(fake.pods().is_empty(), "the exporter's pod is gone");
    fake.set_label(
        NODE,
        "nvidia.com/gpu.deploy.operands",
        "true",
        "kubectl-label",
    );
    eventually("the node to be back in", Duration::from_secs(15), || {
        fake.labels(NODE)
            .get("gpuprov.io/driver")
            .map(String::as_str)
            == Some("preinstalled")
    });

    // Another tool rewrites containerd's config: the drift check puts the
    // runtime back, restarting containerd once for that change.
    let config = host.path().join("etc/containerd/config.toml");
    let restarted = containerd_restarts(host.path());
    std::fs::copy(repo().join("fixtures/containerd/v2-default.toml"), &config).unwrap();
    eventually(
        "the runtime to be put back",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(&config)
                .unwrap()
                .contains("runtimes.nvidia")
        },
    );
    eventually("containerd's restart", Duration::from_secs(15), || {
        containerd_restarts(host.path()) == restarted + 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        containerd_restarts(host.path()),
        restarted + 1,
        "drift checks of an unchanged file restart nothing"
    );

    let status = support::sigterm_and_wait(&mut daemon.0, Duration::from_secs(10))
        .expect("run stops within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn run_without_an_api_server_is_an_error() {
    let host = copy_host("a100-preinstalled");
    let output = support::gpuprov()
        .args(["run", "--labels-sink", "file", "--host-root"])
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("gpuprov run needs an API server"));
}

#[test]
fn run_stops_on_sigterm_while_the_api_server_hangs() {
    let (fake, host, _, mut daemon) = converged_daemon();

    // The API server goes silent: the open watch yields nothing more and
    // never closes, and every request is left unanswered. A drift makes
    // the daemon converge again, so a request of its own hangs too.
    fake.hang();
    fake.clear_log();
    let config = host.path().join("etc/containerd/config.toml");
    std::fs::copy(repo().join("fixtures/containerd/v2-default.toml"), &config).unwrap();
    eventually(
        "a request to the hung API server",
        Duration::from_secs(15),
        || !fake.log().is_empty(),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "run keeps running while the API server hangs"
    );

    let status = support::sigterm_and_wait(&mut daemon.0, Duration::from_secs(10))
        .expect("run stops within 10 s of SIGTERM with the API server hung");
    assert_eq!(status.code(), Some(0));
}

/// A ConfigMap volume as the kubelet writes it: the file is a link through
/// `..data`, a link to a timestamped directory, and an update swaps `..data`
/// in one rename. The daemon converges with the new spec at once, without
/// waiting for its drift interval (an hour here).
#[test]
fn run_follows_a_configmap_update_of_its_config() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    let host = copy_host("a100-preinstalled");
    let volume = tempfile::tempdir().unwrap();
    let version = |name: &str, spec: &str| {
        std::fs::create_dir(volume.path().join(name)).unwrap();
        std::fs::write(volume.path().join(name).join("config.yaml"), spec).unwrap();
    };
    version(
        "..2026_12_01_00_00_00.1",
        "dcgmExporter:\n  enabled: true\n",
    );
    std::os::unix::fs::symlink("..2026_12_01_00_00_00.1", volume.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.yaml", volume.path().join("config.yaml")).unwrap();
    let config = volume.path().join("config.yaml");
    let port = free_port();
    let _daemon = Daemon::spawn_with(
        &fake,
        NODE,
        host.path(),
        "1h",
        port,
        &["--config".as_ref(), config.as_os_str()],
    );
    eventually("/readyz to say converged", Duration::from_secs(30), || {
        get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    assert_eq!(fake.labels(NODE)["gpuprov.io/dcgm-exporter"], "ready");

    version(
        "..2026_12_01_00_05_00.2",
        "dcgmExporter:\n  enabled: false\n",
    );
    std::os::unix::fs::symlink("..2026_12_01_00_05_00.2", volume.path().join("..data_tmp"))
        .unwrap();
    std::fs::rename(
        volume.path().join("..data_tmp"),
        volume.path().join("..data"),
    )
    .unwrap();
    eventually("the new spec's labels", Duration::from_secs(10), || {
        fake.labels(NODE)
            .get("gpuprov.io/dcgm-exporter")
            .map(String::as_str)
            == Some("disabled")
    });
}

/// Clients that connect and never finish a request (a port scan, a stuck
/// scraper, a slowloris) are dropped after the header-read timeout, and
/// the server goes on answering.
#[test]
fn a_client_that_never_sends_its_request_is_dropped() {
    let fake = FakeApi::with_node(NODE, &[]);
    let host = copy_host("a100-preinstalled");
    let port = free_port();
    let _daemon = Daemon::spawn(&fake, NODE, host.path(), "1h", port);
    eventually("/healthz to answer", Duration::from_secs(30), || {
        get(port, "/healthz").is_some_and(|(code, _)| code == 200)
    });
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    idle[0].write_all(b"GET /metr").unwrap();
    let started = std::time::Instant::now();
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        // The server closes it (after a 408, or without a word).
        stream
            .read_to_end(&mut answer)
            .expect("closed by the server, not left open");
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "dropped after {:?}",
        started.elapsed()
    );
    assert_eq!(get(port, "/healthz").unwrap().0, 200);
}

/// A cluster with nothing but gpuprov (no NFD) whose DCGM exporter pod
/// never becomes Ready (its image cannot be pulled, say): the default spec
/// (GFD's labels built in) converges the rest, and `/readyz` answers ready
/// and says what it does not wait for; a Node event says it once.
#[test]
fn an_optional_operand_that_never_starts_does_not_hold_readiness_and_says_why() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_operands(Operands {
        gpus: 1,
        product: "set-by-gfd-which-is-not-deployed".into(),
        exporter_ready: false,
    });
    fake.kubelet(Kubelet::Runs {
        phase: "Succeeded",
        after_ms: 0,
        log: "Test PASSED\n".into(),
        exit_code: 0,
    });
    let host = copy_host("a100-preinstalled");
    let port = free_port();
    let nvml = support::fake_nvml_library();
    let _daemon = Daemon::spawn_with(
        &fake,
        NODE,
        host.path(),
        "1s",
        port,
        &["--nvml-lib".as_ref(), nvml.as_os_str()],
    );
    eventually("/readyz to say ready", Duration::from_secs(30), || {
        get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let (_, body) = get(port, "/readyz").unwrap();
    assert!(body.starts_with("ready\n"), "{body}");
    let line = body
        .lines()
        .find(|l| l.starts_with("dcgm-exporter: pending: "))
        .unwrap_or_else(|| panic!("/readyz does not say what it does not wait for:\n{body}"));
    assert!(line.ends_with("(optional: not waited for)"), "{line}");
    let labels = fake.labels(NODE);
    assert_eq!(labels["gpuprov.io/validator"], "ready");
    assert_eq!(labels["gpuprov.io/gpu-feature-discovery"], "ready");
    assert_eq!(labels["nvidia.com/gpu.product"], "NVIDIA-A100-SXM4-40GB");
    assert!(
        !labels.contains_key("nvidia.com/gpu.deploy.gpu-feature-discovery"),
        "no GFD DaemonSet is asked for: {labels:?}"
    );
    let (_, metrics) = get(port, "/metrics").unwrap();
    assert!(metrics.contains("gpuprov_ready 1"), "{metrics}");
    assert!(metrics.contains("gpuprov_converged 0"), "{metrics}");
    // Converges go on every pending interval; the event is posted once for
    // the whole wait.
    std::thread::sleep(Duration::from_secs(3));
    let waiting: Vec<_> = fake
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "Waiting")
        .collect();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let note = waiting[0]["note"].as_str().unwrap();
    assert!(
        note.starts_with("dcgm-exporter: ") && note.contains("gpuprov is ready without it"),
        "{note}"
    );
}

/// A required step that waits (the validation pod is never scheduled)
/// holds `/readyz`, whose body names it and why.
#[test]
fn a_required_wait_holds_readiness_and_names_the_step() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    fake.kubelet(Kubelet::NeverSchedules);
    let host = copy_host("a100-preinstalled");
    let port = free_port();
    let _daemon = Daemon::spawn(&fake, NODE, host.path(), "1s", port);
    eventually("a converge to finish", Duration::from_secs(30), || {
        get(port, "/readyz").is_some_and(|(_, body)| body.contains("validator: "))
    });
    let (code, body) = get(port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready\n"), "{body}");
    let line = body.lines().find(|l| l.starts_with("validator: ")).unwrap();
    assert!(!line.contains("optional"), "{line}");
}
