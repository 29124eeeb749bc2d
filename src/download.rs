//! Downloading pinned artifacts: a URL and its sha256, checked while the
//! bytes stream to a temporary file, kept in a content-addressed cache
//! (`<root>/var/cache/gpuprov/<sha256>`) so that a second run needs no
//! network at all. `https://` (and `http://` only when allowed) through
//! reqwest; `file://` for air-gapped nodes, a path in the host. A mismatch
//! deletes the temporary file and says expected against actual; nothing
//! downloaded is used before its hash matches.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::host::{Host, HostError};

pub const CACHE_DIR: &str = "/var/cache/gpuprov";
const ATTEMPTS: u32 = 3;

/// Something to download, pinned by its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    pub url: String,
    /// Lower-case hex.
    pub sha256: String,
    /// Plain `http://` is refused unless this is set.
    pub allow_insecure_http: bool,
}

impl Artifact {
    /// The host path the artifact has in the cache.
    pub fn cache_path(&self) -> String {
        format!("{CACHE_DIR}/{}", self.sha256)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "{url}: sha256 mismatch: expected {expected}, got {actual}; the download was deleted and nothing was run"
    )]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: plain http is refused; use https, file://, or set allowInsecureHttp")]
    InsecureHttp { url: String },
    #[error("{url}: unsupported URL scheme (https://, http:// or file://)")]
    Scheme { url: String },
    #[error("{url}: the server answered {status}")]
    Refused { url: String, status: u16 },
    #[error("{url}: failed after {ATTEMPTS} tries: {last}")]
    Failed { url: String, last: String },
    #[error("{url}: cannot read {path}")]
    File {
        url: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the artifact is in the cache with the right contents.
pub fn cached(host: &Host, artifact: &Artifact) -> Result<bool, DownloadError> {
    let path = host.resolve(&artifact.cache_path())?;
    if !path.is_file() {
        return Ok(false);
    }
    Ok(hash_file(&path).is_ok_and(|actual| actual == artifact.sha256))
}

fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Puts the artifact in the cache (unless it is there) and returns its host
/// path. `executable` makes it runnable (an installer).
pub fn fetch(
    host: &Host,
    artifact: &Artifact,
    timeout: Duration,
    executable: bool,
) -> Result<String, DownloadError> {
    let target = host.resolve(&artifact.cache_path())?;
    let mode = if executable { 0o755 } else { 0o644 };
    if cached(host, artifact)? {
        fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(|source| {
            HostError::Write {
                path: target.clone(),
                source,
            }
        })?;
        return Ok(artifact.cache_path());
    }
    let dir = target
        .parent()
        .expect("the cache is a directory")
        .to_path_buf();
    fs::create_dir_all(&dir).map_err(|source| HostError::Write {
        path: dir.clone(),
        source,
    })?;
    crate::host::sweep_stale_temps(&target);
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.gpuprov-{}.part", std::process::id()));
    let result = download_to(host, artifact, &temp, timeout);
    let actual = match result {
        Ok(actual) => actual,
        Err(e) => {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
    };
    if actual != artifact.sha256 {
        let _ = fs::remove_file(&temp);
        return Err(DownloadError::Mismatch {
            url: artifact.url.clone(),
            expected: artifact.sha256.clone(),
            actual,
        });
    }
    let write_err = |source| HostError::Write {
        path: target.clone(),
        source,
    };
    fs::set_permissions(&temp, fs::Permissions::from_mode(mode)).map_err(write_err)?;
    fs::rename(&temp, &target).map_err(write_err)?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(artifact.cache_path())
}

/// Streams the artifact into `temp`, hashing as it goes; returns the hash.
fn download_to(
    host: &Host,
    artifact: &Artifact,
    temp: &std::path::Path,
    timeout: Duration,
) -> Result<String, DownloadError> {
    let url = &artifact.url;
    let open_temp = || {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(temp)
            .map_err(|source| HostError::Write {
                path: temp.to_path_buf(),
                source,
            })
    };
    if let Some(path) = url.strip_prefix("file://") {
        let source_path = host.resolve(path)?;
        let file_err = |source| DownloadError::File {
            url: url.clone(),
            path: source_path.clone(),
            source,
        };
        let mut source = File::open(&source_path).map_err(file_err)?;
        return copy_hashing(&mut source, &mut open_temp()?, None, url).map_err(|e| match e {
            CopyError::Read(e) | CopyError::Write(e) => file_err(e),
        });
    }
    if url.starts_with("http://") && !artifact.allow_insecure_http {
        return Err(DownloadError::InsecureHttp { url: url.clone() });
    }
    if !url.starts_with("https://") && !url.starts_with("http://") {
        return Err(DownloadError::Scheme { url: url.clone() });
    }
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .build()
        .map_err(|e| DownloadError::Failed {
            url: url.clone(),
            last: e.to_string(),
        })?;
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            let pause = Duration::from_millis(500 << attempt);
            tracing::warn!(%url, attempt, "download failed ({last}); retrying in {pause:?}");
            std::thread::sleep(pause);
        }
        let mut response = match client.get(url).send() {
            Ok(response) => response,
            Err(e) => {
                last = crate::exec::error_chain(&e);
                continue;
            }
        };
        let status = response.status().as_u16();
        if (400..500).contains(&status) {
            return Err(DownloadError::Refused {
                url: url.clone(),
                status,
            });
        }
        if status >= 500 {
            last = format!("the server answered {status}");
            continue;
        }
        let expected_len = response.content_length();
        match copy_hashing(&mut response, &mut open_temp()?, expected_len, url) {
            Ok(hash) => return Ok(hash),
            Err(CopyError::Write(source)) => {
                return Err(HostError::Write {
                    path: temp.to_path_buf(),
                    source,
                }
                .into());
            }
            Err(CopyError::Read(e)) => last = e.to_string(),
        }
    }
    Err(DownloadError::Failed {
        url: url.clone(),
        last,
    })
}

enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies with hashing and progress: a line on a terminal, a log line every
/// few seconds otherwise. A body shorter than its Content-Length is an error.
fn copy_hashing(
    source: &mut dyn Read,
    target: &mut File,
    total: Option<u64>,
    url: &str,
) -> Result<String, CopyError> {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    let mut done: u64 = 0;
    let mut last_report = Instant::now();
    loop {
        let n = source.read(&mut buffer).map_err(CopyError::Read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        target.write_all(&buffer[..n]).map_err(CopyError::Write)?;
        done += n as u64;
        if last_report.elapsed() >= Duration::from_secs(if terminal { 1 } else { 5 }) {
            last_report = Instant::now();
            let of = total
                .map(|t| format!(" of {} MiB", t >> 20))
                .unwrap_or_default();
            if terminal {
                eprint!("\rdownloading {url}: {} MiB{of}   ", done >> 20);
            } else {
                tracing::info!(%url, "downloaded {} MiB{of}", done >> 20);
            }
        }
    }
    if terminal && done >= 1 << 20 {
        eprintln!();
    }
    if let Some(total) = total
        && done != total
    {
        return Err(CopyError::Read(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the body ended after {done} of {total} bytes"),
        )));
    }
    target.sync_all().map_err(CopyError::Write)?;
    Ok(hex(&hasher.finalize()))
}

/// Unpacks a cached `.tar.gz` into `into` (host paths) atomically: into a
/// fresh sibling directory first, then renamed over `into` (an older
/// `into` moves aside and is removed). Entries cannot escape the directory.
pub fn unpack(host: &Host, archive: &str, into: &str) -> Result<(), String> {
    let archive_path = host
        .resolve(archive)
        .map_err(|e| crate::exec::error_chain(&e))?;
    let target = host
        .resolve(into)
        .map_err(|e| crate::exec::error_chain(&e))?;
    let parent = target
        .parent()
        .ok_or_else(|| format!("{into} has no parent directory"))?
        .to_path_buf();
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::host::sweep_stale_temps(&target);
    let fresh = parent.join(format!(".{name}.gpuprov-{}.new", std::process::id()));
    let old = parent.join(format!(".{name}.gpuprov-{}.old", std::process::id()));
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    fs::create_dir_all(&parent).map_err(|e| io(&parent.display().to_string(), e))?;
    let _ = fs::remove_dir_all(&fresh);
    fs::create_dir_all(&fresh).map_err(|e| io(&fresh.display().to_string(), e))?;
    let result = File::open(&archive_path)
        .map_err(|e| io(archive, e))
        .and_then(|file| {
            tar::Archive::new(flate2::read::GzDecoder::new(file))
                .unpack(&fresh)
                .map_err(|e| io(&format!("unpacking {archive}"), e))
        });
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&fresh);
        return Err(e);
    }
    if target.exists() {
        fs::rename(&target, &old).map_err(|e| io(into, e))?;
    }
    fs::rename(&fresh, &target).map_err(|e| io(into, e))?;
    let _ = fs::remove_dir_all(&old);
    File::open(&parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(&parent.display().to_string(), e))
}
