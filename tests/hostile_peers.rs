//! The hostile-peer corpus: what gpuprov talks to, made hostile (the API
//! server, through the binary). For every case: the documented exit code
//! and message, nothing panicked, peak memory under `RSS_LIMIT` and time
//! bounded by the command's own limits.

mod support;

use std::time::{Duration, Instant};

use support::fake_api::{FakeApi, Flood};

const NODE: &str = "gpu-node-1";
/// The most memory (peak RSS) any case may take.
const RSS_LIMIT_KIB: u64 = 128 << 10;

#[test]
fn a_gigabyte_node_answer_is_dropped_at_the_cap() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.inject(Flood::Node(1 << 30).fault());
    let host = support::copy_host("a100-preinstalled");
    let log = host.path().join("apply.log");
    let started = Instant::now();
    let child = support::daemon::against(&fake, NODE, &["apply"], host.path())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let (code, peak) = support::peak_rss(child);
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains(
            "answered GET node gpu-node-1 with too much: the API server's answer passed 16 MiB"
        ),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not retried: {:?}",
        started.elapsed()
    );
}

/// `gpuprov run` for a few seconds against `fake`: its peak RSS and log.
fn run_for(fake: &FakeApi, seconds: u64) -> (u64, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let peak = support::daemon::run_for(fake, NODE, seconds, Some(&log));
    (peak, std::fs::read_to_string(&log).unwrap())
}

#[test]
fn a_watch_line_that_never_ends_is_cut_at_the_cap() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.inject(Flood::EndlessLine.fault());
    let (peak, said) = run_for(&fake, 8);
    assert!(
        said.contains("the API server's watch event passed 16 MiB"),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");
}

#[test]
fn a_pod_list_whose_pages_never_end_is_given_up() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.inject(Flood::EndlessPages.fault());
    let (peak, said) = run_for(&fake, 8);
    assert!(
        said.contains("the pods watch stopped: its list passed 1000 objects"),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");
}

/// A `PodSandbox` message: id, metadata (name, uid, namespace), labels.
fn sandbox(id: &str, namespace: &str, name: &str, labels: &[(&str, &str)]) -> Vec<u8> {
    use support::pod_resources::field;
    let mut metadata = Vec::new();
    field(1, name.as_bytes(), &mut metadata);
    field(2, id.as_bytes(), &mut metadata);
    field(3, namespace.as_bytes(), &mut metadata);
    let mut message = Vec::new();
    field(1, id.as_bytes(), &mut message);
    field(2, &metadata, &mut message);
    for (key, value) in labels {
        let mut entry = Vec::new();
        field(1, key.as_bytes(), &mut entry);
        field(2, value.as_bytes(), &mut entry);
        field(5, &entry, &mut message);
    }
    message
}

#[test]
fn a_cri_that_ignores_the_label_filter_gets_no_foreign_sandbox_stopped() {
    // The runtime answers every ListPodSandbox with the control plane's
    // sandboxes, whatever the filter: one with no label of gpuprov's, one
    // carrying gpuprov's label under another name. gpuprov stops and
    // removes neither.
    use support::pod_resources::field;
    let host = support::copy_host("a100-preinstalled");
    let spec = support::write_spec(
        host.path(),
        "cri.yaml",
        "validator:\n  mode: cri\n  timeoutSeconds: 20\n",
    );
    // containerd's config first, without a runtime on the socket.
    let _ = support::run_on("apply", host.path(), &spec);
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = calls.clone();
    let _cri = support::grpc::serve(
        &host.path().join("run/containerd/containerd.sock"),
        move |path, _| {
            seen.lock().unwrap().push(path.to_string());
            match path.rsplit('/').next().unwrap_or_default() {
                "Version" => {
                    let mut version = Vec::new();
                    field(1, b"0.1.0", &mut version);
                    field(2, b"containerd", &mut version);
                    field(3, b"v2.2.0", &mut version);
                    field(4, b"v1", &mut version);
                    Ok(version)
                }
                "ListPodSandbox" => {
                    let mut list = Vec::new();
                    let apiserver = sandbox(
                        "a1",
                        "kube-system",
                        "kube-apiserver-node",
                        &[("component", "kube-apiserver")],
                    );
                    let coredns = sandbox(
                        "c1",
                        "kube-system",
                        "coredns-5d78c9869d-x2x7q",
                        &[("gpuprov.io/validation", "cri"), ("k8s-app", "kube-dns")],
                    );
                    field(1, &apiserver, &mut list);
                    field(1, &coredns, &mut list);
                    Ok(list)
                }
                _ => Err(12),
            }
        },
    );
    let output = support::run_on("apply", host.path(), &spec);
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{said}");
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().any(|c| c.ends_with("/ListPodSandbox")),
        "{calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.ends_with("/StopPodSandbox") || c.ends_with("/RemovePodSandbox")),
        "a sandbox that is not gpuprov's was touched: {calls:?}"
    );
    assert!(said.contains("not gpuprov's: left alone"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn control_characters_from_the_api_server_are_escaped_in_the_report() {
    // A label value that would erase the line above on a terminal and
    // print a fake success in its place.
    let forged = "\u{1b}[1A\u{1b}[2K\r  ✓ driver ready\nall-1g.10gb";
    let fake = FakeApi::with_node(NODE, &[("nvidia.com/mig.config", forged)]);
    let host = support::copy_host("a100-preinstalled");
    let mut plan = support::gpuprov();
    plan.args(["plan", "--host-exec", "prefix", "--host-root"])
        .arg(host.path());
    support::against(&mut plan, Some(&fake), NODE);
    let output = plan.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("\\u{1b}[1A\\u{1b}[2K\\r  ✓ driver ready\\nall-1g.10gb"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text}");
}

/// The telemetry host, its fake NVML fixture and a spec with the built-in
/// exporter, for `gpuprov run`.
fn exporter_host() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let host = support::copy_host("h100x8-nvswitch-preinstalled");
    let fixture = support::telemetry_fixture(host.path());
    let spec = support::write_spec(host.path(), "node.yaml", "dcgmExporter:\n  mode: builtin\n");
    (host, fixture, spec)
}

#[test]
fn scrapes_waiting_on_a_silent_kubelet_never_hold_a_converge() {
    use support::daemon::{Daemon, eventually, free_port, get};
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    let (host, fixture, spec) = exporter_host();
    // The kubelet's pod-resources socket accepts and never answers.
    support::daemon::silent_kubelet(host.path());
    let port = free_port();
    let mut daemon = Daemon::spawn_nvml(&fake, NODE, host.path(), port, &spec, &fixture, &[]);
    eventually("the first converge", Duration::from_secs(60), || {
        fake.labels(NODE).contains_key("gpuprov.io/validator")
    });
    // Twenty scrapes at a time, for as long as the test runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..20)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = get(port, "/metrics");
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // A config change converges at once: the validator is turned off.
    let changed = Instant::now();
    std::fs::write(
        &spec,
        "dcgmExporter:\n  mode: builtin\nvalidator:\n  enabled: false\n",
    )
    .unwrap();
    eventually(
        "the converge after the config change",
        Duration::from_secs(20),
        || {
            fake.labels(NODE)
                .get("gpuprov.io/validator")
                .map(String::as_str)
                == Some("disabled")
        },
    );
    let took = changed.elapsed();
    let status = support::sigterm_and_wait(&mut daemon.0, Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for scraper in scrapers {
        scraper.join().unwrap();
    }
    assert!(
        took < Duration::from_secs(8),
        "the converge waited {took:?} on scrapes"
    );
    assert!(
        status.is_some(),
        "SIGTERM took more than 5 s while scrapes waited"
    );
}

#[test]
fn huge_names_from_the_kubelet_and_readers_that_never_read_stay_bounded() {
    use support::daemon::{Daemon, eventually, free_port, get};
    use support::pod_resources::{Container, Pod, PodResources};
    let fake = FakeApi::with_node(NODE, &[]);
    fake.run_working_cluster(8, "NVIDIA-H100-80GB-HBM3");
    let (host, fixture, spec) = exporter_host();
    let uuid = std::fs::read_to_string(&fixture)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("uuid: ").map(str::to_string))
        .unwrap();
    let huge: &'static str = Box::leak("p".repeat(1 << 20).into_boxed_str());
    let _kubelet = PodResources::serve(
        &host
            .path()
            .join("var/lib/kubelet/pod-resources/kubelet.sock"),
        vec![Pod {
            namespace: huge,
            name: huge,
            containers: vec![Container {
                name: huge,
                devices: vec![("nvidia.com/gpu", vec![uuid])],
            }],
        }],
    );
    let port = free_port();
    let daemon = Daemon::spawn_nvml(&fake, NODE, host.path(), port, &spec, &fixture, &[]);
    eventually("GPU series", Duration::from_secs(60), || {
        get(port, "/metrics").is_some_and(|(_, body)| body.contains("DCGM_FI_DEV_GPU_UTIL{"))
    });
    let (_, body) = get(port, "/metrics").unwrap();
    assert!(body.len() < 256 << 10, "a scrape of {} bytes", body.len());
    assert!(
        body.contains(&format!("pod=\"{}\"", "p".repeat(253))),
        "names cut at 253"
    );

    // 150 clients ask and never read their answers.
    let idle: Vec<_> = (0..150)
        .filter_map(|_| {
            use std::io::Write;
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .ok()?;
            Some(stream)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    let peak = support::own_peak_rss(daemon.0.id());
    drop(idle);
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");
    eventually("the probes answer again", Duration::from_secs(40), || {
        get(port, "/healthz").is_some_and(|(code, _)| code == 200)
    });
}
