//! CRI-O's nvidia runtime: the `containerd-runtime` state on a node whose
//! runtime is CRI-O (OpenShift and many on-premise clusters).
//!
//! CRI-O reads /etc/crio/crio.conf, then every file of /etc/crio/crio.conf.d
//! in lexical order, each decoded over the last: a key a later file sets
//! wins, and a runtime table (`[crio.runtime.runtimes.<name>]`) is replaced
//! whole. gpuprov writes one drop-in, as NVIDIA's toolkit does
//! (`99-nvidia.toml`), with the runtime copied from CRI-O's default runtime
//! (its `monitor_path`, `runtime_root` and the like carry over) running the
//! toolkit's binary; `default_runtime` only when set as default; CDI's spec
//! directory when CDI is on and CRI-O would not look there. The main file
//! is never touched.
//!
//! CRI-O 1.28 and later reload runtimes and `default_runtime` on SIGHUP
//! (`systemctl reload crio`, its unit's ExecReload), 1.30 and later the CDI
//! spec directories too (read in CRI-O's `Config.Reload`); older ones and
//! an unknown version are restarted.

use serde::{Deserialize, Serialize};
use toml_edit::{DocumentMut, Item, Table, Value};

use crate::digest::sha256_hex;
use crate::host::Host;
use crate::spec::RestartMode;
use crate::state::{
    CapabilityChange, Change, MakeContext, Observation, Outcome, StateContext, StateError,
    json_fields,
};

/// What gpuprov wrote for CRI-O, for revert.
pub const RECORD: &str = "/var/lib/gpuprov/crio.json";
/// Present from before the drop-in is written until CRI-O has reloaded.
pub const RELOAD_PENDING: &str = "/var/lib/gpuprov/crio-reload-pending";
/// Where CRI-O looks for CDI specs when `cdi_spec_dirs` is not set.
const DEFAULT_CDI_SPEC_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];
/// The most drop-ins gpuprov reads: far more than a node has.
const FILES_CAP: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The drop-in gpuprov wrote.
    pub drop_in: String,
    /// sha256 of what it wrote: a drop-in someone changed since stays.
    pub written_sha256: String,
    pub runtime_class: String,
}

impl Record {
    pub fn load(host: &Host) -> Result<Option<Record>, StateError> {
        match host.read(RECORD)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                StateError::operator(format!("{RECORD}: {e} (move it away to start over)"))
            }),
        }
    }
}

/// Where CRI-O is on this host.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The main config (`/etc/crio/crio.conf`).
    pub config: String,
    /// The drop-in directory CRI-O reads after it.
    pub dir: String,
    /// gpuprov's drop-in there.
    pub drop_in: String,
    pub socket: String,
    pub binary: Option<String>,
}

/// CRI-O's loading: the main file `config`, then the files of `dir`,
/// sorted, each parsed (a bad one is named with its line and column).
/// `given` is a file's content to use instead of the host's (the drop-in
/// gpuprov is about to write). Each file is capped as any host file is,
/// and all of them together as containerd's imports are.
fn load(
    host: &Host,
    config: &str,
    dir: &str,
    given: Option<(&str, &str)>,
) -> Result<Vec<(String, DocumentMut)>, StateError> {
    let mut paths = vec![config.to_string()];
    // Regular files only: a link is never followed out of the
    // directory, and CRI-O's walk into a subdirectory is not gpuprov's
    // business (it writes none there).
    let mut names = match host.read_dir(dir)? {
        Some(listing) => listing
            .entries
            .iter()
            .filter(|(name, kind)| {
                *kind == rustix::fs::FileType::RegularFile && !listing.not_utf8.contains(name)
            })
            .map(|(name, _)| format!("{dir}/{name}"))
            .collect::<Vec<_>>(),
        None => Vec::new(),
    };
    if let Some((path, _)) = given
        && !names.iter().any(|n| n == path)
    {
        names.push(path.to_string());
    }
    names.sort();
    if names.len() > FILES_CAP {
        return Err(StateError::operator(format!(
            "{dir} holds more than {FILES_CAP} files: gpuprov does not read that many"
        )));
    }
    paths.extend(names);
    let mut out = Vec::new();
    let mut read = 0;
    for path in paths {
        let text = match given {
            Some((given_path, text)) if given_path == path => Some(text.to_string()),
            _ => host.read(&path)?,
        };
        let Some(text) = text else { continue };
        read += text.len();
        if read > crate::containerd::imports::TOTAL_BYTES_CAP {
            return Err(StateError::operator(format!(
                "{config} and {dir} hold more than {} bytes (at {path}): gpuprov reads no more",
                crate::containerd::imports::TOTAL_BYTES_CAP
            )));
        }
        let doc = crate::containerd::config::parse(&text)
            .map_err(|e| StateError::operator(format!("{path}:{}", e.located(&text))))?;
        out.push((path, doc));
    }
    Ok(out)
}

/// The files merged as CRI-O decodes them: tables key by key, a runtime
/// table replaced whole.
fn merge(files: &[(String, DocumentMut)]) -> Table {
    let mut root = Table::new();
    for (_, doc) in files {
        merge_into(&mut root, doc.as_table(), &[]);
    }
    root
}

fn merge_into(into: &mut Table, from: &Table, path: &[&str]) {
    // `[crio.runtime.runtimes.<name>]` is one value to CRI-O: replaced whole.
    let replaces_whole = path == ["crio", "runtime", "runtimes"];
    for (key, item) in from.iter() {
        let from_table = match item {
            Item::Table(table) => Some(table.clone()),
            Item::Value(Value::InlineTable(table)) => Some(table.clone().into_table()),
            _ => None,
        };
        match (from_table, into.get_mut(key)) {
            (Some(from_table), Some(Item::Table(existing))) if !replaces_whole => {
                let child: Vec<&str> = path.iter().copied().chain([key]).collect();
                merge_into(existing, &from_table, &child);
            }
            (Some(from_table), _) => {
                into.insert(key, Item::Table(from_table));
            }
            (None, _) => {
                into.insert(key, item.clone());
            }
        }
    }
}

fn get<'a>(table: &'a Table, path: &[&str]) -> Option<&'a Item> {
    let (last, parents) = path.split_last()?;
    let mut at = table;
    for key in parents {
        at = at.get(key)?.as_table()?;
    }
    at.get(last)
}

fn string(table: &Table, path: &[&str]) -> Option<String> {
    get(table, path).and_then(Item::as_str).map(str::to_string)
}

/// The CRI-O version `crio --version` prints (`major.minor`).
fn crio_version(host: &Host, binary: &str) -> Option<(u32, u32)> {
    let record = host
        .run(&[binary.to_string(), "--version".to_string()])
        .ok()?;
    record.success().then_some(())?;
    record.stdout.lines().find_map(|line| {
        let version = line.split_whitespace().last()?;
        let mut parts = version.trim_start_matches('v').split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    })
}

/// CRI-O's default runtime in `view`: `default_runtime`, else CRI-O's own
/// default (crun from 1.31, runc before; crun when the version is not known).
fn default_runtime(view: &Table, version: Option<(u32, u32)>) -> String {
    string(view, &["crio", "runtime", "default_runtime"])
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| match version {
            Some(version) if version < (1, 31) => "runc".to_string(),
            _ => "crun".to_string(),
        })
}

/// The runtime as wanted.
struct Wanted {
    class: String,
    binary: String,
    set_as_default: bool,
    cdi_spec_dir: Option<String>,
    cdi_runtime: Option<(String, String)>,
}

/// The drop-in gpuprov writes: the runtime copied from `base` (the
/// default runtime's table, when the files have one).
fn drop_in_text(wanted: &Wanted, base: Option<&Table>, cdi_dirs: Option<Vec<String>>) -> String {
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(
        "# Written by gpuprov: the nvidia runtime for CRI-O, copied from its default\n\
         # runtime. gpuprov writes it again if it goes missing; revert removes it.\n",
    );
    let mut crio = Table::new();
    crio.set_implicit(true);
    let mut runtime = Table::new();
    runtime.set_implicit(!(wanted.set_as_default || cdi_dirs.is_some()));
    if wanted.set_as_default {
        runtime.insert("default_runtime", toml_edit::value(&wanted.class));
    }
    if let Some(dirs) = cdi_dirs {
        runtime.insert(
            "cdi_spec_dirs",
            toml_edit::value(dirs.into_iter().collect::<toml_edit::Array>()),
        );
    }
    let mut runtimes = Table::new();
    runtimes.set_implicit(true);
    let table_for = |binary: &str| {
        let mut table = Table::new();
        table.insert("runtime_path", toml_edit::value(binary));
        table.insert("runtime_type", toml_edit::value("oci"));
        if let Some(base) = base {
            for (key, item) in base.iter() {
                // CRI-O's VM runtimes' keys mean nothing to an OCI runtime.
                if matches!(key, "runtime_path" | "runtime_type" | "runtime_config_path")
                    || item.is_table()
                {
                    continue;
                }
                if let Some(value) = item.as_value() {
                    let mut value = value.clone();
                    value.decor_mut().clear();
                    table.insert(key, Item::Value(value));
                }
            }
        }
        table
    };
    runtimes.insert(&wanted.class, Item::Table(table_for(&wanted.binary)));
    if let Some((class, binary)) = &wanted.cdi_runtime {
        runtimes.insert(class, Item::Table(table_for(binary)));
    }
    runtime.insert("runtimes", Item::Table(runtimes));
    crio.insert("runtime", Item::Table(runtime));
    doc.insert("crio", Item::Table(crio));
    doc.to_string()
}

/// Whether `view` has the runtime as wanted; the reason when not.
fn check_view(view: &Table, wanted: &Wanted, version: Option<(u32, u32)>) -> Result<(), String> {
    let path = ["crio", "runtime", "runtimes", wanted.class.as_str()];
    let Some(runtime) = get(view, &path).and_then(Item::as_table_like) else {
        return Err(format!("no [crio.runtime.runtimes.{}] table", wanted.class));
    };
    let binary = runtime.get("runtime_path").and_then(Item::as_str);
    if binary != Some(wanted.binary.as_str()) {
        return Err(format!(
            "[crio.runtime.runtimes.{}] runs {:?}, not {}",
            wanted.class, binary, wanted.binary
        ));
    }
    if wanted.set_as_default && default_runtime(view, version) != wanted.class {
        return Err(format!(
            "default_runtime is {:?}, not {}",
            default_runtime(view, version),
            wanted.class
        ));
    }
    if let Some(dir) = &wanted.cdi_spec_dir
        && !cdi_dirs(view)
            .iter()
            .any(|d| d.trim_end_matches('/') == dir)
    {
        return Err(format!("cdi_spec_dirs does not list {dir}"));
    }
    Ok(())
}

fn cdi_dirs(view: &Table) -> Vec<String> {
    match get(view, &["crio", "runtime", "cdi_spec_dirs"]).and_then(Item::as_array) {
        Some(array) => array
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        None => DEFAULT_CDI_SPEC_DIRS.map(String::from).to_vec(),
    }
}

/// CRI-O on this host, or why it is not.
pub fn target(host: &Host, opts: &crate::spec::ContainerdOptions) -> Result<Target, StateError> {
    let binary = crate::runtime::on_path(host, "crio")?;
    let dir = opts
        .crio_drop_in
        .rsplit_once('/')
        .map_or("/etc/crio/crio.conf.d", |(dir, _)| dir)
        .to_string();
    Ok(Target {
        config: opts.crio_config.clone(),
        dir,
        drop_in: opts.crio_drop_in.clone(),
        socket: opts.crio_socket.clone(),
        binary,
    })
}

/// The runtime, as the spec and the toolkit want it.
fn wanted(ctx: &StateContext) -> Result<Wanted, StateError> {
    let opts = &ctx.spec.containerd;
    Ok(Wanted {
        class: opts.runtime_class.clone(),
        binary: crate::toolkit::runtime_binary(ctx.host, ctx.spec)?,
        set_as_default: opts.set_as_default,
        cdi_spec_dir: ctx
            .spec
            .cdi
            .enabled
            .then(|| ctx.spec.cdi.spec_dir.trim_end_matches('/').to_string()),
        cdi_runtime: match (&ctx.spec.cdi.enabled, &ctx.spec.cdi.runtime_class) {
            (true, Some(class)) => Some((
                class.clone(),
                crate::toolkit::cdi_runtime_binary(ctx.host, ctx.spec)?,
            )),
            _ => None,
        },
    })
}

/// The `containerd-runtime` state on a CRI-O node.
pub fn observe(ctx: &StateContext, why: &str) -> Result<Observation, StateError> {
    let opts = &ctx.spec.containerd;
    let target = target(ctx.host, opts)?;
    let wanted = wanted(ctx)?;
    let record = Record::load(ctx.host)?;
    let version = target
        .binary
        .as_deref()
        .and_then(|binary| crio_version(ctx.host, binary));
    let note = format!("CRI-O ({why})");

    // A link where the drop-in goes is never written through.
    if let Some(link) = ctx.host.link_target(&target.drop_in)? {
        return Err(crate::host::HostError::Symlink {
            path: target.drop_in.clone(),
            target: link,
        }
        .into());
    }
    crate::runtime::refuse_linked_dir(ctx.host, &target.drop_in)?;
    let files = load(ctx.host, &target.config, &target.dir, None)?;
    let current = ctx.host.read(&target.drop_in)?;
    let ours = |text: &str| {
        record.as_ref().is_some_and(|r| {
            r.drop_in == target.drop_in && r.written_sha256 == sha256_hex(text.as_bytes())
        })
    };
    // The base runtime as CRI-O sees it without gpuprov's drop-in.
    let others: Vec<(String, DocumentMut)> = files
        .iter()
        .filter(|(path, _)| *path != target.drop_in || current.as_deref().is_some_and(|t| !ours(t)))
        .cloned()
        .collect();
    let view = merge(&files);
    let base_view = merge(&others);
    if record.is_none() && check_view(&view, &wanted, version).is_ok() {
        return Ok(Observation::new(
            Outcome::Preinstalled,
            format!(
                "runtime `{}` is already in CRI-O's config as wanted ({} and {}); {note}: nothing written",
                wanted.class, target.config, target.dir
            ),
        ));
    }
    let mut base_name = default_runtime(&base_view, version);
    if base_name == wanted.class {
        base_name = if version.is_some_and(|v| v < (1, 31)) {
            "runc"
        } else {
            "crun"
        }
        .to_string();
    }
    let base =
        get(&base_view, &["crio", "runtime", "runtimes", &base_name]).and_then(Item::as_table);
    let cdi_dirs = wanted.cdi_spec_dir.as_ref().and_then(|dir| {
        let listed = cdi_dirs(&base_view);
        (!listed.iter().any(|d| d.trim_end_matches('/') == dir)).then(|| {
            let mut dirs = listed;
            dirs.push(dir.clone());
            dirs
        })
    });
    let text = drop_in_text(&wanted, base, cdi_dirs);
    if let Some(existing) = &current
        && *existing != text
        && !ours(existing)
    {
        return Err(StateError::operator(format!(
            "{} {}: gpuprov does not overwrite another tool's drop-in; move it away, or name another file in crio.dropInConfig",
            target.drop_in,
            if record.is_some() {
                "was changed since gpuprov wrote it"
            } else {
                "exists and gpuprov did not write it"
            }
        )));
    }
    let pending = ctx.host.exists(RELOAD_PENDING)?;
    let reload = reload_changes(opts, &target, version);
    let how = reload_how(opts, version);
    let reason = format!(
        "runtime `{}` runs {} in {} (copied from CRI-O's default runtime `{base_name}`{}); {note}; {how}",
        wanted.class,
        wanted.binary,
        target.drop_in,
        if base.is_some() {
            ""
        } else {
            ", CRI-O's built-in one: no table of it in the files"
        },
    );
    // CRI-O's files with gpuprov's drop-in as wanted: a later file that
    // takes the runtime back fails the step, before anything is written.
    let with_ours = load(
        ctx.host,
        &target.config,
        &target.dir,
        Some((&target.drop_in, &text)),
    )?;
    if let Err(why) = check_view(&merge(&with_ours), &wanted, version) {
        return Ok(Observation::new(
            Outcome::Failed,
            format!(
                "{why} in CRI-O's config with gpuprov's drop-in: a file after {} takes it back",
                target.drop_in
            ),
        ));
    }
    if current.as_deref() == Some(text.as_str()) && !pending {
        return Ok(Observation::new(
            if record.is_some() {
                Outcome::Configured
            } else {
                Outcome::Preinstalled
            },
            reason,
        ));
    }
    let mut obs = Observation::new(
        Outcome::Pending,
        match &current {
            None => format!("{} does not exist; {reason}", target.drop_in),
            Some(now) if *now != text => format!(
                "{} lacks runtime `{}` as wanted; {reason}",
                target.drop_in, wanted.class
            ),
            Some(_) => format!(
                "CRI-O has not reloaded since gpuprov's last write (a run was interrupted); {reason}"
            ),
        },
    );
    obs.on_change = Outcome::Configured;
    if current.as_deref() != Some(text.as_str()) {
        let new_record = Record {
            drop_in: target.drop_in.clone(),
            written_sha256: sha256_hex(text.as_bytes()),
            runtime_class: wanted.class.clone(),
        };
        obs.changes.push(Change::WriteFile {
            path: RECORD.to_string(),
            content: (serde_json::to_string_pretty(&new_record).expect("serializes") + "\n")
                .into_bytes(),
            mode: 0o644,
            purpose: "what gpuprov changed, for revert".to_string(),
            diff: None,
        });
        if !reload.is_empty() {
            obs.changes.push(Change::WriteFile {
                path: RELOAD_PENDING.to_string(),
                content: Vec::new(),
                mode: 0o644,
                purpose: "reload owed until CRI-O has the runtime".to_string(),
                diff: None,
            });
        }
        obs.changes.push(Change::WriteFile {
            path: target.drop_in.clone(),
            content: text.clone().into_bytes(),
            mode: 0o644,
            purpose: format!("runtime `{}`", wanted.class),
            diff: Some(crate::state::file_diff(
                &target.drop_in,
                current.as_deref().unwrap_or(""),
                &text,
            )),
        });
    }
    // Before the reload: CRI-O is not made to load a config whose view
    // lacks the runtime.
    obs.changes.push(Change::own(CrioViewCheck {
        config: target.config.clone(),
        dir: target.dir.clone(),
        class: wanted.class.clone(),
        binary: wanted.binary.clone(),
        set_as_default: wanted.set_as_default,
        cdi_spec_dir: wanted.cdi_spec_dir.clone(),
        crio: target.binary.clone(),
    }));
    if reload.is_empty() {
        obs.reason
            .push_str("; restartMode is none: CRI-O loads the runtime at its next restart");
    } else {
        obs.changes.extend(reload);
        obs.changes.push(Change::RemoveFile {
            path: RELOAD_PENDING.to_string(),
            purpose: "CRI-O reloaded".to_string(),
        });
    }
    Ok(obs)
}

/// Whether this CRI-O reloads runtimes on SIGHUP (1.28 and later).
fn reloads_runtimes(version: Option<(u32, u32)>) -> bool {
    version.is_some_and(|v| v >= (1, 28))
}

fn reload_how(opts: &crate::spec::ContainerdOptions, version: Option<(u32, u32)>) -> String {
    match opts.restart_mode {
        RestartMode::None => "not reloaded (restartMode none)".to_string(),
        _ if reloads_runtimes(version) => {
            "reloaded with `systemctl reload crio` (SIGHUP: CRI-O 1.28 and later take runtimes and default_runtime then, 1.30 and later CDI's spec directories; running containers are untouched)".to_string()
        }
        _ => "restarted with `systemctl restart crio` (a CRI-O older than 1.28, or of unknown version, takes runtimes only at start)".to_string(),
    }
}

/// How CRI-O is made to take the drop-in.
pub fn reload_changes(
    opts: &crate::spec::ContainerdOptions,
    target: &Target,
    version: Option<(u32, u32)>,
) -> Vec<Change> {
    let systemctl = |verb: &str| Change::Run {
        argv: vec![
            "systemctl".to_string(),
            verb.to_string(),
            "crio".to_string(),
        ],
        display: format!("systemctl {verb} crio"),
    };
    match opts.restart_mode {
        RestartMode::None => Vec::new(),
        _ if reloads_runtimes(version) => vec![systemctl("reload")],
        _ => vec![
            systemctl("restart"),
            Change::WaitSocket {
                socket: target.socket.clone(),
                timeout_seconds: opts.restart_timeout_seconds,
            },
        ],
    }
}

/// Revert: gpuprov's drop-in removed (unless someone changed it since),
/// then CRI-O reloaded. The changes, a sentence saying what they do, and
/// whether CRI-O's config changes.
pub fn revert_plan(
    host: &Host,
    opts: &crate::spec::ContainerdOptions,
) -> Result<Option<(Vec<Change>, String, bool)>, String> {
    let chain = |e: StateError| crate::state::error_chain(&e);
    let Some(record) = Record::load(host).map_err(chain)? else {
        return Ok(None);
    };
    let target = target(host, opts).map_err(chain)?;
    let version = target
        .binary
        .as_deref()
        .and_then(|binary| crio_version(host, binary));
    let now = host
        .read(&record.drop_in)
        .map_err(|e| crate::state::error_chain(&e))?;
    let mut changes = Vec::new();
    let removed = now
        .as_ref()
        .is_some_and(|text| sha256_hex(text.as_bytes()) == record.written_sha256);
    let summary = match now {
        Some(text) if sha256_hex(text.as_bytes()) == record.written_sha256 => {
            changes.push(Change::RemoveFile {
                path: record.drop_in.clone(),
                purpose: "gpuprov's drop-in".to_string(),
            });
            changes.extend(reload_changes(opts, &target, version));
            format!("CRI-O: removed {}", record.drop_in)
        }
        Some(_) => format!(
            "CRI-O: left {}, which was changed since gpuprov wrote it",
            record.drop_in
        ),
        None => format!("CRI-O: {} is gone; nothing to revert", record.drop_in),
    };
    for path in [RELOAD_PENDING, RECORD] {
        changes.push(Change::RemoveFile {
            path: path.to_string(),
            purpose: "gpuprov's own record".to_string(),
        });
    }
    Ok(Some((changes, summary, removed)))
}

/// Check CRI-O's view of its config (its `crio config` when the host
/// has the binary, else its files merged) for the runtime.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CrioViewCheck {
    pub config: String,
    pub dir: String,
    pub class: String,
    pub binary: String,
    pub set_as_default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdi_spec_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crio: Option<String>,
}

impl CapabilityChange for CrioViewCheck {
    fn kind(&self) -> &'static str {
        "check-crio-view"
    }

    fn summary(&self) -> String {
        let (class, dir) = (&self.class, &self.dir);
        match &self.crio {
            Some(binary) => format!(
                "check runtime `{class}` in CRI-O's own view of its config and {dir} ({binary} config)"
            ),
            None => format!(
                "check runtime `{class}` in CRI-O's view of its config and {dir} (merged as CRI-O does)"
            ),
        }
    }

    fn fields(&self) -> serde_json::Value {
        json_fields(self)
    }

    fn make(&self, on: &mut MakeContext) -> Result<(), StateError> {
        verify(on.host, self, on.commands).map_err(StateError::operator)
    }
}

/// The most of `crio config` gpuprov reads: its full template is about
/// 40 KiB.
const CONFIG_OUTPUT_CAP: usize = 4 << 20;

/// CRI-O's view of its config has the runtime: `crio --config <config>
/// --config-dir <dir> config` in the host when it has the binary (values
/// CRI-O's defaults leave as they are come out commented, the runtime
/// gpuprov added does not), else the files merged as CRI-O decodes them.
pub fn verify(
    host: &Host,
    check: &CrioViewCheck,
    commands: &mut Vec<crate::host::CommandRecord>,
) -> Result<(), String> {
    let wanted = Wanted {
        class: check.class.clone(),
        binary: check.binary.clone(),
        set_as_default: check.set_as_default,
        cdi_spec_dir: check.cdi_spec_dir.clone(),
        cdi_runtime: None,
    };
    let version = check
        .crio
        .as_deref()
        .and_then(|binary| crio_version(host, binary));
    let Some(binary) = check.crio.as_deref() else {
        let files = load(host, &check.config, &check.dir, None)
            .map_err(|e| crate::state::error_chain(&e))?;
        return check_view(&merge(&files), &wanted, version).map_err(|why| {
            format!(
                "in CRI-O's files ({} and {}, merged as CRI-O does: no crio binary in the host to ask), {why}",
                check.config, check.dir
            )
        });
    };
    let argv: Vec<String> = [
        binary,
        "--config",
        &check.config,
        "--config-dir",
        &check.dir,
        "config",
    ]
    .map(String::from)
    .to_vec();
    let mut record = host
        .run_keeping(&argv, CONFIG_OUTPUT_CAP)
        .map_err(|e| crate::state::error_chain(&e))?;
    let ok = record.success();
    let summary = record.failure_summary();
    let output = record.take_stdout_keeping_tail();
    commands.push(record);
    if !ok {
        return Err(format!(
            "`{binary} config` cannot load CRI-O's config: {summary}"
        ));
    }
    if output.len() >= CONFIG_OUTPUT_CAP {
        return Err(format!(
            "`{binary} config` printed more than {CONFIG_OUTPUT_CAP} bytes"
        ));
    }
    let doc: DocumentMut = output
        .parse()
        .map_err(|e| format!("`{binary} config` printed no TOML: {e}"))?;
    check_view(doc.as_table(), &wanted, version)
        .map_err(|why| format!("in CRI-O's own view (`{binary} config`), {why}"))
}
