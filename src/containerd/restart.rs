//! Getting containerd to load a changed config: wait for its socket to
//! answer, and the `signal` restart mode.
//!
//! containerd has no reload. It stops cleanly on SIGTERM, and it dies on
//! SIGHUP (it does not handle that signal), so either way a service manager
//! (systemd, s6, a supervisor loop) must start it again; gpuprov then waits
//! for a new process to answer on the socket.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Pid;

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
pub fn signal_and_wait(socket: &Path, timeout: Duration) -> Result<(), String> {
    let pid = socket_owner(socket)?;
    kill(Pid::from_raw(pid), Signal::SIGTERM)
        .map_err(|e| format!("cannot signal containerd (pid {pid}): {e}"))?;
    wait_for_socket(socket, timeout, Some(pid))
}
