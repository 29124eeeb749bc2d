//! The `containerd:` section and its `toolkit.env` twins: the config, the
//! runtime class, the default runtime and how containerd restarts.

use super::*;

/// Values are read as text (`setAsDefault: true` and `"true"` are one) and
/// checked by the same code as their `toolkit.env` twins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawContainerd {
    // Read as text, as their `toolkit.env` twins are: `setAsDefault: true`.
    pub(super) config: Option<Spanned<EnvValue>>,
    pub(super) socket: Option<Spanned<EnvValue>>,
    pub(super) runtime_class: Option<Spanned<EnvValue>>,
    pub(super) set_as_default: Option<Spanned<EnvValue>>,
    pub(super) drop_in_config: Option<Spanned<EnvValue>>,
    pub(super) restart_mode: Option<Spanned<EnvValue>>,
    pub(super) restart_timeout_seconds: Option<Spanned<u64>>,
    pub(super) flavor: Option<Spanned<EnvValue>>,
    pub(super) edit: Option<Spanned<EnvValue>>,
}

/// The `crio:` section: where CRI-O's config is, for a CRI-O node.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCrio {
    pub(super) config: Option<Spanned<EnvValue>>,
    pub(super) drop_in_config: Option<Spanned<EnvValue>>,
    pub(super) socket: Option<Spanned<EnvValue>>,
}

/// The spec's other runtime settings, resolved with `containerd:`.
pub(super) struct Others<'a> {
    pub(super) runtime: Option<&'a Spanned<EnvValue>>,
    pub(super) crio: &'a RawCrio,
}

/// `runtime`: which container runtime gets the runtime class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// CRI-O where the host runs it (see `crate::crio::detected`), else
    /// containerd.
    Auto,
    Containerd,
    Crio,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerdOptions {
    pub config: String,
    pub socket: String,
    pub runtime_class: String,
    pub set_as_default: bool,
    /// Write the runtime to this drop-in file (imported from the main
    /// config) instead of editing the main config.
    pub drop_in_config: Option<String>,
    pub restart_mode: RestartMode,
    pub restart_timeout_seconds: u64,
    /// Whether `config` and `socket` were given (else the flavour's own).
    pub config_given: bool,
    pub socket_given: bool,
    /// The distribution's containerd layout; detected when not given.
    pub flavor: Option<Flavor>,
    /// Where the runtime goes: a drop-in or the config itself.
    pub edit: EditMode,
    pub runtime: RuntimeChoice,
    /// CRI-O's main config, which gpuprov reads and never writes.
    pub crio_config: String,
    /// gpuprov's CRI-O drop-in.
    pub crio_drop_in: String,
    pub crio_socket: String,
}

/// Whose containerd, laid out how: see `crate::runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// containerd as its own service, configured in /etc/containerd.
    Containerd,
    K3s,
    Rke2,
    K0s,
    Talos,
    Bottlerocket,
}

impl Flavor {
    pub const NAMES: [&'static str; 6] =
        ["containerd", "k3s", "rke2", "k0s", "talos", "bottlerocket"];

    pub fn parse(name: &str) -> Option<Flavor> {
        Some(match name {
            "containerd" => Flavor::Containerd,
            "k3s" => Flavor::K3s,
            "rke2" => Flavor::Rke2,
            "k0s" => Flavor::K0s,
            "talos" => Flavor::Talos,
            "bottlerocket" => Flavor::Bottlerocket,
            _ => return None,
        })
    }
}

/// `containerd.edit`: where the runtime is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EditMode {
    /// A drop-in in a directory containerd already imports, where its
    /// version merges imports key by key; the config itself otherwise.
    Auto,
    /// The config itself (or k3s's and RKE2's template).
    Config,
    /// A drop-in: in an imported directory, else one the config is made
    /// to import.
    DropIn,
}

/// How containerd picks up a changed config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// `systemctl restart containerd` in the host.
    Systemd,
    /// SIGHUP to the process serving the socket; containerd exits and its
    /// service manager starts it again.
    Signal,
    /// Never restart; the change waits for someone else's restart.
    None,
}

/// One place a containerd setting is given: `containerd.<key>` or its
/// `toolkit.env` twin.
pub(super) struct Given<'a> {
    pub(super) key: &'static str,
    pub(super) text: &'a str,
    pub(super) referenced: serde_saphyr::Location,
    pub(super) origin: String,
}

/// The `containerd:` section and the `toolkit.env` names that say the same
/// things. A setting given both ways must agree; the error names both.
pub(super) fn resolve_containerd(
    raw: &RawContainerd,
    others: &Others,
    env: &[RawEnvVar],
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> ContainerdOptions {
    let mut options = ContainerdOptions {
        config: "/etc/containerd/config.toml".to_string(),
        socket: "/run/containerd/containerd.sock".to_string(),
        runtime_class: "nvidia".to_string(),
        set_as_default: false,
        drop_in_config: None,
        restart_mode: RestartMode::Systemd,
        restart_timeout_seconds: 60,
        config_given: false,
        socket_given: false,
        flavor: None,
        edit: EditMode::Auto,
        runtime: RuntimeChoice::Auto,
        crio_config: "/etc/crio/crio.conf".to_string(),
        crio_drop_in: "/etc/crio/crio.conf.d/99-nvidia.toml".to_string(),
        crio_socket: "/var/run/crio/crio.sock".to_string(),
    };
    let mut given: Vec<Given> = [
        ("config", &raw.config),
        ("socket", &raw.socket),
        ("runtimeClass", &raw.runtime_class),
        ("setAsDefault", &raw.set_as_default),
        ("dropInConfig", &raw.drop_in_config),
        ("restartMode", &raw.restart_mode),
        ("flavor", &raw.flavor),
        ("edit", &raw.edit),
    ]
    .into_iter()
    .filter_map(|(key, value)| {
        value.as_ref().map(|value| Given {
            key,
            text: &value.value.0,
            referenced: value.referenced,
            origin: format!("containerd.{key}"),
        })
    })
    .collect();
    let crio = &others.crio;
    for (key, origin, value) in [
        ("runtime", "runtime", others.runtime),
        ("crioConfig", "crio.config", crio.config.as_ref()),
        (
            "crioDropIn",
            "crio.dropInConfig",
            crio.drop_in_config.as_ref(),
        ),
        ("crioSocket", "crio.socket", crio.socket.as_ref()),
    ] {
        if let Some(value) = value {
            given.push(Given {
                key,
                text: &value.value.0,
                referenced: value.referenced,
                origin: origin.to_string(),
            });
        }
    }

    let mut seen_env = BTreeSet::new();
    for var in env {
        let name = var.name.value.as_str();
        if !seen_env.insert(name) {
            errors.push(Diagnostic::at_location(
                source,
                var.name.referenced,
                format!("toolkit.env `{name}` is set twice"),
            ));
            continue;
        }
        match TOOLKIT_ENV.iter().find(|(env_name, _)| *env_name == name) {
            Some((_, key)) => given.push(Given {
                key,
                text: &var.value.value.0,
                referenced: var.value.referenced,
                origin: format!("toolkit.env {name}"),
            }),
            None => {
                let names: Vec<&str> = TOOLKIT_ENV.iter().map(|(n, _)| *n).collect();
                let diagnostic = Diagnostic::at_location(
                    source,
                    var.name.referenced,
                    format!("unknown toolkit.env name `{name}`"),
                );
                let help = match nearest(name, names.iter().copied()) {
                    Some(near) => {
                        format!("did you mean `{near}`? known names: {}", names.join(", "))
                    }
                    None => format!("known names: {}", names.join(", ")),
                };
                errors.push(diagnostic.with_help(help));
            }
        }
    }

    let mut settled: Vec<(&'static str, String, &Given)> = Vec::new();
    for g in &given {
        let value = g.text.trim();
        let bad = |message: String| Diagnostic::at_location(source, g.referenced, message);
        let normalised = match g.key {
            "config" | "socket" | "dropInConfig" | "crioConfig" | "crioDropIn" | "crioSocket" => {
                check_host_path(value)
                    .map(|()| value.to_string())
                    .map_err(|why| bad(format!("{} {why}", g.origin)))
            }
            "runtimeClass" => check_dns_label(value)
                .map(|()| value.to_string())
                .map_err(|why| bad(format!("{} `{value}` {why}", g.origin))),
            "setAsDefault" => match value.to_ascii_lowercase().as_str() {
                v @ ("true" | "false") => Ok(v.to_string()),
                _ => Err(
                    bad(format!("{} must be true or false, not `{value}`", g.origin))
                        .with_help("write `true` or `\"false\"`"),
                ),
            },
            "restartMode" => match value {
                "systemd" | "signal" | "none" => Ok(value.to_string()),
                _ => Err(bad(format!(
                    "{} must be systemd, signal or none, not `{value}`",
                    g.origin
                ))),
            },
            "flavor" => match value {
                "auto" => Ok(value.to_string()),
                _ if Flavor::parse(value).is_some() => Ok(value.to_string()),
                _ => Err(bad(format!(
                    "{} must be auto, {}, not `{value}`",
                    g.origin,
                    Flavor::NAMES.join(", ")
                ))),
            },
            "runtime" => match value {
                "auto" | "containerd" | "crio" => Ok(value.to_string()),
                _ => Err(bad(format!(
                    "{} must be auto, containerd or crio, not `{value}`",
                    g.origin
                ))),
            },
            "edit" => match value {
                "auto" | "config" | "dropIn" => Ok(value.to_string()),
                _ => Err(bad(format!(
                    "{} must be auto, config or dropIn, not `{value}`",
                    g.origin
                ))),
            },
            _ => unreachable!("every key is listed above"),
        };
        let normalised = match normalised {
            Ok(v) => v,
            Err(d) => {
                errors.push(d);
                continue;
            }
        };
        match settled.iter().find(|(key, _, _)| *key == g.key) {
            Some((_, earlier, first)) if *earlier != normalised => {
                errors.push(
                    Diagnostic::at_location(
                        source,
                        g.referenced,
                        format!(
                            "{} `{normalised}` disagrees with {} `{earlier}` (line {})",
                            g.origin,
                            first.origin,
                            first.referenced.line()
                        ),
                    )
                    .with_help("give the setting once, or the same value in both places"),
                );
            }
            Some(_) => {}
            None => settled.push((g.key, normalised, g)),
        }
    }
    // A drop-in that is the config itself would make it import itself.
    let setting = |name: &str| settled.iter().find(|(key, _, _)| *key == name);
    if let Some((_, drop_in, given)) = setting("dropInConfig") {
        let config = setting("config").map_or(options.config.as_str(), |(_, c, _)| c.as_str());
        let same = |a: &str, b: &str| {
            a.trim_end_matches('/').replace("//", "/") == b.trim_end_matches('/').replace("//", "/")
        };
        if same(drop_in, config) {
            errors.push(Diagnostic::at_location(
                source,
                given.referenced,
                format!(
                    "{} `{drop_in}` is containerd's config itself: a drop-in is a file of its own that the config imports",
                    given.origin
                ),
            ));
        }
    }
    for (key, value, _) in settled {
        match key {
            "config" => {
                options.config = value;
                options.config_given = true;
            }
            "socket" => {
                options.socket = value;
                options.socket_given = true;
            }
            "flavor" => options.flavor = Flavor::parse(&value),
            "runtime" => {
                options.runtime = match value.as_str() {
                    "containerd" => RuntimeChoice::Containerd,
                    "crio" => RuntimeChoice::Crio,
                    _ => RuntimeChoice::Auto,
                }
            }
            "crioConfig" => options.crio_config = value,
            "crioDropIn" => options.crio_drop_in = value,
            "crioSocket" => options.crio_socket = value,
            "edit" => {
                options.edit = match value.as_str() {
                    "config" => EditMode::Config,
                    "dropIn" => EditMode::DropIn,
                    _ => EditMode::Auto,
                }
            }
            "runtimeClass" => options.runtime_class = value,
            "setAsDefault" => options.set_as_default = value == "true",
            "dropInConfig" => options.drop_in_config = Some(value),
            "restartMode" => {
                options.restart_mode = match value.as_str() {
                    "signal" => RestartMode::Signal,
                    "none" => RestartMode::None,
                    _ => RestartMode::Systemd,
                }
            }
            _ => unreachable!("every key is listed above"),
        }
    }
    options.restart_timeout_seconds = seconds(
        &raw.restart_timeout_seconds,
        "containerd.restartTimeoutSeconds",
        options.restart_timeout_seconds,
        source,
        errors,
    );
    options
}
