//! `gpuprov run` as a child process against the fake API server, shared by
//! the daemon tests and the fleet benchmark.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::fake_api::FakeApi;

/// A loopback port nothing listens on (for `--listen`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on the daemon's port: the status code and the body.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Waits up to `timeout` for `check` to hold; fails the test naming `what`.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running `gpuprov run`, killed when dropped so a failed test leaves no
/// process behind.
pub struct Daemon(pub Child);

impl Daemon {
    /// Starts `gpuprov run` for `node` on the fixture host at `host_root`,
    /// serving its probes on `port`.
    pub fn spawn(
        fake: &FakeApi,
        node: &str,
        host_root: &Path,
        drift_interval: &str,
        port: u16,
    ) -> Daemon {
        Daemon::spawn_with(fake, node, host_root, drift_interval, port, &[])
    }

    /// `spawn`, with more arguments (`--config <file>`).
    pub fn spawn_with(
        fake: &FakeApi,
        node: &str,
        host_root: &Path,
        drift_interval: &str,
        port: u16,
        more: &[&std::ffi::OsStr],
    ) -> Daemon {
        let fixture = super::repo().join("fixtures/nvml/a100.yaml");
        Daemon::spawn_raw(
            fake,
            node,
            host_root,
            drift_interval,
            port,
            more,
            &fixture,
            &[],
        )
    }

    /// `gpuprov run --config spec`, NVML answered by the fake library from
    /// `fixture`, with `env` set; drift checked every 5 minutes, so a
    /// converged node is left alone.
    pub fn spawn_nvml(
        fake: &FakeApi,
        node: &str,
        host_root: &Path,
        port: u16,
        spec: &Path,
        fixture: &Path,
        env: &[(&str, &Path)],
    ) -> Daemon {
        let nvml = super::fake_nvml_library();
        let more = [
            "--nvml-lib".as_ref(),
            nvml.as_os_str(),
            "--config".as_ref(),
            spec.as_os_str(),
        ];
        Daemon::spawn_raw(fake, node, host_root, "5m", port, &more, fixture, env)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_raw(
        fake: &FakeApi,
        node: &str,
        host_root: &Path,
        drift_interval: &str,
        port: u16,
        more: &[&std::ffi::OsStr],
        fixture: &Path,
        env: &[(&str, &Path)],
    ) -> Daemon {
        let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"));
        command.env("GPUPROV_FAKE_NVML", fixture);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .args(["run", "--host-exec", "prefix", "--node-name", node])
            .args(more)
            .args(["--drift-interval", drift_interval])
            // Operands starting are checked on again every second.
            .args(["--pending-interval", "1s"])
            .arg("--kubeconfig")
            .arg(fake.kubeconfig())
            .arg("--host-root")
            .arg(host_root)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `gpuprov <args>` for `node` against `fake` on the fixture host at
/// `host`, NVML answered from the A100 fixture, no input, no output.
#[allow(dead_code)]
pub fn against(fake: &FakeApi, node: &str, args: &[&str], host: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("gpuprov"));
    command
        .args(args)
        .args(["--host-exec", "prefix", "--node-name", node])
        .arg("--kubeconfig")
        .arg(fake.kubeconfig())
        .arg("--host-root")
        .arg(host)
        .env_remove("KUBECONFIG")
        .env(
            "GPUPROV_FAKE_NVML",
            super::repo().join("fixtures/nvml/a100.yaml"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// `gpuprov run` against `fake` for `seconds` on a copy of the A100
/// fixture host, its log to `log` (when given), then SIGTERM: its own
/// peak RSS (KiB; the commands it ran, a containerd stand-in it
/// restarted, are not gpuprov).
#[allow(dead_code)]
pub fn run_for(fake: &FakeApi, node: &str, seconds: u64, log: Option<&Path>) -> u64 {
    let host = super::copy_host("a100-preinstalled");
    let port = free_port().to_string();
    let mut command = against(
        fake,
        node,
        &["run", "--listen", &format!("127.0.0.1:{port}")],
        host.path(),
    );
    if let Some(log) = log {
        command.stderr(std::fs::File::create(log).unwrap());
    }
    let mut child = command.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(seconds));
    let peak = super::own_peak_rss(child.id());
    super::sigterm_and_wait(&mut child, Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    peak
}

/// Makes the kubelet's pod-resources socket under `host` one that accepts
/// every connection and never answers (a hung kubelet).
#[allow(dead_code)]
pub fn silent_kubelet(host: &Path) {
    let socket = host.join("var/lib/kubelet/pod-resources/kubelet.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
}
