//! Background work of `gpuprov run` (the Node watch, the health and metrics
//! server, the DRA kubelet plugin): a future on a thread of its own, on a
//! single-threaded tokio runtime, so that it never waits on a converge nor
//! a converge on it.

use std::future::Future;

/// Runs the future `task` makes on a new thread. A runtime that cannot
/// start (no descriptors left for its epoll) is logged, not a panic.
pub fn spawn<F>(
    what: &'static str,
    task: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<()>
where
    F: Future<Output = ()>,
{
    std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => {
                runtime.block_on(task());
                // A blocking call still running (a DRA prepare waiting on
                // the API server) must not hold whoever stops the work.
                runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            }
            Err(e) => tracing::error!("{what} cannot start: {e}"),
        }
    })
}
