//! Format-preserving edits of containerd's `config.toml`.
//!
//! Only the keys gpuprov owns change: the runtime class's table (copied
//! from the default runtime, so `SystemdCgroup` and friends carry over),
//! its `runtime_type` and `BinaryName`, and `default_runtime_name`. Every
//! other byte — comments, order, blank lines, quoting — stays as it was,
//! because toml_edit keeps each item's decor and new tables are placed
//! after their siblings rather than re-serialising the document.

use toml_edit::{DocumentMut, Item, Table, TableLike, Value};

/// The CRI runtime type gpuprov's runtime uses.
pub const RUNC_V2: &str = "io.containerd.runc.v2";

/// Which plugin holds the CRI runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `plugins.cri` (config version 1, containerd 1.x).
    V1,
    /// `plugins."io.containerd.grpc.v1.cri"` (version 2, containerd 1.x).
    V2,
    /// `plugins."io.containerd.cri.v1.runtime"` (version 3, containerd 2.x;
    /// and version 4, containerd 2.3 and later, whose changes are in the
    /// server sections only).
    V3,
}

impl Layout {
    pub fn plugin(self) -> &'static str {
        match self {
            Layout::V1 => "cri",
            Layout::V2 => "io.containerd.grpc.v1.cri",
            Layout::V3 => "io.containerd.cri.v1.runtime",
        }
    }
}

/// What the runtime class should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeWanted {
    /// The runtime handler name (`nvidia`).
    pub class: String,
    /// The toolkit's runtime binary (`/usr/bin/nvidia-container-runtime`).
    pub binary: String,
    pub default: DefaultRuntime,
    /// Turn on the CRI plugin's CDI support for specs in this directory.
    pub cdi: Option<CdiWanted>,
}

/// containerd's CDI support, as the `cdi` state wants it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiWanted {
    /// Where gpuprov writes its CDI spec (`/var/run/cdi`).
    pub spec_dir: String,
    /// A second runtime (`nvidia-cdi`) running the toolkit's runtime in
    /// CDI mode (`nvidia-container-runtime.cdi`), copied from the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<CdiRuntime>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiRuntime {
    pub class: String,
    pub binary: String,
}

/// Where containerd (1.7 and 2.x) reads CDI specs when `cdi_spec_dirs`
/// is not set.
pub const DEFAULT_CDI_SPEC_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

/// What to do with `default_runtime_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultRuntime {
    /// Make the class containerd's default runtime.
    Set,
    /// If the class is the default, stop that (gpuprov made it so earlier),
    /// as long as a runc runtime is there to fall back to.
    Clear,
    /// Leave `default_runtime_name` as it is (someone else chose it).
    Keep,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A problem at a place in the file (1-based line and column).
    #[error("{line}:{column}: {message}")]
    At {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("`{}` is not a table", dotted(keys))]
    NotATable { keys: Vec<String> },
    #[error("`version = {0}` is not a containerd config version (1, 2, 3 or 4)")]
    Version(String),
}

impl ConfigError {
    /// The error with the line and column of the key it is about in
    /// `text`, when it is about one that is there.
    pub fn located(self, text: &str) -> ConfigError {
        let keys = match &self {
            ConfigError::NotATable { keys } => keys.clone(),
            ConfigError::Version(_) => vec!["version".to_string()],
            ConfigError::At { .. } => return self,
        };
        match locate(text, &keys) {
            Some((line, column)) => ConfigError::At {
                line,
                column,
                message: self.to_string(),
            },
            None => self,
        }
    }
}

/// The edited document as text, with the original's table headers kept
/// where they say the same: toml_edit writes a key shared by several
/// headers with one quoting (`'io.containerd.grpc.v1.cri'` for a header
/// that had `"io.containerd.grpc.v1.cri"`), which would rewrite lines
/// gpuprov did not touch. A header is swapped back only for an original
/// that names the same table.
fn render(original: &str, doc: &DocumentMut) -> String {
    let rendered = doc.to_string();
    if rendered == original {
        return rendered;
    }
    let header_keys = |line: &str| -> Option<(bool, Vec<String>)> {
        let t = line.trim();
        let (array, inner) = if let Some(inner) = t.strip_prefix("[[") {
            (true, inner.split_once("]]")?.0)
        } else {
            (false, t.strip_prefix('[')?.split_once(']')?.0)
        };
        let keys = toml_edit::Key::parse(inner).ok()?;
        Some((array, keys.iter().map(|k| k.get().to_string()).collect()))
    };
    let old: Vec<&str> = original.split_inclusive('\n').collect();
    let new: Vec<&str> = rendered.split_inclusive('\n').collect();
    let diff = similar::TextDiff::from_slices(&old, &new);
    let mut out = String::with_capacity(rendered.len());
    for op in diff.ops() {
        let (old_range, new_range) = (op.old_range(), op.new_range());
        if op.tag() == similar::DiffTag::Replace && old_range.len() == new_range.len() {
            for (o, n) in old[old_range].iter().zip(&new[new_range]) {
                let same = header_keys(o).is_some() && header_keys(o) == header_keys(n);
                out.push_str(if same { o } else { n });
            }
        } else {
            for n in &new[new_range] {
                out.push_str(n);
            }
        }
    }
    out
}

/// Keys as TOML writes them: `plugins."io.containerd.grpc.v1.cri".containerd`.
fn dotted(keys: &[String]) -> String {
    keys.iter()
        .map(|k| {
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                k.clone()
            } else {
                format!("{k:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Where the value at `keys` starts in `text` (line and column), from a
/// parse that keeps positions.
fn locate(text: &str, keys: &[String]) -> Option<(usize, usize)> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut item = doc.as_item();
    let mut span = None;
    for key in keys {
        let (k, value) = item.as_table_like()?.get_key_value(key)?;
        span = value.span().or_else(|| k.span());
        item = value;
    }
    span.map(|s| line_column(text, s.start))
}

/// The result of an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    pub text: String,
    pub layout: Layout,
    /// The runtime whose settings the new runtime copied, if one was added.
    pub copied_from: Option<String>,
    /// Things a person should know (a default left as it was, …).
    pub notes: Vec<String>,
}

impl Edited {
    pub fn changed(&self, original: &str) -> bool {
        self.text != original
    }
}

/// How a config file is written apart from its TOML: a UTF-8 byte order
/// mark, and CRLF line endings (a file written on Windows, or by a tool
/// that uses them). The editor works on the text without them and puts
/// them back, so every untouched byte stays as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Encoding {
    bom: bool,
    crlf: bool,
}

impl Encoding {
    /// The encoding of `text`, and the text without it. CRLF counts only
    /// when every line ends so; a file that mixes both is edited as it is.
    fn detect(text: &str) -> (Encoding, std::borrow::Cow<'_, str>) {
        let (bom, body) = match text.strip_prefix('\u{feff}') {
            Some(body) => (true, body),
            None => (false, text),
        };
        let lines = body.matches('\n').count();
        let crlf = lines > 0 && body.matches("\r\n").count() == lines;
        let body = if crlf {
            std::borrow::Cow::Owned(body.replace("\r\n", "\n"))
        } else {
            std::borrow::Cow::Borrowed(body)
        };
        (Encoding { bom, crlf }, body)
    }

    fn restore(self, text: String) -> String {
        let text = if self.crlf {
            text.replace('\n', "\r\n")
        } else {
            text
        };
        if self.bom {
            format!("\u{feff}{text}")
        } else {
            text
        }
    }
}

pub fn parse(text: &str) -> Result<DocumentMut, ConfigError> {
    Ok(read(text)?.into_mut())
}

/// `parse`, for a document that is only read, shared: one observation
/// loads the same few files several times over (the view before and after
/// the edit, the view's key), and each parse costs more than the rest of
/// the load.
pub fn parse_shared(text: &str) -> Result<std::rc::Rc<DocumentMut>, ConfigError> {
    use std::rc::Rc;
    thread_local! {
        static PARSED: std::cell::RefCell<Vec<(String, Rc<DocumentMut>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    const KEPT: usize = 4;
    // Real configs are a few KiB; a huge one (up to the 2 MiB cap) is not
    // kept, so that it costs no more memory than before.
    const KEPT_BYTES: usize = 64 * 1024;
    if text.len() > KEPT_BYTES {
        return parse(text).map(Rc::new);
    }
    let kept = PARSED.with_borrow(|parsed| {
        parsed
            .iter()
            .find(|(kept, _)| kept == text)
            .map(|(_, doc)| doc.clone())
    });
    if let Some(doc) = kept {
        return Ok(doc);
    }
    let doc = Rc::new(parse(text)?);
    PARSED.with_borrow_mut(|parsed| {
        if parsed.len() == KEPT {
            parsed.remove(0);
        }
        parsed.push((text.to_string(), doc.clone()));
    });
    Ok(doc)
}

/// A config parsed for reading only: its values, not an editable copy of
/// every piece of its text (`parse`'s despanning is most of its cost, and
/// an observation reads the same config several times).
pub fn read(text: &str) -> Result<toml_edit::Document<&str>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    toml_edit::Document::parse(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((1, 1));
        let message = e.message().trim().to_string();
        ConfigError::At {
            line,
            column,
            message,
        }
    })
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The config version (a missing `version` means 1) and where the CRI
/// runtimes live. containerd 2 reads a version-2 file whose tables already
/// use its own plugin ids (AKS writes these), so existing tables win over
/// the header for version 2.
pub fn layout(doc: &Table) -> Result<(i64, Layout), ConfigError> {
    let version = match doc.get("version") {
        None => 1,
        Some(item) => item
            .as_integer()
            .ok_or_else(|| ConfigError::Version(item.to_string().trim().to_string()))?,
    };
    let has = |plugin: &str| {
        doc.get("plugins")
            .and_then(Item::as_table_like)
            .is_some_and(|p| p.contains_key(plugin))
    };
    let layout = match version {
        1 => Layout::V1,
        2 if has(Layout::V3.plugin()) => Layout::V3,
        2 => Layout::V2,
        3 | 4 => Layout::V3,
        other => return Err(ConfigError::Version(other.to_string())),
    };
    Ok((version, layout))
}

/// containerd's `default_runtime_name`, if the config sets one.
pub fn default_runtime_name(text: &str) -> Result<Option<String>, ConfigError> {
    let doc = parse_shared(text)?;
    layout(&doc)?;
    Ok(containerd_table(&doc)
        .and_then(|c| c.get("default_runtime_name"))
        .and_then(Item::as_str)
        .map(str::to_string))
}

/// Adds or corrects the runtime class. Idempotent: a second call on the
/// result returns it unchanged. A document with no keys at all (an empty
/// file) is written as config version `fresh_version`, the one the host's
/// containerd wants.
pub fn configure(
    text: &str,
    wanted: &RuntimeWanted,
    fresh_version: i64,
) -> Result<Edited, ConfigError> {
    let (encoding, text) = Encoding::detect(text);
    let mut edited = configure_plain(&text, wanted, fresh_version)?;
    edited.text = encoding.restore(edited.text);
    Ok(edited)
}

fn configure_plain(
    text: &str,
    wanted: &RuntimeWanted,
    fresh_version: i64,
) -> Result<Edited, ConfigError> {
    let mut doc = parse(text)?;
    if doc.as_table().is_empty() && fresh_version != 1 {
        doc.insert("version", toml_edit::value(fresh_version));
    }
    let (_, layout) = layout(&doc)?;
    let mut notes = Vec::new();
    let containerd_path = ["plugins", layout.plugin(), "containerd"];
    let containerd = ensure_table(doc.as_table_mut(), &containerd_path)?;

    let base = base_runtime(containerd, layout, &wanted.class);
    // containerd 1.x takes a file's `runtimes` table as the whole map: one
    // gpuprov creates must keep the runc runtime that is otherwise built in.
    let had_runtimes = containerd.contains_key("runtimes");
    let runtimes = ensure_child(containerd, "runtimes", &containerd_path)?;

    let mut copied_from = None;
    match (runtimes.get_mut(&wanted.class), &base) {
        (None, Some((name, base_table))) => {
            copied_from = Some(name.clone());
            let mut copy = base_table.clone();
            tidy_copy(&mut copy);
            runtimes.insert(&wanted.class, Item::Table(copy));
        }
        (None, None) => {
            let mut fresh = Table::new();
            fresh.decor_mut().set_prefix("\n");
            runtimes.insert(&wanted.class, Item::Table(fresh));
        }
        // An existing runtime keeps what its owner set; only settings it
        // lacks are taken from the base runtime (SystemdCgroup above all).
        (Some(ours), Some((_, base_table))) => fill_missing(ours, &Item::Table(base_table.clone())),
        (Some(_), None) => {}
    }

    let ours = runtimes
        .get_mut(&wanted.class)
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| ConfigError::NotATable {
            keys: containerd_path
                .iter()
                .map(|k| k.to_string())
                .chain(["runtimes".to_string(), wanted.class.clone()])
                .collect(),
        })?;
    set_str(ours, "runtime_type", RUNC_V2);
    let options = child_table_like(ours, "options")?;
    set_str(options, "BinaryName", &wanted.binary);
    if layout == Layout::V1 {
        // containerd 1.x's v1 runtime shim reads `Runtime`, not `BinaryName`.
        set_str(options, "Runtime", &wanted.binary);
    }

    let containerd = ensure_table(doc.as_table_mut(), &containerd_path)?;
    let current_default = containerd
        .get("default_runtime_name")
        .and_then(Item::as_str)
        .map(str::to_string);
    let is_default = current_default.as_deref() == Some(wanted.class.as_str());
    if wanted.default == DefaultRuntime::Set {
        set_str(containerd, "default_runtime_name", &wanted.class);
        if legacy_default_type(containerd, layout).is_some()
            && let Some(legacy) = containerd
                .get_mut(LEGACY_DEFAULT)
                .and_then(Item::as_table_like_mut)
        {
            // containerd 1.x makes a legacy `default_runtime` table with a
            // type the default, whatever default_runtime_name says; an empty
            // type turns that off and keeps the line, its comments and the
            // rest of the table (revert puts the type back).
            set_str(legacy, "runtime_type", "");
        }
        let emptied = layout != Layout::V3
            && containerd
                .get(LEGACY_DEFAULT)
                .and_then(|t| t.get("runtime_type"))
                .and_then(Item::as_str)
                == Some("");
        if emptied {
            notes.push(format!(
                "the legacy `{LEGACY_DEFAULT}` table has runtime_type = \"\", so that containerd 1.x obeys default_runtime_name"
            ));
        }
    } else if is_default && wanted.default == DefaultRuntime::Keep {
        notes.push(format!(
            "`{}` was already containerd's default runtime and stays so (CONTAINERD_SET_AS_DEFAULT is false)",
            wanted.class
        ));
    } else if is_default {
        let runc_exists = containerd
            .get("runtimes")
            .and_then(Item::as_table_like)
            .is_some_and(|r| r.contains_key("runc"));
        if runc_exists {
            containerd.remove("default_runtime_name");
        } else {
            notes.push(format!(
                "`{}` stays the default runtime: there is no runc runtime to fall back to",
                wanted.class
            ));
        }
    }

    if !had_runtimes && layout != Layout::V3 {
        keep_builtin_runc(&mut doc, layout, &mut notes)?;
    }

    if let Some(cdi) = &wanted.cdi {
        enable_cdi(&mut doc, layout, cdi)?;
        if let Some(runtime) = &cdi.runtime {
            add_cdi_runtime(&mut doc, layout, &wanted.class, runtime)?;
        }
    }

    Ok(Edited {
        text: render(text, &doc),
        layout,
        copied_from,
        notes,
    })
}

/// containerd 1.x decodes a config's `runtimes` table over its built-in
/// map, replacing it: a table that lacks the default runtime (`runc` when
/// `default_runtime_name` is not set) stops the CRI plugin ("no
/// corresponding runtime configured in `containerd.runtimes` for
/// `containerd` `default_runtime_name = "runc"`", Debian's containerd
/// 1.6). So when gpuprov makes the table, the built-in runc goes in too.
fn keep_builtin_runc(
    doc: &mut DocumentMut,
    layout: Layout,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let path = ["plugins", layout.plugin(), "containerd"];
    let containerd = ensure_table(doc.as_table_mut(), &path)?;
    let default = containerd
        .get("default_runtime_name")
        .and_then(Item::as_str)
        .unwrap_or("runc")
        .to_string();
    let runtimes = ensure_child(containerd, "runtimes", &path)?;
    if default != "runc" || runtimes.contains_key("runc") {
        return Ok(());
    }
    let mut runc = Table::new();
    runc.decor_mut().set_prefix("\n");
    runc.insert("runtime_type", toml_edit::value(RUNC_V2));
    runtimes.insert("runc", Item::Table(runc));
    notes.push(
        "the runc runtime containerd 1.x has built in is written beside it: a `runtimes` table without it would replace containerd's, and its CRI plugin would not start".to_string(),
    );
    Ok(())
}

/// The CDI runtime beside gpuprov's runtime: a copy of its table (so its
/// cgroup driver and options carry over) that runs the CDI binary.
fn add_cdi_runtime(
    doc: &mut DocumentMut,
    layout: Layout,
    class: &str,
    runtime: &CdiRuntime,
) -> Result<(), ConfigError> {
    let path = ["plugins", layout.plugin(), "containerd", "runtimes"];
    let runtimes = ensure_table(doc.as_table_mut(), &path)?;
    if runtimes.get(&runtime.class).is_none()
        && let Some(ours) = runtimes.get(class).and_then(Item::as_table)
    {
        let mut copy = ours.clone();
        tidy_copy(&mut copy);
        runtimes.insert(&runtime.class, Item::Table(copy));
    }
    let table = runtimes
        .get_mut(&runtime.class)
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| ConfigError::NotATable {
            keys: path
                .iter()
                .map(|k| k.to_string())
                .chain([runtime.class.clone()])
                .collect(),
        })?;
    set_str(table, "runtime_type", RUNC_V2);
    let options = child_table_like(table, "options")?;
    set_str(options, "BinaryName", &runtime.binary);
    if layout == Layout::V1 {
        set_str(options, "Runtime", &runtime.binary);
    }
    Ok(())
}

/// `enable_cdi = true` in the CRI plugin's own table (where containerd 1.7
/// and 2.x read it), and the spec directory in `cdi_spec_dirs` when
/// containerd would not look there already. A plugin table that only held
/// sub-tables gets its header, just before the first of them.
fn enable_cdi(doc: &mut DocumentMut, layout: Layout, cdi: &CdiWanted) -> Result<(), ConfigError> {
    let plugin = ensure_table(doc.as_table_mut(), &["plugins", layout.plugin()])?;
    if plugin.is_implicit() {
        let first_child = plugin
            .iter()
            .filter_map(|(_, item)| item.as_table()?.position())
            .min();
        plugin.set_implicit(false);
        if let Some(position) = first_child {
            plugin.set_position(Some(position));
        }
        plugin.decor_mut().set_prefix("\n");
    }
    if plugin.get("enable_cdi").and_then(Item::as_bool) != Some(true) {
        match plugin.get_mut("enable_cdi").and_then(Item::as_value_mut) {
            Some(old) => {
                let decor = old.decor().clone();
                *old = Value::from(true);
                *old.decor_mut() = decor;
            }
            None => set_value_like_siblings(plugin, "enable_cdi", Value::from(true)),
        }
    }
    let dir = cdi.spec_dir.trim_end_matches('/');
    let listed: Option<Vec<String>> =
        plugin
            .get("cdi_spec_dirs")
            .and_then(Item::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            });
    let read = listed
        .clone()
        .unwrap_or_else(|| DEFAULT_CDI_SPEC_DIRS.map(String::from).to_vec());
    if !read.iter().any(|d| d.trim_end_matches('/') == dir) {
        match plugin.get_mut("cdi_spec_dirs").and_then(Item::as_array_mut) {
            Some(array) => array.push(dir),
            None => {
                let mut array = toml_edit::Array::new();
                for d in read {
                    array.push(d);
                }
                array.push(dir);
                set_value_like_siblings(plugin, "cdi_spec_dirs", Value::Array(array));
            }
        }
    }
    Ok(())
}

/// The legacy table containerd 1.x takes as the default runtime when it
/// has a `runtime_type` (configs from 2019 and before).
pub const LEGACY_DEFAULT: &str = "default_runtime";

/// The `runtime_type` of the legacy default table, when it has one that
/// containerd 1.x obeys (containerd 2 dropped the table; version 3 files
/// are for it).
fn legacy_default_type(containerd: &dyn TableLike, layout: Layout) -> Option<String> {
    if layout == Layout::V3 {
        return None;
    }
    containerd
        .get(LEGACY_DEFAULT)?
        .get("runtime_type")?
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// The runtime whose settings a new runtime class copies: the default
/// runtime, else `runc`, else `crun`, if it is a runc-style runtime (a
/// kata or gVisor default has options that mean nothing to runc); in a
/// version-1 file without those, the legacy `default_runtime` table.
fn base_runtime(containerd: &Table, layout: Layout, class: &str) -> Option<(String, Table)> {
    let runtimes = containerd.get("runtimes").and_then(Item::as_table);
    let default = containerd
        .get("default_runtime_name")
        .and_then(Item::as_str);
    let runc_like = |table: &Table| {
        table
            .get("runtime_type")
            .and_then(Item::as_str)
            .is_none_or(|t| t == RUNC_V2 || t == "io.containerd.runtime.v1.linux")
    };
    let named = [default, Some("runc"), Some("crun")]
        .into_iter()
        .flatten()
        .filter(|name| *name != class)
        .find_map(|name| {
            let table = runtimes?.get(name)?.as_table()?;
            runc_like(table).then(|| (name.to_string(), table.clone()))
        });
    let legacy = || {
        let table = containerd.get("default_runtime")?.as_table()?;
        (layout == Layout::V1).then(|| ("default_runtime".to_string(), table.clone()))
    };
    named.or_else(legacy)
}

/// Removes the runtime class and a `default_runtime_name` naming it,
/// putting back what `original` (the file before gpuprov, when there was
/// one) had: its default runtime, and the type of a legacy default table
/// that gpuprov emptied, and, when gpuprov turned CDI on (`cdi`), the CRI
/// plugin's `enable_cdi` and `cdi_spec_dirs` as the original had them.
/// The rest of the file is left as it is.
pub fn unconfigure(
    text: &str,
    class: &str,
    original: Option<&str>,
    cdi: Option<&CdiReverted>,
) -> Result<String, ConfigError> {
    let (encoding, text) = Encoding::detect(text);
    let original = original.map(parse).transpose()?;
    let mut reverted = unconfigure_plain(&text, class, original.as_ref(), cdi.is_some())?;
    if let Some(extra) = cdi.and_then(|c| c.runtime_class.as_deref()) {
        reverted = unconfigure_plain(&reverted, extra, original.as_ref(), false)?;
    }
    Ok(encoding.restore(reverted))
}

/// What revert takes back of gpuprov's CDI setup: the CRI plugin's CDI
/// keys, and the CDI runtime when it added one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdiReverted {
    pub runtime_class: Option<String>,
}

/// The CRI plugin's CDI keys back as `original` had them (gone when it
/// did not have them, or there was no original).
fn restore_cdi(doc: &mut DocumentMut, layout: Layout, original: Option<&DocumentMut>) {
    let Some(plugin) = doc
        .get_mut("plugins")
        .and_then(|p| p.get_mut(layout.plugin()))
        .and_then(Item::as_table_like_mut)
    else {
        return;
    };
    let before = original
        .and_then(|o| o.get("plugins")?.get(layout.plugin()))
        .and_then(Item::as_table_like);
    for key in ["enable_cdi", "cdi_spec_dirs"] {
        match before.and_then(|b| b.get(key)).and_then(Item::as_value) {
            Some(value) => {
                let same = plugin
                    .get(key)
                    .and_then(Item::as_value)
                    .is_some_and(|now| now.to_string().trim() == value.to_string().trim());
                if !same {
                    plugin.insert(key, Item::Value(value.clone()));
                }
            }
            None => {
                plugin.remove(key);
            }
        }
    }
    // A header gpuprov gave the plugin table for these keys goes with them.
    let had_header = original
        .and_then(|o| o.get("plugins")?.get(layout.plugin()))
        .and_then(Item::as_table)
        .is_some_and(|t| !t.is_implicit());
    if let Some(table) = doc
        .get_mut("plugins")
        .and_then(|p| p.get_mut(layout.plugin()))
        .and_then(Item::as_table_mut)
        && !had_header
        && table.iter().all(|(_, item)| item.is_table())
    {
        table.set_implicit(true);
    }
}

/// The `containerd` table of the CRI plugin, in the document's layout.
fn containerd_table(doc: &Table) -> Option<&dyn TableLike> {
    let (_, layout) = layout(doc).ok()?;
    doc.get("plugins")?
        .get(layout.plugin())?
        .get("containerd")?
        .as_table_like()
}

fn unconfigure_plain(
    text: &str,
    class: &str,
    original: Option<&DocumentMut>,
    cdi: bool,
) -> Result<String, ConfigError> {
    let original_layout = original.and_then(|o| layout(o).ok()).map(|(_, l)| l);
    let mut doc = parse(text)?;
    let (_, layout) = layout(&doc)?;
    let original_containerd = original.and_then(|o| containerd_table(o));
    let original_default = original_containerd
        .and_then(|c| c.get("default_runtime_name"))
        .and_then(Item::as_str);
    let original_legacy = original_containerd
        .zip(original_layout)
        .and_then(|(c, l)| legacy_default_type(c, l));
    // A `[….containerd]` header gpuprov wrote only for default_runtime_name.
    let header_was_there = original
        .and_then(|o| o.get("plugins")?.get(layout.plugin())?.get("containerd"))
        .and_then(Item::as_table)
        .is_some_and(|t| !t.is_implicit());
    if let Some(containerd) = doc
        .get_mut("plugins")
        .and_then(|p| p.get_mut(layout.plugin()))
        .and_then(|c| c.get_mut("containerd"))
        .and_then(Item::as_table_like_mut)
    {
        if let Some(runtimes) = containerd
            .get_mut("runtimes")
            .and_then(Item::as_table_like_mut)
        {
            runtimes.remove(class);
            // A runtime of that name the original had (the GPU Operator's
            // `nvidia` or `nvidia-cdi`) was edited by gpuprov, not made by
            // it: the original's table comes back instead.
            if let Some(theirs) = original_containerd
                .filter(|_| original_layout == Some(layout))
                .and_then(|c| c.get("runtimes"))
                .and_then(|r| r.get(class))
            {
                runtimes.insert(class, theirs.clone());
            }
        }
        if containerd
            .get("default_runtime_name")
            .and_then(Item::as_str)
            == Some(class)
        {
            match original_default.filter(|d| *d != class) {
                Some(previous) => set_str(containerd, "default_runtime_name", previous),
                None => {
                    containerd.remove("default_runtime_name");
                }
            }
        }
        if let Some(runtime_type) = &original_legacy
            && let Some(legacy) = containerd
                .get_mut(LEGACY_DEFAULT)
                .and_then(Item::as_table_like_mut)
            && legacy.get("runtime_type").and_then(Item::as_str) == Some("")
        {
            set_str(legacy, "runtime_type", runtime_type);
        }
    }
    if !header_was_there
        && let Some(containerd) = doc
            .get_mut("plugins")
            .and_then(|p| p.get_mut(layout.plugin()))
            .and_then(|c| c.get_mut("containerd"))
            .and_then(Item::as_table_mut)
        && containerd.iter().all(|(_, item)| item.is_table())
    {
        containerd.set_implicit(true);
    }
    if cdi {
        restore_cdi(&mut doc, layout, original);
    }
    // Tables that only existed to hold the runtime (implicit: no header of
    // their own) go with it.
    prune_empty_implicit(
        doc.as_table_mut(),
        &["plugins", layout.plugin(), "containerd", "runtimes"],
    );
    Ok(render(text, &doc))
}

fn prune_empty_implicit(table: &mut Table, path: &[&str]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if let Some(child) = table.get_mut(first).and_then(Item::as_table_mut) {
        prune_empty_implicit(child, rest);
        if child.is_empty() && child.is_implicit() {
            table.remove(first);
        }
    }
}

/// The table at `path`, created (as implicit tables, which print no
/// header of their own) where missing.
fn ensure_table<'a>(root: &'a mut Table, path: &[&str]) -> Result<&'a mut Table, ConfigError> {
    let mut table = root;
    for (i, key) in path.iter().enumerate() {
        if !table.contains_key(key) {
            let mut child = Table::new();
            child.set_implicit(true);
            table.insert(key, Item::Table(child));
        }
        table = table
            .get_mut(key)
            .and_then(Item::as_table_mut)
            .ok_or_else(|| ConfigError::NotATable {
                keys: path[..=i].iter().map(|k| k.to_string()).collect(),
            })?;
    }
    Ok(table)
}

/// A child table of `containerd` (`runtimes`), created when missing; an
/// error names its whole path, not just `key`.
fn ensure_child<'a>(
    table: &'a mut Table,
    key: &str,
    path: &[&str],
) -> Result<&'a mut Table, ConfigError> {
    ensure_table(table, &[key]).map_err(|_| ConfigError::NotATable {
        keys: path.iter().chain([&key]).map(|k| k.to_string()).collect(),
    })
}

fn child_table_like<'a>(
    table: &'a mut dyn TableLike,
    key: &str,
) -> Result<&'a mut dyn TableLike, ConfigError> {
    if table.get(key).is_none() {
        let mut child = Table::new();
        child.set_implicit(false);
        table.insert(key, Item::Table(child));
    }
    table
        .get_mut(key)
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| ConfigError::NotATable {
            keys: vec![key.to_string()],
        })
}

/// Sets a string value. An existing value keeps its decor (spacing and an
/// inline comment); a new key is indented like its siblings.
fn set_str(table: &mut dyn TableLike, key: &str, value: &str) {
    if let Some(item) = table.get_mut(key)
        && let Some(old) = item.as_value()
    {
        if old.as_str() == Some(value) {
            return;
        }
        let mut new = Value::from(value);
        *new.decor_mut() = old.decor().clone();
        *item = Item::Value(new);
        return;
    }
    set_value_like_siblings(table, key, Value::from(value));
}

/// Adds to `ours` every key of `base` it lacks, recursively, leaving the
/// keys it has alone.
fn fill_missing(ours: &mut Item, base: &Item) {
    let (Some(ours), Some(base)) = (ours.as_table_like_mut(), base.as_table_like()) else {
        return;
    };
    for (key, base_item) in base.iter() {
        match ours.get_mut(key) {
            Some(existing) => fill_missing(existing, base_item),
            None if base_item.is_value() => {
                if let Some(value) = base_item.as_value() {
                    set_value_like_siblings(ours, key, value.clone());
                }
            }
            None => {
                let mut copy = base_item.clone();
                if let Some(table) = copy.as_table_mut() {
                    tidy_copy(table);
                }
                ours.insert(key, copy);
            }
        }
    }
}

fn set_value_like_siblings(table: &mut dyn TableLike, key: &str, value: Value) {
    let indent = table
        .iter()
        .filter(|(_, item)| item.is_value())
        .find_map(|(k, _)| {
            let prefix = table.key(k)?.leaf_decor().prefix()?.as_str()?.to_string();
            Some(indentation(&prefix))
        });
    table.insert(key, Item::Value(value));
    if let (Some(indent), Some(mut k)) = (indent, table.key_mut(key)) {
        k.leaf_decor_mut().set_prefix(indent);
    }
}

/// A copied table takes its place from its siblings rather than the
/// original's, and leaves the original's comments with the original: the
/// copy keeps only indentation, and its header gets one blank line before it.
fn tidy_copy(table: &mut Table) {
    table.set_position(None);
    let indent = table
        .decor()
        .prefix()
        .and_then(|p| p.as_str())
        .map(indentation)
        .unwrap_or_default();
    table.decor_mut().set_prefix(format!("\n{indent}"));
    table.decor_mut().set_suffix("");
    for (mut key, item) in table.iter_mut() {
        let indent = key
            .leaf_decor()
            .prefix()
            .and_then(|p| p.as_str())
            .map(indentation)
            .unwrap_or_default();
        key.leaf_decor_mut().set_prefix(indent);
        match item {
            Item::Value(value) => value.decor_mut().set_suffix(""),
            Item::Table(child) => tidy_copy(child),
            _ => {}
        }
    }
}

/// The whitespace a decor prefix ends with: the indentation of the line.
fn indentation(prefix: &str) -> String {
    prefix.rsplit('\n').next().unwrap_or("").to_string()
}

/// Adds `path` to the top-level `imports` unless an entry already names it
/// (directly or as a glob). Existing entries and their order stay.
pub fn add_import(text: &str, path: &str, fresh_version: i64) -> Result<String, ConfigError> {
    let (encoding, text) = Encoding::detect(text);
    add_import_plain(&text, path, fresh_version).map(|t| encoding.restore(t))
}

fn add_import_plain(text: &str, path: &str, fresh_version: i64) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    if doc.as_table().is_empty() && fresh_version != 1 {
        doc.insert("version", toml_edit::value(fresh_version));
    }
    layout(&doc)?;
    match doc.get_mut("imports").and_then(Item::as_array_mut) {
        Some(imports) => {
            let covered = imports
                .iter()
                .filter_map(Value::as_str)
                .any(|entry| super::pattern::entry_covers(entry, path));
            if !covered {
                imports.push(path);
            }
        }
        None => {
            let mut imports = toml_edit::Array::new();
            imports.push(path);
            doc.insert("imports", toml_edit::value(imports));
        }
    }
    Ok(render(text, &doc))
}

/// Removes `path` from `imports` (and `imports` itself if that empties it
/// and gpuprov added it); other entries stay.
pub fn remove_import(text: &str, path: &str) -> Result<String, ConfigError> {
    let (encoding, text) = Encoding::detect(text);
    remove_import_plain(&text, path).map(|t| encoding.restore(t))
}

fn remove_import_plain(text: &str, path: &str) -> Result<String, ConfigError> {
    let mut doc = parse(text)?;
    if let Some(imports) = doc.get_mut("imports").and_then(Item::as_array_mut) {
        imports.retain(|entry| entry.as_str() != Some(path));
        if imports.is_empty() {
            doc.remove("imports");
        }
    }
    Ok(render(text, &doc))
}

/// The drop-in file for drop-in mode: the config version and the whole CRI
/// runtime plugin section of `edited` (the main config with the runtime
/// added). containerd 1.x merges an imported file's plugin sections
/// by key, replacing the main config's section rather than merging into
/// it, so the drop-in carries the whole section, not just the runtime.
pub fn drop_in(edited: &str) -> Result<String, ConfigError> {
    section_file(
        edited,
        "# Written by gpuprov: containerd's CRI runtime section with the nvidia runtime.\n\
         # It replaces the main config's section of the same name; edit that one, and\n\
         # gpuprov writes this file again from it.\n",
    )
}

/// The drop-in that gives containerd 2 the runtime when the main config is
/// version 1: containerd 2 renames a version-1 file's plugins and then
/// takes it as version 3, so the CRI tables in it land where nothing reads
/// them (checked with containerd 2.1.9). A version-3 file imported after
/// it is read as written.
pub fn version3_drop_in(wanted: &RuntimeWanted) -> Result<String, ConfigError> {
    let edited = configure_plain("", wanted, 3)?;
    section_file(
        &edited.text,
        "# Written by gpuprov: the nvidia runtime for containerd 2, which ignores the CRI\n\
         # tables of the version-1 main config that imports this file. Converting that\n\
         # file (`containerd config migrate`) makes its own settings apply again.\n",
    )
}

/// A drop-in with only what gpuprov sets, taken from `edited` (the main
/// config with the runtime added): the runtime tables, the default runtime
/// when it is set, and CDI's keys when it is on, under `version` (the main
/// config's: containerd 2.3 refuses a drop-in with a higher one). For a containerd that merges imports key by key (2.x, k0s):
/// everything else stays as the main config has it.
pub fn runtime_drop_in(
    edited: &str,
    wanted: &RuntimeWanted,
    version: i64,
) -> Result<String, ConfigError> {
    let (_, text) = Encoding::detect(edited);
    let source = parse(&text)?;
    let (_, layout) = layout(&source)?;
    let plugin_path = ["plugins", layout.plugin()];
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(
        "# Written by gpuprov: the nvidia runtime, merged key by key into the config\n\
         # that imports this directory. gpuprov writes it again if it goes missing.\n",
    );
    doc.insert("version", toml_edit::value(version));
    let source_plugin = source
        .get("plugins")
        .and_then(|p| p.get(layout.plugin()))
        .and_then(Item::as_table_like);
    let source_containerd = source_plugin
        .and_then(|p| p.get("containerd"))
        .and_then(Item::as_table_like);
    let plugin = ensure_table(doc.as_table_mut(), &plugin_path)?;
    if wanted.cdi.is_some()
        && let Some(from) = source_plugin
    {
        plugin.set_implicit(false);
        plugin.decor_mut().set_prefix("\n");
        for key in ["enable_cdi", "cdi_spec_dirs"] {
            if let Some(value) = from.get(key).and_then(Item::as_value) {
                plugin.insert(key, Item::Value(plain_value(value)));
            }
        }
    }
    let containerd = ensure_child(plugin, "containerd", &plugin_path)?;
    if wanted.default == DefaultRuntime::Set {
        containerd.set_implicit(false);
        containerd.decor_mut().set_prefix("\n");
        containerd.insert("default_runtime_name", toml_edit::value(&wanted.class));
    }
    let runtimes = ensure_child(containerd, "runtimes", &plugin_path)?;
    let classes = std::iter::once(wanted.class.as_str()).chain(
        wanted
            .cdi
            .as_ref()
            .and_then(|c| c.runtime.as_ref())
            .map(|r| r.class.as_str()),
    );
    for class in classes {
        // A runtime written inline (`nvidia = { … }`) is copied as a table.
        let mut copy = match source_containerd
            .and_then(|c| c.get("runtimes"))
            .and_then(|r| r.get(class))
        {
            Some(Item::Table(table)) => table.clone(),
            Some(Item::Value(Value::InlineTable(inline))) => inline.clone().into_table(),
            _ => continue,
        };
        strip_decor(&mut copy);
        copy.decor_mut().set_prefix("\n");
        runtimes.insert(class, Item::Table(copy));
    }
    Ok(doc.to_string())
}

/// A value without its decor (comments and spacing of the file it came from).
fn plain_value(value: &Value) -> Value {
    let mut value = value.clone();
    value.decor_mut().clear();
    value
}

/// A copied table printed plainly: no comments or indentation of the
/// file it came from, in the order of its keys.
fn strip_decor(table: &mut Table) {
    table.decor_mut().clear();
    table.set_position(None);
    for (mut key, item) in table.iter_mut() {
        key.leaf_decor_mut().clear();
        match item {
            Item::Value(value) => value.decor_mut().clear(),
            Item::Table(child) => {
                strip_decor(child);
                child.decor_mut().set_prefix("");
            }
            _ => {}
        }
    }
}

/// A file with the config version and the CRI runtime plugin section of
/// `edited`, under `header`.
fn section_file(edited: &str, header: &str) -> Result<String, ConfigError> {
    // Parsed whole, not only read: its items are copied with their text.
    let source = parse(edited)?;
    let (version, layout) = layout(&source)?;
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(header);
    doc.insert("version", toml_edit::value(version));
    let mut plugins = Table::new();
    plugins.set_implicit(true);
    if let Some(section) = source.get("plugins").and_then(|p| p.get(layout.plugin())) {
        let mut section = section.clone();
        if let Some(table) = section.as_table_mut() {
            tidy_copy(table);
            table.decor_mut().set_prefix("\n");
        }
        plugins.insert(layout.plugin(), section);
    }
    doc.insert("plugins", Item::Table(plugins));
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_added_once_and_removed_exactly() {
        let text = "version = 2\nimports = [\"/etc/containerd/site.toml\"]  # site\n";
        let added = add_import(text, "/etc/containerd/conf.d/99-nvidia.toml", 2).unwrap();
        assert_eq!(
            added,
            "version = 2\nimports = [\"/etc/containerd/site.toml\", \"/etc/containerd/conf.d/99-nvidia.toml\"]  # site\n"
        );
        assert_eq!(
            add_import(&added, "/etc/containerd/conf.d/99-nvidia.toml", 2).unwrap(),
            added
        );
        assert_eq!(
            remove_import(&added, "/etc/containerd/conf.d/99-nvidia.toml").unwrap(),
            text
        );
        let globbed = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
        assert_eq!(
            add_import(globbed, "/etc/containerd/conf.d/99-nvidia.toml", 2).unwrap(),
            globbed
        );
    }
}
