//! What a GPU system needs besides the driver, through the binary: the
//! fabric manager on NVSwitch systems, persistence, the kernel module
//! flavour, Secure Boot and GPUDirect RDMA. The fixtures' stand-ins
//! behave as NVIDIA's programs do: the fake `nv-fabricmanager` refuses a
//! driver of another version and takes a while to bring the fabric up,
//! which the fake NVML reports per GPU.

mod support;

use std::fs;
use std::path::Path;

use support::artifact_server::{ArtifactServer, Route};
use support::{apply_config, changed, copy_host, steps, tree, write_spec};

/// The fake NVML's answer for the HGX H100 fixture's eight GPUs, each
/// registered with the fabric once the fake fabric manager says so.
fn hgx_nvml(host: &Path) -> std::path::PathBuf {
    let up = host.join("run/nvidia-fabricmanager/fabric-up");
    let mut yaml =
        String::from("driverVersion: \"550.54.15\"\ncudaDriverVersion: 12040\ndevices:\n");
    for (i, bus) in ["18", "2A", "3A", "5D", "9A", "AB", "BA", "DB"]
        .iter()
        .enumerate()
    {
        yaml.push_str(&format!(
            "  - name: NVIDIA H100 80GB HBM3\n    uuid: GPU-5f1c4e2a-0d3b-4c7e-9a10-0000000000{i:02}\n    pciBusId: \"00000000:{bus}:00.0\"\n    pciDeviceId: 0x233010de\n    pciSubSystemId: 0x16c110de\n    memoryTotalMiB: 81559\n    computeCapability: [9, 0]\n    persistenceMode: true\n    fabric:\n      clusterUuid: 00000000-0000-0000-0000-000000000000\n      cliqueId: 0\n      upWhen: {}\n",
            up.display()
        ));
    }
    let path = host.join("nvml.yaml");
    fs::write(&path, yaml).unwrap();
    path
}

/// `apply --output json` on `host` with the fake NVML, more arguments after.
fn apply_with_nvml(
    host: &Path,
    nvml: &Path,
    spec: &Path,
    more: &[&str],
) -> (i32, serde_json::Value, String) {
    let output = support::gpuprov()
        .env("GPUPROV_FAKE_NVML", nvml)
        .env("FAKE_FABRIC_SECONDS", "3")
        .args([
            "apply",
            "--output",
            "json",
            "--host-exec",
            "prefix",
            "--nvml-lib",
        ])
        .arg(support::fake_nvml_library())
        .arg("--host-root")
        .arg(host)
        .arg("--config")
        .arg(spec)
        .args(more)
        .output()
        .unwrap();
    support::json_report(&output)
}

/// Since `before`, nothing changed on the node but the run's own record.
fn only_the_run_record_changed(
    before: &std::collections::BTreeMap<std::path::PathBuf, support::FileState>,
    host: &Path,
) {
    assert_eq!(
        changed(before, &tree(host)),
        [
            Path::new("var/lib/gpuprov").to_path_buf(),
            Path::new("var/lib/gpuprov/last-run.json").to_path_buf()
        ]
    );
}

/// A label a state's report says it publishes.
fn step_label(report: &serde_json::Value, state: &str, key: &str) -> String {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == state)
        .and_then(|s| s["labels"][key].as_str())
        .unwrap_or_default()
        .to_string()
}

fn log(host: &Path, name: &str) -> String {
    fs::read_to_string(host.join("var/log").join(name)).unwrap_or_default()
}

#[test]
fn plan_on_the_default_hgx_fixture_shows_the_fabric_manager() {
    let output = support::gpuprov()
        .args(["plan", "--host-exec", "prefix", "--host-root"])
        .arg(support::repo().join("fixtures/hosts/h100x8-nvswitch-preinstalled"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("fabric-manager")
            && text.contains("4 NVSwitches on the PCI bus; nv-fabricmanager 550.54.15 is installed but not running")
            && text.contains("run: /usr/bin/nv-fabricmanager -c /usr/share/nvidia/nvswitch/fabricmanager.cfg"),
        "{text}"
    );
}

#[test]
fn a_fresh_hgx_converges_only_once_the_fabric_is_up() {
    let host = copy_host("h100x8-nvswitch-no-driver");
    let nvml = hgx_nvml(host.path());
    let spec = write_spec(
        host.path(),
        "node.yaml",
        "driver:\n  version: \"550.54.15\"\n  install:\n    method: package\n    package: nvidia-driver\n    packageVersion: 550.54.15-0ubuntu1\n",
    );

    // One pass: the driver and the fabric manager (CUDA's package, pinned
    // to the driver) are installed and started, but the fabric is not up
    // yet, so the node is not converged and the validator waits.
    let (code, report, stderr) = apply_with_nvml(host.path(), &nvml, &spec, &[]);
    assert_ne!(code, 0, "{stderr}");
    let fabric = &steps(&report)["fabric-manager"];
    assert_eq!(fabric.1, "pending", "{fabric:?}");
    assert!(fabric.2.contains("0 of 8 GPUs registered"), "{}", fabric.2);
    assert!(
        log(host.path(), "fake-apt-get.log").contains("nvidia-fabricmanager-550=550.54.15-1"),
        "the fabric manager is pinned to the driver's version"
    );
    assert_ne!(steps(&report)["validator"].1, "ready");

    // --wait: converged once every GPU has registered.
    let (code, report, stderr) =
        apply_with_nvml(host.path(), &nvml, &spec, &["--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "{stderr}\n{report:#}");
    let fabric = &steps(&report)["fabric-manager"];
    assert_eq!(fabric.1, "ready");
    assert!(
        fabric.2.contains("the NVLink fabric is up on all 8 GPUs"),
        "{}",
        fabric.2
    );
    assert_eq!(steps(&report)["persistence"].1, "ready");
    assert_eq!(
        log(host.path(), "fake-fabricmanager.log").lines().count(),
        1,
        "started once"
    );

    // A second apply changes nothing.
    let before = tree(host.path());
    let (code, report, _) = apply_with_nvml(host.path(), &nvml, &spec, &[]);
    assert_eq!(code, 0);
    assert_eq!(steps(&report)["fabric-manager"].0, "unchanged");
    only_the_run_record_changed(&before, host.path());
}

#[test]
fn a_fabric_manager_of_another_version_fails_naming_both() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let program = host.path().join("usr/bin/nv-fabricmanager");
    let script = fs::read_to_string(&program)
        .unwrap()
        .replace("550.54.15", "550.54.14");
    fs::write(&program, script).unwrap();
    let spec = write_spec(host.path(), "node.yaml", "{}\n");

    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let fabric = &steps(&report)["fabric-manager"];
    assert_eq!(fabric.1, "failed");
    assert!(
        fabric
            .2
            .contains("nv-fabricmanager 550.54.14 does not match the NVIDIA driver 550.54.15"),
        "{}",
        fabric.2
    );
    assert!(
        !host.path().join("var/log/fake-fabricmanager.log").exists(),
        "not started"
    );
    assert_ne!(
        steps(&report)["validator"].1,
        "ready",
        "the node is not ready"
    );

    // The real fabric manager refuses the mismatch too: started by hand,
    // the stand-in names both versions and exits.
    let out = std::process::Command::new(&program)
        .args(["-c", "/usr/share/nvidia/nvswitch/fabricmanager.cfg"])
        .env("GPUPROV_HOST_ROOT", host.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("550.54.14"));
}

/// NVIDIA's fabric manager archive, as `.tar.xz`: one top directory with
/// `bin/nv-fabricmanager` (the fixture's stand-in at `version`) and its
/// topology files.
fn fabric_manager_archive(version: &str) -> Vec<u8> {
    let program =
        fs::read_to_string(support::repo().join(
            "fixtures/hosts/h100x8-nvswitch-no-driver/usr/local/lib/fixture/nv-fabricmanager",
        ))
        .unwrap()
        .replace("__VERSION__", version);
    let top = format!("fabricmanager-linux-x86_64-{version}-archive");
    let mut builder = tar::Builder::new(Vec::new());
    for (path, body, mode) in [
        (
            format!("{top}/bin/nv-fabricmanager"),
            program.as_str(),
            0o755,
        ),
        (
            format!("{top}/share/nvidia/nvswitch/dgxh100_hgxh100_topology"),
            "topology\n",
            0o644,
        ),
        (
            format!("{top}/etc/fabricmanager.cfg"),
            "DAEMONIZE=1\n",
            0o644,
        ),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        builder
            .append_data(&mut header, path, body.as_bytes())
            .unwrap();
    }
    let tarball = builder.into_inner().unwrap();
    let mut xz =
        lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1)).unwrap();
    std::io::Write::write_all(&mut xz, &tarball).unwrap();
    xz.finish().unwrap()
}

#[test]
fn the_fabric_manager_archive_installs_through_the_download_cache() {
    let archive = fabric_manager_archive("550.54.15");
    let server = ArtifactServer::start();
    server.route("/fabricmanager.tar.xz", Route::Body(archive.clone()));
    let host = copy_host("h100x8-nvswitch-preinstalled");
    fs::remove_file(host.path().join("usr/bin/nv-fabricmanager")).unwrap();
    let spec = write_spec(
        host.path(),
        "node.yaml",
        &format!(
            "fabricManager:\n  url: {}\n  sha256: {}\n  allowInsecureHttp: true\n",
            server.url("/fabricmanager.tar.xz"),
            support::sha256_hex(&archive)
        ),
    );
    let (code, report, stderr) = apply_config(host.path(), &spec);
    assert_eq!(code, 0, "{stderr}\n{report:#}");
    let fabric = &steps(&report)["fabric-manager"];
    assert_eq!(
        (fabric.0.as_str(), fabric.1.as_str()),
        ("change", "ready"),
        "{fabric:?}"
    );
    let top = "var/lib/gpuprov/fabric-manager/fabricmanager-linux-x86_64-550.54.15-archive";
    assert!(host.path().join(top).join("bin/nv-fabricmanager").is_file());
    let config =
        fs::read_to_string(host.path().join("var/lib/gpuprov/fabric-manager.cfg")).unwrap();
    assert!(
        config.contains(&format!("TOPOLOGY_FILE_PATH=/{top}/share/nvidia/nvswitch")),
        "{config}"
    );
    assert_eq!(
        log(host.path(), "fake-fabricmanager.log"),
        "-c /var/lib/gpuprov/fabric-manager.cfg\n"
    );

    // Installed and running: a second apply downloads and changes nothing.
    let before = tree(host.path());
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 0);
    assert_eq!(steps(&report)["fabric-manager"].0, "unchanged");
    assert_eq!(server.hits("/fabricmanager.tar.xz"), 1);
    only_the_run_record_changed(&before, host.path());
}

#[test]
fn without_nvswitches_the_fabric_manager_is_disabled() {
    let host = copy_host("a100-preinstalled");
    let spec = write_spec(host.path(), "node.yaml", "{}\n");
    let (_, report, _) = apply_config(host.path(), &spec);
    let fabric = &steps(&report)["fabric-manager"];
    assert_eq!(fabric.1, "disabled");
    assert!(fabric.2.contains("no NVSwitch"), "{}", fabric.2);
    assert_eq!(steps(&report)["persistence"].1, "ready");
}

fn runfile_host(
    name: &str,
    extra: &str,
) -> (tempfile::TempDir, ArtifactServer, std::path::PathBuf) {
    let installer = support::fake_driver_installer("570.133.07");
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer.clone()));
    let host = copy_host(name);
    let spec = write_spec(
        host.path(),
        "node.yaml",
        &format!(
            "driver:\n  version: \"570.133.07\"\n{extra}  install:\n    method: runfile\n    url: {}\n    sha256: {}\n    allowInsecureHttp: true\n",
            server.url("/driver.run"),
            support::sha256_hex(&installer)
        ),
    );
    (host, server, spec)
}

#[test]
fn blackwell_gets_open_modules_and_pascal_proprietary() {
    for (name, flag) in [
        ("b200x8-no-driver", "--kernel-module-type=open"),
        ("p100-no-driver", "--kernel-module-type=proprietary"),
    ] {
        let (host, _server, spec) = runfile_host(name, "");
        let (_, report, stderr) = apply_config(host.path(), &spec);
        let driver = &steps(&report)["driver"];
        assert_eq!(driver.1, "installed", "{name}: {driver:?}\n{stderr}");
        assert!(
            log(host.path(), "fake-installer.log").contains(flag),
            "{name}: {}",
            log(host.path(), "fake-installer.log")
        );
        let record = fs::read_to_string(host.path().join("var/lib/gpuprov/driver.json")).unwrap();
        assert!(
            record.contains(&format!("\"kernelModuleType\": \"{}\"", &flag[21..])),
            "{record}"
        );
    }
}

#[test]
fn an_hgx_blackwell_plan_installs_open_modules_and_starts_the_fabric_through_systemd() {
    let host = copy_host("b200x8-no-driver");
    let spec = write_spec(
        host.path(),
        "node.yaml",
        "driver:\n  version: \"570.133.07\"\n  install:\n    method: package\n    package: nvidia-driver-570-server\n    packageVersion: 570.133.07-0ubuntu1\n",
    );
    let output = support::run_on("plan", host.path(), &spec);
    let text = String::from_utf8_lossy(&output.stdout);
    for wanted in [
        "with the open kernel modules (8 Blackwell GPUs (0000:18:00.0 and 7 more) need the open modules)",
        "nvidia-driver-570-server-open=570.133.07-0ubuntu1",
        "8 HGX Blackwell GPUs; nv-fabricmanager is not installed",
        "nvidia-fabricmanager-570=570.133.07-1",
        "run: systemctl enable --now nvidia-fabricmanager",
    ] {
        assert!(text.contains(wanted), "{wanted}\n{text}");
    }
    // No NVSwitch on the bus, so the GPUs say there is a fabric; without
    // systemd the subnet manager cannot be started with it.
    fs::remove_dir_all(host.path().join("run/systemd")).unwrap();
    let output = support::run_on("plan", host.path(), &spec);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("this host has no systemd"), "{text}");
}

#[test]
fn open_modules_asked_for_a_pascal_card_fail_before_anything_is_installed() {
    let (host, server, spec) = runfile_host("p100-no-driver", "  kernelModuleType: open\n");
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let driver = &steps(&report)["driver"];
    assert_eq!(driver.1, "failed");
    assert!(
        driver.2.contains("cannot drive 0000:00:04.0 (Pascal)")
            && driver.2.contains("nothing was installed"),
        "{}",
        driver.2
    );
    assert_eq!(server.hits("/driver.run"), 0, "nothing downloaded");
    assert!(!host.path().join("var/log/fake-installer.log").exists());
}

const SECURE_BOOT: &str =
    "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

fn secure_boot(host: &Path, on: bool) {
    let path = host.join(SECURE_BOOT);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, [6, 0, 0, 0, u8::from(on)]).unwrap();
}

#[test]
fn secure_boot_without_signing_fails_before_any_install() {
    let (host, server, spec) = runfile_host("t4-no-driver", "");
    secure_boot(host.path(), true);
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let driver = &steps(&report)["driver"];
    assert_eq!(driver.1, "failed");
    assert!(
        driver.2.contains("Secure Boot is on") && driver.2.contains("driver.signing"),
        "{}",
        driver.2
    );
    assert_eq!(server.hits("/driver.run"), 0, "nothing downloaded");
    assert!(!host.path().join("var/log/fake-installer.log").exists());
    assert_eq!(
        step_label(&report, "driver", "gpuprov.io/secure-boot"),
        "enabled"
    );

    // With a signing key in the host, the runfile signs what it builds.
    let (host, _server, spec) = runfile_host(
        "t4-no-driver",
        "  signing:\n    key: /root/mok/signing.key\n    certificate: /root/mok/signing.der\n",
    );
    secure_boot(host.path(), true);
    fs::create_dir_all(host.path().join("root/mok")).unwrap();
    fs::write(host.path().join("root/mok/signing.key"), "key\n").unwrap();
    fs::write(host.path().join("root/mok/signing.der"), "cert\n").unwrap();
    let output = support::run_on("plan", host.path(), &spec);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("--module-signing-secret-key=/root/mok/signing.key --module-signing-public-key=/root/mok/signing.der")
            && text.contains("must be enrolled"),
        "{text}"
    );

    // Secure Boot off: installed as usual.
    let (host, _server, spec) = runfile_host("t4-no-driver", "");
    secure_boot(host.path(), false);
    let (_, report, _) = apply_config(host.path(), &spec);
    assert_eq!(steps(&report)["driver"].1, "installed");
    assert_eq!(
        step_label(&report, "driver", "gpuprov.io/secure-boot"),
        "disabled"
    );
}

#[test]
fn a_malformed_secure_boot_variable_is_named_and_nothing_is_installed() {
    let (host, server, spec) = runfile_host("t4-no-driver", "");
    let path = host.path().join(SECURE_BOOT);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, b"on").unwrap();
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let driver = &steps(&report)["driver"];
    assert!(
        driver
            .2
            .contains(SECURE_BOOT.trim_start_matches("sys/firmware/efi/efivars/")),
        "{}",
        driver.2
    );
    assert_eq!(server.hits("/driver.run"), 0);
}

#[test]
fn peermem_loads_only_with_an_rdma_nic() {
    let rdma = "driver:\n  rdma:\n    enabled: true\n";
    let host = copy_host("azure-nd-a100-hyperv");
    let spec = write_spec(host.path(), "node.yaml", rdma);
    let (_, report, stderr) = apply_config(host.path(), &spec);
    let peermem = &steps(&report)["gpudirect-rdma"];
    assert_eq!(
        (peermem.0.as_str(), peermem.1.as_str()),
        ("change", "ready"),
        "{peermem:?}\n{stderr}"
    );
    assert!(
        peermem.2.contains("0101:00:00.0 (15b3:101c)"),
        "{}",
        peermem.2
    );
    assert!(log(host.path(), "fake-modprobe.log").contains("nvidia-peermem"));
    let (_, report, _) = apply_config(host.path(), &spec);
    assert_eq!(steps(&report)["gpudirect-rdma"].0, "unchanged");

    let host = copy_host("a100-preinstalled");
    let spec = write_spec(host.path(), "node.yaml", rdma);
    let (_, report, _) = apply_config(host.path(), &spec);
    let peermem = &steps(&report)["gpudirect-rdma"];
    assert_eq!(peermem.1, "disabled");
    assert!(peermem.2.contains("no RDMA NIC"), "{}", peermem.2);
    assert!(!log(host.path(), "fake-modprobe.log").contains("nvidia-peermem"));

    // Off by default, as in the GPU Operator.
    let host = copy_host("azure-nd-a100-hyperv");
    let spec = write_spec(host.path(), "node.yaml", "{}\n");
    let (_, report, _) = apply_config(host.path(), &spec);
    assert_eq!(steps(&report)["gpudirect-rdma"].1, "disabled");
}

#[test]
fn facts_show_the_fabric_secure_boot_and_the_rdma_nics() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let nvml = hgx_nvml(host.path());
    secure_boot(host.path(), true);
    let facts = |format: &str| {
        let output = support::gpuprov()
            .env("GPUPROV_FAKE_NVML", &nvml)
            .args(["facts", "--output", format, "--nvml-lib"])
            .arg(support::fake_nvml_library())
            .arg("--host-root")
            .arg(host.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&facts("json")).unwrap();
    assert_eq!(json["gpuSystem"]["fabric"], "4 NVSwitches on the PCI bus");
    assert_eq!(json["gpuSystem"]["secureBoot"]["state"], "enabled");
    assert_eq!(json["driver"]["kernelModuleType"], "open");
    assert_eq!(
        json["nvml"]["devices"][0]["fabricState"]["state"],
        "not-started"
    );
    let text = facts("text");
    assert!(
        text.contains("GPU system: 4 NVSwitches on the PCI bus, fabric manager not running; nvidia-persistenced running (pid 1200); Secure Boot enabled; 0 RDMA NIC(s)"),
        "{text}"
    );
    assert!(text.contains("fabric not-started"), "{text}");

    // Once the fabric manager has brought the fabric up.
    fs::create_dir_all(host.path().join("run/nvidia-fabricmanager")).unwrap();
    fs::write(host.path().join("run/nvidia-fabricmanager/fabric-up"), "").unwrap();
    let json: serde_json::Value = serde_json::from_str(&facts("json")).unwrap();
    assert_eq!(
        json["nvml"]["devices"][7]["fabricState"]["state"],
        "completed"
    );

    let azure = copy_host("azure-nd-a100-hyperv");
    let output = support::gpuprov()
        .args(["facts", "--output", "json", "--host-root"])
        .arg(azure.path())
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json["gpuSystem"]["rdmaNics"],
        serde_json::json!(["0101:00:00.0", "30c3:00:02.0"])
    );
    assert_eq!(json["gpuSystem"]["secureBoot"]["state"], "not-efi");
}

#[test]
fn persistence_starts_the_daemon_or_sets_the_mode_and_can_be_left_alone() {
    // The daemon installed but not running: started, once.
    let host = copy_host("a100-preinstalled");
    fs::remove_dir_all(host.path().join("proc/1200")).unwrap();
    let spec = write_spec(host.path(), "node.yaml", "{}\n");
    let (_, report, _) = apply_config(host.path(), &spec);
    let persistence = &steps(&report)["persistence"];
    assert_eq!(
        (persistence.0.as_str(), persistence.1.as_str()),
        ("change", "ready"),
        "{persistence:?}"
    );
    assert_eq!(
        log(host.path(), "fake-persistenced.log"),
        "--persistence-mode\n"
    );
    let (_, report, _) = apply_config(host.path(), &spec);
    assert_eq!(steps(&report)["persistence"].0, "unchanged");

    // No daemon in the host: the driver's persistence mode, through nvidia-smi.
    let host = copy_host("a100-preinstalled");
    fs::remove_dir_all(host.path().join("proc/1200")).unwrap();
    fs::remove_file(host.path().join("usr/bin/nvidia-persistenced")).unwrap();
    let (_, report, _) = apply_config(host.path(), &spec);
    let persistence = &steps(&report)["persistence"];
    assert_eq!(
        (persistence.0.as_str(), persistence.1.as_str()),
        ("change", "ready"),
        "{persistence:?}"
    );
    assert!(
        persistence
            .2
            .contains("persistence mode is on for every GPU"),
        "{}",
        persistence.2
    );
    assert_eq!(
        fs::read_to_string(host.path().join("var/lib/fake-nvidia/persistence")).unwrap(),
        "Enabled\n"
    );
    let (_, report, _) = apply_config(host.path(), &spec);
    assert_eq!(steps(&report)["persistence"].0, "unchanged");

    // persistence.enabled: false leaves it to the node.
    let host = copy_host("a100-preinstalled");
    fs::remove_dir_all(host.path().join("proc/1200")).unwrap();
    let off = write_spec(host.path(), "node.yaml", "persistence:\n  enabled: false\n");
    let (_, report, _) = apply_config(host.path(), &off);
    assert_eq!(steps(&report)["persistence"].1, "disabled");
    assert!(!host.path().join("var/log/fake-persistenced.log").exists());
}

#[test]
fn secure_boot_with_packages_takes_the_signed_precompiled_modules_first() {
    let package = |extra: &str| {
        format!(
            "driver:\n  version: \"550.54.15\"\n  install:\n    method: package\n    package: nvidia-driver\n    packageVersion: 550.54.15-0ubuntu1\n{extra}"
        )
    };
    let host = copy_host("t4-no-driver");
    secure_boot(host.path(), true);
    let spec = write_spec(
        host.path(),
        "node.yaml",
        &package("    kernelModulePackage: linux-modules-nvidia-550-server-{kernel}\n"),
    );
    let (_, report, stderr) = apply_config(host.path(), &spec);
    let driver = &steps(&report)["driver"];
    assert_eq!(driver.1, "installed", "{driver:?}\n{stderr}");
    let apt = log(host.path(), "fake-apt-get.log");
    let signed = apt
        .find("linux-modules-nvidia-550-server-5.15.0-1057-gcp")
        .expect(&apt);
    let driver_package = apt.find("nvidia-driver=550.54.15-0ubuntu1").expect(&apt);
    assert!(signed < driver_package, "the signed modules first:\n{apt}");

    // Without the distribution's signed modules: nothing is installed.
    let host = copy_host("t4-no-driver");
    secure_boot(host.path(), true);
    let spec = write_spec(host.path(), "node.yaml", &package(""));
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let driver = &steps(&report)["driver"];
    assert!(driver.2.contains("kernelModulePackage"), "{}", driver.2);
    assert!(!log(host.path(), "fake-apt-get.log").contains("nvidia-driver"));
}

#[test]
fn a_loaded_flavour_that_cannot_drive_a_gpu_fails_with_the_reason() {
    // NVIDIA's open modules loaded on a node with a Pascal card.
    let host = copy_host("p100-no-driver");
    fs::create_dir_all(host.path().join("sys/module/nvidia")).unwrap();
    fs::write(host.path().join("sys/module/nvidia/refcnt"), "1\n").unwrap();
    fs::create_dir_all(host.path().join("proc/driver/nvidia")).unwrap();
    fs::write(
        host.path().join("proc/driver/nvidia/version"),
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.07  Release Build\n",
    )
    .unwrap();
    let spec = write_spec(host.path(), "node.yaml", "{}\n");
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let driver = &steps(&report)["driver"];
    assert_eq!(driver.1, "failed");
    assert!(
        driver.2.contains(
            "the open kernel modules are loaded, but 0000:00:04.0 (Pascal) need the proprietary ones"
        ),
        "{}",
        driver.2
    );
    assert_eq!(
        step_label(&report, "driver", "gpuprov.io/driver.kernel-module-type"),
        "open"
    );
}
