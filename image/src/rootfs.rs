//! What goes into the image: the gpuprov binary, exactly the shared
//! libraries it links (as the build host's dynamic loader resolves them),
//! the C library's parts that the host's NVML library links when gpuprov
//! loads it, and the CA certificates its downloads verify against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A path inside the image (no leading `/`) and what is there.
pub type Tree = BTreeMap<String, Entry>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { source: PathBuf, mode: u32 },
}

/// Where the binary lives in the image; the entrypoint names it.
pub const BINARY: &str = "usr/local/bin/gpuprov";

/// The CA bundle reqwest's native roots read (openssl-probe's first
/// candidate), from the build host's ca-certificates.
pub const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// The host's `libnvidia-ml.so.1` is loaded into gpuprov's process, so the
/// libraries it links must be in the image: every NVIDIA driver's NVML links
/// these parts of the C library (readelf -d on R470 to R575 libraries), and
/// since glibc 2.34 they are stubs that gpuprov itself does not link.
const NVML_LINKS: [&str; 4] = ["libpthread.so.0", "libdl.so.2", "libm.so.6", "librt.so.1"];

/// The image's tree for `binary`, with the CA bundle from `ca_bundle`.
pub fn collect(binary: &Path, ca_bundle: &Path) -> Result<Tree, String> {
    let mut tree = Tree::new();
    add_file(&mut tree, BINARY, binary, 0o755)?;
    let libraries = linked_libraries(binary)?;
    let libc = libraries
        .iter()
        .find(|path| path.file_name().is_some_and(|name| name == "libc.so.6"))
        .ok_or_else(|| format!("{}: does not link libc.so.6", binary.display()))?
        .clone();
    for library in &libraries {
        add_file(&mut tree, &inside(library), library, 0o755)?;
    }
    // NVML's libraries from the C library the binary links, so that they
    // match it.
    let libc_dir = libc.parent().unwrap_or(Path::new("/"));
    for name in NVML_LINKS {
        let path = libc_dir.join(name);
        if !path.is_file() {
            return Err(format!(
                "{}: missing; NVML links it, so the image needs it beside {}",
                path.display(),
                libc.display()
            ));
        }
        add_file(&mut tree, &inside(&path), &path, 0o755)?;
    }
    add_file(&mut tree, CA_BUNDLE, ca_bundle, 0o644)?;
    // Mount points and scratch space a DaemonSet's pod expects.
    for (dir, mode) in [("host", 0o755), ("etc/gpuprov", 0o755), ("tmp", 0o1777)] {
        add_dir(&mut tree, dir, mode);
    }
    Ok(tree)
}

/// The absolute paths of the shared libraries `binary` links, its program
/// interpreter included, as `ldd` (the build host's loader) resolves them.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd {}: {e} (install libc-bin)", binary.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A static binary links nothing: ldd says so and fails.
        if stdout.contains("not a dynamic executable")
            || String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(format!(
            "ldd {}: {}: {}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    parse_ldd(&stdout).map_err(|e| format!("ldd {}: {e}", binary.display()))
}

/// The resolved paths in ldd's output; a library ldd cannot find is an
/// error, and the kernel's vDSO (no path) is skipped.
pub fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once(" => ") {
            Some((name, rest)) => {
                if rest.starts_with("not found") {
                    return Err(format!("{name}: not found"));
                }
                rest
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// `/lib/x86_64-linux-gnu/libc.so.6` → `lib/x86_64-linux-gnu/libc.so.6`.
fn inside(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_string()
}

fn add_file(tree: &mut Tree, path: &str, source: &Path, mode: u32) -> Result<(), String> {
    if !source.is_file() {
        return Err(format!("{}: not a file", source.display()));
    }
    if let Some((parent, _)) = path.rsplit_once('/') {
        add_dir(tree, parent, 0o755);
    }
    tree.insert(
        path.to_string(),
        Entry::File {
            source: source.to_path_buf(),
            mode,
        },
    );
    Ok(())
}

/// A directory and every ancestor it lacks.
fn add_dir(tree: &mut Tree, path: &str, mode: u32) {
    let mut prefix = String::new();
    for part in path.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        let wanted = if prefix == path { mode } else { 0o755 };
        tree.entry(prefix.clone())
            .or_insert(Entry::Dir { mode: wanted });
    }
}

/// Writes `tree` into `dir` (which must not exist): the same contents for
/// deploy/Containerfile's `COPY --from=build`.
pub fn write_into(tree: &Tree, dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for (path, entry) in tree {
        let at = dir.join(path);
        let (result, mode) = match entry {
            Entry::Dir { mode } => (std::fs::create_dir(&at), *mode),
            Entry::File { source, mode } => (std::fs::copy(source, &at).map(drop), *mode),
        };
        result
            .and_then(|()| std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| format!("writing {}: {e}", at.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_resolved_paths_and_skips_the_vdso() {
        let output = "\tlinux-vdso.so.1 (0x00007ffc5a1f2000)\n\
                      \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f3c)\n\
                      \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3b)\n\
                      \t/lib64/ld-linux-x86-64.so.2 (0x00007f3d)\n";
        assert_eq!(
            parse_ldd(output).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn a_library_ldd_cannot_find_is_an_error_that_names_it() {
        let output = "\tlibfoo.so.1 => not found\n";
        assert_eq!(parse_ldd(output).unwrap_err(), "libfoo.so.1: not found");
    }

    #[test]
    fn every_file_has_its_parent_directories() {
        let mut tree = Tree::new();
        add_dir(&mut tree, "a/b/c", 0o700);
        assert_eq!(tree["a"], Entry::Dir { mode: 0o755 });
        assert_eq!(tree["a/b"], Entry::Dir { mode: 0o755 });
        assert_eq!(tree["a/b/c"], Entry::Dir { mode: 0o700 });
    }
}
