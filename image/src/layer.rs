//! The image's one layer: a tar of the tree, the same bytes for the same
//! inputs (entries sorted, owner root, every mtime the source date, no
//! extended attributes), compressed by a gzip writer with no name and no
//! timestamp.

use std::io::Write;

use flate2::Compression;
use flate2::GzBuilder;
use sha2::{Digest, Sha256};

use crate::rootfs::{Entry, Tree};

pub struct Layer {
    /// The compressed bytes: the blob.
    pub gzip: Vec<u8>,
    /// sha256 of the uncompressed tar: the config's `diff_ids`.
    pub diff_id: String,
}

pub fn build(tree: &Tree, mtime: u64) -> Result<Layer, String> {
    let tar = tar_of(tree, mtime)?;
    let diff_id = sha256_hex(&tar);
    let mut gzip = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gzip.write_all(&tar)
        .and_then(|()| gzip.try_finish())
        .map_err(|e| format!("compressing the layer: {e}"))?;
    let gzip = gzip
        .finish()
        .map_err(|e| format!("compressing the layer: {e}"))?;
    Ok(Layer { gzip, diff_id })
}

/// The uncompressed tar of `tree`, in its (sorted) order: a directory
/// comes before what it holds.
pub fn tar_of(tree: &Tree, mtime: u64) -> Result<Vec<u8>, String> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, entry) in tree {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        match entry {
            Entry::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                tar.append_data(&mut header, format!("{path}/"), std::io::empty())
            }
            Entry::File { source, mode } => {
                let data = std::fs::read(source)
                    .map_err(|e| format!("reading {}: {e}", source.display()))?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                tar.append_data(&mut header, path, data.as_slice())
            }
        }
        .map_err(|e| format!("adding {path} to the layer: {e}"))?;
    }
    tar.into_inner()
        .map_err(|e| format!("finishing the layer: {e}"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
