//! containerd's own view of its config: what it will load, not just what
//! the file says.
//!
//! With a containerd binary in the host, `containerd --config <file> config
//! dump` prints the config as containerd resolves it (its defaults, the
//! imports merged, a version-1 file migrated by containerd 2). gpuprov
//! checks the runtime class there: that it exists, runs the toolkit's
//! binary, carries the default runtime's `SystemdCgroup`, and is the
//! default when it should be. Without a binary, the file itself is checked by the same
//! rules. A mismatch names the key that wins.

use toml_edit::{DocumentMut, Item};

use super::config::{CdiWanted, DEFAULT_CDI_SPEC_DIRS, DefaultRuntime, RuntimeWanted};
use super::imports::{self, Major};
use crate::host::{CommandRecord, Host};
use crate::state::{CapabilityChange, MakeContext, StateError, json_fields};

/// Remembers, until reboot, the config containerd's view was last checked
/// for (the wanted runtime, the files' contents, the binary): a converged
/// node runs no `config dump`.
pub const VIEW_CHECKED: &str = "/run/gpuprov/containerd-view.json";

/// The most of a `config dump` gpuprov reads: the config's own cap and
/// room for containerd's defaults.
const DUMP_CAP: usize = (crate::host::HOST_FILE_CAP as usize) + (1 << 20);

/// What the check depends on, as the marker's content: the wanted
/// runtime, the binary, and every file containerd loads for `main` (with
/// `given` as the contents gpuprov writes), so that a changed import is
/// checked again.
pub fn view_key(
    host: &Host,
    containerd: Option<&str>,
    wanted: &RuntimeWanted,
    main: &str,
    given: &[(&str, &str)],
) -> String {
    let binary = containerd.and_then(|path| {
        host.stat(path)
            .ok()
            .flatten()
            .map(|info| format!("{path} {} {}", info.size, info.mtime_ns))
    });
    // A file that cannot be loaded is in the key as the error: the check
    // then fails with it, and no marker is written.
    let contents: Vec<serde_json::Value> = match imports::load_guessing(host, main, given) {
        Ok((files, _)) => files
            .iter()
            .map(|file| serde_json::json!({"path": file.path, "sha256": super::sha256_hex(file.text.as_bytes())}))
            .collect(),
        Err(why) => vec![serde_json::json!({"error": why})],
    };
    let mut key = serde_json::json!({
        "class": wanted.class,
        "binary": wanted.binary,
        "default": wanted.default == DefaultRuntime::Set,
        "containerd": binary,
        "files": contents,
    });
    // Only with CDI on, so that markers written before it still match.
    if let Some(cdi) = &wanted.cdi {
        key["cdi"] = serde_json::json!(cdi);
    }
    format!("{key}\n")
}

/// Check containerd's own view of its config (`containerd config dump`
/// in the host) for the runtime: it must exist, run `binary`, carry
/// runc's SystemdCgroup, and be the default when `set_as_default`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewCheck {
    pub config: String,
    pub class: String,
    pub binary: String,
    pub set_as_default: bool,
    /// With `cdi.enabled`: CDI must be on, reading gpuprov's spec
    /// directory, and the CDI runtime there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdi: Option<CdiWanted>,
    /// The containerd binary whose `config dump` is asked (none: the
    /// files are merged by containerd's rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd: Option<String>,
}

impl CapabilityChange for ViewCheck {
    fn kind(&self) -> &'static str {
        "check-containerd-view"
    }

    fn summary(&self) -> String {
        let (class, config) = (&self.class, &self.config);
        match &self.containerd {
            Some(binary) => format!(
                "check runtime `{class}` in containerd's own view of {config} ({binary} config dump)"
            ),
            None => format!(
                "check runtime `{class}` in containerd's view of {config} (its imports merged by containerd's rules)"
            ),
        }
    }

    fn fields(&self) -> serde_json::Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        let wanted = RuntimeWanted {
            class: self.class.clone(),
            binary: self.binary.clone(),
            default: if self.set_as_default {
                DefaultRuntime::Set
            } else {
                DefaultRuntime::Keep
            },
            cdi: self.cdi.clone(),
        };
        verify(
            on.host,
            self.containerd.as_deref(),
            &self.config,
            &wanted,
            on.commands,
        )
        .map_err(StateError::operator)
    }
}

/// Checks containerd's view of `config`: `containerd --config <config>
/// config dump` in the host when it has the binary, the file and its
/// imports merged by containerd's rules otherwise. A mismatch names the
/// file whose value wins. The command's record goes to `commands`.
pub fn verify(
    host: &Host,
    containerd: Option<&str>,
    config: &str,
    wanted: &RuntimeWanted,
    commands: &mut Vec<CommandRecord>,
) -> Result<(), String> {
    let Some(binary) = containerd.map(str::to_string) else {
        let (files, major) = imports::load_guessing(host, config, &[])?;
        let view = imports::merge(&files, major);
        if let Some(refused) = view.refused {
            return Err(refused);
        }
        return check_doc(&view.doc, wanted).map_err(|m| {
            let source = if files.len() == 1 {
                config.to_string()
            } else {
                format!(
                    "{config} and its imports, merged as {} does (no containerd binary in the host to ask)",
                    major.name()
                )
            };
            format!("in {source}, {}{}", m.message, winner(&view, &m, config))
        });
    };
    let argv: Vec<String> = [binary.as_str(), "--config", config, "config", "dump"]
        .map(String::from)
        .to_vec();
    // The whole dump is read (containerd's defaults make it tens of KiB);
    // the run report keeps its tail, as for any command.
    let mut record = host
        .run_keeping(&argv, DUMP_CAP)
        .map_err(|e| crate::state::error_chain(&e))?;
    let ok = record.success();
    let summary = record.failure_summary();
    let dump = record.take_stdout_keeping_tail();
    commands.push(record);
    if dump.len() >= DUMP_CAP {
        return Err(format!(
            "`{binary} config dump` printed more than {DUMP_CAP} bytes"
        ));
    }
    if !ok {
        return Err(format!(
            "`{} config dump` cannot load {config}: {summary}",
            binary
        ));
    }
    let source = format!("containerd's view of {config} (config dump)");
    let doc: DocumentMut = dump
        .parse()
        .map_err(|e| format!("{source} is not TOML: {e}"))?;
    check_doc(&doc, wanted).map_err(|m| {
        // Which file it comes from, by the rules of the containerd that
        // printed the dump (version 3 is containerd 2's).
        let version = doc.get("version").and_then(Item::as_integer).unwrap_or(1);
        let major = Major::guess(version);
        let from = imports::load(host, config, &[], major)
            .map(|files| winner(&imports::merge(&files, major), &m, config))
            .unwrap_or_default();
        format!("in {source}, {}{from}", m.message)
    })
}

/// Names the file whose value is in effect at the mismatched key, when it
/// is an import rather than `config` itself.
fn winner(view: &imports::View, mismatch: &Mismatch, config: &str) -> String {
    let plugin = mismatch.key.get(1).map_or("", String::as_str);
    match view.source_of(&mismatch.key) {
        Some(file) if file != config => format!(
            " ({file} wins: containerd loads it after {config}, and its plugins.\"{plugin}\" section {} the one there; change it there, or drop the import)",
            if view.replaces_sections() {
                "replaces"
            } else {
                "overrides keys of"
            }
        ),
        // Nothing sets the key's section: the version decides where
        // containerd reads it, and another file's version is in effect.
        None => match view.version_source() {
            Some(file) if file != config => format!(
                " ({file}, loaded after {config}, sets the version that is in effect, so containerd reads the CRI plugin at plugins.\"{plugin}\")"
            ),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

/// The CRI runtime section's plugin id in a dump of each version.
fn plugin_for(version: i64) -> &'static str {
    match version {
        1 => "cri",
        2 => "io.containerd.grpc.v1.cri",
        _ => "io.containerd.cri.v1.runtime",
    }
}

fn get<'a>(item: &'a Item, path: &[&str]) -> Option<&'a Item> {
    path.iter().try_fold(item, |item, key| item.get(key))
}

/// A value as text, without the comments and spacing around it.
fn text(item: Option<&Item>) -> Option<String> {
    item.and_then(|i| i.as_value()).map(|v| match v.as_str() {
        Some(s) => s.to_string(),
        None => {
            let mut bare = v.clone();
            bare.decor_mut().clear();
            bare.to_string().trim().to_string()
        }
    })
}

/// A way containerd's view lacks the runtime: the key that wins, and what
/// it says (starting with the key).
#[derive(Debug)]
pub struct Mismatch {
    pub key: Vec<String>,
    pub message: String,
}

/// A dotted key as TOML writes it: ids with dots are quoted.
fn dotted(key: &[&str]) -> String {
    key.iter()
        .map(|part| {
            if !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                part.to_string()
            } else {
                format!("{part:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Checks `dump` (containerd's config dump, or one file) for the runtime
/// gpuprov wants; `Err` says which key wins and how.
pub fn check(dump: &str, wanted: &RuntimeWanted, source: &str) -> Result<(), String> {
    let doc: DocumentMut = dump
        .parse()
        .map_err(|e| format!("{source} is not TOML: {e}"))?;
    check_doc(&doc, wanted).map_err(|m| format!("in {source}, {}", m.message))
}

/// Checks a parsed view for the runtime gpuprov wants.
pub fn check_doc(doc: &DocumentMut, wanted: &RuntimeWanted) -> Result<(), Mismatch> {
    let version = doc.get("version").and_then(Item::as_integer).unwrap_or(1);
    let plugin = plugin_for(version);
    let root = doc.as_item();
    let base = ["plugins", plugin, "containerd"];
    let mismatch = |rest: &[&str], says: String| {
        let key: Vec<&str> = base.iter().chain(rest).copied().collect();
        Mismatch {
            key: key.iter().map(|k| k.to_string()).collect(),
            message: format!("{} {says}", dotted(&key)),
        }
    };
    let Some(containerd) = get(root, &base) else {
        return Err(mismatch(
            &[],
            format!(
                "does not exist: containerd would not load runtime `{}`",
                wanted.class
            ),
        ));
    };
    let class = wanted.class.as_str();
    let Some(runtime) = get(containerd, &["runtimes", class]) else {
        return Err(mismatch(
            &["runtimes"],
            format!("has no `{class}`: containerd ignores where it was written"),
        ));
    };
    let binary = text(get(runtime, &["options", "BinaryName"]));
    if binary.as_deref() != Some(wanted.binary.as_str()) {
        return Err(mismatch(
            &["runtimes", class, "options", "BinaryName"],
            format!(
                "is {}, not {}",
                binary.as_deref().unwrap_or("unset"),
                wanted.binary
            ),
        ));
    }
    let cgroup = |runtime: &Item| {
        text(get(runtime, &["options", "SystemdCgroup"])).unwrap_or_else(|| "false".to_string())
    };
    // The cgroup driver must be the one pods get now: the default
    // runtime's when it is a runc (runc itself when none is named, or when
    // the default is another kind, kata, that keeps its cgroups its own
    // way), the same runtime the edit copied its settings from. Where the
    // GPU runtime is the default already (EKS's AL2023 GPU image), it is
    // what pods run, and containerd's own runc defaults say nothing about
    // the kubelet's.
    let default = text(containerd.get("default_runtime_name")).unwrap_or_else(|| "runc".into());
    let runc_like = |runtime: &Item| {
        text(get(runtime, &["runtime_type"]))
            .is_none_or(|t| t == super::config::RUNC_V2 || t == "io.containerd.runtime.v1.linux")
    };
    let compared = (default != class)
        .then(|| {
            [default.as_str(), "runc", "crun"]
                .into_iter()
                .filter(|name| *name != class)
                .find_map(|name| {
                    let runtime = get(containerd, &["runtimes", name])?;
                    runc_like(runtime).then_some((name, runtime))
                })
        })
        .flatten();
    if let Some((name, pods_get)) = compared
        && cgroup(pods_get) != cgroup(runtime)
    {
        let which = match name == default {
            true => format!("the default runtime `{name}`'s"),
            false => format!("`{name}`'s (the default, `{default}`, is no runc)"),
        };
        return Err(mismatch(
            &["runtimes", class, "options", "SystemdCgroup"],
            format!(
                "is {} but {which} is {}: containers would get another cgroup driver than the kubelet's",
                cgroup(runtime),
                cgroup(pods_get)
            ),
        ));
    }
    if wanted.default == DefaultRuntime::Set {
        // containerd 1.x uses a legacy default_runtime table that has a
        // runtime_type as the default, whatever default_runtime_name says
        // (containerd 2 has no such table).
        let legacy = text(get(containerd, &["default_runtime", "runtime_type"]))
            .filter(|t| !t.is_empty() && version < 3);
        if let Some(runtime_type) = legacy {
            return Err(mismatch(
                &["default_runtime", "runtime_type"],
                format!(
                    "is \"{runtime_type}\": containerd 1.x makes that table the default, so default_runtime_name = \"{class}\" is ignored"
                ),
            ));
        }
        let default = text(containerd.get("default_runtime_name"));
        if default.as_deref() != Some(class) {
            return Err(mismatch(
                &["default_runtime_name"],
                format!(
                    "is {}, not `{class}`",
                    default.as_deref().unwrap_or("unset")
                ),
            ));
        }
    }
    if let Some(cdi) = &wanted.cdi {
        check_cdi(root, plugin, cdi)?;
    }
    Ok(())
}

/// CDI on in the CRI plugin, reading the directory of gpuprov's spec.
fn check_cdi(root: &Item, plugin: &str, cdi: &CdiWanted) -> Result<(), Mismatch> {
    let at = |key: &str| Mismatch {
        key: vec!["plugins".to_string(), plugin.to_string(), key.to_string()],
        message: String::new(),
    };
    let section = get(root, &["plugins", plugin]);
    let enabled = section.and_then(|s| text(s.get("enable_cdi")));
    if enabled.as_deref() != Some("true") {
        let key = dotted(&["plugins", plugin, "enable_cdi"]);
        return Err(Mismatch {
            message: match enabled {
                Some(value) => {
                    format!("{key} is {value}, not true: containerd would not use CDI specs")
                }
                None => format!(
                    "{key} is not set: containerd would not use CDI specs (containerd before 1.7 does not know the key: it starts, ignores it and leaves it out of `containerd config dump`)"
                ),
            },
            ..at("enable_cdi")
        });
    }
    let dirs: Vec<String> = match section.and_then(|s| s.get("cdi_spec_dirs")) {
        Some(item) => item
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        None => DEFAULT_CDI_SPEC_DIRS.map(String::from).to_vec(),
    };
    let dir = cdi.spec_dir.trim_end_matches('/');
    if !dirs.iter().any(|d| d.trim_end_matches('/') == dir) {
        return Err(Mismatch {
            message: format!(
                "{} is [{}]: containerd would not read gpuprov's CDI spec in {dir}",
                dotted(&["plugins", plugin, "cdi_spec_dirs"]),
                dirs.join(", ")
            ),
            ..at("cdi_spec_dirs")
        });
    }
    if let Some(runtime) = &cdi.runtime {
        let key = [
            "plugins",
            plugin,
            "containerd",
            "runtimes",
            runtime.class.as_str(),
        ];
        let binary = get(root, &key).and_then(|r| text(get(r, &["options", "BinaryName"])));
        if binary.as_deref() != Some(runtime.binary.as_str()) {
            let mut path: Vec<&str> = key.to_vec();
            path.extend(["options", "BinaryName"]);
            return Err(Mismatch {
                key: path.iter().map(|k| k.to_string()).collect(),
                message: format!(
                    "{} is {}, not {}: containerd would not run the CDI runtime `{}`",
                    dotted(&path),
                    binary.as_deref().unwrap_or("unset"),
                    runtime.binary,
                    runtime.class
                ),
            });
        }
    }
    Ok(())
}
