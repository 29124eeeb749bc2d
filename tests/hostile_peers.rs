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
