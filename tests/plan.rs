//! `gpuprov plan` on every fixture host, through the CLI: text and JSON
//! snapshots, the DAG as dot, the detailed exit code, and no writes.

mod support;

use support::{changed, copy_host, fixture_hosts, gpuprov, repo, tree};

/// stdout, then stderr and the exit code when they say something.
fn run(args: &[&str]) -> String {
    run_command(gpuprov(), args)
}

fn run_command(mut command: assert_cmd::Command, args: &[&str]) -> String {
    let output = command.args(args).output().unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.is_empty() {
        text.push_str(&format!("--- stderr ---\n{stderr}"));
    }
    text.push_str(&format!("--- exit {} ---\n", output.status.code().unwrap()));
    text
}

#[test]
fn plan_text_and_json_for_every_fixture_host() {
    let hosts = fixture_hosts();
    assert!(hosts.len() >= 14, "fixture hosts went missing: {hosts:?}");
    for host in hosts {
        let root = format!("fixtures/hosts/{host}");
        // Hosts with the driver's files hold a stand-in libnvidia-ml: NVML
        // is read through the fake library, answering for their GPUs.
        let nvml = match host.as_str() {
            "h100x8-cdi" => Some("h100x8.yaml"),
            // The runtime layouts share the L4 machine and its libraries.
            h if h.starts_with("l4x4-") => Some("l4x4-570.yaml"),
            _ => None,
        };
        let library = support::fake_nvml_library().display().to_string();
        let run = |args: &[&str]| match nvml {
            Some(fixture) => {
                let mut args = args.to_vec();
                args.extend(["--nvml-lib", library.as_str()]);
                run_command(support::gpuprov_with_fake_nvml(fixture), &args)
            }
            None => run(args),
        };
        insta::assert_snapshot!(
            format!("{host}.text"),
            run(&["plan", "--host-exec", "prefix", "--host-root", &root])
        );
        insta::assert_snapshot!(
            format!("{host}.json"),
            run(&[
                "plan",
                "--host-exec",
                "prefix",
                "--host-root",
                &root,
                "--output",
                "json"
            ])
        );
    }
}

#[test]
fn plan_of_site_states_shows_each_command_it_would_run() {
    insta::assert_snapshot!(run(&[
        "plan",
        "--config",
        "fixtures/specs/site-states.yaml",
        "--host-root",
        "fixtures/hosts/h100x8-nvswitch-preinstalled",
        "--host-exec",
        "prefix",
    ]));
}

#[test]
fn plan_renders_the_dag_as_graphviz() {
    let out = run(&[
        "plan",
        "--config",
        "fixtures/specs/site-states.yaml",
        "--host-root",
        "fixtures/hosts/h100x8-nvswitch-preinstalled",
        "--host-exec",
        "prefix",
        "--output",
        "dot",
    ]);
    assert!(out.contains("\"driver\" -> \"persistence-mode\";"), "{out}");
    assert!(
        out.contains("\"persistence-mode\" -> \"gpu-clocks-report\";"),
        "{out}"
    );
    insta::assert_snapshot!(out);
}

#[test]
fn plan_writes_nothing_even_when_changes_are_pending() {
    let host = copy_host("h100x8-nvswitch-preinstalled");
    let before = tree(host.path());
    gpuprov()
        .args([
            "plan",
            "--config",
            "fixtures/specs/site-states.yaml",
            "--host-exec",
            "prefix",
            "--host-root",
        ])
        .arg(host.path())
        .assert()
        .success();
    assert_eq!(
        changed(&before, &tree(host.path())),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn detailed_exitcode_says_whether_apply_would_change_anything() {
    let host = copy_host("a100-preinstalled");
    let plan = |host: &std::path::Path| {
        gpuprov()
            .args([
                "plan",
                "--detailed-exitcode",
                "--host-exec",
                "prefix",
                "--host-root",
            ])
            .arg(host)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(
        plan(host.path()),
        Some(2),
        "a fresh node needs its labels written"
    );
    gpuprov()
        .args(["apply", "--host-exec", "prefix", "--host-root"])
        .arg(host.path())
        .assert()
        .code(0);
    assert_eq!(
        plan(host.path()),
        Some(0),
        "a converged node has nothing to do"
    );
    let bad = gpuprov()
        .args([
            "plan",
            "--detailed-exitcode",
            "--config",
            "fixtures/bad/spec/01-unknown-top-key.yaml",
            "--host-root",
        ])
        .arg(host.path())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn states_lists_the_catalogue_in_order() {
    insta::assert_snapshot!(run(&[
        "states",
        "--config",
        "fixtures/specs/site-states.yaml"
    ]));
}

#[test]
fn embedded_default_spec_is_the_shipped_default_yaml() {
    let embedded = run(&[
        "plan",
        "--host-root",
        "fixtures/hosts/a100-preinstalled",
        "--output",
        "json",
    ]);
    let explicit = run(&[
        "plan",
        "--config",
        "fixtures/specs/default.yaml",
        "--host-root",
        "fixtures/hosts/a100-preinstalled",
        "--output",
        "json",
    ]);
    assert_eq!(
        embedded.replace("<embedded default spec>", "fixtures/specs/default.yaml"),
        explicit
    );
}

/// The README's first command plans the fixture with every step converged
/// or to change, none failed or blocked.
#[test]
fn the_readmes_first_command_plans_cleanly() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run --locked -- plan"))
        .expect("the README starts with a plan command");
    let args: Vec<&str> = line
        .strip_prefix("cargo run --locked -- ")
        .unwrap()
        .split_whitespace()
        .collect();
    let output = gpuprov().args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("0 blocked, 0 failed"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("~ validator") && l.contains("ready")),
        "{text}"
    );
}
