//! What `gpuprov run` knows of the API server without asking: its own Node
//! and the pods on it that gpuprov reads, kept current by two watches
//! (kube-runtime's `watcher`: a field-selected list, then a watch resumed
//! from the last resourceVersion, with bookmarks, a relist after 410 Gone,
//! and backoff). A drift converge reads them from here, so a converged
//! node asks the API server nothing: its only requests are the watches'
//! re-establishments, one per watch per `--watch-timeout`.
//!
//! Without the watches (`gpuprov apply`, `plan`), or until a watch has
//! listed, every read goes to the API server as before.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};

// How long the API server keeps a watch open before the client opens it
// again (its `timeoutSeconds`) is `gpuprov run --watch-timeout` (an hour).
// The API server sends a bookmark at least every minute, which keeps the
// connection within the client's read timeout.

/// The pods a converge reads on every pass: the DCGM exporter's, to see
/// that it runs. Other reads of pods (the validation pod, the pods a MIG
/// change must stop) are rare and go to the API server.
pub const WATCHED_PODS: &str = "app=nvidia-dcgm-exporter";

/// The Node and the watched pods, as the watches last saw them.
#[derive(Default)]
pub struct View {
    node: Mutex<Option<Node>>,
    /// `None` until the pods' watch has listed.
    pods: Mutex<Option<BTreeMap<(String, String), Pod>>>,
    /// Whether watches feed this view at all.
    active: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A resourceVersion as a number, where it is one (etcd's are); they are
/// opaque to clients otherwise, and then the later one seen wins.
fn version(node: &Node) -> Option<u64> {
    node.metadata.resource_version.as_deref()?.parse().ok()
}

impl View {
    /// Whether watches feed this view (`gpuprov run`).
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The Node, when a watch has seen it.
    pub fn node(&self) -> Option<Node> {
        lock(&self.node).clone()
    }

    /// Takes the Node as a write answered it, unless the watch has already
    /// seen a later one: the next converge then starts from what gpuprov
    /// just wrote, not from the event still on its way.
    pub fn offer_node(&self, node: Node) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut current = lock(&self.node);
        let newer = match (current.as_ref().and_then(version), version(&node)) {
            (Some(seen), Some(offered)) => offered > seen,
            _ => true,
        };
        if newer {
            *current = Some(node);
        }
    }

    /// Forgets the Node (the API server said it changed meanwhile: a 409):
    /// the next read asks the API server, until the watch's next event.
    pub fn forget_node(&self) {
        *lock(&self.node) = None;
    }

    /// The pods on the node that carry `WATCHED_PODS`, when the watch has
    /// listed them.
    pub fn pods(&self) -> Option<Vec<Pod>> {
        lock(&self.pods)
            .as_ref()
            .map(|pods| pods.values().cloned().collect())
    }

    /// Watches the Node and its watched pods on a thread until `stop`;
    /// `changed` gets the Node each time the watch sees it change.
    pub fn watch(
        self: &Arc<Self>,
        config: ::kube::Config,
        node: String,
        timeout: Duration,
        stop: Arc<AtomicBool>,
        mut changed: impl FnMut(&Node) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        self.active.store(true, Ordering::Relaxed);
        let view = self.clone();
        crate::background::spawn("the Node and pods watches", move || async move {
            let changed = &mut changed;
            let client = match super::capped::client(config) {
                Ok(client) => client,
                Err(e) => {
                    let why = crate::error_chain::error_chain(&e);
                    tracing::error!(%node, "no Node watch: {why}");
                    view.active.store(false, Ordering::Relaxed);
                    return;
                }
            };
            // Whole seconds, at least one, as the API server takes them.
            let timeout = timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
            tokio::join!(
                view.watch_node(client.clone(), &node, timeout, &stop, changed),
                view.watch_pods(client, &node, timeout, &stop),
            );
        })
    }

    async fn watch_node(
        &self,
        client: ::kube::Client,
        node: &str,
        timeout: u32,
        stop: &AtomicBool,
        mut changed: impl FnMut(&Node),
    ) {
        use ::kube::runtime::watcher::Event;
        let api: ::kube::Api<Node> = ::kube::Api::all(client);
        let config = watch_config(timeout).fields(&format!("metadata.name={node}"));
        follow(
            api,
            config,
            stop,
            "the Node watch",
            node,
            |event| match event {
                Event::Apply(object) | Event::InitApply(object) => {
                    *lock(&self.node) = Some(object.clone());
                    changed(&object);
                }
                Event::Delete(_) => self.forget_node(),
                Event::Init | Event::InitDone => {}
            },
        )
        .await;
        // Without its watch the Node is read from the API server again.
        self.forget_node();
    }

    async fn watch_pods(
        &self,
        client: ::kube::Client,
        node: &str,
        timeout: u32,
        stop: &AtomicBool,
    ) {
        use ::kube::runtime::watcher::Event;
        let api: ::kube::Api<Pod> = ::kube::Api::all(client);
        let config = watch_config(timeout)
            .fields(&format!("spec.nodeName={node}"))
            .labels(WATCHED_PODS);
        let key = |pod: &Pod| {
            (
                pod.metadata.namespace.clone().unwrap_or_default(),
                pod.metadata.name.clone().unwrap_or_default(),
            )
        };
        // A relist builds the set anew; the old one serves until it is done.
        let mut listing: BTreeMap<(String, String), Pod> = BTreeMap::new();
        follow(
            api,
            config,
            stop,
            "the pods watch",
            node,
            |event| match event {
                Event::Init => listing.clear(),
                Event::InitApply(pod) => {
                    listing.insert(key(&pod), pod);
                }
                Event::InitDone => *lock(&self.pods) = Some(std::mem::take(&mut listing)),
                Event::Apply(pod) => {
                    if let Some(pods) = lock(&self.pods).as_mut() {
                        pods.insert(key(&pod), pod);
                    }
                }
                Event::Delete(pod) => {
                    if let Some(pods) = lock(&self.pods).as_mut() {
                        pods.remove(&key(&pod));
                    }
                }
            },
        )
        .await;
        *lock(&self.pods) = None;
    }
}

/// The most objects one list of a watch may hold: it lists one Node, or
/// the operands' pods on one node (a handful; a node runs at most a few
/// hundred pods of any kind).
pub const LIST_CAP: usize = 1_000;

/// kube-runtime's watcher, with the watch open for `timeout` seconds and
/// bookmarks on (its default).
fn watch_config(timeout: u32) -> ::kube::runtime::watcher::Config {
    ::kube::runtime::watcher::Config::default().timeout(timeout)
}

/// Runs a watcher until `stop` (checked every 250 ms) or its end, handing
/// each event to `handle`; errors are logged and the watcher backs off.
async fn follow<K>(
    api: ::kube::Api<K>,
    config: ::kube::runtime::watcher::Config,
    stop: &AtomicBool,
    what: &str,
    node: &str,
    mut handle: impl FnMut(::kube::runtime::watcher::Event<K>),
) where
    K: ::kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    use ::kube::runtime::{WatchStreamExt, watcher};
    use futures::StreamExt;
    // An expired resourceVersion (410, after the API server restarted or
    // compacted) makes the watcher list again at once, as client-go does:
    // it is not an error to back off from, or the backoff that a restart
    // built up would hold the relist (and every label change) back.
    let events = watcher(api, config)
        .filter(|event| {
            let expired =
                matches!(event, Err(watcher::Error::WatchError(status)) if status.code == 410);
            if expired {
                tracing::info!(%node, "{what}: its resourceVersion expired; listing again");
            }
            std::future::ready(!expired)
        })
        .default_backoff();
    let mut events = std::pin::pin!(events);
    // Objects in the list being read: a server whose pages never end
    // would otherwise grow the listing without bound.
    let mut listed = 0;
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(250), events.next()).await {
            Err(_) => {}
            Ok(None) => {
                tracing::error!(%node, "{what} ended; the API server is read at each converge");
                return;
            }
            Ok(Some(Err(e))) => {
                let why = super::capped::too_large(&e)
                    .unwrap_or_else(|| crate::error_chain::error_chain(&e));
                tracing::warn!(%node, "{what}: {why}");
            }
            Ok(Some(Ok(event))) => {
                match &event {
                    ::kube::runtime::watcher::Event::Init => listed = 0,
                    ::kube::runtime::watcher::Event::InitApply(_) => listed += 1,
                    _ => {}
                }
                if listed > LIST_CAP {
                    tracing::error!(
                        %node,
                        "{what} stopped: its list passed {LIST_CAP} objects (pages that never end?); the API server is read at each converge"
                    );
                    return;
                }
                handle(event);
            }
        }
    }
}
