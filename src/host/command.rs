//! Running a command inside the host: an argument vector, through chroot,
//! nsenter or prefix, with a timeout that holds and output kept as a
//! bounded tail.
//!
//! The command runs in its own process group. Its stdout and stderr are
//! read on the calling thread with poll(2), together with a pidfd that says
//! when the command itself ends, so that:
//!
//! * a flood of output costs nothing but reading it: only the last
//!   `OUTPUT_TAIL_BYTES` of each stream are kept;
//! * the timeout holds whatever the command does: at the deadline its
//!   process group is killed and gpuprov stops reading;
//! * a daemonized grandchild that keeps the pipes open does not hold the
//!   run: once the command has exited, what it left behind gets
//!   `EXIT_GRACE` to close the pipes, then gpuprov stops reading.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{CommandMode, HOST_PATH, Host, HostError};

/// How much of a command's stdout and stderr a record keeps (the tail).
pub const OUTPUT_TAIL_BYTES: usize = 4096;
/// How long the pipes may stay open after the command itself exited (a
/// daemon it started holds them).
const EXIT_GRACE: Duration = Duration::from_millis(500);

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
    /// The whole stdout of a `run_keeping` run, leaving the record only its
    /// tail, as every other command's record keeps.
    pub fn take_stdout_keeping_tail(&mut self) -> String {
        let all = std::mem::take(&mut self.stdout);
        let tail = all.len().saturating_sub(OUTPUT_TAIL_BYTES);
        let tail = (tail..=all.len())
            .find(|i| all.is_char_boundary(*i))
            .unwrap_or(all.len());
        self.stdout = all[tail..].to_string();
        all
    }

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

impl Host {
    /// Runs an argument vector inside the host. Never a shell string with
    /// values pasted in; see `run_shell` for a user's own commands.
    pub fn run(&self, argv: &[String]) -> Result<CommandRecord, HostError> {
        self.run_keeping(argv, OUTPUT_TAIL_BYTES)
    }

    /// `run`, keeping up to `stdout_bytes` of stdout (the tail) instead of
    /// 4 KiB: for a command whose output gpuprov reads (`containerd config
    /// dump`).
    pub fn run_keeping(
        &self,
        argv: &[String],
        stdout_bytes: usize,
    ) -> Result<CommandRecord, HostError> {
        let program = self.program_path(&argv[0]);
        let mut command = Command::new(&program);
        command.args(&argv[1..]);
        match self.exec_mode {
            CommandMode::Prefix => {
                command
                    .current_dir(&self.absolute)
                    .env("GPUPROV_HOST_ROOT", &self.absolute)
                    .env("PATH", self.prefixed_path());
            }
            CommandMode::Chroot => {
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
            CommandMode::Nsenter => {
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
        self.finish(command, argv, stdout_bytes)
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
        if self.exec_mode != CommandMode::Prefix {
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
            if self.is_file(&candidate).unwrap_or(false)
                && let Ok(path) = self.resolve(&candidate)
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

    fn finish(
        &self,
        mut command: Command,
        argv: &[String],
        stdout_bytes: usize,
    ) -> Result<CommandRecord, HostError> {
        tracing::debug!(command = %argv.join(" "), "running");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| HostError::Spawn {
                command: argv.join(" "),
                hint: spawn_hint(self.exec_mode, &self.absolute, &source),
                source,
            })?;
        let (status, timed_out, stdout, stderr) = watch(child, self.command_timeout, stdout_bytes);
        Ok(CommandRecord {
            argv: argv.to_vec(),
            exit_code: status.and_then(|s| s.code()),
            timed_out,
            stdout,
            stderr,
        })
    }
}

/// What to try when a command cannot start.
fn spawn_hint(mode: CommandMode, root: &std::path::Path, error: &std::io::Error) -> String {
    match mode {
        CommandMode::Chroot => format!(
            " (in a chroot into {}: {}; if that is not a whole host with the command in it, use --host-exec nsenter in a pod with hostPID, or --host-exec prefix for a fixture)",
            root.display(),
            if error.kind() == std::io::ErrorKind::NotFound {
                "the command, or the shell or loader it needs, is not in it"
            } else {
                "chroot or exec failed"
            }
        ),
        // setns fails in the child, where nothing may allocate: which
        // namespace is not known, so the hint names them all.
        CommandMode::Nsenter => match error.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EINVAL) => format!(
                " (joining PID 1's namespaces, {} through /proc/1/ns, failed: gpuprov must be privileged (CAP_SYS_ADMIN) in a pod with hostPID)",
                NAMESPACES.map(|(name, _)| name).join(", ")
            ),
            Some(libc::ENOENT) => {
                " (not found in the host's PATH, in PID 1's mount namespace)".to_string()
            }
            _ => String::new(),
        },
        CommandMode::Prefix => String::new(),
    }
}

/// A stream's last bytes, at most `.1` of them.
struct Tail(VecDeque<u8>, usize);

impl Tail {
    fn new(keep: usize) -> Tail {
        Tail(VecDeque::new(), keep)
    }

    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.1)..];
        let overflow = (self.0.len() + bytes.len()).saturating_sub(self.1);
        self.0.drain(..overflow);
        self.0.extend(bytes);
    }

    fn text(self) -> String {
        String::from_utf8_lossy(&Vec::from(self.0)).into_owned()
    }
}

/// Reads the child's pipes until they close, the command has ended (plus
/// `EXIT_GRACE`), or `timeout` passes (the process group is then killed).
fn watch(
    mut child: Child,
    timeout: Duration,
    stdout_bytes: usize,
) -> (Option<ExitStatus>, bool, String, String) {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let started = Instant::now();
    let deadline = started + timeout;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut pipes: Vec<(Option<File>, Tail)> = vec![
        (
            child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
            Tail::new(stdout_bytes),
        ),
        (
            child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
            Tail::new(OUTPUT_TAIL_BYTES),
        ),
    ];
    // Readable once the command has exited; without pidfds (kernels before
    // 5.3) the loop looks every 50 ms instead.
    let pidfd = rustix::process::Pid::from_raw(child.id() as i32).and_then(|pid| {
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    });
    let mut status = None;
    let mut grace_until = None;
    let mut timed_out = false;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if status.is_none()
            && let Ok(Some(exited)) = child.try_wait()
        {
            status = Some(exited);
            grace_until = Some((Instant::now() + EXIT_GRACE).min(deadline));
        }
        let open = pipes.iter().any(|(pipe, _)| pipe.is_some());
        if status.is_some() && !open {
            break;
        }
        let now = Instant::now();
        let until = grace_until.unwrap_or(deadline);
        if now >= until {
            if status.is_none() {
                timed_out = true;
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                status = child.wait().ok();
            }
            break;
        }
        let mut wait = until - now;
        if pidfd.is_none() && status.is_none() {
            wait = wait.min(Duration::from_millis(50));
        }
        let mut fds: Vec<PollFd<'_>> = Vec::new();
        let mut which = Vec::new();
        for (index, (pipe, _)) in pipes.iter().enumerate() {
            if let Some(pipe) = pipe {
                fds.push(PollFd::new(pipe, PollFlags::IN));
                which.push(Some(index));
            }
        }
        if status.is_none()
            && let Some(pidfd) = &pidfd
        {
            fds.push(PollFd::new(pidfd, PollFlags::IN));
            which.push(None);
        }
        let timespec = Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: wait.subsec_nanos() as _,
        };
        if fds.is_empty() {
            std::thread::sleep(wait);
            continue;
        }
        match rustix::event::poll(&mut fds, Some(&timespec)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
        let ready: Vec<Option<usize>> = fds
            .iter()
            .zip(&which)
            .filter(|(fd, _)| !fd.revents().is_empty())
            .map(|(_, index)| *index)
            .collect();
        drop(fds);
        for index in ready.into_iter().flatten() {
            let (pipe, tail) = &mut pipes[index];
            let Some(file) = pipe else { continue };
            match file.read(&mut buffer) {
                Ok(0) => *pipe = None,
                Ok(n) => tail.push(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => *pipe = None,
            }
        }
    }
    let mut texts = pipes.into_iter().map(|(_, tail)| tail.text());
    let stdout = texts.next().unwrap_or_default();
    let stderr = texts.next().unwrap_or_default();
    (status, timed_out, stdout, stderr)
}

/// The namespaces a host command joins, PID 1's.
const NAMESPACES: [(&str, nix::sched::CloneFlags); 4] = [
    ("mnt", nix::sched::CloneFlags::CLONE_NEWNS),
    ("uts", nix::sched::CloneFlags::CLONE_NEWUTS),
    ("ipc", nix::sched::CloneFlags::CLONE_NEWIPC),
    ("net", nix::sched::CloneFlags::CLONE_NEWNET),
];

fn open_pid1_namespaces() -> Result<Vec<(File, nix::sched::CloneFlags)>, HostError> {
    NAMESPACES
        .into_iter()
        .map(|(name, flag)| {
            let path = PathBuf::from(format!("/proc/1/ns/{name}"));
            File::open(&path)
                .map(|file| (file, flag))
                .map_err(|source| HostError::Namespace { path, source })
        })
        .collect()
}
