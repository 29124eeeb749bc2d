//! The host root: every file and process on the node is reached through it.
//!
//! Paths are resolved inside the root by the kernel, as in a chroot:
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` through libpathrs
//! (which emulates it safely on kernels without openat2). Absolute symlink
//! targets start again at the root and `..` stops at it, so no symlink,
//! however it is swapped in, leads a resolution out of the root. Every
//! operation then works on the file descriptor of the directory it resolved
//! (`*at` syscalls), never on a path string that could be re-resolved:
//!
//! * reads open an `O_PATH` handle, check that it is a regular file and
//!   its size against a cap, and only then reopen it for reading (a FIFO, a
//!   device or a socket is refused before it is ever opened);
//! * writes and removes never follow a symlink in the last component: a
//!   link at a path gpuprov writes or removes is refused with its target
//!   named (see `follow_links` for containerd's config, which distros do
//!   symlink);
//! * below gpuprov's own directories (`OWN_DIRS`) no symlink is followed
//!   at all;
//! * temporary files are created `O_CREAT | O_EXCL | O_NOFOLLOW` and
//!   renamed into place; see `files.rs`.
//!
//! Commands run through one wrapper that records what ran and how it ended
//! (`command.rs`).

mod command;
mod files;
pub mod process;
pub mod secure_boot;
pub mod socket;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pathrs::flags::{OpenFlags, ResolverFlags};
use rustix::fs::{AtFlags, FileType};
use serde::Serialize;

pub use command::{CommandRecord, OUTPUT_TAIL_BYTES};
pub use files::{NewFile, read_user_file};

/// Most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINK_HOPS: u32 = 40;
/// The most bytes read from a file under `/sys` or `/proc`: their
/// attributes are at most a page (4 KiB); 1 MiB is far above any real one.
pub const KERNEL_FILE_CAP: u64 = 1 << 20;
/// The most bytes read from any other host file (containerd's config and
/// its imports, gpuprov's records, manifests): the largest real containerd
/// config we know is 7 KiB, and editing a config costs about 30 times its
/// size in memory (BENCHMARKS.md), so 2 MiB keeps a run near 60 MiB at
/// worst.
pub const HOST_FILE_CAP: u64 = 2 << 20;
/// The most bytes read from a file named on the command line (a spec, a
/// state file, a labels file): real ones are a few KiB.
pub const USER_FILE_CAP: u64 = 1 << 20;
/// The most entries one directory listing keeps.
pub const DIR_ENTRIES_CAP: usize = 100_000;
/// gpuprov's own directories: below them no symlink is ever followed (a
/// link planted there could aim gpuprov's records at someone else's file).
pub const OWN_DIRS: &[&str] = &["var/lib/gpuprov", "run/gpuprov", "var/cache/gpuprov"];
/// Directories searched for a bare command name inside the host root.
pub const HOST_PATH: &[&str] = &[
    "usr/local/sbin",
    "usr/local/bin",
    "usr/sbin",
    "usr/bin",
    "sbin",
    "bin",
];

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("host root {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("path {path} has more than {MAX_SYMLINK_HOPS} symlinks (a loop?)")]
    SymlinkLoop { path: String },
    #[error(
        "{path} has a symlink in it, below gpuprov's own directory /{own}: gpuprov follows no link there"
    )]
    LinkInOwnDir { path: String, own: &'static str },
    #[error(
        "{path} is a symlink (to {target}): gpuprov does not write or remove through a link, nor replace one it did not make"
    )]
    Symlink { path: String, target: String },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is {kind}, not a directory")]
    NotDirectory { path: PathBuf, kind: &'static str },
    #[error("{path} is {size} bytes, more than the {cap} bytes gpuprov reads from such a file")]
    TooLarge { path: PathBuf, size: u64, cap: u64 },
    #[error("{path} has more than {cap} entries")]
    TooManyEntries { path: PathBuf, cap: usize },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("cannot start `{command}`{hint}")]
    Spawn {
        command: String,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter the host's namespaces through {path}")]
    Namespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How commands reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandMode {
    /// chroot into the host root (the default when the root is not `/`).
    Chroot,
    /// join PID 1's mount, UTS, IPC and network namespaces (a privileged pod with hostPID).
    Nsenter,
    /// run the program found at the same path under the root, without
    /// changing root: for fixture hosts whose scripts use the machine's tools.
    Prefix,
}

impl CommandMode {
    /// The default for a root: plain execution when it is `/` (prefix of `/`
    /// is the identity), chroot otherwise.
    pub fn default_for(root: &Path) -> CommandMode {
        if root == Path::new("/") {
            CommandMode::Prefix
        } else {
            CommandMode::Chroot
        }
    }
}

/// What `stat` tells about a host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    pub regular: bool,
    pub directory: bool,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i128,
}

/// The node as seen through its root directory.
#[derive(Debug, Clone)]
pub struct Host {
    /// As the user gave it, for messages and reports.
    root: PathBuf,
    /// Absolute, so commands that change directory still find it.
    absolute: PathBuf,
    /// The root directory, open: every path is resolved beneath it.
    tree: Arc<pathrs::Root>,
    exec_mode: CommandMode,
    command_timeout: Duration,
    /// Directories whose entries changed (a rename, a removal, a directory
    /// made in them) and are not yet synced, by host path, each with a
    /// handle: `make_durable` syncs them.
    unsynced: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

/// One file of a `Host::write_files` batch.
#[derive(Debug, Clone, Copy)]
pub struct FileWrite<'a> {
    pub path: &'a str,
    pub content: &'a [u8],
    /// The mode of a new file; an existing one keeps its own.
    pub mode: u32,
}

/// Where a path is resolved (see `Host::scope`).
struct Scope<'h> {
    root: ScopeRoot<'h>,
    /// The path under that root.
    rest: PathBuf,
    /// The own directory it is below, if any.
    own: Option<&'static str>,
}

enum ScopeRoot<'h> {
    Tree(&'h pathrs::Root),
    Beneath(pathrs::Root),
}

/// What one scoped `openat2` said.
enum Lookup {
    Found(OwnedFd),
    /// ENOENT or ENOTDIR: it, or a directory on the way, is not there.
    Absent,
    /// Anything else (a link refused, a kernel without `openat2`, EAGAIN
    /// retried out): libpathrs is asked, for its fallback and its error.
    AskLibpathrs,
}

impl Scope<'_> {
    fn root(&self) -> &pathrs::Root {
        match &self.root {
            ScopeRoot::Tree(root) => root,
            ScopeRoot::Beneath(root) => root,
        }
    }

    /// The `openat2` libpathrs makes for this scope (`RESOLVE_IN_ROOT |
    /// RESOLVE_NO_MAGICLINKS`, and `RESOLVE_NO_SYMLINKS` below an own
    /// directory), made here so that an absent path costs one system
    /// call: libpathrs's error for it reads its directory's path back
    /// through procfs for the message (eight calls), and gpuprov asks
    /// after absent paths often (toolkit binaries in six directories,
    /// PCI attributes), where "absent" is the answer, not an error.
    fn open(&self, flags: OpenFlags) -> Lookup {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let mut resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        if self.own.is_some() {
            resolve |= ResolveFlags::NO_SYMLINKS;
        }
        let mut flags = OFlags::from_bits_retain(flags.bits() as u32) | OFlags::CLOEXEC;
        if !flags.contains(OFlags::PATH) {
            flags |= OFlags::NOCTTY;
        }
        // EAGAIN: a rename or mount raced the lookup somewhere on the
        // system; libpathrs retries as often.
        for _ in 0..128 {
            match rustix::fs::openat2(self.root(), &self.rest, flags, Mode::empty(), resolve) {
                Ok(fd) => return Lookup::Found(fd),
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Lookup::Absent,
                Err(rustix::io::Errno::AGAIN) => continue,
                Err(_) => return Lookup::AskLibpathrs,
            }
        }
        Lookup::AskLibpathrs
    }
}

/// A directory entry's name and its type as the entry says it.
type Entry = (std::ffi::OsString, FileType);

/// An open directory of the host and its entries (`Host::read_dir`).
pub struct HostDir {
    dir: OwnedFd,
    host_path: String,
    shown: PathBuf,
    /// Sorted names, each with its type as the entry says it (a name that
    /// is not UTF-8 as `to_string_lossy` shows it; see `not_utf8`).
    pub entries: Vec<(String, FileType)>,
    /// The entries whose names are not UTF-8, as shown in `entries`: no
    /// such path can be opened by its shown name, or written into a
    /// UTF-8 document (a CDI spec) that others will open.
    pub not_utf8: std::collections::BTreeSet<String>,
}

impl HostDir {
    /// The directory, as the host path it was listed by.
    pub fn host_path(&self) -> &str {
        &self.host_path
    }

    /// The type of the entry `name`, as the directory says it.
    pub fn kind(&self, name: &str) -> Option<FileType> {
        self.entries
            .binary_search_by(|(entry, _)| entry.as_str().cmp(name))
            .ok()
            .map(|at| self.entries[at].1)
    }

    /// Where the entry `name` of this directory points, if it is a link;
    /// read through the open directory (one `readlinkat`, nothing
    /// resolved or followed). `name` is one entry: a name holding `/`
    /// is nobody's entry here, and has no target.
    pub fn link_target(&self, name: &str) -> Result<Option<String>, HostError> {
        if name.contains('/') {
            return Ok(None);
        }
        match rustix::fs::readlinkat(&self.dir, name, Vec::new()) {
            Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::INVAL) => Ok(None),
            Err(e) => Err(HostError::Read {
                path: self.shown.join(name),
                source: e.into(),
            }),
        }
    }
}

/// What a host path names, before anything is opened: the directory that
/// holds it (resolved inside the root) and its last component.
struct Parent {
    dir: pathrs::Handle,
    name: std::ffi::OsString,
}

impl Host {
    pub fn new(
        root: &Path,
        exec_mode: CommandMode,
        command_timeout: Duration,
    ) -> Result<Host, HostError> {
        let read_err = |source| HostError::Read {
            path: root.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(root).map_err(read_err)?;
        if !meta.is_dir() {
            return Err(HostError::NotADirectory(root.to_path_buf()));
        }
        let absolute = std::path::absolute(root).map_err(read_err)?;
        let tree = pathrs::Root::open(&absolute).map_err(|e| read_err(io_error(e)))?;
        Ok(Host {
            root: root.to_path_buf(),
            absolute,
            tree: Arc::new(tree),
            exec_mode,
            command_timeout,
            unsynced: Arc::default(),
        })
    }

    /// The root as the user gave it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exec_mode(&self) -> CommandMode {
        self.exec_mode
    }

    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// A host path as messages show it before it is resolved: under the root.
    fn shown(&self, host_path: &str) -> PathBuf {
        self.absolute.join(relative(host_path))
    }

    /// Resolves a host path to an `O_PATH` handle, following symlinks
    /// inside the root only (none below gpuprov's own directories);
    /// `Ok(None)` when it, or a directory on the way, does not exist.
    fn handle(&self, host_path: &str) -> Result<Option<pathrs::Handle>, HostError> {
        self.in_root(host_path, OpenFlags::O_PATH, |root, path| {
            root.resolve(path)
        })
        .map(|found| found.map(pathrs::Handle::from_fd))
    }

    /// Where `path` (relative) is resolved: the host root, or, below one
    /// of gpuprov's own directories, that directory's parent with no link
    /// followed from there on (made first when `create`).
    fn scope(&self, path: &Path, create: bool) -> Result<Scope<'_>, pathrs::error::Error> {
        let Some((base, rest, own)) = own_dir_split(path) else {
            return Ok(Scope {
                root: ScopeRoot::Tree(&self.tree),
                rest: Path::new("/").join(path),
                own: None,
            });
        };
        let base = if create {
            self.tree
                .mkdir_all(base, &std::os::unix::fs::PermissionsExt::from_mode(0o755))?
        } else {
            self.tree.resolve(base)?
        };
        Ok(Scope {
            root: ScopeRoot::Beneath(
                pathrs::Root::from_fd(OwnedFd::from(base))
                    .with_resolver_flags(ResolverFlags::NO_SYMLINKS),
            ),
            rest: rest.to_path_buf(),
            own: Some(own),
        })
    }

    /// Opens `host_path` with `flags` in its scope; `Ok(None)` when it, or
    /// a directory on the way, does not exist. The kernel's answer is
    /// taken when it is "here" or "absent"; anything else is asked again
    /// of libpathrs (`op`, the same lookup), whose error names the cause.
    fn in_root<T: Into<OwnedFd>>(
        &self,
        host_path: &str,
        flags: OpenFlags,
        op: impl FnOnce(&pathrs::Root, &Path) -> Result<T, pathrs::error::Error>,
    ) -> Result<Option<OwnedFd>, HostError> {
        let scope = match self.scope(&relative(host_path), false) {
            Ok(scope) => scope,
            Err(e) => return self.absent_or(host_path, e),
        };
        match scope.open(flags) {
            Lookup::Found(fd) => return Ok(Some(fd)),
            Lookup::Absent => return Ok(None),
            Lookup::AskLibpathrs => {}
        }
        match op(scope.root(), &scope.rest) {
            Ok(value) => Ok(Some(value.into())),
            Err(e) => match (errno(&e), scope.own) {
                (Some(libc::ELOOP), Some(own)) => Err(HostError::LinkInOwnDir {
                    path: host_path.to_string(),
                    own,
                }),
                _ => self.absent_or(host_path, e),
            },
        }
    }

    fn absent_or<T>(
        &self,
        host_path: &str,
        e: pathrs::error::Error,
    ) -> Result<Option<T>, HostError> {
        match errno(&e) {
            Some(libc::ENOENT | libc::ENOTDIR) => Ok(None),
            Some(libc::ELOOP) => Err(HostError::SymlinkLoop {
                path: host_path.to_string(),
            }),
            _ => Err(HostError::Read {
                path: self.shown(host_path),
                source: io_error(e),
            }),
        }
    }

    /// The directory that holds `host_path`, resolved; `create` makes the
    /// missing directories (mode 0755). `Ok(None)` when it does not exist.
    fn parent(&self, host_path: &str, create: bool) -> Result<Option<Parent>, HostError> {
        let path = relative(host_path);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(HostError::Write {
                path: self.shown(host_path),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a file's path (it names the root, or ends in `..`)",
                ),
            });
        };
        let name = name.to_os_string();
        let dir_str = format!("/{}", dir.display());
        // Usually there already: mkdir_all's checks are paid only to make it.
        if let Some(dir) = self.handle(&dir_str)? {
            return Ok(Some(Parent { dir, name }));
        }
        if !create {
            return Ok(None);
        }
        // The directories made, and the one they were made in, are owed a
        // sync: a file in a new directory is not on disk until the
        // directory's own entry is.
        let mut missing = vec![dir.to_path_buf()];
        while let Some(up) = missing.last().and_then(|d| d.parent())
            && self.handle(&format!("/{}", up.display()))?.is_none()
        {
            missing.push(up.to_path_buf());
        }
        self.make_dirs(&dir_str)?;
        let made_in = missing
            .last()
            .and_then(|d| d.parent())
            .map(Path::to_path_buf);
        for made in missing.iter().chain(&made_in) {
            let made = format!("/{}", made.display());
            if let Some(handle) = self.handle(&made)? {
                self.owe_sync(&made, handle.as_fd())?;
            }
        }
        Ok(self.handle(&dir_str)?.map(|dir| Parent { dir, name }))
    }

    /// Makes a directory and its missing parents inside the root (also
    /// for something else to write into: containerd's validation logs).
    pub fn make_dirs(&self, host_dir: &str) -> Result<(), HostError> {
        let perm = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        let path = relative(host_dir);
        let own = own_dir_split(&path).map(|(_, _, own)| own);
        let made = self
            .scope(&path, true)
            .and_then(|scope| scope.root().mkdir_all(&scope.rest, &perm).map(drop));
        made.map_err(|e| match (errno(&e), own) {
            (Some(libc::ELOOP), Some(own)) => HostError::LinkInOwnDir {
                path: host_dir.to_string(),
                own,
            },
            (Some(libc::ELOOP), None) => HostError::SymlinkLoop {
                path: host_dir.to_string(),
            },
            _ => HostError::Write {
                path: self.shown(host_dir),
                source: io_error(e),
            },
        })
    }

    /// Resolves a host path (`/etc/x` or `etc/x`) to a real path under the
    /// root, following every symlink inside the root; a part that does not
    /// exist yet is taken literally. Only for handing a path to something
    /// that is not gpuprov (a command, `dlopen`, a socket connect):
    /// gpuprov's own reads and writes go through the handles.
    pub fn resolve(&self, host_path: &str) -> Result<PathBuf, HostError> {
        let mut existing = relative(host_path);
        let mut missing = Vec::new();
        loop {
            let shown = format!("/{}", existing.display());
            if let Some(handle) = self.handle(&shown)? {
                let mut real = fd_path(&handle).map_err(|source| HostError::Read {
                    path: self.shown(&shown),
                    source,
                })?;
                real.extend(missing.iter().rev());
                return Ok(real);
            }
            let Some(name) = existing.file_name() else {
                let mut real = self.absolute.clone();
                real.extend(missing.iter().rev());
                return Ok(real);
            };
            missing.push(name.to_os_string());
            existing.pop();
        }
    }

    /// What kind of file `host_path` is, following links inside the root;
    /// `Ok(None)` when it does not exist.
    pub fn stat(&self, host_path: &str) -> Result<Option<FileInfo>, HostError> {
        let Some(handle) = self.handle(host_path)? else {
            return Ok(None);
        };
        let stat = rustix::fs::fstat(&handle).map_err(|e| HostError::Read {
            path: self.shown(host_path),
            source: e.into(),
        })?;
        Ok(Some(file_info(&stat)))
    }

    pub fn exists(&self, host_path: &str) -> Result<bool, HostError> {
        Ok(self.handle(host_path)?.is_some())
    }

    /// Whether `host_path` is a regular file (links inside the root followed).
    pub fn is_file(&self, host_path: &str) -> Result<bool, HostError> {
        Ok(self.stat(host_path)?.is_some_and(|info| info.regular))
    }

    /// Opens a regular file for reading, refusing anything else before it
    /// is opened (a FIFO would block, a device could do anything on open);
    /// `Ok(None)` when it does not exist.
    pub fn open_regular(&self, host_path: &str) -> Result<Option<(File, FileInfo)>, HostError> {
        let Some(handle) = self.handle(host_path)? else {
            return Ok(None);
        };
        let shown = || fd_path(&handle).unwrap_or_else(|_| self.shown(host_path));
        let stat = rustix::fs::fstat(&handle).map_err(|e| HostError::Read {
            path: shown(),
            source: e.into(),
        })?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        if kind != FileType::RegularFile {
            return Err(HostError::NotRegular {
                path: shown(),
                kind: kind_name(kind),
            });
        }
        // Opened again by the same resolution (one openat2, no procfs
        // round trip), and proven to be the same inode: a file swapped in
        // meanwhile is refused, and O_NONBLOCK keeps even that open from
        // blocking.
        let flags = OpenFlags::O_RDONLY
            | OpenFlags::O_CLOEXEC
            | OpenFlags::O_NOCTTY
            | OpenFlags::O_NONBLOCK;
        let Some(file) = self.open_resolved(host_path, flags)? else {
            return Ok(None);
        };
        let now = rustix::fs::fstat(&file).map_err(|e| HostError::Read {
            path: shown(),
            source: e.into(),
        })?;
        if (now.st_dev, now.st_ino) != (stat.st_dev, stat.st_ino) {
            return Err(HostError::Read {
                path: shown(),
                source: std::io::Error::other("it was replaced while gpuprov opened it"),
            });
        }
        Ok(Some((file, file_info(&stat))))
    }

    /// Opens `host_path` with `flags`, resolved as `handle` resolves it;
    /// `Ok(None)` when it does not exist.
    fn open_resolved(&self, host_path: &str, flags: OpenFlags) -> Result<Option<File>, HostError> {
        self.in_root(host_path, flags, |root, path| {
            root.open_subpath(path, flags)
        })
        .map(|found| found.map(File::from))
    }

    /// Reads a file's bytes, at most its cap (`KERNEL_FILE_CAP` under
    /// `/sys` and `/proc`, `HOST_FILE_CAP` elsewhere); `Ok(None)` when it
    /// does not exist.
    pub fn read_bytes(&self, host_path: &str) -> Result<Option<Vec<u8>>, HostError> {
        let cap = cap_for(host_path);
        let Some((file, info)) = self.open_regular(host_path)? else {
            return Ok(None);
        };
        let path = self.shown(host_path);
        read_capped(file, info.size, cap, &path).map(Some)
    }

    /// Reads a UTF-8 file, capped as `read_bytes`; `Ok(None)` when it does
    /// not exist.
    pub fn read(&self, host_path: &str) -> Result<Option<String>, HostError> {
        match self.read_bytes(host_path)? {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| HostError::NotUtf8 {
                    path: self.shown(host_path),
                }),
        }
    }

    /// The file name a symlink points at (`driver` → `nvidia`), without
    /// following it; `Ok(None)` when there is no such link.
    pub fn link_name(&self, host_path: &str) -> Result<Option<String>, HostError> {
        Ok(self.link_target(host_path)?.and_then(|target| {
            Path::new(&target)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        }))
    }

    /// Where a symlink points, as written; `Ok(None)` when `host_path` is
    /// not a symlink (or does not exist).
    pub fn link_target(&self, host_path: &str) -> Result<Option<String>, HostError> {
        let Some(Parent { dir, name }) = self.parent(host_path, false)? else {
            return Ok(None);
        };
        match rustix::fs::readlinkat(&dir, name.as_os_str(), Vec::new()) {
            Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::INVAL) => Ok(None),
            Err(e) => Err(HostError::Read {
                path: self.shown(host_path),
                source: e.into(),
            }),
        }
    }

    /// The host path a chain of symlinks at `host_path` ends at, each hop
    /// resolved inside the root: containerd's config is often a link
    /// (`/etc/containerd/config.toml` → `/etc/k3s/containerd.toml`) and is
    /// edited at its target, the link kept. `host_path` itself when it is
    /// not a link.
    pub fn follow_links(&self, host_path: &str) -> Result<String, HostError> {
        let mut path = format!("/{}", relative(host_path).display());
        for _ in 0..MAX_SYMLINK_HOPS {
            let Some(target) = self.link_target(&path)? else {
                return Ok(path);
            };
            path = if target.starts_with('/') {
                target
            } else {
                let parent = Path::new(&path).parent().unwrap_or(Path::new("/"));
                format!("{}/{target}", parent.display())
            };
            path = format!("/{}", normalize(&path).display());
        }
        Err(HostError::SymlinkLoop {
            path: host_path.to_string(),
        })
    }

    /// Sorted entry names of a directory; empty when it does not exist.
    pub fn list_dir(&self, host_path: &str) -> Result<Vec<String>, HostError> {
        Ok(self
            .open_listing(host_path)?
            .map(|(_, entries)| {
                entries
                    .into_iter()
                    .map(|(name, _)| name.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// A directory's sorted entries with their types, as the directory
    /// says them (a link is a link, never followed), held open so that
    /// its links can be read without resolving the directory again;
    /// `Ok(None)` when it does not exist.
    pub fn read_dir(&self, host_path: &str) -> Result<Option<HostDir>, HostError> {
        let Some((dir, listed)) = self.open_listing(host_path)? else {
            return Ok(None);
        };
        let mut entries = Vec::with_capacity(listed.len());
        let mut not_utf8 = std::collections::BTreeSet::new();
        for (name, kind) in listed {
            // Some file systems leave the type out of the entry: ask the
            // entry itself, still without following it.
            let kind = match kind {
                FileType::Unknown => rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|stat| FileType::from_raw_mode(stat.st_mode))
                    .unwrap_or(FileType::Unknown),
                kind => kind,
            };
            let shown = name.to_string_lossy().into_owned();
            if name.to_str().is_none() {
                not_utf8.insert(shown.clone());
            }
            entries.push((shown, kind));
        }
        // Sorted as text, for `HostDir::kind`'s search.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(HostDir {
            host_path: host_path.trim_end_matches('/').to_string(),
            shown: self.shown(host_path),
            dir,
            entries,
            not_utf8,
        }))
    }

    /// Reads the file `name` of a directory listed by `read_dir`, as
    /// `read` would read its path, but opened beside the listing: one
    /// component, no link followed, no path resolved again. A sysfs
    /// device's attributes are read this way, hundreds per converge on a
    /// big server. A link is read through its path, followed inside the
    /// root as `read` follows it.
    pub fn read_entry(&self, dir: &HostDir, name: &str) -> Result<Option<String>, HostError> {
        let host_path = format!("{}/{name}", dir.host_path);
        // `kind` knows only the listing's names: one component each.
        match dir.kind(name) {
            None => return Ok(None),
            Some(FileType::RegularFile) => {}
            Some(FileType::Symlink | FileType::Unknown) => return self.read(&host_path),
            Some(kind) => {
                return Err(HostError::NotRegular {
                    path: fd_path(&dir.dir)
                        .map(|p| p.join(name))
                        .unwrap_or_else(|_| dir.shown.join(name)),
                    kind: kind_name(kind),
                });
            }
        }
        use rustix::fs::{Mode, OFlags};
        // O_NONBLOCK and O_NOFOLLOW: an entry swapped for a FIFO or a
        // link since the listing neither blocks nor leads elsewhere.
        let flags =
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(&dir.dir, name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(rustix::io::Errno::LOOP) => return self.read(&host_path),
            Err(e) => {
                return Err(HostError::Read {
                    path: dir.shown.join(name),
                    source: e.into(),
                });
            }
        };
        let stat = rustix::fs::fstat(&file).map_err(|e| HostError::Read {
            path: dir.shown.join(name),
            source: e.into(),
        })?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        if kind != FileType::RegularFile {
            return Err(HostError::NotRegular {
                path: dir.shown.join(name),
                kind: kind_name(kind),
            });
        }
        let bytes = read_capped(
            file,
            file_info(&stat).size,
            cap_for(&host_path),
            &dir.shown.join(name),
        )?;
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| HostError::NotUtf8 {
                path: dir.shown.join(name),
            })
    }

    /// A directory opened for listing, and its entries as the kernel gave
    /// them (capped); `Ok(None)` when it does not exist.
    fn open_listing(&self, host_path: &str) -> Result<Option<(OwnedFd, Vec<Entry>)>, HostError> {
        let shown = self.shown(host_path);
        let read_err = |source: std::io::Error| HostError::Read {
            path: shown.clone(),
            source,
        };
        // O_DIRECTORY fails on anything else before it is opened.
        let flags = OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY | OpenFlags::O_CLOEXEC;
        let Some(dir) = self.open_resolved(host_path, flags)? else {
            // Not there, or there but not a directory: which one?
            let Some(handle) = self.handle(host_path)? else {
                return Ok(None);
            };
            let stat = rustix::fs::fstat(&handle).map_err(|e| read_err(e.into()))?;
            return Err(HostError::NotDirectory {
                path: shown,
                kind: kind_name(FileType::from_raw_mode(stat.st_mode)),
            });
        };
        let listed = files::entries(dir.as_fd()).map_err(read_err)?;
        if listed.len() > DIR_ENTRIES_CAP {
            return Err(HostError::TooManyEntries {
                path: shown,
                cap: DIR_ENTRIES_CAP,
            });
        }
        Ok(Some((OwnedFd::from(dir), listed)))
    }

    /// Writes a file atomically and durably: a batch of one (see
    /// `write_files`). Returns false, touching nothing, when the content is
    /// already there.
    pub fn write_atomic(
        &self,
        host_path: &str,
        content: &[u8],
        new_mode: u32,
    ) -> Result<bool, HostError> {
        let written = self.write_files(&[FileWrite {
            path: host_path,
            content,
            mode: new_mode,
        }])?;
        Ok(written[0])
    }

    /// Writes files atomically, in order, each a new temporary file in its
    /// target's directory renamed over the target. An existing file keeps
    /// its mode and owner; a new one gets its `mode`. A file whose content
    /// is already there is not touched (its entry in the result is false).
    /// A symlink or anything but a regular file at a target is refused.
    ///
    /// Durable in as few syncs as crash safety allows. Every temporary is
    /// synced before any rename can expose it, so a power cut never leaves
    /// a torn file. Directories are synced once each, not once per file:
    /// those of every rename but the last (and any directory made for
    /// them) before the last lands, so that what the last depends on (the
    /// backup and the record before containerd's config, a drop-in before
    /// the import naming it) is never lost while the last is there; the
    /// last's when the next batch needs it or when the pipeline calls
    /// `make_durable` at the end of a converge. The syncs of one round (the
    /// temporaries; the directories) run at once (`files::concurrently`).
    /// (`syncfs`, one call for all, was measured slower: it also writes out
    /// every other process's dirty data on the filesystem.)
    pub fn write_files(&self, writes: &[FileWrite<'_>]) -> Result<Vec<bool>, HostError> {
        let mut staged = Vec::new();
        let mut written = Vec::with_capacity(writes.len());
        for write in writes {
            let file = self.stage(write)?;
            written.push(file.is_some());
            staged.extend(file);
        }
        let durable: Vec<&NewFile> = staged
            .iter()
            .filter(|file| !volatile(&file.host_dir()))
            .collect();
        files::concurrently(&durable, |file| file.sync_data())?;
        let Some((last, before)) = staged.split_last_mut() else {
            return Ok(written);
        };
        for file in before.iter_mut() {
            self.renamed(file)?;
        }
        if !before.is_empty() {
            self.make_durable()?;
        }
        self.renamed(last)?;
        Ok(written)
    }

    /// `write_atomic` without syncs, for gpuprov's run report: it is
    /// rewritten by every run, readers still never see it half written
    /// (the rename is atomic), and a power cut can lose only the last
    /// report. Syncs were a fifth of a converged run's time.
    pub fn write_report(
        &self,
        host_path: &str,
        content: &[u8],
        new_mode: u32,
    ) -> Result<bool, HostError> {
        let write = FileWrite {
            path: host_path,
            content,
            mode: new_mode,
        };
        let Some(mut file) = self.stage(&write)? else {
            return Ok(false);
        };
        file.rename()?;
        Ok(true)
    }

    /// Syncs every directory whose entries changed since the last call. A
    /// converge that changed nothing syncs nothing.
    pub fn make_durable(&self) -> Result<(), HostError> {
        let owed: Vec<(String, OwnedFd)> =
            std::mem::take(&mut *self.unsynced.lock().expect("not poisoned"))
                .into_iter()
                .collect();
        files::concurrently(&owed, |(host_path, dir)| {
            files::sync_dir(dir).map_err(|source| HostError::Write {
                path: self.shown(host_path),
                source,
            })
        })
    }

    /// A temporary holding `write.content`, not yet renamed; None when the
    /// target already holds it.
    fn stage(&self, write: &FileWrite<'_>) -> Result<Option<NewFile>, HostError> {
        let shown = self.shown(write.path);
        // Nothing is created, not even a temporary, when the content is
        // already there: a converged run changes no directory either.
        if let Some(Parent { dir, name }) = self.parent(write.path, false)?
            && let Some(stat) = files::existing_file(&dir, &name, &shown, write.path)?
            && files::holds(&dir, &name, &stat, write.content, &shown)?
        {
            files::sweep_beside(&dir, &name);
            return Ok(None);
        }
        let mut file = self.create_beside(write.path)?;
        std::io::Write::write_all(file.file(), write.content).map_err(|source| {
            HostError::Write {
                path: shown,
                source,
            }
        })?;
        file.set_mode(write.mode)?;
        Ok(Some(file))
    }

    fn renamed(&self, file: &mut NewFile) -> Result<(), HostError> {
        file.rename()?;
        self.owe_sync(&file.host_dir(), file.dir())
    }

    /// A new temporary file beside `host_path` (its directories made),
    /// created `O_CREAT | O_EXCL | O_NOFOLLOW` so that nothing planted at
    /// its name is followed or reused; `commit` renames it over the target.
    /// What a killed run left beside the target is swept first.
    pub fn create_beside(&self, host_path: &str) -> Result<NewFile, HostError> {
        let Some(Parent { dir, name }) = self.parent(host_path, true)? else {
            return Err(HostError::Write {
                path: self.shown(host_path),
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        NewFile::create(dir, name, self.shown(host_path), host_path.to_string())
    }

    /// Removes a file gpuprov owns; a missing one is not an error. A
    /// symlink (never followed) or a directory there is refused.
    pub fn remove(&self, host_path: &str) -> Result<(), HostError> {
        let Some(Parent { dir, name }) = self.parent(host_path, false)? else {
            return Ok(());
        };
        let shown = self.shown(host_path);
        files::sweep_beside(&dir, &name);
        if files::existing_file(&dir, &name, &shown, host_path)?.is_none() {
            return Ok(());
        }
        match rustix::fs::unlinkat(&dir, name.as_os_str(), AtFlags::empty()) {
            Ok(()) => self.owe_sync(&parent_of(host_path), dir.as_fd()),
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(HostError::Write {
                path: shown,
                source: e.into(),
            }),
        }
    }

    /// Notes that `dir` (at `host_dir`) holds a change `make_durable` syncs.
    fn owe_sync(&self, host_dir: &str, dir: BorrowedFd<'_>) -> Result<(), HostError> {
        if volatile(host_dir) {
            return Ok(());
        }
        let mut unsynced = self.unsynced.lock().expect("not poisoned");
        if !unsynced.contains_key(host_dir) {
            let fd = dir
                .try_clone_to_owned()
                .map_err(|source| HostError::Write {
                    path: self.shown(host_dir),
                    source,
                })?;
            unsynced.insert(host_dir.to_string(), fd);
        }
        Ok(())
    }

    /// Removes the empty directories from `host_path` up to, and including,
    /// `top` (gpuprov's own backup folders); stops at the first that is not
    /// empty.
    pub fn remove_empty_dirs(&self, host_path: &str, top: &str) -> Result<(), HostError> {
        let top = relative(top);
        let mut dir = relative(host_path);
        while dir.starts_with(&top) && dir.file_name().is_some() {
            let Some(Parent { dir: parent, name }) =
                self.parent(&format!("/{}", dir.display()), false)?
            else {
                break;
            };
            if rustix::fs::unlinkat(&parent, name.as_os_str(), AtFlags::REMOVEDIR).is_err() {
                break;
            }
            if dir == top || !dir.pop() {
                break;
            }
        }
        Ok(())
    }

    /// Removes every temporary an interrupted run left under `host_dir`
    /// (gpuprov's own directories, swept at the start of each run under
    /// the lock: their files are not all rewritten by the next run).
    pub fn sweep_interrupted(&self, host_dir: &str) -> Result<(), HostError> {
        let flags = OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY | OpenFlags::O_CLOEXEC;
        if let Some(dir) = self.open_resolved(host_dir, flags)? {
            files::sweep_tree(OwnedFd::from(dir), 0);
        }
        Ok(())
    }

    /// Makes a fresh, empty directory beside `host_path` for unpacking
    /// into, and returns its real path and a handle on the parent for the
    /// renames that put it in place (see `download::unpack`).
    pub fn fresh_dir_beside(
        &self,
        host_path: &str,
    ) -> Result<(PathBuf, files::DirSwap), HostError> {
        let Some(Parent { dir, name }) = self.parent(host_path, true)? else {
            return Err(HostError::Write {
                path: self.shown(host_path),
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        files::DirSwap::create(dir, name, self.shown(host_path), host_path)
    }
}

/// The host path without its leading `/`, `.` components dropped.
/// Whether a host directory is cleared at every boot (`/run`, by the FHS;
/// a tmpfs on every distribution): nothing there outlives a power cut
/// anyway, so gpuprov's once-per-boot markers there are not synced.
fn volatile(host_dir: &str) -> bool {
    host_dir == "/run" || host_dir.starts_with("/run/")
}

/// The directory a host path is in, as a host path.
fn parent_of(host_path: &str) -> String {
    let path = relative(host_path);
    format!("/{}", path.parent().unwrap_or(Path::new("")).display())
}

fn relative(host_path: &str) -> PathBuf {
    Path::new(host_path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(Component::Normal(name)),
            Component::ParentDir => Some(Component::ParentDir),
            _ => None,
        })
        .collect()
}

/// A path with `.` and `..` folded lexically, as a resolution inside the
/// root sees it (a `..` at the root stays at the root).
fn normalize(path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for part in Path::new(path).components() {
        match part {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Splits a relative path below one of gpuprov's own directories into the
/// part above it (resolved normally), the rest (resolved with no symlinks)
/// and which directory it is.
fn own_dir_split(path: &Path) -> Option<(&Path, &Path, &'static str)> {
    let own = OWN_DIRS.iter().find(|own| path.starts_with(own))?;
    let own_path = Path::new(own);
    let base = own_path.parent().unwrap_or(Path::new(""));
    let rest = path.strip_prefix(base).ok()?;
    Some((base, rest, own))
}

fn cap_for(host_path: &str) -> u64 {
    let path = relative(host_path);
    if path.starts_with("sys") || path.starts_with("proc") {
        KERNEL_FILE_CAP
    } else {
        HOST_FILE_CAP
    }
}

/// Reads at most `cap` bytes, refusing a file that says it is bigger
/// before reading and one that turns out bigger (procfs files say 0).
pub(crate) fn read_capped(
    file: File,
    size: u64,
    cap: u64,
    path: &Path,
) -> Result<Vec<u8>, HostError> {
    if size > cap {
        return Err(HostError::TooLarge {
            path: path.to_path_buf(),
            size,
            cap,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| HostError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > cap {
        return Err(HostError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            cap,
        });
    }
    Ok(bytes)
}

fn file_info(stat: &rustix::fs::Stat) -> FileInfo {
    let kind = FileType::from_raw_mode(stat.st_mode);
    FileInfo {
        regular: kind == FileType::RegularFile,
        directory: kind == FileType::Directory,
        size: stat.st_size as u64,
        mode: stat.st_mode & 0o7777,
        mtime_ns: stat.st_mtime as i128 * 1_000_000_000 + stat.st_mtime_nsec as i128,
    }
}

pub(crate) fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "a file of unknown type",
    }
}

/// The path the kernel gives an open descriptor (`/proc/self/fd/N`).
fn fd_path(fd: &impl AsFd) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    std::fs::read_link(link)
}

fn errno(e: &pathrs::error::Error) -> Option<i32> {
    match e.kind() {
        pathrs::error::ErrorKind::OsError(errno) => errno,
        _ => None,
    }
}

/// A libpathrs error as an I/O error: the errno when it has one, its
/// message otherwise.
fn io_error(e: pathrs::error::Error) -> std::io::Error {
    match errno(&e) {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
