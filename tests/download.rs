//! Downloads through the real download module against a loopback server:
//! checksums, the cache, `file://`, refusals, timeouts and retries.

mod support;

use std::time::{Duration, Instant};

use gpuprov::download::{Artifact, DownloadError, cached, fetch};
use gpuprov::host::{CommandMode, Host};
use sha2::{Digest, Sha256};
use support::artifact_server::{ArtifactServer, Route};

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn host() -> (tempfile::TempDir, Host) {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new(dir.path(), CommandMode::Prefix, Duration::from_secs(5)).unwrap();
    (dir, host)
}

fn artifact(url: String, body: &[u8]) -> Artifact {
    Artifact {
        url,
        sha256: sha(body),
        allow_insecure_http: true,
    }
}

/// Nothing but finished artifacts in the cache: no partial downloads left.
fn cache_entries(dir: &tempfile::TempDir) -> Vec<String> {
    let cache = dir.path().join("var/cache/gpuprov");
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_download_is_checked_cached_and_not_fetched_again() {
    let server = ArtifactServer::start();
    let body = b"#!/bin/sh\necho installer\n".repeat(1000);
    server.route("/driver.run", Route::Body(body.clone()));
    let (dir, host) = host();
    let artifact = artifact(server.url("/driver.run"), &body);
    let path = fetch(&host, &artifact, Duration::from_secs(10), true).unwrap();
    assert_eq!(path, format!("/var/cache/gpuprov/{}", artifact.sha256));
    assert_eq!(
        std::fs::read(dir.path().join(path.trim_start_matches('/'))).unwrap(),
        body
    );
    assert!(cached(&host, &artifact).unwrap());
    // The server is gone: the cache answers, no network.
    server.stop();
    fetch(&host, &artifact, Duration::from_secs(10), true).unwrap();
    assert_eq!(server.hits("/driver.run"), 1);
    assert_eq!(cache_entries(&dir), vec![artifact.sha256.clone()]);
}

#[test]
fn a_checksum_mismatch_deletes_the_download_and_says_both_hashes() {
    let server = ArtifactServer::start();
    server.route("/driver.run", Route::Body(b"tampered".to_vec()));
    let (dir, host) = host();
    let artifact = artifact(server.url("/driver.run"), b"the real installer");
    let err = fetch(&host, &artifact, Duration::from_secs(10), true).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DownloadError::Mismatch { .. }), "{text}");
    assert!(
        text.contains(&format!("expected {}", artifact.sha256)),
        "{text}"
    );
    assert!(
        text.contains(&format!("got {}", sha(b"tampered"))),
        "{text}"
    );
    assert!(cache_entries(&dir).is_empty(), "nothing is left behind");
}

#[test]
fn refusals_are_clear_and_not_retried() {
    let server = ArtifactServer::start();
    let (dir, host) = host();
    let missing = artifact(server.url("/nope.run"), b"x");
    let err = fetch(&host, &missing, Duration::from_secs(10), true).unwrap_err();
    assert!(
        err.to_string().ends_with("the server answered 404"),
        "{err}"
    );
    assert_eq!(server.hits("/nope.run"), 1, "a 4xx is not retried");
    let insecure = Artifact {
        allow_insecure_http: false,
        ..artifact(server.url("/nope.run"), b"x")
    };
    let err = fetch(&host, &insecure, Duration::from_secs(10), true).unwrap_err();
    assert!(err.to_string().contains("plain http is refused"), "{err}");
    assert_eq!(
        server.hits("/nope.run"),
        1,
        "http is refused before any request"
    );
    let ftp = artifact("ftp://mirror/driver.run".into(), b"x");
    assert!(matches!(
        fetch(&host, &ftp, Duration::from_secs(1), true),
        Err(DownloadError::Scheme { .. })
    ));
    assert!(cache_entries(&dir).is_empty());
}

#[test]
fn truncated_bodies_and_server_errors_are_retried() {
    let server = ArtifactServer::start();
    let body = b"0123456789".repeat(100);
    server.route(
        "/flaky.run",
        Route::Flaky {
            failures: 2,
            body: body.clone(),
        },
    );
    let (_dir, host) = host();
    fetch(
        &host,
        &artifact(server.url("/flaky.run"), &body),
        Duration::from_secs(10),
        true,
    )
    .unwrap();
    assert_eq!(server.hits("/flaky.run"), 3, "two 503s, then the artifact");

    server.route(
        "/short.run",
        Route::Truncated {
            body: body.clone(),
            sent: 10,
        },
    );
    let (dir, host) = self::host();
    let err = fetch(
        &host,
        &artifact(server.url("/short.run"), &body),
        Duration::from_secs(10),
        true,
    )
    .unwrap_err();
    assert!(matches!(err, DownloadError::Failed { .. }), "{err}");
    assert_eq!(server.hits("/short.run"), 3);
    assert!(cache_entries(&dir).is_empty(), "no partial file is left");
}

#[test]
fn a_stalled_server_times_out() {
    let server = ArtifactServer::start();
    server.route("/stall.run", Route::Stall(Duration::from_secs(30)));
    let (_dir, host) = host();
    let started = Instant::now();
    let err = fetch(
        &host,
        &artifact(server.url("/stall.run"), b"x"),
        Duration::from_millis(300),
        true,
    )
    .unwrap_err();
    assert!(matches!(err, DownloadError::Failed { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "timed out, retried, gave up"
    );
}

#[test]
fn file_urls_serve_air_gapped_nodes_from_the_host() {
    let (dir, host) = host();
    let body = b"installer from the node's own disk".to_vec();
    std::fs::create_dir_all(dir.path().join("srv/mirror")).unwrap();
    std::fs::write(dir.path().join("srv/mirror/driver.run"), &body).unwrap();
    let artifact = Artifact {
        allow_insecure_http: false,
        ..artifact("file:///srv/mirror/driver.run".into(), &body)
    };
    let path = fetch(&host, &artifact, Duration::from_secs(5), true).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join(path.trim_start_matches('/'))).unwrap(),
        body
    );
    let gone = Artifact {
        url: "file:///srv/mirror/missing.run".into(),
        sha256: sha(b"not cached"),
        allow_insecure_http: false,
    };
    let err = fetch(&host, &gone, Duration::from_secs(5), true).unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
}

#[test]
fn a_cache_entry_that_is_a_link_is_refused_never_followed() {
    // Someone planted a link at the artifact's cache path, to a file that
    // even has the artifact's bytes (a host binary, say). gpuprov follows
    // no link in its own directories: it refuses, naming the entry, and
    // neither the link nor its target changes (no chmod through it).
    use std::os::unix::fs::PermissionsExt;
    let server = ArtifactServer::start();
    let body = b"#!/bin/sh\necho installer\n".to_vec();
    server.route("/driver.run", Route::Body(body.clone()));
    let (dir, host) = host();
    let artifact = artifact(server.url("/driver.run"), &body);
    let target = dir.path().join("usr/bin/site-tool");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, &body).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cache = dir.path().join("var/cache/gpuprov");
    std::fs::create_dir_all(&cache).unwrap();
    let entry = cache.join(&artifact.sha256);
    std::os::unix::fs::symlink("/usr/bin/site-tool", &entry).unwrap();

    let err = fetch(&host, &artifact, Duration::from_secs(10), true).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!("/var/cache/gpuprov/{}", artifact.sha256))
            && message.contains("gpuprov follows no link there"),
        "{message}"
    );
    assert_eq!(server.hits("/driver.run"), 0, "nothing fetched into it");
    assert_eq!(
        std::fs::read_link(&entry).unwrap(),
        std::path::Path::new("/usr/bin/site-tool")
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o600,
        "the link's target keeps its mode"
    );
    assert_eq!(std::fs::read(&target).unwrap(), body);
}

#[test]
fn a_body_past_the_cap_is_refused_before_it_is_written() {
    // The server says its body is 4 GiB: not one byte of it is kept, and
    // the refusal is not retried.
    let server = ArtifactServer::start();
    server.route("/huge.run", Route::Claims(4 << 30));
    let (dir, host) = host();
    let err = fetch(
        &host,
        &artifact(server.url("/huge.run"), b"x"),
        Duration::from_secs(10),
        true,
    )
    .unwrap_err();
    assert!(matches!(err, DownloadError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("more than 1024 MiB"), "{err}");
    assert_eq!(server.hits("/huge.run"), 1);
    assert!(cache_entries(&dir).is_empty());
}

#[test]
fn redirects_are_followed_only_where_the_url_could_go() {
    let server = ArtifactServer::start();
    let body = b"the installer".to_vec();
    server.route("/real.run", Route::Body(body.clone()));
    server.route("/moved.run", Route::Redirect(server.url("/real.run")));
    server.route("/to-file.run", Route::Redirect("file:///etc/shadow".into()));
    let (dir, host) = host();
    // Plain http allowed: a redirect to http is followed.
    let path = fetch(
        &host,
        &artifact(server.url("/moved.run"), &body),
        Duration::from_secs(10),
        true,
    )
    .unwrap();
    assert!(path.ends_with(&sha(&body)));
    // Never to another scheme, whatever is allowed; not retried.
    let err = fetch(
        &host,
        &artifact(server.url("/to-file.run"), b"x"),
        Duration::from_secs(10),
        true,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("file:// URL, which is never followed"),
        "{err}"
    );
    assert_eq!(server.hits("/to-file.run"), 1);
    assert_eq!(cache_entries(&dir), vec![sha(&body)]);
}
