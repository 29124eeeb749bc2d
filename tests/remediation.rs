//! GPU fault remediation through `gpuprov run` against the fake API server,
//! the faults injected as XID events into the fake NVML library's event
//! set (and resets answered by its hot-plug functions): the stages each
//! node publishes, in the order the API server got them, are the proof.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::daemon::{Daemon, eventually};
use support::fake_api::FakeApi;
use support::{copy_host, write_spec};

const NODE: &str = "gpu-node-1";
const STAGE: &str = "gpuprov.io/remediation";
const NAMESPACE: &str = "gpuprov";
/// GPU 2 of the HGX H100 fixture.
const GPU2_BUS: &str = "00000000:3A:00.0";

/// A node agent: `gpuprov run` on a copy of the 8-GPU HGX H100 host.
struct Agent {
    host: tempfile::TempDir,
    events: PathBuf,
    resets: PathBuf,
    _daemon: Daemon,
}

impl Agent {
    /// Health holds after 2 s without an error.
    fn start(fake: &FakeApi, node: &str, remediation: &str) -> Agent {
        Agent::start_with(fake, node, remediation, 2, |_| {})
    }

    /// With `health.recoverAfterSeconds` and `prepare` run on the host
    /// before `gpuprov run` starts.
    fn start_with(
        fake: &FakeApi,
        node: &str,
        remediation: &str,
        recover_after: u64,
        prepare: impl FnOnce(&Path),
    ) -> Agent {
        Agent::start_full(fake, node, remediation, recover_after, None, prepare)
    }

    /// Serving its metrics on `port`.
    fn start_on(
        fake: &FakeApi,
        node: &str,
        remediation: &str,
        recover_after: u64,
        port: Option<u16>,
    ) -> Agent {
        Agent::start_full(fake, node, remediation, recover_after, port, |_| {})
    }

    fn start_full(
        fake: &FakeApi,
        node: &str,
        remediation: &str,
        recover_after: u64,
        port: Option<u16>,
        prepare: impl FnOnce(&Path),
    ) -> Agent {
        let host = copy_host("h100x8-nvswitch-preinstalled");
        prepare(host.path());
        let fixture = support::telemetry_fixture(host.path());
        let events = host.path().join("nvml-events");
        std::fs::write(&events, "").unwrap();
        let resets = host.path().join("nvml-resets");
        let spec = write_spec(
            host.path(),
            "node.yaml",
            &format!(
                "health:\n  recoverAfterSeconds: {recover_after}\nremediation:\n  enabled: true\n{remediation}"
            ),
        );
        let log = std::fs::File::create(host.path().join("gpuprov.log")).unwrap();
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"))
            .env("GPUPROV_FAKE_NVML", &fixture)
            .env("GPUPROV_FAKE_NVML_EVENTS", &events)
            .env("GPUPROV_FAKE_NVML_RESETS", &resets)
            .env("RUST_LOG", "info")
            .args(["run", "--host-exec", "prefix", "--node-name", node])
            .arg("--nvml-lib")
            .arg(support::fake_nvml_library())
            .arg("--config")
            .arg(&spec)
            .args(["--drift-interval", "1h", "--pending-interval", "1s"])
            .args(["--slot-wait-interval", "1s"])
            .arg("--kubeconfig")
            .arg(fake.kubeconfig())
            .arg("--host-root")
            .arg(host.path())
            .args(["--listen", &format!("127.0.0.1:{}", port.unwrap_or(0))])
            .env_remove("KUBECONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let agent = Agent {
            host,
            events,
            resets,
            _daemon: Daemon(child),
        };
        eventually(
            &format!("{node}: gpu-remediation ready"),
            Duration::from_secs(60),
            || {
                fake.labels(node)
                    .get("gpuprov.io/gpu-remediation")
                    .map(String::as_str)
                    == Some("ready")
            },
        );
        agent
    }

    /// An XID on a GPU, as the driver reports it.
    fn xid(&self, gpu: u32, xid: u64) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.events)
            .unwrap();
        writeln!(file, "{gpu} xid {xid}").unwrap();
    }

    fn resets(&self) -> String {
        std::fs::read_to_string(&self.resets).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.host.path().join("gpuprov.log")).unwrap_or_default()
    }

    /// `eventually`, with the agent's log in the failure.
    fn until(&self, what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        while !check() {
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; gpuprov's log:\n{}\nhost record: {}",
                    self.log(),
                    std::fs::read_to_string(
                        self.host.path().join("var/lib/gpuprov/remediation.json")
                    )
                    .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn cluster(nodes: &[&str]) -> FakeApi {
    let fake = FakeApi::with_node(nodes[0], &[("nvidia.com/gpu.present", "true")]);
    for node in &nodes[1..] {
        fake.add_node(node, &[("nvidia.com/gpu.present", "true")], "kubelet");
    }
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    fake
}

fn stage(fake: &FakeApi, node: &str) -> Option<String> {
    fake.labels(node).get(STAGE).cloned()
}

/// Each node's published stages in the order the API server got them,
/// and the most nodes past `taint` (holding a slot) at any moment.
fn walks(fake: &FakeApi) -> (BTreeMap<String, Vec<String>>, usize) {
    fake.walks("gpuprov-remediation", STAGE, "healthy", |s| {
        matches!(s, "draining" | "resetting" | "rebooting" | "recovering")
    })
}

/// A remediation under way is `degraded`, never `failed`: no label write
/// ever said otherwise.
fn never_failed(fake: &FakeApi, agent: &Agent) {
    assert!(
        !fake
            .log()
            .iter()
            .any(|l| l.body.contains("\"gpuprov.io/gpu-remediation\":\"failed\"")),
        "{}",
        agent.log()
    );
}

fn event_reasons(fake: &FakeApi, node: &str) -> Vec<String> {
    fake.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == node)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn event_notes(fake: &FakeApi, reason: &str) -> Vec<String> {
    fake.events()
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn remediation_leases(fake: &FakeApi) -> Vec<String> {
    fake.leases(NAMESPACE)
        .into_keys()
        .filter(|name| name.starts_with("gpuprov-remediation"))
        .collect()
}

fn fault_taints(fake: &FakeApi, node: &str) -> Vec<String> {
    fake.taints(node)
        .into_iter()
        .filter(|t| t.starts_with("gpuprov.io/gpu-fault"))
        .collect()
}

/// A reset-class XID (48, double-bit ECC) on an idle GPU: the node takes
/// the slot, is cordoned, GPU 2 (and only it) is reset through NVML,
/// health holds for `recoverAfterSeconds`, and the taint, the cordon and
/// the slot go; the node says `recovered`.
#[test]
fn a_reset_class_xid_on_an_idle_gpu_resets_and_recovers() {
    let fake = cluster(&[NODE]);
    let agent = Agent::start(&fake, NODE, "");
    agent.xid(2, 48);
    agent.until("recovered", 60, || {
        stage(&fake, NODE).as_deref() == Some("recovered")
    });
    let (walks, _) = walks(&fake);
    assert_eq!(
        walks[NODE],
        ["draining", "resetting", "recovering", "recovered"],
        "{}",
        agent.log()
    );
    assert_eq!(agent.resets(), format!("reset {GPU2_BUS}\n"));
    never_failed(&fake, &agent);
    assert!(
        fault_taints(&fake, NODE).is_empty(),
        "{:?}",
        fake.taints(NODE)
    );
    assert!(!fake.unschedulable(NODE));
    assert!(remediation_leases(&fake).is_empty());
    // The taint was on while it lasted: the log has the taint's write.
    assert!(
        fake.log()
            .iter()
            .any(|l| l.method == "PATCH" && l.body.contains("\"key\":\"gpuprov.io/gpu-fault\"")),
        "no taint written"
    );
    let reasons = event_reasons(&fake, NODE);
    for wanted in ["GpuRemediation", "GpuRecovered"] {
        assert!(reasons.iter().any(|r| r == wanted), "{reasons:?}");
    }
    assert!(
        event_notes(&fake, "GpuRemediation")
            .iter()
            .any(|n| n
                .contains("reset: resetNeeded on GPU 0000:3a:00.0: XID 48 (double-bit ECC error)")),
        "{:#?}",
        fake.events()
    );
}

/// The same XID while a pod holds GPUs on the node: the pod is evicted
/// (Eviction API) before the GPU is reset.
#[test]
fn a_reset_with_a_gpu_pod_running_drains_it_first() {
    let fake = cluster(&[NODE]);
    let agent = Agent::start(&fake, NODE, "");
    fake.add_gpu_pod("ml", "trainer", NODE, &[("app", "trainer")], 8);
    agent.xid(2, 48);
    agent.until("recovered", 60, || {
        stage(&fake, NODE).as_deref() == Some("recovered")
    });
    let log = fake.log();
    let evicted = log
        .iter()
        .position(|l| l.method == "POST" && l.uri.contains("/pods/trainer/eviction"))
        .expect("the GPU pod was evicted");
    let resetting = log
        .iter()
        .position(|l| {
            l.uri.contains("fieldManager=gpuprov-remediation") && l.body.contains("resetting")
        })
        .expect("the node said resetting");
    assert!(evicted < resetting, "evicted after the reset began");
    assert_eq!(agent.resets(), format!("reset {GPU2_BUS}\n"));
}

/// A reboot-class XID (79) with `rebootNeeded: reboot`: while another
/// node holds the only slot, the node waits tainted and the command does
/// not run; once the slot is free it runs, and after the node comes back
/// (a new boot id) it recovers.
#[test]
fn a_reboot_class_xid_runs_the_command_only_with_a_slot() {
    let fake = cluster(&[NODE, "gpu-node-2"]);
    let agent = Agent::start_with(
        &fake,
        NODE,
        "  policy:\n    rebootNeeded: reboot\n  rebootCommand: [/usr/local/sbin/test-reboot]\n",
        10,
        |host| {
            let script = host.join("usr/local/sbin/test-reboot");
            std::fs::create_dir_all(script.parent().unwrap()).unwrap();
            std::fs::write(
                &script,
                "#!/bin/sh\necho rebooting >> \"$GPUPROV_HOST_ROOT/rebooted\"\n",
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            let boot = host.join("proc/sys/kernel/random/boot_id");
            std::fs::create_dir_all(boot.parent().unwrap()).unwrap();
            std::fs::write(&boot, "1f0e6d3c-0000-4000-8000-000000000001\n").unwrap();
        },
    );
    // The other node holds the only slot, renewing it.
    fake.hold_lease(NAMESPACE, "gpuprov-remediation-0", "gpu-node-2", 3600);
    agent.xid(3, 79);
    agent.until("waiting for a slot", 30, || {
        stage(&fake, NODE).as_deref() == Some("waiting-for-slot")
    });
    std::thread::sleep(Duration::from_secs(3));
    let rebooted = agent.host.path().join("rebooted");
    assert!(!rebooted.exists(), "rebooted without a slot");
    assert_eq!(
        fault_taints(&fake, NODE),
        ["gpuprov.io/gpu-fault:NoSchedule"]
    );
    assert!(
        fake.log()
            .iter()
            .any(|l| l.body.contains("\"value\":\"rebootNeeded\""))
    );

    fake.delete_lease(NAMESPACE, "gpuprov-remediation-0");
    eventually("the reboot command ran", Duration::from_secs(30), || {
        rebooted.exists()
    });
    assert_eq!(stage(&fake, NODE).as_deref(), Some("rebooting"));
    assert_eq!(std::fs::read_to_string(&rebooted).unwrap(), "rebooting\n");
    assert!(fake.unschedulable(NODE));

    // The node comes back on a new boot.
    std::fs::write(
        agent.host.path().join("proc/sys/kernel/random/boot_id"),
        "1f0e6d3c-0000-4000-8000-000000000002\n",
    )
    .unwrap();
    // The daemon looks again (in production it is a new process).
    std::fs::write(agent.host.path().join("run/gpuprov/gpu-errors.json"), "[]").unwrap();
    eventually("recovered", Duration::from_secs(60), || {
        stage(&fake, NODE).as_deref() == Some("recovered")
    });
    let (walks, _) = walks(&fake);
    assert_eq!(
        walks[NODE],
        [
            "waiting-for-slot",
            "draining",
            "rebooting",
            "recovering",
            "recovered"
        ]
    );
    assert_eq!(std::fs::read_to_string(&rebooted).unwrap(), "rebooting\n");
    assert!(!fake.unschedulable(NODE));
    never_failed(&fake, &agent);
}

/// Twenty agents, each with a reset-class XID at once, under
/// `maxUnavailable: 2`: the API server's log proves no more than two were
/// ever past `taint`, and all twenty recover.
#[test]
fn twenty_agents_never_have_more_than_two_past_taint() {
    let nodes: Vec<String> = (1..=20).map(|i| format!("gpu-node-{i}")).collect();
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let fake = cluster(&names);
    let agents: Vec<Agent> = names
        .iter()
        .map(|node| {
            Agent::start(
                &fake,
                node,
                "  maxUnavailable: 2\n  storm:\n    maxFaultingNodes: \"100%\"\n",
            )
        })
        .collect();
    fake.clear_log();
    for agent in &agents {
        agent.xid(1, 48);
    }
    eventually("all twenty recovered", Duration::from_secs(240), || {
        names
            .iter()
            .all(|n| stage(&fake, n).as_deref() == Some("recovered"))
    });
    let (walks, most) = walks(&fake);
    assert!(most <= 2, "{most} nodes past taint at once: {walks:#?}");
    assert!(most >= 1);
    for node in &names {
        assert_eq!(walks[*node].last().map(String::as_str), Some("recovered"));
        assert!(!fake.unschedulable(node));
    }
    assert!(remediation_leases(&fake).is_empty());
    never_failed(&fake, &agents[0]);
}

/// More nodes faulting within the window than `storm.maxFaultingNodes`:
/// the node that counts them raises the storm and stays at `taint`; the
/// other affected node sees it and does the same; both have an event;
/// nothing is drained or reset. Deleting the storm Lease lets them go on.
#[test]
fn a_storm_stops_automatic_action() {
    let fake = cluster(&[NODE, "gpu-node-2", "gpu-node-3", "gpu-node-4"]);
    // Two other nodes began faulting a minute ago.
    let since = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 60)
        .to_string();
    for other in ["gpu-node-3", "gpu-node-4"] {
        fake.set_label(
            other,
            "gpuprov.io/gpu-fault-since",
            &since,
            "gpuprov-remediation",
        );
    }
    let spec = "  storm:\n    maxFaultingNodes: 2\n    windowSeconds: 600\n";
    // The faults last the test out.
    let first = Agent::start_with(&fake, NODE, spec, 120, |_| {});
    let second = Agent::start_with(&fake, "gpu-node-2", spec, 120, |_| {});
    first.xid(2, 48);
    first.until("storm raised", 30, || {
        fake.leases(NAMESPACE)
            .contains_key("gpuprov-remediation-storm")
    });
    second.xid(5, 48);
    for node in [NODE, "gpu-node-2"] {
        eventually(
            &format!("{node} storm-hold event"),
            Duration::from_secs(30),
            || {
                stage(&fake, node).as_deref() == Some("storm-hold")
                    && event_reasons(&fake, node)
                        .iter()
                        .any(|r| r == "GpuRemediationStorm")
            },
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(first.resets(), "");
    assert_eq!(second.resets(), "");
    assert!(!fake.unschedulable(NODE) && !fake.unschedulable("gpu-node-2"));
    assert!(
        event_notes(&fake, "GpuRemediationStorm")
            .iter()
            .all(|n| n.contains("delete Lease gpuprov-remediation-storm")),
        "{:#?}",
        fake.events()
    );
    let (walks, most) = walks(&fake);
    assert_eq!(most, 0, "{walks:#?}");
    never_failed(&fake, &first);
}

/// A GPU that faults again within `flapWindowSeconds` of its recovery is
/// left tainted for a person, the history in its event; a person setting
/// the label to `cleared` hands it back.
#[test]
fn a_flapping_gpu_is_left_for_a_person() {
    let fake = cluster(&[NODE]);
    let agent = Agent::start(&fake, NODE, "  flapWindowSeconds: 3600\n");
    agent.xid(2, 48);
    agent.until("recovered", 60, || {
        stage(&fake, NODE).as_deref() == Some("recovered")
    });
    agent.xid(2, 48);
    eventually("needs attention", Duration::from_secs(30), || {
        stage(&fake, NODE).as_deref() == Some("needs-attention")
    });
    std::thread::sleep(Duration::from_secs(3));
    // Not reset again, tainted, and it stays so.
    assert_eq!(agent.resets(), format!("reset {GPU2_BUS}\n"));
    assert_eq!(stage(&fake, NODE).as_deref(), Some("needs-attention"));
    assert_eq!(
        fault_taints(&fake, NODE),
        ["gpuprov.io/gpu-fault:NoSchedule"],
        "{:#?}",
        fake.log()
            .iter()
            .filter(|l| l.body.contains("taints"))
            .map(|l| l.body.clone())
            .collect::<Vec<_>>()
    );
    // Once the GPU's own health is back, remediation holds GPUReady.
    agent.until("GPUReady False for remediation", 30, || {
        fake.condition(NODE, "nvidia.com/GPUReady")
            .is_some_and(|c| c["status"] == "False" && c["reason"] == "GpuRemediationDegraded")
    });
    never_failed(&fake, &agent);
    let notes = event_notes(&fake, "GpuFaultRepeated");
    assert!(
        notes.iter().any(|n| n.contains("faulted again")
            && n.contains("History:")
            && n.contains("recovered: health held")),
        "{notes:#?}"
    );

    fake.set_label(NODE, STAGE, "cleared", "kubectl-label");
    agent.until("handed back", 30, || {
        stage(&fake, NODE).is_none() && fault_taints(&fake, NODE).is_empty()
    });
}

/// Remediation on, no fault: after the first converge a node writes
/// nothing to the API server and asks it nothing for remediation.
#[test]
fn a_converged_healthy_node_writes_nothing() {
    let fake = cluster(&[NODE]);
    let _agent = Agent::start(&fake, NODE, "");
    std::thread::sleep(Duration::from_secs(2));
    fake.clear_log();
    std::thread::sleep(Duration::from_secs(5));
    let log = fake.log();
    assert!(
        log.iter()
            .all(|l| l.method == "GET" && !l.uri.contains("lease")),
        "{:#?}",
        log.iter()
            .map(|l| format!("{} {}", l.method, l.uri))
            .collect::<Vec<_>>()
    );
    assert!(stage(&fake, NODE).is_none());
}

/// `plan` on a node with a recent reset-class XID shows what remediation
/// would do now, step by step, and changes nothing; without an API server
/// it says remediation cannot act and names the fault.
#[test]
fn plan_shows_what_remediation_would_do() {
    let fake = cluster(&[NODE]);
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let fixture = support::telemetry_fixture(host.path());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::fs::create_dir_all(host.path().join("run/gpuprov")).unwrap();
    std::fs::write(
        host.path().join("run/gpuprov/gpu-errors.json"),
        serde_json::json!([{"gpu": 2, "uuid": "GPU-5f1c4e2a-0d3b-4c7e-9a10-00000000003A", "xid": 48, "at": now}])
            .to_string(),
    )
    .unwrap();
    let spec = write_spec(
        host.path(),
        "node.yaml",
        "remediation:\n  enabled: true\n  maxUnavailable: 3\n",
    );
    let plan = |with_api: bool| {
        let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"));
        command
            .env("GPUPROV_FAKE_NVML", &fixture)
            .args(["plan", "--host-exec", "prefix", "--node-name", NODE])
            .arg("--nvml-lib")
            .arg(support::fake_nvml_library())
            .arg("--config")
            .arg(&spec)
            .arg("--host-root")
            .arg(host.path())
            .env_remove("KUBECONFIG");
        if with_api {
            command.arg("--kubeconfig").arg(fake.kubeconfig());
        }
        let output = command.output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    };
    let text = plan(true);
    for wanted in [
        "reset in remediation slot 1 of 3: resetNeeded on GPU 0000:3a:00.0: XID 48 (double-bit ECC error)",
        "take a remediation slot (one of 3 Leases gpuprov/gpuprov-remediation-N)",
        "label the node gpuprov.io/remediation=draining",
        "taint the node gpuprov.io/gpu-fault=resetNeeded:NoSchedule",
        "cordon the node",
        "evict the pods on this node that use GPUs through the Eviction API",
        "reset GPU 0000:3a:00.0 through NVML once no process holds it",
        "label the node gpuprov.io/remediation=recovering",
    ] {
        assert!(text.contains(wanted), "wanted {wanted:?} in:\n{text}");
    }
    assert!(stage(&fake, NODE).is_none());
    assert!(fake.taints(NODE).iter().all(|t| !t.contains("gpu-fault")));
    assert!(remediation_leases(&fake).is_empty());
    assert!(
        !host
            .path()
            .join("var/lib/gpuprov/remediation.json")
            .exists()
    );

    let text = plan(false);
    assert!(
        text.contains("remediation acts through the API server, and there is none; GPU faults: resetNeeded on GPU 0000:3a:00.0: XID 48"),
        "{text}"
    );
}

/// `/metrics` after a reset: the faults seen, the actions taken, the stage.
#[test]
fn metrics_count_faults_and_actions() {
    let fake = cluster(&[NODE]);
    let port = support::daemon::free_port();
    let agent = Agent::start_on(&fake, NODE, "", 4, Some(port));
    agent.xid(2, 48);
    agent.until("recovering", 30, || {
        stage(&fake, NODE).as_deref() == Some("recovering")
    });
    agent.until("recovered", 30, || {
        stage(&fake, NODE).as_deref() == Some("recovered")
    });
    agent.until("metrics", 30, || {
        support::daemon::get(port, "/metrics").is_some_and(|(_, body)| {
            body.contains("gpuprov_remediation_stage{stage=\"recovered\"} 1")
        })
    });
    let (_, body) = support::daemon::get(port, "/metrics").unwrap();
    for wanted in [
        "gpuprov_remediation_faults_seen{class=\"resetNeeded\"} 1",
        "gpuprov_remediation_actions_taken{action=\"draining\"} 1",
        "gpuprov_remediation_actions_taken{action=\"resetting\"} 1",
        "gpuprov_remediation_slot_held 0",
        "gpuprov_remediation_storms_seen 0",
    ] {
        assert!(body.contains(wanted), "wanted {wanted:?} in:\n{body}");
    }
}

/// A process that holds the faulty GPU (one the drain does not reach: not
/// a pod) keeps it from being reset: the node is left tainted for a
/// person, the reason in its events, and its slot goes back.
#[test]
fn a_gpu_a_process_holds_is_not_reset() {
    let fake = cluster(&[NODE]);
    let agent = Agent::start(&fake, NODE, "");
    // NVML reads its fixture again at its next initialisation.
    let fixture = agent.host.path().join("telemetry.yaml");
    let text = std::fs::read_to_string(&fixture).unwrap();
    std::fs::write(
        &fixture,
        text.replacen(
            "    pciBusId: \"00000000:3A:00.0\"\n",
            "    pciBusId: \"00000000:3A:00.0\"\n    processes: [4242]\n",
            1,
        ),
    )
    .unwrap();
    agent.xid(2, 48);
    agent.until("needs attention", 30, || {
        stage(&fake, NODE).as_deref() == Some("needs-attention")
    });
    assert_eq!(agent.resets(), "");
    assert!(remediation_leases(&fake).is_empty());
    assert_eq!(
        fault_taints(&fake, NODE),
        ["gpuprov.io/gpu-fault:NoSchedule"]
    );
    let notes: Vec<String> = fake
        .events()
        .iter()
        .map(|e| e["note"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("processes hold it (pid 4242): a reset would kill their work")),
        "{notes:#?}"
    );
}

/// A GPU that falls off the bus (NVML answers `GPU_IS_LOST` for it, the
/// driver reports XID 79): tainted by the default policies, with no slot;
/// once it is back, health must hold `recoverAfterSeconds` before the
/// taint goes.
#[test]
fn a_lost_gpu_is_tainted_until_it_is_back_and_health_holds() {
    let fake = cluster(&[NODE]);
    let agent = Agent::start(&fake, NODE, "");
    let fixture = agent.host.path().join("telemetry.yaml");
    let healthy = std::fs::read_to_string(&fixture).unwrap();
    let lost = healthy.replacen(
        "    pciBusId: \"00000000:9A:00.0\"\n",
        "    pciBusId: \"00000000:9A:00.0\"\n    failures: {nvmlDeviceGetMemoryInfo_v2: 15, nvmlDeviceGetMemoryInfo: 15}\n",
        1,
    );
    assert_ne!(lost, healthy);
    std::fs::write(&fixture, lost).unwrap();
    agent.xid(4, 79);
    agent.until("tainted", 30, || {
        stage(&fake, NODE).as_deref() == Some("tainted")
    });
    assert_eq!(
        fault_taints(&fake, NODE),
        ["gpuprov.io/gpu-fault:NoSchedule"]
    );
    assert!(remediation_leases(&fake).is_empty());
    assert!(!fake.unschedulable(NODE));
    let notes = event_notes(&fake, "GpuFault");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("gpuLost on GPU index 4: NVML reports it lost")),
        "{notes:#?}"
    );
    // Still lost past the XID's window: still tainted.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(stage(&fake, NODE).as_deref(), Some("tainted"));

    std::fs::write(&fixture, healthy).unwrap();
    agent.until("recovered", 30, || {
        stage(&fake, NODE).as_deref() == Some("recovered")
    });
    let (walks, _) = walks(&fake);
    assert_eq!(walks[NODE], ["tainted", "recovering", "recovered"]);
    assert!(fault_taints(&fake, NODE).is_empty());
    assert_eq!(agent.resets(), "");
    never_failed(&fake, &agent);
}

/// A PodDisruptionBudget that never allows the GPU pod's eviction: the
/// drain fails at its timeout, the node is left for a person with the
/// reason in an event, and its slot goes back; no GPU is reset.
#[test]
fn a_drain_a_pdb_blocks_leaves_the_node_for_a_person() {
    let fake = cluster(&[NODE]);
    let agent = Agent::start(&fake, NODE, "  drain:\n    timeoutSeconds: 3\n");
    fake.add_gpu_pod("ml", "trainer", NODE, &[("app", "trainer")], 8);
    fake.protect_pods("ml", "trainer");
    agent.xid(2, 48);
    agent.until("needs attention", 60, || {
        stage(&fake, NODE).as_deref() == Some("needs-attention")
    });
    assert_eq!(agent.resets(), "");
    assert!(remediation_leases(&fake).is_empty());
    assert_eq!(
        fault_taints(&fake, NODE),
        ["gpuprov.io/gpu-fault:NoSchedule"]
    );
    let notes = event_notes(&fake, "GpuRemediationFailed");
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("drain failed: drain: not done within 3s: ml/trainer")),
        "{notes:#?}"
    );
}

/// Remediation turned off (the spec rewritten under `gpuprov run`) while
/// a node is tainted: the remediation ends, taint and label gone.
#[test]
fn turning_remediation_off_ends_one_under_way() {
    let fake = cluster(&[NODE]);
    let agent = Agent::start_with(
        &fake,
        NODE,
        "  policy:\n    resetNeeded: taint\n",
        120,
        |_| {},
    );
    agent.xid(2, 48);
    agent.until("tainted", 30, || {
        stage(&fake, NODE).as_deref() == Some("tainted")
    });
    write_spec(
        agent.host.path(),
        "node.yaml",
        "health:\n  recoverAfterSeconds: 120\nremediation:\n  enabled: false\n",
    );
    agent.until("withdrawn", 30, || {
        stage(&fake, NODE).is_none() && fault_taints(&fake, NODE).is_empty()
    });
    assert_eq!(
        fake.labels(NODE)
            .get("gpuprov.io/gpu-remediation")
            .map(String::as_str),
        Some("disabled")
    );
}

/// A node mid driver upgrade belongs to the upgrade: a fault there is
/// only tainted, no remediation slot is taken, nothing is reset.
#[test]
fn a_node_mid_driver_upgrade_is_only_tainted() {
    let fake = cluster(&[NODE]);
    // Labelled before gpuprov starts, so that its first converge sees it.
    fake.set_label(
        NODE,
        "nvidia.com/gpu-driver-upgrade-state",
        "drain-required",
        "gpuprov-driver-upgrade",
    );
    let agent = Agent::start_with(&fake, NODE, "", 120, |_| {});
    agent.xid(2, 48);
    agent.until("tainted", 30, || {
        stage(&fake, NODE).as_deref() == Some("tainted")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(stage(&fake, NODE).as_deref(), Some("tainted"));
    assert_eq!(agent.resets(), "");
    assert!(remediation_leases(&fake).is_empty());
    assert!(
        agent
            .log()
            .contains("waits for the driver upgrade under way")
    );
    never_failed(&fake, &agent);
}
