//! A quiet API footprint (issue 17): under `gpuprov run`, a converged node
//! reads its Node and the operand pods on it from watches, so its drift
//! converges send the API server nothing; the watches are opened again,
//! from where they left off, once per `--watch-timeout`.

mod support;

use std::time::Duration;

use support::copy_host;
use support::daemon::{Daemon, eventually, free_port, get};
use support::fake_api::{FakeApi, Logged};

const NODE: &str = "gpu-node-1";

/// How many converges `gpuprov run` has made, from its metrics.
fn converges(port: u16) -> u64 {
    let (_, metrics) = get(port, "/metrics").unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("gpuprov_converges_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn shown(log: &[Logged]) -> Vec<String> {
    log.iter()
        .map(|l| format!("{} {}", l.method, l.uri))
        .collect()
}

fn converged(fake: &FakeApi, more: &[&std::ffi::OsStr]) -> (tempfile::TempDir, u16, Daemon) {
    fake.run_working_cluster(1, "NVIDIA-A100-SXM4-40GB");
    let host = copy_host("a100-preinstalled");
    let port = free_port();
    let daemon = Daemon::spawn_with(fake, NODE, host.path(), "1s", port, more);
    eventually("/readyz to say converged", Duration::from_secs(30), || {
        get(port, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    (host, port, daemon)
}

/// A drift converge every second for five seconds: not one request. The
/// DCGM exporter's pod stops being Ready: the next converge sees it from
/// the pods' watch (the state turns `pending`), still without a request.
#[test]
fn a_converged_node_asks_the_api_server_nothing() {
    let fake = FakeApi::with_node(NODE, &[]);
    let (_host, port, _daemon) = converged(&fake, &[]);
    // The converge that ended the startup may still be writing its report.
    std::thread::sleep(Duration::from_secs(2));
    fake.clear_log();
    let before = converges(port);
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        converges(port) >= before + 3,
        "drift converges ran: {before} → {}",
        converges(port)
    );
    assert_eq!(shown(&fake.log_of(NODE)), Vec::<String>::new());

    let exporter = fake
        .pods()
        .into_iter()
        .find(|p| p["metadata"]["labels"]["app"] == "nvidia-dcgm-exporter")
        .expect("the exporter's pod");
    let name = exporter["metadata"]["name"].as_str().unwrap().to_string();
    let namespace = exporter["metadata"]["namespace"]
        .as_str()
        .unwrap()
        .to_string();
    fake.set_pod_ready(&namespace, &name, false);
    eventually(
        "dcgm-exporter pending from the pods' watch",
        Duration::from_secs(15),
        || {
            get(port, "/metrics").is_some_and(|(_, m)| {
                m.contains("gpuprov_state_outcome{state=\"dcgm-exporter\",outcome=\"pending\"} 1")
            })
        },
    );
    let reads: Vec<String> = shown(&fake.log_of(NODE))
        .into_iter()
        .filter(|r| r.starts_with("GET"))
        .collect();
    assert_eq!(reads, Vec::<String>::new(), "the pod was not read");
}

/// With `--watch-timeout 2s` the API server ends each watch every two
/// seconds: gpuprov opens it again from the last resourceVersion it saw
/// (a bookmark's or an event's), never listing again; those are all its
/// requests.
#[test]
fn watches_are_reopened_from_where_they_left_off() {
    let fake = FakeApi::with_node(NODE, &[]);
    let (_host, _port, _daemon) = converged(&fake, &["--watch-timeout".as_ref(), "2s".as_ref()]);
    std::thread::sleep(Duration::from_secs(2));
    fake.clear_log();
    std::thread::sleep(Duration::from_secs(7));
    let log = fake.log_of(NODE);
    let requests = shown(&log);
    let watches = |path: &str| {
        log.iter()
            .filter(|l| l.method == "GET" && l.uri.starts_with(path))
            .filter(|l| l.uri.contains("watch=true") && l.uri.contains("timeoutSeconds=2"))
            .filter(|l| !l.uri.contains("resourceVersion=0&") && l.uri.contains("resourceVersion="))
            .count()
    };
    assert!(watches("/api/v1/nodes?") >= 2, "{requests:#?}");
    assert!(watches("/api/v1/pods?") >= 2, "{requests:#?}");
    assert!(
        log.iter().all(|l| l.uri.contains("watch=true")),
        "nothing but watches: {requests:#?}"
    );
}
