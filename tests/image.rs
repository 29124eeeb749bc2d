//! The image scripts/image builds: a valid OCI archive holding exactly what
//! the DaemonSet needs, the same bytes when built twice, run for real by
//! Debian's runc with a fixture host at /host, and imported into and run by
//! Debian's real containerd.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::containerd::PrivateContainerd;
use support::repo;

const FIXTURE_HOST: &str = "fixtures/hosts/h100x8-nvswitch-preinstalled";

fn reference() -> String {
    format!("docker.io/library/gpuprov:{}", env!("CARGO_PKG_VERSION"))
}

/// An archive scripts/image wrote, and the digest it printed.
struct Built {
    path: PathBuf,
    printed_digest: String,
}

/// Runs scripts/image, the real build, with the archive written to `out`.
fn scripts_image(out: &Path) -> Built {
    let output = Command::new(repo().join("scripts/image"))
        .env("IMAGE_OUT", out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scripts/image: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let printed_digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("digest"))
        .unwrap_or_else(|| panic!("scripts/image printed no digest:\n{stdout}"))
        .trim()
        .to_string();
    Built {
        path: out.to_path_buf(),
        printed_digest,
    }
}

/// The two builds every test here shares (scripts/image once, then again).
fn built() -> &'static (Built, Built) {
    static BUILT: OnceLock<(Built, Built)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = repo().join("target/image/tests");
        std::fs::create_dir_all(&dir).unwrap();
        (
            scripts_image(&dir.join("first.tar")),
            scripts_image(&dir.join("second.tar")),
        )
    })
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// An OCI archive read back, every blob checked against its digest and the
/// size its descriptor gives.
struct Image {
    digest: String,
    index: Value,
    config: Value,
    layer: Vec<u8>,
}

impl Image {
    fn read(path: &Path) -> Image {
        let mut files = BTreeMap::new();
        let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            files.insert(name, bytes);
        }
        assert_eq!(
            serde_json::from_slice::<Value>(&files["oci-layout"]).unwrap()["imageLayoutVersion"],
            "1.0.0"
        );
        let blob = |descriptor: &Value| -> Vec<u8> {
            let digest = descriptor["digest"].as_str().unwrap();
            let name = format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap());
            let bytes = files
                .get(&name)
                .unwrap_or_else(|| panic!("{name} is not in the archive"))
                .clone();
            assert_eq!(sha256(&bytes), digest, "{name}: content and name differ");
            assert_eq!(descriptor["size"], bytes.len() as u64, "{name}: size");
            bytes
        };
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "{index}");
        let manifest: Value = serde_json::from_slice(&blob(&manifests[0])).unwrap();
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let config: Value = serde_json::from_slice(&blob(&manifest["config"])).unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(
            layers[0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        Image {
            digest: manifests[0]["digest"].as_str().unwrap().to_string(),
            index,
            config,
            layer: blob(&layers[0]),
        }
    }

    fn uncompressed_layer(&self) -> Vec<u8> {
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(self.layer.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        tar
    }

    /// Unpacks the layer into `dir`, as a runtime's snapshotter would.
    fn unpack(&self, dir: &Path) {
        tar::Archive::new(flate2::read::GzDecoder::new(self.layer.as_slice()))
            .unpack(dir)
            .unwrap();
    }

    fn entrypoint_and(&self, args: &[&str]) -> Vec<String> {
        let mut argv: Vec<String> = self.config["config"]["Entrypoint"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }
}

/// The binary scripts/image shipped.
fn release_binary() -> PathBuf {
    repo().join("target/image/build/release/gpuprov")
}

#[test]
fn scripts_image_gives_the_same_archive_twice_and_prints_its_digest() {
    let (first, second) = built();
    let (a, b) = (
        std::fs::read(&first.path).unwrap(),
        std::fs::read(&second.path).unwrap(),
    );
    assert!(a == b, "two builds of the same tree differ");
    let image = Image::read(&first.path);
    assert_eq!(first.printed_digest, image.digest);
    assert_eq!(second.printed_digest, image.digest);
    let annotations = &image.index["manifests"][0]["annotations"];
    assert_eq!(annotations["io.containerd.image.name"], reference());
    assert_eq!(
        annotations["org.opencontainers.image.ref.name"],
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn the_layer_holds_exactly_the_binary_the_libraries_it_links_and_ca_certificates() {
    let image = Image::read(&built().0.path);
    let tar = image.uncompressed_layer();
    assert_eq!(
        image.config["rootfs"]["diff_ids"][0],
        sha256(&tar),
        "diff_id"
    );
    // Every timestamp is the source date the config names.
    let created = humantime::parse_rfc3339(image.config["created"].as_str().unwrap()).unwrap();
    let epoch = created
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut files = BTreeMap::new();
    let mut names = Vec::new();
    for entry in tar::Archive::new(tar.as_slice()).entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        let name = entry.path().unwrap().display().to_string();
        assert_eq!(header.mtime().unwrap(), epoch, "{name}: mtime");
        assert_eq!(
            (header.uid().unwrap(), header.gid().unwrap()),
            (0, 0),
            "{name}"
        );
        names.push(name.clone());
        if header.entry_type().is_file() {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            files.insert(format!("/{name}"), bytes);
        }
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are sorted");

    // What the build host's loader resolves for the binary, and the parts of
    // the C library that the host's NVML links, beside its libc.
    let ldd = Command::new("ldd").arg(release_binary()).output().unwrap();
    let mut wanted: Vec<String> = String::from_utf8(ldd.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let path = l.split(" => ").last()?.split(" (").next()?.trim();
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    let libc = wanted.iter().find(|p| p.ends_with("/libc.so.6")).unwrap();
    let libc_dir = Path::new(libc).parent().unwrap().display().to_string();
    for name in ["libpthread.so.0", "libdl.so.2", "libm.so.6", "librt.so.1"] {
        wanted.push(format!("{libc_dir}/{name}"));
    }
    wanted.push("/usr/local/bin/gpuprov".into());
    wanted.push("/etc/ssl/certs/ca-certificates.crt".into());
    wanted.sort();
    wanted.dedup();
    assert_eq!(files.keys().cloned().collect::<Vec<_>>(), wanted);
    assert!(
        files["/usr/local/bin/gpuprov"] == std::fs::read(release_binary()).unwrap(),
        "the image's binary is the release build"
    );
    // The binary does not carry the build's paths (one source of digests
    // that change with the checkout's place).
    let binary = &files["/usr/local/bin/gpuprov"];
    let checkout = repo().canonicalize().unwrap().display().to_string();
    assert!(
        !binary
            .windows(checkout.len())
            .any(|w| w == checkout.as_bytes()),
        "the binary names the checkout {checkout}"
    );
    // What a node pulls.
    assert!(
        image.layer.len() < 30 << 20,
        "{} bytes compressed",
        image.layer.len()
    );
}

/// A JSON array from a Containerfile instruction (`ENTRYPOINT [...]`).
fn containerfile_array(text: &str, instruction: &str) -> Value {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("deploy/Containerfile has no {instruction}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{instruction} {line}: {e}"))
}

#[test]
fn deploy_containerfile_starts_the_image_the_same_way() {
    let image = Image::read(&built().0.path);
    let text = std::fs::read_to_string(repo().join("deploy/Containerfile")).unwrap();
    let config = &image.config["config"];
    assert_eq!(
        config["Entrypoint"],
        containerfile_array(&text, "ENTRYPOINT")
    );
    assert_eq!(config["Cmd"], containerfile_array(&text, "CMD"));
    let env = text
        .lines()
        .find_map(|l| l.strip_prefix("ENV "))
        .expect("an ENV line");
    assert_eq!(config["Env"], serde_json::json!([env]));
    assert_eq!(image.config["architecture"], "amd64");
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
}

/// Runs the image's entrypoint with `args` under Debian's runc, with the
/// fixture host read-only at /host and the fake NVML library where
/// `--nvml-lib` says; returns stdout.
fn runc_run(image: &Image, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    image.unpack(&bundle.join("rootfs"));
    let spec = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .expect("runc is installed with containerd");
    assert!(spec.status.success(), "runc spec: {spec:?}");
    let path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = image.entrypoint_and(args).into();
    let mut env = image.config["config"]["Env"].as_array().unwrap().clone();
    // The fake NVML answers from the fixture bound at /nvml below.
    env.push("GPUPROV_FAKE_NVML=/nvml/h100x8.yaml".into());
    config["process"]["env"] = env.into();
    config["root"]["readonly"] = true.into();
    let bind = |source: PathBuf, destination: &str| {
        serde_json::json!({
            "destination": destination,
            "type": "bind",
            "source": source,
            "options": ["rbind", "ro"],
        })
    };
    let mounts = config["mounts"].as_array_mut().unwrap();
    mounts.push(bind(repo().join(FIXTURE_HOST), "/host"));
    mounts.push(bind(
        support::fake_nvml_library(),
        "/nvml/libnvidia-ml.so.1",
    ));
    mounts.push(bind(
        repo().join("fixtures/nvml/h100x8.yaml"),
        "/nvml/h100x8.yaml",
    ));
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let id = format!("gpuprov-image-test-{}", std::process::id());
    let output = Command::new("runc")
        .arg("--root")
        .arg(dir.path().join("runc-state"))
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "runc run: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "runc needs root: run as root (CI and scripts/test do)"
)]
fn runc_runs_the_images_plan_on_a_fixture_host_at_host() {
    let image = Image::read(&built().0.path);
    let plan = runc_run(
        &image,
        &[
            "plan",
            "--host-root",
            "/host",
            "--nvml-lib",
            "/nvml/libnvidia-ml.so.1",
        ],
    );
    // Read from the fixture through /host …
    assert!(plan.contains("host: /host (Ubuntu 22.04.4 LTS"), "{plan}");
    assert!(plan.contains("8 GPUs: 8× 10de:2330 (nvidia)"), "{plan}");
    assert!(
        plan.contains("NVIDIA 550.54.15 (open kernel module) is loaded"),
        "{plan}"
    );
    assert!(plan.contains("write /etc/containerd/config.toml"), "{plan}");
    // … and the host's NVML loaded into the image's process: the C library
    // parts it links are there.
    assert!(
        plan.contains("NVML sees all 8 GPUs (driver 550.54.15)"),
        "{plan}"
    );
    assert!(plan.contains("\nPlan: "), "{plan}");
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "containerd needs root: run as root (CI and scripts/test do)"
)]
fn containerd_imports_the_archive_and_runs_it() {
    let built = &built().0;
    let containerd = PrivateContainerd::start("");
    // The native snapshotter: overlayfs may not mount inside a sandbox.
    let import = containerd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        built.path.to_str().unwrap(),
    ]);
    assert!(
        import.status.success(),
        "ctr images import: {import:?}\n{}",
        containerd.log()
    );
    let listed = containerd.ctr(&["images", "ls"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let line = listed
        .lines()
        .find(|l| l.starts_with(&format!("{} ", reference())))
        .unwrap_or_else(|| panic!("{} is not among the images:\n{listed}", reference()));
    assert!(line.contains(&built.printed_digest), "{line}");
    assert!(line.contains("linux/amd64"), "{line}");

    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:ro",
        repo().join(FIXTURE_HOST).display()
    );
    let id = format!("gpuprov-image-test-{}", std::process::id());
    let run = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--mount",
        &mount,
        &reference(),
        &id,
        "/usr/local/bin/gpuprov",
        "plan",
        "--host-root",
        "/host",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "ctr run: {}\n{stdout}\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr),
        containerd.log()
    );
    assert!(stdout.contains("8 GPUs: 8× 10de:2330 (nvidia)"), "{stdout}");
    assert!(stdout.contains("\nPlan: "), "{stdout}");
}
