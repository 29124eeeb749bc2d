//! The manual (`docs/`, an mdBook) and the README: every internal link
//! lands on a page and a heading that exist, every page is in the book's
//! summary, the documents speak of the project alone, and the reference
//! tables match the code (spec keys, exit codes, metrics, labels, files),
//! so that none of them can drift.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

mod support;

use support::repo;

fn docs() -> PathBuf {
    repo().join("docs/src")
}

/// Every file under `dir`, its subdirectories' included, in name order.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every Markdown page of the book, and the README and BENCHMARKS.md.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md"), repo().join("BENCHMARKS.md")];
    pages.extend(
        files_under(&docs())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    pages
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A page's text outside fenced code blocks, where links are links.
fn prose(text: &str) -> String {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The targets of a page's inline links, `[text](target)`.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut out = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_string());
        }
    }
    out
}

/// The anchors mdBook gives a page's headings: lower case, spaces as `-`,
/// only letters, digits, `-` and `_` kept.
fn anchors(text: &str) -> BTreeSet<String> {
    prose(text)
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .chars()
                .filter_map(|c| match c {
                    c if c.is_whitespace() => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => {
                        Some(c.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_internal_link_lands_on_a_page_and_heading_that_exist() {
    let mut broken = Vec::new();
    let pages = pages();
    assert!(pages.len() > 20, "the book's pages were found");
    for page in &pages {
        let text = read(page);
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let landed = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !landed.exists() {
                broken.push(format!("{}: {target}: no such file", page.display()));
                continue;
            }
            if let Some(anchor) = anchor
                && !anchors(&read(&landed)).contains(anchor)
            {
                broken.push(format!("{}: {target}: no such heading", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn every_page_of_the_book_is_in_its_summary() {
    let summary = read(&docs().join("SUMMARY.md"));
    let listed: BTreeSet<PathBuf> = links(&summary).iter().map(|l| docs().join(l)).collect();
    let missing: Vec<String> = pages()
        .into_iter()
        .filter(|p| p.starts_with(docs()) && !p.ends_with("SUMMARY.md") && !listed.contains(p))
        .map(|p| p.display().to_string())
        .collect();
    assert!(missing.is_empty(), "not in SUMMARY.md: {missing:?}");
}

#[test]
fn the_documents_speak_of_the_project_alone() {
    let mut wrong = Vec::new();
    for page in pages() {
        for (n, line) in read(&page).lines().enumerate() {
            let lower = line.to_lowercase();
            let numbered_issue = lower.match_indices("issue ").any(|(at, _)| {
                lower[at + 6..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            });
            if numbered_issue || line.contains("../shared") {
                wrong.push(format!("{}:{}: {line}", page.display(), n + 1));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_readme_is_what_a_newcomer_reads_in_five_minutes() {
    let readme = read(&repo().join("README.md"));
    assert!(readme.lines().count() <= 300, "README.md is too long");
    // Exactly the two set-up commands at the top.
    let first_block: Vec<&str> = readme
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap()
        .lines()
        .collect();
    assert_eq!(first_block.len(), 2, "{first_block:?}");
    assert!(first_block[0].starts_with("cargo run --locked -- plan"));
    assert_eq!(first_block[1], "scripts/test");
}

/// The backticked names in the first cell of a Markdown table's rows.
fn first_cells(page: &str) -> Vec<Vec<String>> {
    prose(page)
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|row| {
            let cell = row[1..].split(" | ").next().unwrap();
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[test]
fn the_exit_code_table_is_gpuprovs() {
    use gpuprov::exit;
    let page = read(&docs().join("reference/exit-codes.md"));
    let documented: BTreeSet<i32> = prose(&page)
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    let code: BTreeSet<i32> = [
        exit::OK,
        exit::ERROR,
        exit::CHANGES_PENDING,
        exit::NOT_CONVERGED,
        exit::LOCKED,
        exit::INTERRUPTED,
    ]
    .into();
    assert_eq!(documented, code);
}

/// The spec's message on `yaml` (`None`: it is valid).
fn spec_error(dir: &Path, yaml: &str) -> Option<String> {
    let file = dir.join("spec.yaml");
    std::fs::write(&file, yaml).unwrap();
    gpuprov::spec::Spec::load(&file)
        .err()
        .map(|e| gpuprov::error_chain::error_chain(&e))
}

/// `path: inner`, nested as YAML flow mappings.
fn nested(path: &[String], inner: &str) -> String {
    path.iter()
        .rev()
        .fold(inner.to_string(), |yaml, key| format!("{key}: {{{yaml}}}"))
}

/// The keys the spec parser accepts at `path`, as it names them when it
/// refuses an unknown one; `None` where `path` holds no mapping of keys.
fn keys_at(dir: &Path, path: &[String]) -> Option<Vec<String>> {
    let error = spec_error(dir, &nested(path, "bogusKey: 1"))?;
    if !error.contains("unknown key `bogusKey`") {
        return None;
    }
    let valid = error.split("valid keys here: ").nth(1)?;
    let valid = valid.lines().next()?;
    Some(valid.split(", ").map(|k| k.trim().to_string()).collect())
}

/// Whether the spec refuses `key` whatever its value: a key of a section
/// that another section's shares (`gfd.sampleIntervalSeconds`).
fn not_a_setting(dir: &Path, key: &[String]) -> bool {
    let (last, parents) = key.split_last().unwrap();
    ["x", "1", "true", "[]", "{}"].iter().any(|value| {
        let error = spec_error(dir, &nested(parents, &format!("{last}: {value}")));
        error.is_some_and(|error| {
            (1..=key.len())
                .any(|n| error.contains(&format!("{} is not a setting", key[..n].join("."))))
        })
    })
}

/// Every key of the spec, dotted, as the parser accepts them.
fn spec_keys() -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = BTreeSet::new();
    let mut pending: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = pending.pop() {
        let Some(children) = keys_at(dir.path(), &path) else {
            if !not_a_setting(dir.path(), &path) {
                keys.insert(path.join("."));
            }
            continue;
        };
        for child in children {
            let mut deeper = path.clone();
            deeper.push(child);
            pending.push(deeper);
        }
    }
    keys
}

/// The keys the spec reference documents: a row names a dotted key, then
/// its siblings by their last part (`devicePlugin.repository`, `image`);
/// an upper-case name is the key's `toolkit.env` twin.
fn documented_spec_keys() -> BTreeSet<String> {
    let page = read(&docs().join("reference/spec.md"));
    let mut keys = BTreeSet::new();
    for names in first_cells(&page) {
        let mut parent = String::new();
        for name in names {
            if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                continue;
            }
            if name.contains('.') || parent.is_empty() {
                parent = name
                    .rsplit_once('.')
                    .map(|(p, _)| p.to_string())
                    .unwrap_or_default();
                keys.insert(name);
            } else {
                keys.insert(format!("{parent}.{name}"));
            }
        }
    }
    keys
}

#[test]
fn the_spec_reference_lists_every_key_the_parser_accepts() {
    let code = spec_keys();
    assert!(code.len() > 60, "the parser's keys were found: {code:?}");
    let documented = documented_spec_keys();
    let undocumented: Vec<&String> = code.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "keys the parser accepts that reference/spec.md lacks: {undocumented:?}\nkeys reference/spec.md lists that the parser refuses: {unknown:?}"
    );
}

/// The string literals of a source file, its unit tests left out.
fn literals(path: &str) -> Vec<String> {
    let text = read(&repo().join(path));
    let code = text.split("#[cfg(test)]").next().unwrap();
    code.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_metrics_reference_lists_every_metric_gpuprov_serves() {
    let page = read(&docs().join("reference/metrics.md"));
    let documented: BTreeSet<String> = first_cells(&page).into_iter().flatten().collect();
    // Registered names; prometheus-client adds `_total` to counters.
    let mut code: BTreeSet<String> = literals("src/daemon/server.rs")
        .into_iter()
        .filter(|l| {
            (l.starts_with("gpuprov_") || l.starts_with("gpu_operator_node_"))
                && l.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .collect();
    code.extend(
        gpuprov::telemetry::fields::FIELDS
            .iter()
            .map(|f| f.name.to_string()),
    );
    let missing: Vec<&String> = code
        .iter()
        .filter(|name| {
            !documented.contains(*name) && !documented.contains(&format!("{name}_total"))
        })
        .collect();
    assert!(missing.is_empty(), "undocumented metrics: {missing:?}");
    let stale: Vec<&String> = documented
        .iter()
        .filter(|name| {
            let registered = name.strip_suffix("_total").unwrap_or(name);
            !code.contains(*name) && !code.contains(registered)
        })
        .collect();
    assert!(
        stale.is_empty(),
        "documented metrics gpuprov does not serve: {stale:?}"
    );
}

/// Whether `key` matches a documented label: `<…>` stands for any part,
/// and `nvidia.com/cuda.driver.major`, `.minor` lists siblings.
fn documented_label(patterns: &[String], key: &str) -> bool {
    patterns.iter().any(|pattern| {
        let parts: Vec<&str> = pattern.split('<').collect();
        let mut rest = key;
        for (i, part) in parts.iter().enumerate() {
            let literal = if i == 0 {
                *part
            } else {
                part.split_once('>').map_or("", |(_, after)| after)
            };
            if i == 0 {
                match rest.strip_prefix(literal) {
                    Some(r) => rest = r,
                    None => return false,
                }
            } else if literal.is_empty() {
                rest = "";
            } else {
                match rest.rfind(literal) {
                    Some(at) if at > 0 => rest = &rest[at + literal.len()..],
                    _ => return false,
                }
            }
        }
        rest.is_empty()
    })
}

fn label_patterns() -> Vec<String> {
    let page = read(&docs().join("reference/labels.md"));
    let mut patterns = Vec::new();
    for names in first_cells(&page) {
        let mut base = String::new();
        for name in names {
            if let Some(sibling) = name.strip_prefix('.') {
                patterns.push(format!("{base}.{sibling}"));
            } else {
                base = name
                    .rsplit_once('.')
                    .map(|(b, _)| b.to_string())
                    .unwrap_or_default();
                patterns.push(name);
            }
        }
    }
    patterns
}

/// Every label key in the plan and label snapshots (what gpuprov
/// computed on the fixture hosts).
fn labels_in_snapshots() -> BTreeSet<String> {
    fn collect(value: &serde_json::Value, keys: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    if key == "labels"
                        && let Some(labels) = value.as_object()
                    {
                        keys.extend(labels.keys().cloned());
                    }
                    collect(value, keys);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, keys)),
            _ => {}
        }
    }
    let mut keys = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("tests/snapshots")).unwrap() {
        let text = read(&entry.unwrap().path());
        let Some(at) = text.find("\n{") else {
            continue;
        };
        let mut values = serde_json::Deserializer::from_str(&text[at + 1..]).into_iter();
        if let Some(Ok(value)) = values.next() {
            collect(&value, &mut keys);
        }
    }
    keys
}

#[test]
fn the_labels_reference_lists_every_label_a_fixture_host_gets() {
    let patterns = label_patterns();
    let keys = labels_in_snapshots();
    assert!(
        keys.len() > 30,
        "the snapshots' labels were found: {keys:?}"
    );
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !documented_label(&patterns, k))
        .collect();
    assert!(missing.is_empty(), "undocumented labels: {missing:?}");
}

#[test]
fn the_files_reference_lists_every_path_under_gpuprovs_own_directories() {
    let page = read(&docs().join("reference/files.md"));
    let documented: Vec<String> = first_cells(&page).into_iter().flatten().collect();
    let mut missing = BTreeSet::new();
    // Unit tests (`tests.rs`, `mod tests`) name made-up paths.
    for path in files_under(&repo().join("src")) {
        if path.ends_with("tests.rs") {
            continue;
        }
        let text = read(&path);
        let code = text.split("#[cfg(test)]").next().unwrap();
        for literal in code.split('"').skip(1).step_by(2) {
            let own = ["/var/lib/gpuprov/", "/run/gpuprov/", "/var/cache/gpuprov/"]
                .iter()
                .any(|dir| literal.starts_with(dir));
            // A documented path, or one below a documented directory
            // (`<sha256>` and the like stand for any name there).
            let documented = documented.iter().any(|d| {
                let d = d.split('<').next().unwrap();
                !d.is_empty()
                    && (literal == d.trim_end_matches('/')
                        || (d.ends_with('/') && literal.starts_with(d)))
            });
            if own && !documented {
                missing.insert(literal.to_string());
            }
        }
    }
    assert!(missing.is_empty(), "undocumented files: {missing:?}");
}

#[test]
fn the_conditions_reference_names_the_condition_and_reasons_gpuprov_writes() {
    let page = prose(&read(&docs().join("reference/conditions.md")));
    let documented: BTreeSet<String> = page
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    let mut code: Vec<String> = vec![gpuprov::kube::node_status::GPU_READY.to_string()];
    // The fixed reasons; the rest are `<State><Outcome>`, as documented.
    code.extend(literals("src/readiness/mod.rs").into_iter().filter(|l| {
        l.len() > 3
            && l.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && l.chars().all(|c| c.is_ascii_alphabetic())
    }));
    let missing: Vec<&String> = code.iter().filter(|c| !documented.contains(*c)).collect();
    assert!(
        code.len() >= 3 && missing.is_empty(),
        "undocumented: {missing:?} (of {code:?})"
    );
}
