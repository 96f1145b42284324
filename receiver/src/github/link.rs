//! Which repository an app is built from. The first push from the GitHub
//! Action links an app that has no repository yet (the deploy key already
//! lets its holder deploy anything, so linking grants nothing more); a push
//! from another repository is refused until the link is changed by hand.

use nx_protocol::api::{GitHubLink, PushMeta};

use crate::db::{AppRow, Db};
use crate::deploy::DeployError;

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
