//! The container-toolkit and containerd-runtime states through `apply` on
//! copies of fixture hosts (fake package managers, systemctl and containerd
//! in the host root): install, edit, backup, restart only on change, an
//! owed restart after a crash, and bad configs left untouched.

mod support;

use support::containerd_restarts;

use std::fs;

use support::{apply_config, apply_json, copy_host, repo, steps, write_spec};

const CONFIG: &str = "etc/containerd/config.toml";

#[test]
fn containerd_restarts_once_for_a_change_and_never_for_none() {
    let host = copy_host("a100-preinstalled");
    let original = fs::read(host.path().join(CONFIG)).unwrap();
    let (code, report, stderr) = apply_json(host.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    let runtime = &steps(&report)["containerd-runtime"];
    assert_eq!(
        (runtime.0.as_str(), runtime.1.as_str()),
        ("change", "configured")
    );
    assert_eq!(containerd_restarts(host.path()), 1);
    let config = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    assert!(config.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nvidia]"));
    assert_eq!(
        fs::read(
            host.path()
                .join("var/lib/gpuprov/backup/etc/containerd/config.toml")
        )
        .unwrap(),
        original,
        "the original is backed up byte for byte"
    );
    assert!(
        !host
            .path()
            .join("var/lib/gpuprov/containerd-restart-pending")
            .exists()
    );

    for _ in 0..2 {
        let (code, report, _) = apply_json(host.path(), &[]);
        assert_eq!(code, 0);
        assert_eq!(steps(&report)["containerd-runtime"].0, "unchanged");
    }
    assert_eq!(
        containerd_restarts(host.path()),
        1,
        "an unchanged config restarts nothing"
    );
}

#[test]
fn a_restart_owed_from_an_interrupted_run_happens_on_the_next() {
    let host = copy_host("a100-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "containerd:\n  restartTimeoutSeconds: 1\n",
    );
    let spec = spec.to_str().unwrap();
    // containerd does not come back: the restart is owed.
    fs::remove_file(host.path().join("usr/bin/containerd")).unwrap();
    let (code, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 3);
    let runtime = &steps(&report)["containerd-runtime"];
    assert_eq!(runtime.1, "failed");
    assert!(runtime.2.contains("nothing answered on"), "{}", runtime.2);
    assert!(
        host.path()
            .join("var/lib/gpuprov/containerd-restart-pending")
            .exists()
    );
    let written = fs::read(host.path().join(CONFIG)).unwrap();

    // containerd is back; the file is already right, but the restart is still owed.
    fs::copy(
        repo().join("fixtures/hosts/a100-preinstalled/usr/bin/containerd"),
        host.path().join("usr/bin/containerd"),
    )
    .unwrap();
    let (code, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 0);
    assert_eq!(steps(&report)["containerd-runtime"].0, "change");
    assert_eq!(containerd_restarts(host.path()), 2);
    assert_eq!(
        fs::read(host.path().join(CONFIG)).unwrap(),
        written,
        "the file was not rewritten"
    );
    assert!(
        !host
            .path()
            .join("var/lib/gpuprov/containerd-restart-pending")
            .exists()
    );
}

#[test]
fn a_malformed_config_fails_the_step_and_is_left_untouched() {
    let host = copy_host("a100-preinstalled");
    let broken =
        fs::read_to_string(repo().join("fixtures/containerd/malformed-unclosed-table.toml"))
            .unwrap();
    fs::write(host.path().join(CONFIG), &broken).unwrap();
    let (code, report, _) = apply_json(host.path(), &[]);
    assert_eq!(code, 3);
    let runtime = &steps(&report)["containerd-runtime"];
    assert_eq!(runtime.1, "failed");
    assert!(
        runtime
            .2
            .starts_with("/etc/containerd/config.toml:3:48: unclosed table"),
        "{}",
        runtime.2
    );
    assert_eq!(
        fs::read_to_string(host.path().join(CONFIG)).unwrap(),
        broken
    );
    assert_eq!(containerd_restarts(host.path()), 0);
    assert!(!host.path().join("var/lib/gpuprov/backup").exists());
}

#[test]
fn the_toolkit_is_installed_pinned_and_then_reported_installed() {
    let host = copy_host("rtx-with-audio");
    let spec = write_spec(host.path(), "spec.yaml", "toolkit:\n  version: 1.17.8-1\n");
    let spec = spec.to_str().unwrap();
    let (code, report, stderr) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(steps(&report)["container-toolkit"].1, "installed");
    let log = fs::read_to_string(host.path().join("var/log/fake-apt-get.log")).unwrap();
    for package in [
        "nvidia-container-toolkit=1.17.8-1",
        "nvidia-container-toolkit-base=1.17.8-1",
        "libnvidia-container-tools=1.17.8-1",
        "libnvidia-container1=1.17.8-1",
    ] {
        assert!(log.contains(package), "{package} not pinned: {log}");
    }
    // No config existed: one is created as containerd 1.6 wants it (version 2).
    let config = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    assert!(config.starts_with("version = 2\n"), "{config}");
    let (_, report, _) = apply_json(host.path(), &["--config", spec]);
    let toolkit = &steps(&report)["container-toolkit"];
    assert_eq!(
        (toolkit.0.as_str(), toolkit.1.as_str()),
        ("unchanged", "installed")
    );
    assert_eq!(log.lines().filter(|l| l.contains("install")).count(), 1);
}

#[test]
fn a_preinstalled_toolkit_that_is_missing_blocks_containerd_and_says_why() {
    let host = copy_host("rtx-with-audio");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        &fs::read_to_string(repo().join("fixtures/specs/preinstalled-driver-and-toolkit.yaml"))
            .unwrap(),
    );
    let (code, report, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 3);
    let steps = steps(&report);
    assert_eq!(steps["container-toolkit"].1, "absent");
    assert!(
        steps["container-toolkit"]
            .2
            .contains("toolkit.enabled is false")
    );
    assert_eq!(steps["containerd-runtime"].1, "blocked");
    assert!(
        steps["containerd-runtime"]
            .2
            .starts_with("container toolkit is absent: "),
        "{}",
        steps["containerd-runtime"].2
    );
    assert!(!host.path().join(CONFIG).exists());
    assert!(
        !host.path().join("var/log/fake-apt-get.log").exists(),
        "nothing was installed"
    );
}

#[test]
fn the_seeds_containerd_options_make_nvidia_the_default_runtime() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let spec = repo().join("fixtures/specs/containerd-options.yaml");
    let (code, _, _) = apply_config(host.path(), &spec);
    assert_eq!(code, 0);
    let config = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    assert!(
        config
            .contains("    default_runtime_name = \"nvidia\"   # do not change without a ticket\n"),
        "the value changed, its comment stayed:\n{config}"
    );
}

#[test]
fn restart_mode_none_changes_the_file_and_leaves_containerd_alone() {
    let host = copy_host("a100-preinstalled");
    let spec = write_spec(
        host.path(),
        "spec.yaml",
        "toolkit:\n  env:\n    - name: RUNTIME_RESTART_MODE\n      value: none\n",
    );
    let spec = spec.to_str().unwrap();
    let (code, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(code, 0);
    assert!(
        steps(&report)["containerd-runtime"]
            .2
            .contains("loads the runtime at its next restart")
    );
    assert_eq!(containerd_restarts(host.path()), 0);
    let (_, report, _) = apply_json(host.path(), &["--config", spec]);
    assert_eq!(steps(&report)["containerd-runtime"].0, "unchanged");
}

#[test]
fn the_toolkit_opt_out_label_skips_toolkit_and_containerd() {
    let host = copy_host("a100-preinstalled");
    let (code, report, _) = apply_json(
        host.path(),
        &[
            "--node-labels",
            "nvidia.com/gpu.deploy.container-toolkit=false",
        ],
    );
    assert_eq!(code, 0);
    let steps = steps(&report);
    assert_eq!(steps["container-toolkit"].1, "opted-out");
    assert_eq!(steps["containerd-runtime"].1, "opted-out");
    assert_eq!(containerd_restarts(host.path()), 0);
}

#[test]
fn a_missing_config_is_created_as_containerd_2_wants_it() {
    let host = copy_host("gh200-preinstalled");
    fs::remove_file(host.path().join(CONFIG)).unwrap();
    let (code, _, stderr) = apply_json(host.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    let config = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    assert!(config.starts_with("version = 3\n"), "{config}");
    assert!(
        config.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nvidia]"),
        "{config}"
    );
}

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn a_version_1_config_on_containerd_2_gets_a_version_3_drop_in_it_imports() {
    // containerd 2 takes a version-1 file's CRI tables nowhere (checked
    // with containerd 2.1.9; the fixture's fake dump does the same). Kind's
    // 2019 config on a containerd 2 host: gpuprov writes the runtime into a
    // version-3 drop-in, imports it, says why, and revert undoes both.
    let host = copy_host("gh200-preinstalled");
    let original = fs::read_to_string(
        repo().join("../shared/realworld/containerd/05-kind-node-image-2019-v1.toml"),
    )
    .unwrap();
    fs::write(host.path().join(CONFIG), &original).unwrap();
    let drop_in = host
        .path()
        .join("etc/containerd/conf.d/gpuprov-runtime.toml");

    let plan = support::gpuprov()
        .args(["plan", "--host-exec", "prefix", "--host-root"])
        .arg(host.path())
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("+imports = [\"/etc/containerd/conf.d/gpuprov-runtime.toml\"]"),
        "{plan}"
    );
    assert!(plan.contains("io.containerd.cri.v1.runtime"), "{plan}");
    assert!(!drop_in.exists(), "plan changes nothing");

    let (code, report, stderr) = apply_json(host.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    let runtime = &steps(&report)["containerd-runtime"];
    assert_eq!(runtime.1, "configured", "{}", runtime.2);
    assert!(
        runtime.2.contains("ignores the CRI tables"),
        "{}",
        runtime.2
    );
    let section = fs::read_to_string(&drop_in).unwrap();
    assert!(section.contains("version = 3\n"), "{section}");
    assert!(
        section.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nvidia]"),
        "{section}"
    );
    let main = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    assert_eq!(
        main.replace(
            "imports = [\"/etc/containerd/conf.d/gpuprov-runtime.toml\"]\n",
            ""
        ),
        original,
        "the main file only gains the import"
    );
    let (_, report, _) = apply_json(host.path(), &[]);
    assert_eq!(steps(&report)["containerd-runtime"].0, "unchanged");

    let out = support::gpuprov()
        .args(["revert", "--host-exec", "prefix", "--host-root"])
        .arg(host.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(host.path().join(CONFIG)).unwrap(),
        original
    );
    assert!(!drop_in.exists());
}

#[test]
fn a_foreign_file_at_the_default_drop_in_is_not_replaced() {
    let host = copy_host("gh200-preinstalled");
    let original =
        "[plugins.cri.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n";
    fs::write(host.path().join(CONFIG), original).unwrap();
    let drop_in = host
        .path()
        .join("etc/containerd/conf.d/gpuprov-runtime.toml");
    fs::create_dir_all(drop_in.parent().unwrap()).unwrap();
    fs::write(&drop_in, "# someone's\n").unwrap();
    let (code, report, _) = apply_json(host.path(), &[]);
    assert_ne!(code, 0);
    let runtime = &steps(&report)["containerd-runtime"];
    assert!(
        runtime.2.contains("gpuprov did not write it"),
        "{}",
        runtime.2
    );
    assert_eq!(fs::read_to_string(&drop_in).unwrap(), "# someone's\n");
    assert_eq!(
        fs::read_to_string(host.path().join(CONFIG)).unwrap(),
        original
    );
}

#[test]
fn an_import_that_takes_the_runtime_back_fails_the_step_and_is_named() {
    // A site file in conf.d, loaded after the main config (Talos, and
    // many fleets, keep their settings there), replaces containerd 1.x's
    // CRI section with one without the runtime. With a containerd binary
    // its own dump shows it; without one gpuprov merges the files by the
    // same rules. Either way the step fails, naming the file that wins.
    for with_binary in [true, false] {
        let host = copy_host("a100-preinstalled");
        let config = host.path().join(CONFIG);
        let original = fs::read_to_string(&config).unwrap();
        fs::write(
            &config,
            format!("imports = [\"/etc/containerd/conf.d/*.toml\"]\n{original}"),
        )
        .unwrap();
        fs::create_dir_all(host.path().join("etc/containerd/conf.d")).unwrap();
        fs::write(
            host.path().join("etc/containerd/conf.d/99-site.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"runc\"\n",
        )
        .unwrap();
        if !with_binary {
            fs::remove_file(host.path().join("usr/bin/containerd")).unwrap();
        }
        let (code, report, stderr) = apply_json(host.path(), &[]);
        let runtime = &steps(&report)["containerd-runtime"];
        assert_eq!(runtime.1, "failed", "binary {with_binary}: {}", runtime.2);
        assert_ne!(code, 0, "{stderr}");
        assert!(
            runtime.2.contains(
                "(/etc/containerd/conf.d/99-site.toml wins: containerd loads it after /etc/containerd/config.toml"
            ),
            "binary {with_binary}: {}",
            runtime.2
        );
        assert!(
            runtime.2.contains("containerd.runtimes has no `nvidia`"),
            "binary {with_binary}: {}",
            runtime.2
        );
        if !with_binary {
            assert!(
                runtime.2.contains("merged as containerd 1.x does"),
                "{}",
                runtime.2
            );
        }
        assert_eq!(containerd_restarts(host.path()), 0, "not restarted into it");
        // The restart it owes waits for the view, too.
        let (_, report, _) = apply_json(host.path(), &[]);
        assert_eq!(steps(&report)["containerd-runtime"].1, "failed");
        assert_eq!(containerd_restarts(host.path()), 0, "not restarted into it");
        if !with_binary {
            continue;
        }

        // Taken out of the site file, the runtime is in effect.
        fs::remove_file(host.path().join("etc/containerd/conf.d/99-site.toml")).unwrap();
        let (code, report, stderr) = apply_json(host.path(), &[]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(steps(&report)["containerd-runtime"].1, "configured");
        assert_eq!(containerd_restarts(host.path()), 1);
    }
}

#[test]
fn containerd_2_merges_an_import_key_by_key_so_only_a_key_it_sets_wins() {
    // containerd 2 merges imported files key by key (checked with 2.1.9):
    // a site file that sets another key of the CRI runtime plugin leaves
    // gpuprov's runtime in effect; one that sets the default back wins
    // that key alone. Asked of the host's containerd and, without one,
    // merged by gpuprov: the same verdicts. (The runtime goes into the
    // config itself here, `edit: config`: a drop-in of gpuprov's in the
    // imported directory would sort after the site file and win.)
    for with_binary in [true, false] {
        for (site, verdict) in [
            (
                "[plugins.\"io.containerd.cri.v1.runtime\"]\n  enable_selinux = false\n",
                "configured",
            ),
            (
                "[plugins.\"io.containerd.cri.v1.runtime\".containerd]\n  default_runtime_name = \"runc\"\n",
                "failed",
            ),
        ] {
            let host = copy_host("gh200-preinstalled");
            let config = host.path().join(CONFIG);
            let original = fs::read_to_string(&config).unwrap();
            fs::write(
                &config,
                original.replacen(
                    "version = 3\n",
                    "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n",
                    1,
                ),
            )
            .unwrap();
            fs::create_dir_all(host.path().join("etc/containerd/conf.d")).unwrap();
            fs::write(
                host.path().join("etc/containerd/conf.d/99-site.toml"),
                format!("version = 3\n{site}"),
            )
            .unwrap();
            if !with_binary {
                fs::remove_file(host.path().join("usr/bin/containerd")).unwrap();
            }
            // nvidia the default runtime; containerd not restarted (there
            // is none to restart without the binary).
            let spec = host.path().join("spec.yaml");
            fs::write(
                &spec,
                "toolkit:\n  env:\n  - name: CONTAINERD_SET_AS_DEFAULT\n    value: \"true\"\ncontainerd:\n  restartMode: none\n  edit: config\n",
            )
            .unwrap();
            let (_, report, stderr) =
                apply_json(host.path(), &["--config", spec.to_str().unwrap()]);
            let runtime = &steps(&report)["containerd-runtime"];
            assert_eq!(
                runtime.1, verdict,
                "binary {with_binary}, site {site:?}: {} {stderr}",
                runtime.2
            );
            if verdict == "failed" {
                assert!(
                    runtime
                        .2
                        .contains("(/etc/containerd/conf.d/99-site.toml wins"),
                    "binary {with_binary}: {}",
                    runtime.2
                );
                assert!(
                    runtime.2.contains("default_runtime_name"),
                    "binary {with_binary}: {}",
                    runtime.2
                );
            }
        }
    }
}

/// The runc table containerd 2 adds to its view of every config (`config
/// dump` shows it whether or not the file has one), with its defaults.
const RUNC_DEFAULTS_V3: &str = "\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\nruntime_type = 'io.containerd.runc.v2'\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\nSystemdCgroup = false\n";

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn a_config_whose_default_is_the_gpu_runtime_already_is_converged() {
    // Amazon's EKS AL2023 GPU image: `nvidia` is the default, with systemd
    // cgroups; containerd's view adds a `runc` with its default `false`.
    // Pods run `nvidia`, so that runc says nothing about the kubelet's
    // cgroup driver: converged, the file untouched.
    let host = copy_host("l4x4-570");
    let eks = fs::read_to_string(
        repo().join("../shared/realworld/containerd/02-eks-al2023-nodeadm-nvidia-v3.toml"),
    )
    .unwrap();
    let view = format!("{eks}{RUNC_DEFAULTS_V3}");
    fs::write(host.path().join(CONFIG), &view).unwrap();
    let spec = write_spec(host.path(), "spec.yaml", "cdi:\n  enabled: false\n");
    let (_, report, stderr) = apply_config(host.path(), &spec);
    let runtime = &steps(&report)["containerd-runtime"];
    // (The fixture's driver files are listings: NVML's steps fail, and
    // only the containerd step is this test's.)
    assert_eq!(runtime.1, "preinstalled", "{}\n{stderr}", runtime.2);
    assert_eq!(fs::read_to_string(host.path().join(CONFIG)).unwrap(), view);
    assert_eq!(containerd_restarts(host.path()), 0);
}

#[test]
fn the_cgroup_driver_is_compared_with_the_default_runtime() {
    // crun is the default, with systemd cgroups; containerd's runc has its
    // default `false`. gpuprov's runtime copies crun's settings and is
    // checked against crun, which pods get, not against runc.
    let host = copy_host("l4x4-570");
    let crun = "version = 3\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd]\ndefault_runtime_name = 'crun'\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun]\nruntime_type = 'io.containerd.runc.v2'\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun.options]\nBinaryName = '/usr/bin/crun'\nSystemdCgroup = true\n";
    fs::write(
        host.path().join(CONFIG),
        format!("{crun}{RUNC_DEFAULTS_V3}"),
    )
    .unwrap();
    let spec = write_spec(host.path(), "spec.yaml", "cdi:\n  enabled: false\n");
    let (_, report, stderr) = apply_config(host.path(), &spec);
    let runtime = &steps(&report)["containerd-runtime"];
    assert_eq!(runtime.1, "configured", "{}\n{stderr}", runtime.2);
    let config = fs::read_to_string(host.path().join(CONFIG)).unwrap();
    let nvidia = config
        .split("runtimes.nvidia.options]")
        .nth(1)
        .expect("an nvidia runtime");
    assert!(nvidia.contains("SystemdCgroup = true"), "{config}");
}
