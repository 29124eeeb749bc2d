//! The containerd config editor on every fixture config and every real
//! config in ../shared/realworld/containerd: the runtime is right, every
//! untouched line survives verbatim and in order, a second edit changes
//! nothing, and removing the runtime gives back what was there.

#[path = "../fuzz/invariants.rs"]
mod invariants;
mod support;

use std::fs;
use std::path::{Path, PathBuf};

use gpuprov::containerd::config::{
    ConfigError, DefaultRuntime, Edited, Layout, RuntimeWanted, configure, layout, parse,
    unconfigure,
};
use support::repo;
use toml_edit::Item;

const BINARY: &str = "/usr/bin/nvidia-container-runtime";

fn wanted(default: DefaultRuntime) -> RuntimeWanted {
    RuntimeWanted {
        class: "nvidia".into(),
        binary: BINARY.into(),
        default,
        cdi: None,
    }
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// The containerd table of the result, through whatever layout it uses.
fn containerd_table(text: &str) -> (Layout, toml_edit::DocumentMut) {
    let doc = parse(text).unwrap();
    let (_, layout) = layout(&doc).unwrap();
    (layout, doc)
}

fn lookup<'a>(item: &'a Item, path: &[&str]) -> Option<&'a Item> {
    path.iter()
        .try_fold(item, |item, key| item.as_table_like()?.get(key))
}

/// What a runtime means, whatever its formatting: used to compare tables.
fn to_json(item: &Item) -> serde_json::Value {
    match item {
        Item::None => serde_json::Value::Null,
        Item::Value(v) => value_json(v),
        Item::Table(t) => {
            serde_json::Value::Object(t.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
        }
        Item::ArrayOfTables(a) => {
            serde_json::Value::Array(a.iter().map(|t| to_json(&Item::Table(t.clone()))).collect())
        }
    }
}

fn value_json(v: &toml_edit::Value) -> serde_json::Value {
    use toml_edit::Value::*;
    match v {
        String(s) => serde_json::json!(s.value()),
        Integer(i) => serde_json::json!(i.value()),
        Float(f) => serde_json::json!(f.value()),
        Boolean(b) => serde_json::json!(b.value()),
        Datetime(d) => serde_json::json!(d.value().to_string()),
        Array(a) => serde_json::Value::Array(a.iter().map(value_json).collect()),
        InlineTable(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), value_json(v)))
                .collect(),
        ),
    }
}

/// Every original line not owned by gpuprov is in the result, verbatim and in order.
fn assert_untouched_lines_kept(name: &str, original: &str, edited: &str) {
    if let Err(e) = invariants::untouched_lines_kept(original, edited) {
        panic!("{name}: {e}");
    }
}

/// Checks one edit and returns it.
fn check(name: &str, original: &str, default: DefaultRuntime) -> Edited {
    let edited = configure(original, &wanted(default), 2).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (layout, doc) = containerd_table(&edited.text);
    assert_eq!(layout, edited.layout);
    let containerd = lookup(doc.as_item(), &["plugins", layout.plugin(), "containerd"])
        .unwrap_or_else(|| panic!("{name}: no containerd table"));
    let ours = lookup(containerd, &["runtimes", "nvidia"])
        .unwrap_or_else(|| panic!("{name}: no nvidia runtime"));
    assert_eq!(
        lookup(ours, &["runtime_type"]).and_then(Item::as_str),
        Some("io.containerd.runc.v2"),
        "{name}"
    );
    assert_eq!(
        lookup(ours, &["options", "BinaryName"]).and_then(Item::as_str),
        Some(BINARY),
        "{name}"
    );
    if layout == Layout::V1 {
        assert_eq!(
            lookup(ours, &["options", "Runtime"]).and_then(Item::as_str),
            Some(BINARY),
            "{name}"
        );
    }
    if let Some(base) = &edited.copied_from {
        let base_item = match base.as_str() {
            "default_runtime" => lookup(containerd, &["default_runtime"]),
            other => lookup(containerd, &["runtimes", other]),
        }
        .unwrap();
        let systemd =
            |item: &Item| lookup(item, &["options", "SystemdCgroup"]).and_then(Item::as_bool);
        assert_eq!(
            systemd(ours),
            systemd(base_item),
            "{name}: SystemdCgroup carried over from {base}"
        );
    }
    let default_name = lookup(containerd, &["default_runtime_name"]).and_then(Item::as_str);
    if default == DefaultRuntime::Set {
        assert_eq!(default_name, Some("nvidia"), "{name}");
    }
    assert_untouched_lines_kept(name, original, &edited.text);
    let again = configure(&edited.text, &wanted(default), 2).unwrap();
    assert_eq!(
        again.text, edited.text,
        "{name}: a second edit changed the file"
    );
    edited
}

#[test]
fn fixture_configs_come_out_right() {
    let dir = repo().join("fixtures/containerd");
    let files = toml_files(&dir);
    assert!(files.len() >= 12, "{files:?}");
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let original = fs::read_to_string(&path).unwrap();
        if name.starts_with("malformed") {
            continue;
        }
        let edited = check(&name, &original, DefaultRuntime::Keep);
        let mut shown = format!(
            "layout: {:?}\ncopied from: {:?}\n",
            edited.layout, edited.copied_from
        );
        for note in &edited.notes {
            shown.push_str(&format!("note: {note}\n"));
        }
        shown.push_str("---\n");
        shown.push_str(&edited.text);
        insta::assert_snapshot!(format!("containerd-{name}"), shown);
        check(&name, &original, DefaultRuntime::Set);
    }
}

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn real_configs_come_out_right() {
    let dir = repo().join("../shared/realworld/containerd");
    let files = toml_files(&dir);
    assert_eq!(
        files.len(),
        14,
        "the real configs are beside the repository"
    );
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let original = fs::read_to_string(&path).unwrap();
        for default in [DefaultRuntime::Keep, DefaultRuntime::Set] {
            let edited = check(&name, &original, default);
            // Where gpuprov added the runtime, removing it gives back the
            // original's meaning.
            if edited.copied_from.is_some() && default == DefaultRuntime::Keep {
                let reverted = unconfigure(&edited.text, "nvidia", None, None).unwrap();
                assert_eq!(
                    to_json(parse(&reverted).unwrap().as_item()),
                    to_json(parse(&original).unwrap().as_item()),
                    "{name}: unconfigure left something behind:\n{reverted}"
                );
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn real_config_specifics() {
    let read = |name: &str| {
        fs::read_to_string(repo().join("../shared/realworld/containerd").join(name)).unwrap()
    };
    // A version-2 header over containerd 2's plugin ids: the ids win.
    let aks = configure(
        &read("10-aks-containerd2-v2-header-cri-v1-ids.toml"),
        &wanted(DefaultRuntime::Keep),
        2,
    )
    .unwrap();
    assert_eq!(aks.layout, Layout::V3);
    // nvidia already the default with no runc to fall back to: kept, and said.
    let eks = read("02-eks-al2023-nodeadm-nvidia-v3.toml");
    let edited = configure(&eks, &wanted(DefaultRuntime::Clear), 3).unwrap();
    assert_eq!(
        edited.text, eks,
        "a correct nvidia runtime is left byte for byte"
    );
    assert!(
        edited.notes[0].contains("no runc runtime to fall back to"),
        "{:?}",
        edited.notes
    );
    // Bottlerocket's default runtime is shimpei, a runc wrapper: its settings are the base.
    let bottlerocket = configure(
        &read("03-bottlerocket-k8s-shimpei-default-v2.toml"),
        &wanted(DefaultRuntime::Keep),
        2,
    )
    .unwrap();
    assert_eq!(bottlerocket.copied_from.as_deref(), Some("shimpei"));
    // Kind 2019 (version 1): the legacy default_runtime table is the base.
    let kind = configure(
        &read("05-kind-node-image-2019-v1.toml"),
        &wanted(DefaultRuntime::Keep),
        2,
    )
    .unwrap();
    assert_eq!(
        (kind.layout, kind.copied_from.as_deref()),
        (Layout::V1, Some("default_runtime"))
    );
}

#[test]
fn default_runtime_is_set_cleared_or_kept_as_asked() {
    let stale =
        fs::read_to_string(repo().join("fixtures/containerd/v2-nvidia-stale.toml")).unwrap();
    let default_of = |text: &str| {
        let (layout, doc) = containerd_table(text);
        lookup(
            doc.as_item(),
            &[
                "plugins",
                layout.plugin(),
                "containerd",
                "default_runtime_name",
            ],
        )
        .and_then(Item::as_str)
        .map(str::to_string)
    };
    let kept = configure(&stale, &wanted(DefaultRuntime::Keep), 2).unwrap();
    assert_eq!(default_of(&kept.text).as_deref(), Some("nvidia"));
    assert!(kept.notes[0].contains("stays so"));
    let cleared = configure(&stale, &wanted(DefaultRuntime::Clear), 2).unwrap();
    assert_eq!(
        default_of(&cleared.text),
        None,
        "runc is there to fall back to"
    );
    let kata = fs::read_to_string(repo().join("fixtures/containerd/v2-default-kata.toml")).unwrap();
    let set = configure(&kata, &wanted(DefaultRuntime::Set), 2).unwrap();
    assert_eq!(default_of(&set.text).as_deref(), Some("nvidia"));
    assert_eq!(
        set.copied_from.as_deref(),
        Some("runc"),
        "kata's options are not runc's"
    );
    assert!(
        set.text.contains("  default_runtime_name = \"nvidia\"\n"),
        "indentation kept:\n{}",
        set.text
    );
}

#[test]
fn inline_comments_on_changed_values_survive() {
    let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"runc\"   # ticket K8S-12\n";
    let edited = configure(text, &wanted(DefaultRuntime::Set), 2).unwrap();
    assert!(
        edited
            .text
            .contains("  default_runtime_name = \"nvidia\"   # ticket K8S-12\n"),
        "{}",
        edited.text
    );
}

#[test]
fn empty_files_take_the_hosts_config_version() {
    for (version, plugin) in [
        (2, "io.containerd.grpc.v1.cri"),
        (3, "io.containerd.cri.v1.runtime"),
    ] {
        let edited = configure("", &wanted(DefaultRuntime::Keep), version).unwrap();
        assert!(
            edited.text.starts_with(&format!("version = {version}\n")),
            "{}",
            edited.text
        );
        assert!(edited.text.contains(plugin), "{}", edited.text);
    }
}

#[test]
fn malformed_configs_are_errors_with_line_and_column() {
    let cases = [
        ("malformed-unclosed-table.toml", "3:48: unclosed table"),
        ("malformed-duplicate-key.toml", "5:3: duplicate key"),
        (
            "malformed-bad-version.toml",
            "`version = 7` is not a containerd config version",
        ),
    ];
    for (file, expected) in cases {
        let text = fs::read_to_string(repo().join("fixtures/containerd").join(file)).unwrap();
        let err: ConfigError = configure(&text, &wanted(DefaultRuntime::Keep), 2).unwrap_err();
        assert!(err.to_string().starts_with(expected), "{file}: {err}");
    }
}

#[test]
fn a_key_that_should_be_a_table_is_an_error_naming_its_whole_path() {
    for (text, path) in [
        (
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = \"runc\"\n",
            "`plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes` is not a table",
        ),
        (
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd = 1\n",
            "`plugins.\"io.containerd.grpc.v1.cri\".containerd` is not a table",
        ),
    ] {
        let err = configure(text, &wanted(DefaultRuntime::Keep), 2).unwrap_err();
        assert_eq!(err.to_string(), path);
    }
}

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn crlf_line_endings_and_a_byte_order_mark_are_kept_exactly() {
    for path in toml_files(&repo().join("fixtures/containerd"))
        .into_iter()
        .chain(toml_files(&repo().join("../shared/realworld/containerd")))
    {
        let Ok(lf) = fs::read_to_string(&path) else {
            continue;
        };
        if lf.is_empty() || configure(&lf, &wanted(DefaultRuntime::Clear), 2).is_err() {
            continue; // the malformed fixtures
        }
        let windows = format!("\u{feff}{}", lf.replace('\n', "\r\n"));
        let edited = configure(&windows, &wanted(DefaultRuntime::Clear), 2).unwrap();
        let expected = configure(&lf, &wanted(DefaultRuntime::Clear), 2).unwrap();
        assert_eq!(
            edited.text,
            format!("\u{feff}{}", expected.text.replace('\n', "\r\n")),
            "{}: the edit is the LF edit, in CRLF with the BOM",
            path.display()
        );
        assert!(
            !edited.text.replace("\r\n", "").contains('\n'),
            "{}",
            path.display()
        );
        assert_eq!(
            unconfigure(&edited.text, "nvidia", None, None).unwrap(),
            format!(
                "\u{feff}{}",
                unconfigure(&expected.text, "nvidia", None, None)
                    .unwrap()
                    .replace('\n', "\r\n")
            ),
            "{}",
            path.display()
        );
    }
}

/// With `cdi.enabled`, every fixture and real config gets `enable_cdi =
/// true` in its CRI plugin's own table (`io.containerd.grpc.v1.cri` for
/// version 2, `io.containerd.cri.v1.runtime` for version 3), the spec
/// directory in `cdi_spec_dirs` only where containerd would not read it
/// anyway, every other line kept, and a second edit changes nothing;
/// undoing it (revert of a file changed since) gives back the original's
/// meaning.
#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn cdi_is_turned_on_where_each_config_version_reads_it() {
    let mut files = toml_files(&repo().join("fixtures/containerd"));
    files.extend(toml_files(&repo().join("../shared/realworld/containerd")));
    let mut checked = 0;
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let original = fs::read_to_string(&path).unwrap();
        let Ok(doc) = parse(&original) else { continue };
        if layout(&doc).is_err() {
            continue;
        }
        for dir in ["/var/run/cdi", "/opt/cdi"] {
            let with_cdi = RuntimeWanted {
                cdi: Some(gpuprov::containerd::config::CdiWanted {
                    spec_dir: dir.to_string(),
                    // The CDI runtime, in one of the two passes.
                    runtime: (dir == "/opt/cdi").then(|| gpuprov::containerd::config::CdiRuntime {
                        class: "nvidia-cdi".into(),
                        binary: "/usr/bin/nvidia-container-runtime.cdi".into(),
                    }),
                }),
                ..wanted(DefaultRuntime::Keep)
            };
            let edited = configure(&original, &with_cdi, 2).unwrap();
            // Every line but the two CDI keys stays; a second edit changes
            // nothing.
            invariants::containerd(&original);
            let result = parse(&edited.text).unwrap();
            let (version, config_layout) = layout(&result).unwrap();
            let plugin = lookup(result.as_item(), &["plugins", config_layout.plugin()]).unwrap();
            assert_eq!(
                plugin.get("enable_cdi").and_then(Item::as_bool),
                Some(true),
                "{name} (version {version}):\n{}",
                edited.text
            );
            let dirs: Option<Vec<&str>> = plugin
                .get("cdi_spec_dirs")
                .and_then(Item::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect());
            let before: Option<Vec<String>> = lookup(
                doc.as_item(),
                &["plugins", config_layout.plugin(), "cdi_spec_dirs"],
            )
            .and_then(Item::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            });
            let read_before = before
                .clone()
                .unwrap_or_else(|| vec!["/etc/cdi".to_string(), "/var/run/cdi".to_string()]);
            let expected = if read_before.iter().any(|d| d == dir) {
                // containerd reads it already: the key is left as it was.
                before
            } else {
                Some(read_before.into_iter().chain([dir.to_string()]).collect())
            };
            assert_eq!(
                dirs.map(|d| d.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
                expected,
                "{name}"
            );
            // (Where the file alone does not show the runtime, containerd's
            // merged view is what is checked: tests/real_containerd.rs.)
            if gpuprov::containerd::effective::check_doc(&result, &wanted(DefaultRuntime::Keep))
                .is_ok()
            {
                gpuprov::containerd::effective::check_doc(&result, &with_cdi)
                    .unwrap_or_else(|m| panic!("{name}: {}", m.message));
            }
            // The CDI runtime runs the CDI binary, with the nvidia
            // runtime's cgroup driver.
            let runtimes = lookup(
                result.as_item(),
                &["plugins", config_layout.plugin(), "containerd", "runtimes"],
            )
            .unwrap();
            if dir == "/opt/cdi" {
                let cdi = runtimes
                    .get("nvidia-cdi")
                    .unwrap_or_else(|| panic!("{name}:\n{}", edited.text));
                assert_eq!(
                    lookup(cdi, &["options", "BinaryName"]).and_then(Item::as_str),
                    Some("/usr/bin/nvidia-container-runtime.cdi"),
                    "{name}"
                );
                let cgroup = |r: &Item| lookup(r, &["options", "SystemdCgroup"]).map(to_json);
                assert_eq!(cgroup(cdi), cgroup(&runtimes["nvidia"]), "{name}");
            } else {
                assert!(runtimes.get("nvidia-cdi").is_none(), "{name}");
            }
            let reverting = gpuprov::containerd::config::CdiReverted {
                runtime_class: Some("nvidia-cdi".into()),
            };
            let reverted =
                unconfigure(&edited.text, "nvidia", Some(&original), Some(&reverting)).unwrap();
            let reverted = parse(&reverted).unwrap();
            let cdi_runtime = [
                "plugins",
                config_layout.plugin(),
                "containerd",
                "runtimes",
                "nvidia-cdi",
            ];
            assert_eq!(
                lookup(reverted.as_item(), &cdi_runtime).map(to_json),
                lookup(doc.as_item(), &cdi_runtime).map(to_json),
                "{name}: revert left the CDI runtime behind"
            );
            for key in ["enable_cdi", "cdi_spec_dirs"] {
                let at = ["plugins", config_layout.plugin(), key];
                assert_eq!(
                    lookup(reverted.as_item(), &at).map(to_json),
                    lookup(doc.as_item(), &at).map(to_json),
                    "{name}: revert left {key} behind:\n{reverted}"
                );
            }
            // Where gpuprov added the runtime, the whole file means what
            // the original meant.
            if edited.copied_from.is_some() {
                assert_eq!(
                    to_json(reverted.as_item()),
                    to_json(doc.as_item()),
                    "{name}: revert left something behind:\n{reverted}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "{checked}");
}

/// A config that has CDI off says so, and the check names the key; one
/// that lists its own directories keeps them and gains gpuprov's.
#[test]
fn cdi_settings_already_there_are_kept_and_corrected() {
    let original = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  enable_cdi = false  # off for now\n  cdi_spec_dirs = [\"/etc/cdi\"]\n";
    let with_cdi = RuntimeWanted {
        cdi: Some(gpuprov::containerd::config::CdiWanted {
            spec_dir: "/var/run/cdi".to_string(),
            runtime: None,
        }),
        ..wanted(DefaultRuntime::Keep)
    };
    // The runtime is there; only CDI is off.
    let before = parse(
        &configure(original, &wanted(DefaultRuntime::Keep), 2)
            .unwrap()
            .text,
    )
    .unwrap();
    let mismatch = gpuprov::containerd::effective::check_doc(&before, &with_cdi).unwrap_err();
    assert!(
        mismatch.message.contains("enable_cdi is false, not true"),
        "{}",
        mismatch.message
    );
    let edited = configure(original, &with_cdi, 2).unwrap().text;
    assert!(
        edited.contains("  enable_cdi = true  # off for now\n  cdi_spec_dirs = [\"/etc/cdi\", \"/var/run/cdi\"]\n"),
        "{edited}"
    );
    let dirs_only = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  enable_cdi = true\n  cdi_spec_dirs = [\"/etc/cdi\"]\n";
    let with_runtime = configure(dirs_only, &wanted(DefaultRuntime::Keep), 2)
        .unwrap()
        .text;
    let mismatch =
        gpuprov::containerd::effective::check_doc(&parse(&with_runtime).unwrap(), &with_cdi)
            .unwrap_err();
    assert!(
        mismatch
            .message
            .contains("would not read gpuprov's CDI spec in /var/run/cdi"),
        "{}",
        mismatch.message
    );
}

/// A CDI runtime the original already had (the GPU Operator's toolkit
/// adds `nvidia-cdi` too) is gpuprov's edit, not its creation: a revert
/// after someone else's change gives their table back, not nothing.
#[test]
fn revert_gives_back_a_cdi_runtime_the_original_had() {
    let original = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = true
# The operator's CDI runtime, with an option of its own.
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia-cdi]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia-cdi.options]
    BinaryName = "/usr/local/nvidia/toolkit/nvidia-container-runtime.cdi"
    SystemdCgroup = true
"#;
    let with_cdi = RuntimeWanted {
        cdi: Some(gpuprov::containerd::config::CdiWanted {
            spec_dir: "/var/run/cdi".to_string(),
            runtime: Some(gpuprov::containerd::config::CdiRuntime {
                class: "nvidia-cdi".into(),
                binary: "/usr/bin/nvidia-container-runtime.cdi".into(),
            }),
        }),
        ..wanted(DefaultRuntime::Keep)
    };
    let edited = configure(original, &with_cdi, 2).unwrap();
    let cdi_binary = [
        "plugins",
        "io.containerd.grpc.v1.cri",
        "containerd",
        "runtimes",
        "nvidia-cdi",
    ];
    let doc = parse(&edited.text).unwrap();
    assert_eq!(
        lookup(
            lookup(doc.as_item(), &cdi_binary).unwrap(),
            &["options", "BinaryName"]
        )
        .and_then(Item::as_str),
        Some("/usr/bin/nvidia-container-runtime.cdi")
    );
    let changed = format!("{}\n# changed by hand\n", edited.text);
    let reverting = gpuprov::containerd::config::CdiReverted {
        runtime_class: Some("nvidia-cdi".into()),
    };
    let reverted = unconfigure(&changed, "nvidia", Some(original), Some(&reverting)).unwrap();
    let reverted = parse(&reverted).unwrap();
    assert_eq!(
        lookup(reverted.as_item(), &cdi_binary).map(to_json),
        lookup(parse(original).unwrap().as_item(), &cdi_binary).map(to_json),
        "their nvidia-cdi runtime comes back as it was:\n{reverted}"
    );
    assert!(
        lookup(
            reverted.as_item(),
            &[
                "plugins",
                "io.containerd.grpc.v1.cri",
                "containerd",
                "runtimes",
                "nvidia"
            ]
        )
        .is_none(),
        "gpuprov's own runtime goes:\n{reverted}"
    );
}
