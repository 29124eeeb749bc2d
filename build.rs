//! Tells the tests what this machine has that a fresh clone may lack, so
//! that a test needing it is reported ignored, with the reason, rather
//! than passed or failed: `gpuprov_root` when the build runs as root (real
//! containerd, runc, chroot, namespaces), `gpuprov_realworld` when the
//! real-world corpus is beside the repository (CI has both). Nothing
//! outside the tests reads these.
//!
//! It also lists the built-in states, every `states/*.yaml`, for the
//! catalogue to embed: a new state is a file, and no line of code.

/// The real-world corpus, beside the repository.
const REALWORLD: &str = "../shared/realworld";

fn main() {
    embed_builtin_states();
    println!("cargo::rustc-check-cfg=cfg(gpuprov_root)");
    println!("cargo::rustc-check-cfg=cfg(gpuprov_realworld)");
    // Another user (`sudo cargo test`) is another answer. A path that
    // does not exist would rerun this (and rebuild the crate) every time,
    // so where the corpus is absent only `touch build.rs` looks again.
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    if runs_as_root() {
        println!("cargo::rustc-cfg=gpuprov_root");
    }
    if std::path::Path::new(REALWORLD).is_dir() {
        println!("cargo::rerun-if-changed={REALWORLD}");
        println!("cargo::rustc-cfg=gpuprov_realworld");
    }
}

/// Whether this process runs as root, from /proc (a build script has no
/// dependencies of its own).
fn runs_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// Writes `builtin_states.rs`: `BUILTIN_STATES`, each `states/*.yaml` by
/// its path and text, in file name order (the catalogue's order).
fn embed_builtin_states() {
    println!("cargo::rerun-if-changed=states");
    let mut files: Vec<String> = std::fs::read_dir("states")
        .expect("states/ is in the repository")
        .map(|entry| entry.expect("states/ is readable").path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "yaml"))
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut code = String::from(
        "/// The built-in states, in catalogue order (written by build.rs).\npub const BUILTIN_STATES: &[(&str, &str)] = &[\n",
    );
    for file in files {
        code.push_str(&format!(
            "    (\"states/{file}\", include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/states/{file}\"))),\n"
        ));
    }
    code.push_str("];\n");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("builtin_states.rs"), code).expect("OUT_DIR is writable");
}
