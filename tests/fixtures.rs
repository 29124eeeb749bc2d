//! The committed fixture hosts are exactly what their generator makes, so
//! a hand edit cannot drift from the documented machine models.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{repo, tree};

#[test]
fn fixture_hosts_match_their_generator() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(repo().join("fixtures/hosts/generate.py"))
        .arg(out.path())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("python3 runs (scripts/test installs it)");
    assert!(status.success());
    let view = |root: &Path| -> BTreeMap<PathBuf, (Vec<u8>, Option<PathBuf>, u32)> {
        tree(root)
            .into_iter()
            .filter(|(path, _)| path != Path::new("generate.py"))
            .map(|(path, s)| (path, (s.bytes, s.link, s.mode & 0o111)))
            .collect()
    };
    let (generated, committed) = (view(out.path()), view(&repo().join("fixtures/hosts")));
    let differing: Vec<&PathBuf> = generated
        .keys()
        .chain(committed.keys())
        .filter(|p| generated.get(*p) != committed.get(*p))
        .collect();
    assert!(
        differing.is_empty(),
        "run fixtures/hosts/generate.py and commit: {differing:?}"
    );
}
