//! `cdi`: the Container Device Interface spec gpuprov writes for the
//! node's GPUs (the GPU Operator's `cdi.enabled`).

use super::*;

/// Where CDI consumers (containerd, CRI-O, podman) look by default; the
/// toolkit's `nvidia-ctk cdi generate` writes here too.
pub const DEFAULT_CDI_SPEC_DIR: &str = "/var/run/cdi";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCdi {
    enabled: Option<Spanned<bool>>,
    spec_dir: Option<Spanned<String>>,
    runtime_class: Option<Spanned<String>>,
}

/// The runtime class the GPU Operator adds beside `nvidia` with CDI on:
/// the toolkit's runtime in CDI mode.
pub const DEFAULT_CDI_RUNTIME_CLASS: &str = "nvidia-cdi";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiSpec {
    /// Write the spec, turn on containerd's CDI support and tell the
    /// device plugin to hand devices out by CDI name.
    pub enabled: bool,
    /// The directory the spec files go to (`/var/run/cdi` or `/etc/cdi`).
    pub spec_dir: String,
    /// A containerd runtime (and runtime class) running the toolkit's
    /// `nvidia-container-runtime.cdi`; none when the spec says `""`.
    pub runtime_class: Option<String>,
}

/// `containerd_class` is the runtime class gpuprov configures; the CDI
/// runtime needs a name of its own beside it. With `devicePlugin.mode:
/// dra` CDI is on unless the spec says otherwise, and saying so is an
/// error: DRA hands devices to containers by CDI name alone.
pub(super) fn resolve_cdi(
    raw: &RawCdi,
    containerd_class: &str,
    plugin_mode: PluginMode,
    source: &Source,
    errors: &mut Vec<Diagnostic>,
) -> CdiSpec {
    let dra = plugin_mode == PluginMode::Dra;
    if let Some(enabled) = raw.enabled.as_ref().filter(|e| dra && !e.value) {
        errors.push(
            Diagnostic::at_location(
                source,
                enabled.referenced,
                "cdi.enabled is false, and devicePlugin.mode dra hands GPUs to containers through CDI"
                    .to_string(),
            )
            .with_help("leave cdi.enabled out (DRA turns it on), or set devicePlugin.mode: operand"),
        );
    }
    let spec_dir = host_dir(
        "cdi.specDir",
        &raw.spec_dir,
        DEFAULT_CDI_SPEC_DIR,
        source,
        errors,
    );
    let runtime_class = match &raw.runtime_class {
        None => Some(DEFAULT_CDI_RUNTIME_CLASS.to_string()),
        Some(class) if class.value.is_empty() => None,
        Some(class) => {
            if let Err(problem) = super::states::check_dns_label(&class.value) {
                errors.push(Diagnostic::at_location(
                    source,
                    class.referenced,
                    format!("cdi.runtimeClass {problem}"),
                ));
            } else if class.value == containerd_class {
                errors.push(Diagnostic::at_location(
                    source,
                    class.referenced,
                    format!(
                        "cdi.runtimeClass `{}` is containerd.runtimeClass too: the CDI runtime \
                         needs a name of its own (or \"\" for none)",
                        class.value
                    ),
                ));
            }
            Some(class.value.clone())
        }
    };
    CdiSpec {
        enabled: raw.enabled.as_ref().map_or(dra, |e| e.value),
        spec_dir,
        runtime_class,
    }
}
