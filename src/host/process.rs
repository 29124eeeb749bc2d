//! Host daemons as the host shows them: which processes run a program
//! (from `/proc/<pid>/cmdline`, read only), and whether systemd runs the
//! host and has a unit.
//!
//! A process is identified by its own command line, never by its name in
//! `comm` (cut to 15 bytes: `nv-fabricmanage`) or by a pid file someone
//! else could have left behind. Nothing here signals anything.

use super::{Host, HostError};

/// The pids whose command line starts with `program` (its file name, at
/// any path: `nv-fabricmanager`, `/usr/bin/nv-fabricmanager`). A process
/// that ends while it is read, or whose command line cannot be read, is
/// not counted: it is not identified. The listing and each read are
/// capped by `Host` (`DIR_ENTRIES_CAP`, `KERNEL_FILE_CAP`).
pub fn running(host: &Host, program: &str) -> Result<Vec<u32>, HostError> {
    let mut pids = Vec::new();
    for entry in host.list_dir("/proc")? {
        let Ok(pid) = entry.parse::<u32>() else {
            continue;
        };
        let Ok(Some(cmdline)) = host.read_bytes(&format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
        if name == program.as_bytes() {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Whether systemd manages the host: the check `sd_booted(3)` makes.
pub fn systemd_runs(host: &Host) -> Result<bool, HostError> {
    Ok(host
        .stat("/run/systemd/system")?
        .is_some_and(|info| info.directory))
}

/// Where systemd finds units a package or an administrator installed.
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// The unit file of `service` (`nvidia-fabricmanager`), if one is installed.
pub fn unit_file(host: &Host, service: &str) -> Result<Option<String>, HostError> {
    for dir in UNIT_DIRS {
        let path = format!("{dir}/{service}.service");
        if host.is_file(&path)? {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The first of `HOST_PATH`'s directories holding `program`, as a host path.
pub fn on_path(host: &Host, program: &str) -> Result<Option<String>, HostError> {
    for dir in super::HOST_PATH {
        let path = format!("/{dir}/{program}");
        if host.is_file(&path)? {
            return Ok(Some(path));
        }
    }
    Ok(None)
}
