#![allow(dead_code)]
//! What every benchmark needs: timing a closure many times.

use std::time::{Duration, Instant};

/// `cargo bench` passes --bench; `cargo test --all-targets` does not, and
/// then one run of each keeps the benchmark compiled and working.
pub fn runs(full: usize) -> usize {
    if std::env::args().any(|a| a == "--bench") {
        full
    } else {
        1
    }
}

/// The median and 90th percentile of `runs` timings of `f`.
pub fn measure(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    (times[runs / 2], times[runs * 9 / 10])
}
