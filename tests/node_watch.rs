//! The Node watch of `gpuprov run` (`Cluster::watch_labels`, on
//! kube-runtime's watcher) against a loopback API server through the real
//! kube client: it resumes from the last resourceVersion it saw (a
//! bookmark's included) instead of listing again, lists again after a
//! 410 Gone, and backs off while the server fails.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use gpuprov::kube::{Cluster, ClusterOptions};
use support::daemon::eventually;
use support::fake_api::{FakeApi, Fault, Logged};

const NODE: &str = "gpu-node-1";

/// The watch on NODE, its label sets arriving on the receiver; stopped
/// when the guard drops.
struct Watch {
    labels: mpsc::Receiver<BTreeMap<String, String>>,
    stop: Arc<AtomicBool>,
    // The client's connection pool runs on the cluster's runtime.
    _cluster: Cluster,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn watch(fake: &FakeApi) -> Watch {
    let cluster = Cluster::connect(&ClusterOptions {
        kubeconfig: Some(fake.kubeconfig()),
        node_name: Some(NODE.to_string()),
    })
    .unwrap();
    let (send, labels) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    cluster.watch(Duration::from_secs(3600), stop.clone(), move |labels| {
        let _ = send.send(labels);
    });
    Watch {
        labels,
        stop,
        _cluster: cluster,
    }
}

impl Watch {
    /// The next label set that has `key=value`, within 10 s.
    fn until_labelled(&self, key: &str, value: &str) -> BTreeMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let labels = self
                .labels
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no label set with {key}={value} within 10 s"));
            if labels.get(key).map(String::as_str) == Some(value) {
                return labels;
            }
        }
    }
}

fn is_watch(request: &Logged) -> bool {
    request.uri.starts_with("/api/v1/nodes?") && request.uri.contains("watch=true")
}

fn is_list(request: &Logged) -> bool {
    request.method == "GET" && request.uri.starts_with("/api/v1/nodes?") && !is_watch(request)
}

fn resource_version(request: &Logged) -> Option<u64> {
    request
        .uri
        .split(['?', '&'])
        .find_map(|pair| pair.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_dropped_watch_resumes_from_the_last_bookmark_without_listing_again() {
    let fake = FakeApi::with_node(NODE, &[("zone", "a")]);
    let watch = watch(&fake);
    watch.until_labelled("zone", "a");
    eventually("the first watch", Duration::from_secs(10), || {
        fake.log().iter().any(is_watch)
    });
    let log = fake.log();
    assert_eq!(log.iter().filter(|r| is_list(r)).count(), 1, "{log:#?}");
    let first = log.iter().find(|r| is_watch(r)).expect("a watch");
    assert!(
        first.uri.contains("allowWatchBookmarks=true"),
        "{}",
        first.uri
    );
    assert!(
        first
            .uri
            .contains("fieldSelector=metadata.name%3Dgpu-node-1"),
        "{}",
        first.uri
    );

    // The store moves on without the node changing: only a bookmark says so.
    fake.bump_version();
    let moved_to = fake.bump_version();
    std::thread::sleep(Duration::from_millis(1500));
    fake.clear_log();
    fake.drop_watches();
    eventually("the watch to start again", Duration::from_secs(10), || {
        fake.log().iter().any(is_watch)
    });
    let log = fake.log();
    let resumed = log.iter().find(|r| is_watch(r)).unwrap();
    assert_eq!(
        resource_version(resumed),
        Some(moved_to),
        "resumed from the bookmark: {}",
        resumed.uri
    );
    assert!(!log.iter().any(is_list), "no list again: {log:#?}");

    fake.set_label(NODE, "zone", "b", "kubectl");
    watch.until_labelled("zone", "b");
}

#[test]
fn a_410_gone_lists_again_and_the_watch_goes_on() {
    let fake = FakeApi::with_node(NODE, &[("zone", "a")]);
    let watch = watch(&fake);
    watch.until_labelled("zone", "a");
    fake.clear_log();
    fake.compact_and_drop_watches();
    let compacted = fake.version();
    eventually("a list after the 410", Duration::from_secs(15), || {
        fake.log().iter().any(is_list)
    });
    eventually("a watch after the list", Duration::from_secs(15), || {
        let log = fake.log();
        let listed = log.iter().position(is_list).unwrap();
        log[listed..].iter().any(is_watch)
    });
    let log = fake.log();
    let gone = log.iter().find(|r| is_watch(r)).unwrap();
    assert!(
        resource_version(gone).unwrap() < compacted,
        "the first watch resumed from before the compaction: {}",
        gone.uri
    );
    let listed = log.iter().position(is_list).unwrap();
    let after = log[listed..].iter().find(|r| is_watch(r)).unwrap();
    assert!(
        resource_version(after).unwrap() >= compacted,
        "{}",
        after.uri
    );

    fake.set_label(NODE, "zone", "c", "kubectl");
    watch.until_labelled("zone", "c");
}

#[test]
fn a_failing_server_is_retried_with_backoff_not_in_a_loop() {
    let fake = FakeApi::with_node(NODE, &[("zone", "a")]);
    fake.inject(Fault {
        method: None,
        path_prefix: "/api/v1/nodes",
        status: 500,
        retry_after: None,
        times: 1000,
        delay_ms: 0,
        body: None,
        ..Default::default()
    });
    let watch = watch(&fake);
    std::thread::sleep(Duration::from_secs(4));
    let tries = fake.log().iter().filter(|r| is_list(r)).count();
    assert!(
        (2..=8).contains(&tries),
        "4 s of a failing server: {tries} lists (backoff from 0.8 s, doubling)"
    );
    drop(watch);
}

#[test]
fn an_expired_resource_version_after_a_restart_lists_again_at_once() {
    // The API server restarts: its watches fail for a while (the backoff
    // grows to seconds), then it is back, its history gone. The first
    // watch it gets answers 410; the list follows at once, not after the
    // backoff the outage built up, and a label change is seen.
    let fake = FakeApi::with_node(NODE, &[("zone", "a")]);
    let watch = watch(&fake);
    watch.until_labelled("zone", "a");
    eventually("the first watch", Duration::from_secs(10), || {
        fake.log().iter().any(is_watch)
    });
    fake.inject(Fault {
        method: None,
        path_prefix: "/api/v1/nodes",
        query: Some("watch=true"),
        status: 500,
        times: 3,
        ..Default::default()
    });
    fake.clear_log();
    fake.compact_and_drop_watches();
    eventually(
        "the outage's three refused watches",
        Duration::from_secs(20),
        || fake.log().iter().filter(|r| is_watch(r)).count() >= 4,
    );
    let gone_at = Instant::now();
    eventually("a list after the 410", Duration::from_secs(20), || {
        fake.log().iter().any(is_list)
    });
    let waited = gone_at.elapsed();
    assert!(
        waited < Duration::from_millis(1500),
        "listed {waited:?} after the 410 (the outage's backoff was 6 s or more)"
    );
    fake.set_label(NODE, "zone", "d", "kubectl");
    watch.until_labelled("zone", "d");
}
