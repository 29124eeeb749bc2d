//! Is an NVIDIA kernel driver loaded, and which?

use serde::Serialize;

use crate::host::{Host, HostError};
use crate::spec::is_driver_version;

pub const MODULE_REFCNT: &str = "/sys/module/nvidia/refcnt";
pub const VERSION_FILE: &str = "/proc/driver/nvidia/version";

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("{path}: {problem}")]
    Bad { path: &'static str, problem: String },
}

/// A loaded NVIDIA kernel driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadedDriver {
    pub version: String,
    /// NVIDIA's open kernel modules rather than the proprietary ones.
    pub open_kernel_module: bool,
}

/// `None` when the `nvidia` module is not loaded. A loaded module whose
/// version file is missing or unreadable is an error, not "absent": a
/// half-loaded driver must not be mistaken for no driver.
pub fn detect(host: &Host) -> Result<Option<LoadedDriver>, DetectError> {
    let Some(refcnt) = host.read(MODULE_REFCNT)? else {
        return Ok(None);
    };
    if refcnt.trim().parse::<u64>().is_err() {
        return Err(DetectError::Bad {
            path: MODULE_REFCNT,
            problem: format!("expected a reference count, found {refcnt:?}"),
        });
    }
    let text = host.read(VERSION_FILE)?.ok_or(DetectError::Bad {
        path: VERSION_FILE,
        problem: "the nvidia module is loaded but this file is missing".to_string(),
    })?;
    parse_version_file(&text)
        .map(Some)
        .ok_or_else(|| DetectError::Bad {
            path: VERSION_FILE,
            problem: format!(
                "no `NVRM version:` line with a driver version in {:?}",
                text.lines().next().unwrap_or("")
            ),
        })
}

/// Reads `NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.161.08  …` and
/// `NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  …`.
pub fn parse_version_file(text: &str) -> Option<LoadedDriver> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("NVRM version:"))?;
    let version = line
        .split_whitespace()
        .find(|word| is_driver_version(word))?;
    Some(LoadedDriver {
        version: version.to_string(),
        open_kernel_module: line.contains("Open Kernel Module"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proprietary_and_open_version_lines() {
        let proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.161.08  Tue Mar  5 22:42:15 UTC 2024\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(
            parse_version_file(proprietary),
            Some(LoadedDriver {
                version: "535.161.08".into(),
                open_kernel_module: false
            })
        );
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  550.54.15  Release Build  (dvs-builder@U16-I3-B03-4-3)  Tue Feb 20 12:38:19 UTC 2024\n";
        assert_eq!(
            parse_version_file(open),
            Some(LoadedDriver {
                version: "550.54.15".into(),
                open_kernel_module: true
            })
        );
        assert_eq!(parse_version_file("garbage\n"), None);
    }
}
