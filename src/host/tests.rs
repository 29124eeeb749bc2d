use super::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

fn host(dir: &Path) -> Host {
    Host::new(dir, CommandMode::Prefix, Duration::from_secs(5)).unwrap()
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
fn dotdot_in_a_link_stops_at_the_root() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    fs::write(dir.path().join("etc/passwd"), "the root's own").unwrap();
    symlink("../../../../etc/passwd", dir.path().join("etc/evil")).unwrap();
    assert_eq!(
        host(dir.path()).read("/etc/evil").unwrap().as_deref(),
        Some("the root's own")
    );
    assert_eq!(
        host(dir.path())
            .read("../../etc/passwd")
            .unwrap()
            .as_deref(),
        Some("the root's own")
    );
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
    let h = Host::new(dir.path(), CommandMode::Prefix, Duration::from_millis(200)).unwrap();
    let record = h.run_shell("sleep 30").unwrap();
    assert!(record.timed_out);
    assert!(!record.success());
}

#[test]
fn a_symlink_at_a_written_path_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    fs::write(dir.path().join("etc/os-release"), "ID=debian\n").unwrap();
    symlink("/etc/os-release", dir.path().join("etc/labels")).unwrap();
    let h = host(dir.path());
    let err = h.write_atomic("/etc/labels", b"x=y\n", 0o644).unwrap_err();
    assert!(matches!(err, HostError::Symlink { .. }), "{err}");
    assert!(err.to_string().contains("/etc/os-release"), "{err}");
    let err = h.remove("/etc/labels").unwrap_err();
    assert!(matches!(err, HostError::Symlink { .. }), "{err}");
    assert_eq!(
        fs::read_to_string(dir.path().join("etc/os-release")).unwrap(),
        "ID=debian\n"
    );
    assert!(dir.path().join("etc/labels").is_symlink());
}

#[test]
fn a_link_inside_gpuprovs_own_directory_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("var/lib")).unwrap();
    fs::create_dir_all(dir.path().join("etc/containerd")).unwrap();
    symlink("/etc/containerd", dir.path().join("var/lib/gpuprov")).unwrap();
    let h = host(dir.path());
    let err = h
        .write_atomic("/var/lib/gpuprov/config.toml", b"x", 0o644)
        .unwrap_err();
    assert!(matches!(err, HostError::LinkInOwnDir { .. }), "{err}");
    assert!(h.read("/var/lib/gpuprov/config.toml").is_err());
    assert!(!dir.path().join("etc/containerd/config.toml").exists());
}

#[test]
fn special_files_are_refused_before_they_are_opened() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    nix::unistd::mkfifo(
        &dir.path().join("etc/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let h = host(dir.path());
    // A FIFO with no writer would block an open for reading forever.
    let err = h.read("/etc/fifo").unwrap_err();
    assert!(
        err.to_string()
            .contains("a FIFO (named pipe), not a regular file"),
        "{err}"
    );
    let err = h.read("/etc").unwrap_err();
    assert!(
        err.to_string().contains("a directory, not a regular file"),
        "{err}"
    );
}

#[test]
fn oversize_files_are_refused_with_size_and_cap() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    let big = fs::File::create(dir.path().join("etc/big.toml")).unwrap();
    big.set_len(HOST_FILE_CAP + 1).unwrap();
    let err = host(dir.path()).read("/etc/big.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}/etc/big.toml is {} bytes, more than the {HOST_FILE_CAP} bytes gpuprov reads from such a file",
            dir.path().display(),
            HOST_FILE_CAP + 1
        )
    );
}

#[test]
fn a_flooding_command_keeps_only_a_bounded_tail() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::new(dir.path(), CommandMode::Prefix, Duration::from_secs(2)).unwrap();
    let record = h
        .run_shell("head -c 50000000 /dev/zero | tr '\\0' y; echo end")
        .unwrap();
    assert!(record.success(), "{record:?}");
    assert_eq!(record.stdout.len(), 4096);
    assert!(record.stdout.ends_with("yyyend\n"));
}

#[test]
fn a_daemonized_grandchild_holding_stdout_does_not_hold_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::new(dir.path(), CommandMode::Prefix, Duration::from_secs(60)).unwrap();
    // The grandchild leaves the process group and keeps stdout open for
    // a minute; the command itself exits at once.
    let record = h.run_shell("setsid sleep 60 & echo started").unwrap();
    assert!(record.success(), "{record:?}");
    assert_eq!(record.stdout, "started\n");
    assert!(!record.timed_out);
}

#[test]
fn the_timeout_holds_against_a_command_that_never_exits_nor_closes_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::new(dir.path(), CommandMode::Prefix, Duration::from_millis(300)).unwrap();
    let record = h.run_shell("setsid sleep 60 & exec sleep 60").unwrap();
    assert!(record.timed_out);
    assert_eq!(record.exit_code, None);
}

#[test]
fn containerds_config_link_is_followed_to_its_target_inside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("etc/containerd")).unwrap();
    fs::create_dir_all(dir.path().join("etc/k3s")).unwrap();
    symlink(
        "../k3s/config.toml",
        dir.path().join("etc/containerd/config.toml"),
    )
    .unwrap();
    symlink("/etc/k3s/real.toml", dir.path().join("etc/k3s/config.toml")).unwrap();
    let h = host(dir.path());
    assert_eq!(
        h.follow_links("/etc/containerd/config.toml").unwrap(),
        "/etc/k3s/real.toml"
    );
    assert_eq!(
        h.follow_links("/etc/k3s/real.toml").unwrap(),
        "/etc/k3s/real.toml"
    );
    symlink("/etc/loop", dir.path().join("etc/loop")).unwrap();
    assert!(matches!(
        h.follow_links("/etc/loop"),
        Err(HostError::SymlinkLoop { .. })
    ));
}

#[test]
fn a_batch_writes_in_order_and_a_refused_target_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let h = host(dir.path());
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    fs::write(dir.path().join("etc/same"), "same").unwrap();
    let write = |path, content: &'static [u8]| FileWrite {
        path,
        content,
        mode: 0o644,
    };
    let written = h
        .write_files(&[
            write("/var/lib/gpuprov/backup/etc/config", b"original"),
            write("/etc/same", b"same"),
            write("/etc/config", b"edited"),
        ])
        .unwrap();
    assert_eq!(
        written,
        [true, false, true],
        "identical content is not rewritten"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("var/lib/gpuprov/backup/etc/config")).unwrap(),
        "original"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("etc/config")).unwrap(),
        "edited"
    );
    h.make_durable().unwrap();

    // A link planted at the last target: the batch is refused before any
    // of it lands, and no temporary is left anywhere.
    symlink("/etc/shadow", dir.path().join("etc/link")).unwrap();
    let err = h
        .write_files(&[write("/etc/first", b"1"), write("/etc/link", b"2")])
        .unwrap_err();
    assert!(err.to_string().contains("etc/link"), "{err}");
    assert!(
        !dir.path().join("etc/first").exists(),
        "nothing of a refused batch lands"
    );
    let names: Vec<String> = fs::read_dir(dir.path().join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains(".gpuprov-")),
        "no temporary left: {names:?}"
    );
    assert!(
        fs::symlink_metadata(dir.path().join("etc/link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    h.make_durable().unwrap();
}

#[test]
fn concurrent_syncs_run_every_item_and_report_the_first_failure_in_order() {
    let attempted = std::sync::Mutex::new(Vec::new());
    let items = [0, 1, 2, 3, 4];
    let outcome = files::concurrently(&items, |item| {
        attempted.lock().unwrap().push(*item);
        if *item >= 2 {
            Err(format!("item {item} failed"))
        } else {
            Ok(())
        }
    });
    assert_eq!(outcome, Err("item 2 failed".to_string()));
    let mut attempted = attempted.into_inner().unwrap();
    attempted.sort();
    assert_eq!(attempted, items, "a failure stops no other sync");
    assert_eq!(files::concurrently(&[] as &[u8], |_| Err(())), Ok(()));
}

/// Entries read beside a directory's listing are read as `read` reads
/// their paths: links followed inside the root only, special files
/// refused without being opened for reading, sysfs's cap kept.
#[test]
fn entries_read_beside_a_listing_keep_the_rules_of_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("sys/devices/pci0000:00/0000:00:05.0");
    fs::create_dir_all(&device).unwrap();
    fs::write(device.join("vendor"), "0x10de\n").unwrap();
    fs::write(dir.path().join("sys/devices/class-elsewhere"), "0x030200\n").unwrap();
    symlink("../../class-elsewhere", device.join("class")).unwrap();
    symlink("/etc/outside", device.join("device")).unwrap();
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    fs::write(dir.path().join("etc/outside"), "0x2330\n").unwrap();
    nix::unistd::mkfifo(
        &device.join("config"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).unwrap();
    symlink(
        "../../../devices/pci0000:00/0000:00:05.0",
        dir.path().join("sys/bus/pci/devices/0000:00:05.0"),
    )
    .unwrap();
    let host = host(dir.path());
    let listing = host
        .read_dir("/sys/bus/pci/devices/0000:00:05.0")
        .unwrap()
        .unwrap();
    assert_eq!(listing.kind("class"), Some(FileType::Symlink));
    let read = |name| host.read_entry(&listing, name);
    assert_eq!(read("vendor").unwrap().as_deref(), Some("0x10de\n"));
    // A link is followed as `read` follows it: an absolute one stays in
    // the root (`/etc/outside` is the root's, not this machine's).
    assert_eq!(read("class").unwrap().as_deref(), Some("0x030200\n"));
    assert_eq!(read("device").unwrap().as_deref(), Some("0x2330\n"));
    assert_eq!(read("absent").unwrap(), None);
    let fifo = read("config").unwrap_err().to_string();
    assert!(fifo.contains("config is a FIFO (named pipe)"), "{fifo}");
    // Over the cap for files under /sys: refused, named.
    fs::write(device.join("vendor"), vec![b'0'; 2 * 1024 * 1024]).unwrap();
    let listing = host
        .read_dir("/sys/bus/pci/devices/0000:00:05.0")
        .unwrap()
        .unwrap();
    let big = host.read_entry(&listing, "vendor").unwrap_err().to_string();
    assert!(big.contains("more than the"), "{big}");
}
