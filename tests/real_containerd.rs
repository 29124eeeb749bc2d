//! Debian's real containerd (1.6, installed by scripts/test) loads every
//! version-2 config gpuprov edits: its CRI plugin's startup log shows the
//! nvidia runtime with the right type, BinaryName and options, and the
//! default runtime as configured.

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use gpuprov::containerd::config::{
    DefaultRuntime, Layout, RuntimeWanted, configure, default_runtime_name, layout, parse,
};
use support::repo;

const BINARY: &str = "/usr/bin/nvidia-container-runtime";

/// Every version-2 config among the fixtures and the real-world files.
fn v2_configs() -> Vec<PathBuf> {
    configs(|version, layout| version == 2 && layout == Layout::V2)
}

/// The configs among the fixtures and the real-world files whose version
/// and layout `keep` accepts.
fn configs(keep: impl Fn(i64, Layout) -> bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["fixtures/containerd", "../shared/realworld/containerd"] {
        for entry in fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let Ok(doc) = parse(&text) else { continue };
            if path.extension().is_some_and(|e| e == "toml")
                && layout(&doc).is_ok_and(|(version, layout)| keep(version, layout))
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The edited config, pointed at private paths so this containerd touches
/// nothing of the machine's.
fn private_config(edited: &str, dir: &Path) -> String {
    let mut doc = parse(edited).unwrap();
    let at = |name: &str| dir.join(name).display().to_string();
    doc["root"] = toml_edit::value(at("root"));
    doc["state"] = toml_edit::value(at("state"));
    for (table, socket) in [
        ("grpc", "c.sock"),
        ("ttrpc", "c.sock.ttrpc"),
        ("debug", "debug.sock"),
    ] {
        if doc.get(table).is_none() {
            doc[table] = toml_edit::table();
        }
        doc[table]["address"] = toml_edit::value(at(socket));
    }
    // Imports name the machine's files; a test loads only what it wrote.
    doc.remove("imports");
    doc.to_string()
}

/// Starts containerd on `config` and returns its "Start cri plugin with
/// config" log line, then stops it.
fn cri_config_line(config: &Path) -> String {
    let mut child = Command::new("containerd")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("containerd is installed (scripts/test installs Debian's package)");
    let stderr = child.stderr.take().unwrap();
    let (found, line) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = Vec::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if l.contains("Start cri plugin with config") {
                let _ = found.send(Ok(l));
                return;
            }
            log.push(l);
        }
        let _ = found.send(Err(log.join("\n")));
    });
    let result = line.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    match result {
        Ok(Ok(line)) => line,
        Ok(Err(log)) => panic!("containerd exited without starting CRI:\n{log}"),
        Err(_) => panic!("containerd did not start CRI within 30s"),
    }
}

/// The `nvidia:{…}` entry of the logged runtimes map.
fn runtime_entry<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!("Runtimes:map[{name}:{{"))
        .or_else(|| line.find(&format!(" {name}:{{")))
        .unwrap_or_else(|| panic!("no runtime {name} in {line}"));
    let rest = &line[start..];
    &rest[..rest.find("NetworkPluginMaxConfNum").unwrap_or(rest.len())]
}

#[test]
#[cfg_attr(
    not(all(gpuprov_root, gpuprov_realworld)),
    ignore = "containerd needs root, and the configs the real-world corpus beside the repository (CI has both)"
)]
fn real_containerd_loads_every_edited_version_2_config() {
    let files = v2_configs();
    assert!(files.len() >= 15, "{files:?}");
    for (i, file) in files.iter().enumerate() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let original = fs::read_to_string(file).unwrap();
        let default = if i % 2 == 0 {
            DefaultRuntime::Set
        } else {
            DefaultRuntime::Keep
        };
        let wanted = RuntimeWanted {
            class: "nvidia".into(),
            binary: BINARY.into(),
            default,
            cdi: None,
        };
        let edited = configure(&original, &wanted, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, private_config(&edited.text, dir.path())).unwrap();
        let line = cri_config_line(&config);

        let nvidia = runtime_entry(&line, "nvidia");
        assert!(
            nvidia.contains("Type:io.containerd.runc.v2"),
            "{name}: {nvidia}"
        );
        assert!(
            nvidia.contains(&format!("BinaryName:{BINARY}")),
            "{name}: {nvidia}"
        );
        let base_systemd = edited
            .copied_from
            .as_deref()
            .map(|base| runtime_entry(&line, base).contains("SystemdCgroup:true"));
        if base_systemd == Some(true) {
            assert!(
                nvidia.contains("SystemdCgroup:true"),
                "{name}: SystemdCgroup not carried: {nvidia}"
            );
        }
        let expected_default = match default {
            DefaultRuntime::Set => "nvidia".to_string(),
            _ => default_runtime_name(&original)
                .unwrap()
                .unwrap_or_else(|| "runc".into()),
        };
        assert!(
            line.contains(&format!("DefaultRuntimeName:{expected_default} ")),
            "{name}: the default runtime is not {expected_default}"
        );
    }
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "containerd needs root: run as root (CI and scripts/test do)"
)]
fn a_config_gpuprov_creates_for_containerd_1_6_keeps_its_runc() {
    // An empty config on containerd 1.x: the `runtimes` table gpuprov
    // writes replaces containerd's built-in one, so it holds runc too;
    // without it the CRI plugin does not start.
    for default in [DefaultRuntime::Keep, DefaultRuntime::Set] {
        let wanted = RuntimeWanted {
            class: "nvidia".into(),
            binary: BINARY.into(),
            default,
            cdi: None,
        };
        let edited = configure("", &wanted, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, private_config(&edited.text, dir.path())).unwrap();
        let line = cri_config_line(&config);
        assert!(
            runtime_entry(&line, "nvidia").contains(&format!("BinaryName:{BINARY}")),
            "{line}"
        );
    }
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "containerd needs root: run as root (CI and scripts/test do)"
)]
fn signal_mode_restarts_a_real_containerd_under_its_supervisor() {
    use gpuprov::host::socket::{socket_owner, wait_for_socket};

    let host = support::copy_host("a100-preinstalled");
    let root = host.path();
    let private = tempfile::tempdir().unwrap();
    // containerd serves the socket the spec names, inside the host root.
    let socket = root.join("run/containerd/containerd.sock");
    fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let original = fs::read_to_string(repo().join("fixtures/containerd/v2-default.toml")).unwrap();
    let mut doc = parse(&private_config(&original, private.path())).unwrap();
    doc["grpc"]["address"] = toml_edit::value(socket.display().to_string());
    fs::write(root.join("etc/containerd/config.toml"), doc.to_string()).unwrap();

    // The service manager: start containerd again whenever it exits.
    let log = private.path().join("containerd.log");
    let stop = private.path().join("stop");
    let supervisor = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e '{}' ]; do containerd --config '{}' >> '{}' 2>&1; done",
            stop.display(),
            root.join("etc/containerd/config.toml").display(),
            log.display()
        ))
        .spawn()
        .unwrap();
    wait_for_socket(&socket, Duration::from_secs(30), None).unwrap();
    let before = socket_owner(&socket).unwrap();

    let spec = support::write_spec(
        root,
        "spec.yaml",
        // This containerd has no nvidia runtime binary to run containers
        // with (tests/cri_validation.rs has one): the host is validated.
        "containerd:\n  restartMode: signal\n  restartTimeoutSeconds: 30\nvalidator:\n  mode: host\n",
    );
    let (code, report, stderr) = support::apply_json(root, &["--config", spec.to_str().unwrap()]);
    let after = socket_owner(&socket);

    fs::write(&stop, "").unwrap();
    if let Ok(pid) = after {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let mut supervisor = supervisor;
    let _ = supervisor.wait();

    assert_eq!(code, 0, "{stderr}");
    assert_eq!(support::steps(&report)["containerd-runtime"].0, "change");
    assert_ne!(after.unwrap(), before, "a new containerd serves the socket");
    let log = fs::read_to_string(&log).unwrap();
    let starts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Start cri plugin with config"))
        .collect();
    assert_eq!(starts.len(), 2, "started, then restarted once");
    assert!(
        !starts[0].contains(" nvidia:{"),
        "the first containerd had no nvidia runtime"
    );
    assert!(runtime_entry(starts[1], "nvidia").contains(&format!("BinaryName:{BINARY}")));
}

#[test]
#[cfg_attr(
    not(gpuprov_root),
    ignore = "containerd needs root: run as root (CI and scripts/test do)"
)]
fn real_containerd_loads_the_runtime_from_a_drop_in() {
    use gpuprov::containerd::config::{add_import, drop_in};

    for name in [
        "v2-systemd-cgroup.toml",
        "v2-registry-mirrors.toml",
        "v2-imports.toml",
    ] {
        let original = fs::read_to_string(repo().join("fixtures/containerd").join(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let drop_in_path = dir.path().join("conf.d/99-nvidia.toml");
        fs::create_dir_all(drop_in_path.parent().unwrap()).unwrap();
        let wanted = RuntimeWanted {
            class: "nvidia".into(),
            binary: BINARY.into(),
            default: DefaultRuntime::Keep,
            cdi: None,
        };
        let edited = configure(&original, &wanted, 2).unwrap();
        fs::write(&drop_in_path, drop_in(&edited.text).unwrap()).unwrap();
        // The main config as gpuprov leaves it: untouched but for the import.
        let mut main = private_config(&original, dir.path());
        main = add_import(&main, &drop_in_path.display().to_string(), 2).unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, &main).unwrap();
        assert!(
            !main.contains("nvidia-container-runtime"),
            "{name}: the main config has no runtime"
        );

        let line = cri_config_line(&config);
        let nvidia = runtime_entry(&line, "nvidia");
        assert!(
            nvidia.contains(&format!("BinaryName:{BINARY}")),
            "{name}: {nvidia}"
        );
        // The whole section came along: runc keeps its settings too.
        let runc_systemd = runtime_entry(&line, "runc").contains("SystemdCgroup:true");
        assert_eq!(
            nvidia.contains("SystemdCgroup:true"),
            runc_systemd,
            "{name}: {line}"
        );
    }
}

/// `containerd --config <file> config dump` with Debian's real containerd.
fn real_dump(config: &Path) -> String {
    let output = Command::new("containerd")
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .expect("scripts/test installs Debian's containerd");
    assert!(
        output.status.success(),
        "{}: {}",
        config.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn containerds_own_view_of_every_edited_config_has_the_runtime() {
    // Every config real containerd 1.6 reads (versions 1 and 2), edited
    // as gpuprov edits it, then dumped by containerd itself: the view
    // gpuprov verifies on a node.
    let files: Vec<(PathBuf, String)> =
        configs(|version, layout| version == 1 || layout == Layout::V2)
            .into_iter()
            .map(|path| {
                let text = fs::read_to_string(&path).unwrap();
                (path, text)
            })
            .collect();
    assert!(files.len() >= 15, "{} configs", files.len());
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for default in [DefaultRuntime::Clear, DefaultRuntime::Set] {
            let wanted = RuntimeWanted {
                class: "nvidia".into(),
                binary: BINARY.into(),
                default,
                cdi: None,
            };
            let edited = configure(text, &wanted, 2).unwrap();
            let file = dir.path().join(&name);
            fs::write(&file, private_config(&edited.text, dir.path())).unwrap();
            let dump = real_dump(&file);
            if let Err(why) =
                gpuprov::containerd::effective::check(&dump, &wanted, "containerd's view")
            {
                panic!("{name} ({default:?}): {why}");
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(all(gpuprov_root, gpuprov_realworld)),
    ignore = "containerd needs root, and the configs the real-world corpus beside the repository (CI has both)"
)]
fn a_legacy_default_runtime_table_no_longer_wins_over_the_nvidia_default() {
    // Kind's 2019 node image: containerd 1.x makes a `default_runtime`
    // table with a runtime_type the default, whatever default_runtime_name
    // says. The check catches the unedited table; gpuprov's edit empties
    // the type, and real containerd then runs pods on nvidia.
    let original = fs::read_to_string(
        repo().join("../shared/realworld/containerd/05-kind-node-image-2019-v1.toml"),
    )
    .unwrap();
    let wanted = RuntimeWanted {
        class: "nvidia".into(),
        binary: BINARY.into(),
        default: DefaultRuntime::Set,
        cdi: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");

    // Only default_runtime_name set, as before: containerd's view says the
    // legacy table wins.
    let mut naive = parse(&original).unwrap();
    naive["plugins"]["cri"]["containerd"]["default_runtime_name"] = toml_edit::value("nvidia");
    naive["plugins"]["cri"]["containerd"]["runtimes"]["nvidia"]["runtime_type"] =
        toml_edit::value("io.containerd.runc.v2");
    naive["plugins"]["cri"]["containerd"]["runtimes"]["nvidia"]["options"]["BinaryName"] =
        toml_edit::value(BINARY);
    fs::write(&file, private_config(&naive.to_string(), dir.path())).unwrap();
    let why =
        gpuprov::containerd::effective::check(&real_dump(&file), &wanted, "view").unwrap_err();
    assert!(why.contains("default_runtime.runtime_type is \"io.containerd.runc.v2\": containerd 1.x makes that table the default"), "{why}");
    assert!(cri_config_line(&file).contains("DefaultRuntimeName:default "));

    let edited = configure(&original, &wanted, 2).unwrap();
    assert!(
        edited
            .notes
            .iter()
            .any(|n| n.contains("legacy `default_runtime` table has runtime_type = \"\"")),
        "{:?}",
        edited.notes
    );
    // Every comment of the original is still there.
    for comment in original.lines().filter(|l| l.trim_start().starts_with('#')) {
        assert!(edited.text.contains(comment), "lost {comment:?}");
    }
    fs::write(&file, private_config(&edited.text, dir.path())).unwrap();
    gpuprov::containerd::effective::check(&real_dump(&file), &wanted, "view").unwrap();
    let line = cri_config_line(&file);
    assert!(line.contains("DefaultRuntimeName:nvidia "), "{line}");
    assert!(
        runtime_entry(&line, "nvidia").contains(&format!("BinaryName:{BINARY}")),
        "{line}"
    );

    // Taken out again from a file someone changed since (no byte-for-byte
    // restore): the legacy table's type comes back.
    let changed = format!("{}\n# changed by hand\n", edited.text);
    let reverted =
        gpuprov::containerd::config::unconfigure(&changed, "nvidia", Some(&original), None)
            .unwrap();
    assert_eq!(reverted, format!("{original}\n# changed by hand\n"));
}

/// A main config and the files it imports, named relative to one
/// directory; `imports` entries use `{dir}` for its absolute path.
struct ImportCase {
    name: &'static str,
    main_imports: &'static [&'static str],
    files: &'static [(&'static str, &'static str)],
    /// The file a failure names as the one that wins, if it fails.
    wins: Option<&'static str>,
}

const IMPORT_CASES: &[ImportCase] = &[
    ImportCase {
        name: "a site file's CRI section replaces gpuprov's (containerd 1.x)",
        main_imports: &["{dir}/conf.d/*.toml"],
        files: &[
            (
                "conf.d/10-debug.toml",
                "version = 2\n[debug]\nlevel = \"debug\"\n",
            ),
            (
                "conf.d/99-site.toml",
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"runc\"\n",
            ),
        ],
        wins: Some("conf.d/99-site.toml"),
    },
    ImportCase {
        name: "a relative import of a relative import sets another BinaryName",
        main_imports: &["site.toml"],
        files: &[
            (
                "site.toml",
                "version = 2\nimports = [\"conf.d/override.toml\"]\n[debug]\nlevel = \"info\"\n",
            ),
            (
                "conf.d/override.toml",
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"nvidia\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nvidia]\nruntime_type = \"io.containerd.runc.v2\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nvidia.options]\nBinaryName = \"/usr/local/bin/other-runtime\"\n",
            ),
        ],
        wins: Some("conf.d/override.toml"),
    },
    ImportCase {
        name: "imports without a CRI section leave the runtime as gpuprov wrote it",
        main_imports: &["{dir}/conf.d/*.toml", "{dir}/missing-glob-*.toml"],
        files: &[
            (
                "conf.d/10-debug.toml",
                "version = 2\n[debug]\nlevel = \"debug\"\n",
            ),
            (
                "conf.d/20-metrics.toml",
                "version = 2\n[metrics]\naddress = \"127.0.0.1:1338\"\n",
            ),
        ],
        wins: None,
    },
    ImportCase {
        name: "a version-2 import of a version-1 config makes containerd 1.x refuse its short plugin ids",
        main_imports: &["{dir}/conf.d/*.toml"],
        files: &[(
            "conf.d/10-debug.toml",
            "version = 2\n[debug]\nlevel = \"debug\"\n",
        )],
        wins: None,
    },
];

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn the_merged_view_of_imports_is_what_real_containerd_loads() {
    // Without a containerd binary gpuprov merges a config and its imports
    // by containerd's rules. Here real containerd 1.6 dumps the same files:
    // both must agree on whether the runtime is in effect, and a failure
    // through the binary names the import that wins.
    use gpuprov::containerd::effective::{check, check_doc, verify};
    use gpuprov::containerd::imports::{Major, load, merge};
    use gpuprov::host::{CommandMode, Host};

    let wanted = RuntimeWanted {
        class: "nvidia".into(),
        binary: BINARY.into(),
        default: DefaultRuntime::Set,
        cdi: None,
    };
    let root = Host::new(Path::new("/"), CommandMode::Prefix, Duration::from_secs(30)).unwrap();
    for case in IMPORT_CASES {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).display().to_string();
        let version1 = case.name.contains("version-1");
        let original = if version1 {
            "../shared/realworld/containerd/05-kind-node-image-2019-v1.toml"
        } else {
            "fixtures/containerd/v2-systemd-cgroup.toml"
        };
        let original = fs::read_to_string(repo().join(original)).unwrap();
        let edited = configure(&original, &wanted, 2).unwrap();
        let mut main = parse(&private_config(&edited.text, dir.path())).unwrap();
        let mut entries = toml_edit::Array::new();
        for entry in case.main_imports {
            entries.push(entry.replace("{dir}", &dir.path().display().to_string()));
        }
        main["imports"] = toml_edit::value(entries);
        let config = at("config.toml");
        fs::write(&config, main.to_string()).unwrap();
        for (name, text) in case.files {
            fs::create_dir_all(Path::new(&at(name)).parent().unwrap()).unwrap();
            fs::write(at(name), text).unwrap();
        }

        let files = load(&root, &config, &[], Major::One).unwrap();
        let view = merge(&files, Major::One);
        let ours = match &view.refused {
            Some(why) => Err(why.clone()),
            None => check_doc(&view.doc, &wanted).map_err(|m| m.message),
        };
        let output = Command::new("containerd")
            .args(["--config", &config, "config", "dump"])
            .output()
            .unwrap();
        let real = if output.status.success() {
            check(&String::from_utf8_lossy(&output.stdout), &wanted, "dump")
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        };
        assert_eq!(
            ours.is_ok(),
            real.is_ok(),
            "{}: ours {ours:?}, real containerd {real:?}",
            case.name
        );
        let verified = verify(
            &root,
            gpuprov::containerd::containerd_binary(&root).as_deref(),
            &config,
            &wanted,
            &mut Vec::new(),
        );
        match case.wins {
            None if version1 => {
                let real = real.unwrap_err();
                assert!(real.contains("plugin URI \"aufs\""), "{real}");
                let ours = ours.unwrap_err();
                assert!(
                    ours.contains("has disabled_plugins entry \"aufs\""),
                    "{ours}"
                );
            }
            None => assert!(verified.is_ok(), "{}: {verified:?}", case.name),
            Some(file) => {
                let why = verified.unwrap_err();
                assert!(
                    why.contains(&format!("({} wins", at(file))),
                    "{}: {why}",
                    case.name
                );
            }
        }
    }
}

/// Debian's containerd is 1.6, which predates CDI (1.7): it starts on
/// every version-2 config with `enable_cdi = true` in its CRI table,
/// loads the nvidia and nvidia-cdi runtimes, logs no CDI setting (its CRI config has
/// none) and leaves the key out of `containerd config dump`. gpuprov's
/// check of containerd's view then names the key and why, so a node with
/// `cdi.enabled` on containerd 1.6 fails its containerd step instead of
/// handing out devices nothing would inject.
#[test]
#[cfg_attr(
    not(all(gpuprov_root, gpuprov_realworld)),
    ignore = "containerd needs root, and the configs the real-world corpus beside the repository (CI has both)"
)]
fn containerd_1_6_starts_with_enable_cdi_and_leaves_it_out_of_its_view() {
    let wanted = RuntimeWanted {
        class: "nvidia".into(),
        binary: BINARY.into(),
        default: DefaultRuntime::Keep,
        cdi: Some(gpuprov::containerd::config::CdiWanted {
            spec_dir: "/var/run/cdi".into(),
            runtime: Some(gpuprov::containerd::config::CdiRuntime {
                class: "nvidia-cdi".into(),
                binary: "/usr/bin/nvidia-container-runtime.cdi".into(),
            }),
        }),
    };
    let dir = tempfile::tempdir().unwrap();
    let files = v2_configs();
    for (i, file) in files.iter().enumerate() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let edited = configure(&fs::read_to_string(file).unwrap(), &wanted, 2).unwrap();
        assert!(edited.text.contains("enable_cdi = true"), "{name}");
        let config = dir.path().join(&name);
        fs::write(&config, private_config(&edited.text, dir.path())).unwrap();
        let dump = real_dump(&config);
        assert!(
            !dump.contains("enable_cdi"),
            "{name}: containerd 1.6 kept it:\n{dump}"
        );
        let why =
            gpuprov::containerd::effective::check(&dump, &wanted, "containerd's view").unwrap_err();
        assert!(
            why.contains("enable_cdi is not set") && why.contains("before 1.7"),
            "{name}: {why}"
        );
        // Starting it takes a few seconds each: three configs show it.
        if i < 3 {
            let line = cri_config_line(&config);
            assert!(
                runtime_entry(&line, "nvidia").contains(BINARY),
                "{name}: {line}"
            );
            assert!(!line.contains("CDI"), "{name}: {line}");
        }
    }
}

#[test]
fn the_gpu_runtime_as_the_default_passes_in_containerds_own_view() {
    // The shape of EKS's AL2023 GPU config, as version 2 for containerd
    // 1.6: `nvidia` is the default, with systemd cgroups, and the file has
    // no runc. containerd 1.6's view keeps the runtimes as written
    // (containerd 2.2's adds a runc with SystemdCgroup false, which
    // tests/containerd_state.rs puts in the fixture's view); either way
    // pods run `nvidia`, and the view is converged.
    let dir = tempfile::tempdir().unwrap();
    let config = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"nvidia\"\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nvidia]\n  runtime_type = \"io.containerd.runc.v2\"\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nvidia.options]\n  BinaryName = \"/usr/bin/nvidia-container-runtime\"\n  SystemdCgroup = true\n";
    let file = dir.path().join("config.toml");
    fs::write(&file, private_config(config, dir.path())).unwrap();
    let dump = real_dump(&file);
    assert!(dump.contains("default_runtime_name = \"nvidia\""), "{dump}");
    for default in [DefaultRuntime::Keep, DefaultRuntime::Set] {
        let wanted = RuntimeWanted {
            class: "nvidia".into(),
            binary: BINARY.into(),
            default,
            cdi: None,
        };
        gpuprov::containerd::effective::check(&dump, &wanted, "containerd's view")
            .unwrap_or_else(|why| panic!("{default:?}: {why}"));
    }
}
