//! `gpuprov revert` after `apply`, for every fixture config: the original
//! comes back byte for byte, containerd restarts only when the file
//! changed, and a file someone edited after gpuprov loses only gpuprov's keys.

mod support;

use support::containerd_restarts;

use std::fs;
use std::path::Path;

use support::{apply_config, apply_json, copy_host, gpuprov, repo};

const CONFIG: &str = "etc/containerd/config.toml";
/// A spec that puts the runtime in a drop-in.
const DROP_IN_SPEC: &str = "toolkit:\n  env:\n    - name: RUNTIME_DROP_IN_CONFIG\n      value: /etc/containerd/conf.d/99-nvidia.toml\n";

fn revert(host: &Path) -> String {
    let output = gpuprov()
        .args(["revert", "--host-exec", "prefix", "--host-root"])
        .arg(host)
        .assert()
        .success()
        .get_output()
        .clone();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn revert_restores_every_fixture_config_byte_for_byte() {
    let mut files: Vec<_> = fs::read_dir(repo().join("fixtures/containerd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            // k0s's placeholder imports the CRI file k0s writes at start,
            // which only its own host has (tests/runtimes.rs).
            !name.starts_with("malformed") && name != "k0s-managed.toml"
        })
        .collect();
    files.sort();
    assert!(files.len() >= 12);
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let host = copy_host("a100-preinstalled");
        let original = fs::read(&file).unwrap();
        fs::write(host.path().join(CONFIG), &original).unwrap();
        // containerd does not start with an import it cannot open: the
        // host has the site file v2-imports.toml names.
        fs::write(
            host.path().join("etc/containerd/site.toml"),
            "version = 2\n",
        )
        .unwrap();
        let (code, _, stderr) = apply_json(host.path(), &[]);
        assert_eq!(code, 0, "{name}: {stderr}");
        let restarted = containerd_restarts(host.path());
        // A config that already had the runtime right was left alone, so
        // there is nothing of gpuprov's in it to revert.
        let edited = fs::read(host.path().join(CONFIG)).unwrap() != original;
        let said = revert(host.path());
        let expected = if edited {
            "byte for byte"
        } else {
            "has not changed its config"
        };
        assert!(said.contains(expected), "{name}: {said}");
        assert_eq!(
            fs::read(host.path().join(CONFIG)).unwrap(),
            original,
            "{name}"
        );
        let unload = usize::from(edited);
        assert_eq!(
            containerd_restarts(host.path()),
            restarted + unload,
            "{name}: a restart only to unload a runtime"
        );
        assert!(
            !host.path().join("var/lib/gpuprov/containerd.json").exists(),
            "{name}"
        );
        assert!(
            !host.path().join("var/lib/gpuprov/backup").exists(),
            "{name}"
        );
        assert!(
            !host
                .path()
                .join("etc/kubernetes/node-feature-discovery/features.d/gpuprov")
                .exists()
        );
        // A second revert has nothing left to do and restarts nothing.
        assert!(revert(host.path()).contains("has not changed its config"));
        assert_eq!(
            containerd_restarts(host.path()),
            restarted + unload,
            "{name}"
        );
    }
}

#[test]
fn revert_removes_a_config_gpuprov_created() {
    let host = copy_host("a100-preinstalled");
    fs::remove_file(host.path().join(CONFIG)).unwrap();
    assert_eq!(apply_json(host.path(), &[]).0, 0);
    assert!(host.path().join(CONFIG).exists());
    assert!(revert(host.path()).contains("gpuprov created it"));
    assert!(!host.path().join(CONFIG).exists());
}

#[test]
fn revert_after_someone_else_edited_keeps_their_edit() {
    let host = copy_host("a100-preinstalled");
    let spec = repo().join("fixtures/specs/containerd-options.yaml");
    assert_eq!(apply_config(host.path(), &spec).0, 0);
    let mut text = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    text.push_str("\n# added by the on-call after gpuprov\n[debug]\n  level = \"debug\"\n");
    fs::write(host.path().join(CONFIG), &text).unwrap();
    let said = revert(host.path());
    assert!(said.contains("removed only runtime `nvidia`"), "{said}");
    let after = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    assert!(
        after.contains("# added by the on-call after gpuprov\n[debug]\n  level = \"debug\"\n"),
        "{after}"
    );
    assert!(!after.contains("nvidia"), "{after}");
    assert!(
        after.contains("default_runtime_name = \"runc\""),
        "the default gpuprov replaced is back:\n{after}"
    );
}

#[test]
fn revert_on_a_node_gpuprov_never_touched_changes_nothing() {
    let host = copy_host("a100-preinstalled");
    let before = support::tree(host.path());
    assert!(revert(host.path()).contains("has not changed its config"));
    assert_eq!(
        support::changed(&before, &support::tree(host.path())),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn drop_in_mode_only_adds_an_import_and_revert_takes_both_back() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let original = fs::read(host.path().join(CONFIG)).unwrap();
    let spec = support::write_spec(host.path(), "spec.yaml", DROP_IN_SPEC);
    let spec = spec.to_str().unwrap();
    assert_eq!(apply_json(host.path(), &["--config", spec]).0, 0);
    let main = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    let original_text = String::from_utf8(original.clone()).unwrap();
    assert_eq!(
        main,
        original_text.replacen(
            "version = 2   # the 1.x schema\n",
            "version = 2   # the 1.x schema\nimports = [\"/etc/containerd/conf.d/99-nvidia.toml\"]\n",
            1
        ),
        "the main config only gains the import"
    );
    let drop_in =
        fs::read_to_string(host.path().join("etc/containerd/conf.d/99-nvidia.toml")).unwrap();
    assert!(
        drop_in.contains("BinaryName = \"/usr/bin/nvidia-container-runtime\""),
        "{drop_in}"
    );
    assert!(
        drop_in.contains("sandbox_image = 'registry.k8s.io/pause:3.9'"),
        "the whole CRI section: {drop_in}"
    );
    assert_eq!(apply_json(host.path(), &["--config", spec]).0, 0);
    assert_eq!(
        containerd_restarts(host.path()),
        1,
        "an unchanged drop-in restarts nothing"
    );

    let output = gpuprov()
        .args([
            "revert",
            "--host-exec",
            "prefix",
            "--config",
            spec,
            "--host-root",
        ])
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(fs::read(host.path().join(CONFIG)).unwrap(), original);
    assert!(
        !host
            .path()
            .join("etc/containerd/conf.d/99-nvidia.toml")
            .exists()
    );
    assert_eq!(containerd_restarts(host.path()), 2);
}

#[test]
fn a_revert_killed_before_its_restart_restarts_containerd_next_time() {
    let host = copy_host("a100-preinstalled");
    let original = fs::read(host.path().join(CONFIG)).unwrap();
    assert_eq!(apply_json(host.path(), &[]).0, 0);
    let restarts = containerd_restarts(host.path());
    // As a revert killed between restoring the config and restarting
    // containerd leaves the node: the original back, the marker written
    // first still there, gpuprov's record not yet removed.
    fs::write(host.path().join(CONFIG), &original).unwrap();
    fs::write(
        host.path()
            .join("var/lib/gpuprov/containerd-restart-pending"),
        "",
    )
    .unwrap();
    revert(host.path());
    assert_eq!(
        containerd_restarts(host.path()),
        restarts + 1,
        "the owed restart happens"
    );
    assert_eq!(fs::read(host.path().join(CONFIG)).unwrap(), original);
    assert!(
        !host
            .path()
            .join("var/lib/gpuprov/containerd-restart-pending")
            .exists()
    );
    // Once paid, it is not owed again.
    revert(host.path());
    assert_eq!(containerd_restarts(host.path()), restarts + 1);
}

#[test]
fn a_drop_in_another_tool_rewrote_is_neither_overwritten_nor_removed() {
    // gpuprov writes its drop-in; the GPU Operator's toolkit (say) then
    // rewrites the same file with its own settings. apply does not put
    // gpuprov's back over it, and revert leaves it where it is.
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let spec = support::write_spec(host.path(), "spec.yaml", DROP_IN_SPEC);
    let spec = spec.to_str().unwrap();
    assert_eq!(apply_json(host.path(), &["--config", spec]).0, 0);
    let drop_in = host.path().join("etc/containerd/conf.d/99-nvidia.toml");
    let theirs = "# written by another tool\nversion = 2\n";
    fs::write(&drop_in, theirs).unwrap();

    let (code, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 3);
    let (_, outcome, reason) = &support::steps(&report)["containerd-runtime"];
    assert_eq!(outcome, "failed", "{reason}");
    assert!(
        reason.contains("/etc/containerd/conf.d/99-nvidia.toml was changed since gpuprov wrote it"),
        "{reason}"
    );
    assert_eq!(fs::read_to_string(&drop_in).unwrap(), theirs);

    let said = revert(host.path());
    assert!(
        said.contains(
            "left /etc/containerd/conf.d/99-nvidia.toml, which was changed since gpuprov wrote it"
        ),
        "{said}"
    );
    assert_eq!(fs::read_to_string(&drop_in).unwrap(), theirs);
}
