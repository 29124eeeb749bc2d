//! Getting a runtime (containerd, CRI-O) to load a changed config: wait
//! for its socket to answer, and the `signal` restart mode.
//!
//! containerd has no reload. It stops cleanly on SIGTERM, and it dies on
//! SIGHUP (it does not handle that signal), so either way a service manager
//! (systemd, s6, a supervisor loop) must start it again; gpuprov then waits
//! for a new process to answer on the socket.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Whether a process listens on the unix socket at `socket` (a real
/// path): a connect that never waits, so a listener that does not accept
/// (its backlog full) cannot hold gpuprov; it is there, and counts.
pub fn answers(socket: &Path) -> bool {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect};
    let Ok(address) = UnixAddr::new(socket) else {
        return false;
    };
    let Ok(fd) = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    use std::os::fd::AsRawFd;
    matches!(
        connect(fd.as_raw_fd(), &address),
        Ok(()) | Err(nix::errno::Errno::EAGAIN)
    )
}

/// Sets the mode of the socket gpuprov just bound at `socket` (a real
/// path), on that socket itself: held without following a link, checked
/// to be a socket, changed through its descriptor.
pub fn set_socket_mode(socket: &Path, mode: u32) -> Result<(), String> {
    use rustix::fs::{FileType, Mode, OFlags};
    let shown = socket.display();
    let fd = rustix::fs::open(
        socket,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open {shown}: {e}"))?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| format!("cannot stat {shown}: {e}"))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
        return Err(format!("{shown} is no longer the socket gpuprov bound"));
    }
    // An O_PATH descriptor takes no fchmod; its /proc link names the
    // inode itself (as glibc's fchmodat does it).
    use std::os::fd::AsRawFd;
    rustix::fs::chmod(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| format!("cannot set the mode of {shown}: {e}"))
}

/// The pid of the process serving a unix socket, from its peer credentials.
pub fn socket_owner(socket: &Path) -> Result<i32, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let credentials = getsockopt(&stream.as_fd(), PeerCredentials).map_err(|e| {
        format!(
            "cannot read the peer credentials of {}: {e}",
            socket.display()
        )
    })?;
    Ok(credentials.pid())
}

/// Waits until a process answers on `socket` (other than `old_pid`, when given).
pub fn wait_for_socket(
    socket: &Path,
    timeout: Duration,
    old_pid: Option<i32>,
) -> Result<(), String> {
    let started = Instant::now();
    loop {
        match socket_owner(socket) {
            Ok(pid) if Some(pid) != old_pid => return Ok(()),
            _ if started.elapsed() >= timeout => {
                return Err(format!(
                    "nothing answered on {} within {}s",
                    socket.display(),
                    timeout.as_secs()
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Stops the process serving `socket` with SIGTERM and waits for its
/// service manager to start a new one.
///
/// The signal goes only to a process proven to be containerd: the socket's
/// peer, held by a pidfd (so a pid that is reused meanwhile is never hit),
/// that is not PID 0 (a peer outside gpuprov's PID namespace), not PID 1,
/// not gpuprov itself (the signal goes to one process, never a group), whose `/proc/<pid>/comm`
/// is containerd's, and that still serves the socket once held.
pub fn signal_and_wait(socket: &Path, timeout: Duration) -> Result<(), String> {
    let pid = socket_owner(socket)?;
    let pidfd = identify_containerd(socket, pid)?;
    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::TERM)
        .map_err(|e| format!("cannot signal containerd (pid {pid}): {e}"))?;
    wait_for_socket(socket, timeout, Some(pid))
}

/// The process names containerd runs under.
const CONTAINERD_NAMES: &[&str] = &["containerd"];

/// Proves that `pid`, the peer of `socket`, is containerd, and holds it.
fn identify_containerd(socket: &Path, pid: i32) -> Result<std::os::fd::OwnedFd, String> {
    let shown = socket.display();
    let hint = "use containerd.restartMode: systemd, or run gpuprov with hostPID: true";
    if pid == 0 {
        return Err(format!(
            "the process serving {shown} is outside gpuprov's PID namespace (its peer pid reads 0), so gpuprov cannot prove which process it is: {hint}"
        ));
    }
    if pid == 1 {
        return Err(format!(
            "the process serving {shown} is PID 1 (an init, or containerd as a container's first process): gpuprov does not signal PID 1; {hint}"
        ));
    }
    if pid == std::process::id() as i32 {
        return Err(format!(
            "the process serving {shown} is gpuprov itself (pid {pid}): not signalled"
        ));
    }
    let raw = rustix::process::Pid::from_raw(pid).ok_or("pid 0")?;
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .map_err(|e| format!("cannot hold the process serving {shown} (pid {pid}): {e}"))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_string())
        .map_err(|e| {
            format!(
                "cannot read /proc/{pid}/comm to prove that the process serving {shown} is containerd: {e}; {hint}"
            )
        })?;
    if !CONTAINERD_NAMES.contains(&comm.as_str()) {
        return Err(format!(
            "the process serving {shown} (pid {pid}) is `{comm}`, not containerd: not signalled"
        ));
    }
    // Held now: if the socket still has that peer, it is the same process.
    if socket_owner(socket)? != pid {
        return Err(format!(
            "the process serving {shown} changed while it was being identified: not signalled"
        ));
    }
    Ok(pidfd)
}
