//! The source layout's two rules (README "Layout"): no import circle among
//! `src/` files (a file may use its own submodules), and no capability
//! imports the executor or the converge pipeline. A new capability that
//! reaches up into either fails here, naming the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

mod support;

/// Module path (`["containerd", "effective"]`) → the file's text, tests
/// and comments left out.
fn modules() -> BTreeMap<Vec<String>, String> {
    let src = support::repo().join("src");
    let mut out = BTreeMap::new();
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            out.insert(parts, code_of(&path));
        }
    }
    out
}

/// A file's code: no line comments, no `#[cfg(test)] mod tests` (always
/// last in this crate).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a file names from the crate root: `crate::a::b`,
/// `crate::{a, b::c}`, `super::x`.
fn named_paths(module: &[String], code: &str) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut paths = Vec::new();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        // `super` of `a/b.rs` and of `a/b/mod.rs` alike is `a`.
        ("super::", module[..module.len() - 1].to_vec()),
    ] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(ident) {
                continue;
            }
            let mut path = base.clone();
            let mut tail = rest;
            loop {
                let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
                if end == 0 {
                    break;
                }
                path.push(tail[..end].to_string());
                tail = &tail[end..];
                match tail.strip_prefix("::") {
                    Some(next) => tail = next,
                    None => break,
                }
            }
            if let Some(group) = tail.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let mut full = path.clone();
                    full.extend(
                        item.trim()
                            .split("::")
                            .take_while(|p| !p.is_empty() && p.chars().all(ident))
                            .map(str::to_string),
                    );
                    paths.push(full);
                }
            } else {
                paths.push(path);
            }
        }
    }
    paths
}

/// file → the files it uses (its own submodules left out).
fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let modules = modules();
    let resolve = |path: &[String]| {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|prefix| modules.contains_key(prefix))
    };
    modules
        .iter()
        .map(|(module, code)| {
            let uses = named_paths(module, code)
                .iter()
                .filter_map(|path| resolve(path))
                .filter(|used| !used.starts_with(module))
                .collect();
            (module.clone(), uses)
        })
        .collect()
}

fn name(module: &[String]) -> String {
    format!("src/{}", module.join("/"))
}

#[test]
fn no_source_file_is_in_an_import_circle() {
    let graph = graph();
    assert!(graph.len() > 30, "the crate's files were found");
    // A file is in a circle when it can reach itself.
    let mut circles = Vec::new();
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut pending: Vec<(&Vec<String>, Vec<String>)> = graph[start]
            .iter()
            .map(|next| (next, vec![name(start), name(next)]))
            .collect();
        while let Some((at, route)) = pending.pop() {
            if at == start {
                circles.push(route.join(" → "));
                break;
            }
            if seen.insert(at.clone()) {
                for next in &graph[at] {
                    let mut longer = route.clone();
                    longer.push(name(next));
                    pending.push((next, longer));
                }
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn no_capability_imports_the_executor_or_the_pipeline() {
    // Above the capabilities: the executor, the pipeline, and the
    // subcommands and the daemon that drive them.
    let above = ["executor", "converge", "cmd", "daemon"];
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        if above.contains(&module[0].as_str()) {
            continue;
        }
        for used in uses {
            if ["executor", "converge"].contains(&used[0].as_str()) {
                wrong.push(format!("{} uses {}", name(module), name(used)));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every top-level module that is not a capability: the layers below the
/// capabilities (the state contract, the host, the API client, the spec)
/// and above them (the registry, the executor, the pipeline, the CLI and
/// the daemon). Any other top-level module is a capability.
const HOUSE: &[&str] = &[
    "background",
    "catalog",
    "cli",
    "cmd",
    "converge",
    "cri",
    "daemon",
    "diagnostic",
    "digest",
    "download",
    "error_chain",
    "executor",
    "facts",
    "host",
    "interrupt",
    "kube",
    "label_syntax",
    "labels",
    "make",
    "plan",
    "printable",
    "readiness",
    "registry",
    "report",
    "runtime",
    "slots",
    "spec",
    "state",
];

/// What `modules` names, among `graph`'s files, that are capabilities.
fn capabilities_used_by(modules: &[&str]) -> Vec<String> {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        if !modules.contains(&module[0].as_str()) {
            continue;
        }
        for used in uses {
            if !HOUSE.contains(&used[0].as_str()) {
                wrong.push(format!("{} names capability {}", name(module), name(used)));
            }
        }
    }
    wrong
}

#[test]
fn every_top_level_module_is_the_house_or_a_capability_the_registry_names() {
    let graph = graph();
    let registry = &graph[&vec!["registry".to_string()]];
    let tops: BTreeSet<&str> = graph.keys().map(|m| m[0].as_str()).collect();
    for house in HOUSE {
        assert!(tops.contains(house), "src/{house} is listed but gone");
    }
    // A capability the registry does not reach is dead code or a module
    // that belongs to the house.
    // Walked file by file: a capability reached first through one of its
    // submodules is still followed through its other files.
    let reached: BTreeSet<String> = {
        let mut files = BTreeSet::new();
        let mut pending: Vec<&Vec<String>> = registry.iter().collect();
        while let Some(at) = pending.pop() {
            if files.insert(at) {
                pending.extend(graph[at].iter());
            }
        }
        files.into_iter().map(|file| file[0].clone()).collect()
    };
    let stray: Vec<&&str> = tops
        .iter()
        .filter(|top| !HOUSE.contains(top) && !reached.contains(**top))
        .collect();
    assert!(
        stray.is_empty(),
        "neither house nor reached from the registry: {stray:?}"
    );
}

#[test]
fn the_state_contract_names_no_capability() {
    let wrong = capabilities_used_by(&["state"]);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_executor_names_no_capability() {
    let wrong = capabilities_used_by(&["executor", "make"]);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn neither_the_pipeline_nor_the_daemon_imports_the_cli() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        if !["converge", "daemon"].contains(&module[0].as_str()) {
            continue;
        }
        for used in uses {
            if ["cli", "cmd"].contains(&used[0].as_str()) {
                wrong.push(format!("{} uses {}", name(module), name(used)));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
