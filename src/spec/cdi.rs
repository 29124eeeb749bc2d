//! `cdi`: the Container Device Interface spec gpuprov writes for the
//! node's GPUs (the GPU Operator's `cdi.enabled`).

use super::*;

/// Where CDI consumers (containerd, CRI-O, podman) look by default; the
/// toolkit's `nvidia-ctk cdi generate` writes here too.
pub const DEFAULT_CDI_SPEC_DIR: &str = "/var/run/cdi";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawCdi {
    enabled: Option<bool>,
    spec_dir: Option<Spanned<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiSpec {
    /// Write the spec, turn on containerd's CDI support and tell the
    /// device plugin to hand devices out by CDI name.
    pub enabled: bool,
    /// The directory the spec files go to (`/var/run/cdi` or `/etc/cdi`).
    pub spec_dir: String,
}

pub(super) fn resolve_cdi(raw: &RawCdi, source: &Source, errors: &mut Vec<Diagnostic>) -> CdiSpec {
    let spec_dir = match &raw.spec_dir {
        None => DEFAULT_CDI_SPEC_DIR.to_string(),
        Some(dir) => {
            if let Err(problem) = check_host_path(&dir.value) {
                errors.push(Diagnostic::at_location(
                    source,
                    dir.referenced,
                    format!("cdi.specDir {problem}"),
                ));
            }
            dir.value.trim_end_matches('/').to_string()
        }
    };
    CdiSpec {
        enabled: raw.enabled.unwrap_or(false),
        spec_dir,
    }
}
