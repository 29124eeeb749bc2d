//! Every runtime layout a GPU node runs, through the binary on fixture
//! hosts: containerd 2.3's version-4 config and 2.2's default (both import
//! conf.d), k3s and RKE2 (a config they write again at every start), an
//! older k3s (its template), k0s (its own drop-in directory) and Talos
//! (read-only). Each: `plan` names the file and why, `apply` writes it and
//! restarts the right service once, a second `apply` writes and restarts
//! nothing, drift is repaired, and `revert` leaves the host as it was.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use support::{apply_json, changed, copy_host, gpuprov, steps, tree};

/// One flavour's expectations.
struct Layout {
    host: &'static str,
    /// The file gpuprov writes (relative to the root).
    written: &'static str,
    /// The `systemctl` call that makes the runtime take the change.
    service: &'static str,
    /// The runtime's config directory: nothing else there changes.
    dir: &'static str,
    /// Words the plan must say about where and why.
    plan_says: &'static [&'static str],
}

const LAYOUTS: &[Layout] = &[
    Layout {
        host: "l4x4-containerd23",
        dir: "etc/containerd",
        written: "etc/containerd/conf.d/gpuprov-runtime.toml",
        service: "restart containerd",
        plan_says: &[
            "imports \"/etc/containerd/conf.d/*.toml\"",
            "containerd 2.3 and later merges imports key by key",
        ],
    },
    Layout {
        host: "l4x4-containerd22",
        dir: "etc/containerd",
        written: "etc/containerd/conf.d/gpuprov-runtime.toml",
        service: "restart containerd",
        plan_says: &["containerd 2.0-2.2 merges imports key by key"],
    },
    Layout {
        host: "l4x4-k3s",
        dir: "var/lib/rancher/k3s/agent/etc/containerd",
        written: "var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.d/gpuprov-runtime.toml",
        service: "restart k3s",
        plan_says: &["k3s (", "config-v3.toml.d/*.toml"],
    },
    Layout {
        host: "l4x4-rke2",
        dir: "var/lib/rancher/rke2/agent/etc/containerd",
        written: "var/lib/rancher/rke2/agent/etc/containerd/config-v3.toml.d/gpuprov-runtime.toml",
        service: "restart rke2-agent",
        plan_says: &["rke2 (", "config-v3.toml.d/*.toml"],
    },
    Layout {
        host: "l4x4-k3s-v2",
        dir: "var/lib/rancher/k3s/agent/etc/containerd",
        written: "var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
        service: "restart k3s",
        plan_says: &["imports no drop-in directory"],
    },
    Layout {
        host: "l4x4-k0s",
        dir: "etc/k0s",
        written: "etc/k0s/containerd.d/gpuprov-runtime.toml",
        service: "restart k0sworker",
        plan_says: &["k0s reads /etc/k0s/containerd.d/*.toml"],
    },
    Layout {
        host: "l4x4-crio",
        dir: "etc/crio",
        written: "etc/crio/crio.conf.d/99-nvidia.toml",
        service: "reload crio",
        plan_says: &[
            "CRI-O (/usr/bin/crio exists and no containerd)",
            "copied from CRI-O's default runtime `crun`",
            "systemctl reload crio",
        ],
    },
];

/// How often `systemctl <call>` ran (`restart k3s`, `reload crio`).
fn restarts(host: &Path, call: &str) -> usize {
    let call = if call.contains(' ') {
        call.to_string()
    } else {
        format!("restart {call}")
    };
    fs::read_to_string(host.join("var/log/fake-systemctl.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == call)
        .count()
}

fn runtime_step(host: &Path) -> (i32, (String, String, String)) {
    let (code, report, stderr) = apply_json(host, &[]);
    let step = steps(&report)
        .remove("containerd-runtime")
        .unwrap_or_else(|| panic!("no containerd-runtime step: {stderr}"));
    (code, step)
}

fn plan_text(host: &Path) -> String {
    let output = gpuprov()
        .args(["plan", "--host-exec", "prefix", "--host-root"])
        .arg(host)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The files under the layout's config directory, by path (directories
/// left out: an empty one gpuprov made holds nothing).
fn runtime_files(root: &Path, layout: &Layout) -> BTreeMap<PathBuf, Vec<u8>> {
    tree(root)
        .into_iter()
        .filter(|(path, state)| {
            path.starts_with(layout.dir) && !root.join(path).is_dir() && state.link.is_none()
        })
        .map(|(path, state)| (path, state.bytes))
        .collect()
}

/// What k3s and RKE2 do at a restart: the config written from the
/// template. Only that and gpuprov's file may differ from `before`.
fn only_the_edit(
    root: &Path,
    layout: &Layout,
    before: &BTreeMap<PathBuf, Vec<u8>>,
) -> Vec<PathBuf> {
    let now = runtime_files(root, layout);
    let generated = Path::new(layout.dir).join("config.toml");
    now.keys()
        .chain(before.keys())
        .filter(|p| now.get(*p) != before.get(*p))
        .filter(|p| **p != Path::new(layout.written))
        .filter(|p| !(layout.written.ends_with(".tmpl") && **p == generated))
        .cloned()
        .collect()
}

#[test]
fn every_layout_converges_once_repairs_drift_and_reverts() {
    for layout in LAYOUTS {
        let host = copy_host(layout.host);
        let root = host.path();
        let before = tree(root);
        let files_before = runtime_files(root, layout);

        let plan = plan_text(root);
        assert!(
            plan.contains(layout.written.trim_start_matches('/')),
            "{}: plan names {}:\n{plan}",
            layout.host,
            layout.written
        );
        for words in layout.plan_says {
            assert!(
                plan.contains(words),
                "{}: plan says {words:?}:\n{plan}",
                layout.host
            );
        }
        assert!(
            changed(&before, &tree(root)).is_empty(),
            "{}: plan wrote",
            layout.host
        );

        let (_, step) = runtime_step(root);
        assert_eq!(
            (step.0.as_str(), step.1.as_str()),
            ("change", "configured"),
            "{}: {}",
            layout.host,
            step.2
        );
        let written = fs::read_to_string(root.join(layout.written)).unwrap();
        assert!(
            written.contains("runtimes.nvidia")
                && written.contains("/usr/bin/nvidia-container-runtime"),
            "{}: {written}",
            layout.host
        );
        assert_eq!(restarts(root, layout.service), 1, "{}", layout.host);
        // Nothing else of the runtime's is touched: the config itself (or
        // the one k3s generates) stays byte for byte.
        let untouched = only_the_edit(root, layout, &files_before);
        assert!(
            untouched.is_empty(),
            "{}: also changed {untouched:?}",
            layout.host
        );

        // Converged: no write, no restart.
        let settled = tree(root);
        let (_, step) = runtime_step(root);
        assert_eq!(step.0, "unchanged", "{}: {}", layout.host, step.2);
        assert_eq!(restarts(root, layout.service), 1, "{}", layout.host);
        assert_eq!(
            fs::read(root.join(layout.written)).unwrap(),
            settled[Path::new(layout.written)].bytes,
            "{}",
            layout.host
        );

        // Drift: the file goes; the next run writes it again and restarts.
        fs::remove_file(root.join(layout.written)).unwrap();
        let (_, step) = runtime_step(root);
        assert_eq!(step.0, "change", "{}: {}", layout.host, step.2);
        assert_eq!(
            fs::read_to_string(root.join(layout.written)).unwrap(),
            written
        );
        assert_eq!(restarts(root, layout.service), 2, "{}", layout.host);

        // Revert: the file is gone, the service restarted once more, and
        // the runtime's files are as they were.
        let output = gpuprov()
            .args(["revert", "--host-exec", "prefix", "--host-root"])
            .arg(root)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}: {:?}", layout.host, output);
        assert!(!root.join(layout.written).exists(), "{}", layout.host);
        assert_eq!(restarts(root, layout.service), 3, "{}", layout.host);
        let left = only_the_edit(root, layout, &files_before);
        assert!(left.is_empty(), "{}: left {left:?}", layout.host);
    }
}

fn write_spec(root: &Path, yaml: &str) -> String {
    let path = root.join("spec.yaml");
    fs::write(&path, yaml).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn an_nvidia_runtime_k3s_made_itself_is_converged_as_it_is() {
    // k3s adds an `nvidia` runtime when it finds nvidia-container-runtime
    // at start (its ExtraRuntimes): nothing to write, nothing to restart.
    let host = copy_host("l4x4-k3s");
    let root = host.path();
    let generated = root.join("var/lib/rancher/k3s/agent/etc/containerd/config.toml");
    let mut text = fs::read_to_string(&generated).unwrap();
    text.push_str("\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'nvidia']\n  runtime_type = \"io.containerd.runc.v2\"\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'nvidia'.options]\n  BinaryName = \"/usr/bin/nvidia-container-runtime\"\n  SystemdCgroup = true\n");
    fs::write(&generated, &text).unwrap();
    let before = tree(root);
    for _ in 0..2 {
        let (_, step) = runtime_step(root);
        assert_eq!(step.1, "preinstalled", "{}", step.2);
        assert!(
            step.2.contains("already in containerd's view"),
            "{}",
            step.2
        );
    }
    assert_eq!(restarts(root, "k3s"), 0);
    let touched: Vec<_> = changed(&before, &tree(root))
        .into_iter()
        .filter(|p| p.starts_with("var/lib/rancher"))
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
}

#[test]
fn the_toolkits_own_drop_in_is_converged_and_left_alone() {
    // NVIDIA's toolkit (1.18 and later) writes conf.d/99-nvidia.toml and
    // leaves the main file alone: gpuprov adds nothing beside it.
    let host = copy_host("l4x4-containerd23");
    let root = host.path();
    fs::create_dir_all(root.join("etc/containerd/conf.d")).unwrap();
    fs::write(
        root.join("etc/containerd/conf.d/99-nvidia.toml"),
        "version = 4\n\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nvidia]\n  runtime_type = \"io.containerd.runc.v2\"\n\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nvidia.options]\n  BinaryName = \"/usr/bin/nvidia-container-runtime\"\n  SystemdCgroup = false\n",
    )
    .unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "preinstalled", "{}", step.2);
    assert!(
        !root
            .join("etc/containerd/conf.d/gpuprov-runtime.toml")
            .exists()
    );
    assert_eq!(restarts(root, "containerd"), 0);
}

#[test]
fn a_drop_in_never_has_a_higher_version_than_the_main_config() {
    // containerd 2.3 with a version-3 main file (written for 2.2): the
    // drop-in is version 3 too, which 2.3 loads.
    let host = copy_host("l4x4-containerd23");
    let root = host.path();
    let config = root.join("etc/containerd/config.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replacen("version = 4", "version = 3", 1)).unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "configured", "{}", step.2);
    let drop_in =
        fs::read_to_string(root.join("etc/containerd/conf.d/gpuprov-runtime.toml")).unwrap();
    assert!(drop_in.contains("\nversion = 3\n"), "{drop_in}");

    // A site drop-in with a higher version than the main file: containerd
    // 2.3 would refuse to start, and gpuprov says so (its own merge, with
    // no binary to ask) rather than restart it into that.
    let host = copy_host("l4x4-containerd23");
    let root = host.path();
    let config = root.join("etc/containerd/config.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replacen("version = 4", "version = 3", 1)).unwrap();
    fs::create_dir_all(root.join("etc/containerd/conf.d")).unwrap();
    fs::write(
        root.join("etc/containerd/conf.d/50-site.toml"),
        "version = 4\n[plugins.\"io.containerd.cri.v1.runtime\"]\n  enable_selinux = false\n",
    )
    .unwrap();
    fs::remove_file(root.join("usr/bin/containerd")).unwrap();
    let spec = write_spec(root, "containerd:\n  restartMode: none\n");
    let (_, report, _) = apply_json(root, &["--config", &spec]);
    let step = &steps(&report)["containerd-runtime"];
    assert_eq!(step.1, "failed", "{}", step.2);
    assert!(
        step.2.contains("/etc/containerd/conf.d/50-site.toml has `version = 4`, higher than /etc/containerd/config.toml's `version = 3`"),
        "{}",
        step.2
    );
}

#[test]
fn a_version_1_config_under_containerd_2_3_is_refused_with_the_way_out() {
    let host = copy_host("l4x4-containerd23");
    let root = host.path();
    let config = root.join("etc/containerd/config.toml");
    let original = "[plugins.cri.containerd]\n  snapshotter = \"overlayfs\"\n";
    fs::write(&config, original).unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "failed", "{}", step.2);
    assert!(step.2.contains("containerd config migrate"), "{}", step.2);
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
    assert!(!root.join("etc/containerd/conf.d").exists());
    assert_eq!(restarts(root, "containerd"), 0);
}

#[test]
fn a_version_4_config_is_edited_in_place_when_asked_byte_for_byte() {
    let host = copy_host("l4x4-containerd23");
    let root = host.path();
    let config = root.join("etc/containerd/config.toml");
    let original = fs::read_to_string(&config).unwrap();
    let spec = write_spec(root, "containerd:\n  edit: config\n");
    let (_, report, stderr) = apply_json(root, &["--config", &spec]);
    let step = &steps(&report)["containerd-runtime"];
    assert_eq!(step.1, "configured", "{} {stderr}", step.2);
    assert!(step.2.contains("containerd.edit is config"), "{}", step.2);
    let edited = fs::read_to_string(&config).unwrap();
    assert!(edited.starts_with("version = 4\n"));
    assert!(edited.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.nvidia]"));
    // Every line of the original is still there, in order.
    let mut lines = edited.lines();
    for line in original.lines() {
        assert!(lines.any(|l| l == line), "lost {line:?}");
    }
    assert!(!root.join("etc/containerd/conf.d").exists(), "never both");
    gpuprov()
        .args(["revert", "--host-exec", "prefix", "--host-root"])
        .arg(root)
        .assert()
        .success();
    assert_eq!(fs::read_to_string(&config).unwrap(), original);
}

#[test]
fn talos_is_never_written_and_names_what_to_set() {
    let host = copy_host("l4x4-talos");
    let root = host.path();
    let before = tree(root);
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "absent", "{}", step.2);
    assert!(
        step.2.contains("/etc/cri/conf.d/20-customization.part"),
        "{}",
        step.2
    );
    let touched: Vec<_> = changed(&before, &tree(root))
        .into_iter()
        .filter(|p| p.starts_with("etc/cri"))
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
}

#[test]
fn facts_and_the_spec_name_the_flavour() {
    let output = gpuprov()
        .args(["facts", "--host-root"])
        .arg(support::repo().join("fixtures/hosts/l4x4-rke2"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("runtime: containerd, rke2 (/var/lib/rancher/rke2/agent/etc/containerd/config.toml exists (rke2 generates it)); config /var/lib/rancher/rke2/agent/etc/containerd/config.toml, socket /run/k3s/containerd/containerd.sock, restarted by rke2-agent"),
        "{text}"
    );
    // Forced: a flavour the host does not look like is taken at its word,
    // and a wrong name is an error naming the place.
    let host = copy_host("l4x4-570");
    let spec = write_spec(host.path(), "containerd:\n  flavor: talos\n");
    let (_, step) = {
        let (code, report, _) = apply_json(host.path(), &["--config", &spec]);
        (code, steps(&report)["containerd-runtime"].clone())
    };
    assert_eq!(step.1, "absent", "{}", step.2);
    assert!(
        step.2.contains("containerd.flavor in the spec"),
        "{}",
        step.2
    );
    let spec = write_spec(host.path(), "containerd:\n  flavor: k8s\n");
    let output = gpuprov()
        .args([
            "plan",
            "--host-exec",
            "prefix",
            "--config",
            &spec,
            "--host-root",
        ])
        .arg(host.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("containerd.flavor must be auto, containerd, k3s, rke2, k0s, talos, bottlerocket, not `k8s`"),
        "{stderr}"
    );
}

#[test]
fn crio_copies_its_default_runtime_and_sets_default_and_cdi_when_asked() {
    let host = copy_host("l4x4-crio");
    let root = host.path();
    let spec = write_spec(
        root,
        "toolkit:\n  env:\n  - name: CONTAINERD_SET_AS_DEFAULT\n    value: \"true\"\ncdi:\n  enabled: true\n  specDir: /var/run/cdi-gpuprov\n",
    );
    let (_, report, stderr) = apply_json(root, &["--config", &spec]);
    let step = &steps(&report)["containerd-runtime"];
    assert_eq!(step.1, "configured", "{} {stderr}", step.2);
    let drop_in = fs::read_to_string(root.join("etc/crio/crio.conf.d/99-nvidia.toml")).unwrap();
    for line in [
        "default_runtime = \"nvidia\"",
        "cdi_spec_dirs = [\"/etc/cdi\", \"/var/run/cdi\", \"/var/run/cdi-gpuprov\"]",
        "[crio.runtime.runtimes.nvidia]",
        "runtime_path = \"/usr/bin/nvidia-container-runtime\"",
        "runtime_type = \"oci\"",
        "monitor_path = \"/usr/libexec/crio/conmon\"",
        "runtime_root = \"/run/crun\"",
    ] {
        assert!(drop_in.contains(line), "{line} in:\n{drop_in}");
    }
    // CRI-O's own files are never written.
    for file in ["etc/crio/crio.conf", "etc/crio/crio.conf.d/10-crio.conf"] {
        assert_eq!(
            fs::read(root.join(file)).unwrap(),
            fs::read(support::repo().join("fixtures/hosts/l4x4-crio").join(file)).unwrap()
        );
    }
    // An older CRI-O takes runtimes only at start: restarted, not reloaded.
    let host = copy_host("l4x4-crio");
    let root = host.path();
    let crio = fs::read_to_string(root.join("usr/bin/crio")).unwrap();
    fs::write(root.join("usr/bin/crio"), crio.replace("1.36.3", "1.27.1")).unwrap();
    let spec = write_spec(root, "containerd:\n  restartTimeoutSeconds: 1\n");
    let (_, report, _) = apply_json(root, &["--config", &spec]);
    let step = &steps(&report)["containerd-runtime"];
    // (The fixture's systemctl starts no CRI-O: gpuprov waits for its
    // socket, and says so.)
    assert!(
        step.2.contains("nothing answered on") && step.2.contains("crio.sock"),
        "{}",
        step.2
    );
    assert_eq!(restarts(root, "restart crio"), 1);
    assert_eq!(restarts(root, "reload crio"), 0);
    // ... and a CRI-O before 1.31 defaults to runc: copied from there.
    let drop_in = fs::read_to_string(root.join("etc/crio/crio.conf.d/99-nvidia.toml")).unwrap();
    assert!(
        drop_in.contains("runtime_root = \"/run/crun\""),
        "10-crio.conf names crun as default: {drop_in}"
    );
}

#[test]
fn crio_leaves_another_tools_drop_in_and_a_later_file_that_takes_it_back_is_named() {
    // NVIDIA's toolkit wrote 99-nvidia.toml with the runtime already.
    let host = copy_host("l4x4-crio");
    let root = host.path();
    let theirs = "[crio.runtime.runtimes.nvidia]\nruntime_path = \"/usr/bin/nvidia-container-runtime\"\nruntime_type = \"oci\"\n";
    fs::write(root.join("etc/crio/crio.conf.d/99-nvidia.toml"), theirs).unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "preinstalled", "{}", step.2);
    assert_eq!(
        fs::read_to_string(root.join("etc/crio/crio.conf.d/99-nvidia.toml")).unwrap(),
        theirs
    );
    assert_eq!(restarts(root, "reload crio"), 0);

    // Another tool's file there with something else: not overwritten.
    let host = copy_host("l4x4-crio");
    let root = host.path();
    let other = "[crio.runtime.runtimes.nvidia]\nruntime_path = \"/opt/other/runtime\"\n";
    fs::write(root.join("etc/crio/crio.conf.d/99-nvidia.toml"), other).unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "failed", "{}", step.2);
    assert!(
        step.2.contains("exists and gpuprov did not write it"),
        "{}",
        step.2
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/crio/crio.conf.d/99-nvidia.toml")).unwrap(),
        other
    );

    // A drop-in sorting after gpuprov's that replaces the runtime table.
    let host = copy_host("l4x4-crio");
    let root = host.path();
    fs::write(
        root.join("etc/crio/crio.conf.d/99-zz-site.conf"),
        "[crio.runtime.runtimes.nvidia]\nruntime_path = \"/usr/bin/runc\"\n",
    )
    .unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "failed", "{}", step.2);
    assert!(step.2.contains("takes it back"), "{}", step.2);
    assert!(!root.join("etc/crio/crio.conf.d/99-nvidia.toml").exists());
}

#[test]
fn a_malformed_crio_file_is_named_with_its_place_and_nothing_is_written() {
    let host = copy_host("l4x4-crio");
    let root = host.path();
    fs::write(
        root.join("etc/crio/crio.conf.d/20-bad.conf"),
        "[crio.runtime\nx = 1\n",
    )
    .unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "failed", "{}", step.2);
    assert!(
        step.2.contains("/etc/crio/crio.conf.d/20-bad.conf:1:"),
        "{}",
        step.2
    );
    assert!(!root.join("etc/crio/crio.conf.d/99-nvidia.toml").exists());
}

#[test]
fn crio_is_not_reloaded_into_a_config_its_own_view_refuses() {
    // `crio config` is asked after the write and before the reload: a
    // CRI-O that cannot load its files is not reloaded into them.
    let host = copy_host("l4x4-crio");
    let root = host.path();
    let crio = fs::read_to_string(root.join("usr/bin/crio")).unwrap();
    fs::write(
        root.join("usr/bin/crio"),
        crio.replace(
            "    config) exec python3",
            "    config) echo 'unknown runtime_type \"oci\" for handler' >&2; exit 1; exec python3",
        ),
    )
    .unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "failed", "{}", step.2);
    assert!(
        step.2
            .contains("`/usr/bin/crio config` cannot load CRI-O's config"),
        "{}",
        step.2
    );
    assert_eq!(restarts(root, "reload crio"), 0);
}

#[test]
fn the_validators_cri_mode_talks_to_crios_socket() {
    let host = copy_host("l4x4-crio");
    let root = host.path();
    let spec = write_spec(root, "validator:\n  mode: cri\n");
    let (_, report, stderr) = apply_json(root, &["--config", &spec]);
    let step = &steps(&report)["validator"];
    assert_eq!(step.1, "failed", "{} {stderr}", step.2);
    assert!(
        step.2
            .contains("CRI socket /var/run/crio/crio.sock is not there"),
        "{}",
        step.2
    );
}

#[test]
fn bottlerocket_and_crio_are_told_apart_by_what_the_host_has() {
    // Bottlerocket: os-release; never written, its settings named.
    let host = copy_host("l4x4-570");
    let root = host.path();
    fs::write(
        root.join("etc/os-release"),
        "NAME=Bottlerocket\nID=bottlerocket\nVERSION_ID=1.40.0\n",
    )
    .unwrap();
    let config = fs::read(root.join("etc/containerd/config.toml")).unwrap();
    let (_, step) = runtime_step(root);
    assert_eq!(step.1, "absent", "{}", step.2);
    assert!(
        step.2
            .contains("bottlerocket (/etc/os-release says ID=bottlerocket)"),
        "{}",
        step.2
    );
    assert!(step.2.contains("NVIDIA variants"), "{}", step.2);
    assert_eq!(
        fs::read(root.join("etc/containerd/config.toml")).unwrap(),
        config
    );
    assert_eq!(restarts(root, "containerd"), 0);

    // CRI-O: facts say so, with its files and socket.
    let output = gpuprov()
        .args(["facts", "--host-root"])
        .arg(support::repo().join("fixtures/hosts/l4x4-crio"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("runtime: CRI-O (/usr/bin/crio exists and no containerd); config /etc/crio/crio.conf, drop-ins /etc/crio/crio.conf.d, socket /var/run/crio/crio.sock"),
        "{text}"
    );
}

#[test]
fn a_link_where_a_drop_in_goes_is_never_written_through() {
    for (host, drop_in) in [
        ("l4x4-crio", "etc/crio/crio.conf.d/99-nvidia.toml"),
        (
            "l4x4-k3s",
            "var/lib/rancher/k3s/agent/etc/containerd/config-v3.toml.d/gpuprov-runtime.toml",
        ),
        (
            "l4x4-containerd23",
            "etc/containerd/conf.d/gpuprov-runtime.toml",
        ),
    ] {
        let copy = copy_host(host);
        let root = copy.path();
        fs::create_dir_all(root.join(drop_in).parent().unwrap()).unwrap();
        fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", root.join(drop_in)).unwrap();
        let (_, step) = runtime_step(root);
        assert_eq!(step.1, "failed", "{host}: {}", step.2);
        assert!(
            step.2.contains("symlink") || step.2.contains("link"),
            "{host}: {}",
            step.2
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/shadow")).unwrap(),
            "root:*:19000:0:99999:7:::\n",
            "{host}"
        );
        assert!(
            fs::symlink_metadata(root.join(drop_in))
                .unwrap()
                .file_type()
                .is_symlink()
        );

        // The drop-in's directory a link to /etc: nothing written there.
        let copy = copy_host(host);
        let root = copy.path();
        let dir = Path::new(drop_in).parent().unwrap();
        if root.join(dir).exists() {
            fs::remove_dir_all(root.join(dir)).unwrap();
        }
        std::os::unix::fs::symlink("/etc", root.join(dir)).unwrap();
        let (_, step) = runtime_step(root);
        assert_eq!(step.1, "failed", "{host}: {}", step.2);
        assert!(
            step.2
                .contains("gpuprov does not write its drop-in through a link"),
            "{host}: {}",
            step.2
        );
        let name = Path::new(drop_in).file_name().unwrap();
        assert!(!root.join("etc").join(name).exists(), "{host}");
    }
}
