//! gpuprov against a loopback API server (tests/support/fake_api.rs) through
//! the real kube client: labels by server-side apply, opt-outs read from the
//! node, hand-set labels respected, removed labels gone, no writes on a
//! converged node, events, outages and revert.

mod support;

use std::time::Instant;

use support::fake_api::{FakeApi, Fault};
use support::{copy_host, gpuprov, steps, write_spec};

const NODE: &str = "gpu-node-1";

/// `gpuprov <subcommand>` for NODE on the fixture host at `host`, talking
/// to the fake API server.
fn against(fake: &FakeApi, subcommand: &str, host: &std::path::Path) -> assert_cmd::Command {
    let mut cmd = gpuprov();
    cmd.args([subcommand, "--host-exec", "prefix", "--node-name", NODE])
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host);
    cmd
}

/// The operands and the validation have tests of their own
/// (tests/operands.rs); these are about labels.
fn node_prep_only() -> String {
    support::repo()
        .join("fixtures/specs/node-prep-only.yaml")
        .display()
        .to_string()
}

/// `apply --output json` against the fake API server, with the
/// node-prep-only spec unless `extra` names one.
fn apply(
    fake: &FakeApi,
    host: &std::path::Path,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    let default_spec = node_prep_only();
    let spec: &[&str] = if extra.contains(&"--config") {
        &[]
    } else {
        &["--config", &default_spec]
    };
    let output = against(fake, "apply", host)
        .args(["--output", "json"])
        .args(spec)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (output.status.code().unwrap(), report, stderr)
}

fn fake_with_node(labels: &[(&str, &str)]) -> FakeApi {
    FakeApi::with_node(NODE, labels)
}

#[test]
fn labels_go_to_the_node_by_server_side_apply() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    let (code, _, stderr) = apply(&fake, host.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    let labels = fake.labels(NODE);
    assert_eq!(labels["gpuprov.io/driver"], "preinstalled");
    assert_eq!(labels["nvidia.com/gpu.present"], "true");
    assert_eq!(labels["nvidia.com/gpu.deploy.driver"], "pre-installed");
    assert_eq!(labels["kubernetes.io/hostname"], NODE, "other labels stay");
    let ours = fake.owned_by(NODE, "gpuprov");
    assert!(
        ours.contains(&"gpuprov.io/containerd-runtime".to_string()),
        "{ours:?}"
    );
    assert!(!ours.contains(&"kubernetes.io/hostname".to_string()));
    let patches: Vec<_> = fake
        .writes()
        .into_iter()
        // The node's labels; its GPUReady condition goes to /status.
        .filter(|w| w.method == "PATCH" && !w.uri.contains("/status"))
        .collect();
    assert_eq!(patches.len(), 1, "one label PATCH per converge");
    assert!(
        patches[0]
            .content_type
            .starts_with("application/apply-patch"),
        "{:?}",
        patches[0]
    );
    assert!(
        patches[0].uri.contains("fieldManager=gpuprov"),
        "{:?}",
        patches[0]
    );
    assert!(
        !patches[0].uri.contains("force=true"),
        "gpuprov never forces"
    );
    assert!(
        !host
            .path()
            .join("etc/kubernetes/node-feature-discovery/features.d/gpuprov")
            .exists(),
        "with an API server the feature file is not written"
    );
    // Every request says who sends it, for which node, and no query
    // string is left empty or starts with `&`.
    for request in fake.log() {
        assert_eq!(
            request.user_agent,
            format!("gpuprov/{} (node {NODE})", env!("CARGO_PKG_VERSION")),
            "{request:?}"
        );
        assert!(
            !request.uri.ends_with('?')
                && !request.uri.contains("?&")
                && !request.uri.ends_with('&'),
            "{request:?}"
        );
    }
}

#[test]
fn a_converged_node_gets_no_write_at_all() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    assert_eq!(apply(&fake, host.path(), &[]).0, 0);
    fake.clear_log();
    for _ in 0..3 {
        let (code, report, _) = apply(&fake, host.path(), &[]);
        assert_eq!(code, 0);
        assert!(steps(&report).values().all(|s| s.0 != "change"));
    }
    assert_eq!(fake.writes(), Vec::new(), "only GETs on a converged node");
    assert_eq!(
        fake.log().len(),
        3 * 2,
        "two GETs of the node per run: facts and labels"
    );
}

#[test]
fn opt_out_labels_are_read_from_the_node() {
    let fake = fake_with_node(&[("nvidia.com/gpu.deploy.operands", "false")]);
    let host = copy_host("a100-preinstalled");
    let (code, report, _) = apply(&fake, host.path(), &[]);
    assert_eq!(code, 0);
    let steps = steps(&report);
    assert_eq!(steps["driver"].1, "opted-out");
    assert_eq!(steps["containerd-runtime"].1, "opted-out");
    assert_eq!(fake.labels(NODE)["nvidia.com/gpu.deploy.operands"], "false");
}

#[test]
fn a_label_a_person_set_stays_and_the_report_says_so() {
    let fake = fake_with_node(&[]);
    fake.set_label(NODE, "gpuprov.io/driver", "maintenance", "kubectl-label");
    let host = copy_host("a100-preinstalled");
    let (code, report, _) = apply(&fake, host.path(), &[]);
    assert_eq!(code, 0);
    assert_eq!(fake.labels(NODE)["gpuprov.io/driver"], "maintenance");
    let notes = report["labelNotes"].as_array().unwrap();
    assert!(
        notes[0]
            .as_str()
            .unwrap()
            .contains("gpuprov.io/driver=maintenance was set by kubectl-label"),
        "{notes:?}"
    );
    // And it is not fought over: the next run sends nothing.
    fake.clear_log();
    assert_eq!(apply(&fake, host.path(), &[]).0, 0);
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

#[test]
fn labels_gpuprov_no_longer_wants_disappear() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    let site = std::fs::read_to_string(support::repo().join("fixtures/specs/site-states.yaml"))
        .unwrap()
        + &std::fs::read_to_string(node_prep_only()).unwrap();
    let site = write_spec(host.path(), "site.yaml", &site);
    assert_eq!(
        apply(&fake, host.path(), &["--config", site.to_str().unwrap()]).0,
        0
    );
    assert_eq!(
        fake.labels(NODE)["gpuprov.io/persistence-mode"],
        "configured"
    );
    assert_eq!(apply(&fake, host.path(), &[]).0, 0);
    let labels = fake.labels(NODE);
    assert!(
        !labels.contains_key("gpuprov.io/persistence-mode"),
        "{labels:?}"
    );
    assert_eq!(labels["gpuprov.io/driver"], "preinstalled");
}

#[test]
fn changed_and_failed_steps_post_events_once() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "states:\n  - name: broken\n    check: \"false\"\n",
    );
    let spec = spec.to_str().unwrap();
    assert_eq!(apply(&fake, host.path(), &["--config", spec]).0, 3);
    let events = fake.events();
    let reasons: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap().to_string(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // The run did not converge: what changed in it says `Changed`, never
    // `Converged`.
    assert!(
        reasons.contains(&("Changed".into(), "Normal".into())),
        "{reasons:?}"
    );
    assert!(
        !reasons.iter().any(|(reason, _)| reason == "Converged"),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("Failed".into(), "Warning".into())),
        "{reasons:?}"
    );
    let failed = events.iter().find(|e| e["reason"] == "Failed").unwrap();
    assert_eq!(failed["regarding"]["kind"], "Node");
    assert_eq!(failed["regarding"]["name"], NODE);
    assert!(
        failed["note"]
            .as_str()
            .unwrap()
            .starts_with("broken: check exited 1")
    );
    // The same failure on the next run posts nothing new.
    assert_eq!(apply(&fake, host.path(), &["--config", spec]).0, 3);
    assert_eq!(fake.events().len(), events.len());
}

#[test]
fn an_api_outage_is_retried_and_a_lasting_one_is_an_error() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    fake.inject(Fault {
        method: Some("GET"),
        path_prefix: "/api/v1/nodes",
        status: 503,
        retry_after: None,
        times: 2,
        delay_ms: 0,
        body: None,
        ..Default::default()
    });
    fake.inject(Fault {
        method: Some("PATCH"),
        path_prefix: "/api/v1/nodes",
        status: 429,
        retry_after: Some(1),
        times: 1,
        delay_ms: 0,
        body: None,
        ..Default::default()
    });
    let started = Instant::now();
    let (code, _, stderr) = apply(&fake, host.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        started.elapsed().as_millis() >= 1000,
        "Retry-After was honoured"
    );
    assert_eq!(fake.labels(NODE)["gpuprov.io/driver"], "preinstalled");

    let host = copy_host("a100-preinstalled");
    let before = support::tree(host.path());
    fake.inject(Fault {
        method: None,
        path_prefix: "/api/v1/nodes",
        status: 500,
        retry_after: None,
        times: 100,
        delay_ms: 0,
        body: None,
        ..Default::default()
    });
    let (code, _, stderr) = apply(&fake, host.path(), &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("did not answer GET node gpu-node-1 after 5 tries"),
        "{stderr}"
    );
    assert_eq!(
        support::changed(&before, &support::tree(host.path())),
        Vec::<std::path::PathBuf>::new(),
        "an unreachable API server stops the run before anything changes"
    );
}

#[test]
fn a_missing_node_is_an_error_naming_it() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    let kubeconfig = fake.kubeconfig();
    let output = gpuprov()
        .args(["plan", "--node-name", "gpu-node-9", "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--host-root")
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("node gpu-node-9 does not exist"));
}

#[test]
fn plan_shows_the_label_change_and_sends_nothing() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    let output = against(&fake, "plan", host.path()).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("labels → node gpu-node-1 on http://"),
        "{text}"
    );
    assert!(text.contains("+gpuprov.io/driver=preinstalled"), "{text}");
    assert!(fake.writes().is_empty());
}

#[test]
fn revert_takes_back_gpuprovs_labels_only() {
    let fake = fake_with_node(&[("topology.kubernetes.io/zone", "z1")]);
    let host = copy_host("a100-preinstalled");
    assert_eq!(apply(&fake, host.path(), &[]).0, 0);
    against(&fake, "revert", host.path()).assert().success();
    let labels = fake.labels(NODE);
    assert!(
        labels.keys().all(|k| !k.starts_with("gpuprov.io/")),
        "{labels:?}"
    );
    assert!(!labels.contains_key("nvidia.com/gpu.present"));
    assert_eq!(labels["topology.kubernetes.io/zone"], "z1");
}

#[test]
fn gpuprovs_own_false_is_not_mistaken_for_an_opt_out() {
    let fake = fake_with_node(&[]);
    // First the node has no GPU: gpuprov itself labels it gpu.present=false.
    let bare = copy_host("no-gpu");
    assert_eq!(apply(&fake, bare.path(), &[]).0, 0);
    assert_eq!(fake.labels(NODE)["nvidia.com/gpu.present"], "false");
    // A GPU arrives: the label follows, because that `false` was gpuprov's.
    let gpu = copy_host("a100-preinstalled");
    assert_eq!(apply(&fake, gpu.path(), &[]).0, 0);
    assert_eq!(fake.labels(NODE)["nvidia.com/gpu.present"], "true");
    // A person's `false` on a compat label stays.
    fake.set_label(
        NODE,
        "nvidia.com/gpu.deploy.driver",
        "false",
        "kubectl-label",
    );
    assert_eq!(apply(&fake, gpu.path(), &[]).0, 0);
    assert_eq!(fake.labels(NODE)["nvidia.com/gpu.deploy.driver"], "false");
}

#[test]
fn a_conflict_reads_the_node_again_and_a_slow_server_is_waited_for() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    fake.inject(Fault {
        method: Some("PATCH"),
        path_prefix: "/api/v1/nodes",
        status: 409,
        retry_after: None,
        times: 1,
        delay_ms: 0,
        body: None,
        ..Default::default()
    });
    fake.inject(Fault {
        method: Some("GET"),
        path_prefix: "/api/v1/nodes",
        status: 0,
        retry_after: None,
        times: 2,
        delay_ms: 700,
        body: None,
        ..Default::default()
    });
    let (code, _, stderr) = apply(&fake, host.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("a label conflict: reading the node again"),
        "{stderr}"
    );
    assert_eq!(fake.labels(NODE)["gpuprov.io/driver"], "preinstalled");
    let patches = fake
        .log()
        .into_iter()
        .filter(|l| l.method == "PATCH" && !l.uri.contains("/status"))
        .count();
    assert_eq!(patches, 2, "the conflicted apply, then one more");
}

/// The fake serves Pods as the kube client expects (create, get, list,
/// delete), for the validation pod.
#[test]
fn the_fake_serves_pods_to_the_real_client() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, DeleteParams, ListParams, PostParams};

    let fake = fake_with_node(&[]);
    let kubeconfig = kube::config::Kubeconfig::read_from(fake.kubeconfig()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(kube::Client::try_from(config).unwrap(), "gpuprov");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cuda-vectoradd"},
            "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "cuda-vectoradd", "image": "vectoradd"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        assert!(pods.create(&PostParams::default(), &pod).await.is_err(), "a second create conflicts");
        fake.set_pod_phase("gpuprov", "cuda-vectoradd", "Succeeded");
        let got = pods.get("cuda-vectoradd").await.unwrap();
        assert_eq!(got.status.unwrap().phase.as_deref(), Some("Succeeded"));
        assert_eq!(pods.list(&ListParams::default()).await.unwrap().items.len(), 1);
        pods.delete("cuda-vectoradd", &DeleteParams::default()).await.unwrap();
        assert!(pods.get("cuda-vectoradd").await.is_err());
    });
    assert!(fake.pods().is_empty());
}

#[test]
fn events_that_cannot_be_posted_do_not_fail_the_converge() {
    let fake = fake_with_node(&[]);
    fake.inject(Fault {
        method: Some("POST"),
        path_prefix: "/apis/events.k8s.io",
        status: 403,
        retry_after: None,
        times: 100,
        delay_ms: 0,
        body: None,
        ..Default::default()
    });
    let host = copy_host("a100-preinstalled");
    let (code, _, stderr) = apply(&fake, host.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("node events not posted"), "{stderr}");
    assert_eq!(fake.labels(NODE)["gpuprov.io/driver"], "preinstalled");
}

#[test]
fn no_kubeconfig_and_no_cluster_is_exit_1_with_the_hint_and_the_root_cause() {
    // A newcomer's laptop, or a bootstrap image: no in-cluster variables,
    // no KUBECONFIG, no ~/.kube/config. The labels have nowhere to go.
    let host = copy_host("a100-preinstalled");
    let home = tempfile::tempdir().unwrap();
    let out = gpuprov()
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", home.path())
        .args(["apply", "--labels-sink", "api", "--node-name", "n1"])
        .args(["--host-exec", "prefix", "--host-root"])
        .arg(host.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("give --kubeconfig FILE, or --labels-sink file"),
        "{stderr}"
    );
    assert!(stderr.contains(".kube/config"), "the root cause: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sigterm_while_the_api_server_hangs_stops_apply_at_once() {
    let fake = fake_with_node(&[]);
    let host = copy_host("a100-preinstalled");
    let before = support::tree(host.path());
    // Every request waits an hour: apply is stuck on its first, the
    // Node's GET, until it is told to stop.
    fake.hang();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"))
        .args(["apply", "--host-exec", "prefix", "--node-name", NODE])
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host.path())
        .args(["--config", &node_prep_only()])
        .env_remove("KUBECONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(15);
    while fake.log().is_empty() {
        assert!(
            Instant::now() < deadline,
            "apply never asked the API server"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let Some(status) = support::sigterm_and_wait(&mut child, std::time::Duration::from_secs(10))
    else {
        let _ = child.kill();
        panic!("apply did not stop within 10 s of SIGTERM with the API server hung");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(
            "stopped by SIGTERM or SIGINT while waiting on the API server for GET node gpu-node-1"
        ),
        "{stderr}"
    );
    assert_eq!(
        support::changed(&before, &support::tree(host.path())),
        Vec::<std::path::PathBuf>::new(),
        "nothing on the host changed"
    );
}
