//! The bad-input corpus, `fixtures/bad/<kind>/`: each case is a file and
//! `<case>.expected`, what gpuprov must answer. For every case the error
//! names the input and the place, the exit code is the documented one, and
//! the host keeps what it had:
//!
//! * exit 1 (bad input, refused before anything is done): not one file on
//!   the host changes, and the node's labels stay;
//! * exit 3 (a bad file on the node fails its step): the bad file is left
//!   byte for byte, and nothing changes but gpuprov's own records and its
//!   outcome labels.
//!
//! Kinds: `spec` (a `--config`), `catalogue` (a `--states-dir` file),
//! `containerd` (the node's config.toml), `sysfs` and `procfs` (a file on
//! the node, at `path`), `http` (a driver download's answer), `api` (the
//! API server's answer to `method` on `route`).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use support::artifact_server::{ArtifactServer, Route};
use support::fake_api::{FakeApi, Fault};
use support::{FileState, copy_host, gpuprov, repo, tree};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    exit: i32,
    /// `line:col`: the error has a line `<input>:<line>:<col>: <says[0]>`.
    at: Option<String>,
    /// What the output says, every one of these.
    says: Vec<String>,
    /// sysfs, procfs: where on the node the case's bytes go.
    path: Option<String>,
    /// sysfs, procfs: the file cannot be read at all (a directory stands
    /// where it should be), whatever the case's bytes.
    #[serde(default)]
    unreadable: bool,
    /// http: `body` (200 with the case's bytes), `truncated`, or `status`.
    answer: Option<String>,
    status: Option<u16>,
    /// api: the request that gets the case's bytes as its answer.
    method: Option<String>,
    route: Option<String>,
    /// api: a label someone removed from the node before the run, so that
    /// gpuprov has a label to apply.
    unlabel: Option<String>,
}

struct Case {
    kind: String,
    input: PathBuf,
    expected: Expected,
}

fn cases() -> Vec<Case> {
    let root = repo().join("fixtures/bad");
    let mut cases = Vec::new();
    let mut kinds: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    kinds.sort();
    for dir in kinds {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e != "expected"))
            .collect();
        files.sort();
        for input in files {
            let expected_path = input.with_extension("expected");
            let text = std::fs::read_to_string(&expected_path)
                .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
            let expected = serde_saphyr::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
            cases.push(Case {
                kind: dir.file_name().unwrap().to_string_lossy().into_owned(),
                input,
                expected,
            });
        }
    }
    cases
}

/// The case's input as the error should name it: the repository-relative
/// path the command was given.
fn relative(path: &Path) -> String {
    path.strip_prefix(repo()).unwrap().display().to_string()
}

const NODE: &str = "gpu-node-1";

/// What one case's run printed and did.
struct Outcome {
    code: i32,
    output: String,
    /// The host before and after.
    before: BTreeMap<PathBuf, FileState>,
    after: BTreeMap<PathBuf, FileState>,
    /// The node's labels before and after (api cases).
    labels: Option<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    /// The host file that held the bad input, if any.
    bad_file: Option<PathBuf>,
    /// What the place in the error is relative to.
    shown_as: String,
}

fn run(cmd: &mut assert_cmd::Command) -> (i32, String) {
    let output = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap(), text)
}

fn apply_on(host: &Path) -> assert_cmd::Command {
    let mut cmd = gpuprov();
    cmd.args(["apply", "--host-exec", "prefix", "--host-root"])
        .arg(host);
    cmd
}

fn node_prep_only() -> PathBuf {
    repo().join("fixtures/specs/node-prep-only.yaml")
}

/// Runs `cmd` on `host` and records what it printed and changed.
fn observe(host: &Path, cmd: &mut assert_cmd::Command) -> Outcome {
    let before = tree(host);
    let (code, output) = run(cmd);
    Outcome {
        code,
        output,
        before,
        after: tree(host),
        labels: None,
        bad_file: None,
        shown_as: String::new(),
    }
}

fn try_case(case: &Case) -> Outcome {
    let expected = &case.expected;
    let bytes = std::fs::read(&case.input).unwrap();
    match case.kind.as_str() {
        "spec" => {
            let host = copy_host("h100x8-nvswitch-preinstalled");
            let input = relative(&case.input);
            Outcome {
                shown_as: input.clone(),
                ..observe(
                    host.path(),
                    apply_on(host.path()).arg("--config").arg(&input),
                )
            }
        }
        "catalogue" => {
            let host = copy_host("h100x8-nvswitch-preinstalled");
            let states = tempfile::tempdir().unwrap();
            let file = states.path().join(case.input.file_name().unwrap());
            std::fs::write(&file, &bytes).unwrap();
            Outcome {
                shown_as: file.display().to_string(),
                ..observe(
                    host.path(),
                    apply_on(host.path()).arg("--states-dir").arg(states.path()),
                )
            }
        }
        "containerd" | "sysfs" | "procfs" => {
            let host = copy_host("a100-preinstalled");
            let path = expected
                .path
                .clone()
                .unwrap_or_else(|| "etc/containerd/config.toml".to_string());
            let target = host.path().join(&path);
            if expected.unreadable {
                std::fs::remove_file(&target).unwrap();
                std::fs::create_dir(&target).unwrap();
            } else {
                std::fs::write(&target, &bytes).unwrap();
            }
            Outcome {
                bad_file: Some(PathBuf::from(path)),
                ..observe(
                    host.path(),
                    apply_on(host.path()).arg("--config").arg(node_prep_only()),
                )
            }
        }
        "http" => {
            let host = copy_host("t4-no-driver");
            let server = ArtifactServer::start();
            let route = match (expected.answer.as_deref(), expected.status) {
                (Some("body"), _) => Route::Body(bytes.clone()),
                (Some("truncated"), _) => Route::Truncated {
                    sent: bytes.len() / 2,
                    body: bytes.clone(),
                },
                (Some("status"), Some(status)) => Route::Status(status),
                other => panic!("{}: answer {other:?}", case.input.display()),
            };
            server.route("/NVIDIA-Linux-x86_64-550.54.15.run", route);
            // The installer the spec pins is not what the server sends.
            let spec = host.path().join("node.yaml");
            std::fs::write(
                &spec,
                format!(
                    "driver:\n  version: \"550.54.15\"\n  install:\n    method: runfile\n    url: {}\n    sha256: {}\n    allowInsecureHttp: true\n",
                    server.url("/NVIDIA-Linux-x86_64-550.54.15.run"),
                    "ab".repeat(32)
                ) + &std::fs::read_to_string(node_prep_only()).unwrap(),
            )
            .unwrap();
            observe(
                host.path(),
                apply_on(host.path()).arg("--config").arg(&spec),
            )
        }
        "api" => {
            // A node converged against a working cluster; then the server
            // answers one request badly.
            let host = copy_host("a100-preinstalled");
            let fake = FakeApi::with_node(NODE, &[]);
            fake.run_working_cluster(1, "NVIDIA-A100-SXM4-80GB");
            let against = |host: &Path| {
                let mut cmd = apply_on(host);
                cmd.args(["--node-name", NODE])
                    .arg("--kubeconfig")
                    .arg(fake.kubeconfig());
                cmd
            };
            for _ in 0..2 {
                run(&mut against(host.path()));
            }
            assert_eq!(
                run(&mut against(host.path())).0,
                0,
                "the node converges first"
            );
            if let Some(key) = &expected.unlabel {
                fake.remove_label(NODE, key);
            }
            let method: &'static str = Box::leak(expected.method.clone().unwrap().into_boxed_str());
            let route: &'static str = Box::leak(expected.route.clone().unwrap().into_boxed_str());
            fake.inject(Fault {
                method: Some(method),
                path_prefix: route,
                status: expected.status.unwrap(),
                retry_after: None,
                times: 100,
                delay_ms: 0,
                body: Some(String::from_utf8(bytes).unwrap()),
                ..Default::default()
            });
            let labels = fake.labels(NODE);
            let outcome = observe(host.path(), &mut against(host.path()));
            Outcome {
                labels: Some((labels, fake.labels(NODE))),
                ..outcome
            }
        }
        other => panic!("unknown kind of bad input `{other}`"),
    }
}

/// Files gpuprov keeps for itself: its records, its download cache and its
/// outcome labels.
fn gpuprovs_own(path: &Path) -> bool {
    [
        "var/lib/gpuprov",
        "var/cache/gpuprov",
        "etc/kubernetes/node-feature-discovery",
    ]
    .iter()
    .any(|own| path.starts_with(own))
}

/// The directories of a tree: the paths other paths are under.
fn directories(tree: &BTreeMap<PathBuf, FileState>) -> Vec<PathBuf> {
    tree.keys()
        .flat_map(|p| p.ancestors().skip(1).map(Path::to_path_buf))
        .collect()
}

fn check(case: &Case, outcome: &Outcome) -> Result<(), String> {
    let expected = &case.expected;
    let output = &outcome.output;
    if outcome.code != expected.exit {
        return Err(format!(
            "exit {} (expected {})",
            outcome.code, expected.exit
        ));
    }
    if let Some(at) = &expected.at {
        let located = format!("{}:{at}: ", outcome.shown_as);
        let line = output
            .lines()
            .find(|l| l.starts_with(&located))
            .ok_or_else(|| format!("no line starting {located:?}"))?;
        if !line.contains(&expected.says[0]) {
            return Err(format!("{line:?} does not say {:?}", expected.says[0]));
        }
    }
    for says in &expected.says {
        if !output.contains(says.as_str()) {
            return Err(format!("does not say {says:?}"));
        }
    }
    if output.contains("panicked") || output.contains("RUST_BACKTRACE") {
        return Err("panicked".to_string());
    }
    let changed = support::changed(&outcome.before, &outcome.after);
    // A directory changes when gpuprov's own files appear in it.
    let dirs: Vec<PathBuf> = directories(&outcome.before)
        .into_iter()
        .chain(directories(&outcome.after))
        .collect();
    let allowed: Vec<&PathBuf> = match expected.exit {
        1 => Vec::new(),
        _ => changed
            .iter()
            .filter(|p| gpuprovs_own(p) || dirs.contains(p))
            .collect(),
    };
    let unexpected: Vec<&PathBuf> = changed.iter().filter(|p| !allowed.contains(p)).collect();
    if !unexpected.is_empty() {
        return Err(format!("changed on the host: {unexpected:?}"));
    }
    if let Some(bad) = &outcome.bad_file
        && outcome.before.get(bad) != outcome.after.get(bad)
    {
        return Err(format!("the bad file {} changed", bad.display()));
    }
    if let Some((before, after)) = &outcome.labels
        && expected.exit == 1
        && before != after
    {
        return Err("the node's labels changed".to_string());
    }
    Ok(())
}

#[test]
fn every_bad_input_is_named_with_its_place_and_changes_nothing() {
    let cases = cases();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        *kinds.entry(case.kind.as_str()).or_default() += 1;
    }
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for kind in [
        "spec",
        "catalogue",
        "containerd",
        "sysfs",
        "procfs",
        "http",
        "api",
    ] {
        assert!(
            kinds.get(kind).is_some_and(|n| *n > 0),
            "no {kind} case: {kinds:?}"
        );
    }
    let mut failures = Vec::new();
    for case in &cases {
        let outcome = try_case(case);
        if let Err(why) = check(case, &outcome) {
            failures.push(format!(
                "{}: {why}\n--- output ---\n{}",
                relative(&case.input),
                outcome.output
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not handled as expected:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// Every input has its expectation, and every expectation its input.
#[test]
fn the_corpus_is_complete() {
    for entry in walk(&repo().join("fixtures/bad")) {
        let other = if entry.extension().is_some_and(|e| e == "expected") {
            std::fs::read_dir(entry.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().path())
                .any(|p| p != entry && p.with_extension("expected") == entry)
        } else {
            entry.with_extension("expected").exists()
        };
        assert!(other, "{} has no pair", entry.display());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
