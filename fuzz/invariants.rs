//! What every input must hold, whatever its bytes: shared by the fuzz
//! targets (`fuzz/fuzz_targets`) and the test that replays the inputs they
//! found (`tests/fuzz_regressions.rs`). A broken invariant is a panic.
#![allow(dead_code)]

use gpuprov::containerd::config::{self, DefaultRuntime, RuntimeWanted};
use gpuprov::diagnostic::Source;

fn source(text: &str) -> Source {
    Source {
        name: "fuzz.yaml".to_string(),
        text: text.to_string(),
    }
}

/// A spec is parsed, or refused with an error that names the file.
pub fn spec(text: &str) {
    if let Err(e) = gpuprov::spec::Spec::parse(&source(text)) {
        let message = e.to_string();
        assert!(
            message.contains("fuzz.yaml"),
            "an error that names no file: {message}"
        );
    }
}

/// A state file is parsed, or refused with an error that names the file.
pub fn state(text: &str) {
    let known = gpuprov::catalog::Catalog::builtin().capabilities();
    match gpuprov::catalog::parse_state(&source(text), Some(&known)) {
        Ok(state) => assert!(!state.name.is_empty()),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("fuzz.yaml"),
                "an error that names no file: {message}"
            );
        }
    }
}

/// Lines gpuprov may rewrite in place: the keys it owns.
fn owned_line(line: &str) -> bool {
    let t = line.trim_start();
    [
        "default_runtime_name",
        "runtime_type",
        "BinaryName",
        "Runtime ",
        "Runtime=",
    ]
    .iter()
    .any(|k| t.starts_with(k))
}

/// Every line of `original` that gpuprov does not own is in `edited`,
/// verbatim and in order.
pub fn untouched_lines_kept(original: &str, edited: &str) -> Result<(), String> {
    let mut result = edited.lines();
    for line in original.lines().filter(|l| !owned_line(l)) {
        if !result.any(|r| r == line) {
            return Err(format!(
                "the line {line:?} is missing or out of order in:\n{edited}"
            ));
        }
    }
    Ok(())
}

/// containerd's config, edited three ways (default set, cleared, kept):
/// the result parses, every line gpuprov does not own is kept verbatim and
/// in order, and a second edit changes nothing.
pub fn containerd(text: &str) {
    let cdi = [
        None,
        Some(config::CdiWanted {
            spec_dir: "/opt/cdi".to_string(),
            runtime: Some(config::CdiRuntime {
                class: "nvidia-cdi".to_string(),
                binary: "/usr/bin/nvidia-container-runtime.cdi".to_string(),
            }),
        }),
    ];
    for (default, cdi) in [
        DefaultRuntime::Set,
        DefaultRuntime::Clear,
        DefaultRuntime::Keep,
    ]
    .into_iter()
    .flat_map(|d| cdi.clone().map(|c| (d, c)))
    {
        let wanted = RuntimeWanted {
            class: "nvidia".to_string(),
            binary: "/usr/bin/nvidia-container-runtime".to_string(),
            default,
            cdi,
        };
        let Ok(edited) = config::configure(text, &wanted, 2) else {
            continue;
        };
        if let Err(e) = config::parse(&edited.text) {
            panic!("the edit does not parse ({e}):\n{}", edited.text);
        }
        // With CDI on, its two keys are gpuprov's to change too.
        let owned = |text: &str| -> String {
            text.split_inclusive('\n')
                .filter(|l| {
                    wanted.cdi.is_none()
                        || !(l.contains("enable_cdi") || l.contains("cdi_spec_dirs"))
                })
                .collect()
        };
        if let Err(e) = untouched_lines_kept(&owned(text), &owned(&edited.text)) {
            panic!("{e}");
        }
        let again = config::configure(&edited.text, &wanted, 2)
            .unwrap_or_else(|e| panic!("a second edit fails ({e}):\n{}", edited.text));
        assert_eq!(again.text, edited.text, "a second edit changes the file");
    }
}
