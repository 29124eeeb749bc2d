//! `mig`: MIG layouts in mig-parted's own format (`version: v1`,
//! `mig-configs`), given inline (`mig.configs`) or as a file
//! (`mig.configFile`), so that a user's existing mig-parted file works
//! unchanged; the layout a node gets (`mig.default`, or the node label
//! `nvidia.com/mig.config`); and the MIG strategy the device plugin and
//! GFD's labels follow (`mig.strategy`, the GPU Operator's).

use std::collections::BTreeMap;

use super::*;

/// The GPU Operator's default MIG strategy.
pub const DEFAULT_MIG_STRATEGY: MigStrategy = MigStrategy::Single;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMig {
    strategy: Option<Spanned<String>>,
    default: Option<Spanned<String>>,
    configs: Option<Spanned<RawMigParted>>,
    config_file: Option<Spanned<String>>,
    timeout_seconds: Option<Spanned<u64>>,
}

/// A mig-parted document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigParted {
    version: Spanned<String>,
    #[serde(rename = "mig-configs")]
    mig_configs: Spanned<BTreeMap<String, Spanned<Vec<RawMigEntry>>>>,
}

/// One entry of a layout: which GPUs, and what they get.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigEntry {
    #[serde(rename = "device-filter")]
    device_filter: Option<Spanned<WordOrList<String>>>,
    devices: Spanned<WordOrList<u32>>,
    #[serde(rename = "mig-enabled")]
    mig_enabled: bool,
    #[serde(rename = "mig-devices")]
    mig_devices: Option<Spanned<BTreeMap<String, Spanned<u32>>>>,
}

/// A value mig-parted takes as one word or a list: `device-filter` (one
/// PCI id or several), `devices` (`all` or GPU indices).
#[derive(Debug)]
enum WordOrList<T> {
    Word(String),
    List(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for WordOrList<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = WordOrList<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a single value or a list")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WordOrList<T>, E> {
                Ok(WordOrList::Word(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<WordOrList<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<T>()? {
                    items.push(item);
                }
                Ok(WordOrList::List(items))
            }
        }
        deserializer.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

/// How the device plugin and GFD expose MIG devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigStrategy {
    /// Whole GPUs only.
    None,
    /// Every MIG device as `nvidia.com/gpu`; all GPUs must share one profile.
    Single,
    /// Each profile as its own resource, `nvidia.com/mig-<profile>`.
    Mixed,
}

impl MigStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            MigStrategy::None => "none",
            MigStrategy::Single => "single",
            MigStrategy::Mixed => "mixed",
        }
    }
}

/// Which GPUs an entry applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MigDevices {
    All,
    Indices(Vec<u32>),
}

/// One entry of a layout, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigEntry {
    /// PCI ids as NVML reports them (`0x20B010DE`: device, then vendor);
    /// empty: any GPU.
    pub device_filter: Vec<u32>,
    pub devices: MigDevices,
    pub mig_enabled: bool,
    /// Profile name (as written, `1g.10gb`, `1c.2g.10gb`, `1g.10gb+me`) →
    /// how many.
    pub mig_devices: BTreeMap<String, u32>,
}

impl MigEntry {
    /// Whether the entry names the GPU at NVML `index` with `pci_id`.
    pub fn selects(&self, index: u32, pci_id: u32) -> bool {
        let by_filter = self.device_filter.is_empty() || self.device_filter.contains(&pci_id);
        let by_index = match &self.devices {
            MigDevices::All => true,
            MigDevices::Indices(indices) => indices.contains(&index),
        };
        by_filter && by_index
    }
}

/// The `mig` section, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigSpec {
    pub strategy: MigStrategy,
    /// The layout for a node without the `nvidia.com/mig.config` label;
    /// none: such a node's MIG is left as it is.
    pub default: Option<String>,
    /// Layouts by name.
    pub configs: BTreeMap<String, Vec<MigEntry>>,
    /// Where the layouts were read (the spec, or `mig.configFile`).
    pub configs_source: String,
    /// How long a layout change waits for the GPU clients' pods to leave.
    pub timeout_seconds: u64,
}

/// The most slices a MIG profile names (a GPU has 7 or 8).
pub const MAX_MIG_SLICES: u32 = 64;

/// A MIG profile name as mig-parted writes it: `[<c>c.]<g>g.<gb>gb`, then
/// `+attr[,attr]` or `-attr`. Returns why not.
pub fn check_profile_name(name: &str) -> Result<(), String> {
    let (base, attributes) = match name.find(['+', '-']) {
        Some(i) => (&name[..i], Some(&name[i + 1..])),
        None => (name, None),
    };
    let parts: Vec<&str> = base.split('.').collect();
    // Slices are a handful (7 or 8 on every GPU with MIG); memory is GB.
    // A number past what it can mean is refused, not wrapped or dropped.
    let number = |part: &str, suffix: &str, most: u32| {
        part.strip_suffix(suffix).is_some_and(|n| {
            n.bytes().all(|b| b.is_ascii_digit())
                && n.parse::<u32>().is_ok_and(|n| (1..=most).contains(&n))
        })
    };
    let (slices, gigabytes) = (MAX_MIG_SLICES, 100_000);
    let fields_ok = match parts.as_slice() {
        [g, gb] => number(g, "g", slices) && number(gb, "gb", gigabytes),
        [c, g, gb] => {
            number(c, "c", slices) && number(g, "g", slices) && number(gb, "gb", gigabytes)
        }
        _ => false,
    };
    let attributes_ok = attributes.is_none_or(|a| {
        !a.is_empty()
            && a.split(',')
                .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'.'))
    });
    if fields_ok && attributes_ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a MIG profile (write it as nvidia-smi does: 1g.10gb, 1c.2g.20gb, 1g.10gb+me)"
        ))
    }
}

/// `0x20B010DE` → 0x20b010de.
fn parse_pci_id(text: &str) -> Option<u32> {
    let hex = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))?;
    (hex.len() == 8)
        .then(|| u32::from_str_radix(hex, 16).ok())
        .flatten()
}

pub(super) fn resolve_mig(raw: &RawMig, source: &Source, errors: &mut Vec<Diagnostic>) -> MigSpec {
    let strategy = choose(
        "mig.strategy",
        &raw.strategy,
        &[
            ("none", MigStrategy::None),
            ("single", MigStrategy::Single),
            ("mixed", MigStrategy::Mixed),
        ],
        DEFAULT_MIG_STRATEGY,
        source,
        errors,
    );
    let timeout_seconds = seconds(
        &raw.timeout_seconds,
        "mig.timeoutSeconds",
        300,
        source,
        errors,
    );
    let (configs, configs_source) = match (&raw.configs, &raw.config_file) {
        (Some(_), Some(file)) => {
            errors.push(Diagnostic::at_location(
                source,
                file.referenced,
                "mig.configs and mig.configFile are both given; keep one",
            ));
            (BTreeMap::new(), source.name.clone())
        }
        (Some(inline), None) => (
            resolve_document(&inline.value, "mig.configs: ", source, errors),
            source.name.clone(),
        ),
        (None, Some(file)) => match read_config_file(&file.value, source) {
            Ok(file_source) => {
                let configs = parse_document(&file_source, errors);
                (configs, file_source.name)
            }
            Err(why) => {
                errors.push(Diagnostic::at_location(source, file.referenced, why));
                (BTreeMap::new(), source.name.clone())
            }
        },
        (None, None) => (BTreeMap::new(), source.name.clone()),
    };
    let default = raw.default.as_ref().map(|name| {
        let known = configs.contains_key(&name.value) || generated_layout(&name.value).is_some();
        if !known {
            let mut diagnostic = Diagnostic::at_location(
                source,
                name.referenced,
                format!("mig.default `{}` names no layout", name.value),
            );
            let names: Vec<&str> = configs.keys().map(String::as_str).collect();
            diagnostic = match nearest(&name.value, names.iter().copied()) {
                Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
                None if names.is_empty() => diagnostic.with_help(
                    "give the layouts in mig.configs or mig.configFile; built in are all-disabled, all-enabled and all-<profile>",
                ),
                None => diagnostic.with_help(format!("layouts: {}", names.join(", "))),
            };
            errors.push(diagnostic);
        }
        name.value.clone()
    });
    MigSpec {
        strategy,
        default,
        configs,
        configs_source,
        timeout_seconds,
    }
}

/// The layouts every node has without a file: `all-disabled`,
/// `all-enabled` (MIG on, no instances), and `all-<profile>` (every GPU
/// filled with as many of that profile as it holds; count 0 here means
/// "as many as fit", resolved against the GPU).
pub fn generated_layout(name: &str) -> Option<Vec<MigEntry>> {
    let entry = |enabled: bool, devices: BTreeMap<String, u32>| MigEntry {
        device_filter: Vec::new(),
        devices: MigDevices::All,
        mig_enabled: enabled,
        mig_devices: devices,
    };
    match name {
        "all-disabled" => Some(vec![entry(false, BTreeMap::new())]),
        "all-enabled" => Some(vec![entry(true, BTreeMap::new())]),
        _ => {
            let profile = name.strip_prefix("all-")?;
            // GPU Operator names write `+me` as `.me` (all-1g.10gb.me).
            let profile = match profile.strip_suffix(".me") {
                Some(base) => format!("{base}+me"),
                None => profile.to_string(),
            };
            check_profile_name(&profile).ok()?;
            Some(vec![entry(true, BTreeMap::from([(profile, 0)]))])
        }
    }
}

/// Reads `mig.configFile`: a path on the machine gpuprov runs on (a
/// ConfigMap mounted into its pod), relative to the spec's directory.
fn read_config_file(path: &str, spec: &Source) -> Result<Source, String> {
    let path = Path::new(path);
    let full = if path.is_relative() {
        Path::new(&spec.name)
            .parent()
            .unwrap_or(Path::new("."))
            .join(path)
    } else {
        path.to_path_buf()
    };
    let text = crate::host::read_user_file(&full, crate::host::USER_FILE_CAP)
        .map_err(|e| format!("cannot read mig.configFile {}: {e}", full.display()))?;
    Ok(Source {
        name: full.display().to_string(),
        text,
    })
}

/// A mig-parted file as mig-parted itself reads it (YAML's usual scalars).
fn parse_document(
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Vec<MigEntry>> {
    match serde_saphyr::from_str::<RawMigParted>(&source.text) {
        Ok(raw) => resolve_document(&raw, "", source, errors),
        Err(e) => {
            errors.push(Diagnostic::from_yaml(source, &e));
            BTreeMap::new()
        }
    }
}

fn resolve_document(
    raw: &RawMigParted,
    prefix: &str,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Vec<MigEntry>> {
    let mut at = |location, message: String| {
        errors.push(Diagnostic::at_location(
            source,
            location,
            format!("{prefix}{message}"),
        ))
    };
    if raw.version.value != "v1" {
        at(
            raw.version.referenced,
            format!(
                "version `{}` is not a mig-parted version gpuprov reads (v1)",
                raw.version.value
            ),
        );
    }
    if raw.mig_configs.value.is_empty() {
        at(
            raw.mig_configs.referenced,
            "mig-configs holds no layout".to_string(),
        );
    }
    let mut configs = BTreeMap::new();
    for (name, entries) in &raw.mig_configs.value {
        if let Err(why) = crate::label_syntax::check_label("nvidia.com/mig.config", name) {
            at(
                entries.referenced,
                format!("layout name `{name}` cannot be a node label value: {why}"),
            );
        }
        if entries.value.is_empty() {
            at(entries.referenced, format!("layout `{name}` has no entry"));
        }
        let mut resolved = Vec::new();
        for entry in &entries.value {
            let mut device_filter = Vec::new();
            if let Some(filter) = &entry.device_filter {
                let ids = match &filter.value {
                    WordOrList::Word(id) => std::slice::from_ref(id),
                    WordOrList::List(ids) => ids.as_slice(),
                };
                for id in ids {
                    match parse_pci_id(id) {
                        Some(id) => device_filter.push(id),
                        None => at(
                            filter.referenced,
                            format!(
                                "device-filter `{id}` is not a PCI id as NVML writes it (0x20B010DE: device then vendor)"
                            ),
                        ),
                    }
                }
            }
            let devices = match &entry.devices.value {
                WordOrList::Word(word) if word == "all" => MigDevices::All,
                WordOrList::Word(word) => {
                    at(
                        entry.devices.referenced,
                        format!("devices must be `all` or a list of GPU indices, not `{word}`"),
                    );
                    MigDevices::All
                }
                WordOrList::List(indices) => MigDevices::Indices(indices.clone()),
            };
            let mut mig_devices = BTreeMap::new();
            match (&entry.mig_devices, entry.mig_enabled) {
                (None, true) => at(
                    entry.devices.referenced,
                    format!(
                        "layout `{name}`: mig-enabled is true but mig-devices is missing (write `mig-devices: {{}}` for none)"
                    ),
                ),
                (Some(wanted), false) if !wanted.value.is_empty() => at(
                    wanted.referenced,
                    format!("layout `{name}`: mig-devices are given but mig-enabled is false"),
                ),
                (Some(wanted), _) => {
                    for (profile, count) in &wanted.value {
                        if let Err(why) = check_profile_name(profile) {
                            at(count.referenced, why);
                        }
                        if count.value == 0 {
                            at(
                                count.referenced,
                                format!("`{profile}`: a count must be at least 1"),
                            );
                        }
                        mig_devices.insert(profile.clone(), count.value);
                    }
                }
                (None, false) => {}
            }
            resolved.push(MigEntry {
                device_filter,
                devices,
                mig_enabled: entry.mig_enabled,
                mig_devices,
            });
        }
        configs.insert(name.clone(), resolved);
    }
    configs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names_follow_nvidia_smi() {
        for good in [
            "1g.5gb",
            "1c.3g.20gb",
            "1g.10gb+me",
            "7g.141gb",
            "1g.24gb+gfx",
            "1g.10gb-me",
        ] {
            assert!(check_profile_name(good).is_ok(), "{good}");
        }
        for bad in [
            "1g",
            "g.5gb",
            "1g.5GB",
            "0g.5gb",
            "1g.5gb+",
            "1x.1g.5gb",
            "99999999999c.7g.80gb",
            "4294967297g.80gb",
            "+1c.7g.80gb",
            "",
        ] {
            assert!(check_profile_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_layouts_cover_the_gpu_operator_names() {
        assert!(!generated_layout("all-disabled").unwrap()[0].mig_enabled);
        assert_eq!(
            generated_layout("all-1g.10gb.me").unwrap()[0].mig_devices,
            BTreeMap::from([("1g.10gb+me".to_string(), 0)])
        );
        assert!(generated_layout("all-balanced").is_none());
        assert!(generated_layout("custom").is_none());
    }
}
