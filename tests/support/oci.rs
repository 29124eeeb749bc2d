//! A small local image for tests that run containers: the machine's own
//! programs and the libraries `ldd` says they link, written as an OCI
//! image archive that `ctr images import` reads (no registry, no engine).

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

/// Writes an OCI archive to `out` holding `programs` (absolute paths on
/// this machine, kept at the same paths) and their libraries, named
/// `reference`, whose process is `entrypoint`.
pub fn write_image(out: &Path, reference: &str, programs: &[&str], entrypoint: &[&str]) {
    let mut files: Vec<String> = Vec::new();
    for program in programs {
        files.push(program.to_string());
        let ldd = Command::new("ldd").arg(program).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and
            // `/lib64/ld-linux-x86-64.so.2 (0x…)`.
            if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
                files.push(path.to_string());
            }
        }
    }
    files.sort();
    files.dedup();

    let mut layer = tar::Builder::new(Vec::new());
    layer.follow_symlinks(true);
    for file in &files {
        layer
            .append_path_with_name(file, file.trim_start_matches('/'))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let layer = layer.into_inner().unwrap();

    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]},
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
    })
    .to_string()
    .into_bytes();
    let mut manifest_descriptor =
        descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    manifest_descriptor["annotations"] = serde_json::json!({
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": reference.rsplit(':').next().unwrap(),
    });
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_descriptor]})
        .to_string()
        .into_bytes();

    let mut archive = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, name, bytes).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]);
        add(&name, blob);
    }
    archive.into_inner().unwrap();
}

fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
}
