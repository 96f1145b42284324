//! Which repository an app is built from. The link is the admin's to make
//! (`nx apps set APP --github-repo owner/name`, or an admin-signed push from
//! the GitHub Action to an unlinked app): the platform reports to that
//! repository with its own GitHub identity, so a deploy key, which anyone
//! with the repository's secrets holds, must not choose it. A push from
//! another repository is refused until the link is changed.

use nx_protocol::api::{GitHubLink, PushMeta};

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

/// Checks the push's repository against the app's link, linking an unlinked
/// app (or learning the id of a link made by name).
pub async fn check_push(db: &Db, app: &AppRow, meta: &PushMeta, actor: &str) -> Result<(), DeployError> {
    let (Some(name), Some(id)) = (&meta.repository, meta.repository_id) else { return Ok(()) };
    let learned = match &app.settings.github {
        None => GitHubLink { repository: name.clone(), id: Some(id) },
        Some(GitHubLink { id: Some(linked), .. }) if *linked == id => return Ok(()),
        Some(GitHubLink { repository, id: None }) if repository.eq_ignore_ascii_case(name) => {
            GitHubLink { repository: repository.clone(), id: Some(id) }
        }
        Some(GitHubLink { repository, .. }) => {
            return Err(DeployError::Invalid(format!(
                "app {} is linked to the GitHub repository {repository}, but this push comes from {name}; \
                 if that is right, link it with `nx apps set {} --github-repo {name}`",
                app.name, app.name
            )))
        }
    };
    db.link_repository(app.id, &learned).await?;
    db.event(Some(&app.name), None, "github.link", actor, serde_json::json!({ "repository": name, "id": id })).await?;
    tracing::info!(app = %app.name, repository = %name, id, "app linked to its GitHub repository");
    Ok(())
}
