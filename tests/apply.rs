//! `gpuprov apply` through the CLI on copies of fixture hosts: idempotency,
//! labels, opt-outs, blocking, the lock and the run report.

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{
    apply_config, apply_json, changed, copy_host, gpuprov, repo, steps, tree, write_spec,
};

const NFD_FILE: &str = "etc/kubernetes/node-feature-discovery/features.d/gpuprov";
const LAST_RUN: &str = "var/lib/gpuprov/last-run.json";

fn site_states() -> String {
    repo()
        .join("fixtures/specs/site-states.yaml")
        .display()
        .to_string()
}

#[test]
fn second_apply_changes_nothing_but_the_run_record() {
    let cases: &[(&str, Option<String>, i32)] = &[
        ("h100x8-nvswitch-preinstalled", Some(site_states()), 0),
        ("a100-preinstalled", None, 0),
        ("no-gpu", None, 0),
        ("t4-no-driver", None, 3),
        ("h100-sriov-vgpu-host", Some(site_states()), 0),
    ];
    for (host_name, spec, code) in cases {
        let host = copy_host(host_name);
        let config: Vec<&str> = spec.iter().flat_map(|s| ["--config", s.as_str()]).collect();
        let (first, _, stderr) = apply_json(host.path(), &config);
        assert_eq!(first, *code, "{host_name}: {stderr}");
        let before = tree(host.path());
        let (second, report, _) = apply_json(host.path(), &config);
        assert_eq!(second, *code, "{host_name}");
        for (name, (action, _, reason)) in steps(&report) {
            assert_ne!(
                action, "change",
                "{host_name}: {name} changed again: {reason}"
            );
        }
        assert_eq!(
            changed(&before, &tree(host.path())),
            [PathBuf::from("var/lib/gpuprov"), PathBuf::from(LAST_RUN)],
            "{host_name}: the second apply touched more than its run record"
        );
    }
}

#[test]
fn apply_converges_site_states_and_publishes_labels_for_nfd() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let (code, report, stderr) = apply_json(host.path(), &["--config", &site_states()]);
    assert_eq!(code, 0, "{stderr}");
    let steps = steps(&report);
    assert_eq!(steps["persistence-mode"].0, "change");
    assert_eq!(steps["persistence-mode"].1, "configured");
    assert_eq!(
        fs::read_to_string(host.path().join("var/lib/fake-nvidia/persistence")).unwrap(),
        "Enabled\n"
    );
    assert_eq!(
        fs::read_to_string(host.path().join("var/lib/site/clocks.txt"))
            .unwrap()
            .lines()
            .count(),
        8,
        "one clocks line per GPU"
    );
    assert_eq!(
        fs::read_to_string(host.path().join(NFD_FILE)).unwrap(),
        "# Written by gpuprov from its last apply; edits are overwritten.\n\
         feature.node.kubernetes.io/pci-10de.present=true\n\
         gpuprov.io/cdi=disabled\n\
         gpuprov.io/container-toolkit=preinstalled\n\
         gpuprov.io/containerd-runtime=configured\n\
         gpuprov.io/dcgm-exporter=configured\n\
         gpuprov.io/detect-gpu=ready\n\
         gpuprov.io/device-plugin=configured\n\
         gpuprov.io/driver=preinstalled\n\
         gpuprov.io/driver.kernel-module-type=open\n\
         gpuprov.io/fabric-manager=ready\n\
         gpuprov.io/gpu-clocks-report=configured\n\
         gpuprov.io/gpu-feature-discovery=absent\n\
         gpuprov.io/gpu-health=absent\n\
         gpuprov.io/gpu-remediation=disabled\n\
         gpuprov.io/gpudirect-rdma=disabled\n\
         gpuprov.io/mig=disabled\n\
         gpuprov.io/persistence=ready\n\
         gpuprov.io/persistence-mode=configured\n\
         gpuprov.io/secure-boot=disabled\n\
         gpuprov.io/validator=ready\n\
         nvidia.com/gpu.deploy.driver=pre-installed\n\
         nvidia.com/gpu.present=true\n"
    );
}

#[test]
fn run_report_is_written_with_every_step_and_the_commands_run() {
    let host = copy_host("a100-preinstalled");
    let (code, _, _) = apply_json(host.path(), &["--config", &site_states()]);
    assert_eq!(code, 0);
    let text = fs::read_to_string(host.path().join(LAST_RUN)).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["schemaVersion"], 1);
    assert_eq!(report["converged"], true);
    assert_eq!(report["spec"], site_states());
    let persistence = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "persistence-mode")
        .unwrap();
    let argv: Vec<String> = persistence["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["argv"][2].as_str().unwrap().to_string())
        .collect();
    assert_eq!(argv.len(), 3, "check, apply, check again: {argv:?}");
    assert_eq!(argv[1], "nvidia-smi -pm 1");
    assert_eq!(persistence["commands"][1]["exitCode"], 0);
    assert!(
        persistence["commands"][1]["stdout"]
            .as_str()
            .unwrap()
            .contains("Enabled persistence mode for GPU 0.")
    );
    assert!(report["startedAt"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn operands_opt_out_label_skips_everything_but_detection() {
    let host = copy_host("a100-preinstalled");
    let (code, report, _) = apply_json(
        host.path(),
        &[
            "--config",
            &site_states(),
            "--node-labels",
            "nvidia.com/gpu.deploy.operands=false",
        ],
    );
    assert_eq!(code, 0);
    let steps = steps(&report);
    assert_eq!(steps["detect-gpu"].1, "ready");
    for name in ["driver", "persistence-mode", "gpu-clocks-report"] {
        assert_eq!(steps[name].1, "opted-out", "{name}");
        assert_eq!(
            steps[name].2,
            "node label nvidia.com/gpu.deploy.operands=false"
        );
    }
    assert!(
        !host.path().join("var/lib/fake-nvidia/persistence").exists(),
        "opted-out states must not run"
    );
    let labels = fs::read_to_string(host.path().join(NFD_FILE)).unwrap();
    assert!(labels.contains("gpuprov.io/driver=opted-out\n"), "{labels}");
}

#[test]
fn driver_opt_out_label_is_obeyed_and_never_overwritten() {
    let host = copy_host("a100-preinstalled");
    let labels_file = host.path().join("node-labels");
    fs::write(
        &labels_file,
        "# from kubectl get node --show-labels\nnvidia.com/gpu.deploy.driver=false\n",
    )
    .unwrap();
    let (code, report, _) = apply_json(
        host.path(),
        &[
            "--config",
            &site_states(),
            "--node-labels-file",
            labels_file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0);
    let steps = steps(&report);
    assert_eq!(steps["driver"].1, "opted-out");
    assert_eq!(
        steps["persistence-mode"].1, "configured",
        "an opted-out driver does not block its dependents"
    );
    let labels = fs::read_to_string(host.path().join(NFD_FILE)).unwrap();
    assert!(
        !labels.contains("nvidia.com/gpu.deploy.driver="),
        "the node's own opt-out stays: {labels}"
    );
}

#[test]
fn driver_enabled_false_without_a_driver_blocks_dependents_and_says_why() {
    let host = copy_host("t4-no-driver");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "driver:\n  enabled: false\nstates:\n  - name: needs-driver\n    after: [driver]\n    check: \"true\"\n",
    );
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 3, "not converged");
    let steps = steps(&report);
    assert_eq!(steps["driver"].1, "absent");
    assert!(
        steps["driver"].2.contains("driver.enabled is false"),
        "{}",
        steps["driver"].2
    );
    assert_eq!(steps["needs-driver"].0, "block");
    assert_eq!(steps["needs-driver"].1, "blocked");
    assert!(
        steps["needs-driver"].2.starts_with("driver is absent: "),
        "{}",
        steps["needs-driver"].2
    );
}

#[test]
fn no_gpu_disables_every_later_state() {
    let host = copy_host("grace-no-gpu");
    let (code, report, _) = apply_json(host.path(), &["--config", &site_states()]);
    assert_eq!(code, 0, "a node without GPUs is converged: nothing to do");
    let steps = steps(&report);
    assert_eq!(steps["detect-gpu"].1, "absent");
    for name in ["driver", "persistence-mode", "gpu-clocks-report"] {
        assert_eq!(
            (steps[name].1.as_str(), steps[name].2.as_str()),
            ("disabled", "no GPU"),
            "{name}"
        );
    }
    let labels = fs::read_to_string(host.path().join(NFD_FILE)).unwrap();
    assert!(labels.contains("nvidia.com/gpu.present=false\n"));
    assert!(
        !labels.contains("pci-10de.present"),
        "Grace root ports are not NFD's NVIDIA devices"
    );
}

#[test]
fn a_failing_state_blocks_its_dependents_and_not_its_siblings() {
    let host = copy_host("a100-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        r#"states:
  - name: site-fabric
    after: [driver]
    check: test -S "$GPUPROV_HOST_ROOT/var/run/nvidia-fabricmanager/socket"
    apply: 'echo "no such unit: nvidia-fabricmanager" >&2; exit 5'
  - name: nvlink-check
    after: [site-fabric]
    check: "true"
  - name: sibling
    after: [driver]
    check: test -e "$GPUPROV_HOST_ROOT/var/lib/sibling"
    apply: mkdir -p "$GPUPROV_HOST_ROOT/var/lib" && touch "$GPUPROV_HOST_ROOT/var/lib/sibling"
"#,
    );
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 3);
    let steps = steps(&report);
    assert_eq!(steps["site-fabric"].1, "failed");
    assert!(
        steps["site-fabric"]
            .2
            .contains("exited 5: no such unit: nvidia-fabricmanager"),
        "{}",
        steps["site-fabric"].2
    );
    assert_eq!(steps["nvlink-check"].1, "blocked");
    assert!(steps["nvlink-check"].2.starts_with("site-fabric is failed"));
    assert_eq!(
        steps["sibling"].1, "configured",
        "an independent branch still runs"
    );
    assert!(host.path().join("var/lib/sibling").exists());
    let labels = fs::read_to_string(host.path().join(NFD_FILE)).unwrap();
    assert!(
        labels.contains("gpuprov.io/site-fabric=failed\n")
            && labels.contains("gpuprov.io/nvlink-check=blocked\n")
    );
}

#[test]
fn an_apply_that_does_not_converge_fails_the_step() {
    let host = copy_host("a100-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "states:\n  - name: stubborn\n    check: \"false\"\n    apply: \"true\"\n",
    );
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 3);
    let stubborn = &steps(&report)["stubborn"];
    assert_eq!(stubborn.1, "failed");
    assert!(stubborn.2.contains("not converged"), "{}", stubborn.2);
}

#[test]
fn a_second_apply_waits_for_the_first_ones_lock() {
    let host = copy_host("a100-preinstalled");
    let started = host.path().join("started");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        &format!(
            "states:\n  - name: slow\n    check: test -e \"$GPUPROV_HOST_ROOT/done\"\n    apply: touch {} && sleep 3 && touch \"$GPUPROV_HOST_ROOT/done\"\n",
            started.display()
        ),
    );
    let bin = assert_cmd::cargo::cargo_bin("gpuprov");
    let first = std::process::Command::new(&bin)
        .args(["apply", "--host-exec", "prefix", "--config"])
        .arg(&spec)
        .arg("--host-root")
        .arg(host.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(
            Instant::now() < deadline,
            "the first apply never started its slow step"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // With a short timeout the second one gives up with exit code 4.
    let impatient = gpuprov()
        .args([
            "apply",
            "--host-exec",
            "prefix",
            "--lock-timeout",
            "200ms",
            "--config",
        ])
        .arg(&spec)
        .arg("--host-root")
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(impatient.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&impatient.stderr);
    assert!(
        stderr.contains("another gpuprov apply holds the lock"),
        "{stderr}"
    );

    // With the default timeout it waits, then finds the node converged.
    let patient = gpuprov()
        .args([
            "apply",
            "--host-exec",
            "prefix",
            "--output",
            "json",
            "--config",
        ])
        .arg(&spec)
        .arg("--host-root")
        .arg(host.path())
        .output()
        .unwrap();
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(patient.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&patient.stderr).contains("waiting for its lock"));
    let report: serde_json::Value = serde_json::from_slice(&patient.stdout).unwrap();
    assert_eq!(
        steps(&report)["slow"].0,
        "unchanged",
        "it ran after the first apply finished"
    );
}

#[test]
fn labels_sink_stdout_prints_labels_and_writes_no_feature_file() {
    let host = copy_host("rtx-with-audio");
    let output = gpuprov()
        .args([
            "apply",
            "--labels-sink",
            "stdout",
            "--host-exec",
            "prefix",
            "--host-root",
        ])
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "feature.node.kubernetes.io/pci-10de.present=true\n\
         gpuprov.io/cdi=disabled\n\
         gpuprov.io/container-toolkit=installed\n\
         gpuprov.io/containerd-runtime=configured\n\
         gpuprov.io/dcgm-exporter=configured\n\
         gpuprov.io/detect-gpu=ready\n\
         gpuprov.io/device-plugin=configured\n\
         gpuprov.io/driver=preinstalled\n\
         gpuprov.io/driver.kernel-module-type=proprietary\n\
         gpuprov.io/fabric-manager=disabled\n\
         gpuprov.io/gpu-feature-discovery=absent\n\
         gpuprov.io/gpu-health=absent\n\
         gpuprov.io/gpu-remediation=disabled\n\
         gpuprov.io/gpudirect-rdma=disabled\n\
         gpuprov.io/mig=disabled\n\
         gpuprov.io/persistence=ready\n\
         gpuprov.io/secure-boot=disabled\n\
         gpuprov.io/validator=ready\n\
         nvidia.com/gpu.deploy.driver=pre-installed\n\
         nvidia.com/gpu.present=true\n"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("Apply: converged"));
    assert!(!host.path().join(NFD_FILE).exists());
}

#[test]
fn unreadable_sysfs_is_an_error_naming_the_file_and_nothing_is_written() {
    let host = copy_host("broken-sysfs");
    let before = tree(host.path());
    let output = gpuprov()
        .args(["apply", "--host-root"])
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/sys/bus/pci/devices/0000:00:04.0/class: expected a 24-bit hex class"),
        "{stderr}"
    );
    assert_eq!(changed(&before, &tree(host.path())), Vec::<PathBuf>::new());
}

#[test]
fn states_dir_overrides_a_builtin_in_place_and_adds_new_states() {
    let host = copy_host("a100-preinstalled");
    let dir = host.path().join("states.d");
    fs::create_dir(&dir).unwrap();
    fs::write(
        dir.join("driver.yaml"),
        "name: driver\nhandler: driver\nafter: [detect-gpu]\noptOutLabels: [example.com/driver=external]\n",
    )
    .unwrap();
    fs::write(
        dir.join("persistenced.yaml"),
        "name: persistenced\nhandler: exec\nafter: [driver]\ncheck: \"true\"\n",
    )
    .unwrap();
    let (code, report, _) = apply_json(
        host.path(),
        &[
            "--states-dir",
            dir.to_str().unwrap(),
            "--node-labels",
            "example.com/driver=external",
        ],
    );
    assert_eq!(code, 0);
    let names: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "detect-gpu",
            "driver",
            "fabric-manager",
            "persistence",
            "gpudirect-rdma",
            "container-toolkit",
            "containerd-runtime",
            "gpu-health",
            "gpu-remediation",
            "mig",
            "cdi",
            "gpu-feature-discovery",
            "device-plugin",
            "dcgm-exporter",
            "validator",
            "persistenced"
        ]
    );
    assert_eq!(steps(&report)["driver"].1, "opted-out");

    fs::write(
        dir.join("persistenced.yaml"),
        "name: persistenced\nhandler: exce\ncheck: \"true\"\n",
    )
    .unwrap();
    let output = gpuprov()
        .args(["plan", "--states-dir"])
        .arg(&dir)
        .arg("--host-root")
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("persistenced.yaml:2:10: unknown handler `exce`"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `exec`?"), "{stderr}");
}

#[test]
fn a_loaded_driver_without_a_readable_version_fails_instead_of_reading_as_absent() {
    let host = copy_host("a100-preinstalled");
    fs::write(
        host.path().join("proc/driver/nvidia/version"),
        "NVRM: something else entirely\n",
    )
    .unwrap();
    let (code, report, _) = apply_json(host.path(), &[]);
    assert_eq!(code, 3);
    let driver = &steps(&report)["driver"];
    assert_eq!(driver.1, "failed");
    assert!(
        driver
            .2
            .starts_with("/proc/driver/nvidia/version: no `NVRM version:` line"),
        "{}",
        driver.2
    );
    fs::remove_file(host.path().join("proc/driver/nvidia/version")).unwrap();
    let (_, report, _) = apply_json(host.path(), &[]);
    assert!(
        steps(&report)["driver"]
            .2
            .contains("the nvidia module is loaded but this file is missing")
    );
}

#[test]
fn apply_wait_retries_until_converged_or_times_out_naming_the_step() {
    let host = copy_host("a100-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "states:\n  - name: fabric-ready\n    after: [driver]\n    check: test -e \"$GPUPROV_HOST_ROOT/run/fabric-ready\"\n",
    );
    let spec = spec.to_str().unwrap().to_string();
    // Something else makes the node ready a moment later.
    let ready = host.path().join("run/fabric-ready");
    let maker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        fs::create_dir_all(ready.parent().unwrap()).unwrap();
        fs::write(ready, "").unwrap();
    });
    let started = Instant::now();
    let (code, report, stderr) = apply_json(
        host.path(),
        &["--config", &spec, "--wait", "--timeout", "30s"],
    );
    maker.join().unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(steps(&report)["fabric-ready"].1, "ready");
    assert!(
        stderr.contains("not converged yet (fabric-ready)"),
        "{stderr}"
    );

    fs::remove_file(host.path().join("run/fabric-ready")).unwrap();
    let (code, _, stderr) = apply_json(
        host.path(),
        &["--config", &spec, "--wait", "--timeout", "2s"],
    );
    assert_eq!(code, 3);
    assert!(
        stderr.contains("not converged after 2s: fabric-ready is failed: check exited 1"),
        "{stderr}"
    );
}
