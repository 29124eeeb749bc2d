//! A real CDI consumer: Debian's podman (installed by scripts/test)
//! resolves CDI device names from spec files and writes their edits into
//! a container's OCI spec. The specs a fixture host holds name host paths
//! of that host; they are rooted at its copy (as `nvidia-ctk cdi transform
//! root` does for a driver root) and their device nodes, plain files
//! there, are backed by /dev/null. podman runs in a private mount
//! namespace with its own /run (where it looks for specs) and storage
//! under a temporary directory. In this sandbox runc then fails to set the
//! container's rlimits (EPERM), so the container never starts; the OCI
//! spec it was given is what comes back.

use std::fs;
use std::path::Path;

use serde_json::Value;

/// The OCI spec podman gives a container asking for `devices` (CDI
/// names), from the spec files `specs` of the host at `root`.
pub fn oci_spec(root: &Path, specs: &[&Path], devices: &[&str]) -> Value {
    assert!(
        std::process::Command::new("podman")
            .arg("--version")
            .output()
            .is_ok(),
        "podman is missing: scripts/test installs Debian's package"
    );
    let shown_root = root.display().to_string();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cdi");
    fs::create_dir_all(&dir).unwrap();
    for file in specs {
        let mut rooted = String::new();
        for line in fs::read_to_string(file).unwrap().lines() {
            let indent = &line[..line.len() - line.trim_start().len()];
            match line.trim_start() {
                l if l.trim_start_matches("- ").starts_with("hostPath: /") => rooted.push_str(
                    &line.replacen("hostPath: /", &format!("hostPath: {shown_root}/"), 1),
                ),
                l if l.starts_with("path: /usr/bin/") => {
                    rooted.push_str(&line.replacen("path: /", &format!("path: {shown_root}/"), 1))
                }
                l if l.starts_with("- path: /dev/") => {
                    rooted.push_str(line);
                    rooted.push_str(&format!("\n{indent}  hostPath: /dev/null"));
                }
                _ => rooted.push_str(line),
            }
            rooted.push('\n');
        }
        fs::write(dir.join(file.file_name().unwrap()), rooted).unwrap();
    }
    for sub in ["rootfs", "storage", "run"] {
        fs::create_dir_all(work.path().join(sub)).unwrap();
    }
    let w = work.path().display();
    let asked: String = devices.iter().map(|d| format!(" --device {d}")).collect();
    let script = format!(
        "set -e\n\
         mount -t tmpfs tmpfs /run\n\
         mkdir -p /run/cdi\n\
         mount --bind {w}/cdi /run/cdi\n\
         p() {{ podman --root {w}/storage --runroot {w}/run --storage-driver vfs --cgroup-manager cgroupfs --events-backend none \"$@\"; }}\n\
         id=$(p create{asked} --rootfs {w}/rootfs /none)\n\
         p init \"$id\" >&2 || echo \"podman init: exit $?\" >&2\n\
         cat {w}/storage/vfs-containers/$id/userdata/config.json\n\
         p rm -f \"$id\" >/dev/null 2>&1 || true\n"
    );
    let output = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("unresolvable CDI devices"), "{stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no OCI spec ({e}); podman said:\n{stderr}"))
}
