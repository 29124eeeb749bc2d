//! Crash safety: `gpuprov apply` killed with SIGKILL at a random moment,
//! on a fresh copy of a node that needs everything (a driver installed by
//! package, the toolkit installed, containerd's config edited and
//! containerd restarted, labels applied on the fake API server), then run
//! again to completion. Every time:
//!
//! * right after the kill, containerd's config is the original or the
//!   converged file, byte for byte, never anything between;
//! * after the next run, no temporary file is left anywhere on the host;
//! * the backup of containerd's config is the original;
//! * the node (its files and its labels) is exactly as a clean run leaves it.
//!
//! `GPUPROV_CRASH_ITERATIONS` sets how many kills (CI runs 50;
//! `scripts/crash-test N` runs N in a release build), `GPUPROV_CRASH_SEED`
//! replays a run. Also: SIGTERM mid-run ends the run after the action in
//! progress, cleanly.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::fake_api::FakeApi;
use support::{FileState, copy_host, repo, tree};

const NODE: &str = "gpu-node-1";
const CONFIG: &str = "etc/containerd/config.toml";
const BACKUP: &str = "var/lib/gpuprov/backup/etc/containerd/config.toml";
const SPEC: &str = "driver:\n  version: \"550.54.15\"\n  install:\n    method: package\n    package: nvidia-driver\n    packageVersion: 550.54.15-1\n\
devicePlugin:\n  enabled: false\ndcgmExporter:\n  enabled: false\ngfd:\n  enabled: false\nvalidator:\n  enabled: false\n";

/// A node without a driver or toolkit, with Debian's default containerd config.
fn fresh_node() -> (tempfile::TempDir, PathBuf) {
    let host = copy_host("t4-no-driver");
    let config = host.path().join(CONFIG);
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::copy(repo().join("fixtures/containerd/v2-default.toml"), &config).unwrap();
    let spec = host.path().join("node.yaml");
    std::fs::write(&spec, SPEC).unwrap();
    (host, spec)
}

fn start_apply(fake: &FakeApi, host: &Path, spec: &Path) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin("gpuprov"))
        .args(["apply", "--host-exec", "prefix", "--node-name", NODE])
        .arg("--config")
        .arg(spec)
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host)
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent-gpuprov-test-home")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn fake_with_node() -> FakeApi {
    FakeApi::with_node(NODE, &[])
}

/// What a converged node is: every file (bytes and mode) but the run's own
/// records and the fakes' logs, and the node's labels.
struct NodeState {
    files: BTreeMap<PathBuf, (Vec<u8>, u32)>,
    labels: BTreeMap<String, String>,
}

fn node_state(host: &Path, fake: &FakeApi) -> NodeState {
    let skipped = |p: &Path| {
        p.starts_with("var/log")
            || p.starts_with("run/containerd")
            || p == Path::new("node.yaml")
            || p == Path::new("var/lib/gpuprov/last-run.json")
            || p == Path::new("var/lib/gpuprov/events.json")
            // A per-boot cache keyed to containerd's binary by size and
            // mtime, which differ between two copies of the fixture.
            || p == Path::new("run/gpuprov/containerd-view.json")
    };
    let files = tree(host)
        .into_iter()
        .filter(|(p, _)| !skipped(p))
        .map(|(p, FileState { bytes, mode, .. })| (p, (bytes, mode)))
        .collect();
    NodeState {
        files,
        labels: fake.labels(NODE),
    }
}

/// Temporary files of gpuprov's atomic writes and downloads.
fn temp_files(host: &Path) -> Vec<PathBuf> {
    tree(host)
        .into_keys()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with('.')
                && name.contains(".gpuprov-")
                && [".tmp", ".part", ".new", ".old"]
                    .iter()
                    .any(|suffix| name.ends_with(suffix))
        })
        .collect()
}

/// Runs apply until it exits 0 (a killed run may leave a restart owed or
/// an install half done: the next run finishes it).
fn converge(fake: &FakeApi, host: &Path, spec: &Path) {
    let mut last = String::new();
    for _ in 0..3 {
        let output = start_apply(fake, host, spec).wait_with_output().unwrap();
        if output.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&output.stderr).into_owned();
    }
    panic!("not converged after a kill: {last}");
}

/// xorshift64*: enough randomness for kill times, replayable from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn sigkill_at_any_moment_loses_nothing() {
    let iterations: usize = std::env::var("GPUPROV_CRASH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("GPUPROV_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash safety: {iterations} kills, GPUPROV_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    // A clean run: how long it takes and what it leaves.
    let (clean_host, clean_spec) = fresh_node();
    let clean_fake = fake_with_node();
    let original = std::fs::read(clean_host.path().join(CONFIG)).unwrap();
    let started = Instant::now();
    converge(&clean_fake, clean_host.path(), &clean_spec);
    let clean_time = started.elapsed();
    let converged_config = std::fs::read(clean_host.path().join(CONFIG)).unwrap();
    let expected = node_state(clean_host.path(), &clean_fake);
    assert_ne!(original, converged_config, "the clean run edits the config");

    let mut killed_in_flight = 0;
    for i in 0..iterations {
        let (host, spec) = fresh_node();
        let fake = fake_with_node();
        let delay = Duration::from_micros(rng.next() % (clean_time.as_micros() as u64 + 1));
        let mut child = start_apply(&fake, host.path(), &spec);
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed_in_flight += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let at = format!("kill {i} after {delay:?} (GPUPROV_CRASH_SEED={seed})");

        let config = std::fs::read(host.path().join(CONFIG)).unwrap();
        assert!(
            config == original || config == converged_config,
            "{at}: containerd's config is neither the original nor the converged file:\n{}",
            String::from_utf8_lossy(&config)
        );
        String::from_utf8_lossy(&config)
            .parse::<toml_edit::DocumentMut>()
            .unwrap_or_else(|e| panic!("{at}: containerd's config does not parse: {e}"));

        converge(&fake, host.path(), &spec);
        assert_eq!(temp_files(host.path()), Vec::<PathBuf>::new(), "{at}");
        assert_eq!(
            std::fs::read(host.path().join(BACKUP)).unwrap(),
            original,
            "{at}: the backup is the original"
        );
        let state = node_state(host.path(), &fake);
        let differing: Vec<&PathBuf> = state
            .files
            .keys()
            .chain(expected.files.keys())
            .filter(|p| state.files.get(*p) != expected.files.get(*p))
            .collect();
        assert!(
            differing.is_empty(),
            "{at}: differs from a clean run: {differing:?}"
        );
        assert_eq!(state.labels, expected.labels, "{at}: the node's labels");
    }
    eprintln!(
        "crash safety: {iterations} kills ({killed_in_flight} while apply ran), clean run {clean_time:?}: all recovered"
    );
}

/// SIGTERM while a change is in progress: the change finishes, nothing
/// after it runs, no labels are published, and apply exits 5.
#[test]
fn sigterm_stops_after_the_change_in_progress() {
    let host = copy_host("a100-preinstalled");
    let spec = host.path().join("node.yaml");
    let node_prep =
        std::fs::read_to_string(repo().join("fixtures/specs/node-prep-only.yaml")).unwrap();
    std::fs::write(
        &spec,
        node_prep
            + "states:\n\
               - name: slow\n  check: test -f \"$GPUPROV_HOST_ROOT/slow-done\"\n  apply: touch \"$GPUPROV_HOST_ROOT/slow-started\" && sleep 1 && touch \"$GPUPROV_HOST_ROOT/slow-done\"\n\
               - name: later\n  after: [slow]\n  check: test -f \"$GPUPROV_HOST_ROOT/later-done\"\n  apply: touch \"$GPUPROV_HOST_ROOT/later-done\"\n",
    )
    .unwrap();
    let fake = fake_with_node();
    let child = start_apply(&fake, host.path(), &spec);
    // Until the slow state's command is running.
    let started = Instant::now();
    while !host.path().join("slow-started").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the slow state never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        host.path().join("slow-done").exists(),
        "the change in progress finished"
    );
    assert!(
        !host.path().join("later-done").exists(),
        "nothing after it ran"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(host.path().join("var/lib/gpuprov/last-run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["interrupted"], true);
    let later = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "later")
        .unwrap();
    assert_eq!(later["outcome"], "blocked");
    assert!(
        !fake.labels(NODE).contains_key("gpuprov.io/slow"),
        "a partial run publishes no labels"
    );
    // The next run picks up where it stopped.
    converge(&fake, host.path(), &spec);
    assert!(host.path().join("later-done").exists());
    assert_eq!(fake.labels(NODE)["gpuprov.io/later"], "configured");
}
