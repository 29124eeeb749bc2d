//! The files containerd loads for one config (the file and its `imports`,
//! in containerd's order) and the view it merges from them, for a host
//! without a containerd binary to ask, and to name the file whose value
//! wins when containerd's view lacks the runtime.
//!
//! The rules, read in containerd's `LoadConfig` (1.6/1.7 and 2.0/2.1):
//! * the main file first, then each file's imports breadth-first, a file
//!   loaded once; an import with a `*` is a glob (matches sorted per
//!   directory), any other is a path, relative ones beside the file that
//!   names them (containerd 1.x leaves a relative glob relative to its
//!   working directory, `/`); a missing import stops containerd;
//! * containerd 1.x: a later file's `[plugins.<id>]` section replaces the
//!   earlier one whole; the last non-zero `version` wins, and version 1
//!   reads the CRI plugin at its short id `cri`;
//! * containerd 2.x: every version-1 file is migrated on its own (`cri`
//!   becomes `io.containerd.grpc.v1.cri`, then the file counts as
//!   version 3), then merged key by key; when the merged version is
//!   below 3, the CRI plugin's migration copies each key of
//!   `io.containerd.grpc.v1.cri.containerd` the runtime section lacks.

use std::collections::{BTreeMap, HashSet, VecDeque};

use toml_edit::{DocumentMut, Item, Table};

use super::pattern::Pattern;
use crate::host::Host;

/// The most files gpuprov follows through imports: far more than any
/// node has, and a bound on a host whose globs match thousands.
pub const FILES_CAP: usize = 256;

/// The most bytes gpuprov reads across those files: each is capped on its
/// own, and this keeps 256 of them from adding up to half a GiB.
pub const TOTAL_BYTES_CAP: usize = 4 * crate::host::HOST_FILE_CAP as usize;

/// Whose rules merge the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Major {
    /// containerd 1.x: plugin sections replaced whole.
    One,
    /// containerd 2.0 to 2.2: everything merged key by key.
    Two,
    /// containerd 2.3 and later: as 2.0, and it refuses to start when an
    /// imported file has a higher `version` than the main one.
    TwoThree,
}

impl Major {
    /// Without a binary to ask: a version-3 main file is for containerd 2,
    /// a version-4 one for 2.3 and later.
    pub fn guess(main_version: i64) -> Major {
        match main_version {
            4.. => Major::TwoThree,
            3 => Major::Two,
            _ => Major::One,
        }
    }

    /// The rules of containerd `major.minor`.
    pub fn of(major: u32, minor: u32) -> Major {
        match (major, minor) {
            (0 | 1, _) => Major::One,
            (2, 0..=2) => Major::Two,
            _ => Major::TwoThree,
        }
    }

    /// Whether imports are merged key by key (containerd 2), so that a
    /// drop-in with only the runtime leaves the rest of the CRI section
    /// as the main config has it; containerd 1.x replaces the section.
    pub fn merges_keys(self) -> bool {
        self != Major::One
    }

    pub fn name(self) -> &'static str {
        match self {
            Major::One => "containerd 1.x",
            Major::Two => "containerd 2.0-2.2",
            Major::TwoThree => "containerd 2.3 and later",
        }
    }
}

/// One file containerd loads, in load order.
pub struct Loaded {
    pub path: String,
    pub text: String,
    doc: std::rc::Rc<DocumentMut>,
}

/// The files containerd loads for `main` on a host without a binary to
/// ask, by the rules its main file's version suggests (`Major::guess`).
pub fn load_guessing(
    host: &Host,
    main: &str,
    given: &[(&str, &str)],
) -> Result<(Vec<Loaded>, Major), String> {
    let main_text = match given.iter().find(|(path, _)| *path == main) {
        Some((_, text)) => Some(text.to_string()),
        None => host.read(main).map_err(|e| crate::state::error_chain(&e))?,
    };
    let version = main_text
        .as_deref()
        .and_then(|text| super::config::parse_shared(text).ok())
        .and_then(|doc| doc.get("version").and_then(Item::as_integer))
        .unwrap_or(1);
    let major = Major::guess(version);
    // The main file is read once: its text goes along as given.
    let mut given = given.to_vec();
    if let Some(text) = &main_text {
        given.push((main, text));
    }
    let files = load(host, main, &given, major)?;
    // Only containerd 2.3 and later read a version-4 file: one anywhere
    // in the set says whose rules apply.
    let any_version_4 = files.iter().any(|file| {
        file.doc
            .get("version")
            .and_then(Item::as_integer)
            .is_some_and(|v| v >= 4)
    });
    let major = if major == Major::Two && any_version_4 {
        Major::TwoThree
    } else {
        major
    };
    Ok((files, major))
}

/// The files containerd loads for `main`, main first. `given` holds
/// contents to use instead of the host's (what gpuprov is about to write).
pub fn load(
    host: &Host,
    main: &str,
    given: &[(&str, &str)],
    major: Major,
) -> Result<Vec<Loaded>, String> {
    let mut pending = VecDeque::from([(main.to_string(), None::<String>)]);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut read = 0;
    while let Some((path, parent)) = pending.pop_front() {
        if !seen.insert(path.clone()) {
            continue;
        }
        if out.len() == FILES_CAP {
            return Err(format!(
                "{main} imports more than {FILES_CAP} files (counting imports of imports): gpuprov does not follow that many"
            ));
        }
        let text = match given.iter().find(|(p, _)| *p == path) {
            Some((_, text)) => Some(text.to_string()),
            None => host
                .read(&path)
                .map_err(|e| crate::state::error_chain(&e))?,
        };
        let Some(text) = text else {
            let by = parent
                .map(|p| format!(", imported by {p},"))
                .unwrap_or_default();
            return Err(format!(
                "{path}{by} does not exist: containerd does not start with an import it cannot open"
            ));
        };
        read += text.len();
        if read > TOTAL_BYTES_CAP {
            return Err(format!(
                "{main} and the files it imports hold more than {TOTAL_BYTES_CAP} bytes (at {path}): gpuprov reads no more"
            ));
        }
        let doc = super::config::parse_shared(&text)
            .map_err(|e| format!("{path}:{}", e.located(&text)))?;
        for entry in import_entries(&doc, &path)? {
            for file in resolve(host, &path, &entry, major, given)? {
                pending.push_back((file, Some(path.clone())));
            }
        }
        out.push(Loaded { path, text, doc });
    }
    Ok(out)
}

pub fn import_entries(doc: &Table, path: &str) -> Result<Vec<String>, String> {
    let Some(item) = doc.get("imports") else {
        return Ok(Vec::new());
    };
    let not_paths = || format!("{path}: `imports` must be a list of file paths");
    let array = item.as_array().ok_or_else(not_paths)?;
    array
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(not_paths))
        .collect()
}

/// The files one import entry names, as that containerd resolves it.
fn resolve(
    host: &Host,
    parent: &str,
    entry: &str,
    major: Major,
    given: &[(&str, &str)],
) -> Result<Vec<String>, String> {
    let beside = |entry: &str| {
        if entry.starts_with('/') {
            clean(entry)
        } else {
            let dir = parent.rsplit_once('/').map_or("", |(dir, _)| dir);
            clean(&format!("{dir}/{entry}"))
        }
    };
    if !entry.contains('*') {
        return Ok(vec![beside(entry)]);
    }
    let pattern = match major {
        Major::Two | Major::TwoThree => beside(entry),
        Major::One => clean(&format!("/{entry}")),
    };
    let mut found = glob(host, &pattern).map_err(|e| format!("{parent}: import {entry:?}: {e}"))?;
    // A file gpuprov is about to write there is matched as if it were.
    let extra: Vec<String> = given
        .iter()
        .map(|(path, _)| path.to_string())
        .filter(|path| !found.contains(path) && glob_matches(&pattern, path))
        .collect();
    if !extra.is_empty() {
        found.extend(extra);
        found.sort();
    }
    Ok(found)
}

/// Whether `path` matches the glob `pattern` component by component.
fn glob_matches(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let path: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    pattern.len() == path.len()
        && pattern
            .iter()
            .zip(&path)
            .all(|(p, c)| match Pattern::parse(p) {
                Ok(Some(matcher)) => matcher.matches(c),
                Ok(None) => p == c,
                Err(_) => false,
            })
}

/// `path` without `.`, `..` and repeated slashes, as Go's `filepath.Clean`
/// makes an absolute path.
fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The paths matching `pattern` (absolute, clean), as Go's `filepath.Glob`
/// finds them: each component with a wildcard matched against the sorted
/// entries of the directories matched so far.
fn glob(host: &Host, pattern: &str) -> Result<Vec<String>, String> {
    let mut found = vec![String::new()];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        let matcher = Pattern::parse(component)?;
        let mut next = Vec::new();
        for dir in &found {
            match &matcher {
                None => next.push(format!("{dir}/{component}")),
                Some(matcher) => {
                    let shown = if dir.is_empty() { "/" } else { dir };
                    // Go's Glob skips what it cannot read as a directory.
                    let Ok(names) = host.list_dir(shown) else {
                        continue;
                    };
                    next.extend(
                        names
                            .iter()
                            .filter(|name| matcher.matches(name))
                            .map(|name| format!("{dir}/{name}")),
                    );
                }
            }
            if next.len() > FILES_CAP {
                return Err(format!("matches more than {FILES_CAP} paths"));
            }
        }
        found = next;
    }
    // The last component may have been literal: only what exists counts.
    let mut out = Vec::new();
    for path in found {
        if host
            .stat(&path)
            .map_err(|e| crate::state::error_chain(&e))?
            .is_some()
        {
            out.push(path);
        }
    }
    Ok(out)
}

/// The merged config, and which file each key in it came from.
pub struct View {
    pub doc: DocumentMut,
    /// Every table and value's dotted path, with the index of the file in
    /// `load`'s list that set it last.
    from: BTreeMap<Vec<String>, usize>,
    files: Vec<String>,
    major: Major,
    /// The file whose `version` is in effect.
    version_from: Option<usize>,
    /// Why containerd would not start on these files, when it would not.
    pub refused: Option<String>,
}

impl View {
    /// The file whose value is in effect at `key`, or at its nearest
    /// ancestor that some file sets.
    pub fn source_of(&self, key: &[String]) -> Option<&str> {
        (0..=key.len())
            .rev()
            .find_map(|n| self.from.get(&key[..n]))
            .map(|i| self.files[*i].as_str())
    }

    /// The file whose `version` line is in effect, when one has it.
    pub fn version_source(&self) -> Option<&str> {
        self.version_from.map(|i| self.files[i].as_str())
    }

    /// Whether a later file's plugin section replaces an earlier one
    /// (containerd 1.x) rather than overriding its keys (2.x).
    pub fn replaces_sections(&self) -> bool {
        self.major == Major::One
    }
}

/// containerd's merge of `files` (as `load` returned them).
pub fn merge(files: &[Loaded], major: Major) -> View {
    let mut root = Table::new();
    let mut version = 0;
    let mut version_from = None;
    let mut from = BTreeMap::new();
    let mut root_version = 0;
    let mut refused = None;
    for (index, file) in files.iter().enumerate() {
        let mut doc = plain(file.doc.as_item())
            .as_table()
            .cloned()
            .unwrap_or_default();
        let mut file_version = doc.get("version").and_then(Item::as_integer).unwrap_or(0);
        // containerd 2.3 takes the first file with a version as the root's.
        if root_version == 0 {
            root_version = file_version;
        }
        if major == Major::TwoThree && file_version > root_version && refused.is_none() {
            refused = Some(format!(
                "{} has `version = {file_version}`, higher than {}'s `version = {root_version}`: {} refuses to start (\"drop-in config version {file_version} higher than root config version {root_version}\")",
                file.path,
                files[0].path,
                major.name()
            ));
        }
        if major.merges_keys() && file_version <= 1 {
            rename_v1_plugins(&mut doc);
            file_version = 3;
        }
        if file_version != 0 {
            version = file_version;
            version_from = Some(index);
        }
        let Some(plugins) = doc.get("plugins").and_then(Item::as_table) else {
            continue;
        };
        let merged = root
            .entry("plugins")
            .or_insert_with(|| Item::Table(Table::new()))
            .as_table_mut()
            .expect("plugins is always a table here");
        for (id, section) in plugins.iter() {
            let key = vec!["plugins".to_string(), id.to_string()];
            match merged.get_mut(id) {
                Some(Item::Table(into)) if major.merges_keys() && section.is_table() => {
                    merge_table(
                        into,
                        section.as_table().expect("checked"),
                        &key,
                        index,
                        &mut from,
                    );
                }
                _ => {
                    // Replaced whole: nothing of an earlier file is left.
                    from.retain(|k: &Vec<String>, _| !k.starts_with(&key));
                    merged.insert(id, section.clone());
                    record(section, &key, index, &mut from);
                }
            }
        }
    }
    if version == 0 {
        version = 1;
    }
    // containerd 1.x takes plugin ids in full from version 2 on, and
    // refuses to start on a short one (`cri`) then.
    let refused = refused.or_else(|| {
        (major == Major::One && version >= 2)
            .then(|| short_plugin_id(files, &root, &from, version, version_from))
            .flatten()
    });
    if major.merges_keys() && version < 3 {
        migrate_cri_runtime(&mut root, &mut from);
        version = 3;
    }
    root.insert("version", toml_edit::value(version));
    View {
        doc: DocumentMut::from(root),
        from,
        files: files.iter().map(|f| f.path.clone()).collect(),
        major,
        version_from,
        refused,
    }
}

/// Why containerd 1.x refuses a merged config of version 2: a short
/// plugin id (`cri`, `aufs`) where it takes full ones then.
fn short_plugin_id(
    files: &[Loaded],
    root: &Table,
    from: &BTreeMap<Vec<String>, usize>,
    version: i64,
    version_from: Option<usize>,
) -> Option<String> {
    let short = |id: &str| id.split('.').count() < 4;
    let versioned = version_from.map_or("", |i| files[i].path.as_str());
    let refused = |file: &str, what: String| {
        format!(
            "containerd 1.x would not start: {versioned} makes the merged config version {version}, which needs full plugin ids, and {file} has {what}"
        )
    };
    // Lists are appended across files: any file's short entry counts.
    for list in ["disabled_plugins", "required_plugins"] {
        for file in files {
            let entries = file.doc.get(list).and_then(Item::as_array);
            if let Some(id) = entries
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .find(|id| short(id))
            {
                return Some(refused(
                    &file.path,
                    format!(
                        "{list} entry {id:?} (containerd: \"invalid {} plugin URI\")",
                        list.trim_end_matches("_plugins")
                    ),
                ));
            }
        }
    }
    let plugins = root.get("plugins").and_then(Item::as_table)?;
    let (id, _) = plugins.iter().find(|(id, _)| short(id))?;
    let key = vec!["plugins".to_string(), id.to_string()];
    let file = from.get(&key).map_or("", |i| files[*i].path.as_str());
    Some(refused(
        file,
        format!("plugins.{id:?} (containerd: \"invalid plugin key URI\")"),
    ))
}

/// `item` with every inline table made a table, so that `a = { b = 1 }`
/// and `[a]` merge alike.
fn plain(item: &Item) -> Item {
    match item {
        Item::Table(table) => {
            let mut out = Table::new();
            for (key, value) in table.iter() {
                out.insert(key, plain(value));
            }
            Item::Table(out)
        }
        Item::Value(toml_edit::Value::InlineTable(inline)) => {
            plain(&Item::Table(inline.clone().into_table()))
        }
        other => other.clone(),
    }
}

fn record(item: &Item, key: &[String], index: usize, from: &mut BTreeMap<Vec<String>, usize>) {
    from.insert(key.to_vec(), index);
    if let Some(table) = item.as_table() {
        for (name, child) in table.iter() {
            let mut child_key = key.to_vec();
            child_key.push(name.to_string());
            record(child, &child_key, index, from);
        }
    }
}

fn merge_table(
    into: &mut Table,
    from_table: &Table,
    key: &[String],
    index: usize,
    from: &mut BTreeMap<Vec<String>, usize>,
) {
    from.insert(key.to_vec(), index);
    for (name, value) in from_table.iter() {
        let mut child_key = key.to_vec();
        child_key.push(name.to_string());
        match (into.get_mut(name), value) {
            (Some(Item::Table(existing)), Item::Table(incoming)) => {
                merge_table(existing, incoming, &child_key, index, from);
            }
            _ => {
                from.retain(|k: &Vec<String>, _| !k.starts_with(&child_key));
                into.insert(name, value.clone());
                record(value, &child_key, index, from);
            }
        }
    }
}

/// containerd 2's migration of a version-1 file: plugins get their full
/// ids. Only the CRI plugin matters to the runtime.
fn rename_v1_plugins(doc: &mut Table) {
    let Some(plugins) = doc.get_mut("plugins").and_then(Item::as_table_mut) else {
        return;
    };
    if let Some(cri) = plugins.remove("cri") {
        plugins.insert("io.containerd.grpc.v1.cri", cri);
    }
}

const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_RUNTIME: &str = "io.containerd.cri.v1.runtime";

/// containerd 2's CRI migration of a version-2 config: each key of the old
/// `containerd` section that the runtime plugin's lacks is copied (the
/// snapshotter settings moved to the image plugin).
fn migrate_cri_runtime(root: &mut Table, from: &mut BTreeMap<Vec<String>, usize>) {
    let old_key = ["plugins", CRI_V2, "containerd"].map(String::from).to_vec();
    let new_key = ["plugins", CRI_RUNTIME, "containerd"]
        .map(String::from)
        .to_vec();
    let Some(old) = root
        .get("plugins")
        .and_then(|p| p.get(CRI_V2))
        .and_then(|c| c.get("containerd"))
        .and_then(Item::as_table)
        .cloned()
    else {
        return;
    };
    let plugins = root["plugins"].as_table_mut().expect("has the old section");
    let runtime = plugins
        .entry(CRI_RUNTIME)
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut();
    let Some(runtime) = runtime else { return };
    let containerd = runtime
        .entry("containerd")
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut();
    let Some(containerd) = containerd else { return };
    let moved: Vec<(Vec<String>, usize)> = from
        .iter()
        .filter(|(k, _)| k.starts_with(&old_key))
        .map(|(k, i)| (k.clone(), *i))
        .collect();
    for (name, value) in old.iter() {
        if matches!(
            name,
            "snapshotter" | "disable_snapshot_annotations" | "discard_unpacked_layers"
        ) || containerd.contains_key(name)
        {
            continue;
        }
        containerd.insert(name, value.clone());
        let mut old_child = old_key.clone();
        old_child.push(name.to_string());
        for (k, i) in &moved {
            if k.starts_with(&old_child) {
                let mut new = new_key.clone();
                new.extend_from_slice(&k[old_key.len()..]);
                from.insert(new, *i);
            }
        }
    }
    if let Some((_, i)) = moved.iter().find(|(k, _)| *k == old_key) {
        from.entry(new_key).or_insert(*i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_glob_matching_more_files_than_the_cap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("etc/containerd/conf.d");
        std::fs::create_dir_all(&conf_d).unwrap();
        for i in 0..=FILES_CAP {
            std::fs::write(conf_d.join(format!("{i:04}.toml")), "version = 2\n").unwrap();
        }
        let host = Host::new(
            dir.path(),
            crate::host::CommandMode::Prefix,
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let main = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
        let given = [("/etc/containerd/config.toml", main)];
        let why = load(&host, "/etc/containerd/config.toml", &given, Major::One)
            .err()
            .unwrap();
        assert!(why.contains(&format!("more than {FILES_CAP}")), "{why}");
        // Files each under the per-file cap, together over the total one.
        std::fs::remove_dir_all(&conf_d).unwrap();
        std::fs::create_dir_all(&conf_d).unwrap();
        let big = format!("version = 2\n#{}\n", "x".repeat(TOTAL_BYTES_CAP / 5));
        for i in 0..5 {
            std::fs::write(conf_d.join(format!("{i}.toml")), &big).unwrap();
        }
        let why = load(&host, "/etc/containerd/config.toml", &given, Major::One)
            .err()
            .unwrap();
        assert!(
            why.contains(&format!("hold more than {TOTAL_BYTES_CAP} bytes")),
            "{why}"
        );
        // A cycle loads each file once.
        std::fs::remove_dir_all(&conf_d).unwrap();
        std::fs::create_dir_all(&conf_d).unwrap();
        std::fs::write(
            conf_d.join("a.toml"),
            "imports = [\"../config.toml\", \"a.toml\"]\n",
        )
        .unwrap();
        let files = load(&host, "/etc/containerd/config.toml", &given, Major::Two).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/etc/containerd/config.toml",
                "/etc/containerd/conf.d/a.toml"
            ]
        );
    }

    #[test]
    fn paths_are_cleaned_as_go_does() {
        assert_eq!(
            clean("/etc//containerd/./conf.d/../x.toml"),
            "/etc/containerd/x.toml"
        );
        assert_eq!(clean("/../x"), "/x");
    }
}
