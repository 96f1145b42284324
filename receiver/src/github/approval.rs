//! Who may promote from GitHub. A webhook proves only that GitHub sent it,
//! not that its sender may change production: on a public repository anyone
//! can approve a pull request or click a check run's button. So GitHub is
//! asked (`GET /repos/{owner}/{repo}/collaborators/{username}/permission`)
//! and only write, maintain or admin counts; an approval counts only on the
//! commit that was previewed last, from someone other than the pull
//! request's author (unless the app's rule allows it), and the app's rule
//! may ask for several approvers and for named users or teams among them.

use std::collections::BTreeSet;

use nx_protocol::api::ApprovalRule;
use serde_json::Value;

use super::client::{CallError, Client, Method};
use crate::db::Db;

/// The permissions that may promote. `permission` is GitHub's legacy base
/// role: `maintain` and write-based custom roles answer `write`.
pub fn may_promote(permission: &str) -> bool {
    matches!(permission, "admin" | "maintain" | "write")
}

/// An approving review, as its webhook tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    pub id: i64,
    pub pr: i64,
    pub reviewer: String,
    pub commit_id: String,
    /// The pull request's author.
    pub author: String,
}

/// Whether an approval promotes, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Promotes,
    DoesNotCount(String),
}

/// Asks GitHub about the people of one repository.
#[derive(Debug)]
pub struct Access<'a> {
    pub client: &'a Client,
    pub db: &'a Db,
    /// `owner/name`, as the app's link names it.
    pub repository: &'a str,
    pub repository_id: i64,
}

/// Why GitHub could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot ask GitHub about {repository}: {source}")]
    GitHub {
        repository: String,
        #[source]
        source: CallError,
    },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl Access<'_> {
    async fn get(&self, route: String) -> Result<Option<Value>, AccessError> {
        match self.client.call(self.repository, Method::Get, &route, None).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(source) => Err(AccessError::GitHub { repository: self.repository.to_owned(), source }),
        }
    }

    /// `login`'s permission on the repository (`admin`, `write`, `read`,
    /// `none`); one who is not a collaborator (404) has `none`.
    pub async fn permission(&self, login: &str) -> Result<String, AccessError> {
        let answer = self.get(format!("/repos/{}/collaborators/{login}/permission", self.repository)).await?;
        Ok(answer.and_then(|v| v["permission"].as_str().map(str::to_owned)).unwrap_or_else(|| "none".into()))
    }

    /// The permission of a review's author, asked once per review.
    async fn reviewer_permission(&self, review: i64, login: &str) -> Result<String, AccessError> {
        if let Some(known) = self.db.review_permission(review).await? {
            return Ok(known);
        }
        let permission = self.permission(login).await?;
        self.db.save_review_permission(review, self.repository_id, login, &permission).await?;
        Ok(permission)
    }

    /// Whether `login` is an active member of the team `org/slug`.
    async fn in_team(&self, org: &str, slug: &str, login: &str) -> Result<bool, AccessError> {
        let answer = self.get(format!("/orgs/{org}/teams/{slug}/memberships/{login}")).await?;
        Ok(answer.is_some_and(|v| v["state"] == "active"))
    }

    /// Whether `review`, an approval of a pull request whose last preview
    /// was of commit `previewed`, promotes under `rule`.
    pub async fn judge(&self, rule: &ApprovalRule, review: &Review, previewed: &str) -> Result<Verdict, AccessError> {
        let no = |why: String| Ok(Verdict::DoesNotCount(why));
        if review.commit_id != previewed {
            return no(format!(
                "the approval of @{} is on commit {}, but the commit last previewed on #{} is {}; approve that one",
                review.reviewer,
                short(&review.commit_id),
                review.pr,
                short(previewed)
            ));
        }
        if !rule.allow_author && review.reviewer.eq_ignore_ascii_case(&review.author) {
            return no(format!(
                "@{} opened #{}: an author's own approval does not count (`[promote] allow_author`)",
                review.reviewer, review.pr
            ));
        }
        let permission = self.reviewer_permission(review.id, &review.reviewer).await?;
        if !may_promote(&permission) {
            return no(format!(
                "@{} has {permission} permission on {}: only approvals from write, maintain or admin count",
                review.reviewer, self.repository
            ));
        }
        if rule.approvals <= 1 && rule.reviewers.is_empty() {
            return Ok(Verdict::Promotes);
        }
        let approvers = self.approvers(rule, review, previewed).await?;
        let listed = approvers.iter().map(|a| format!("@{a}")).collect::<Vec<_>>().join(", ");
        if approvers.len() < rule.approvals as usize {
            return no(format!(
                "{} of {} approvals on {} so far ({listed}); `[promote] approvals` asks for {}",
                approvers.len(),
                rule.approvals,
                short(previewed),
                rule.approvals
            ));
        }
        for required in &rule.reviewers {
            let met = match required.strip_prefix('@').and_then(|t| t.split_once('/')) {
                Some((org, slug)) => {
                    let mut found = false;
                    for a in &approvers {
                        if self.in_team(org, slug, a).await? {
                            found = true;
                            break;
                        }
                    }
                    found
                }
                None => approvers.contains(&required.to_lowercase()),
            };
            if !met {
                return no(format!(
                    "`[promote] reviewers` asks for an approval of {} from {required}; so far {listed}",
                    short(previewed)
                ));
            }
        }
        Ok(Verdict::Promotes)
    }

    /// The distinct people (logins in lower case) whose latest review of the
    /// pull request approves `previewed` and counts.
    async fn approvers(
        &self,
        rule: &ApprovalRule,
        review: &Review,
        previewed: &str,
    ) -> Result<BTreeSet<String>, AccessError> {
        let route = format!("/repos/{}/pulls/{}/reviews?per_page=100", self.repository, review.pr);
        let listed = self.get(route).await?.unwrap_or_default();
        // Chronological: a later review of the same person replaces an earlier one.
        let mut latest = std::collections::BTreeMap::new();
        for r in listed.as_array().into_iter().flatten() {
            let (Some(id), Some(login)) = (r["id"].as_i64(), r["user"]["login"].as_str()) else { continue };
            let state = r["state"].as_str().unwrap_or_default().to_uppercase();
            // Comments neither approve nor withdraw an approval.
            if state != "COMMENTED" {
                latest.insert(login.to_lowercase(), (id, login.to_owned(), state, r["commit_id"].clone()));
            }
        }
        // The review in hand counts even if the list does not show it yet.
        latest.entry(review.reviewer.to_lowercase()).or_insert((
            review.id,
            review.reviewer.clone(),
            "APPROVED".into(),
            review.commit_id.clone().into(),
        ));
        let mut approvers = BTreeSet::new();
        for (key, (id, login, state, commit)) in latest {
            let counts = state == "APPROVED"
                && commit == previewed
                && (rule.allow_author || !login.eq_ignore_ascii_case(&review.author))
                && may_promote(&self.reviewer_permission(id, &login).await?);
            if counts {
                approvers.insert(key);
            }
        }
        Ok(approvers)
    }
}

/// A commit id as people read it.
fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_write_maintain_and_admin_may_promote() {
        for p in ["admin", "maintain", "write"] {
            assert!(may_promote(p), "{p}");
        }
        for p in ["read", "triage", "none", "", "Admin", "write "] {
            assert!(!may_promote(p), "{p:?}");
        }
    }
}
