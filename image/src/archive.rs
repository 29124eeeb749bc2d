//! The OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) as
//! one tar archive, the form `skopeo copy oci-archive:…` and `ctr images
//! import` read.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder, Sha256Digest,
};
use serde_json::Value;

use crate::layer::{Layer, sha256_hex};

/// What the image is called and says about itself.
pub struct Identity {
    /// The full reference containerd names it by, e.g.
    /// `docker.io/library/gpuprov:0.1.0`.
    pub reference: String,
    pub version: String,
    pub revision: String,
    /// Seconds since the epoch: every timestamp in the image.
    pub source_date_epoch: u64,
}

/// How a DaemonSet starts it; deploy/Containerfile says the same (a test
/// compares them).
pub const ENTRYPOINT: [&str; 1] = ["/usr/local/bin/gpuprov"];
pub const CMD: [&str; 4] = [
    "run",
    "--config=/etc/gpuprov/node.yaml",
    "--host-root=/host",
    "--host-exec=nsenter",
];
/// Host commands run through nsenter find the host's programs on this PATH.
pub const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Built {
    /// `sha256:…` of the manifest: the image's digest in a registry.
    pub digest: String,
    /// The compressed layer's size, what a node pulls.
    pub compressed_bytes: u64,
    pub archive_bytes: u64,
}

/// Writes the archive to `out` (atomically: a temporary beside it, then a
/// rename) and returns the image's digest.
pub fn write(layer: &Layer, identity: &Identity, out: &Path) -> Result<Built, String> {
    let created = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(identity.source_date_epoch),
    )
    .to_string();
    let layer_digest = sha256_hex(&layer.gzip);
    let labels: HashMap<String, String> = [
        ("org.opencontainers.image.title", "gpuprov"),
        (
            "org.opencontainers.image.description",
            "Converges a Kubernetes GPU node to a declared state",
        ),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        ("org.opencontainers.image.version", &identity.version),
        ("org.opencontainers.image.revision", &identity.revision),
        ("org.opencontainers.image.created", &created),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = ImageConfigurationBuilder::default()
        .created(created.clone())
        .architecture(architecture()?)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(ENTRYPOINT.map(String::from).to_vec())
                .cmd(CMD.map(String::from).to_vec())
                .env(vec![PATH.to_string()])
                .working_dir("/".to_string())
                .exposed_ports(vec!["9402/tcp".to_string()])
                .labels(labels)
                .build()
                .map_err(|e| e.to_string())?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers".to_string())
                .diff_ids(vec![format!("sha256:{}", layer.diff_id)])
                .build()
                .map_err(|e| e.to_string())?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(created)
                .created_by("scripts/image".to_string())
                .build()
                .map_err(|e| e.to_string())?,
        ])
        .build()
        .map_err(|e| e.to_string())?;
    let config_json = canonical(&config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config_json)?)
        .layers(vec![descriptor_of(
            MediaType::ImageLayerGzip,
            layer.gzip.len() as u64,
            &layer_digest,
        )?])
        .build()
        .map_err(|e| e.to_string())?;
    let manifest_json = canonical(&manifest)?;
    let mut manifest_descriptor = descriptor(MediaType::ImageManifest, &manifest_json)?;
    let tag = identity
        .reference
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map(|(_, tag)| tag.to_string())
        .ok_or_else(|| format!("{}: the reference has no tag", identity.reference))?;
    manifest_descriptor.set_annotations(Some(
        [
            ("org.opencontainers.image.ref.name".to_string(), tag),
            (
                "io.containerd.image.name".to_string(),
                identity.reference.clone(),
            ),
        ]
        .into_iter()
        .collect(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_descriptor])
        .build()
        .map_err(|e| e.to_string())?;
    let index_json = canonical(&index)?;
    let layout_json = br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec();

    let blob = |digest: &str| format!("blobs/sha256/{digest}");
    let mut files = vec![
        (blob(&sha256_hex(&config_json)), config_json.as_slice()),
        (blob(&sha256_hex(&manifest_json)), manifest_json.as_slice()),
        (blob(&layer_digest), layer.gzip.as_slice()),
        ("index.json".to_string(), index_json.as_slice()),
        ("oci-layout".to_string(), layout_json.as_slice()),
    ];
    files.sort();
    let archive = archive_of(&files, identity.source_date_epoch)?;
    write_atomically(out, &archive)?;
    Ok(Built {
        digest: format!("sha256:{}", sha256_hex(&manifest_json)),
        compressed_bytes: layer.gzip.len() as u64,
        archive_bytes: archive.len() as u64,
    })
}

/// The Go architecture name of the machine this builds on (the binary's).
fn architecture() -> Result<Arch, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(Arch::Amd64),
        "aarch64" => Ok(Arch::ARM64),
        other => Err(format!("{other}: no OCI architecture name is known for it")),
    }
}

fn descriptor(media_type: MediaType, bytes: &[u8]) -> Result<Descriptor, String> {
    descriptor_of(media_type, bytes.len() as u64, &sha256_hex(bytes))
}

fn descriptor_of(media_type: MediaType, size: u64, hex: &str) -> Result<Descriptor, String> {
    let digest: Sha256Digest = hex.parse().map_err(|e| format!("{hex}: {e}"))?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .size(size)
        .digest(digest)
        .build()
        .map_err(|e| e.to_string())
}

/// JSON with every object's keys sorted: oci-spec keeps labels and
/// annotations in hash maps, whose order changes from run to run.
fn canonical<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
    fn sorted(value: Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(String, Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    let value = serde_json::to_value(value).map_err(|e| e.to_string())?;
    serde_json::to_vec(&sorted(value)).map_err(|e| e.to_string())
}

/// The layout's files as a tar, with the directories they need.
fn archive_of(files: &[(String, &[u8])], mtime: u64) -> Result<Vec<u8>, String> {
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind, mode, size| {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header
    };
    for dir in ["blobs/", "blobs/sha256/"] {
        tar.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            dir,
            std::io::empty(),
        )
        .map_err(|e| format!("archiving {dir}: {e}"))?;
    }
    for (path, bytes) in files {
        tar.append_data(
            &mut header(tar::EntryType::Regular, 0o644, bytes.len() as u64),
            path,
            *bytes,
        )
        .map_err(|e| format!("archiving {path}: {e}"))?;
    }
    tar.into_inner()
        .map_err(|e| format!("finishing the archive: {e}"))
}

fn write_atomically(out: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let temporary = out.with_extension("tar.partial");
    let result = std::fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, out));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        format!("writing {}: {e}", out.display())
    })
}
