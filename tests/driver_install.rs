//! Installing the driver through `apply`: a pinned runfile from a loopback
//! server (or a file:// path), the package method, nouveau, and the upgrade
//! policy. Fixture scripts stand in for modprobe, nvidia-modprobe and the
//! package manager; the installer is a script the test serves.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use support::artifact_server::{ArtifactServer, Route};
use support::{apply_config, apply_json, changed, copy_host, steps, tree, write_spec};

const VERSION: &str = "550.54.15";

fn installer() -> Vec<u8> {
    support::fake_driver_installer(VERSION)
}

fn sha(bytes: &[u8]) -> String {
    support::sha256_hex(bytes)
}

fn runfile_spec(host: &Path, url: &str, sha256: &str, extra: &str) -> PathBuf {
    write_spec(
        host,
        "driver.yaml",
        &format!(
            "driver:\n  version: \"{VERSION}\"\n{extra}  install:\n    method: runfile\n    url: {url}\n    sha256: {sha256}\n    allowInsecureHttp: true\n    args: [--dkms]\n"
        ),
    )
}

fn log(host: &Path, name: &str) -> String {
    fs::read_to_string(host.join("var/log").join(name)).unwrap_or_default()
}

#[test]
fn a_pinned_runfile_installs_the_driver_once() {
    let server = ArtifactServer::start();
    server.route(
        "/NVIDIA-Linux-x86_64-550.54.15.run",
        Route::Body(installer()),
    );
    let host = copy_host("t4-no-driver");
    let spec = runfile_spec(
        host.path(),
        &server.url("/NVIDIA-Linux-x86_64-550.54.15.run"),
        &sha(&installer()),
        "",
    );
    let spec = spec.to_str().unwrap();

    let (code, report, stderr) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 0, "{stderr}");
    let driver = &steps(&report)["driver"];
    assert_eq!(
        (driver.0.as_str(), driver.1.as_str()),
        ("change", "installed"),
        "{}",
        driver.2
    );
    assert_eq!(
        log(host.path(), "fake-installer.log"),
        "--silent --accept-license --no-questions --ui=none --dkms\n",
        "NVIDIA's unattended flags, then the spec's args"
    );
    assert_eq!(
        log(host.path(), "fake-modprobe.log"),
        "nvidia\nnvidia-uvm\nnvidia-modeset\n"
    );
    assert!(host.path().join("dev/nvidia0").exists() && host.path().join("dev/nvidiactl").exists());
    assert!(
        fs::read_to_string(host.path().join("proc/driver/nvidia/version"))
            .unwrap()
            .contains(VERSION)
    );
    assert_eq!(
        steps(&report)["containerd-runtime"].1,
        "configured",
        "the rest of the stack follows"
    );

    // A second apply: no download, no command, no write.
    let before = tree(host.path());
    let (code, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 0);
    assert_eq!(steps(&report)["driver"].0, "unchanged");
    assert_eq!(steps(&report)["driver"].1, "installed");
    assert_eq!(server.hits("/NVIDIA-Linux-x86_64-550.54.15.run"), 1);
    assert_eq!(
        changed(&before, &tree(host.path())),
        [
            PathBuf::from("var/lib/gpuprov"),
            PathBuf::from("var/lib/gpuprov/last-run.json")
        ]
    );
}

#[test]
fn plan_names_the_artifact_the_cache_and_the_command() {
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let host = copy_host("t4-no-driver");
    let spec = runfile_spec(
        host.path(),
        &server.url("/driver.run"),
        &sha(&installer()),
        "",
    );
    let output = support::run_on("plan", host.path(), &spec);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(&format!(
            "fetch {} (sha256 {}",
            server.url("/driver.run"),
            sha(&installer())
        )),
        "{text}"
    );
    assert!(text.contains("(download)"), "{text}");
    assert!(
        text.contains(&format!(
            "run: /var/cache/gpuprov/{} --silent --accept-license --no-questions --ui=none --dkms",
            sha(&installer())
        )),
        "{text}"
    );
    assert_eq!(server.hits("/driver.run"), 0, "plan downloads nothing");
}

#[test]
fn a_checksum_mismatch_runs_nothing_and_leaves_nothing() {
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let host = copy_host("t4-no-driver");
    let spec = runfile_spec(
        host.path(),
        &server.url("/driver.run"),
        &sha(b"another build"),
        "",
    );
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 3);
    let driver = &steps(&report)["driver"];
    assert_eq!(driver.1, "failed");
    assert!(driver.2.contains("sha256 mismatch"), "{}", driver.2);
    assert!(
        log(host.path(), "fake-installer.log").is_empty(),
        "nothing was executed"
    );
    let cache: Vec<_> = fs::read_dir(host.path().join("var/cache/gpuprov"))
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert!(
        cache.iter().all(|n| *n == 0),
        "nothing is left in the cache"
    );
}

#[test]
fn a_missing_artifact_and_plain_http_are_clear_failures() {
    let server = ArtifactServer::start();
    let host = copy_host("t4-no-driver");
    let spec = runfile_spec(host.path(), &server.url("/gone.run"), &sha(b"x"), "");
    let (_, report, _) = apply_config(host.path(), &spec);
    assert!(
        steps(&report)["driver"]
            .2
            .contains("the server answered 404"),
        "{:?}",
        steps(&report)["driver"]
    );

    let spec = write_spec(
        host.path(),
        "http.yaml",
        &format!(
            "driver:\n  version: \"{VERSION}\"\n  install:\n    method: runfile\n    url: {}\n    sha256: {}\n",
            server.url("/driver.run"),
            sha(b"x")
        ),
    );
    let (_, report, _) = apply_config(host.path(), &spec);
    assert!(
        steps(&report)["driver"].2.contains("plain http is refused"),
        "{:?}",
        steps(&report)["driver"]
    );
}

#[test]
fn file_urls_and_the_cache_need_no_server() {
    let host = copy_host("t4-no-driver");
    fs::create_dir_all(host.path().join("srv/mirror")).unwrap();
    fs::write(host.path().join("srv/mirror/driver.run"), installer()).unwrap();
    let spec = runfile_spec(
        host.path(),
        "file:///srv/mirror/driver.run",
        &sha(&installer()),
        "",
    );
    let (code, report, stderr) = apply_config(host.path(), &spec);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(steps(&report)["driver"].1, "installed");

    // A cache hit with the server stopped.
    let server = ArtifactServer::start();
    let other = copy_host("t4-no-driver");
    let url = server.url("/driver.run");
    server.stop();
    let cache = other.path().join("var/cache/gpuprov");
    fs::create_dir_all(&cache).unwrap();
    fs::write(cache.join(sha(&installer())), installer()).unwrap();
    let spec = runfile_spec(other.path(), &url, &sha(&installer()), "");
    let (code, report, stderr) = apply_json(other.path(), &["--config", spec.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(steps(&report)["driver"].1, "installed");
}

#[test]
fn the_package_method_pins_the_package() {
    let host = copy_host("t4-no-driver");
    let spec = write_spec(
        host.path(),
        "pkg.yaml",
        &format!(
            "driver:\n  version: \"{VERSION}\"\n  install:\n    method: package\n    package: nvidia-driver\n    packageVersion: {VERSION}-1\n"
        ),
    );
    let (code, report, stderr) = apply_config(host.path(), &spec);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(steps(&report)["driver"].1, "installed");
    assert!(log(host.path(), "fake-apt-get.log").contains(&format!(
        "install -y -q --no-install-recommends nvidia-driver={VERSION}-1"
    )));
}

#[test]
fn nouveau_is_blacklisted_only_when_asked_and_then_a_reboot_is_owed() {
    let host = copy_host("nouveau-bound");
    let (code, report, _) = apply_json(host.path(), &[]);
    assert_eq!(code, 3);
    assert!(
        steps(&report)["driver"]
            .2
            .contains("set driver.blacklistNouveau: true")
    );
    assert!(
        !host
            .path()
            .join("etc/modprobe.d/gpuprov-blacklist-nouveau.conf")
            .exists()
    );

    let spec = write_spec(
        host.path(),
        "nouveau.yaml",
        "driver:\n  blacklistNouveau: true\n",
    );
    let spec = spec.to_str().unwrap();
    let (code, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 3, "a reboot is owed: not converged");
    assert_eq!(steps(&report)["driver"].1, "reboot-required");
    let blacklist = fs::read_to_string(
        host.path()
            .join("etc/modprobe.d/gpuprov-blacklist-nouveau.conf"),
    )
    .unwrap();
    assert!(blacklist.contains("blacklist nouveau\noptions nouveau modeset=0\n"));
    assert_eq!(
        log(host.path(), "fake-update-initramfs.log"),
        "-u\n",
        "Debian regenerates its initramfs"
    );
    let (_, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(steps(&report)["driver"].1, "reboot-required");
    assert_eq!(
        log(host.path(), "fake-update-initramfs.log"),
        "-u\n",
        "nothing more until the reboot"
    );
}

#[test]
fn a_different_loaded_driver_follows_the_upgrade_policy() {
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(installer()));
    let url = server.url("/driver.run");
    // a100-preinstalled has 535.161.08 loaded.
    let host = copy_host("a100-preinstalled");
    let spec = runfile_spec(host.path(), &url, &sha(&installer()), "");
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 0);
    let driver = &steps(&report)["driver"];
    assert_eq!(driver.1, "preinstalled");
    assert!(
        driver
            .2
            .contains("driver.version asks 550.54.15, the loaded driver is kept"),
        "{}",
        driver.2
    );

    // ifDifferent refuses while a process holds a GPU open...
    let busy = host.path().join("proc/4242");
    fs::create_dir_all(busy.join("fd")).unwrap();
    fs::write(busy.join("comm"), "python3\n").unwrap();
    std::os::unix::fs::symlink("/dev/nvidia0", busy.join("fd/7")).unwrap();
    let spec = runfile_spec(
        host.path(),
        &url,
        &sha(&installer()),
        "  upgradePolicy: ifDifferent\n",
    );
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 3);
    assert!(
        steps(&report)["driver"]
            .2
            .contains("while GPU processes run (4242 (python3))"),
        "{:?}",
        steps(&report)["driver"]
    );
    assert!(log(host.path(), "fake-installer.log").is_empty());

    // ...and replaces the driver once they are gone.
    fs::remove_dir_all(&busy).unwrap();
    let (code, report, stderr) = apply_config(host.path(), &spec);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(steps(&report)["driver"].1, "installed");
    assert!(
        log(host.path(), "fake-modprobe.log")
            .starts_with("-r nvidia-modeset\n-r nvidia-uvm\n-r nvidia\n")
    );
    assert!(
        fs::read_to_string(host.path().join("proc/driver/nvidia/version"))
            .unwrap()
            .contains(VERSION)
    );
}

/// A toolkit tarball: the three binaries at its top level.
fn toolkit_tarball(tag: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for name in [
        "nvidia-container-runtime",
        "nvidia-ctk",
        "nvidia-container-runtime-hook",
    ] {
        let body = format!("#!/bin/sh\necho {name} {tag}\n");
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        builder
            .append_data(&mut header, name, body.as_bytes())
            .unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[test]
fn the_toolkit_artifact_method_unpacks_a_pinned_tarball_atomically() {
    let server = ArtifactServer::start();
    let (v1, v2) = (toolkit_tarball("v1"), toolkit_tarball("v2"));
    server.route("/toolkit-v1.tar.gz", Route::Body(v1.clone()));
    server.route("/toolkit-v2.tar.gz", Route::Body(v2.clone()));
    let host = copy_host("rtx-with-audio");
    let spec_for = |path: &str, tarball: &[u8]| {
        write_spec(
            host.path(),
            "toolkit.yaml",
            &format!(
                "toolkit:\n  method: artifact\n  artifact:\n    url: {}\n    sha256: {}\n    allowInsecureHttp: true\n",
                server.url(path),
                sha(tarball)
            ),
        )
    };
    let spec = spec_for("/toolkit-v1.tar.gz", &v1);
    let (code, report, stderr) = apply_config(host.path(), &spec);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(steps(&report)["container-toolkit"].1, "installed");
    let runtime = host
        .path()
        .join("usr/local/nvidia/toolkit/nvidia-container-runtime");
    assert!(fs::read_to_string(&runtime).unwrap().contains("v1"));
    let config = fs::read_to_string(host.path().join("etc/containerd/config.toml")).unwrap();
    assert!(
        config.contains("BinaryName = \"/usr/local/nvidia/toolkit/nvidia-container-runtime\""),
        "{config}"
    );
    assert!(
        !host.path().join("var/log/fake-apt-get.log").exists(),
        "no package manager involved"
    );

    let before = tree(host.path());
    assert_eq!(apply_config(host.path(), &spec).0, 0);
    assert_eq!(server.hits("/toolkit-v1.tar.gz"), 1);
    assert_eq!(
        changed(&before, &tree(host.path())).len(),
        2,
        "only the run record"
    );

    // A new pinned artifact replaces the directory whole, and the plan
    // says it is gpuprov's own earlier unpack that goes.
    let spec = spec_for("/toolkit-v2.tar.gz", &v2);
    let plan = support::run_on("plan", host.path(), &spec);
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("into /usr/local/nvidia/toolkit (atomically, replacing gpuprov's earlier unpack there; recorded in /var/lib/gpuprov/toolkit-installed)"),
        "{plan}"
    );
    assert_eq!(apply_config(host.path(), &spec).0, 0);
    assert!(fs::read_to_string(&runtime).unwrap().contains("v2"));
    let leftovers: Vec<_> = fs::read_dir(host.path().join("usr/local/nvidia"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        leftovers,
        ["toolkit"],
        "no temporary or old directory is left"
    );
}

#[test]
fn a_toolkit_install_dir_that_is_a_link_is_refused_and_left_alone() {
    // `installDir` planted as a link to /usr/bin: swapping the directory in
    // would replace the link (and everything it names would look gone), and
    // unpacking through it would write into /usr/bin. Refused, naming it.
    let server = ArtifactServer::start();
    let tarball = toolkit_tarball("v1");
    server.route("/toolkit.tar.gz", Route::Body(tarball.clone()));
    let host = copy_host("rtx-with-audio");
    fs::create_dir_all(host.path().join("usr/local/nvidia")).unwrap();
    std::os::unix::fs::symlink("/usr/bin", host.path().join("usr/local/nvidia/toolkit")).unwrap();
    let spec = write_spec(
        host.path(),
        "toolkit.yaml",
        &format!(
            "toolkit:\n  method: artifact\n  artifact:\n    url: {}\n    sha256: {}\n    allowInsecureHttp: true\n",
            server.url("/toolkit.tar.gz"),
            sha(&tarball)
        ),
    );
    let usr_bin = tree(&host.path().join("usr/bin"));
    let (code, report, stderr) = apply_config(host.path(), &spec);
    assert_ne!(code, 0, "{stderr}");
    let toolkit = &steps(&report)["container-toolkit"];
    assert_eq!(toolkit.1, "failed", "{}", toolkit.2);
    assert!(
        toolkit.2.contains("/usr/local/nvidia/toolkit is a symlink"),
        "{}",
        toolkit.2
    );
    assert_eq!(
        fs::read_link(host.path().join("usr/local/nvidia/toolkit")).unwrap(),
        std::path::Path::new("/usr/bin")
    );
    assert!(
        changed(&usr_bin, &tree(&host.path().join("usr/bin"))).is_empty(),
        "nothing written into the link's target"
    );
}

fn toolkit_spec(host: &Path, server: &ArtifactServer, path: &str, tarball: &[u8]) -> PathBuf {
    write_spec(
        host,
        "toolkit.yaml",
        &format!(
            "toolkit:\n  method: artifact\n  artifact:\n    url: {}\n    sha256: {}\n    allowInsecureHttp: true\n",
            server.url(path),
            sha(tarball)
        ),
    )
}

#[test]
fn the_toolkit_artifact_never_replaces_a_directory_gpuprov_did_not_make() {
    // The GPU Operator's toolkit container installed into the default
    // directory: its files are not gpuprov's, so the unpack (which swaps
    // the directory whole) is refused with them named, in plan and apply,
    // before anything is fetched.
    let server = ArtifactServer::start();
    let tarball = toolkit_tarball("v1");
    server.route("/toolkit.tar.gz", Route::Body(tarball.clone()));
    let host = copy_host("rtx-with-audio");
    let theirs = host.path().join("usr/local/nvidia/toolkit");
    fs::create_dir_all(theirs.join(".config/nvidia-container-runtime")).unwrap();
    fs::write(theirs.join("nvidia-container-runtime"), "operator's\n").unwrap();
    fs::write(
        theirs.join(".config/nvidia-container-runtime/config.toml"),
        "# operator's\n",
    )
    .unwrap();
    let spec = toolkit_spec(host.path(), &server, "/toolkit.tar.gz", &tarball);
    let before = tree(host.path());

    let plan = support::gpuprov()
        .args([
            "plan",
            "--output",
            "json",
            "--host-exec",
            "prefix",
            "--config",
        ])
        .arg(&spec)
        .arg("--host-root")
        .arg(host.path())
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let planned = &steps(&plan)["container-toolkit"];
    assert_eq!(planned.1, "failed", "{}", planned.2);

    let (code, report, stderr) = apply_config(host.path(), &spec);
    assert_ne!(code, 0, "{stderr}");
    let toolkit = &steps(&report)["container-toolkit"];
    assert_eq!(toolkit.1, "failed", "{}", toolkit.2);
    for named in [
        "toolkit.installDir /usr/local/nvidia/toolkit is not a directory gpuprov unpacked",
        "/usr/local/nvidia/toolkit/.config",
        "/usr/local/nvidia/toolkit/nvidia-container-runtime",
    ] {
        assert!(toolkit.2.contains(named), "{named}: {}", toolkit.2);
    }
    assert_eq!(server.hits("/toolkit.tar.gz"), 0, "nothing fetched");
    let moved: Vec<_> = changed(&before, &tree(host.path()))
        .into_iter()
        .filter(|p| p.starts_with("usr"))
        .collect();
    assert!(moved.is_empty(), "nothing of theirs changed: {moved:?}");
}

#[test]
fn the_toolkit_artifact_keeps_a_file_someone_added_to_its_directory() {
    // gpuprov's own directory, but someone put a file in it since: a new
    // pin would swap it away, so it is refused with the file named.
    let server = ArtifactServer::start();
    let (v1, v2) = (toolkit_tarball("v1"), toolkit_tarball("v2"));
    server.route("/v1.tar.gz", Route::Body(v1.clone()));
    server.route("/v2.tar.gz", Route::Body(v2.clone()));
    let host = copy_host("rtx-with-audio");
    let spec = toolkit_spec(host.path(), &server, "/v1.tar.gz", &v1);
    assert_eq!(apply_config(host.path(), &spec).0, 0);
    let record = fs::read_to_string(host.path().join("var/lib/gpuprov/toolkit-installed")).unwrap();
    assert!(
        record.contains("dir /usr/local/nvidia/toolkit\n") && record.contains("entry nvidia-ctk\n"),
        "{record}"
    );
    let added = host.path().join("usr/local/nvidia/toolkit/site-hook.sh");
    fs::write(&added, "#!/bin/sh\n").unwrap();

    let spec = toolkit_spec(host.path(), &server, "/v2.tar.gz", &v2);
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let toolkit = &steps(&report)["container-toolkit"];
    assert!(
        toolkit.2.contains(
            "holds what gpuprov did not unpack there: /usr/local/nvidia/toolkit/site-hook.sh"
        ),
        "{}",
        toolkit.2
    );
    assert!(added.exists());
    let runtime = host
        .path()
        .join("usr/local/nvidia/toolkit/nvidia-container-runtime");
    assert!(fs::read_to_string(runtime).unwrap().contains("v1"));

    // Moved away, the new pin goes in.
    fs::remove_file(&added).unwrap();
    assert_eq!(apply_config(host.path(), &spec).0, 0);
}

#[test]
fn a_toolkit_tarball_that_inflates_past_the_cap_is_refused_before_writing() {
    // One entry whose header claims 600 MiB: a few hundred bytes on the
    // wire. The size is summed before anything is unpacked.
    let mut raw = Vec::new();
    let mut header = tar::Header::new_gnu();
    header.set_path("nvidia-container-runtime").unwrap();
    header.set_size(600 << 20);
    header.set_mode(0o755);
    header.set_cksum();
    raw.extend_from_slice(header.as_bytes());
    raw.extend_from_slice(&[0u8; 4096]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    let bomb = gz.finish().unwrap();
    let server = ArtifactServer::start();
    server.route("/bomb.tar.gz", Route::Body(bomb.clone()));
    let host = copy_host("rtx-with-audio");
    let spec = toolkit_spec(host.path(), &server, "/bomb.tar.gz", &bomb);
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_ne!(code, 0);
    let toolkit = &steps(&report)["container-toolkit"];
    assert!(
        toolkit.2.contains("unpacks to more than 512 MiB"),
        "{}",
        toolkit.2
    );
    assert!(!host.path().join("usr/local/nvidia").exists());
}
