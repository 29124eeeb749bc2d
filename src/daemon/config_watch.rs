//! Watching `gpuprov run`'s config file (`notify`: inotify on Linux).
//!
//! The directory holding the file is watched, not the file: a ConfigMap
//! volume replaces its files by swapping a `..data` symlink in that
//! directory, which a watch on the file itself never sees, and an editor
//! replaces a file by renaming a new one over it. Where the path is a link,
//! the directory of what it points at is watched too (a hostPath link to
//! elsewhere). Any event there makes the file be read again, and only
//! different contents count as a change. Where inotify is unavailable (the
//! node's `max_user_instances` or `max_user_watches` used up, a common limit
//! on busy nodes), notify's poller compares the file every two seconds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{PollWatcher, RecommendedWatcher, RecursiveMode, Watcher};

/// How often the fallback poller looks.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// A watch on the config file; it ends when dropped.
pub struct ConfigWatch {
    _watcher: Box<dyn Watcher + Send>,
}

/// Watches `path`; `changed` is called (on notify's thread) each time its
/// bytes differ from the last seen.
pub fn watch(path: &Path, changed: impl Fn() + Send + Sync + 'static) -> ConfigWatch {
    let changed = Arc::new(changed);
    let last = Arc::new(Mutex::new(read(path)));
    let on_event = {
        let path = path.to_path_buf();
        move |event: notify::Result<notify::Event>| {
            // notify's inotify watch reports opens and reads too, and
            // reading the file here opens it: acting on those would read
            // it again for ever, a core spent on nothing.
            if event.is_ok_and(|e| matches!(e.kind, notify::EventKind::Access(_))) {
                return;
            }
            let now = read(&path);
            let mut last = last.lock().expect("not poisoned");
            if *last != now {
                *last = now;
                changed();
            }
        }
    };
    let dirs = watched_dirs(path);
    let watcher: Box<dyn Watcher + Send> = match inotify(&dirs, on_event.clone()) {
        Ok(watcher) => watcher,
        Err(e) => {
            tracing::warn!(
                config = %path.display(),
                "cannot watch the config with inotify ({e}); comparing it every {POLL_INTERVAL:?}"
            );
            match poller(path, on_event) {
                Ok(watcher) => watcher,
                Err(e) => {
                    tracing::error!(config = %path.display(), "the config is not watched: {e}");
                    // Read again only at a restart.
                    Box::new(notify::NullWatcher)
                }
            }
        }
    };
    ConfigWatch { _watcher: watcher }
}

/// The file's text, read as the spec is (a regular file, capped: a FIFO or
/// a huge file there is not read whole); an unreadable file is `None`, and
/// reloading it then reports why.
fn read(path: &Path) -> Option<String> {
    crate::host::read_user_file(path, crate::host::USER_FILE_CAP).ok()
}

/// The file's directory and, for a link, the directory of its target.
fn watched_dirs(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let mut dirs = vec![parent(path)];
    if let Ok(target) = std::fs::canonicalize(path) {
        let dir = parent(&target);
        if std::fs::canonicalize(&dirs[0]).ok().as_ref() != Some(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

fn inotify(
    dirs: &[PathBuf],
    on_event: impl notify::EventHandler,
) -> notify::Result<Box<dyn Watcher + Send>> {
    let mut watcher = RecommendedWatcher::new(on_event, notify::Config::default())?;
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(Box::new(watcher))
}

fn poller(
    path: &Path,
    on_event: impl notify::EventHandler,
) -> notify::Result<Box<dyn Watcher + Send>> {
    let config = notify::Config::default()
        .with_poll_interval(POLL_INTERVAL)
        .with_compare_contents(true);
    let mut watcher = PollWatcher::new(on_event, config)?;
    watcher.watch(path, RecursiveMode::NonRecursive)?;
    Ok(Box::new(watcher))
}
