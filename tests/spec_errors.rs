//! Every invalid spec under fixtures/specs/invalid: `apply` exits 1, the
//! error names file:line:col with the message a user needs, and the host is
//! left exactly as it was.

mod support;

use std::path::PathBuf;

use support::{changed, copy_host, gpuprov, repo, tree};

/// file → (line:col, what the message says, a hint it gives)
const EXPECTED: &[(&str, &str, &str, &str)] = &[
    (
        "01-unknown-top-key.yaml",
        "1:1",
        "unknown key `drivers`",
        "did you mean `driver`?",
    ),
    (
        "02-unknown-nested-key.yaml",
        "3:3",
        "unknown key `verison`",
        "did you mean `version`?",
    ),
    (
        "03-enabled-not-a-boolean.yaml",
        "2:12",
        "invalid boolean",
        "maybe",
    ),
    (
        "04-enabled-is-a-list.yaml",
        "2:12",
        "expected a single value here",
        "[true]",
    ),
    (
        "05-driver-version-word.yaml",
        "2:12",
        "driver.version `latest` is not a driver version",
        "535.161.08",
    ),
    (
        "06-driver-version-number.yaml",
        "2:12",
        "driver.version `535` is not a driver version",
        "quote it",
    ),
    (
        "07-env-unknown-name.yaml",
        "3:13",
        "unknown toolkit.env name `CONTAINERD_CONFG`",
        "did you mean `CONTAINERD_CONFIG`?",
    ),
    (
        "08-env-set-as-default-not-boolean.yaml",
        "4:14",
        "CONTAINERD_SET_AS_DEFAULT must be true or false, not `perhaps`",
        "write `true`",
    ),
    (
        "09-env-relative-config-path.yaml",
        "4:14",
        "CONTAINERD_CONFIG must be an absolute path",
        "etc/containerd/config.toml",
    ),
    (
        "10-env-runtime-class-invalid.yaml",
        "4:14",
        "CONTAINERD_RUNTIME_CLASS `NVIDIA_Runtime` may hold only lower-case letters",
        "^^^^",
    ),
    (
        "11-env-set-twice.yaml",
        "5:13",
        "toolkit.env `CONTAINERD_SOCKET` is set twice",
        "- name: CONTAINERD_SOCKET",
    ),
    (
        "12-env-missing-value.yaml",
        "3:7",
        "missing field `value`",
        "CONTAINERD_CONFIG",
    ),
    (
        "13-state-missing-check.yaml",
        "3:5",
        "missing field `check`",
        "apply",
    ),
    (
        "14-state-bad-name.yaml",
        "2:11",
        "state name `Persistence_Mode` may hold only lower-case letters",
        "^^^^",
    ),
    (
        "15-state-defined-twice.yaml",
        "4:11",
        "state `persistence-mode` is defined twice",
        "^^^^",
    ),
    (
        "16-state-shadows-builtin.yaml",
        "2:11",
        "state `driver` is already defined by <embedded states/10-driver.yaml>",
        "^^^^",
    ),
    (
        "17-state-unknown-after.yaml",
        "3:13",
        "runs after `detect-gpus`, which is not defined",
        "did you mean `detect-gpu`?",
    ),
    (
        "18-state-cycle.yaml",
        "6:13",
        "dependency cycle: persistence-mode → fabric-manager → mig-layout → persistence-mode",
        "after: [mig-layout]",
    ),
    ("19-syntax-unclosed-bracket.yaml", "4:10", "':'", "check"),
    (
        "20-top-level-list.yaml",
        "1:1",
        "expected mapping start",
        "- driver",
    ),
    (
        "21-duplicate-key.yaml",
        "3:1",
        "key `driver` appears twice in this mapping",
        "^^^^^^",
    ),
    (
        "22-multiple-documents.yaml",
        "4:1",
        "a second YAML document starts here",
        "driver",
    ),
    (
        "23-state-empty-apply.yaml",
        "4:12",
        "command is empty",
        "apply",
    ),
    (
        "24-env-as-mapping.yaml",
        "3:5",
        "expected sequence start",
        "CONTAINERD_CONFIG",
    ),
    (
        "25-state-self-dependency.yaml",
        "3:13",
        "dependency cycle: persistence-mode → persistence-mode",
        "^^^^",
    ),
    (
        "26-opt-out-label-without-value.yaml",
        "4:20",
        "must be written key=value",
        "example.com/no-persistence",
    ),
    (
        "27-tab-indentation.yaml",
        "2:2",
        "tabs disallowed",
        "enabled",
    ),
    (
        "28-containerd-disagrees-with-env.yaml",
        "4:14",
        "toolkit.env CONTAINERD_CONFIG `/etc/containerd/config.toml` disagrees with containerd.config",
        "(line 6)",
    ),
    (
        "29-containerd-restart-mode.yaml",
        "2:16",
        "must be systemd, signal or none, not `reload`",
        "reload",
    ),
    (
        "30-toolkit-version.yaml",
        "2:12",
        "toolkit.version `latest` is not a package version",
        "1.17.8-1",
    ),
    (
        "31-toolkit-package-manager.yaml",
        "2:19",
        "`apk` is not apt, dnf, yum or zypper",
        "did you mean `apt`?",
    ),
    (
        "32-gfd-mode.yaml",
        "2:9",
        "gfd.mode must be builtin or daemonset, not `sidecar`",
        "sidecar",
    ),
    (
        "33-driver-runfile-without-sha256.yaml",
        "4:5",
        "driver.install with method runfile needs its sha256",
        "gpuprov runs nothing it cannot verify",
    ),
    (
        "34-driver-install-method.yaml",
        "4:13",
        "driver.install.method must be runfile or package, not `dkms`",
        "dkms",
    ),
    (
        "35-driver-upgrade-policy.yaml",
        "2:18",
        "driver.upgradePolicy must be never or ifDifferent, not `always`",
        "always",
    ),
    (
        "36-toolkit-artifact-short-sha256.yaml",
        "5:13",
        "toolkit.artifact.sha256 `12345` is not 64 hex digits",
        "12345",
    ),
    (
        "37-driver-install-without-version.yaml",
        "3:5",
        "driver.install needs driver.version",
        "method: package",
    ),
    (
        "38-operand-pull-policy.yaml",
        "2:20",
        "devicePlugin.imagePullPolicy must be Always, IfNotPresent or Never, not `Sometimes`",
        "Sometimes",
    ),
    (
        "39-device-plugin-mode.yaml",
        "3:9",
        "devicePlugin.mode is not a setting",
        "only gfd has a mode",
    ),
    (
        "40-operands-deploy.yaml",
        "2:11",
        "operands.deploy must be auto, labels or staticPods, not `daemonsets`",
        "daemonsets",
    ),
    (
        "41-validator-timeout-zero.yaml",
        "2:19",
        "validator.timeoutSeconds must be at least 1",
        "timeoutSeconds: 0",
    ),
    (
        "42-operand-version-with-space.yaml",
        "2:12",
        "dcgmExporter.version `3.3.9 latest` is not an image version",
        "3.3.9 latest",
    ),
    (
        "43-operand-env-name.yaml",
        "3:13",
        "gfd.env name `1BAD` is not an environment variable name",
        "1BAD",
    ),
];

#[test]
fn every_invalid_spec_has_an_expectation() {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("fixtures/specs/invalid"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let listed: Vec<&str> = EXPECTED.iter().map(|e| e.0).collect();
    assert_eq!(files, listed);
    assert!(files.len() >= 15);
}

#[test]
fn invalid_specs_name_the_place_and_change_nothing() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let before = tree(host.path());
    for (file, place, message, hint) in EXPECTED {
        let path = format!("fixtures/specs/invalid/{file}");
        let output = gpuprov()
            .args([
                "apply",
                "--host-exec",
                "prefix",
                "--config",
                &path,
                "--host-root",
            ])
            .arg(host.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{file}: {stderr}");
        assert!(stderr.starts_with("error: invalid "), "{file}: {stderr}");
        let located = format!("{path}:{place}: ");
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&located))
            .unwrap_or_else(|| panic!("{file}: no line starting {located:?} in\n{stderr}"));
        assert!(line.contains(message), "{file}: {line:?} lacks {message:?}");
        assert!(stderr.contains(hint), "{file}: no {hint:?} in\n{stderr}");
        assert!(output.stdout.is_empty(), "{file}: printed a report");
    }
    assert_eq!(changed(&before, &tree(host.path())), Vec::<PathBuf>::new());
}

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
