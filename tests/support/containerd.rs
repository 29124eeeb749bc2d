//! Debian's real containerd (installed by scripts/test) started on private
//! paths, so that a test touches nothing of the machine's, and its `ctr`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::daemon::eventually;

/// A containerd serving on a socket in a temporary directory, stopped when
/// dropped.
pub struct PrivateContainerd {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl PrivateContainerd {
    /// Starts containerd with `extra` (TOML: plugin tables) appended to a
    /// version-2 config whose root, state and sockets are private.
    pub fn start(extra: &str) -> PrivateContainerd {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).display().to_string();
        let config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             [grpc]\n  address = {grpc:?}\n[ttrpc]\n  address = {ttrpc:?}\n\
             [debug]\n  address = {debug:?}\n{extra}\n",
            root = at("root"),
            state = at("state"),
            grpc = at("c.sock"),
            ttrpc = at("c.sock.ttrpc"),
            debug = at("debug.sock"),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd is installed (scripts/test installs Debian's package)");
        let socket = dir.path().join("c.sock");
        let mut containerd = PrivateContainerd { child, dir, socket };
        eventually(
            "containerd to answer on its socket",
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = containerd.child.try_wait() {
                    panic!("containerd exited ({status}):\n{}", containerd.log());
                }
                containerd.ctr(&["version"]).status.success()
            },
        );
        containerd
    }

    /// Runs `ctr` against this containerd in the namespace `gpuprov-test`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "gpuprov-test"])
            .args(args)
            .output()
            .expect("ctr is installed with containerd")
    }

    /// What containerd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
