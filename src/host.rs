//! The host root: every file and process on the node is reached through it.
//!
//! Paths are resolved inside the root the way the kernel would inside a
//! chroot: absolute symlink targets start again at the root, relative ones
//! continue from their directory, and a `..` that would climb above the root
//! is an error rather than a silent escape. Writes are atomic; commands run
//! through one wrapper that records what ran and how it ended.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINK_HOPS: u32 = 40;
/// How much of a command's stdout and stderr a record keeps (the tail).
const OUTPUT_TAIL_BYTES: usize = 4096;
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
    #[error("path {path} climbs above the host root {root}")]
    Escapes { path: String, root: PathBuf },
    #[error("path {path} has more than {MAX_SYMLINK_HOPS} symlinks (a loop?)")]
    SymlinkLoop { path: String },
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
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
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
pub enum ExecMode {
    /// chroot into the host root (the default when the root is not `/`).
    Chroot,
    /// join PID 1's mount, UTS, IPC and network namespaces (a privileged pod with hostPID).
    Nsenter,
    /// run the program found at the same path under the root, without
    /// changing root: for fixture hosts whose scripts use the machine's tools.
    Prefix,
}

impl ExecMode {
    /// The default for a root: plain execution when it is `/` (prefix of `/`
    /// is the identity), chroot otherwise.
    pub fn default_for(root: &Path) -> ExecMode {
        if root == Path::new("/") {
            ExecMode::Prefix
        } else {
            ExecMode::Chroot
        }
    }
}

/// What one command did, kept in the run report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CommandRecord {
    pub argv: Vec<String>,
    /// `None` when the command was killed (by a signal or the timeout).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CommandRecord {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// One line for messages: the last line of stderr, or the exit status.
    pub fn failure_summary(&self) -> String {
        let status = match (self.timed_out, self.exit_code) {
            (true, _) => "timed out".to_string(),
            (false, Some(code)) => format!("exited {code}"),
            (false, None) => "killed by a signal".to_string(),
        };
        match self.stderr.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => format!("{status}: {}", line.trim()),
            None => status,
        }
    }
}

/// The node as seen through its root directory.
#[derive(Debug)]
pub struct Host {
    /// As the user gave it, for messages and reports.
    root: PathBuf,
    /// Absolute, so commands that change directory still find it.
    absolute: PathBuf,
    exec_mode: ExecMode,
    command_timeout: Duration,
    /// What the inner components of paths already resolved are: a real
    /// directory (`None`) or a symlink to a target. A run resolves hundreds
    /// of paths under the same few directories and sysfs links, and this
    /// spares their lstat and readlink. Cleared before every command, which
    /// may change the tree.
    known: std::sync::Mutex<std::collections::HashMap<PathBuf, Option<PathBuf>>>,
}

impl Clone for Host {
    fn clone(&self) -> Host {
        Host {
            root: self.root.clone(),
            absolute: self.absolute.clone(),
            exec_mode: self.exec_mode,
            command_timeout: self.command_timeout,
            known: Default::default(),
        }
    }
}

impl Host {
    pub fn new(
        root: &Path,
        exec_mode: ExecMode,
        command_timeout: Duration,
    ) -> Result<Host, HostError> {
        let meta = fs::metadata(root).map_err(|source| HostError::Read {
            path: root.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(HostError::NotADirectory(root.to_path_buf()));
        }
        let absolute = std::path::absolute(root).map_err(|source| HostError::Read {
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Host {
            root: root.to_path_buf(),
            absolute,
            exec_mode,
            command_timeout,
            known: Default::default(),
        })
    }

    /// The root as the user gave it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exec_mode(&self) -> ExecMode {
        self.exec_mode
    }

    /// Resolves a host path (`/etc/x` or `etc/x`) to a real path under the
    /// root, following every symlink inside the root.
    pub fn resolve(&self, host_path: &str) -> Result<PathBuf, HostError> {
        let mut resolved: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = components(Path::new(host_path));
        let mut hops = 0;
        while let Some(part) = pending.pop_front() {
            if part == ".." {
                if resolved.pop().is_none() {
                    return Err(HostError::Escapes {
                        path: host_path.to_string(),
                        root: self.absolute.clone(),
                    });
                }
                continue;
            }
            resolved.push(part);
            let real = self.join(&resolved);
            let inner = !pending.is_empty();
            let known = if inner {
                self.known.lock().expect("not poisoned").get(&real).cloned()
            } else {
                None
            };
            let target = match known {
                Some(None) => continue,
                Some(Some(target)) => target,
                None => {
                    let Ok(meta) = fs::symlink_metadata(&real) else {
                        // Not there (yet): the rest is taken literally, and
                        // nothing under it can be a symlink to look at.
                        if pending.iter().all(|p| p != "..") {
                            resolved.extend(pending.drain(..));
                            break;
                        }
                        continue;
                    };
                    if !meta.file_type().is_symlink() {
                        if inner && meta.is_dir() {
                            self.known.lock().expect("not poisoned").insert(real, None);
                        }
                        continue;
                    }
                    let target = fs::read_link(&real).map_err(|source| HostError::Read {
                        path: real.clone(),
                        source,
                    })?;
                    if inner {
                        self.known
                            .lock()
                            .expect("not poisoned")
                            .insert(real, Some(target.clone()));
                    }
                    target
                }
            };
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(HostError::SymlinkLoop {
                    path: host_path.to_string(),
                });
            }
            resolved.pop();
            if target.is_absolute() {
                resolved.clear();
            }
            for part in components(&target).into_iter().rev() {
                pending.push_front(part);
            }
        }
        Ok(self.join(&resolved))
    }

    fn join(&self, parts: &[OsString]) -> PathBuf {
        let mut path = self.absolute.clone();
        path.extend(parts);
        path
    }

    /// Reads a file; `Ok(None)` when it does not exist.
    pub fn read(&self, host_path: &str) -> Result<Option<String>, HostError> {
        let path = self.resolve(host_path)?;
        match fs::read(&path) {
            Ok(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| HostError::NotUtf8 { path }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HostError::Read { path, source }),
        }
    }

    pub fn exists(&self, host_path: &str) -> Result<bool, HostError> {
        Ok(self.resolve(host_path)?.exists())
    }

    /// The file name a symlink points at (`driver` → `nvidia`), without
    /// following it; `Ok(None)` when there is no such link.
    pub fn link_name(&self, host_path: &str) -> Result<Option<String>, HostError> {
        let (parent, name) = split_parent(host_path);
        let path = self.resolve(parent)?.join(name);
        match fs::read_link(&path) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(HostError::Read { path, source }),
        }
    }

    /// Sorted entry names of a directory; empty when it does not exist.
    pub fn list_dir(&self, host_path: &str) -> Result<Vec<String>, HostError> {
        let path = self.resolve(host_path)?;
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(HostError::Read { path, source }),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| HostError::Read {
                path: path.clone(),
                source,
            })?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Writes a file atomically: a unique temporary file in the same
    /// directory, fsync, rename over the target, fsync the directory. An
    /// existing file keeps its mode and owner; a new one gets `new_mode`.
    /// Returns false, touching nothing, when the content is already there.
    pub fn write_atomic(
        &self,
        host_path: &str,
        content: &[u8],
        new_mode: u32,
    ) -> Result<bool, HostError> {
        self.write_atomic_with(host_path, content, new_mode, true)
    }

    /// `write_atomic` without the fsyncs, for gpuprov's run report: it is
    /// rewritten by every run, readers still never see it half written
    /// (the rename is atomic), and a power cut can lose only the last
    /// report. Two fsyncs are a fifth of a converged run's time.
    pub fn write_report(
        &self,
        host_path: &str,
        content: &[u8],
        new_mode: u32,
    ) -> Result<bool, HostError> {
        self.write_atomic_with(host_path, content, new_mode, false)
    }

    fn write_atomic_with(
        &self,
        host_path: &str,
        content: &[u8],
        new_mode: u32,
        durable: bool,
    ) -> Result<bool, HostError> {
        let path = self.resolve(host_path)?;
        sweep_stale_temps(&path);
        let existing = fs::metadata(&path).ok();
        if existing.is_some() && fs::read(&path).ok().as_deref() == Some(content) {
            return Ok(false);
        }
        let write_err = |source| HostError::Write {
            path: path.clone(),
            source,
        };
        let dir = path.parent().expect("a resolved path is under the root");
        fs::create_dir_all(dir).map_err(write_err)?;
        let temp = temp_path(&path);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(content)?;
            let mode = existing.as_ref().map_or(new_mode, |m| m.mode() & 0o7777);
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            if let Some(meta) = &existing {
                keep_owner(&file, meta)?;
            }
            if durable {
                file.sync_all()?;
            }
            fs::rename(&temp, &path)?;
            if durable {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map_err(write_err)?;
        Ok(true)
    }

    /// Removes a file; a missing one is not an error.
    pub fn remove(&self, host_path: &str) -> Result<(), HostError> {
        let path = self.resolve(host_path)?;
        sweep_stale_temps(&path);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HostError::Write { path, source }),
        }
    }

    /// Removes the empty directories from `host_path` up to, and including,
    /// `top` (gpuprov's own backup folders); stops at the first that is not
    /// empty.
    pub fn remove_empty_dirs(&self, host_path: &str, top: &str) -> Result<(), HostError> {
        let top = self.resolve(top)?;
        let mut dir = self.resolve(host_path)?;
        while dir.starts_with(&top) {
            if fs::remove_dir(&dir).is_err() {
                break;
            }
            if dir == top || !dir.pop() {
                break;
            }
        }
        Ok(())
    }

    /// Runs an argument vector inside the host. Never a shell string with
    /// values pasted in; see `run_shell` for a user's own commands.
    pub fn run(&self, argv: &[String]) -> Result<CommandRecord, HostError> {
        let program = self.program_path(&argv[0]);
        let mut command = Command::new(&program);
        command.args(&argv[1..]);
        match self.exec_mode {
            ExecMode::Prefix => {
                command
                    .current_dir(&self.absolute)
                    .env("GPUPROV_HOST_ROOT", &self.absolute)
                    .env("PATH", self.prefixed_path());
            }
            ExecMode::Chroot => {
                let root = self.absolute.clone();
                command.env("GPUPROV_HOST_ROOT", "/");
                // SAFETY: chroot and chdir are async-signal-safe syscalls; the
                // closure allocates nothing.
                unsafe {
                    command.pre_exec(move || {
                        nix::unistd::chroot(&root)?;
                        nix::unistd::chdir("/")?;
                        Ok(())
                    });
                }
            }
            ExecMode::Nsenter => {
                let namespaces = open_pid1_namespaces()?;
                command.env("GPUPROV_HOST_ROOT", "/").current_dir("/");
                // SAFETY: setns is an async-signal-safe syscall and the file
                // descriptors were opened before the fork.
                unsafe {
                    command.pre_exec(move || {
                        for (file, flag) in &namespaces {
                            nix::sched::setns(file.as_fd(), *flag)?;
                        }
                        nix::unistd::chdir("/")?;
                        Ok(())
                    });
                }
            }
        }
        self.finish(command, argv)
    }

    /// Runs a user's own command line (an `exec` state's check or apply)
    /// through the host's shell, exactly as written.
    pub fn run_shell(&self, script: &str) -> Result<CommandRecord, HostError> {
        self.run(&["/bin/sh".to_string(), "-c".to_string(), script.to_string()])
    }

    /// In prefix mode a program is the fixture's own when the root has it at
    /// that path (or, for a bare name, in one of its PATH directories), and
    /// the machine's otherwise. In other modes the path is the host's own.
    fn program_path(&self, program: &str) -> PathBuf {
        if self.exec_mode != ExecMode::Prefix {
            return PathBuf::from(program);
        }
        let candidates: Vec<String> = if program.starts_with('/') {
            vec![program.to_string()]
        } else if program.contains('/') {
            return PathBuf::from(program);
        } else {
            HOST_PATH
                .iter()
                .map(|dir| format!("{dir}/{program}"))
                .collect()
        };
        for candidate in candidates {
            if let Ok(path) = self.resolve(&candidate)
                && path.is_file()
            {
                return path;
            }
        }
        PathBuf::from(program)
    }

    /// The root's own PATH directories first, then the machine's.
    fn prefixed_path(&self) -> OsString {
        let mut dirs: Vec<PathBuf> = HOST_PATH.iter().map(|d| self.absolute.join(d)).collect();
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        std::env::join_paths(dirs).unwrap_or_default()
    }

    fn finish(&self, mut command: Command, argv: &[String]) -> Result<CommandRecord, HostError> {
        tracing::debug!(command = %argv.join(" "), "running");
        // A command may replace a directory with a symlink.
        self.known.lock().expect("not poisoned").clear();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| HostError::Spawn {
                command: argv.join(" "),
                source,
            })?;
        let stdout = drain(child.stdout.take().expect("piped"));
        let stderr = drain(child.stderr.take().expect("piped"));
        // Wait on a thread so the timeout costs nothing while the command
        // runs; on expiry the whole process group is killed (a shell's
        // children too), which ends the wait.
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait());
        });
        let (status, timed_out) = match finished.recv_timeout(self.command_timeout) {
            Ok(status) => (status.ok(), false),
            Err(_) => {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                (finished.recv().ok().and_then(Result::ok), true)
            }
        };
        Ok(CommandRecord {
            argv: argv.to_vec(),
            exit_code: status.and_then(|s| s.code()),
            timed_out,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn split_parent(host_path: &str) -> (&str, &str) {
    let trimmed = host_path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((parent, name)) => (parent, name),
        None => ("", trimmed),
    }
}

/// Whether a directory entry is a temporary of another gpuprov process's
/// (`.<name>.gpuprov-<pid>…`): one killed mid-write, since every writer
/// holds the host's apply lock.
fn is_stale_temp(entry_name: &str, prefix: &str) -> bool {
    let Some(rest) = entry_name.strip_prefix(prefix) else {
        return false;
    };
    let pid = rest.split(['-', '.']).next().unwrap_or_default();
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && pid != std::process::id().to_string()
}

fn remove_entry(entry: &fs::DirEntry) {
    let stale = entry.path();
    tracing::info!(path = %stale.display(), "removing what an interrupted run left");
    let _ = match entry.file_type() {
        Ok(kind) if kind.is_dir() => fs::remove_dir_all(&stale),
        _ => fs::remove_file(&stale),
    };
}

impl Host {
    /// Removes every temporary an interrupted run left under `host_dir`
    /// (gpuprov's own directories, swept at the start of each run under
    /// the lock: their files are not all rewritten by the next run).
    pub fn sweep_interrupted(&self, host_dir: &str) -> Result<(), HostError> {
        fn sweep(dir: &Path) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some((base, _)) = name.split_once(".gpuprov-")
                    && base.starts_with('.')
                    && is_stale_temp(&name, &format!("{base}.gpuprov-"))
                {
                    remove_entry(&entry);
                } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    sweep(&entry.path());
                }
            }
        }
        sweep(&self.resolve(host_dir)?);
        Ok(())
    }
}

/// Removes what a gpuprov killed mid-write left beside `path`: its
/// `.<name>.gpuprov-<pid>…` temporary files and directories (atomic writes,
/// downloads, unpacking). Every writer holds the host's apply lock, so such
/// an entry of another process is stale. Best effort: a sweep that fails
/// leaves the entry for the next.
pub(crate) fn sweep_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!(".{}.gpuprov-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if is_stale_temp(&entry.file_name().to_string_lossy(), &prefix) {
            remove_entry(&entry);
        }
    }
}

fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(
        ".{name}.gpuprov-{}-{unique}.tmp",
        std::process::id()
    ))
}

fn keep_owner(file: &File, meta: &fs::Metadata) -> std::io::Result<()> {
    let current = file.metadata()?;
    if current.uid() == meta.uid() && current.gid() == meta.gid() {
        return Ok(());
    }
    nix::unistd::fchown(
        file.as_fd(),
        Some(nix::unistd::Uid::from_raw(meta.uid())),
        Some(nix::unistd::Gid::from_raw(meta.gid())),
    )
    .map_err(std::io::Error::from)
}

fn open_pid1_namespaces() -> Result<Vec<(File, nix::sched::CloneFlags)>, HostError> {
    use nix::sched::CloneFlags;
    [
        ("mnt", CloneFlags::CLONE_NEWNS),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("net", CloneFlags::CLONE_NEWNET),
    ]
    .into_iter()
    .map(|(name, flag)| {
        let path = PathBuf::from(format!("/proc/1/ns/{name}"));
        File::open(&path)
            .map(|file| (file, flag))
            .map_err(|source| HostError::Namespace { path, source })
    })
    .collect()
}

/// Reads a pipe to its end on its own thread, keeping the tail.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let start = bytes.len().saturating_sub(OUTPUT_TAIL_BYTES);
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn host(dir: &Path) -> Host {
        Host::new(dir, ExecMode::Prefix, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn a_write_sweeps_what_a_killed_run_left_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        fs::create_dir_all(etc.join(".config.toml.gpuprov-4000001.new")).unwrap();
        fs::write(etc.join(".config.toml.gpuprov-4000001-3.tmp"), "half").unwrap();
        let ours = format!(".config.toml.gpuprov-{}-99.tmp", std::process::id());
        fs::write(etc.join(&ours), "in flight").unwrap();
        fs::write(
            etc.join(".other.toml.gpuprov-4000001-0.tmp"),
            "not beside it",
        )
        .unwrap();
        // Even a write that changes nothing sweeps.
        fs::write(etc.join("config.toml"), "same").unwrap();
        assert!(
            !host(dir.path())
                .write_atomic("/etc/config.toml", b"same", 0o644)
                .unwrap()
        );
        let mut left: Vec<String> = fs::read_dir(&etc)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ours.as_str(),
                ".other.toml.gpuprov-4000001-0.tmp",
                "config.toml"
            ]
        );
    }

    #[test]
    fn a_run_sweeps_its_own_directories_of_what_a_killed_run_left() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("var/lib/gpuprov/backup/etc");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join(".config.toml.gpuprov-4000001-0.tmp"), "half").unwrap();
        fs::write(
            dir.path()
                .join("var/lib/gpuprov/.events.json.gpuprov-4000002-7.tmp"),
            "",
        )
        .unwrap();
        fs::write(own.join(".config.toml.keep"), "a user's file").unwrap();
        host(dir.path())
            .sweep_interrupted("/var/lib/gpuprov")
            .unwrap();
        assert!(!own.join(".config.toml.gpuprov-4000001-0.tmp").exists());
        assert!(
            !dir.path()
                .join("var/lib/gpuprov/.events.json.gpuprov-4000002-7.tmp")
                .exists()
        );
        assert!(own.join(".config.toml.keep").exists());
        // A directory that does not exist yet is nothing to sweep.
        host(dir.path()).sweep_interrupted("/run/gpuprov").unwrap();
    }

    #[test]
    fn absolute_symlinks_restart_at_the_root() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc/real")).unwrap();
        fs::write(dir.path().join("etc/real/f"), "inside").unwrap();
        symlink("/etc/real", dir.path().join("etc/link")).unwrap();
        assert_eq!(
            host(dir.path()).read("/etc/link/f").unwrap().as_deref(),
            Some("inside")
        );
    }

    #[test]
    fn dotdot_above_the_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        symlink("../../../../etc/passwd", dir.path().join("etc/evil")).unwrap();
        let err = host(dir.path()).read("/etc/evil").unwrap_err();
        assert!(matches!(err, HostError::Escapes { .. }), "{err}");
        assert!(matches!(
            host(dir.path()).read("../x"),
            Err(HostError::Escapes { .. })
        ));
    }

    #[test]
    fn symlink_loops_end_in_an_error() {
        let dir = tempfile::tempdir().unwrap();
        symlink("b", dir.path().join("a")).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        assert!(matches!(
            host(dir.path()).read("a"),
            Err(HostError::SymlinkLoop { .. })
        ));
    }

    #[test]
    fn atomic_write_keeps_mode_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let h = host(dir.path());
        assert!(h.write_atomic("/etc/x/conf", b"one", 0o644).unwrap());
        fs::set_permissions(
            dir.path().join("etc/x/conf"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        assert!(h.write_atomic("/etc/x/conf", b"two", 0o644).unwrap());
        let meta = fs::metadata(dir.path().join("etc/x/conf")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert!(!h.write_atomic("/etc/x/conf", b"two", 0o644).unwrap());
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("etc/x")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn prefix_mode_runs_the_fixture_script_and_records_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        let script = dir.path().join("usr/bin/hello");
        fs::write(
            &script,
            "#!/bin/sh\necho \"root=$GPUPROV_HOST_ROOT\"\necho oops >&2\nexit 3\n",
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let record = host(dir.path())
            .run(&["/usr/bin/hello".to_string()])
            .unwrap();
        assert_eq!(record.exit_code, Some(3));
        assert_eq!(
            record.stdout.trim(),
            format!("root={}", dir.path().display())
        );
        assert_eq!(record.failure_summary(), "exited 3: oops");
        let bare = host(dir.path()).run_shell("hello").unwrap();
        assert_eq!(
            bare.exit_code,
            Some(3),
            "bare names find the root's own scripts first"
        );
    }

    #[test]
    fn commands_past_the_timeout_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let h = Host::new(dir.path(), ExecMode::Prefix, Duration::from_millis(200)).unwrap();
        let record = h.run_shell("sleep 30").unwrap();
        assert!(record.timed_out);
        assert!(!record.success());
    }
}
