//! A DRA node for the tests and the benchmark: a copy of the HGX H100
//! host with the driver's files, NVML answered from a copy of a fixture (a
//! test may change it), the kubelet's plugin registry in place, the fake
//! API server, and `gpuprov run` on it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use serde_json::Value;

use super::daemon::free_port;
use super::fake_api::FakeApi;
use super::{copy_host, repo};

pub const NODE: &str = "gpu-node-1";
pub const DRIVER: &str = "gpu.nvidia.com";
/// DRA, and nothing that waits on pods the fake cluster does not run.
pub const DRA: &str =
    "devicePlugin:\n  mode: dra\ndcgmExporter:\n  enabled: false\nvalidator:\n  enabled: false\n";

/// A node: a copy of the HGX H100 host with the driver's files, NVML
/// answered from a copy of a fixture (a test may change it), the
/// kubelet's plugin registry in place.
pub struct Node {
    host: tempfile::TempDir,
    pub nvml: PathBuf,
    pub spec: PathBuf,
    pub fake: FakeApi,
    pub port: u16,
    pub daemon: Option<Child>,
}

impl Node {
    pub fn new(nvml: &str, spec: &str) -> Node {
        let host = copy_host("h100x8-cdi");
        let copy = host.path().join("fake-nvml.yaml");
        fs::copy(repo().join("fixtures/nvml").join(nvml), &copy).unwrap();
        fs::create_dir_all(host.path().join("var/lib/kubelet/plugins_registry")).unwrap();
        let spec_path = host.path().join("node.yaml");
        fs::write(&spec_path, spec).unwrap();
        Node {
            host,
            nvml: copy,
            spec: spec_path,
            fake: FakeApi::with_node(NODE, &[]),
            port: free_port(),
            daemon: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.host.path()
    }

    pub fn at(&self, host_path: &str) -> PathBuf {
        self.path().join(host_path.trim_start_matches('/'))
    }

    /// `gpuprov run`, converging again every `drift`.
    pub fn start(&mut self, drift: &str) {
        let log = fs::File::create(self.path().join("gpuprov-run.log")).unwrap();
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"))
            .env("GPUPROV_FAKE_NVML", &self.nvml)
            .env(
                "GPUPROV_FAKE_NVML_STATE",
                self.path().join("fake-nvml-state.yaml"),
            )
            .args(["run", "--host-exec", "prefix", "--node-name", NODE])
            .arg("--nvml-lib")
            .arg(super::fake_nvml_library())
            .arg("--config")
            .arg(&self.spec)
            .args(["--drift-interval", drift, "--pending-interval", "1s"])
            .arg("--kubeconfig")
            .arg(self.fake.kubeconfig())
            .arg("--host-root")
            .arg(self.path())
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
    }

    /// `gpuprov <command>` on the node once (no API server unless the
    /// caller names one), NVML answered from its fixture.
    pub fn command(&self, command: &str) -> assert_cmd::Command {
        let mut cmd = super::gpuprov();
        cmd.env("GPUPROV_FAKE_NVML", &self.nvml)
            .args([command, "--host-exec", "prefix", "--nvml-lib"])
            .arg(super::fake_nvml_library())
            .arg("--config")
            .arg(&self.spec)
            .arg("--host-root")
            .arg(self.path());
        cmd
    }

    /// SIGTERM, as the DaemonSet's pod is stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            super::sigterm_and_wait(&mut child, Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.path().join("gpuprov-run.log")).unwrap_or_default()
    }

    /// The node's slices of the driver, as the API server has them.
    pub fn slices(&self) -> Vec<Value> {
        self.fake
            .resource_slices()
            .into_values()
            .filter(|s| s["spec"]["nodeName"] == NODE && s["spec"]["driver"] == DRIVER)
            .collect()
    }

    pub fn only_slice(&self) -> Value {
        let slices = self.slices();
        assert_eq!(slices.len(), 1, "{slices:#?}");
        slices[0].clone()
    }

    pub fn wait_for(&self, what: &str, check: impl FnMut() -> bool) {
        let log = || self.log();
        let mut check = check;
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; gpuprov run said:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn state(&self) -> Option<String> {
        self.fake
            .labels(NODE)
            .get("gpuprov.io/device-plugin")
            .cloned()
    }

    pub fn nvml_fixture(&self) -> Value {
        serde_saphyr::from_str(&fs::read_to_string(&self.nvml).unwrap()).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
