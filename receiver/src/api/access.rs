//! Who may do what: the authorization model of the API, in one place.
//!
//! Every signed route is declared with the [`Action`] it performs (see
//! `api::signed_routes!`), and the route's guard asks [`decide`] before the
//! handler runs, so a route cannot be added without saying who may call it.
//! [`decide`] is a pure function of the caller's [`Role`], the action and the
//! app named in the path; ARCHITECTURE.md's table is this function, and the
//! end-to-end suite walks every route with every kind of key against it.

use std::fmt;

/// What a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The admin token: every action on every app.
    Admin,
    /// A deploy key: ships and reads its own app, nothing else.
    Deploy { app_id: i64, app: String },
    /// A read-only key for dashboards and monitoring: reads every app, changes
    /// nothing, and sees no secret (database credentials, dumps).
    ReadOnly,
    /// A GitHub Actions run whose OIDC token the app's trust policy accepts
    /// (`nx apps set APP --github-trust`): less than a deploy key, for one
    /// app, for the minutes the token lives.
    Workflow { app_id: i64, app: String },
    /// A `pull_request_target` run's OIDC token, for an app that previews
    /// forks' pull requests by label (`[preview] forks = "label"`): such a
    /// run may execute a fork's code, so it may push a preview of the one
    /// commit a maintainer labeled (checked by the push) and nothing else.
    ForkPreview { app_id: i64, app: String },
}

impl Role {
    /// The name of the role, as `nx keys ls` shows it and the `keys` table stores it.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deploy { .. } => "deploy",
            Role::ReadOnly => "read",
            Role::Workflow { .. } => "github-oidc",
            Role::ForkPreview { .. } => "github-oidc-fork",
        }
    }
}

/// What a request does. Each signed route performs exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `GET /v1/status`: what the caller may see of the server.
    Status,
    /// `GET /v1/apps`: the apps the caller may see.
    ListApps,
    /// Create an app.
    CreateApp,
    /// An app's settings, deployments, logs and variable names (never values).
    ReadApp,
    /// An app's deploy and SSH keys, without secrets.
    ReadKeys,
    /// Push a binary (`POST /v1/apps/{app}/deployments`): a deployment, or a
    /// pull request's preview.
    Push,
    /// Promote, roll back and stop deployments; close a pull request's previews.
    Deploy,
    /// Set and unset an app's variables.
    SetEnv,
    /// Change an app's settings: health check, default arguments, preview
    /// database, promotion rule; raising limits and linking a repository are
    /// further kept to the admin by the settings handler (see `apps::settings`).
    Configure,
    /// Mint, rotate and revoke an app's deploy keys and SSH keys.
    ManageKeys,
    /// Link the app to a GitHub repository and say which of its workflows
    /// may push with their OIDC token: the platform reports there with its
    /// own identity, and those workflows need no key.
    LinkRepository,
    /// Attach, verify and remove the app's custom domains: a name serves
    /// the public, takes it from every other app, and spends the platform's
    /// ACME account (whose rate limits all apps share).
    Domains,
    /// Add and remove the app's log drains (listing them is ReadApp: their
    /// URLs are shown masked). A drain ships what the app's key may read
    /// already (its logs, events and access lines), to an address the
    /// receiver checks (no loopback or private network), so the deploy key
    /// may manage its own app's.
    Drains,
    /// The app's database: credentials, dumps, restores, backups.
    Database,
    /// Remove an app and everything it has.
    RemoveApp,
    /// The platform itself: the admin token, read-only keys, the router.
    Platform,
}

impl Action {
    /// Every action, for the tables that list them.
    pub const ALL: [Action; 16] = [
        Action::Status,
        Action::ListApps,
        Action::CreateApp,
        Action::ReadApp,
        Action::ReadKeys,
        Action::Push,
        Action::Deploy,
        Action::SetEnv,
        Action::Configure,
        Action::ManageKeys,
        Action::LinkRepository,
        Action::Domains,
        Action::Drains,
        Action::Database,
        Action::RemoveApp,
        Action::Platform,
    ];

    /// Whether the action is on one app, named by `/v1/apps/{app}/...`.
    pub fn app_scoped(self) -> bool {
        !matches!(self, Action::Status | Action::ListApps | Action::CreateApp | Action::Platform)
    }
}

/// Why a request was refused; its text is the 403 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the key {key} belongs to app '{own}' and cannot act on app '{app}'; use that app's deploy key")]
    OtherApp { key: String, own: String, app: String },
    #[error(
        "this needs the admin token; the deploy key {key} of app '{own}' may push, promote, roll back and stop its \
         deployments, read its status and logs, set its variables, settings and log drains, nothing else"
    )]
    DeployKey { key: String, own: String },
    #[error(
        "the key {key} is read-only: it may read status, apps, deployments and logs, and change nothing; \
         use a deploy key or the admin token"
    )]
    ReadOnly { key: String },
    #[error(
        "a GitHub workflow's OIDC token may push to the app that trusts its repository (named with --app), read \
         its deployments and apply its nx.toml settings, nothing else; use the app's deploy key or the admin token"
    )]
    Workflow,
    #[error("this GitHub workflow's OIDC token is for app '{own}' and cannot act on app '{app}'")]
    WorkflowOtherApp { own: String, app: String },
    #[error(
        "a pull_request_target run's OIDC token may only push a preview of the head commit of a fork's pull request \
         that a maintainer labeled, to the app that previews it; it cannot promote, roll back, stop, configure, read \
         the app or its database, or act on another app"
    )]
    ForkPreview,
}

/// Whether `role` (holding key `key`) may perform `action` on `app` (the app
/// named in the path, empty for platform routes).
pub fn decide(role: &Role, key: &str, action: Action, app: &str) -> Result<(), Denied> {
    match role {
        Role::Admin => Ok(()),
        Role::Deploy { app: own, .. } => {
            let allowed = matches!(
                action,
                Action::Status
                    | Action::ListApps
                    | Action::ReadApp
                    | Action::Push
                    | Action::Deploy
                    | Action::SetEnv
                    | Action::Configure
                    | Action::Drains
            );
            if !allowed {
                return Err(Denied::DeployKey { key: key.to_owned(), own: own.clone() });
            }
            if action.app_scoped() && app != own {
                return Err(Denied::OtherApp { key: key.to_owned(), own: own.clone(), app: app.to_owned() });
            }
            Ok(())
        }
        Role::ReadOnly => match action {
            Action::Status | Action::ListApps | Action::ReadApp | Action::ReadKeys => Ok(()),
            _ => Err(Denied::ReadOnly { key: key.to_owned() }),
        },
        // What the push of a workflow needs, on its one app: read the app,
        // apply nx.toml (Configure, with a deploy key's bounds), push and
        // promote. No variables (they hold the secrets the workflow should not
        // need), no other app, and no app-less route: the token names no app.
        Role::Workflow { app: own, .. } => {
            if !matches!(action, Action::ReadApp | Action::Push | Action::Deploy | Action::Configure) {
                return Err(Denied::Workflow);
            }
            if app != own {
                return Err(Denied::WorkflowOtherApp { own: own.clone(), app: app.to_owned() });
            }
            Ok(())
        }
        // A fork's code may run in the job that holds this token: it pushes
        // (the push handler holds it to the labeled commit), and that is all.
        Role::ForkPreview { app: own, .. } => match action {
            Action::Push if app == own => Ok(()),
            _ => Err(Denied::ForkPreview),
        },
    }
}

/// Whether `role` may see that `app` exists (in lists, counts and "did you
/// mean" suggestions).
pub fn sees(role: &Role, app: &str) -> bool {
    match role {
        Role::Admin | Role::ReadOnly => true,
        Role::Deploy { app: own, .. } | Role::Workflow { app: own, .. } | Role::ForkPreview { app: own, .. } => {
            own == app
        }
    }
}

/// The table of who may do what, as ARCHITECTURE.md shows it.
#[derive(Debug)]
pub struct Table;

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let own = Role::Deploy { app_id: 0, app: "own".into() };
        let workflow = Role::Workflow { app_id: 0, app: "own".into() };
        let fork = Role::ForkPreview { app_id: 0, app: "own".into() };
        let cell = |role: &Role, action: Action| -> &'static str {
            match (
                decide(role, "k", action, "own").is_ok(),
                action.app_scoped() && decide(role, "k", action, "other").is_ok(),
            ) {
                (true, true) => "any app",
                (true, false) if action.app_scoped() => "own app",
                (true, false) => "yes",
                (false, _) => "no",
            }
        };
        writeln!(
            f,
            "| action | admin token | deploy key | read-only key | GitHub workflow (OIDC) | fork preview (OIDC, labeled) |"
        )?;
        writeln!(f, "| --- | --- | --- | --- | --- | --- |")?;
        for action in Action::ALL {
            writeln!(
                f,
                "| {action:?} | {} | {} | {} | {} | {} |",
                cell(&Role::Admin, action),
                cell(&own, action),
                cell(&Role::ReadOnly, action),
                cell(&workflow, action),
                cell(&fork, action)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy() -> Role {
        Role::Deploy { app_id: 1, app: "web".into() }
    }

    #[test]
    fn admin_may_do_everything() {
        for action in Action::ALL {
            assert_eq!(decide(&Role::Admin, "admin", action, "web"), Ok(()), "{action:?}");
        }
    }

    #[test]
    fn a_deploy_key_ships_its_own_app_and_nothing_else() {
        let allowed = [
            Action::Status,
            Action::ListApps,
            Action::ReadApp,
            Action::Push,
            Action::Deploy,
            Action::SetEnv,
            Action::Configure,
            Action::Drains,
        ];
        for action in Action::ALL {
            let own = decide(&deploy(), "k1", action, "web");
            assert_eq!(own.is_ok(), allowed.contains(&action), "{action:?} on its own app");
            if action.app_scoped() {
                let other = decide(&deploy(), "k1", action, "site").unwrap_err();
                let expected = if allowed.contains(&action) {
                    Denied::OtherApp { key: "k1".into(), own: "web".into(), app: "site".into() }
                } else {
                    Denied::DeployKey { key: "k1".into(), own: "web".into() }
                };
                assert_eq!(other, expected, "{action:?} on another app");
            }
        }
    }

    #[test]
    fn a_deploy_key_mints_no_keys_and_reads_no_database() {
        for action in [
            Action::ManageKeys,
            Action::ReadKeys,
            Action::LinkRepository,
            Action::Domains,
            Action::Database,
            Action::CreateApp,
            Action::RemoveApp,
            Action::Platform,
        ] {
            assert!(matches!(decide(&deploy(), "k1", action, "web"), Err(Denied::DeployKey { .. })), "{action:?}");
        }
    }

    #[test]
    fn a_read_only_key_reads_and_changes_nothing() {
        for action in Action::ALL {
            let reads = matches!(action, Action::Status | Action::ListApps | Action::ReadApp | Action::ReadKeys);
            assert_eq!(decide(&Role::ReadOnly, "r1", action, "web").is_ok(), reads, "{action:?}");
        }
    }

    #[test]
    fn a_workflow_pushes_to_its_own_app_and_does_nothing_else() {
        let workflow = Role::Workflow { app_id: 1, app: "web".into() };
        let allowed = [Action::ReadApp, Action::Push, Action::Deploy, Action::Configure];
        for action in Action::ALL {
            let own = decide(&workflow, "github-oidc", action, "web");
            if allowed.contains(&action) {
                assert_eq!(own, Ok(()), "{action:?}");
                assert_eq!(
                    decide(&workflow, "github-oidc", action, "site"),
                    Err(Denied::WorkflowOtherApp { own: "web".into(), app: "site".into() }),
                    "{action:?} on another app"
                );
            } else {
                assert_eq!(own, Err(Denied::Workflow), "{action:?}");
            }
        }
    }

    #[test]
    fn a_fork_preview_pushes_to_its_own_app_and_does_nothing_else() {
        let fork = Role::ForkPreview { app_id: 1, app: "web".into() };
        for action in Action::ALL {
            let expected = match action {
                Action::Push => Ok(()),
                _ => Err(Denied::ForkPreview),
            };
            assert_eq!(decide(&fork, "github-oidc", action, "web"), expected, "{action:?}");
        }
        assert_eq!(decide(&fork, "github-oidc", Action::Push, "site"), Err(Denied::ForkPreview));
        assert!(!sees(&fork, "site"));
    }

    #[test]
    fn only_the_admin_attaches_domains() {
        assert_eq!(decide(&Role::Admin, "admin", Action::Domains, "web"), Ok(()));
        assert!(matches!(decide(&deploy(), "k1", Action::Domains, "web"), Err(Denied::DeployKey { .. })));
        assert!(matches!(decide(&Role::ReadOnly, "r1", Action::Domains, "web"), Err(Denied::ReadOnly { .. })));
        let workflow = Role::Workflow { app_id: 1, app: "web".into() };
        assert_eq!(decide(&workflow, "github-oidc", Action::Domains, "web"), Err(Denied::Workflow));
    }

    #[test]
    fn only_the_admin_links_repositories() {
        assert_eq!(decide(&Role::Admin, "admin", Action::LinkRepository, "web"), Ok(()));
        assert!(decide(&deploy(), "k1", Action::LinkRepository, "web").is_err());
        assert!(decide(&Role::ReadOnly, "r1", Action::LinkRepository, "web").is_err());
    }

    #[test]
    fn only_a_deploy_key_is_blind_to_other_apps() {
        assert!(sees(&Role::Admin, "site"));
        assert!(sees(&Role::ReadOnly, "site"));
        assert!(sees(&deploy(), "web"));
        assert!(!sees(&deploy(), "site"));
        assert!(!sees(&Role::Workflow { app_id: 1, app: "web".into() }, "site"));
    }

    #[test]
    fn architecture_md_shows_this_table() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md")).unwrap();
        assert!(doc.contains(&Table.to_string()), "ARCHITECTURE.md's authorization table differs from:\n{Table}");
    }

    #[test]
    fn the_table_says_own_app_for_deploy_keys() {
        let text = Table.to_string();
        assert!(text.contains("| Push | any app | own app | no | own app | own app |"), "{text}");
        assert!(text.contains("| Deploy | any app | own app | no | own app | no |"), "{text}");
        assert!(text.contains("| Database | any app | no | no | no | no |"), "{text}");
        assert!(text.contains("| Status | yes | yes | yes | no | no |"), "{text}");
        assert!(text.contains("| LinkRepository | any app | no | no | no | no |"), "{text}");
        assert!(text.contains("| Drains | any app | own app | no | no | no |"), "{text}");
    }
}
