//! Spec and flag errors outside the bad-input corpus (tests/bad_inputs.rs
//! runs every invalid spec in fixtures/bad/spec): a spec that cannot be
//! read, and bad node labels and flags.

mod support;

use support::gpuprov;

#[test]
fn spec_file_that_cannot_be_read_is_named() {
    let output = gpuprov()
        .args([
            "plan",
            "--config",
            "fixtures/specs/no-such-spec.yaml",
            "--host-root",
            "fixtures/hosts/no-gpu",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error: cannot read spec fixtures/specs/no-such-spec.yaml"),
        "{stderr}"
    );
    assert!(
        stderr.contains("caused by: No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn bad_node_labels_and_flags_are_errors() {
    let output = gpuprov()
        .args([
            "plan",
            "--node-labels",
            "nvidia.com/gpu.deploy.driver",
            "--host-root",
            "fixtures/hosts/no-gpu",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("`nvidia.com/gpu.deploy.driver` is not key=value")
    );
    let output = gpuprov()
        .args(["plan", "--output", "yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "usage errors exit 1 too");
    let output = gpuprov()
        .args(["plan", "--host-root", "fixtures/hosts/no-such-host"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("fixtures/hosts/no-such-host"));
}
