//! Which repository an app is built from. The link is a fact, not a claim:
//! the admin makes it (`nx apps set APP --github-repo owner/name` or
//! `--github-trust owner/name...`, or an admin-signed push from the GitHub
//! Action to an unlinked app), and a push proved by a GitHub Actions OIDC
//! token pins the repository's id and its owner's id and follows a rename.
//! The platform reports to that repository with its own GitHub identity, so
//! a deploy key, which anyone with the repository's secrets holds, must not
//! choose it: what a deploy key's push says of its repository can only match
//! the link, never set it or its id. A push from another repository is
//! refused until the link is changed.

use nx_protocol::api::{GitHubLink, PushMeta, VerifiedGitHub};

use crate::db::{AppRow, Db};
use crate::deploy::DeployError;

/// Refuses a push that would link an unlinked app to a repository unless the
/// caller may link apps (the admin).
pub fn may_link(app: &AppRow, meta: &PushMeta, caller_may_link: bool) -> Result<(), String> {
    match (&app.settings.github, &meta.repository) {
        (None, Some(name)) if !caller_may_link => Err(format!(
            "app {0} is not linked to a GitHub repository and a deploy key may not link it to {name}: \
             the admin links it with `nx apps set {0} --github-repo {name}`",
            app.name
        )),
        _ => Ok(()),
    }
}

/// Makes a push proved by an OIDC token say what the token proved: its
/// repository is the token's, and the commit or pull request it names must
/// be the one the token was issued for.
pub fn bind(meta: &mut PushMeta, proved: &VerifiedGitHub) -> Result<(), String> {
    meta.repository = Some(proved.repository.clone());
    meta.repository_id = Some(proved.repository_id);
    let pull = proved.git_ref.strip_prefix("refs/pull/").and_then(|r| r.split('/').next()?.parse::<u64>().ok());
    match (meta.pr, pull) {
        // A pull request's run builds its head commit; the token names the
        // merge commit GitHub made for it, so the pull request is what binds.
        (Some(pr), Some(proved_pr)) if pr == proved_pr => Ok(()),
        (Some(pr), _) => Err(format!(
            "the push is for pull request #{pr}, but the GitHub OIDC token was issued for {}",
            proved.git_ref
        )),
        (None, _) => match &meta.git_sha {
            Some(sha) if !sha.eq_ignore_ascii_case(&proved.sha) => Err(format!(
                "the push is for commit {sha}, but the GitHub OIDC token was issued for commit {}",
                proved.sha
            )),
            _ => {
                meta.git_sha = Some(proved.sha.clone());
                Ok(())
            }
        },
    }
}

/// Why a fork preview's push (a `pull_request_target` run's token) was
/// refused; the text is the 403 answer.
#[derive(Debug, thiserror::Error)]
pub enum ForkPushRefused {
    #[error(
        "a pull_request_target run's OIDC token pushes only a preview of a fork's pull request, and this push names \
         no pull request; production is deployed by runs of the production branch"
    )]
    NoPullRequest,
    #[error(
        "a pull_request_target run's OIDC token pushes only the labeled head commit of a fork's pull request, and \
         this push for #{pr} names no commit (a 40-digit sha)"
    )]
    NoCommit { pr: u64 },
    #[error(
        "pull request #{pr} at commit {sha} is not labeled {label:?} for a preview of app {app}: someone with write \
         access to the repository adds that label once they have read the commit; a commit pushed after the label \
         needs it again (remove it and add it), and a label added seconds ago may not have reached the receiver yet \
         (re-run the job)"
    )]
    NotLabeled { app: String, pr: u64, sha: String, label: String },
    #[error(
        "the label {label:?} on commit {sha} of pull request #{pr} was added by @{by}, who has {permission} \
         permission on {repository}: only a label from someone with write, maintain or admin permission opts a \
         fork's pull request in"
    )]
    LabeledBy { pr: u64, sha: String, label: String, by: String, permission: String, repository: String },
    #[error(
        "the label {label:?} on commit {sha} of pull request #{pr} was added by @{by}, and this run was started by \
         @{actor}: only the run the label started pushes its preview; to preview again, remove the label and add it"
    )]
    OtherActor { pr: u64, sha: String, label: String, by: String, actor: String },
    #[error(
        "the label {label:?} on commit {sha} of pull request #{pr} has served its push already: each label previews \
         once; to preview again, remove the label and add it"
    )]
    Used { pr: u64, sha: String, label: String },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Makes a fork preview's push (proved by a `pull_request_target` run's
/// token, whose claims name the base branch, not the pull request) what it
/// may be: a preview of the pull request and head commit it names, which
/// someone with write access labeled for this app, pushed by the run that
/// label started (the token's actor is the labeler), once. Its repository is
/// the token's.
pub async fn bind_fork(
    db: &Db,
    app: &AppRow,
    meta: &mut PushMeta,
    proved: &VerifiedGitHub,
) -> Result<(), ForkPushRefused> {
    let pr = meta.pr.ok_or(ForkPushRefused::NoPullRequest)?;
    let sha = meta
        .git_sha
        .clone()
        .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(ForkPushRefused::NoCommit { pr })?
        .to_ascii_lowercase();
    let label = app.settings.fork_label().to_owned();
    let pr_number = i64::try_from(pr).map_err(|_| ForkPushRefused::NoPullRequest)?;
    match db.fork_label(app.id, pr_number, &sha).await? {
        None => return Err(ForkPushRefused::NotLabeled { app: app.name.clone(), pr, sha, label }),
        Some(l) if !l.allowed => {
            return Err(ForkPushRefused::LabeledBy {
                pr,
                sha,
                label,
                by: l.labeled_by,
                permission: l.permission,
                repository: proved.repository.clone(),
            })
        }
        Some(l) if !l.labeled_by.eq_ignore_ascii_case(&proved.actor) => {
            // The token names no pull request: what ties it to the label is
            // that the labeler started its run, as a `labeled` event does.
            return Err(ForkPushRefused::OtherActor { pr, sha, label, by: l.labeled_by, actor: proved.actor.clone() });
        }
        Some(_) => {
            if !db.use_fork_label(app.id, pr_number, &sha).await? {
                return Err(ForkPushRefused::Used { pr, sha, label });
            }
        }
    }
    meta.git_sha = Some(sha);
    meta.repository = Some(proved.repository.clone());
    meta.repository_id = Some(proved.repository_id);
    Ok(())
}

/// Checks the push's repository against the app's link. A push proved by an
/// OIDC token (`proved`) pins the link's ids and takes the repository's
/// current name. The admin's push (`caller_may_link`) may link an unlinked
/// app, or learn the id of a link made by name unless the app trusts
/// workflows: there only a proved push sets what the trust compares. What
/// any other push says (a deploy key's, an upload's) is a claim: it must
/// match the link, and sets nothing.
pub async fn check_push(
    db: &Db,
    app: &AppRow,
    meta: &PushMeta,
    proved: Option<&VerifiedGitHub>,
    caller_may_link: bool,
    actor: &str,
) -> Result<(), DeployError> {
    if let Some(proved) = proved {
        let linked = app.settings.github.as_ref();
        let known = linked.is_some_and(|l| {
            l.repository == proved.repository
                && l.id == Some(proved.repository_id)
                && l.owner_id == Some(proved.repository_owner_id)
        });
        if !known {
            // Only the identity: the trust is the admin's, who may be changing it now.
            db.pin_repository(app.id, proved).await?;
            record(db, app, &proved.repository, Some(proved.repository_id), Some(proved.repository_owner_id), actor)
                .await?;
        }
        return Ok(());
    }
    let (Some(name), Some(id)) = (&meta.repository, meta.repository_id) else { return Ok(()) };
    let learned = match &app.settings.github {
        None if caller_may_link => GitHubLink { repository: name.clone(), id: Some(id), owner_id: None, trust: None },
        // An upload's claim (a deploy key's is refused by `may_link` first).
        None => return Ok(()),
        Some(GitHubLink { id: Some(linked), .. }) if *linked == id => return Ok(()),
        Some(link @ GitHubLink { repository, id: None, trust: None, .. })
            if caller_may_link && repository.eq_ignore_ascii_case(name) =>
        {
            GitHubLink { id: Some(id), ..link.clone() }
        }
        // Its name matches, and its id is not known: the push deploys, but
        // its claim neither sets the id nor makes the platform report there
        // (reports go to a link's id; see github::report).
        Some(GitHubLink { repository, id: None, .. }) if repository.eq_ignore_ascii_case(name) => return Ok(()),
        Some(GitHubLink { repository, .. }) => {
            return Err(DeployError::Invalid(format!(
                "app {} is linked to the GitHub repository {repository}, but this push comes from {name}; \
                 if that is right, link it with `nx apps set {} --github-repo {name}`",
                app.name, app.name
            )))
        }
    };
    learn(db, app, learned, actor).await
}

async fn learn(db: &Db, app: &AppRow, link: GitHubLink, actor: &str) -> Result<(), DeployError> {
    db.link_repository(app.id, &link).await?;
    record(db, app, &link.repository, link.id, link.owner_id, actor).await
}

/// The audit event and log line of a link learned from a push.
async fn record(
    db: &Db,
    app: &AppRow,
    repository: &str,
    id: Option<u64>,
    owner_id: Option<u64>,
    actor: &str,
) -> Result<(), DeployError> {
    let was = app.settings.github.as_ref().map(|l| l.repository.as_str());
    db.event(
        Some(&app.name),
        None,
        "github.link",
        actor,
        serde_json::json!({ "repository": repository, "id": id, "owner_id": owner_id, "was": was }),
    )
    .await?;
    tracing::info!(app = %app.name, repository, ?id, "app linked to its GitHub repository");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proved(git_ref: &str) -> VerifiedGitHub {
        VerifiedGitHub {
            repository: "acme/web".into(),
            repository_id: 42,
            repository_owner_id: 7,
            git_ref: git_ref.into(),
            sha: "b".repeat(40),
            workflow_ref: "acme/web/.github/workflows/deploy.yml@refs/heads/main".into(),
            event_name: "push".into(),
            actor: "octocat".into(),
        }
    }

    #[test]
    fn a_proved_push_names_the_proved_repository_commit_and_pull_request() {
        let mut meta =
            PushMeta { repository: Some("victim/repo".into()), repository_id: Some(1), ..PushMeta::default() };
        bind(&mut meta, &proved("refs/heads/main")).unwrap();
        assert_eq!((meta.repository.as_deref(), meta.repository_id), (Some("acme/web"), Some(42)));
        assert_eq!(meta.git_sha, Some("b".repeat(40)));

        let mut other_commit = PushMeta { git_sha: Some("c".repeat(40)), ..PushMeta::default() };
        let refused = bind(&mut other_commit, &proved("refs/heads/main")).unwrap_err();
        assert!(refused.contains("issued for commit bbbb"), "{refused}");

        let mut pr = PushMeta { pr: Some(7), git_sha: Some("c".repeat(40)), ..PushMeta::default() };
        assert_eq!(bind(&mut pr, &proved("refs/pull/7/merge")), Ok(()));
        assert_eq!(pr.git_sha, Some("c".repeat(40)), "a pull request's head commit is kept");
        let mut other_pr = PushMeta { pr: Some(8), ..PushMeta::default() };
        assert_eq!(
            bind(&mut other_pr, &proved("refs/pull/7/merge")),
            Err("the push is for pull request #8, but the GitHub OIDC token was issued for refs/pull/7/merge".into())
        );
    }
}
