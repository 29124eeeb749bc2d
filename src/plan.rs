//! The plan: the catalogue compiled into a DAG in a deterministic order,
//! and its renderings (text for people, JSON for machines, dot for pictures).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::catalog::StateDef;
use crate::diagnostic::{Diagnostic, Diagnostics, nearest};
use crate::printable::printable;
use crate::report::{Action, SinkPreview, StateReport};

pub const PLAN_SCHEMA_VERSION: u32 = 1;

/// The steps in execution order: every step after all it runs `after`, ties
/// broken by catalogue order.
#[derive(Debug, Clone)]
pub struct Graph {
    pub states: Vec<StateDef>,
}

impl Graph {
    /// Orders `states` (catalogue order). An unknown `after` and a cycle are
    /// errors pointing at the `after` entry that causes them.
    pub fn compile(states: Vec<StateDef>) -> Result<Graph, Diagnostics> {
        let index: BTreeMap<&str, usize> = states
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut errors = Vec::new();
        let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); states.len()];
        for (i, state) in states.iter().enumerate() {
            for after in &state.after {
                match index.get(after.value.as_str()) {
                    Some(&j) => {
                        deps[i].insert(j);
                    }
                    None => {
                        let mut d = state.diagnostic_at(
                            after.referenced,
                            format!(
                                "state `{}` runs after `{}`, which is not defined",
                                state.name, after.value
                            ),
                        );
                        if let Some(near) = nearest(&after.value, index.keys().copied()) {
                            d = d.with_help(format!("did you mean `{near}`?"));
                        }
                        errors.push(d);
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(Diagnostics(errors));
        }

        // Kahn's algorithm; the ready set is ordered by catalogue position.
        let mut waiting: Vec<usize> = deps.iter().map(BTreeSet::len).collect();
        let mut ready: BTreeSet<usize> = (0..states.len()).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(states.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for (j, d) in deps.iter().enumerate() {
                if d.contains(&i) {
                    waiting[j] -= 1;
                    if waiting[j] == 0 {
                        ready.insert(j);
                    }
                }
            }
        }
        if order.len() < states.len() {
            return Err(cycle_error(&states, &deps, &waiting).into());
        }
        let mut slots: Vec<Option<StateDef>> = states.into_iter().map(Some).collect();
        Ok(Graph {
            states: order
                .into_iter()
                .map(|i| slots[i].take().expect("each once"))
                .collect(),
        })
    }
}

/// Finds one cycle among the steps left unordered and reports it as
/// `a → b → c → a`, at the `after` entry that closes it.
fn cycle_error(states: &[StateDef], deps: &[BTreeSet<usize>], waiting: &[usize]) -> Diagnostic {
    let stuck: BTreeSet<usize> = (0..states.len()).filter(|&i| waiting[i] > 0).collect();
    // Walk prerequisites from the first stuck step until one repeats.
    let mut path = vec![*stuck.first().expect("a cycle leaves steps")];
    loop {
        let current = *path.last().expect("non-empty");
        let next = *deps[current]
            .iter()
            .find(|d| stuck.contains(d))
            .expect("stuck steps wait on stuck steps");
        if let Some(start) = path.iter().position(|&p| p == next) {
            let cycle: Vec<usize> = path[start..].to_vec();
            // Runs-before order reads naturally: a → b means b runs after a.
            let mut names: Vec<&str> = cycle
                .iter()
                .rev()
                .map(|&i| states[i].name.as_str())
                .collect();
            names.push(names[0]);
            // The edges of the cycle, each a step and the step it waits
            // on. The error points at one from a file of the user's when
            // there is one (the override that made the cycle), not at a
            // built-in they cannot edit.
            let edges: Vec<(usize, usize)> = cycle
                .iter()
                .zip(cycle.iter().skip(1).chain([&next]))
                .map(|(&step, &dep)| (step, dep))
                .collect();
            let embedded = |i: usize| states[i].origin.name.starts_with("<embedded");
            let (step, dep) = if embedded(current) {
                edges
                    .into_iter()
                    .find(|&(step, _)| !embedded(step))
                    .unwrap_or((current, next))
            } else {
                (current, next)
            };
            let entry = states[step]
                .after
                .iter()
                .find(|a| a.value == states[dep].name)
                .expect("the edge exists");
            return states[step].diagnostic_at(
                entry.referenced,
                format!("dependency cycle: {}", names.join(" → ")),
            );
        }
        path.push(next);
    }
}

/// What `plan` shows: every step and what it would change.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    pub schema_version: u32,
    pub host_root: String,
    pub spec: String,
    pub os: Option<String>,
    pub kernel: Option<String>,
    pub steps: Vec<StateReport>,
    pub labels: BTreeMap<String, String>,
    pub label_sink: SinkPreview,
    pub summary: Summary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub change: usize,
    pub unchanged: usize,
    pub skip: usize,
    pub wait: usize,
    pub block: usize,
    pub fail: usize,
}

impl Summary {
    pub fn of(steps: &[StateReport]) -> Summary {
        let mut s = Summary::default();
        for step in steps {
            *match step.action {
                Action::Change => &mut s.change,
                Action::Unchanged => &mut s.unchanged,
                Action::Skip => &mut s.skip,
                Action::Wait => &mut s.wait,
                Action::Block => &mut s.block,
                Action::Fail => &mut s.fail,
            } += 1;
        }
        s
    }
}

impl PlanReport {
    /// Whether `apply` would change anything (steps or labels).
    pub fn has_changes(&self) -> bool {
        self.summary.change > 0 || self.label_sink.changes
    }

    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string_pretty(self).expect("a plan serializes");
        json.push('\n');
        json
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut about = Vec::new();
        about.extend(self.os.clone());
        about.extend(self.kernel.as_ref().map(|k| format!("kernel {k}")));
        let about = if about.is_empty() {
            String::new()
        } else {
            format!(" ({})", about.join(", "))
        };
        let _ = writeln!(out, "host: {}{about}", self.host_root);
        let _ = writeln!(out, "spec: {}\n", self.spec);
        out.push_str(&steps_table(&self.steps));
        let sink = &self.label_sink;
        let state = if sink.changes {
            "would change"
        } else {
            "unchanged"
        };
        let _ = writeln!(out, "\nlabels → {} ({state})", sink.target);
        for (key, value) in &self.labels {
            let _ = writeln!(
                out,
                "    {}={}",
                printable(key, false),
                printable(value, false)
            );
        }
        if let Some(diff) = sink.diff.as_deref().filter(|_| sink.changes) {
            let _ = writeln!(out);
            for line in diff
                .lines()
                .filter(|l| !l.starts_with("--- ") && !l.starts_with("+++ "))
            {
                let _ = writeln!(out, "    {}", printable(line, true));
            }
        }
        let s = &self.summary;
        let _ = writeln!(
            out,
            "\nPlan: {} to change, {} unchanged, {} skipped, {} waiting, {} blocked, {} failed; labels {state}.",
            s.change, s.unchanged, s.skip, s.wait, s.block, s.fail
        );
        out
    }

    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph gpuprov {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n",
        );
        for step in &self.steps {
            let _ = writeln!(
                out,
                "  \"{}\" [label=\"{}\\n{}\", fillcolor=\"{}\"];",
                step.name,
                step.name,
                step.outcome.as_str(),
                colour(step.action)
            );
        }
        for step in &self.steps {
            for dep in &step.after {
                let _ = writeln!(out, "  \"{dep}\" -> \"{}\";", step.name);
            }
        }
        out.push_str("}\n");
        out
    }
}

/// One line per step (symbol, state, outcome, reason), its changes indented below.
pub fn steps_table(steps: &[StateReport]) -> String {
    let mut out = String::new();
    let name_width = steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let outcome_width = steps
        .iter()
        .map(|s| s.outcome.as_str().len())
        .max()
        .unwrap_or(0);
    for step in steps {
        let _ = writeln!(
            out,
            "  {} {:name_width$}  {:outcome_width$}  {}",
            symbol(step.action),
            step.name,
            step.outcome.as_str(),
            printable(&step.reason, false)
        );
        for change in &step.changes {
            let _ = writeln!(out, "      {}", printable(&change.summary(), false));
            if let crate::state::Change::WriteFile {
                diff: Some(diff), ..
            } = change
            {
                for line in diff.lines() {
                    let _ = writeln!(out, "          {}", printable(line, true));
                }
            }
        }
    }
    out
}

pub fn symbol(action: Action) -> &'static str {
    match action {
        Action::Unchanged => "✓",
        Action::Change => "~",
        Action::Skip => "-",
        Action::Block => "!",
        Action::Wait => "…",
        Action::Fail => "✗",
    }
}

fn colour(action: Action) -> &'static str {
    match action {
        Action::Unchanged => "#c8e6c9",
        Action::Change => "#fff59d",
        Action::Skip => "#eeeeee",
        Action::Block => "#ffcc80",
        Action::Wait => "#b3e5fc",
        Action::Fail => "#ef9a9a",
    }
}
