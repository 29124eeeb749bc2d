//! File operations on a resolved directory's descriptor: the temporary
//! file that becomes a write, the fresh directory that becomes an unpack,
//! the sweep of what a killed run left. Nothing here takes a path string
//! that the kernel would resolve again.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::{HOST_FILE_CAP, HostError, kind_name, read_capped};

/// How deep the sweep of gpuprov's own directories goes.
const SWEEP_DEPTH: u32 = 16;

/// A temporary file beside its target, renamed over it by `commit`;
/// removed if dropped uncommitted.
pub struct NewFile {
    dir: pathrs::Handle,
    name: OsString,
    temp: OsString,
    file: Option<File>,
    /// The target as it was when the temporary was made, if it existed.
    existing: Option<rustix::fs::Stat>,
    shown: PathBuf,
    host_path: String,
}

impl NewFile {
    pub(super) fn create(
        dir: pathrs::Handle,
        name: OsString,
        shown: PathBuf,
        host_path: String,
    ) -> Result<NewFile, HostError> {
        let write_err = |source: std::io::Error| HostError::Write {
            path: shown.clone(),
            source,
        };
        sweep_beside(&dir, &name);
        let existing = existing_file(&dir, &name, &shown, &host_path)?;
        let temp = temp_name(&name);
        let fd = rustix::fs::openat(
            &dir,
            temp.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| write_err(e.into()))?;
        Ok(NewFile {
            dir,
            name,
            temp,
            file: Some(File::from(fd)),
            existing,
            shown,
            host_path,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until commit")
    }

    /// Gives the file its mode and the target's owner, syncs it (when
    /// `durable`), renames it over the target and syncs the directory.
    pub fn commit(mut self, new_mode: u32, durable: bool) -> Result<(), HostError> {
        self.set_mode(new_mode)?;
        if durable {
            self.sync_data()?;
        }
        self.rename()?;
        if durable {
            sync_dir(&self.dir).map_err(|source| HostError::Write {
                path: self.shown.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Gives the file the target's mode and owner (a new target: `new_mode`).
    pub(super) fn set_mode(&mut self, new_mode: u32) -> Result<(), HostError> {
        let shown = self.shown.clone();
        let write_err = |source: std::io::Error| HostError::Write {
            path: shown.clone(),
            source,
        };
        let mode = self
            .existing
            .as_ref()
            .map_or(new_mode, |stat| stat.st_mode & 0o7777);
        let file = self.file.as_ref().expect("present until renamed");
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode)).map_err(|e| write_err(e.into()))?;
        if let Some(stat) = &self.existing {
            let now = rustix::fs::fstat(file).map_err(|e| write_err(e.into()))?;
            if now.st_uid != stat.st_uid || now.st_gid != stat.st_gid {
                rustix::fs::fchown(
                    file,
                    Some(rustix::fs::Uid::from_raw(stat.st_uid)),
                    Some(rustix::fs::Gid::from_raw(stat.st_gid)),
                )
                .map_err(|e| write_err(e.into()))?;
            }
        }
        Ok(())
    }

    /// Puts the temporary's bytes on disk.
    pub(super) fn sync_data(&self) -> Result<(), HostError> {
        let file = self.file.as_ref().expect("present until renamed");
        file.sync_all().map_err(|source| HostError::Write {
            path: self.shown.clone(),
            source,
        })
    }

    /// The target's directory, as a host path, and a handle on it.
    pub(super) fn host_dir(&self) -> String {
        super::parent_of(&self.host_path)
    }

    pub(super) fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Renames the temporary over the target (no sync: see
    /// `Host::write_files`).
    pub(super) fn rename(&mut self) -> Result<(), HostError> {
        let write_err = |source: std::io::Error| HostError::Write {
            path: self.shown.clone(),
            source,
        };
        drop(self.file.take());
        // The target may have become a link since it was looked at: a
        // rename replaces the link itself, never what it points at, but
        // gpuprov does not replace what it did not make.
        if let Ok(stat) =
            rustix::fs::statat(&self.dir, self.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
            && FileType::from_raw_mode(stat.st_mode) == FileType::Symlink
        {
            return Err(symlink_refused(&self.dir, &self.name, &self.host_path));
        }
        rustix::fs::renameat(
            &self.dir,
            self.temp.as_os_str(),
            &self.dir,
            self.name.as_os_str(),
        )
        .map_err(|e| write_err(e.into()))?;
        self.temp.clear();
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.temp.is_empty() {
            let _ = rustix::fs::unlinkat(&self.dir, self.temp.as_os_str(), AtFlags::empty());
        }
    }
}

/// The refusal for a symlink at `name` in `dir`, naming where it points.
fn symlink_refused(dir: &impl AsFd, name: &OsStr, host_path: &str) -> HostError {
    HostError::Symlink {
        path: host_path.to_string(),
        target: rustix::fs::readlinkat(dir, name, Vec::new())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// The regular file at `name` in `dir`, if there is one; a symlink (never
/// followed) or anything else there is refused.
pub(super) fn existing_file(
    dir: &pathrs::Handle,
    name: &OsStr,
    shown: &Path,
    host_path: &str,
) -> Result<Option<rustix::fs::Stat>, HostError> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => {
            return Err(HostError::Read {
                path: shown.to_path_buf(),
                source: e.into(),
            });
        }
    };
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => Ok(Some(stat)),
        FileType::Symlink => Err(symlink_refused(dir, name, host_path)),
        other => Err(HostError::NotRegular {
            path: shown.to_path_buf(),
            kind: kind_name(other),
        }),
    }
}

/// Whether the regular file at `name` holds exactly `content`.
pub(super) fn holds(
    dir: &pathrs::Handle,
    name: &OsStr,
    stat: &rustix::fs::Stat,
    content: &[u8],
    shown: &Path,
) -> Result<bool, HostError> {
    if stat.st_size as u64 != content.len() as u64 {
        return Ok(false);
    }
    let read_err = |e: rustix::io::Errno| HostError::Read {
        path: shown.to_path_buf(),
        source: e.into(),
    };
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(read_err)?;
    let now = rustix::fs::fstat(&fd).map_err(read_err)?;
    if FileType::from_raw_mode(now.st_mode) != FileType::RegularFile {
        return Ok(false);
    }
    let bytes = read_capped(File::from(fd), now.st_size as u64, HOST_FILE_CAP, shown)?;
    Ok(bytes == content)
}

/// A fresh directory beside a target directory, put in its place by
/// `commit` (the old one moved aside and removed); removed if dropped
/// uncommitted.
pub struct DirSwap {
    dir: pathrs::Handle,
    name: OsString,
    fresh: OsString,
    shown: PathBuf,
}

impl DirSwap {
    pub(super) fn create(
        dir: pathrs::Handle,
        name: OsString,
        shown: PathBuf,
        host_path: &str,
    ) -> Result<(PathBuf, DirSwap), HostError> {
        let write_err = |source: std::io::Error| HostError::Write {
            path: shown.clone(),
            source,
        };
        match rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(write_err(e.into())),
            Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
                FileType::Directory => {}
                FileType::Symlink => return Err(symlink_refused(&dir, &name, host_path)),
                other => {
                    return Err(HostError::NotDirectory {
                        path: shown,
                        kind: kind_name(other),
                    });
                }
            },
        }
        sweep_beside(&dir, &name);
        let fresh = with_suffix(&name, "new");
        rustix::fs::mkdirat(&dir, fresh.as_os_str(), Mode::from_raw_mode(0o755))
            .map_err(|e| write_err(e.into()))?;
        let fd = rustix::fs::openat(
            &dir,
            fresh.as_os_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| write_err(e.into()))?;
        let real = super::fd_path(&fd).map_err(write_err)?;
        Ok((
            real,
            DirSwap {
                dir,
                name,
                fresh,
                shown,
            },
        ))
    }

    /// Renames the fresh directory into place, the old one (if any) aside
    /// and then removed.
    pub fn commit(mut self) -> Result<(), HostError> {
        let shown = self.shown.clone();
        let write_err = |source: std::io::Error| HostError::Write {
            path: shown.clone(),
            source,
        };
        let old = with_suffix(&self.name, "old");
        let had_old = match rustix::fs::renameat(
            &self.dir,
            self.name.as_os_str(),
            &self.dir,
            old.as_os_str(),
        ) {
            Ok(()) => true,
            Err(rustix::io::Errno::NOENT) => false,
            Err(e) => return Err(write_err(e.into())),
        };
        rustix::fs::renameat(
            &self.dir,
            self.fresh.as_os_str(),
            &self.dir,
            self.name.as_os_str(),
        )
        .map_err(|e| write_err(e.into()))?;
        self.fresh.clear();
        if had_old {
            remove_tree(self.dir.as_fd(), &old);
        }
        sync_dir(&self.dir).map_err(write_err)
    }
}

impl Drop for DirSwap {
    fn drop(&mut self) {
        if !self.fresh.is_empty() {
            remove_tree(self.dir.as_fd(), &self.fresh);
        }
    }
}

/// `.<name>.gpuprov-<pid>-<n>.tmp`: unique within this process, and
/// recognisable as a temporary of a gpuprov process by `is_stale_temp`.
fn temp_name(name: &OsStr) -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".gpuprov-{}-{unique}.tmp", std::process::id()));
    temp
}

fn with_suffix(name: &OsStr, suffix: &str) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".gpuprov-{}.{suffix}", std::process::id()));
    temp
}

/// Runs `sync` on every item at once, each but the first on a thread of
/// its own, and returns the first error in the items' order. A sync waits
/// for the disk: in turn, a fresh edit's 17 syncs waited 17 times (about
/// 0.2 to 1 ms each); at once, the kernel and the device overlap them, and
/// a journaling filesystem (ext4, xfs) can commit them in one transaction.
/// A thread that cannot start leaves its item to this one.
pub(super) fn concurrently<T: Sync, E: Send>(
    items: &[T],
    sync: impl Fn(&T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let Some((first, rest)) = items.split_first() else {
        return Ok(());
    };
    let sync = &sync;
    std::thread::scope(|scope| {
        let started: Vec<_> = rest
            .iter()
            .map(|item| {
                std::thread::Builder::new()
                    .name("gpuprov-sync".into())
                    .spawn_scoped(scope, move || sync(item))
                    .map_err(|_| item)
            })
            .collect();
        let mut outcome = sync(first);
        for thread in started {
            let synced = match thread {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(item) => sync(item),
            };
            outcome = outcome.and(synced);
        }
        outcome
    })
}

pub(super) fn sync_dir(dir: &impl AsFd) -> std::io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::fsync(&fd)?;
    Ok(())
}

/// The entries of an open directory with their types (from the entry,
/// never following a link), sorted, without `.` and `..`; at most
/// `DIR_ENTRIES_CAP + 1`, so a caller can tell there were too many.
pub(super) fn entries(dir: BorrowedFd<'_>) -> std::io::Result<Vec<(OsString, FileType)>> {
    let mut listing = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(entry) = listing.read() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        names.push((name.to_os_string(), entry.file_type()));
        if names.len() > super::DIR_ENTRIES_CAP {
            break;
        }
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(names)
}

/// Whether a directory entry is a temporary of another gpuprov process's
/// (`.<name>.gpuprov-<pid>…`): one killed mid-write, since every writer
/// holds the host's apply lock.
fn is_stale_temp(entry_name: &[u8], prefix: &[u8]) -> bool {
    let Some(rest) = entry_name.strip_prefix(prefix) else {
        return false;
    };
    let pid: Vec<u8> = rest
        .iter()
        .copied()
        .take_while(|b| *b != b'-' && *b != b'.')
        .collect();
    !pid.is_empty()
        && pid.iter().all(u8::is_ascii_digit)
        && pid != std::process::id().to_string().as_bytes()
}

/// Removes what a gpuprov killed mid-write left beside `name` in `dir`:
/// its `.<name>.gpuprov-<pid>…` temporary files and directories (atomic
/// writes, downloads, unpacking). Every writer holds the host's apply lock,
/// so such an entry of another process is stale. Best effort: a sweep that
/// fails leaves the entry for the next.
pub(crate) fn sweep_beside(dir: &impl AsFd, name: &OsStr) {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix.extend_from_slice(b".gpuprov-");
    let Ok(listing) = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let Ok(found) = entries(listing.as_fd()) else {
        return;
    };
    for (entry, _) in found {
        if is_stale_temp(entry.as_bytes(), &prefix) {
            tracing::info!(entry = %entry.to_string_lossy(), "removing what an interrupted run left");
            remove_tree(dir.as_fd(), &entry);
        }
    }
}

/// Sweeps every stale temporary in a tree of gpuprov's own, descending into
/// real directories only (never a link).
pub(super) fn sweep_tree(dir: OwnedFd, depth: u32) {
    let Ok(found) = entries(dir.as_fd()) else {
        return;
    };
    for (entry, kind) in found {
        let bytes = entry.as_bytes();
        let stale = bytes.starts_with(b".")
            && bytes
                .windows(b".gpuprov-".len())
                .position(|w| w == b".gpuprov-")
                .is_some_and(|at| is_stale_temp(bytes, &bytes[..at + b".gpuprov-".len()]));
        if stale {
            tracing::info!(entry = %entry.to_string_lossy(), "removing what an interrupted run left");
            remove_tree(dir.as_fd(), &entry);
        } else if kind == FileType::Directory
            && depth < SWEEP_DEPTH
            && let Ok(sub) = rustix::fs::openat(
                &dir,
                entry.as_os_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
        {
            sweep_tree(sub, depth + 1);
        }
    }
}

/// Removes an entry of `dir` and, when it is a real directory, everything
/// in it; links are removed, never followed. Best effort.
fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) {
    fn inner(dir: BorrowedFd<'_>, name: &OsStr, depth: u32) {
        if rustix::fs::unlinkat(dir, name, AtFlags::empty()).is_ok() || depth > 64 {
            return;
        }
        let Ok(sub) = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        if let Ok(found) = entries(sub.as_fd()) {
            for (entry, _) in found {
                inner(sub.as_fd(), &entry, depth + 1);
            }
        }
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR);
    }
    inner(dir, name, 0);
}

/// Reads a UTF-8 file the user named on the command line (a spec, a state
/// file, a labels file): a regular file of at most `cap` bytes. It is
/// opened non-blocking, so a FIFO answers at once and is refused. The
/// error says what is wrong in words, for the caller to put after the path.
pub fn read_user_file(path: &Path, cap: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let stat = rustix::fs::fstat(&file)?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", kind_name(kind)),
        ));
    }
    let too_large = |size: u64| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("it is {size} bytes, more than the {cap} bytes gpuprov reads from such a file"),
        )
    };
    if stat.st_size as u64 > cap {
        return Err(too_large(stat.st_size as u64));
    }
    let mut text = String::new();
    file.take(cap + 1).read_to_string(&mut text)?;
    if text.len() as u64 > cap {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}
