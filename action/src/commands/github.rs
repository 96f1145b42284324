//! `nx github-action`: the step `action.yml` runs. It reads the inputs from
//! `INPUT_*` variables and the pull request from `GITHUB_EVENT_PATH`, pushes,
//! writes the step outputs (`GITHUB_OUTPUT`) and a job summary
//! (`GITHUB_STEP_SUMMARY`), and turns every failure into an `::error::`
//! annotation.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use nx_protocol::api::{ClosedPull, DeploymentState, PushMeta, Source};
use nx_protocol::target::ServerTarget;
use nx_protocol::AppName;

use super::push::{execute, failed, parse_env, Job, Pushed};
use crate::cli::Global;
use crate::client::Client;
use crate::config;
use crate::failure::Failure;
use nx_protocol::api::{AppInfo, PromoteOn};

/// What the workflow run says about the code being deployed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunContext {
    pub repository: Option<String>,
    /// The repository's numeric id (GITHUB_REPOSITORY_ID, or the event's).
    pub repository_id: Option<u64>,
    pub sha: Option<String>,
    pub git_ref: Option<String>,
    pub pr: Option<u64>,
    /// `push`, `pull_request`, ... (GITHUB_EVENT_NAME).
    pub event: Option<String>,
    /// The repository's default branch, from the event payload.
    pub default_branch: Option<String>,
    /// The event is a pull request being closed (merged or not).
    pub pr_closed: bool,
    /// The pull request comes from this other repository (a fork).
    pub fork: Option<String>,
}

impl RunContext {
    /// Reads `GITHUB_*` variables and, for pull requests, the event payload: its
    /// head commit is what was built (GITHUB_SHA is a merge commit there).
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<RunContext> {
        let mut ctx = RunContext {
            repository: env("GITHUB_REPOSITORY"),
            repository_id: env("GITHUB_REPOSITORY_ID").and_then(|v| v.parse().ok()),
            sha: env("GITHUB_SHA"),
            git_ref: env("GITHUB_HEAD_REF").filter(|r| !r.is_empty()).or_else(|| env("GITHUB_REF_NAME")),
            pr: None,
            event: env("GITHUB_EVENT_NAME"),
            default_branch: None,
            pr_closed: false,
            fork: None,
        };
        if let Some(path) = env("GITHUB_EVENT_PATH") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Failure::Usage(format!("cannot read GITHUB_EVENT_PATH {path}: {e}")))?;
            let event: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Failure::Usage(format!("GITHUB_EVENT_PATH {path} is not JSON: {e}")))?;
            if let Some(pr) = event.get("pull_request") {
                ctx.pr = pr["number"].as_u64();
                ctx.pr_closed = event["action"].as_str() == Some("closed");
                if let Some(sha) = pr["head"]["sha"].as_str() {
                    ctx.sha = Some(sha.to_owned());
                }
                if let Some(r) = pr["head"]["ref"].as_str() {
                    ctx.git_ref = Some(r.to_owned());
                }
                // A fork's head repository has another name; a deleted
                // fork's is null.
                let head = pr["head"]["repo"]["full_name"].as_str();
                if head != pr["base"]["repo"]["full_name"].as_str() {
                    ctx.fork = Some(head.unwrap_or("a deleted fork").to_owned());
                }
            }
            if let Some(name) = event["repository"]["full_name"].as_str() {
                ctx.repository = Some(name.to_owned());
            }
            if let Some(id) = event["repository"]["id"].as_u64() {
                ctx.repository_id = Some(id);
            }
            ctx.default_branch = event["repository"]["default_branch"].as_str().map(str::to_owned);
        }
        Ok(ctx)
    }

    /// Whether the promotion rule makes this run's deployment production:
    /// with `push`, a push to the production branch (`branch`, else the
    /// repository's default one), which a merged pull request is. The other
    /// rules are the receiver's, on GitHub's webhooks.
    pub fn promotes(&self, on: PromoteOn, branch: Option<&str>) -> bool {
        let branch = branch.or(self.default_branch.as_deref());
        on == PromoteOn::Push
            && self.event.as_deref() == Some("push")
            && self.pr.is_none()
            && branch.is_some()
            && self.git_ref.as_deref() == branch
    }
}

/// Escapes a message for a workflow command (`::error::...`).
pub fn escape_command(s: &str) -> String {
    s.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
}

/// Appends `name=value` lines to the file named by `GITHUB_OUTPUT`, using the
/// heredoc form for values with newlines.
fn write_outputs(path: &Path, outputs: &[(&str, String)]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
    for (name, value) in outputs {
        if value.contains('\n') {
            let delimiter = format!("NX_EOF_{}", hex::encode(rand::random::<[u8; 8]>()));
            writeln!(f, "{name}<<{delimiter}\n{value}\n{delimiter}")?;
        } else {
            writeln!(f, "{name}={value}")?;
        }
    }
    Ok(())
}

fn summary(pushed: &Pushed, app: &AppName, ctx: &RunContext) -> String {
    let d = &pushed.deployment;
    let mut s = format!(
        "### NX Sandbox: {app}\n\n| | |\n| --- | --- |\n| deployment | `{}` |\n| state | {} |\n| preview | {} |\n| digest | `sha256:{}` |\n",
        d.id, d.state, d.preview_url, d.digest
    );
    if let Some(sha) = &ctx.sha {
        s.push_str(&format!("| commit | `{}` |\n", &sha[..sha.len().min(12)]));
    }
    if let Some(pr) = ctx.pr {
        s.push_str(&format!("| pull request | #{pr} |\n"));
    }
    if let Some(p) = &pushed.promotion {
        s.push_str(&format!("| production | {} |\n", p.production_url));
    }
    if let Some(e) = &d.error {
        s.push_str(&format!("\n**Failed:** {e}\n"));
    }
    if !d.log_tail.is_empty() {
        s.push('\n');
        s.push_str(&code_block(&d.log_tail));
    }
    s
}

/// The app's lines as a Markdown code block that they cannot end: the fence
/// is one backtick longer than any run of backticks in them (CommonMark closes
/// a fence only with one at least as long), and what a terminal or a renderer
/// would act on instead of show is neutralised.
fn code_block(lines: &[String]) -> String {
    let longest_run = lines.iter().flat_map(|l| l.split(|c| c != '`')).map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest_run.max(2) + 1);
    let body: Vec<_> = lines.iter().map(|l| nx_protocol::logs::neutralise(l)).collect();
    format!("{fence}text\n{}\n{fence}\n", body.join("\n"))
}

fn truthy(v: Option<String>, default: bool) -> Result<bool, Failure> {
    match v.as_deref().map(str::trim) {
        None | Some("") => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(Failure::Usage(format!("expected true or false, not {other:?}"))),
    }
}

fn lines(v: Option<String>) -> Vec<String> {
    v.unwrap_or_default().lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

async fn push_from_inputs(g: &Global, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let input = |name: &str| env(&format!("INPUT_{name}")).filter(|v| !v.trim().is_empty());
    let manifest_path = input("MANIFEST").map(PathBuf::from).or_else(|| g.manifest.clone());
    let manifest = crate::manifest::load(manifest_path.as_deref())?;
    let m = manifest.as_ref().map(|(_, m)| m);
    let app = input("APP")
        .or_else(|| m.and_then(|m| m.app.clone()))
        .ok_or_else(|| Failure::Usage("name the app: the input `app`, or `app = \"NAME\"` in nx.toml".into()))?;
    let app = AppName::parse(app.trim()).map_err(|e| Failure::Usage(format!("input `app`: {e}")))?;
    let ctx = RunContext::from_env(env)?;
    let target_run = ctx.event.as_deref() == Some("pull_request_target");
    if let (Some(fork), Some(pr), false) = (&ctx.fork, ctx.pr, target_run) {
        return skip_fork(&app, pr, fork, env);
    }
    let target = config::resolve(g.server.as_deref(), g.key.as_deref(), g.insecure)?;
    if target_run {
        return fork_preview(&target, &app, &ctx, m, env).await;
    }
    if let (true, Some(pr)) = (ctx.pr_closed, ctx.pr) {
        return close_previews(&Client::for_push(&target).await?, &app, pr, env).await;
    }
    let (binary, server_target) = binary_from_inputs(&target.server, input("BINARY"), input("BUILD"), m).await?;
    // After the build: an OIDC token lives minutes, and the build may be long.
    let client = Client::for_push(&target).await?;
    // The input decides when given; else nx.toml's [promote] rule; else the
    // app's own.
    let promote = match input("PROMOTE") {
        Some(v) => truthy(Some(v), false).map_err(|e| Failure::Usage(format!("input `promote`: {e}")))?,
        None => {
            let rule = m.map(|m| &m.promote);
            let on = match rule.and_then(|p| p.on) {
                Some(on) => on,
                None => client.get::<AppInfo>(&format!("/v1/apps/{app}")).await?.settings.promote_on,
            };
            ctx.promotes(on, rule.and_then(|p| p.branch.as_deref()))
        }
    };
    let job = Job {
        path: &binary,
        app: &app,
        meta: push_meta(&input, m, &ctx, &binary)?,
        verify: true,
        promote,
        quiet: false,
        manifest: manifest.as_ref(),
        fork_preview: false,
        target: server_target,
    };
    report(&client, job, &ctx, env).await
}

/// What a push from the inputs, nx.toml and the run says about itself.
fn push_meta(
    input: &dyn Fn(&str) -> Option<String>,
    m: Option<&crate::manifest::Manifest>,
    ctx: &RunContext,
    binary: &Path,
) -> anyhow::Result<PushMeta> {
    let wait = truthy(input("WAIT"), true).map_err(|e| Failure::Usage(format!("input `wait`: {e}")))?;
    let mut vars = m.map(|m| m.env.clone()).unwrap_or_default();
    vars.extend(parse_env(&lines(input("ENV")))?);
    let args = match lines(input("ARGS")) {
        a if a.is_empty() => m.map(|m| m.args.clone()).unwrap_or_default(),
        a => a,
    };
    Ok(PushMeta {
        args,
        env: vars,
        filename: binary.file_name().map(|f| f.to_string_lossy().into_owned()),
        git_sha: ctx.sha.clone(),
        git_ref: ctx.git_ref.clone(),
        pr: ctx.pr,
        source: Source::Action,
        repository: ctx.repository.clone(),
        repository_id: ctx.repository_id,
        no_wait: !wait,
        push_id: None,
    })
}

/// Pushes `job`, then writes the step's outputs and job summary.
async fn report(
    client: &Client,
    job: Job<'_>,
    ctx: &RunContext,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let (app, wait) = (job.app.clone(), !job.meta.no_wait);
    let pushed = execute(client, job).await?;
    let d = &pushed.deployment;
    if let Some(path) = env("GITHUB_OUTPUT") {
        write_outputs(
            Path::new(&path),
            &[
                ("deployment-id", d.id.to_string()),
                ("preview-url", d.preview_url.clone()),
                ("digest", d.digest.clone()),
            ],
        )?;
    }
    if let Some(path) = env("GITHUB_STEP_SUMMARY") {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
        f.write_all(summary(&pushed, &app, ctx).as_bytes())?;
    }
    println!("{} {} {}: {}", app, d.id, d.state, d.preview_url);
    let ok = d.state == DeploymentState::Healthy || (!wait && d.state == DeploymentState::Starting);
    if ok {
        Ok(())
    } else {
        Err(failed(d).into())
    }
}

/// The binary to push: `binary`, or what `build` makes (`true`: `nx build`
/// of the working directory; else a shell command, then `binary` or nx.toml's
/// `binary` names its result), with the server's target when the build
/// asked for it, so that the push does not ask again.
async fn binary_from_inputs(
    server: &str,
    binary: Option<String>,
    build: Option<String>,
    manifest: Option<&crate::manifest::Manifest>,
) -> anyhow::Result<(PathBuf, Option<ServerTarget>)> {
    match build.as_deref().map(str::trim) {
        None | Some("false") => binary.map(|b| (PathBuf::from(b), None)).ok_or_else(|| {
            Failure::Usage("give the input `binary` (a file to push) or `build` (true, or a build command)".into())
                .into()
        }),
        Some("true") => {
            let target = crate::client::get_public(server, "/v1/target").await?;
            let built =
                super::build::build_dir(Path::new(binary.as_deref().unwrap_or(".")), manifest, None, &target).await?;
            Ok((built, Some(target)))
        }
        Some(command) => {
            let output = binary.or_else(|| manifest.and_then(|m| m.binary.clone())).ok_or_else(|| {
                Failure::Usage(
                    "with a build command, name the file it makes: the input `binary`, or `binary` in nx.toml".into(),
                )
            })?;
            println!("::group::build: {command}");
            use std::os::fd::AsFd;
            let status = crate::build::toolchain("sh")
                .args(["-c", command])
                .stdout(std::process::Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?))
                .status()
                .map_err(|e| Failure::Usage(format!("cannot run the build command: {e}")))?;
            println!("::endgroup::");
            if !status.success() {
                return Err(Failure::Refused(format!("the build command failed ({status}): {command}")).into());
            }
            Ok((PathBuf::from(output), None))
        }
    }
}

/// A `pull_request_target` run (the workflow's `labeled` path, see
/// workflows/README.md): it checked out a fork's head commit, so the fork's
/// code ran in this job. It pushes a preview of that commit with the job's
/// OIDC token, which the receiver takes only for a commit someone with write
/// access labeled, and only as a preview: no key, no nx.toml settings, no
/// promotion.
async fn fork_preview(
    target: &config::Target,
    app: &AppName,
    ctx: &RunContext,
    m: Option<&crate::manifest::Manifest>,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let input = |name: &str| env(&format!("INPUT_{name}")).filter(|v| !v.trim().is_empty());
    if target.key.is_some() {
        return Err(Failure::Usage(
            "a pull_request_target run must not be given a key (input `key`, NX_KEY): a fork's code runs in this job \
             and would read it; leave it out, and the job pushes with its OIDC token (`permissions: id-token: write`)"
                .into(),
        )
        .into());
    }
    let Some(pr) = ctx.pr else {
        return Err(Failure::Usage(
            "a pull_request_target run previews a pull request, and this event names none".into(),
        )
        .into());
    };
    if ctx.pr_closed {
        println!("pull request #{pr} closed: the receiver stops its previews on GitHub's webhook");
        return Ok(());
    }
    if truthy(input("PROMOTE"), false).map_err(|e| Failure::Usage(format!("input `promote`: {e}")))? {
        return Err(Failure::Usage(
            "a pull_request_target run only previews a fork's pull request; leave the input `promote` out".into(),
        )
        .into());
    }
    let (binary, server_target) = binary_from_inputs(&target.server, input("BINARY"), input("BUILD"), m).await?;
    let client = Client::for_push(target).await?;
    let job = Job {
        path: &binary,
        app,
        meta: push_meta(&input, m, ctx, &binary)?,
        verify: true,
        promote: false,
        quiet: false,
        manifest: None,
        fork_preview: true,
        target: server_target,
    };
    report(&client, job, ctx, env).await
}

/// A pull request from a fork gets no preview: GitHub gives its workflows
/// neither the repository's secrets nor an OIDC token (a fork's code must not
/// push under the repository's name), so there is nothing to push with. The
/// step says so and succeeds rather than failing for want of a key; the
/// receiver still closes previews on GitHub's webhook.
fn skip_fork(app: &AppName, pr: u64, fork: &str, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let why = format!(
        "No preview for pull request #{pr}: it comes from the fork {fork}, and GitHub gives workflows of forks \
         neither secrets nor an OIDC token. Where the app previews forks by label (`[preview] forks = \"label\"`), \
         someone with write access adds the label (default `nx-preview`) once they have read the commit; or a \
         maintainer pushes its head with `nx push --pr {pr}`."
    );
    println!("::notice title=NX Sandbox: no preview for a fork::{}", escape_command(&why));
    if let Some(path) = env("GITHUB_STEP_SUMMARY") {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
        writeln!(f, "### NX Sandbox: {app}\n\n{why}\n")?;
    }
    Ok(())
}

/// A closed pull request: its previews stop (and their own databases go).
async fn close_previews(
    client: &Client,
    app: &AppName,
    pr: u64,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let closed: ClosedPull = client.post(&format!("/v1/apps/{app}/pulls/{pr}/close"), &serde_json::json!({})).await?;
    let ids: Vec<String> = closed.stopped.iter().map(ToString::to_string).collect();
    println!("pull request #{pr} closed: stopped {} preview(s) of {app} {}", ids.len(), ids.join(" "));
    if let Some(path) = env("GITHUB_STEP_SUMMARY") {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
        writeln!(f, "### NX Sandbox: {app}\n\nPull request #{pr} closed; previews stopped: {}\n", ids.len())?;
    }
    Ok(())
}

pub async fn run(g: &Global) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let result = push_from_inputs(g, &env).await;
    if let Err(e) = &result {
        println!("::error title=NX Sandbox push failed::{}", escape_command(&format!("{e:#}")));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_line_cannot_close_the_summary_code_block() {
        let lines = vec!["```".to_owned(), "![x](https://evil.example/)".to_owned(), "ok ````` \u{1b}[2J".to_owned()];
        let block = code_block(&lines);
        let fence = "``````";
        assert!(block.starts_with(&format!("{fence}text\n")), "{block}");
        assert!(block.ends_with(&format!("\n{fence}\n")), "{block}");
        // Inside, no line is a fence at least as long as the opening one.
        let inner: Vec<_> = block.lines().skip(1).collect();
        assert_eq!(inner.iter().filter(|l| l.trim_start().starts_with(fence)).count(), 1, "only the closing fence");
        assert!(block.contains("ok ````` \\x1b[2J"), "escape shown, not acted on: {block}");
        assert_eq!(code_block(&["plain".to_owned()]), "```text\nplain\n```\n");
    }

    #[test]
    fn commands_escape_newlines_and_percent() {
        assert_eq!(escape_command("50% done\nnext"), "50%25 done%0Anext");
    }

    #[test]
    fn pull_request_events_give_the_head_commit() {
        let dir = std::env::temp_dir().join(format!("nx-gh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let event = dir.join("event.json");
        std::fs::write(
            &event,
            r#"{"pull_request":{"number":7,"head":{"sha":"abc123","ref":"feature"}},"repository":{"full_name":"o/r","id":42}}"#,
        )
        .unwrap();
        let vars: Vec<(String, String)> = vec![
            ("GITHUB_EVENT_PATH".into(), event.display().to_string()),
            ("GITHUB_SHA".into(), "mergecommit".into()),
            ("GITHUB_REPOSITORY".into(), "o/r".into()),
        ];
        let env = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let ctx = RunContext::from_env(&env).unwrap();
        assert_eq!(
            ctx,
            RunContext {
                repository: Some("o/r".into()),
                repository_id: Some(42),
                sha: Some("abc123".into()),
                git_ref: Some("feature".into()),
                pr: Some(7),
                event: None,
                default_branch: None,
                pr_closed: false,
                fork: None,
            }
        );
        std::fs::write(
            &event,
            r#"{"pull_request":{"number":8,"head":{"sha":"d","repo":{"full_name":"mallory/r"}},"base":{"repo":{"full_name":"o/r"}}}}"#,
        )
        .unwrap();
        assert_eq!(RunContext::from_env(&env).unwrap().fork.as_deref(), Some("mallory/r"));
        std::fs::write(
            &event,
            r#"{"pull_request":{"number":8,"head":{"repo":null},"base":{"repo":{"full_name":"o/r"}}}}"#,
        )
        .unwrap();
        assert_eq!(RunContext::from_env(&env).unwrap().fork.as_deref(), Some("a deleted fork"));
    }

    #[test]
    fn push_rules_promote_pushes_to_the_production_branch_only() {
        let push = |git_ref: &str| RunContext {
            git_ref: Some(git_ref.into()),
            event: Some("push".into()),
            default_branch: Some("main".into()),
            ..RunContext::default()
        };
        assert!(push("main").promotes(PromoteOn::Push, None));
        assert!(!push("feature").promotes(PromoteOn::Push, None));
        let pr = RunContext { pr: Some(3), event: Some("pull_request".into()), ..push("main") };
        assert!(!pr.promotes(PromoteOn::Push, None), "pull requests get previews, never production");
        assert!(push("release").promotes(PromoteOn::Push, Some("release")));
        assert!(!push("main").promotes(PromoteOn::Push, Some("release")));
        for on in [PromoteOn::Manual, PromoteOn::Merge, PromoteOn::Approval] {
            assert!(!push("main").promotes(on, None), "{on:?} is not the action's");
        }
    }

    #[test]
    fn outputs_use_heredocs_for_multiline_values() {
        let dir = std::env::temp_dir().join(format!("nx-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        write_outputs(&out, &[("a", "1".into()), ("b", "x\ny".into())]).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("a=1\nb<<NX_EOF_"), "{text}");
        assert!(text.contains("\nx\ny\nNX_EOF_"), "{text}");
    }

    #[test]
    fn booleans_are_strict() {
        assert!(truthy(Some("true".into()), false).unwrap());
        assert!(!truthy(None, false).unwrap());
        assert!(truthy(Some("yes".into()), false).is_err());
    }
}
