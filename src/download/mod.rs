//! Downloading pinned artifacts: a URL and its sha256, checked while the
//! bytes stream to a temporary file, kept in a content-addressed cache
//! (`<root>/var/cache/gpuprov/<sha256>`) so that a second run needs no
//! network at all. `https://` (and `http://` only when allowed) through
//! reqwest; `file://` for air-gapped nodes, a path in the host. A mismatch
//! deletes the temporary file and says expected against actual; nothing
//! downloaded is used before its hash matches.

pub mod unpack;

use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::host::{Host, HostError};

pub const CACHE_DIR: &str = "/var/cache/gpuprov";
const ATTEMPTS: u32 = 3;
/// The most bytes one artifact may have. NVIDIA's largest driver runfile
/// is under 450 MiB and a toolkit tarball a few MiB: a server that sends
/// more (or says it will) is refused before it fills the disk.
pub const DOWNLOAD_CAP: u64 = 1 << 30;
/// The most redirects followed for one download.
const MAX_REDIRECTS: usize = 10;

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
    #[error("{url}: more than {} MiB, the most gpuprov downloads for one artifact", DOWNLOAD_CAP >> 20)]
    TooLarge { url: String },
    #[error("{url}: {why}")]
    Redirect { url: String, why: String },
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
    let Some((file, _)) = host.open_regular(&artifact.cache_path())? else {
        return Ok(false);
    };
    Ok(hash_file(file).is_ok_and(|actual| actual == artifact.sha256))
}

fn hash_file(mut file: File) -> std::io::Result<String> {
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
    let path = artifact.cache_path();
    let mode = if executable { 0o755 } else { 0o644 };
    if cached(host, artifact)?
        && let Some((file, _)) = host.open_regular(&path)?
    {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|source| HostError::Write {
                path: host.root().join(path.trim_start_matches('/')),
                source,
            })?;
        return Ok(path);
    }
    // Created O_EXCL | O_NOFOLLOW beside the cache entry: nothing planted at
    // a predictable name redirects the download.
    let mut temp = host.create_beside(&path)?;
    let actual = download_to(host, artifact, &mut temp, timeout)?;
    if actual != artifact.sha256 {
        return Err(DownloadError::Mismatch {
            url: artifact.url.clone(),
            expected: artifact.sha256.clone(),
            actual,
        });
    }
    temp.commit(mode, true)?;
    Ok(path)
}

/// Streams the artifact into `temp`, hashing as it goes; returns the hash.
fn download_to(
    host: &Host,
    artifact: &Artifact,
    temp: &mut crate::host::NewFile,
    timeout: Duration,
) -> Result<String, DownloadError> {
    let url = &artifact.url;
    let write_err = |source| {
        DownloadError::from(HostError::Write {
            path: host
                .root()
                .join(artifact.cache_path().trim_start_matches('/')),
            source,
        })
    };
    if let Some(path) = url.strip_prefix("file://") {
        let file_err = |source| DownloadError::File {
            url: url.clone(),
            path: host.root().join(path.trim_start_matches('/')),
            source,
        };
        let Some((mut source, _)) = host.open_regular(path)? else {
            return Err(file_err(std::io::ErrorKind::NotFound.into()));
        };
        return copy_hashing(&mut source, temp.file(), None, url).map_err(|e| match e {
            CopyError::Read(e) | CopyError::Write(e) => file_err(e),
            CopyError::TooLarge => DownloadError::TooLarge { url: url.clone() },
        });
    }
    if url.starts_with("http://") && !artifact.allow_insecure_http {
        return Err(DownloadError::InsecureHttp { url: url.clone() });
    }
    if !url.starts_with("https://") && !url.starts_with("http://") {
        return Err(DownloadError::Scheme { url: url.clone() });
    }
    let allow_http = artifact.allow_insecure_http;
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::custom(
            move |attempt| match redirect_refused(
                attempt.url().scheme(),
                attempt.previous().len(),
                allow_http,
            ) {
                Some(why) => attempt.error(why),
                None => attempt.follow(),
            },
        ))
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
            // A redirect refused is the same on every try.
            Err(e) if e.is_redirect() => {
                return Err(DownloadError::Redirect {
                    url: url.clone(),
                    why: crate::error_chain::error_chain(&e),
                });
            }
            Err(e) => {
                last = crate::error_chain::error_chain(&e);
                continue;
            }
        };
        let status = response.status().as_u16();
        // A redirect reqwest does not follow at all (to a scheme it has no
        // client for) comes back as the answer: never hashed as the body.
        if (300..400).contains(&status) {
            let to = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("nowhere");
            let scheme = to.split_once("://").map_or(to, |(scheme, _)| scheme);
            let why = redirect_refused(scheme, 1, artifact.allow_insecure_http)
                .unwrap_or_else(|| format!("a redirect to {to} that was not followed"));
            return Err(DownloadError::Redirect {
                url: url.clone(),
                why: format!("the server answered {status}: {why}"),
            });
        }
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
        if expected_len.is_some_and(|len| len > DOWNLOAD_CAP) {
            return Err(DownloadError::TooLarge { url: url.clone() });
        }
        // A retry starts the temporary file again.
        let file = temp.file();
        file.set_len(0).map_err(write_err)?;
        file.seek(std::io::SeekFrom::Start(0)).map_err(write_err)?;
        match copy_hashing(&mut response, file, expected_len, url) {
            Ok(hash) => return Ok(hash),
            Err(CopyError::Write(source)) => return Err(write_err(source)),
            Err(CopyError::TooLarge) => return Err(DownloadError::TooLarge { url: url.clone() }),
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
    /// Past `DOWNLOAD_CAP`.
    TooLarge,
}

/// Why a redirect to a URL of `scheme` is not followed, after `hops`
/// redirects: plain http (or anything but https) unless
/// `allowInsecureHttp`, and endless chains. An https artifact must not
/// come over http by a redirect that nobody chose.
fn redirect_refused(scheme: &str, hops: usize, allow_http: bool) -> Option<String> {
    match scheme {
        _ if hops > MAX_REDIRECTS => Some(format!("more than {MAX_REDIRECTS} redirects")),
        "https" => None,
        "http" if allow_http => None,
        "http" => {
            Some("redirected to plain http, which is refused without allowInsecureHttp".to_string())
        }
        other => Some(format!(
            "redirected to a {other}:// URL, which is never followed"
        )),
    }
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
        done += n as u64;
        if done > DOWNLOAD_CAP {
            return Err(CopyError::TooLarge);
        }
        hasher.update(&buffer[..n]);
        target.write_all(&buffer[..n]).map_err(CopyError::Write)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_never_downgrade_to_http_unless_allowed() {
        assert_eq!(redirect_refused("https", 1, false), None);
        assert!(
            redirect_refused("http", 1, false)
                .unwrap()
                .contains("without allowInsecureHttp")
        );
        assert_eq!(redirect_refused("http", 1, true), None);
        assert!(redirect_refused("file", 1, true).is_some());
        assert!(redirect_refused("https", MAX_REDIRECTS + 1, true).is_some());
    }
}
