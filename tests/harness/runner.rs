//! The composite `action.yml` run the way a GitHub runner runs it: inputs
//! with their defaults (a required one missing fails, as on GitHub), each
//! step's `${{ }}` expressions (`inputs.*`, `github.*`, `steps.*.outputs.*`)
//! evaluated, its `run` executed with `bash --noprofile --norc -eo pipefail`,
//! a `GITHUB_OUTPUT` file per step read back as the step's outputs, one
//! `GITHUB_STEP_SUMMARY` for the job, and the action's outputs evaluated at
//! the end. An expression the harness does not know fails the test, so a
//! change to action.yml cannot slip past it.
//!
//! GitHub's release downloads are the one thing served locally: a `curl` on
//! the steps' PATH answers `https://github.com/OWNER/REPO/releases/download/REF/FILE`
//! from [`Releases`], and fails like `curl -f` on anything else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// What a job gives the action's steps besides the inputs.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// `github.action_repository` and `github.action_ref`.
    pub action_repository: String,
    pub action_ref: String,
    /// Variables of the job (`GITHUB_*`, `ACTIONS_ID_TOKEN_*`, ...).
    pub env: Vec<(String, String)>,
    /// The event payload, written to `GITHUB_EVENT_PATH`.
    pub event: Value,
}

/// Release assets served to the install script's `curl`.
#[derive(Debug)]
pub struct Releases {
    dir: tempfile::TempDir,
}

impl Default for Releases {
    fn default() -> Releases {
        Releases::new()
    }
}

impl Releases {
    pub fn new() -> Releases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        let curl = dir.path().join("bin/curl");
        std::fs::write(&curl, CURL).unwrap();
        std::fs::set_permissions(&curl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Releases { dir }
    }

    /// Publishes `file` as asset `name` of release `tag` of `repository`.
    pub fn publish(&self, repository: &str, tag: &str, name: &str, contents: &[u8]) {
        let dir = self.dir.path().join("assets").join(repository).join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), contents).unwrap();
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn assets(&self) -> PathBuf {
        self.dir.path().join("assets")
    }
}

/// `curl -fsSL [--retry N] -o DEST URL` for GitHub release assets only.
const CURL: &str = r#"#!/usr/bin/env bash
set -euo pipefail
out=""; url=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) out="$2"; shift 2 ;;
        --retry) shift 2 ;;
        -*) shift ;;
        *) url="$1"; shift ;;
    esac
done
path="${url#https://github.com/}"
owner_repo="${path%%/releases/download/*}"
rest="${path#*/releases/download/}"
src="$NX_TEST_RELEASES/$owner_repo/$rest"
if [ "$path" = "$url" ] || [ ! -f "$src" ]; then
    echo "curl: (22) The requested URL returned error: 404" >&2
    exit 22
fi
cp "$src" "$out"
"#;

/// What a run of the action left.
#[derive(Debug)]
pub struct Run {
    /// Exit code of the step that ended the run (0 when every step passed).
    pub code: i32,
    /// Every step's stdout and stderr, in order.
    pub log: String,
    pub outputs: HashMap<String, String>,
    pub summary: String,
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces every `${{ expr }}` in `text` with `lookup(expr)`.
fn expand(text: &str, lookup: &dyn Fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").unwrap_or_else(|| panic!("unclosed expression in {text:?}")) + start;
        out.push_str(&lookup(rest[start + 3..end].trim()));
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `name=value` and `name<<DELIMITER` ... `DELIMITER` lines, as the runner reads them.
fn read_outputs(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut outputs = HashMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some((name, delimiter)) = line.split_once("<<") {
            let value: Vec<&str> = lines.by_ref().take_while(|l| *l != delimiter).collect();
            outputs.insert(name.to_owned(), value.join("\n"));
        } else if let Some((name, value)) = line.split_once('=') {
            outputs.insert(name.to_owned(), value.to_owned());
        }
    }
    outputs
}

/// `steps.ID.outputs.NAME`: that step's output, empty when it set none.
fn step_output(outputs: &HashMap<String, HashMap<String, String>>, expr: &str) -> Option<String> {
    match expr.split('.').collect::<Vec<_>>().as_slice() {
        ["steps", id, "outputs", name] => {
            Some(outputs.get(*id).and_then(|o| o.get(*name)).cloned().unwrap_or_default())
        }
        _ => None,
    }
}

/// Runs the composite action in `action_dir` with `inputs` for `job`.
pub fn run(action_dir: &Path, inputs: &[(&str, &str)], job: &Job, releases: &Releases) -> Run {
    let action = yaml(&action_dir.join("action.yml"));
    assert_eq!(action["runs"]["using"], "composite", "action.yml is a composite action");
    let given: HashMap<&str, &str> = inputs.iter().copied().collect();
    let declared = action["inputs"].as_object().expect("action.yml declares inputs");
    for name in given.keys() {
        assert!(declared.contains_key(*name), "input {name} is not declared by action.yml");
    }
    let mut input_values = HashMap::new();
    for (name, spec) in declared {
        let value = match given.get(name.as_str()) {
            Some(v) => (*v).to_owned(),
            None if spec["required"] == true => panic!("required input {name} was not given"),
            None => spec["default"].as_str().unwrap_or_default().to_owned(),
        };
        input_values.insert(name.clone(), value);
    }

    let work = tempfile::tempdir().unwrap();
    let event_path = work.path().join("event.json");
    std::fs::write(&event_path, job.event.to_string()).unwrap();
    let summary_path = work.path().join("summary.md");
    let runner_temp = work.path().join("runner-temp");
    std::fs::create_dir_all(&runner_temp).unwrap();
    let path = format!("{}:{}", releases.bin().display(), std::env::var("PATH").unwrap_or_default());

    let mut step_outputs: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut log = String::new();
    let mut code = 0;
    for (i, step) in action["runs"]["steps"].as_array().expect("steps").iter().enumerate() {
        let lookup = |expr: &str| -> String {
            if let Some(name) = expr.strip_prefix("inputs.") {
                return input_values.get(name).cloned().unwrap_or_else(|| panic!("unknown input in ${{{{ {expr} }}}}"));
            }
            match expr {
                "github.action_repository" => return job.action_repository.clone(),
                "github.action_ref" => return job.action_ref.clone(),
                "github.token" => return "ghs_job_token_for_tests".into(),
                _ => {}
            }
            step_output(&step_outputs, expr)
                .unwrap_or_else(|| panic!("the runner harness does not know ${{{{ {expr} }}}}"))
        };
        assert_eq!(step["shell"], "bash", "step {i} runs in bash");
        let script = expand(step["run"].as_str().expect("a run step"), &lookup);
        let script_path = work.path().join(format!("step-{i}.sh"));
        std::fs::write(&script_path, script).unwrap();
        let output_path = work.path().join(format!("output-{i}"));
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail"])
            .arg(&script_path)
            .current_dir(work.path())
            .env_clear()
            .env("PATH", &path)
            .env("HOME", work.path())
            .env("RUNNER_TEMP", &runner_temp)
            .env("GITHUB_ACTION_PATH", action_dir)
            .env("GITHUB_OUTPUT", &output_path)
            .env("GITHUB_STEP_SUMMARY", &summary_path)
            .env("GITHUB_EVENT_PATH", &event_path)
            .env("NX_TEST_RELEASES", releases.assets())
            .envs(job.env.iter().map(|(k, v)| (k, v)));
        if let Some(env) = step["env"].as_object() {
            for (k, v) in env {
                cmd.env(k, expand(v.as_str().unwrap_or_default(), &lookup));
            }
        }
        let out = cmd.output().unwrap();
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        let id = step["id"].as_str().map_or_else(|| format!("__{i}"), str::to_owned);
        step_outputs.insert(id, read_outputs(&output_path));
        if !out.status.success() {
            code = out.status.code().unwrap_or(-1);
            break;
        }
    }
    let mut outputs = HashMap::new();
    if code == 0 {
        for (name, spec) in action["outputs"].as_object().into_iter().flatten() {
            let value = expand(spec["value"].as_str().unwrap_or_default(), &|expr: &str| {
                step_output(&step_outputs, expr)
                    .unwrap_or_else(|| panic!("the runner harness does not know ${{{{ {expr} }}}} in an output"))
            });
            outputs.insert(name.clone(), value);
        }
    }
    Run { code, log, outputs, summary: std::fs::read_to_string(&summary_path).unwrap_or_default() }
}
