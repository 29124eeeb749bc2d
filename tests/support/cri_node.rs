//! A node whose containerd is Debian's real one, for the validator's CRI
//! path (tests/cri_validation.rs, benches/cri.rs).
//!
//! A fixture host whose containerd config gpuprov edits, served by a real
//! containerd that a supervisor loop restarts (as systemd would; gpuprov
//! restarts it with `restartMode: signal`). containerd runs in a private
//! mount namespace where the fixture's `/run` and `/usr/local` are the
//! node's, so the paths gpuprov writes (the runtime binary, the log
//! folder, the socket) mean the same files to both. The toolkit lives in
//! `/usr/local/nvidia/toolkit` (where the GPU Operator installs it); its
//! `nvidia-container-runtime` is a wrapper that records its invocation and
//! runs Debian's runc. The image is built from the machine's own `sh` and
//! `sleep` and imported with `ctr` (no registry); it is also the sandbox
//! (pause) image. The sandbox uses the node's network: no CNI.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use gpuprov::host::socket::{socket_owner, wait_for_socket};

const IMAGE: &str = "gpuprov.test/busy:1";
const TOOLKIT: &str = "usr/local/nvidia/toolkit";

pub struct Node {
    host: tempfile::TempDir,
    private: tempfile::TempDir,
    supervisor: Child,
}

impl Node {
    /// Starts the node's containerd; `toolkit_visible: false` hides the
    /// toolkit folder from containerd (an empty `/usr/local` in its mount
    /// namespace), so the runtime binary the config names is missing for it.
    pub fn start(toolkit_visible: bool) -> Node {
        let host = super::copy_host("a100-preinstalled");
        let private = tempfile::tempdir().unwrap();
        let root = host.path();
        let record = private.path().join("runtime-calls.log");
        let runc = which("runc");

        // The toolkit where the GPU Operator puts it, its runtime a
        // recording wrapper around runc.
        let toolkit = root.join(TOOLKIT);
        fs::create_dir_all(&toolkit).unwrap();
        for binary in ["nvidia-ctk", "nvidia-container-runtime-hook"] {
            fs::copy(root.join("usr/bin").join(binary), toolkit.join(binary)).unwrap();
        }
        let wrapper = toolkit.join("nvidia-container-runtime");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n\
                 if [ \"$1\" = --version ]; then echo 'NVIDIA Container Runtime 1.17.8 (recording wrapper)'; exit 0; fi\n\
                 echo \"$*\" >> '{}'\n\
                 for a; do [ \"$prev\" = --bundle ] && cp \"$a/config.json\" /tmp/cri-debug-$$.json; prev=$a; done\n\
                 exec '{}' \"$@\"\n",
                record.display(),
                runc.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();

        // The fixture's config on private paths, with a local sandbox image,
        // the native snapshotter (overlayfs may not mount in a sandbox) and
        // no CNI; gpuprov adds the nvidia runtime.
        let at = |name: &str| private.path().join(name).display().to_string();
        let config = root.join("etc/containerd/config.toml");
        let mut doc: toml_edit::DocumentMut = fs::read_to_string(&config).unwrap().parse().unwrap();
        doc["root"] = toml_edit::value(at("root"));
        doc["state"] = toml_edit::value(at("state"));
        doc["grpc"] = toml_edit::table();
        doc["grpc"]["address"] = toml_edit::value("/run/containerd/containerd.sock");
        let cri = &mut doc["plugins"]["io.containerd.grpc.v1.cri"];
        cri["sandbox_image"] = toml_edit::value(IMAGE);
        // The sandbox's -998 OOM score needs CAP_SYS_RESOURCE, which test
        // machines (themselves sandboxes) may lack: containerd's own
        // setting for unprivileged containerd keeps scores at or above its own.
        cri["restrict_oom_score_adj"] = toml_edit::value(true);
        cri["containerd"]["snapshotter"] = toml_edit::value("native");
        cri["cni"] = toml_edit::table();
        cri["cni"]["conf_dir"] = toml_edit::value(at("cni/net.d"));
        cri["cni"]["bin_dir"] = toml_edit::value(at("cni/bin"));
        fs::write(&config, doc.to_string()).unwrap();
        fs::create_dir_all(root.join("run/containerd")).unwrap();

        let usr_local = if toolkit_visible {
            root.join("usr/local")
        } else {
            let empty = private.path().join("empty-usr-local");
            fs::create_dir_all(&empty).unwrap();
            empty
        };
        let supervisor = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind '{run}' /run && mount --bind '{local}' /usr/local || exit 1\n\
                 while [ ! -e '{stop}' ]; do containerd --config '{config}' >> '{log}' 2>&1; done",
                run = root.join("run").display(),
                local = usr_local.display(),
                stop = at("stop"),
                config = config.display(),
                log = at("containerd.log"),
            ))
            .spawn()
            .unwrap();
        let node = Node {
            host,
            private,
            supervisor,
        };
        wait_for_socket(&node.socket(), Duration::from_secs(30), None)
            .unwrap_or_else(|e| panic!("{e}\n{}", node.containerd_log()));

        let image = node.private.path().join("busy.tar");
        super::oci::write_image(
            &image,
            IMAGE,
            &["/bin/sh", "/bin/sleep", "/bin/true"],
            &["/bin/sleep", "infinity"],
        );
        let import = node.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            image.to_str().unwrap(),
        ]);
        assert!(import.status.success(), "ctr images import: {import:?}");
        node
    }

    pub fn root(&self) -> &Path {
        self.host.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.root().join("run/containerd/containerd.sock")
    }

    /// `ctr` in the CRI's namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .unwrap()
    }

    /// The runtime binary's recorded invocations.
    pub fn runtime_calls(&self) -> Vec<String> {
        fs::read_to_string(self.private.path().join("runtime-calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn containerd_log(&self) -> String {
        fs::read_to_string(self.private.path().join("containerd.log")).unwrap_or_default()
    }

    /// The containers containerd still has (sandboxes among them).
    pub fn containers(&self) -> String {
        let listed = self.ctr(&["containers", "ls", "--quiet"]);
        String::from_utf8_lossy(&listed.stdout).trim().to_string()
    }

    /// `gpuprov apply` with `validator` (its keys, indented) added to the
    /// node's spec; the local image and a 60 s timeout unless it sets them.
    /// `gpuprov apply` with `validator` (its keys, indented) added to the
    /// node's spec; the local image and a 60 s timeout unless it sets them.
    pub fn apply(&self, validator: &str) -> (i32, serde_json::Value, String) {
        let spec = self.spec(validator);
        super::apply_config(self.root(), &spec)
    }

    /// The node's spec with `validator` added, as `apply` runs it.
    pub fn spec(&self, validator: &str) -> PathBuf {
        let mut keys = "  repository: gpuprov.test\n  imagePullPolicy: Never\n".to_string();
        if !validator.contains("image:") {
            keys.push_str("  image: busy\n  version: \"1\"\n");
        }
        if !validator.contains("timeoutSeconds:") {
            keys.push_str("  timeoutSeconds: 60\n");
        }
        super::write_spec(
            self.private.path(),
            "node.yaml",
            &format!(
                "containerd:\n  restartMode: signal\n  restartTimeoutSeconds: 30\n\
                 toolkit:\n  installDir: /{TOOLKIT}\n\
                 validator:\n{keys}{validator}"
            ),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::write(self.private.path().join("stop"), "");
        if let Ok(pid) = socket_owner(&self.socket()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.supervisor.wait();
    }
}

fn which(program: &str) -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{program} is installed (scripts/test)"
    );
    PathBuf::from(String::from_utf8(found.stdout).unwrap().trim())
}
