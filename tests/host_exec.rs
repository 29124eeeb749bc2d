//! The chroot mode runs a state's commands inside the host root for real:
//! a minimal root with only a shell and its libraries, as a node image has.

mod support;

use std::fs;

use support::{apply_config, install_shell, steps, write_spec};

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "chroot needs root: run as root (CI and scripts/test do)"
)]
fn chroot_mode_runs_exec_states_inside_the_host_root() {
    let host = tempfile::tempdir().unwrap();
    install_shell(host.path());
    fs::create_dir_all(host.path().join("var/lib")).unwrap();
    // What makes a root a host: sysfs's PCI bus (here without a GPU) and procfs.
    fs::create_dir_all(host.path().join("sys/bus/pci/devices")).unwrap();
    fs::create_dir_all(host.path().join("proc")).unwrap();
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        r#"states:
  - name: inside
    check: '[ -e /var/lib/marker ] && [ "$GPUPROV_HOST_ROOT" = / ]'
    apply: 'echo "$GPUPROV_HOST_ROOT" > /var/lib/marker'
"#,
    );
    let output = support::gpuprov()
        .args([
            "apply",
            "--output",
            "json",
            "--host-exec",
            "chroot",
            "--config",
        ])
        .arg(&spec)
        .arg("--host-root")
        .arg(host.path())
        .assert()
        .success()
        .get_output()
        .clone();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(steps(&report)["inside"].1, "configured");
    assert_eq!(
        fs::read_to_string(host.path().join("var/lib/marker")).unwrap(),
        "/\n",
        "the command ran chrooted, writing the root's own /var/lib"
    );
    // In prefix mode the same root is not `/` to the command.
    let check_only = write_spec(
        host.path(),
        "check-only.yaml",
        "states:\n  - name: inside\n    check: '[ \"$GPUPROV_HOST_ROOT\" = / ]'\n",
    );
    let (code, report, _) = apply_config(host.path(), &check_only);
    assert_eq!(code, 3);
    assert_eq!(steps(&report)["inside"].1, "failed");
}
