//! Per-app caps on what one app (and so one deploy key) may hold of the
//! host: running deployments (`--max-running-per-app`), previews with a
//! database of their own (`--max-preview-databases-per-app`), and variables
//! ([`MAX_ENV_NAMES`], [`MAX_ENV_BYTES`]).
//!
//! Each is checked when the request is made, inside the transaction that
//! records what it adds, with the app's row locked: a refused request leaves
//! nothing behind, and two requests at once cannot both take the last place.

use std::collections::BTreeMap;

use super::DeployError;
use crate::db::{EnvTotals, Held, Occupancy};

/// Most variables an app, or one push, may have.
pub const MAX_ENV_NAMES: usize = 256;
/// Most bytes of names and values an app's variables, or one push's, may have.
pub const MAX_ENV_BYTES: usize = 64 << 10;

/// What a new deployment adds to its app's share of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// A push: one more running deployment and, with `database`, one more
    /// preview database.
    Push { database: bool },
    /// The new production an environment change starts in place of the
    /// running one. Not refused: an app at its cap must still get its
    /// variables. It runs next to the production it replaces until the
    /// promotion; the deployment then pushed out of the rollback place is
    /// stopped if the app is over its cap (`Deployer::replace_production`).
    Replacement,
}

/// The operator's caps per app.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps {
    pub running: u32,
    pub databases: u32,
}

/// Refuses `claim` when the app already holds as much as `caps` allow.
pub(super) fn admit(app: &str, caps: Caps, held: &Occupancy, claim: Claim) -> Result<(), DeployError> {
    if held.removing {
        return Err(DeployError::AppRemoving { app: app.to_owned() });
    }
    let Claim::Push { database } = claim else { return Ok(()) };
    if held.running.len() >= caps.running as usize {
        return Err(DeployError::TooManyRunning {
            app: app.to_owned(),
            cap: caps.running,
            count: held.running.len(),
            running: describe(&held.running),
        });
    }
    if database && held.databases.len() >= caps.databases as usize {
        return Err(DeployError::TooManyPreviewDatabases {
            app: app.to_owned(),
            cap: caps.databases,
            count: held.databases.len(),
            holding: describe(&held.databases),
        });
    }
    Ok(())
}

/// "7kq3mz2a (production), ..., 9xw2 (pull request #3)": what a refusal lists,
/// so the caller can tell which to stop.
fn describe(held: &[Held]) -> String {
    let one = |h: &Held| {
        let role = if h.is_production {
            Some("production".to_owned())
        } else if h.is_rollback_target {
            Some("rollback target".to_owned())
        } else {
            h.pr_number.map(|pr| format!("pull request #{pr}"))
        };
        match role {
            Some(role) => format!("{} ({role})", h.id),
            None => h.id.clone(),
        }
    };
    held.iter().map(one).collect::<Vec<_>>().join(", ")
}

/// The totals of a set of variables.
pub(super) fn totals(env: &BTreeMap<String, String>) -> EnvTotals {
    EnvTotals { names: env.len(), bytes: env.iter().map(|(k, v)| k.len() + v.len()).sum() }
}

fn over(t: EnvTotals) -> bool {
    t.names > MAX_ENV_NAMES || t.bytes > MAX_ENV_BYTES
}

/// A push's own variables (stored with its deployment) must fit the cap by
/// themselves.
pub(super) fn check_push_env(env: &BTreeMap<String, String>) -> Result<(), DeployError> {
    let t = totals(env);
    if over(t) {
        return Err(DeployError::TooManyVariables {
            what: "the push's own variables".into(),
            names: t.names,
            bytes: t.bytes,
            fix: "pass fewer with --env, and keep the ones every deployment needs with `nx env set`".into(),
        });
    }
    Ok(())
}

/// An app's variables after a change must fit the cap, unless the change
/// grows neither total (an app over a cap it had before the cap existed can
/// still remove variables).
pub(super) fn admit_env(app: &str, before: EnvTotals, after: EnvTotals) -> Result<(), DeployError> {
    let grows = after.names > before.names || after.bytes > before.bytes;
    if over(after) && grows {
        return Err(DeployError::TooManyVariables {
            what: format!("app {app}'s variables"),
            names: after.names,
            bytes: after.bytes,
            fix: format!(
                "remove ones it no longer needs with `nx env unset NAME --app {app}` first; nothing was changed"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str, pr: Option<i64>, production: bool, rollback: bool) -> Held {
        Held { id: id.into(), pr_number: pr, is_production: production, is_rollback_target: rollback }
    }

    #[test]
    fn a_push_at_either_cap_is_refused_naming_what_holds_it_and_a_replacement_never_is() {
        let caps = Caps { running: 3, databases: 1 };
        let held = Occupancy {
            running: vec![held("a", None, true, false), held("b", None, false, true), held("c", Some(4), false, false)],
            databases: vec![held("c", Some(4), false, false)],
            removing: false,
        };
        let e = admit("web", caps, &held, Claim::Push { database: false }).unwrap_err().to_string();
        assert_eq!(
            e,
            "app web already runs 3 deployments, the most one app may run on this server (--max-running-per-app 3): \
             a (production), b (rollback target), c (pull request #4); stop one it no longer needs with \
             `nx stop ID --app web`, or ask the operator to raise --max-running-per-app"
        );
        assert!(admit("web", caps, &held, Claim::Replacement).is_ok());
        let two = Occupancy { running: held.running[..2].to_vec(), ..held.clone() };
        assert!(admit("web", caps, &two, Claim::Push { database: false }).is_ok());
        let e = admit("web", caps, &two, Claim::Push { database: true }).unwrap_err().to_string();
        assert!(e.starts_with("app web already has 1 previews with a database of their own"), "{e}");
        assert!(e.contains("(--max-preview-databases-per-app 1): c (pull request #4);"), "{e}");
    }

    #[test]
    fn an_app_being_removed_takes_no_push_and_no_replacement() {
        let caps = Caps { running: 3, databases: 1 };
        let removing = Occupancy { removing: true, ..Occupancy::default() };
        for claim in [Claim::Push { database: true }, Claim::Replacement] {
            assert_eq!(
                admit("web", caps, &removing, claim).unwrap_err().to_string(),
                "app web is being removed, so nothing is deployed to it any more; if its removal stopped half way, \
                 `nx apps rm web` again finishes it"
            );
        }
    }

    #[test]
    fn variables_are_capped_by_count_and_bytes_but_an_app_over_the_cap_may_shrink() {
        let at = |names, bytes| EnvTotals { names, bytes };
        assert!(admit_env("web", at(0, 0), at(MAX_ENV_NAMES, MAX_ENV_BYTES)).is_ok());
        assert!(admit_env("web", at(0, 0), at(MAX_ENV_NAMES + 1, 10)).is_err());
        let e = admit_env("web", at(1, 10), at(2, MAX_ENV_BYTES + 1)).unwrap_err().to_string();
        assert_eq!(
            e,
            "app web's variables would be 2 variables of 65537 bytes (names and values), over the limit of 256 \
             variables and 65536 bytes per app; remove ones it no longer needs with `nx env unset NAME --app web` \
             first; nothing was changed"
        );
        assert!(admit_env("web", at(300, 10), at(299, 10)).is_ok(), "shrinking is always allowed");
        let big: BTreeMap<String, String> = [("A".to_owned(), "x".repeat(MAX_ENV_BYTES))].into();
        assert!(check_push_env(&big).is_err(), "one name plus 64 KiB of value is over");
        let many: BTreeMap<String, String> = (0..=MAX_ENV_NAMES).map(|i| (format!("V{i}"), String::new())).collect();
        assert!(check_push_env(&many).is_err());
    }
}
