//! `devicePlugin.config`: the device plugin's own configuration files
//! (`version: v1`, `flags`, `sharing.timeSlicing` / `sharing.mps`), given
//! by name with a default, as the GPU Operator's ConfigMap holds them. A
//! node's config is the one its `nvidia.com/device-plugin.config` label
//! names, else the default.
//!
//! Checked as device plugin v0.17 reads them, and stricter where it would
//! silently ignore what was written: it drops `resources`, a `rename`
//! other than `renameByDefault`'s and `devices` other than `all`
//! (`DisableResourceNamingInConfig`), so those are refused here with the
//! place, rather than shown as working.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;

/// The GPU Operator's label that picks a node's device plugin config.
pub const PLUGIN_CONFIG_LABEL: &str = "nvidia.com/device-plugin.config";
/// The name of the config a node gets when the spec gives none.
pub const BUILTIN_PLUGIN_CONFIG: &str = "default";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPluginConfigs {
    default: Option<Spanned<String>>,
    configs: Option<Spanned<BTreeMap<String, Spanned<RawPluginConfig>>>>,
}

/// One device plugin config file, as `api/config/v1` reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPluginConfig {
    version: Option<Spanned<String>>,
    flags: Option<RawFlags>,
    resources: Option<Spanned<Value>>,
    sharing: Option<RawSharing>,
    imex: Option<RawImex>,
}

/// `flags`: the device plugin's and GFD's command-line flags. Handed over
/// as written, with `migStrategy` filled in.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFlags {
    #[serde(skip_serializing)]
    mig_strategy: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fail_on_init_error: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mps_root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nvidia_driver_root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nvidia_dev_root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gdrcopy_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gds_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mofed_enabled: Option<bool>,
    #[serde(rename = "useNodeFeatureAPI", skip_serializing_if = "Option::is_none")]
    use_node_feature_api: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_discovery_strategy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plugin: Option<RawPluginFlags>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gfd: Option<RawGfdFlags>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPluginFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    pass_device_specs: Option<bool>,
    /// One word or a list (`envvar`, `volume-mounts`, `cdi-annotations`).
    #[serde(skip_serializing_if = "Option::is_none")]
    device_list_strategy: Option<Value>,
    #[serde(rename = "deviceIDStrategy", skip_serializing_if = "Option::is_none")]
    device_id_strategy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cdi_annotation_prefix: Option<String>,
    #[serde(rename = "nvidiaCTKPath", skip_serializing_if = "Option::is_none")]
    nvidia_ctk_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_driver_root: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_devices_allocation_policy: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGfdFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    oneshot: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    no_timestamp: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sleep_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    machine_type_file: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawImex {
    #[serde(rename = "channelIDs", skip_serializing_if = "Option::is_none")]
    channel_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    required: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSharing {
    time_slicing: Option<Spanned<RawReplicated>>,
    mps: Option<Spanned<RawReplicated>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawReplicated {
    rename_by_default: Option<bool>,
    fail_requests_greater_than_one: Option<bool>,
    resources: Option<Spanned<Vec<RawReplicatedResource>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplicatedResource {
    name: Spanned<String>,
    rename: Option<Spanned<String>>,
    devices: Option<Spanned<Value>>,
    replicas: Spanned<i64>,
}

/// How a shared GPU is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharingStrategy {
    TimeSlicing,
    Mps,
}

impl SharingStrategy {
    /// GFD's `gpu.sharing-strategy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SharingStrategy::TimeSlicing => "time-slicing",
            SharingStrategy::Mps => "mps",
        }
    }
}

/// A resource offered several times over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SharedResource {
    /// In full: `nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`.
    pub name: String,
    pub replicas: u64,
}

/// `sharing`, checked: one strategy and its resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sharing {
    pub strategy: SharingStrategy,
    /// The shared resources are offered as `<name>.shared`.
    pub rename_by_default: bool,
    pub resources: Vec<SharedResource>,
}

impl Sharing {
    /// How many replicas each device of `resource` is offered as (1: not
    /// shared).
    pub fn replicas(&self, resource: &str) -> u64 {
        self.resources
            .iter()
            .find(|r| r.name == resource)
            .map_or(1, |r| r.replicas)
    }

    /// The name the device plugin offers `resource` under.
    pub fn offered_name(&self, resource: &str) -> String {
        if self.rename_by_default && self.replicas(resource) > 1 {
            format!("{resource}.shared")
        } else {
            resource.to_string()
        }
    }
}

/// One device plugin config, checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    /// `flags.migStrategy`; none: `mig.strategy`.
    pub mig_strategy: Option<MigStrategy>,
    pub sharing: Option<Sharing>,
    /// The document handed to the device plugin, less `flags.migStrategy`.
    #[serde(skip)]
    pub document: Value,
}

impl PluginConfig {
    /// The file the device plugin reads: the document with the MIG
    /// strategy in force written in, so that the plugin, GFD and
    /// gpuprov's readiness agree on it.
    pub fn file_text(&self, mig_strategy: MigStrategy) -> String {
        let mut document = self.document.clone();
        let strategy = self.mig_strategy.unwrap_or(mig_strategy);
        if let Value::Object(map) = &mut document {
            let flags = map.entry("flags").or_insert_with(|| json!({}));
            let mut ordered = serde_json::Map::new();
            ordered.insert("migStrategy".into(), json!(strategy.as_str()));
            if let Value::Object(rest) = flags.take() {
                ordered.extend(rest);
            }
            *flags = Value::Object(ordered);
        }
        serde_saphyr::to_string(&document).unwrap_or_default()
    }
}

/// `devicePlugin.config`, checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfigs {
    /// The config for a node without the label.
    pub default: String,
    /// Configs by name; always holds `default`'s.
    pub configs: BTreeMap<String, PluginConfig>,
}

impl Default for PluginConfigs {
    fn default() -> Self {
        PluginConfigs {
            default: BUILTIN_PLUGIN_CONFIG.to_string(),
            configs: BTreeMap::from([(
                BUILTIN_PLUGIN_CONFIG.to_string(),
                PluginConfig {
                    mig_strategy: None,
                    sharing: None,
                    document: json!({"version": "v1"}),
                },
            )]),
        }
    }
}

impl PluginConfigs {
    /// The config a node with these labels gets, and why; an unknown name
    /// in the label is an error naming the choices.
    pub fn chosen(
        &self,
        node_labels: &BTreeMap<String, String>,
    ) -> Result<(&str, &PluginConfig, String), String> {
        match node_labels.get(PLUGIN_CONFIG_LABEL) {
            Some(name) => match self.configs.get_key_value(name) {
                Some((name, config)) => Ok((name, config, format!("{PLUGIN_CONFIG_LABEL}={name}"))),
                None => Err(format!(
                    "{PLUGIN_CONFIG_LABEL}={name} names no config in devicePlugin.config.configs ({})",
                    self.configs
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
            None => self
                .configs
                .get(&self.default)
                .map(|config| {
                    (
                        self.default.as_str(),
                        config,
                        "devicePlugin.config.default".to_string(),
                    )
                })
                .ok_or_else(|| {
                    format!(
                        "devicePlugin.config.default `{}` names no config",
                        self.default
                    )
                }),
        }
    }
}

/// A resource name in full, as the device plugin completes it: `gpu` is
/// `nvidia.com/gpu`.
fn resource_name(written: &str) -> String {
    if written.contains('/') {
        written.to_string()
    } else {
        format!("nvidia.com/{written}")
    }
}

pub(super) fn resolve_plugin_configs(
    raw: Option<&Spanned<RawPluginConfigs>>,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> PluginConfigs {
    let Some(raw) = raw else {
        return PluginConfigs::default();
    };
    let raw_configs = raw.value.configs.as_ref();
    let mut configs = BTreeMap::new();
    for (name, config) in raw_configs.map(|c| &c.value).into_iter().flatten() {
        let prefix = format!("devicePlugin.config.configs.{name}");
        if let Err(why) = crate::label_syntax::check_label(PLUGIN_CONFIG_LABEL, name) {
            errors.push(Diagnostic::at_location(
                source,
                config.referenced,
                format!("{prefix}: the name cannot be a node label value: {why}"),
            ));
        }
        configs.insert(
            name.clone(),
            resolve_plugin_config(&config.value, &prefix, source, errors),
        );
    }
    let default = match (&raw.value.default, raw_configs) {
        (Some(default), _) => {
            if !configs.contains_key(&default.value) {
                let names: Vec<&str> = configs.keys().map(String::as_str).collect();
                let mut diagnostic = Diagnostic::at_location(
                    source,
                    default.referenced,
                    format!(
                        "devicePlugin.config.default `{}` names no config",
                        default.value
                    ),
                );
                diagnostic = match nearest(&default.value, names.iter().copied()) {
                    Some(near) => diagnostic.with_help(format!("did you mean `{near}`?")),
                    None if names.is_empty() => {
                        diagnostic.with_help("give the configs in devicePlugin.config.configs")
                    }
                    None => diagnostic.with_help(format!("configs: {}", names.join(", "))),
                };
                errors.push(diagnostic);
            }
            default.value.clone()
        }
        (None, Some(_)) if configs.contains_key(BUILTIN_PLUGIN_CONFIG) => {
            BUILTIN_PLUGIN_CONFIG.to_string()
        }
        (None, Some(_)) if configs.len() == 1 => configs.keys().next().cloned().unwrap_or_default(),
        (None, Some(given)) => {
            if !given.value.is_empty() {
                errors.push(
                    Diagnostic::at_location(
                        source,
                        given.referenced,
                        "devicePlugin.config.configs holds several configs but no default: which does a node without the nvidia.com/device-plugin.config label get?",
                    )
                    .with_help("set devicePlugin.config.default, or name one config `default`"),
                );
            }
            BUILTIN_PLUGIN_CONFIG.to_string()
        }
        (None, None) => BUILTIN_PLUGIN_CONFIG.to_string(),
    };
    if configs.is_empty() {
        return PluginConfigs {
            default,
            ..PluginConfigs::default()
        };
    }
    PluginConfigs { default, configs }
}

fn resolve_plugin_config(
    raw: &RawPluginConfig,
    prefix: &str,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> PluginConfig {
    let mut at = |location, message: String| {
        errors.push(Diagnostic::at_location(
            source,
            location,
            format!("{prefix}.{message}"),
        ))
    };
    if let Some(version) = &raw.version
        && version.value != "v1"
    {
        at(
            version.referenced,
            format!(
                "version `{}` is not a device plugin config version (v1)",
                version.value
            ),
        );
    }
    if let Some(resources) = &raw.resources {
        at(
            resources.referenced,
            "resources: the device plugin (v0.17) ignores custom resource names; remove it (MIG resources follow flags.migStrategy, shared ones sharing.*.renameByDefault)".to_string(),
        );
    }
    let mig_strategy = raw
        .flags
        .as_ref()
        .and_then(|f| f.mig_strategy.as_ref())
        .and_then(|given| match given.value.as_str() {
            "none" => Some(MigStrategy::None),
            "single" => Some(MigStrategy::Single),
            "mixed" => Some(MigStrategy::Mixed),
            other => {
                at(
                    given.referenced,
                    format!("flags.migStrategy must be none, single or mixed, not `{other}`"),
                );
                None
            }
        });
    let mut document = serde_json::Map::new();
    document.insert("version".into(), json!("v1"));
    if let Some(flags) = &raw.flags {
        let value = serde_json::to_value(flags).unwrap_or_default();
        if value.as_object().is_some_and(|o| !o.is_empty()) {
            document.insert("flags".into(), value);
        }
    }
    let mut sharing = None;
    if let Some(raw_sharing) = &raw.sharing {
        let given: Vec<(&str, SharingStrategy, &Spanned<RawReplicated>)> = [
            (
                "timeSlicing",
                SharingStrategy::TimeSlicing,
                &raw_sharing.time_slicing,
            ),
            ("mps", SharingStrategy::Mps, &raw_sharing.mps),
        ]
        .into_iter()
        .filter_map(|(key, strategy, r)| r.as_ref().map(|r| (key, strategy, r)))
        .collect();
        if let [_, (_, _, second)] = given.as_slice() {
            at(
                second.referenced,
                "sharing: timeSlicing and mps are both given; the device plugin uses one (mps), so keep one".to_string(),
            );
        }
        if let Some((key, strategy, replicated)) = given.first() {
            let (checked, written) =
                resolve_replicated(&replicated.value, replicated.referenced, key, &mut at);
            sharing = Some(Sharing {
                strategy: *strategy,
                ..checked
            });
            document.insert("sharing".into(), json!({ *key: written }));
        }
    }
    if let Some(imex) = &raw.imex {
        document.insert(
            "imex".into(),
            serde_json::to_value(imex).unwrap_or_default(),
        );
    }
    PluginConfig {
        mig_strategy,
        sharing,
        document: Value::Object(document),
    }
}

/// `sharing.timeSlicing` or `sharing.mps`: the checked resources, and the
/// section as handed over.
fn resolve_replicated(
    raw: &RawReplicated,
    location: serde_saphyr::Location,
    key: &str,
    at: &mut impl FnMut(serde_saphyr::Location, String),
) -> (Sharing, Value) {
    let rename_by_default = raw.rename_by_default.unwrap_or(false);
    let mut resources: Vec<SharedResource> = Vec::new();
    let mut written = Vec::new();
    match &raw.resources {
        None => at(
            location,
            format!("sharing.{key}.resources is missing: name the resources to share"),
        ),
        Some(list) if list.value.is_empty() => at(
            list.referenced,
            format!("sharing.{key}.resources is empty: name the resources to share"),
        ),
        Some(list) => {
            for (i, resource) in list.value.iter().enumerate() {
                let place = format!("sharing.{key}.resources[{i}]");
                let name = resource_name(&resource.name.value);
                if let Err(why) = check_shared_resource(&name) {
                    at(resource.name.referenced, format!("{place}.name {why}"));
                }
                if resources.iter().any(|r| r.name == name) {
                    at(
                        resource.name.referenced,
                        format!("{place}.name `{name}` is shared twice"),
                    );
                }
                let replicas = resource.replicas.value;
                if !(2..=1024).contains(&replicas) {
                    at(
                        resource.replicas.referenced,
                        format!("{place}.replicas must be between 2 and 1024, not {replicas}"),
                    );
                }
                if let Some(rename) = &resource.rename {
                    let default_rename = format!("{name}.shared");
                    if !(rename_by_default && resource_name(&rename.value) == default_rename) {
                        at(
                            rename.referenced,
                            format!(
                                "{place}.rename: the device plugin (v0.17) ignores rename; remove it, or set sharing.{key}.renameByDefault: true to offer {default_rename}"
                            ),
                        );
                    }
                }
                if let Some(devices) = &resource.devices
                    && devices.value != json!("all")
                {
                    at(
                        devices.referenced,
                        format!(
                            "{place}.devices: the device plugin (v0.17) shares all devices of a resource and ignores `{}`; remove it or write `all`",
                            devices.value
                        ),
                    );
                }
                resources.push(SharedResource {
                    name,
                    replicas: replicas.clamp(1, 1024) as u64,
                });
                let mut entry = serde_json::Map::new();
                entry.insert("name".into(), json!(resource.name.value));
                if let Some(rename) = &resource.rename {
                    entry.insert("rename".into(), json!(rename.value));
                }
                if let Some(devices) = &resource.devices {
                    entry.insert("devices".into(), devices.value.clone());
                }
                entry.insert("replicas".into(), json!(replicas));
                written.push(Value::Object(entry));
            }
        }
    }
    let mut section = serde_json::Map::new();
    if let Some(rename) = raw.rename_by_default {
        section.insert("renameByDefault".into(), json!(rename));
    }
    if let Some(fail) = raw.fail_requests_greater_than_one {
        section.insert("failRequestsGreaterThanOne".into(), json!(fail));
    }
    section.insert("resources".into(), Value::Array(written));
    (
        Sharing {
            strategy: SharingStrategy::TimeSlicing,
            rename_by_default,
            resources,
        },
        Value::Object(section),
    )
}

/// A resource the device plugin offers: `nvidia.com/gpu`, or a MIG
/// profile's `nvidia.com/mig-<profile>` (`+` written `.`).
fn check_shared_resource(name: &str) -> Result<(), String> {
    if name == crate::operands::GPU_RESOURCE {
        return Ok(());
    }
    let profile = name
        .strip_prefix("nvidia.com/mig-")
        .ok_or_else(|| format!("`{name}` is not a resource the device plugin offers (nvidia.com/gpu or nvidia.com/mig-<profile>)"))?;
    // `1g.10gb.me` is `1g.10gb+me` in a resource name.
    let parts: Vec<&str> = profile.split('.').collect();
    let split = parts
        .iter()
        .position(|p| p.ends_with("gb"))
        .map_or(parts.len(), |i| i + 1);
    let (base, attributes) = parts.split_at(split);
    let written = if attributes.is_empty() {
        base.join(".")
    } else {
        format!("{}+{}", base.join("."), attributes.join("."))
    };
    check_profile_name(&written).map_err(|_| {
        format!("`{name}` does not name a MIG profile (nvidia.com/mig-1g.10gb, nvidia.com/mig-1g.10gb.me)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_resources_are_the_plugins_own() {
        for good in [
            "nvidia.com/gpu",
            "nvidia.com/mig-1g.10gb",
            "nvidia.com/mig-1g.10gb.me",
            "nvidia.com/mig-1c.3g.40gb",
        ] {
            assert!(check_shared_resource(good).is_ok(), "{good}");
        }
        for bad in ["nvidia.com/gpus", "example.com/gpu", "nvidia.com/mig-big"] {
            assert!(check_shared_resource(bad).is_err(), "{bad}");
        }
        assert_eq!(resource_name("gpu"), "nvidia.com/gpu");
    }
}
