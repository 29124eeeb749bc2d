//! `toolkit.method: artifact`: a pinned tarball unpacked into a directory
//! that gpuprov creates and owns.
//!
//! The unpack replaces the directory whole, so gpuprov first proves the
//! directory is its own: the record (`INSTALLED_RECORD`) names the
//! directory and every path the tarball put there, and a directory that
//! holds anything else (or that gpuprov never recorded) is refused with
//! those paths named. The record is written before the swap, listing the
//! old and the new entries, and again after it with the new ones only, so
//! a run killed in between still knows everything there as its own.

use std::collections::BTreeSet;

use rustix::fs::FileType;

use crate::host::{Host, HostError};

/// The most entries a toolkit tarball may have (the real one has a few
/// dozen), and the most walked in an existing directory.
pub const ENTRIES_CAP: usize = 10_000;
/// The most bytes a toolkit tarball may unpack to (the real one is about
/// 40 MiB unpacked): a small archive that inflates past this is refused
/// before anything is written.
pub const UNPACKED_CAP: u64 = 512 << 20;
/// How many foreign paths an error names before it counts the rest.
const NAMED: usize = 10;

/// What the record says gpuprov put in a directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The artifact the directory holds, once its unpack finished.
    pub sha256: Option<String>,
    /// The directory (a host path).
    pub dir: String,
    /// Paths relative to `dir`: every file, link and directory unpacked.
    pub entries: BTreeSet<String>,
}

impl Owned {
    /// The record's text: `artifact <sha>` once unpacked (`unpacking <sha>`
    /// before), `dir <path>`, then one `entry <path>` line each.
    pub fn render(&self, unpacking: Option<&str>) -> String {
        let mut text = match (unpacking, &self.sha256) {
            (Some(sha), _) => format!("unpacking {sha}\n"),
            (None, Some(sha)) => format!("artifact {sha}\n"),
            (None, None) => String::new(),
        };
        text.push_str(&format!("dir {}\n", self.dir));
        for entry in &self.entries {
            text.push_str(&format!("entry {entry}\n"));
        }
        text
    }

    /// Reads a record; `None` when it records no directory for an
    /// artifact (a package install, or nothing).
    pub fn parse(text: &str) -> Option<Owned> {
        let mut owned = Owned::default();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("artifact", sha)) => owned.sha256 = Some(sha.to_string()),
                Some(("dir", dir)) => owned.dir = dir.to_string(),
                Some(("entry", entry)) => {
                    owned.entries.insert(entry.to_string());
                }
                _ => {}
            }
        }
        (!owned.dir.is_empty()).then_some(owned)
    }
}

/// What gpuprov may replace at `dir`: the record's entries when the record
/// names `dir`. A record from before gpuprov named its directory
/// (`artifact <sha>` alone) counts for the entries of that tarball, when
/// the cache still holds it.
pub fn owned(host: &Host, record: &str, dir: &str) -> Result<Option<Owned>, String> {
    let chain = |e: HostError| crate::error_chain::error_chain(&e);
    let Some(text) = host.read(record).map_err(chain)? else {
        return Ok(None);
    };
    if let Some(owned) = Owned::parse(&text) {
        return Ok((owned.dir == dir).then_some(owned));
    }
    // The hash names a file in the cache: only a hash does.
    let Some(sha) = text
        .strip_prefix("artifact ")
        .map(str::trim)
        .filter(|sha| sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Ok(None);
    };
    let archive = format!("{}/{sha}", crate::download::CACHE_DIR);
    match tarball_entries(host, &archive) {
        Ok(entries) => Ok(Some(Owned {
            sha256: Some(sha.to_string()),
            dir: dir.to_string(),
            entries,
        })),
        Err(_) => Ok(None),
    }
}

/// Paths in `dir` (host paths) that gpuprov did not put there, walked
/// without following links, at most `ENTRIES_CAP`. A directory that does
/// not exist holds none.
pub fn foreign_paths(
    host: &Host,
    dir: &str,
    owned: Option<&Owned>,
) -> Result<Vec<String>, HostError> {
    // A link there is someone else's: not walked, never replaced.
    if let Some(target) = host.link_target(dir)? {
        return Err(HostError::Symlink {
            path: dir.to_string(),
            target,
        });
    }
    let empty = BTreeSet::new();
    let entries = owned.map_or(&empty, |o| &o.entries);
    let mut foreign = Vec::new();
    let mut walked = 0;
    let mut pending = vec![String::new()];
    while let Some(relative) = pending.pop() {
        let at = if relative.is_empty() {
            dir.to_string()
        } else {
            format!("{dir}/{relative}")
        };
        let Some(listing) = host.read_dir(&at)? else {
            continue;
        };
        for (name, kind) in &listing.entries {
            walked += 1;
            if walked > ENTRIES_CAP {
                foreign.push(format!("{dir}/… (more than {ENTRIES_CAP} entries)"));
                return Ok(foreign);
            }
            let path = if relative.is_empty() {
                name.clone()
            } else {
                format!("{relative}/{name}")
            };
            if !entries.contains(&path) {
                foreign.push(format!("{dir}/{path}"));
            } else if *kind == FileType::Directory {
                pending.push(path);
            }
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// Refuses `dir` when it holds anything gpuprov did not put there.
/// `setting` is the spec key that names the directory, for the advice.
pub fn check_owned(
    host: &Host,
    dir: &str,
    owned: Option<&Owned>,
    setting: &str,
) -> Result<(), String> {
    let foreign =
        foreign_paths(host, dir, owned).map_err(|e| crate::error_chain::error_chain(&e))?;
    if foreign.is_empty() {
        return Ok(());
    }
    let more = foreign.len().saturating_sub(NAMED);
    let mut named = foreign
        .iter()
        .take(NAMED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if more > 0 {
        named.push_str(&format!(" and {more} more"));
    }
    let whose = if owned.is_some() {
        "holds what gpuprov did not unpack there"
    } else {
        "is not a directory gpuprov unpacked (no record of it in /var/lib/gpuprov)"
    };
    Err(format!(
        "{setting} {dir} {whose}: {named}; gpuprov replaces only its own directory: move those away, or give {setting} a new directory"
    ))
}

/// Every path a tarball unpacks (relative, as `tar` writes them, with
/// the directories above them), checked against the caps and for what a
/// record cannot hold.
pub fn tarball_entries(host: &Host, archive: &str) -> Result<BTreeSet<String>, String> {
    let mut tar = tar::Archive::new(decompressed(open_archive(host, archive)?, archive)?);
    let bad = |e: std::io::Error| format!("reading {archive}: {e}");
    let mut entries = BTreeSet::new();
    let mut bytes: u64 = 0;
    for entry in tar.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        bytes = bytes.saturating_add(entry.size());
        if bytes > UNPACKED_CAP {
            return Err(format!(
                "{archive} unpacks to more than {} MiB, the most gpuprov unpacks for a toolkit",
                UNPACKED_CAP >> 20
            ));
        }
        let path = entry.path().map_err(bad)?;
        let Some(path) = path.to_str() else {
            return Err(format!(
                "{archive} has an entry whose name is not UTF-8: {}",
                path.display()
            ));
        };
        if path.contains('\n') {
            return Err(format!("{archive} has an entry whose name holds a newline"));
        }
        // As tar unpacks them: a leading `/` or `./` dropped, `..` skipped.
        let parts: Vec<&str> = path
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        if parts.is_empty() || parts.contains(&"..") {
            continue;
        }
        for depth in 1..=parts.len() {
            entries.insert(parts[..depth].join("/"));
        }
        if entries.len() > ENTRIES_CAP {
            return Err(format!(
                "{archive} has more than {ENTRIES_CAP} entries, the most gpuprov unpacks for a toolkit"
            ));
        }
    }
    Ok(entries)
}

/// The most memory the xz decoder may take (KiB): `xz -9`'s dictionary
/// is 64 MiB; an archive asking for more is refused, not obeyed.
const XZ_MEMORY_KIB: u32 = 96 << 10;

/// A tarball's bytes, decompressed as its first bytes say: gzip
/// (toolkit and most artifacts) or xz (NVIDIA's fabric manager archives).
fn decompressed(mut file: std::fs::File, archive: &str) -> Result<Box<dyn std::io::Read>, String> {
    use std::io::{Read, Seek};
    let mut magic = [0u8; 6];
    let read = file
        .read(&mut magic)
        .and_then(|n| file.rewind().map(|()| n))
        .map_err(|e| format!("reading {archive}: {e}"))?;
    match &magic[..read] {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::GzDecoder::new(file))),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00] => Ok(Box::new(lzma_rust2::XzReader::new_mem_limit(
            file,
            true,
            XZ_MEMORY_KIB,
        ))),
        _ => Err(format!(
            "{archive} is neither a gzip nor an xz tarball (its first bytes are {:02x?})",
            &magic[..read]
        )),
    }
}

fn open_archive(host: &Host, archive: &str) -> Result<std::fs::File, String> {
    host.open_regular(archive)
        .map_err(|e| crate::error_chain::error_chain(&e))?
        .map(|(file, _)| file)
        .ok_or_else(|| format!("{archive}: not in the cache"))
}

/// Unpacks a cached `.tar.gz` into `into` (host paths) atomically, when
/// `into` is gpuprov's or new: into a fresh sibling directory first, then
/// renamed over `into` (an older `into` moves aside and is removed), the
/// record (`record`) naming what is there before and after. Entries
/// cannot escape the directory, and a symlink at `into` is refused, never
/// followed or replaced.
pub fn unpack(host: &Host, archive: &str, into: &str, record: &str) -> Result<(), String> {
    let chain = |e: HostError| crate::error_chain::error_chain(&e);
    let sha = archive.rsplit('/').next().unwrap_or(archive).to_string();
    let new_entries = tarball_entries(host, archive)?;
    // Checked again here: the directory may have changed since the plan.
    let old = owned(host, record, into)?;
    check_owned(host, into, old.as_ref(), "the directory")?;
    let mut both = old.map(|o| o.entries).unwrap_or_default();
    both.extend(new_entries.iter().cloned());
    let pending = Owned {
        sha256: None,
        dir: into.to_string(),
        entries: both,
    };
    host.write_atomic(record, pending.render(Some(&sha)).as_bytes(), 0o644)
        .map_err(chain)?;

    let (fresh, swap) = host.fresh_dir_beside(into).map_err(chain)?;
    tar::Archive::new(decompressed(open_archive(host, archive)?, archive)?)
        .unpack(&fresh)
        .map_err(|e| format!("unpacking {archive}: {e}"))?;
    swap.commit().map_err(chain)?;

    let done = Owned {
        sha256: Some(sha),
        dir: into.to_string(),
        entries: new_entries,
    };
    host.write_atomic(record, done.render(None).as_bytes(), 0o644)
        .map(drop)
        .map_err(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_written() {
        let owned = Owned {
            sha256: Some("ab".repeat(32)),
            dir: "/usr/local/nvidia/toolkit".into(),
            entries: ["bin", "bin/nvidia-ctk"].map(String::from).into(),
        };
        assert_eq!(Owned::parse(&owned.render(None)), Some(owned.clone()));
        let pending = Owned::parse(&owned.render(Some("cd"))).unwrap();
        assert_eq!(
            pending.sha256, None,
            "an unfinished unpack holds no artifact"
        );
        assert_eq!(pending.entries, owned.entries);
        assert_eq!(Owned::parse("apt-get newest\n"), None);
    }
}
