//! The hostile-peer corpus: what gpuprov talks to, made hostile (the API
//! server, through the binary). For every case: the documented exit code
//! and message, nothing panicked, peak memory under `RSS_LIMIT` and time
//! bounded by the command's own limits.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::fake_api::{FakeApi, Fault, Flood};

const NODE: &str = "gpu-node-1";
/// The most memory (peak RSS) any case may take.
const RSS_LIMIT_KIB: u64 = 128 << 10;

/// Waits for `child` and returns its exit code and peak RSS in KiB
/// (`wait4`'s own count, so nothing is sampled; the commands it ran and
/// waited for count too).
fn wait_peak(child: std::process::Child) -> (Option<i32>, u64) {
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

fn gpuprov(args: &[&str], fake: &FakeApi, host: &Path, log: &Path) -> Command {
    let mut command = Command::new(assert_cmd::cargo::cargo_bin("gpuprov"));
    command
        .args(args)
        .args(["--host-exec", "prefix", "--node-name", NODE])
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host)
        .env_remove("KUBECONFIG")
        .env(
            "GPUPROV_FAKE_NVML",
            support::repo().join("fixtures/nvml/a100.yaml"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    command
}

#[test]
fn a_gigabyte_node_answer_is_dropped_at_the_cap() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.inject(Fault {
        method: Some("GET"),
        path_prefix: "/api/v1/nodes/gpu-node-1",
        status: 200,
        times: 1000,
        flood: Some(Flood::Node(1 << 30)),
        ..Default::default()
    });
    let host = support::copy_host("a100-preinstalled");
    let log = host.path().join("apply.log");
    let started = Instant::now();
    let child = gpuprov(&["apply"], &fake, host.path(), &log)
        .spawn()
        .unwrap();
    let (code, peak) = wait_peak(child);
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
    let host = support::copy_host("a100-preinstalled");
    let log = host.path().join("run.log");
    let port = support::daemon::free_port().to_string();
    let child = gpuprov(
        &["run", "--listen", &format!("127.0.0.1:{port}")],
        fake,
        host.path(),
        &log,
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(seconds));
    // Its own peak: the commands it ran (a containerd stand-in it
    // restarted) are not gpuprov.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = wait_peak(child);
    (peak, std::fs::read_to_string(&log).unwrap())
}

#[test]
fn a_watch_line_that_never_ends_is_cut_at_the_cap() {
    let fake = FakeApi::with_node(NODE, &[]);
    fake.inject(Fault {
        method: Some("GET"),
        path_prefix: "/api/v1/nodes",
        query: Some("watch=true"),
        status: 200,
        times: 1000,
        flood: Some(Flood::EndlessLine),
        ..Default::default()
    });
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
    fake.inject(Fault {
        method: Some("GET"),
        path_prefix: "/api/v1/pods",
        status: 200,
        times: 100_000,
        flood: Some(Flood::EndlessPages),
        ..Default::default()
    });
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
