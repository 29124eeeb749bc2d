//! containerd's own view of its config: what it will load, not just what
//! the file says.
//!
//! With a containerd binary in the host, `containerd --config <file> config
//! dump` prints the config as containerd resolves it (its defaults, the
//! imports merged, a version-1 file migrated by containerd 2). gpuprov
//! checks the runtime class there: that it exists, runs the toolkit's
//! binary, carries runc's `SystemdCgroup`, and is the default when it
//! should be. Without a binary, the file itself is checked by the same
//! rules. A mismatch names the key that wins.

use toml_edit::{DocumentMut, Item};

use super::config::{DefaultRuntime, RuntimeWanted};
use crate::host::{CommandRecord, Host};

/// Remembers, until reboot, the config containerd's view was last checked
/// for (the wanted runtime, the files' contents, the binary): a converged
/// node runs no `config dump`.
pub const VIEW_CHECKED: &str = "/run/gpuprov/containerd-view.json";

/// The most of a `config dump` gpuprov reads: the config's own cap and
/// room for containerd's defaults.
const DUMP_CAP: usize = (crate::host::HOST_FILE_CAP as usize) + (1 << 20);

/// What the check depends on, as the marker's content.
pub fn view_key(host: &Host, wanted: &RuntimeWanted, files: &[(&str, &str)]) -> String {
    let binary = super::containerd_binary(host).and_then(|path| {
        host.stat(&path)
            .ok()
            .flatten()
            .map(|info| format!("{path} {} {}", info.size, info.mtime_ns))
    });
    let contents: Vec<serde_json::Value> = files
        .iter()
        .map(|(path, text)| serde_json::json!({"path": path, "sha256": super::sha256_hex(text.as_bytes())}))
        .collect();
    format!(
        "{}\n",
        serde_json::json!({
            "class": wanted.class,
            "binary": wanted.binary,
            "default": wanted.default == DefaultRuntime::Set,
            "containerd": binary,
            "files": contents,
        })
    )
}

/// Checks containerd's view of `config`: `containerd --config <config>
/// config dump` in the host when it has the binary, the file itself
/// otherwise. The command's record goes to `commands`.
pub fn verify(
    host: &Host,
    config: &str,
    wanted: &RuntimeWanted,
    commands: &mut Vec<CommandRecord>,
) -> Result<(), String> {
    let Some(binary) = super::containerd_binary(host) else {
        let text = host
            .read(config)
            .map_err(|e| crate::exec::error_chain(&e))?
            .unwrap_or_default();
        return check(&text, wanted, config);
    };
    let argv: Vec<String> = [binary.as_str(), "--config", config, "config", "dump"]
        .map(String::from)
        .to_vec();
    // The whole dump is read (containerd's defaults make it tens of KiB);
    // the run report keeps its tail, as for any command.
    let mut record = host
        .run_keeping(&argv, DUMP_CAP)
        .map_err(|e| crate::exec::error_chain(&e))?;
    let ok = record.success();
    let summary = record.failure_summary();
    let dump = record.stdout.clone();
    let tail = dump.len().saturating_sub(crate::host::OUTPUT_TAIL_BYTES);
    let tail = (tail..=dump.len())
        .find(|i| dump.is_char_boundary(*i))
        .unwrap_or(dump.len());
    record.stdout = dump[tail..].to_string();
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
    check(
        &dump,
        wanted,
        &format!("containerd's view of {config} (config dump)"),
    )
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

/// Checks `dump` (containerd's config dump, or the file itself) for the
/// runtime gpuprov wants; `Err` says which key wins and how.
pub fn check(dump: &str, wanted: &RuntimeWanted, source: &str) -> Result<(), String> {
    let doc: DocumentMut = dump
        .parse()
        .map_err(|e| format!("{source} is not TOML: {e}"))?;
    let version = doc.get("version").and_then(Item::as_integer).unwrap_or(1);
    let plugin = plugin_for(version);
    let root = doc.as_item();
    let Some(containerd) = get(root, &["plugins", plugin, "containerd"]) else {
        return Err(format!(
            "{source} has no plugins.\"{plugin}\".containerd section: containerd would not load runtime `{}`",
            wanted.class
        ));
    };
    let prefix = format!("plugins.\"{plugin}\".containerd");
    let Some(runtime) = get(containerd, &["runtimes", &wanted.class]) else {
        return Err(format!(
            "in {source}, {prefix}.runtimes has no `{}`: containerd ignores where it was written",
            wanted.class
        ));
    };
    let binary = text(get(runtime, &["options", "BinaryName"]));
    if binary.as_deref() != Some(wanted.binary.as_str()) {
        return Err(format!(
            "in {source}, {prefix}.runtimes.{}.options.BinaryName is {}, not {}",
            wanted.class,
            binary.as_deref().unwrap_or("unset"),
            wanted.binary
        ));
    }
    let cgroup = |runtime: &Item| {
        text(get(runtime, &["options", "SystemdCgroup"])).unwrap_or_else(|| "false".to_string())
    };
    if let Some(runc) = get(containerd, &["runtimes", "runc"])
        && cgroup(runc) != cgroup(runtime)
    {
        return Err(format!(
            "in {source}, {prefix}.runtimes.{}.options.SystemdCgroup is {} but runc's is {}: containers would get another cgroup driver than the kubelet's",
            wanted.class,
            cgroup(runtime),
            cgroup(runc)
        ));
    }
    if wanted.default == DefaultRuntime::Set {
        // containerd 1.x uses a legacy default_runtime table that has a
        // runtime_type as the default, whatever default_runtime_name says.
        let legacy =
            text(get(containerd, &["default_runtime", "runtime_type"])).filter(|t| !t.is_empty());
        if let Some(runtime_type) = legacy {
            return Err(format!(
                "in {source}, {prefix}.default_runtime has runtime_type = \"{runtime_type}\": containerd 1.x makes that table the default, so default_runtime_name = \"{}\" is ignored",
                wanted.class
            ));
        }
        let default = text(containerd.get("default_runtime_name"));
        if default.as_deref() != Some(wanted.class.as_str()) {
            return Err(format!(
                "in {source}, {prefix}.default_runtime_name is {}, not `{}`",
                default.as_deref().unwrap_or("unset"),
                wanted.class
            ));
        }
    }
    Ok(())
}
