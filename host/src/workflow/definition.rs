//! Workflow definitions: declarative TOML files, parsed and validated on load.
//!
//! ```toml
//! name = "debate"
//! version = "0.1.0"
//! [params]            # defaults, overridden by `ksi run debate --param k=v`
//! rounds = 2
//!
//! [[steps]]
//! name = "opening"
//! handler = "debate.opening@^0.1"   # plugin.step, optional semver requirement
//!
//! [[steps]]
//! name = "rebuttal"
//! handler = "debate.rebuttal"
//! branches = ["rebuttal", "closing"] # the step's output may choose one of these
//!
//! [[steps]]
//! name = "closing"
//! handler = "debate.closing"
//! when = "params.rounds > 0"          # skipped (to its next) when false
//! retry = { max_attempts = 3, backoff_ms = 500 }
//! timeout_ms = 600000
//! ```
//!
//! A step with `parallel = ["a", "b"]` is a group: it runs the member steps concurrently and
//! continues to its `next` once all have completed; the members' results are joined into the
//! state under `results.<member>`. A step's `next` defaults to the following step in the file
//! that is not a group member; `"end"` finishes the workflow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::condition::Condition;

/// The target that ends a workflow.
pub const END: &str = "end";

/// A definition that cannot be used, with the file and line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct DefinitionError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// How a step is retried after a retryable error.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each time.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
}

fn default_attempts() -> u32 {
    3
}
fn default_backoff() -> u64 {
    1_000
}
fn default_backoff_max() -> u64 {
    60_000
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: default_attempts(),
            backoff_ms: default_backoff(),
            backoff_max_ms: default_backoff_max(),
        }
    }
}

/// `plugin.step[@requirement]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandlerRef {
    pub plugin: String,
    pub step: String,
    pub version: Option<VersionReq>,
}

impl HandlerRef {
    /// Parses `plugin.step` or `plugin.step@^1.2`.
    pub fn parse(s: &str) -> Result<HandlerRef, String> {
        let (name, req) =
            match s.split_once('@') {
                Some((n, r)) => (
                    n,
                    Some(VersionReq::parse(r).map_err(|e| {
                        format!("handler {s:?}: bad version requirement {r:?}: {e}")
                    })?),
                ),
                None => (s, None),
            };
        let Some((plugin, step)) = name.split_once('.') else {
            return Err(format!(
                "handler {s:?} must be written plugin.step (e.g. debate.opening)"
            ));
        };
        if plugin.is_empty() || step.is_empty() {
            return Err(format!("handler {s:?} has an empty plugin or step name"));
        }
        Ok(HandlerRef {
            plugin: plugin.to_string(),
            step: step.to_string(),
            version: req,
        })
    }
}

impl std::fmt::Display for HandlerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.plugin, self.step)?;
        if let Some(v) = &self.version {
            write!(f, "@{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStep {
    name: String,
    #[serde(default)]
    handler: Option<String>,
    #[serde(default)]
    params: Option<toml::Table>,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    branches: Vec<String>,
    #[serde(default)]
    parallel: Vec<String>,
    #[serde(default)]
    retry: Option<RetryPolicy>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDefinition {
    name: String,
    version: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    params: Option<toml::Table>,
    #[serde(default)]
    retry: Option<RetryPolicy>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    steps: Vec<toml::Spanned<FileStep>>,
}

/// One validated step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub description: Option<String>,
    /// None for a parallel group.
    pub handler: Option<HandlerRef>,
    pub params: Value,
    #[serde(skip)]
    pub when: Option<Condition>,
    pub when_source: Option<String>,
    /// Where to go after this step (a step name or [`END`]).
    pub next: String,
    pub branches: Vec<String>,
    pub parallel: Vec<String>,
    /// The group this step is a member of, if any.
    pub member_of: Option<String>,
    pub retry: RetryPolicy,
    pub timeout_ms: u64,
    pub line: usize,
}

/// A validated workflow definition.
#[derive(Debug, Clone, Serialize)]
pub struct Definition {
    pub name: String,
    pub version: Version,
    pub description: Option<String>,
    pub params: Value,
    pub steps: Vec<Step>,
    pub file: PathBuf,
    /// sha256 of the file, so an instance records exactly which text it ran.
    pub sha256: String,
    #[serde(skip)]
    index: HashMap<String, usize>,
}

/// The default step timeout: 30 minutes (a Claude call with tools can take long).
pub const DEFAULT_TIMEOUT_MS: u64 = 30 * 60 * 1000;

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

fn toml_to_json(t: Option<toml::Table>) -> Value {
    t.map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
        .unwrap_or_else(|| Value::Object(Default::default()))
}

impl Definition {
    /// The first step to run.
    pub fn first(&self) -> &Step {
        self.steps
            .iter()
            .find(|s| s.member_of.is_none())
            .expect("validated definitions have a first step")
    }

    /// A step by name.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.index.get(name).map(|&i| &self.steps[i])
    }

    /// Number of top-level steps (for progress display).
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether there are no steps (never true for a validated definition).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Parses and validates a definition. `handler_ok` says whether a handler can be resolved
    /// (the plugin registry), returning the reason when not.
    ///
    /// # Errors
    /// Syntax errors, unknown fields, bad handlers, unknown step targets, cycles without exit,
    /// each naming the file and line.
    pub fn parse(
        file: &Path,
        src: &str,
        handler_ok: &dyn Fn(&HandlerRef) -> Result<(), String>,
    ) -> Result<Definition, DefinitionError> {
        let fname = file.display().to_string();
        let err = |line: usize, message: String| DefinitionError {
            file: fname.clone(),
            line,
            message,
        };
        let parsed: FileDefinition = toml::from_str(src).map_err(|e| {
            let line = e.span().map(|s| line_of(src, s.start)).unwrap_or(1);
            err(line, e.message().to_string())
        })?;
        let version = Version::parse(&parsed.version).map_err(|e| {
            err(
                1,
                format!("version {:?} is not semver: {e}", parsed.version),
            )
        })?;
        if parsed.steps.is_empty() {
            return Err(err(1, "a workflow needs at least one [[steps]]".into()));
        }
        let default_retry = parsed.retry.unwrap_or_default();
        let default_timeout = parsed.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);

        let mut index = HashMap::new();
        let mut lines = Vec::new();
        for (i, s) in parsed.steps.iter().enumerate() {
            let line = line_of(src, s.span().start);
            lines.push(line);
            let name = &s.get_ref().name;
            if name.is_empty()
                || name == END
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(err(
                    line,
                    format!(
                        "step name {name:?} must be letters, digits, '_' or '-' (and not \"end\")"
                    ),
                ));
            }
            if index.insert(name.clone(), i).is_some() {
                return Err(err(line, format!("step {name:?} is defined twice")));
            }
        }
        let mut member_of: HashMap<String, String> = HashMap::new();
        for (i, s) in parsed.steps.iter().enumerate() {
            let s = s.get_ref();
            for m in &s.parallel {
                let Some(&mi) = index.get(m) else {
                    return Err(err(
                        lines[i],
                        format!(
                            "step {:?}: parallel member {m:?} is not a step of this workflow",
                            s.name
                        ),
                    ));
                };
                if !parsed.steps[mi].get_ref().parallel.is_empty() {
                    return Err(err(
                        lines[mi],
                        format!(
                            "step {m:?} is a parallel group itself and cannot be a member of {:?}",
                            s.name
                        ),
                    ));
                }
                if let Some(other) = member_of.insert(m.clone(), s.name.clone()) {
                    return Err(err(
                        lines[mi],
                        format!(
                            "step {m:?} is a member of two groups ({other:?} and {:?})",
                            s.name
                        ),
                    ));
                }
            }
        }

        let mut steps = Vec::new();
        for (i, spanned) in parsed.steps.into_iter().enumerate() {
            let line = lines[i];
            let s = spanned.into_inner();
            let handler = match (&s.handler, s.parallel.is_empty()) {
                (Some(h), true) => {
                    let h = HandlerRef::parse(h)
                        .map_err(|m| err(line, format!("step {:?}: {m}", s.name)))?;
                    handler_ok(&h).map_err(|m| err(line, format!("step {:?}: {m}", s.name)))?;
                    Some(h)
                }
                (None, true) => {
                    return Err(err(
                        line,
                        format!(
                            "step {:?} needs a handler (plugin.step) or a parallel list",
                            s.name
                        ),
                    ));
                }
                (Some(_), false) => {
                    return Err(err(
                        line,
                        format!(
                            "step {:?} is a parallel group: it has no handler of its own",
                            s.name
                        ),
                    ));
                }
                (None, false) => None,
            };
            let when = match &s.when {
                Some(w) => Some(
                    Condition::parse(w)
                        .map_err(|m| err(line, format!("step {:?}: when {w:?}: {m}", s.name)))?,
                ),
                None => None,
            };
            let default_next = steps_after(&index, &member_of, i);
            let next = s.next.clone().unwrap_or(default_next);
            for target in std::iter::once(&next).chain(&s.branches) {
                if target != END && !index.contains_key(target) {
                    return Err(err(
                        line,
                        format!(
                            "step {:?} goes to {target:?}, which is not a step of this workflow (steps: {})",
                            s.name,
                            index.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                if member_of.contains_key(target)
                    && member_of.get(&s.name).is_none_or(|g| g != target)
                {
                    return Err(err(
                        line,
                        format!(
                            "step {:?} goes to {target:?}, a member of parallel group {:?}; go to the group instead",
                            s.name, member_of[target]
                        ),
                    ));
                }
            }
            steps.push(Step {
                member_of: member_of.get(&s.name).cloned(),
                name: s.name,
                description: s.description,
                handler,
                params: toml_to_json(s.params),
                when,
                when_source: s.when,
                next,
                branches: s.branches,
                parallel: s.parallel,
                retry: s.retry.unwrap_or(default_retry),
                timeout_ms: s.timeout_ms.unwrap_or(default_timeout),
                line,
            });
        }
        if steps.iter().all(|s| s.member_of.is_some()) {
            return Err(err(
                1,
                "every step is a parallel member; nothing can start".into(),
            ));
        }
        let def = Definition {
            name: parsed.name,
            version,
            description: parsed.description,
            params: toml_to_json(parsed.params),
            steps,
            file: file.to_path_buf(),
            sha256: crate::refs::sha256_hex(src.as_bytes()),
            index,
        };
        def.check_cycles().map_err(|(line, m)| err(line, m))?;
        Ok(def)
    }

    /// The steps the engine may go to from `s` (members join back into the group's next).
    fn edges<'a>(&'a self, s: &'a Step) -> Vec<&'a str> {
        if s.member_of.is_some() {
            return Vec::new();
        }
        let mut out: Vec<&str> = vec![s.next.as_str()];
        out.extend(s.branches.iter().map(String::as_str));
        out
    }

    /// Refuses loops that can never be left: a strongly connected set of steps with no edge
    /// out of it (and no way to `end`).
    fn check_cycles(&self) -> Result<(), (usize, String)> {
        // Tarjan's SCC over top-level steps.
        struct T<'a> {
            def: &'a Definition,
            index: usize,
            idx: HashMap<&'a str, usize>,
            low: HashMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on: HashSet<&'a str>,
            sccs: Vec<Vec<&'a str>>,
        }
        fn visit<'a>(t: &mut T<'a>, v: &'a str) {
            t.idx.insert(v, t.index);
            t.low.insert(v, t.index);
            t.index += 1;
            t.stack.push(v);
            t.on.insert(v);
            let step = t.def.step(v).unwrap();
            for w in t.def.edges(step) {
                if w == END {
                    continue;
                }
                let w: &'a str = &t.def.step(w).unwrap().name;
                if !t.idx.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.idx[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if t.low[v] == t.idx[v] {
                let mut scc = Vec::new();
                while let Some(w) = t.stack.pop() {
                    t.on.remove(w);
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                t.sccs.push(scc);
            }
        }
        let mut t = T {
            def: self,
            index: 0,
            idx: HashMap::new(),
            low: HashMap::new(),
            stack: Vec::new(),
            on: HashSet::new(),
            sccs: Vec::new(),
        };
        for s in self.steps.iter().filter(|s| s.member_of.is_none()) {
            if !t.idx.contains_key(s.name.as_str()) {
                visit(&mut t, &s.name);
            }
        }
        for scc in &t.sccs {
            let set: HashSet<&str> = scc.iter().copied().collect();
            let is_cycle = scc.len() > 1 || {
                let s = self.step(scc[0]).unwrap();
                self.edges(s).contains(&s.name.as_str())
            };
            if !is_cycle {
                continue;
            }
            let exits = scc.iter().any(|v| {
                let s = self.step(v).unwrap();
                self.edges(s).iter().any(|w| *w == END || !set.contains(w))
            });
            if !exits {
                let mut names: Vec<&str> = scc.clone();
                names.sort_by_key(|n| self.step(n).unwrap().line);
                let first = self.step(names[0]).unwrap();
                return Err((
                    first.line,
                    format!(
                        "steps {} form a loop with no way out: give one of them a branch to a step outside the loop or to \"end\"",
                        names.join(" -> ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn steps_after(
    index: &HashMap<String, usize>,
    member_of: &HashMap<String, String>,
    i: usize,
) -> String {
    let mut by_pos: BTreeMap<usize, &String> = BTreeMap::new();
    for (name, &pos) in index {
        by_pos.insert(pos, name);
    }
    by_pos
        .range(i + 1..)
        .map(|(_, n)| *n)
        .find(|n| !member_of.contains_key(*n))
        .cloned()
        .unwrap_or_else(|| END.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Definition, DefinitionError> {
        Definition::parse(Path::new("defs/t.toml"), src, &|h| {
            if h.plugin == "missing" {
                Err(format!("no plugin named {:?} is loaded", h.plugin))
            } else {
                Ok(())
            }
        })
    }

    #[test]
    fn sequence_defaults_next_to_the_following_step() {
        let d = parse(
            r#"
name = "t"
version = "1.0.0"
[[steps]]
name = "a"
handler = "echo.run"
[[steps]]
name = "b"
handler = "echo.run@^0.1"
"#,
        )
        .unwrap();
        assert_eq!(d.first().name, "a");
        assert_eq!(d.step("a").unwrap().next, "b");
        assert_eq!(d.step("b").unwrap().next, END);
        assert_eq!(
            d.step("b").unwrap().handler.as_ref().unwrap().version,
            Some(VersionReq::parse("^0.1").unwrap())
        );
    }

    #[test]
    fn parallel_members_are_skipped_by_default_next() {
        let d = parse(
            r#"
name = "t"
version = "1.0.0"
[[steps]]
name = "fan"
parallel = ["x", "y"]
[[steps]]
name = "x"
handler = "echo.run"
[[steps]]
name = "y"
handler = "echo.run"
[[steps]]
name = "after"
handler = "echo.run"
"#,
        )
        .unwrap();
        assert_eq!(d.step("fan").unwrap().next, "after");
        assert_eq!(d.step("x").unwrap().member_of.as_deref(), Some("fan"));
    }

    #[test]
    fn unknown_handler_names_file_and_line() {
        let e = parse(
            "name = \"t\"\nversion = \"1.0.0\"\n[[steps]]\nname = \"a\"\nhandler = \"missing.run\"\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(
            e.to_string()
                .starts_with("defs/t.toml:3: step \"a\": no plugin"),
            "{e}"
        );
    }

    #[test]
    fn unknown_step_target_is_an_error() {
        let e = parse(
            "name = \"t\"\nversion = \"1.0.0\"\n[[steps]]\nname = \"a\"\nhandler = \"e.r\"\nnext = \"nowhere\"\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("\"nowhere\", which is not a step"),
            "{e}"
        );
    }

    #[test]
    fn a_loop_without_exit_is_refused_with_its_line() {
        let e = parse(
            r#"name = "t"
version = "1.0.0"
[[steps]]
name = "a"
handler = "e.r"
[[steps]]
name = "b"
handler = "e.r"
next = "a"
"#,
        )
        .unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("loop with no way out"), "{e}");
    }

    #[test]
    fn a_loop_with_a_branch_out_is_fine() {
        parse(
            r#"name = "t"
version = "1.0.0"
[[steps]]
name = "draft"
handler = "e.r"
[[steps]]
name = "critique"
handler = "e.r"
branches = ["draft", "end"]
next = "draft"
"#,
        )
        .unwrap();
    }

    #[test]
    fn syntax_errors_and_unknown_fields_name_the_line() {
        let e =
            parse("name = \"t\"\nversion = \"1.0.0\"\n[[steps]]\nname = \"a\"\nhandlr = \"e.r\"\n")
                .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("handlr"), "{e}");
    }
}
