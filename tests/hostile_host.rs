//! The hostile-host corpus, `fixtures/hostile/*.yaml`: a fixture host made
//! hostile (symlinks at paths gpuprov writes or removes, planted
//! temporaries, special and oversize files where it reads, flooding and
//! daemonizing commands, invalid labels, wrong roots, full and read-only
//! mounts, a socket served by something that is not containerd), then one
//! gpuprov command through the binary. For every case:
//!
//! * the exit code and the messages are the documented ones, and nothing
//!   panicked;
//! * nothing outside the root changed (a sentinel directory that the
//!   case's links may name);
//! * nothing on the host changed but what gpuprov owns (its own
//!   directories, its label file and static pods) and what the case allows,
//!   and what the case names as untouched is byte for byte the same;
//! * it ended in bounded time: every command runs with a short
//!   `--command-timeout`, and a run that outlives the backstop fails;
//! * it stayed within bounded memory: no process the corpus ran, gpuprov
//!   or the fixture's commands, reached a peak RSS of 128 MiB.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde::Deserialize;
use support::{FileState, copy_host, gpuprov, repo, tree};

/// How long one case may run before it counts as hanging.
const BACKSTOP: Duration = Duration::from_secs(60);
/// The most memory (peak RSS, KiB) any case may take.
const RSS_LIMIT_KIB: u64 = 128 << 10;

/// The peak RSS of the largest child process waited for so far, in KiB.
fn children_peak_rss_kib() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a pointer to a local, for the kernel to fill.
    match unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } {
        0 => usage.ru_maxrss as u64,
        _ => 0,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// What the case is about, for the report.
    about: String,
    /// The fixture host to start from.
    #[serde(default = "default_host")]
    host: String,
    /// The spec, when not the node-prep-only one.
    spec: Option<String>,
    /// Commands run on the host before it is made hostile (`[apply]`).
    #[serde(default)]
    before: Vec<Vec<String>>,
    #[serde(default)]
    setup: Vec<Setup>,
    /// The command and its arguments (`{root}`, `{outside}`, `{repo}` are
    /// replaced).
    command: Vec<String>,
    exit: i32,
    says: Vec<String>,
    /// Host paths (relative) that may change besides gpuprov's own.
    #[serde(default)]
    changes: Vec<String>,
    /// Host paths that must not change, even where gpuprov's own.
    #[serde(default)]
    untouched: Vec<String>,
    /// The case needs root (mknod, mount): skipped without.
    #[serde(default)]
    root_only: bool,
}

fn default_host() -> String {
    "a100-preinstalled".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Setup {
    Symlink {
        path: String,
        to: String,
    },
    Fifo {
        path: String,
    },
    CharDevice {
        path: String,
        major: u64,
        minor: u64,
    },
    Sparse {
        path: String,
        bytes: u64,
    },
    File {
        path: String,
        content: String,
        #[serde(default)]
        mode: Option<u32>,
    },
    Dir {
        path: String,
    },
    Remove {
        path: String,
    },
    /// A unix socket file that nobody serves.
    Socket {
        path: String,
    },
    /// A process that is not containerd serving a unix socket.
    ServeSocket {
        path: String,
    },
    /// A small tmpfs mounted at `path`, filled up (`full`) or read-only.
    Tmpfs {
        path: String,
        #[serde(default)]
        full: bool,
        #[serde(default)]
        readonly: bool,
    },
    /// `path` bind-mounted onto itself read-only: what it holds stays visible.
    ReadOnly {
        path: String,
    },
}

/// Undoes what a case mounted and started, whatever happens.
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for mount in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

fn fill(text: &str, root: &Path, outside: &Path) -> String {
    text.replace("{root}", &root.display().to_string())
        .replace("{outside}", &outside.display().to_string())
        .replace("{repo}", &repo().display().to_string())
}

fn run_setup(
    step: &Setup,
    root: &Path,
    outside: &Path,
    cleanup: &mut Cleanup,
) -> Result<(), String> {
    let at = |path: &str| {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        path
    };
    let run = |argv: &[&str]| -> Result<(), String> {
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .map_err(|e| e.to_string())?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("{argv:?} failed"))
    };
    match step {
        Setup::Symlink { path, to } => {
            let path = at(path);
            let _ = fs::remove_file(&path);
            symlink(fill(to, root, outside), path).map_err(|e| e.to_string())
        }
        Setup::Fifo { path } => {
            let path = at(path);
            let _ = fs::remove_file(&path);
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o644))
                .map_err(|e| e.to_string())
        }
        Setup::CharDevice { path, major, minor } => {
            let path = at(path);
            let _ = fs::remove_file(&path);
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o644),
                nix::sys::stat::makedev(*major, *minor),
            )
            .map_err(|e| e.to_string())
        }
        Setup::Sparse { path, bytes } => {
            let file = fs::File::create(at(path)).map_err(|e| e.to_string())?;
            file.set_len(*bytes).map_err(|e| e.to_string())
        }
        Setup::File {
            path,
            content,
            mode,
        } => {
            let path = at(path);
            let _ = fs::remove_file(&path);
            fs::write(&path, fill(content, root, outside)).map_err(|e| e.to_string())?;
            if let Some(mode) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Setup::Dir { path } => {
            let path = at(path);
            let _ = fs::remove_file(&path);
            fs::create_dir_all(path).map_err(|e| e.to_string())
        }
        Setup::Remove { path } => {
            let path = root.join(path);
            if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(path).map_err(|e| e.to_string())
            } else {
                fs::remove_file(path).map_err(|e| e.to_string())
            }
        }
        Setup::Socket { path } => {
            let path = at(path);
            let _ = fs::remove_file(&path);
            drop(std::os::unix::net::UnixListener::bind(&path).map_err(|e| e.to_string())?);
            Ok(())
        }
        Setup::ServeSocket { path } => {
            let path = at(path);
            let _ = fs::remove_file(&path);
            let child = Command::new("python3")
                .arg("-c")
                .arg(
                    "import socket, sys\n\
                     s = socket.socket(socket.AF_UNIX)\n\
                     s.bind(sys.argv[1])\n\
                     s.listen(16)\n\
                     while True:\n    s.accept()[0].close()\n",
                )
                .arg(&path)
                .spawn()
                .map_err(|e| e.to_string())?;
            cleanup.children.push(child);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::os::unix::net::UnixStream::connect(&path).is_err() {
                if std::time::Instant::now() > deadline {
                    return Err("the socket server did not start".to_string());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        }
        Setup::Tmpfs {
            path,
            full,
            readonly,
        } => {
            let path = at(path);
            fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            let target = path.display().to_string();
            run(&["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", &target])?;
            cleanup.mounts.push(path.clone());
            if *full {
                // Fill it to the last block.
                let mut file = fs::File::create(path.join(".full")).map_err(|e| e.to_string())?;
                let block = vec![0u8; 4096];
                while std::io::Write::write_all(&mut file, &block).is_ok() {}
            }
            if *readonly {
                run(&["mount", "-o", "remount,ro", &target])?;
            }
            Ok(())
        }
        Setup::ReadOnly { path } => {
            let target = root.join(path).display().to_string();
            run(&["mount", "--bind", &target, &target])?;
            cleanup.mounts.push(root.join(path));
            run(&["mount", "-o", "remount,ro,bind", &target])
        }
    }
}

/// What gpuprov may change on any host: its own directories, its label
/// file, its static pods, and the fixture's own log of fake systemctl calls.
fn owned(path: &Path) -> bool {
    let text = path.to_string_lossy();
    ["var/lib/gpuprov", "run/gpuprov", "var/cache/gpuprov"]
        .iter()
        .any(|own| path.starts_with(own) || Path::new(own).starts_with(path))
        || text == "etc/kubernetes/node-feature-discovery/features.d/gpuprov"
        || (text.starts_with("etc/kubernetes/manifests/gpuprov-") && text.ends_with(".yaml"))
        || text == "var/log/fake-systemctl.log"
        || text == "run/containerd/containerd.sock"
}

/// A directory's entries are compared one by one; its own mtime is not.
fn comparable(state: &FileState) -> (Vec<u8>, u32, Option<PathBuf>, Option<i128>) {
    let is_dir = state.mode & 0o170000 == 0o040000;
    (
        state.bytes.clone(),
        state.mode,
        state.link.clone(),
        (!is_dir).then_some(state.mtime_ns),
    )
}

fn differences(
    before: &BTreeMap<PathBuf, FileState>,
    after: &BTreeMap<PathBuf, FileState>,
) -> Vec<PathBuf> {
    before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p).map(comparable) != after.get(*p).map(comparable))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn gpuprov_on(root: &Path, outside: &Path, argv: &[String], spec: &Path) -> assert_cmd::Command {
    let mut cmd = gpuprov();
    let argv: Vec<String> = argv.iter().map(|a| fill(a, root, outside)).collect();
    cmd.arg(&argv[0]);
    if matches!(argv[0].as_str(), "apply" | "plan" | "revert") {
        cmd.args(["--host-exec", "prefix", "--command-timeout", "3s"]);
        if !argv.iter().any(|a| a == "--config" || a == "-c") {
            cmd.arg("--config").arg(spec);
        }
    }
    if !argv.iter().any(|a| a == "--host-root") {
        cmd.arg("--host-root").arg(root);
    }
    cmd.args(&argv[1..]).timeout(BACKSTOP);
    cmd
}

/// Runs one case; what went wrong, if anything.
fn check(name: &str, case: &Case) -> Result<(), String> {
    let host = copy_host(&case.host);
    let root = host.path();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), "outside the root\n").unwrap();
    let spec = match &case.spec {
        Some(text) => support::write_spec(root, "spec.yaml", text),
        None => repo().join("fixtures/specs/node-prep-only.yaml"),
    };
    for argv in &case.before {
        let output = gpuprov_on(root, outside.path(), argv, &spec)
            .output()
            .unwrap();
        if !output.status.success() {
            return Err(format!(
                "`{}` before the case failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    let mut cleanup = Cleanup::default();
    for step in &case.setup {
        run_setup(step, root, outside.path(), &mut cleanup)
            .map_err(|e| format!("setting up {step:?}: {e}"))?;
    }
    let before = tree(root);
    let outside_before = tree(outside.path());
    let output = gpuprov_on(root, outside.path(), &case.command, &spec)
        .output()
        .unwrap();
    let after = tree(root);
    drop(cleanup);
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let shown = format!("--- output ---\n{text}");
    let Some(code) = output.status.code() else {
        return Err(format!("{name}: killed (ran past {BACKSTOP:?}?)\n{shown}"));
    };
    let mut problems = Vec::new();
    // The largest process this test has waited for so far (every case's
    // gpuprov among them): the case that takes it past the limit says so.
    let peak = children_peak_rss_kib();
    if peak > RSS_LIMIT_KIB {
        problems.push(format!("a peak RSS of {peak} KiB (over {RSS_LIMIT_KIB})"));
    }
    if code != case.exit {
        problems.push(format!("exit {code} (expected {})", case.exit));
    }
    if text.contains("panicked") {
        problems.push("it panicked".to_string());
    }
    for says in &case.says {
        let says = fill(says, root, outside.path());
        if !text.contains(&says) {
            problems.push(format!("does not say {says:?}"));
        }
    }
    if tree(outside.path()) != outside_before {
        problems.push("changed something outside the host root".to_string());
    }
    for path in differences(&before, &after) {
        let text = path.to_string_lossy();
        // A directory made to hold a file gpuprov owns harms nothing.
        let new_dir = !before.contains_key(&path)
            && after
                .get(&path)
                .is_some_and(|s| s.mode & 0o170000 == 0o040000);
        let allowed = (new_dir || owned(&path) || case.changes.iter().any(|c| text == c.as_str()))
            && !case.untouched.iter().any(|u| text == u.as_str());
        if !allowed {
            problems.push(format!("changed {text}, which it does not own"));
        }
    }
    for path in &case.untouched {
        if before.get(Path::new(path)).map(comparable) != after.get(Path::new(path)).map(comparable)
        {
            problems.push(format!("changed {path}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{name} ({}): {}\n{shown}",
            case.about,
            problems.join("; ")
        ))
    }
}

#[test]
fn every_hostile_host_is_refused_cleanly_and_left_as_it_was() {
    let is_root = nix::unistd::geteuid().is_root();
    let dir = repo().join("fixtures/hostile");
    let mut names: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 45, "the corpus has {} cases", names.len());
    let mut failures = Vec::new();
    for path in &names {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(path).unwrap();
        let case: Case = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        if case.root_only && !is_root {
            eprintln!("skipped {name}: needs root (CI and scripts/test run as root)");
            continue;
        }
        if let Err(problem) = check(&name, &case) {
            failures.push(problem);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile hosts were not handled as expected:\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
}
