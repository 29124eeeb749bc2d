//! Secure Boot, as the firmware tells the kernel: with it on, the kernel
//! loads only modules signed by a key it trusts, so a driver built on the
//! node (the runfile, DKMS) must be signed or it never loads.

use serde::Serialize;

use super::{Host, HostError};

/// Where the kernel shows the firmware's EFI variables.
pub const EFI_DIR: &str = "/sys/firmware/efi";
/// The `SecureBoot` variable (EFI global variable GUID): 4 bytes of
/// attributes, then 1 when Secure Boot is on.
pub const SECURE_BOOT_VARIABLE: &str =
    "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "problem")]
pub enum SecureBoot {
    Enabled,
    Disabled,
    /// The host booted without EFI (BIOS): there is no Secure Boot.
    NotEfi,
    /// The variable says something else: the file and what it holds.
    Unreadable(String),
}

impl SecureBoot {
    /// The node label's value.
    pub fn label(&self) -> &'static str {
        match self {
            SecureBoot::Enabled => "enabled",
            SecureBoot::Disabled | SecureBoot::NotEfi => "disabled",
            SecureBoot::Unreadable(_) => "unknown",
        }
    }
}

/// Reads the host's Secure Boot state. A variable that is not what the
/// firmware writes, or that cannot be read (a FIFO planted there), is
/// `Unreadable`, naming the file and why, never a guess and never a
/// failure of the whole run: only a driver install needs the answer.
pub fn detect(host: &Host) -> SecureBoot {
    match read(host) {
        Ok(state) => state,
        Err(e) => SecureBoot::Unreadable(crate::error_chain::error_chain(&e)),
    }
}

fn read(host: &Host) -> Result<SecureBoot, HostError> {
    if !host.stat(EFI_DIR)?.is_some_and(|info| info.directory) {
        return Ok(SecureBoot::NotEfi);
    }
    let Some(bytes) = host.read_bytes(SECURE_BOOT_VARIABLE)? else {
        return Ok(SecureBoot::Disabled);
    };
    Ok(match bytes.as_slice() {
        [_, _, _, _, 1] => SecureBoot::Enabled,
        [_, _, _, _, 0] => SecureBoot::Disabled,
        other => SecureBoot::Unreadable(format!(
            "{SECURE_BOOT_VARIABLE}: expected 4 attribute bytes and a 0 or 1, found {} bytes ({:02x?})",
            other.len(),
            &other[..other.len().min(8)]
        )),
    })
}
