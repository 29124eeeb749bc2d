//! The CDI spec: what it costs to make, how big it is, and what a converged
//! node pays for keeping it current.
//!
//! * generating both specs for the 8-GPU fixture with the 550 driver's
//!   files (`h100x8-cdi`), in process: finding the driver's files in the
//!   host root, building the documents, writing them out as YAML;
//! * their sizes;
//! * a no-op `apply` on the converged node with `cdi.enabled` and without,
//!   NVML read through the fake library, against the process floor
//!   (`gpuprov --version`), run in turn (target: within 3× the floor);
//! * the same converge in process, as `gpuprov run` repeats it every few
//!   minutes: no process start, NVML's library already loaded;
//! * what NVML alone costs a fresh process (loading the library,
//!   `nvmlInit`, gpuprov's inventory): the fake library the converge
//!   above loads, and Debian's real `libnvidia-ml.so.1` where it is
//!   installed (no driver here: its `nvmlInit` fails as on a node whose
//!   driver is not loaded), for the share of the converge that is NVML's.
//!
//! Run with `cargo bench --bench cdi` (`cargo test` runs one of each).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{gpuprov, succeeds};
use gpuprov::cdi::{document, driver_files};
use gpuprov::converge::Inputs;
use gpuprov::host::{CommandMode, Host};

fn apply(host: &Path, spec: &Path) -> Command {
    let mut cmd = gpuprov(&["apply", "--host-exec", "prefix", "--nvml-lib"]);
    cmd.arg(support::fake_nvml_library())
        .env(
            "GPUPROV_FAKE_NVML",
            support::repo().join("fixtures/nvml/h100x8.yaml"),
        )
        .arg("--host-root")
        .arg(host)
        .arg("--config")
        .arg(spec);
    cmd
}

fn median(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let n = samples.len();
    (samples[n / 2], samples[n * 9 / 10])
}

fn report(name: &str, runs: usize, (median, p90): (Duration, Duration)) {
    println!("{name:<58} {runs:>5} runs  median {median:>10.2?}  p90 {p90:>10.2?}");
}

/// Set in a child of this bench: load NVML from the library it names,
/// print how long that took in microseconds, and exit.
const NVML_ONCE: &str = "GPUPROV_BENCH_NVML_ONCE";

/// NVML loaded in a fresh process (a library is loaded once per process,
/// so only a new process pays what a converge pays): the microseconds
/// from `dlopen` to gpuprov's inventory, or to `nvmlInit`'s error.
fn nvml_in_a_fresh_process(library: &Path, runs: usize) -> (Duration, Duration) {
    let samples = (0..runs)
        .map(|_| {
            let output = Command::new(std::env::current_exe().unwrap())
                .env(NVML_ONCE, library)
                .env(
                    "GPUPROV_FAKE_NVML",
                    support::repo().join("fixtures/nvml/h100x8.yaml"),
                )
                .output()
                .unwrap();
            let micros: u64 = String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("the child said {output:?}"));
            Duration::from_micros(micros)
        })
        .collect();
    median(samples)
}

fn main() {
    if let Some(library) = std::env::var_os(NVML_ONCE) {
        let started = Instant::now();
        // The answer does not matter: without a driver, the real library's
        // nvmlInit fails after loading, as a converge would see it.
        let _ = gpuprov::gpu::nvml::inventory(Path::new(&library));
        println!("{}", started.elapsed().as_micros());
        return;
    }
    let runs = common::runs;
    let host_dir = support::copy_host("h100x8-cdi");

    // In process: the generation itself, for 8 GPUs and driver 550.54.15.
    let host = Host::new(
        host_dir.path(),
        CommandMode::Prefix,
        Duration::from_secs(10),
    )
    .unwrap();
    let gpus: Vec<document::Gpu> = (0..8)
        .map(|i| document::Gpu {
            index: i,
            uuid: format!("GPU-5f1c4e2a-0d3b-4c7e-9a10-00000000000{i}"),
            minor: i,
            mig: Vec::new(),
        })
        .collect();
    let mut sizes = (0, 0);
    let n = runs(2000);
    let generate = common::measure(n, || {
        let files = driver_files::find(&host, "550.54.15").unwrap().unwrap();
        let gpu =
            document::render(&document::gpu_spec(&gpus, &files, "/usr/bin/nvidia-ctk")).unwrap();
        let management = document::render(&document::management_spec(
            &gpus,
            &files,
            "/usr/bin/nvidia-ctk",
            &[],
        ))
        .unwrap();
        sizes = (gpu.len(), management.len());
    });
    report(
        "generate both specs, 8 GPUs, 550 driver files (in process)",
        n,
        generate,
    );
    let files = driver_files::find(&host, "550.54.15").unwrap().unwrap();
    let find = common::measure(n, || {
        driver_files::find(&host, "550.54.15").unwrap().unwrap();
    });
    report("  of which finding the driver's files", n, find);
    let render = common::measure(n, || {
        document::render(&document::gpu_spec(&gpus, &files, "/usr/bin/nvidia-ctk")).unwrap();
        document::render(&document::management_spec(
            &gpus,
            &files,
            "/usr/bin/nvidia-ctk",
            &[],
        ))
        .unwrap();
    });
    report("  of which building and rendering the documents", n, render);
    println!(
        "  spec sizes: nvidia.yaml {} bytes, management.nvidia.com-gpu.yaml {} bytes",
        sizes.0, sizes.1
    );

    // Whole processes: the converged node with CDI on and off.
    let on = support::write_spec(host_dir.path(), "cdi-on.yaml", "cdi:\n  enabled: true\n");
    let off_dir = support::copy_host("h100x8-cdi");
    let off = support::write_spec(off_dir.path(), "cdi-off.yaml", "cdi:\n  enabled: false\n");
    succeeds(&mut apply(host_dir.path(), &on));
    succeeds(&mut apply(off_dir.path(), &off));
    let n = runs(300);
    let mut times: [Vec<Duration>; 3] = Default::default();
    for _ in 0..n {
        let commands = [
            gpuprov(&["--version"]),
            apply(host_dir.path(), &on),
            apply(off_dir.path(), &off),
        ];
        for (mut command, samples) in commands.into_iter().zip(times.iter_mut()) {
            let started = Instant::now();
            succeeds(&mut command);
            samples.push(started.elapsed());
        }
    }
    let [floor, with_cdi, without] = times.map(median);
    report("process floor: gpuprov --version", n, floor);
    report("apply (no-op), converged 8-GPU host, cdi on", n, with_cdi);
    report("apply (no-op), converged 8-GPU host, cdi off", n, without);
    let ratio = |(m, _): (Duration, Duration)| m.as_secs_f64() / floor.0.as_secs_f64();
    println!(
        "  → cdi on {:.2}× the floor (target: within 3×: {}), cdi off {:.2}×; CDI adds {:.2?}",
        ratio(with_cdi),
        if ratio(with_cdi) <= 3.0 {
            "met"
        } else {
            "MISSED"
        },
        ratio(without),
        with_cdi.0.saturating_sub(without.0)
    );

    // In process, as `gpuprov run`'s drift converge: the fake library
    // finds its fixture through the environment, set before any thread.
    // SAFETY: nothing else runs yet that reads the environment.
    unsafe {
        std::env::set_var(
            "GPUPROV_FAKE_NVML",
            support::repo().join("fixtures/nvml/h100x8.yaml"),
        )
    };
    let n = runs(300);
    for (label, host, spec) in [
        ("cdi on", host_dir.path(), &on),
        ("cdi off", off_dir.path(), &off),
    ] {
        let inputs = Inputs::load(&common::node_args(
            host,
            Some(spec.to_path_buf()),
            Some(support::fake_nvml_library()),
        ))
        .unwrap();
        let timing = common::measure(n, || {
            let report = gpuprov::converge::apply(&inputs, Duration::from_secs(5)).unwrap();
            assert!(report.steps.iter().all(|s| s.changes.is_empty()));
        });
        report(
            &format!("apply (no-op) in process, converged, {label}"),
            n,
            timing,
        );
        println!(
            "  → {:.2}× the process floor",
            timing.0.as_secs_f64() / floor.0.as_secs_f64()
        );
    }

    // NVML's share: the same loading a converge does, alone in a process.
    let n = runs(100);
    let fake = nvml_in_a_fresh_process(&support::fake_nvml_library(), n);
    report("NVML in a fresh process: the fake library, 8 GPUs", n, fake);
    let debian = Path::new("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1");
    if debian.exists() {
        let real = nvml_in_a_fresh_process(debian, n);
        report(
            "NVML in a fresh process: Debian's libnvidia-ml, no driver",
            n,
            real,
        );
    }
    println!(
        "  → cdi on less the fake NVML's load: {:.2}× the floor",
        with_cdi.0.saturating_sub(fake.0).as_secs_f64() / floor.0.as_secs_f64()
    );
    // Converged means nothing written: the spec is the one first written.
    let spec = host_dir.path().join("var/run/cdi/nvidia.yaml");
    assert!(
        std::fs::read_to_string(spec)
            .unwrap()
            .starts_with(document::MARKER)
    );
}
