//! A node that boots another kernel (issue 17, part 2), through `apply`:
//! gpuprov's driver record names the kernel its modules were built for;
//! when the running kernel has no nvidia module, they are built for it
//! (DKMS, the runfile's `--kernel-module-only` from the cache, or the
//! package with the modules for that kernel) and loaded, the version
//! unchanged. Modules that are on disk for the running kernel are loaded,
//! not installed again. Fixture scripts stand in for modprobe (it reads
//! `modules.dep`, as modprobe does), dkms and the package manager.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use support::artifact_server::{ArtifactServer, Route};
use support::{apply_json, copy_host, steps, write_spec};

const VERSION: &str = "550.54.15";
const OLD_KERNEL: &str = "5.15.0-105-generic";
const NEW_KERNEL: &str = "5.15.0-107-generic";

fn log(host: &Path, name: &str) -> String {
    fs::read_to_string(host.join("var/log").join(name)).unwrap_or_default()
}

fn loaded(host: &Path) -> String {
    fs::read_to_string(host.join("proc/driver/nvidia/version")).unwrap_or_default()
}

fn record(host: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(host.join("var/lib/gpuprov/driver.json")).unwrap())
        .unwrap()
}

fn package_spec(host: &Path, extra: &str) -> PathBuf {
    write_spec(
        host,
        "driver.yaml",
        &format!(
            "driver:\n  version: \"{VERSION}\"\n  install:\n    method: package\n    package: nvidia-driver\n    packageVersion: \"{VERSION}-0ubuntu1\"\n{extra}containerd:\n  restartMode: none\n"
        ),
    )
}

fn apply(host: &Path, spec: &Path) -> (i32, (String, String, String), String) {
    let (code, report, stderr) = apply_json(host, &["--config", spec.to_str().unwrap()]);
    (code, steps(&report)["driver"].clone(), stderr)
}

/// The fixture host `a100-new-kernel`: gpuprov installed 550.54.15 (built
/// by DKMS) for 5.15.0-105; the node now runs 5.15.0-107. DKMS builds the
/// module for it, modprobe loads it, the record names the new kernel, and
/// no package is installed again.
#[test]
fn dkms_builds_the_module_for_the_new_kernel() {
    let host = copy_host("a100-new-kernel");
    let spec = package_spec(host.path(), "");
    let (_, driver, stderr) = apply(host.path(), &spec);
    assert_eq!(
        (driver.0.as_str(), driver.1.as_str()),
        ("change", "installed"),
        "{driver:?}\n{stderr}"
    );
    assert!(
        driver.2.contains(&format!(
            "the node runs kernel {NEW_KERNEL}, and NVIDIA {VERSION} (installed by gpuprov for kernel {OLD_KERNEL}) has no module for it: rebuilding it (DKMS)"
        )),
        "{driver:?}"
    );
    assert_eq!(
        log(host.path(), "fake-dkms.log"),
        format!("install -m nvidia -v {VERSION} -k {NEW_KERNEL}\n")
    );
    assert!(
        !log(host.path(), "fake-apt-get.log").contains("nvidia-driver"),
        "the driver package is not installed again"
    );
    assert!(loaded(host.path()).contains(VERSION));
    assert_eq!(record(host.path())["kernel"], NEW_KERNEL);
    assert_eq!(record(host.path())["version"], VERSION);

    // Converged: nothing more to build.
    let (_, driver, _) = apply(host.path(), &spec);
    assert_eq!(
        (driver.0.as_str(), driver.1.as_str()),
        ("unchanged", "installed"),
        "{driver:?}"
    );
    assert_eq!(log(host.path(), "fake-dkms.log").lines().count(), 1);
}

/// `plan` names the build and changes nothing.
#[test]
fn plan_shows_the_rebuild_for_the_new_kernel() {
    let host = copy_host("a100-new-kernel");
    let spec = package_spec(host.path(), "");
    let before = support::tree(host.path());
    let output = support::run_on("plan", host.path(), &spec);
    let text = String::from_utf8_lossy(&output.stdout);
    for line in [
        format!("run: dkms install -m nvidia -v {VERSION} -k {NEW_KERNEL}"),
        "run: modprobe nvidia".to_string(),
    ] {
        assert!(text.contains(&line), "no {line:?} in\n{text}");
    }
    assert_eq!(support::tree(host.path()), before);
}

/// Without the new kernel's headers there is nothing to build against:
/// refused, saying what to install, nothing built.
#[test]
fn without_the_headers_the_rebuild_is_refused() {
    let host = copy_host("a100-new-kernel");
    fs::remove_file(host.path().join(format!("lib/modules/{NEW_KERNEL}/build"))).unwrap();
    let spec = package_spec(host.path(), "");
    let (code, driver, _) = apply(host.path(), &spec);
    assert_ne!(code, 0);
    assert_eq!(driver.1, "failed", "{driver:?}");
    assert!(
        driver.2.contains(&format!(
            "/lib/modules/{NEW_KERNEL}/build is missing: install the headers of kernel {NEW_KERNEL}"
        )),
        "{driver:?}"
    );
    assert_eq!(log(host.path(), "fake-dkms.log"), "");
    assert_eq!(log(host.path(), "fake-modprobe.log"), "");
    assert_eq!(record(host.path())["kernel"], OLD_KERNEL);
}

/// No DKMS: the package with the modules for the running kernel
/// (`kernelModulePackage`, `{kernel}` filled in); without one configured,
/// refused with what to set.
#[test]
fn without_dkms_the_kernel_module_package_is_installed() {
    let host = copy_host("a100-new-kernel");
    fs::remove_dir_all(host.path().join("var/lib/dkms")).unwrap();
    let spec = package_spec(host.path(), "");
    let (_, driver, _) = apply(host.path(), &spec);
    assert_eq!(driver.1, "failed", "{driver:?}");
    assert!(
        driver.2.contains("set driver.install.kernelModulePackage"),
        "{driver:?}"
    );

    let spec = package_spec(
        host.path(),
        "    kernelModulePackage: \"linux-modules-nvidia-550-server-{kernel}\"\n",
    );
    let (_, driver, stderr) = apply(host.path(), &spec);
    assert_eq!(driver.1, "installed", "{driver:?}\n{stderr}");
    assert!(
        log(host.path(), "fake-apt-get.log").contains(&format!(
            "install -y -q --no-install-recommends linux-modules-nvidia-550-server-{NEW_KERNEL}"
        )),
        "{}",
        log(host.path(), "fake-apt-get.log")
    );
    assert!(loaded(host.path()).contains(VERSION));
    assert_eq!(record(host.path())["kernel"], NEW_KERNEL);
}

/// What a reboot does to the fixture host: nothing is loaded, /run is
/// empty, and the kernel may be another.
fn reboot(host: &Path, kernel: &str) {
    for module in ["nvidia", "nvidia_uvm", "nvidia_modeset"] {
        let _ = fs::remove_dir_all(host.join("sys/module").join(module));
    }
    let _ = fs::remove_dir_all(host.join("proc/driver/nvidia"));
    let _ = fs::remove_dir_all(host.join("run"));
    fs::write(
        host.join("proc/sys/kernel/osrelease"),
        format!("{kernel}\n"),
    )
    .unwrap();
}

/// A runfile install on `t4-no-driver`: after a reboot into the same
/// kernel its modules are loaded, the installer not run again; after a
/// reboot into another kernel, the cached runfile builds the module only
/// (`--kernel-module-only` against that kernel's headers), with the
/// artifact server gone: no download.
#[test]
fn a_runfile_driver_is_loaded_after_a_reboot_and_rebuilt_after_a_kernel_change() {
    let installer = support::fake_driver_installer(VERSION);
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer.clone()));
    let host = copy_host("t4-no-driver");
    let kernel = fs::read_to_string(host.path().join("proc/sys/kernel/osrelease"))
        .unwrap()
        .trim()
        .to_string();
    let spec = write_spec(
        host.path(),
        "driver.yaml",
        &format!(
            "driver:\n  version: \"{VERSION}\"\n  install:\n    method: runfile\n    url: {}\n    sha256: {}\n    allowInsecureHttp: true\n    args: [--no-opengl-files]\n",
            server.url("/driver.run"),
            support::sha256_hex(&installer)
        ),
    );
    let (_, driver, stderr) = apply(host.path(), &spec);
    assert_eq!(driver.1, "installed", "{driver:?}\n{stderr}");
    assert_eq!(record(host.path())["kernel"], kernel.as_str());
    drop(server);

    reboot(host.path(), &kernel);
    let (_, driver, _) = apply(host.path(), &spec);
    assert_eq!(
        (driver.0.as_str(), driver.1.as_str()),
        ("change", "installed"),
        "{driver:?}"
    );
    assert!(
        driver.2.contains(&format!(
            "kernel {kernel} has its modules (NVIDIA {VERSION}, installed by gpuprov): loading them"
        )),
        "{driver:?}"
    );
    assert_eq!(log(host.path(), "fake-installer.log").lines().count(), 1);
    assert!(loaded(host.path()).contains(VERSION));

    let next = "5.15.0-1058-gcp";
    reboot(host.path(), next);
    fs::create_dir_all(host.path().join(format!("usr/src/linux-headers-{next}"))).unwrap();
    let modules = host.path().join(format!("lib/modules/{next}"));
    fs::create_dir_all(&modules).unwrap();
    std::os::unix::fs::symlink(
        format!("/usr/src/linux-headers-{next}"),
        modules.join("build"),
    )
    .unwrap();
    let (_, driver, stderr) = apply(host.path(), &spec);
    assert_eq!(
        (driver.0.as_str(), driver.1.as_str()),
        ("change", "installed"),
        "{driver:?}\n{stderr}"
    );
    assert_eq!(
        log(host.path(), "fake-installer.log")
            .lines()
            .last()
            .unwrap(),
        format!(
            "--silent --accept-license --no-questions --ui=none --kernel-module-only --kernel-source-path=/lib/modules/{next}/build --no-opengl-files"
        )
    );
    assert!(loaded(host.path()).contains(VERSION));
    assert_eq!(record(host.path())["kernel"], next);
}
