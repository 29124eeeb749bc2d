//! NVML through the real nvml-wrapper: the fake library
//! (fixtures/fake-nvml, built by scripts/test) answering from each fixture
//! in fixtures/nvml, every NVML error mapped to its problem, and Debian's
//! real libnvidia-ml on a machine without a driver.

mod support;

use std::path::PathBuf;

use support::{gpuprov, gpuprov_with_fake_nvml};

/// `gpuprov facts --output json` with the fake answering from `fixture`.
fn facts(host: &str, fixture: &str) -> serde_json::Value {
    let output = gpuprov_with_fake_nvml(fixture)
        .args([
            "facts",
            "--output",
            "json",
            "--host-root",
            &format!("fixtures/hosts/{host}"),
            "--nvml-lib",
        ])
        .arg(support::fake_nvml_library())
        .assert()
        .success()
        .get_output()
        .clone();
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn every_fixture_reads_through_the_real_nvml_wrapper() {
    for (host, fixture) in [
        ("h100x8-nvswitch-preinstalled", "h100x8.yaml"),
        ("a100-preinstalled", "a100-mig.yaml"),
        ("a100-preinstalled", "mixed-t4-a10g.yaml"),
        ("a100-preinstalled", "l4.yaml"),
        ("a100-preinstalled", "zero-devices.yaml"),
    ] {
        let nvml = facts(host, fixture)["nvml"].clone();
        let mut shown = nvml.clone();
        shown["library"] = serde_json::json!("<fake>");
        insta::assert_snapshot!(
            format!("nvml-{fixture}"),
            serde_json::to_string_pretty(&shown).unwrap()
        );
    }
}

#[test]
fn the_fake_answers_as_the_real_gpus_do() {
    let nvml = facts("h100x8-nvswitch-preinstalled", "h100x8.yaml")["nvml"].clone();
    let devices = nvml["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 8, "the same count as the PCI scan");
    assert_eq!(devices[0]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(devices[0]["memoryTotalMib"], 81559);
    assert_eq!(devices[0]["computeCapability"], serde_json::json!([9, 0]));
    assert_eq!(devices[7]["pciBusId"], "00000000:DB:00.0");
    let mig = facts("a100-preinstalled", "a100-mig.yaml")["nvml"]["devices"][0].clone();
    assert_eq!(
        (mig["migCapable"].as_bool(), mig["migEnabled"].as_bool()),
        (Some(true), Some(true))
    );
    let t4 = facts("a100-preinstalled", "mixed-t4-a10g.yaml")["nvml"]["devices"][0].clone();
    assert_eq!(
        (t4["name"].as_str(), t4["migCapable"].as_bool()),
        (Some("Tesla T4"), Some(false))
    );
}

#[test]
fn nvml_errors_become_problems_a_person_can_act_on() {
    for (fixture, problem, text) in [
        (
            "driver-not-loaded.yaml",
            "driver-not-loaded",
            "driver not loaded",
        ),
        (
            "no-permission.yaml",
            "no-permission",
            "no permission to use the GPUs",
        ),
        ("gpu-lost.yaml", "gpu-lost", "GPU 3 is lost"),
        (
            "unknown-error.yaml",
            "unknown",
            "NVML failed: the device count",
        ),
    ] {
        let nvml = facts("h100x8-nvswitch-preinstalled", fixture)["nvml"].clone();
        assert_eq!(nvml["reason"]["problem"], problem, "{fixture}: {nvml}");
        assert!(
            nvml["unavailable"].as_str().unwrap().contains(text),
            "{fixture}: {nvml}"
        );
    }
    // No library in the host root at all.
    let output = gpuprov()
        .args([
            "facts",
            "--output",
            "json",
            "--host-root",
            "fixtures/hosts/no-gpu",
        ])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["nvml"]["reason"]["problem"], "library-not-found");
}

#[test]
fn debians_real_libnvidia_ml_reports_driver_not_loaded() {
    let library = [
        "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        "/usr/lib/aarch64-linux-gnu/libnvidia-ml.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("scripts/test installs Debian's libnvidia-ml1");
    // This machine has no NVIDIA driver: the real library must say so, not
    // "no GPU" and not crash.
    let output = gpuprov()
        .args(["facts", "--output", "json", "--host-root", "/"])
        .assert()
        .success()
        .get_output()
        .clone();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["nvml"]["reason"]["problem"], "driver-not-loaded",
        "{}",
        report["nvml"]
    );
    let found = report["nvml"]["reason"]["library"].as_str().unwrap();
    assert_eq!(
        std::fs::canonicalize(found).unwrap(),
        std::fs::canonicalize(&library).unwrap(),
        "the host's own library was found through its library directories"
    );
}

/// The fake built as an R470-era library (no `nvmlDeviceGetMemoryInfo_v2`,
/// no MIG functions, only the first `nvmlSystemGetCudaDriverVersion`),
/// which scripts/test builds into its own target directory.
fn old_driver_library() -> PathBuf {
    let path = support::repo().join("target/fake-nvml-old-driver/debug/libfake_nvml.so");
    assert!(
        path.exists(),
        "{} is missing: scripts/test builds it (cargo build -p fake-nvml --features old-driver --target-dir target/fake-nvml-old-driver)",
        path.display()
    );
    path
}

#[test]
fn an_old_drivers_library_is_read_without_the_functions_it_lacks() {
    let output = gpuprov_with_fake_nvml("a100-mig.yaml")
        .args([
            "facts",
            "--output",
            "json",
            "--host-root",
            "fixtures/hosts/a100-preinstalled",
            "--nvml-lib",
        ])
        .arg(old_driver_library())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let device = &report["nvml"]["devices"][0];
    // Memory through the first nvmlDeviceGetMemoryInfo, the CUDA version
    // through the first nvmlSystemGetCudaDriverVersion, and MIG not asked
    // for at all (the library has no nvmlDeviceGetMigMode).
    assert_eq!(device["memoryTotalMib"], 40960, "{report}");
    assert_eq!(report["nvml"]["cudaDriverVersion"], "12.2");
    assert_eq!(device["migCapable"], false);
}

#[test]
fn a_library_that_is_not_nvml_is_unusable_not_a_panic() {
    // A real shared library without a single NVML function: a broken
    // install, or the wrong file at libnvidia-ml.so.1.
    let output = std::process::Command::new("ldconfig")
        .arg("-p")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&output.stdout);
    let libz = listing
        .lines()
        .find(|l| l.trim_start().starts_with("libz.so.1 "))
        .and_then(|l| l.rsplit("=> ").next())
        .expect("zlib is installed")
        .trim()
        .to_string();
    let output = gpuprov()
        .args([
            "facts",
            "--output",
            "json",
            "--host-root",
            "fixtures/hosts/a100-preinstalled",
            "--nvml-lib",
            &libz,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["nvml"]["reason"]["problem"], "library-unusable",
        "{report}"
    );
    assert!(
        report["nvml"]["reason"]["reason"]
            .as_str()
            .unwrap()
            .contains("nvmlInit_v2"),
        "{report}"
    );
}
