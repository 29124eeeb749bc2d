//! Starting the daemons a driver brings (the fabric manager, the
//! persistence daemon): through systemd where systemd runs the host and
//! the package installed the unit, else the program itself, which
//! daemonizes, as NVIDIA's driver container starts them.

use crate::host::process;
use crate::state::{Change, StateError};

/// How `program` gets started: `systemctl enable --now <unit>`, or `direct`.
pub fn start(
    host: &crate::host::Host,
    unit: &str,
    direct: Vec<String>,
) -> Result<Change, StateError> {
    if process::systemd_runs(host)? && process::unit_file(host, unit)?.is_some() {
        return Ok(systemctl_start(unit));
    }
    Ok(Change::Run {
        display: direct.join(" "),
        argv: direct,
    })
}

/// `systemctl enable --now <unit>`: started now and at every boot.
pub fn systemctl_start(unit: &str) -> Change {
    Change::Run {
        argv: ["systemctl", "enable", "--now", unit]
            .map(str::to_string)
            .to_vec(),
        display: format!("systemctl enable --now {unit}"),
    }
}

/// The driver version a program prints for `--version` (`Fabric Manager
/// version is : 550.54.15`, `nvidia-persistenced:  version 550.54.15`):
/// its first word that is one.
pub fn printed_version(output: &str) -> Option<String> {
    output
        .split(|c: char| c.is_whitespace() || c == ':' || c == ',')
        .find(|word| crate::spec::is_driver_version(word))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_the_daemons_print() {
        assert_eq!(
            printed_version("Fabric Manager version is : 550.54.15\n").as_deref(),
            Some("550.54.15")
        );
        assert_eq!(
            printed_version("\nnvidia-persistenced:  version 535.161.08\n\n").as_deref(),
            Some("535.161.08")
        );
        assert_eq!(printed_version("no version here 1.2.3.4.5\n"), None);
    }
}
