//! App databases: one login role and one database per app, owned by that role,
//! closed to every other role.
//!
//! Ownership: the app role owns its database (and, on PostgreSQL 15+, its
//! `public` schema through `pg_database_owner`, which is why the role must
//! INHERIT), so apps can run their own migrations. The search_path trojan risk (an app defining functions that a
//! privileged session then resolves by name) is contained on our side: every
//! platform session that enters an app database sets `search_path` to
//! `pg_catalog` first and never calls unqualified app objects.

use sqlx::{Executor, PgConnection};

use super::scram;

/// Connections of the roles the platform makes for one restore or
/// verification: pg_restore needs one.
const OPERATION_CONNECTIONS: u32 = 2;

/// What the role of an app (or of a preview's database) may use of the
/// cluster. All are set by the superuser on the role: `temp_file_limit` is a
/// superuser-only setting, so the app cannot lift it; `statement_timeout` is
/// only the role's default, the watchdog enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections one app may hold at once.
    pub connections: u32,
    /// Connections no app may take, for the platform.
    pub reserved: u32,
    pub temp_file_limit_kb: u64,
    pub statement_timeout_ms: u64,
    /// The size quota of a database, in kB.
    pub quota_kb: u64,
}

impl Limits {
    /// The limits of a role made for one restore or verification: index
    /// builds of a dump that fits the quota may sort as much as it holds.
    pub fn for_operation(&self) -> Limits {
        Limits {
            connections: OPERATION_CONNECTIONS,
            temp_file_limit_kb: self.temp_file_limit_kb.max(self.quota_kb),
            ..self.clone()
        }
    }
}

/// Serialises the connection budget check with the role it admits, across
/// receivers sharing one cluster.
const BUDGET_LOCK: &str = "SELECT pg_advisory_lock(hashtext('nx.connections'))";
const BUDGET_UNLOCK: &str = "SELECT pg_advisory_unlock(hashtext('nx.connections'))";

/// What the roles of apps and previews hold of the cluster's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_connections: u32,
    pub held: u32,
}

/// The cluster's `max_connections` and the connection limits its plain roles
/// hold (superusers and roles without a limit are the operator's own).
async fn budget(admin: &mut PgConnection) -> Result<Budget, ProvisionError> {
    let (max, held): (i32, i64) = sqlx::query_as(
        "SELECT current_setting('max_connections')::int, \
         coalesce(sum(rolconnlimit) FILTER (WHERE rolconnlimit > 0 AND NOT rolsuper), 0)::bigint FROM pg_roles",
    )
    .fetch_one(&mut *admin)
    .await
    .map_err(sql("count connections", "the cluster"))?;
    Ok(Budget { max_connections: max.max(0) as u32, held: held.clamp(0, u32::MAX as i64) as u32 })
}

/// Refuses a role of `want` connections when the roles already there and the
/// platform's reserve would not leave them.
fn admit(budget: Budget, want: u32, reserved: u32, name: &str) -> Result<(), ProvisionError> {
    if u64::from(budget.held) + u64::from(want) + u64::from(reserved) > u64::from(budget.max_connections) {
        return Err(ProvisionError::Connections {
            name: name.to_owned(),
            want,
            held: budget.held,
            max: budget.max_connections,
            reserved,
        });
    }
    Ok(())
}

/// Sets the limits of `role` that are settings (rather than attributes).
/// [`apply_limits`] under the connection budget lock, for roles that may be
/// being made or changed at the same moment.
pub async fn apply_limits_locked(admin: &mut PgConnection, role: &str, limits: &Limits) -> Result<(), ProvisionError> {
    admin.execute(BUDGET_LOCK).await.map_err(sql("take the connection budget lock", role))?;
    let applied = apply_limits(admin, role, limits).await;
    let _ = admin.execute(BUDGET_UNLOCK).await;
    applied
}

pub async fn apply_limits(admin: &mut PgConnection, role: &str, limits: &Limits) -> Result<(), ProvisionError> {
    let ident = quote_ident(role);
    for statement in [
        format!("ALTER ROLE {ident} CONNECTION LIMIT {}", limits.connections),
        format!("ALTER ROLE {ident} SET temp_file_limit = '{}kB'", limits.temp_file_limit_kb),
        format!("ALTER ROLE {ident} SET statement_timeout = '{}ms'", limits.statement_timeout_ms),
    ] {
        admin.execute(statement.as_str()).await.map_err(sql("set the role's limits", role))?;
    }
    Ok(())
}

/// Names of the empty databases kept ready for the next app or preview.
/// `CREATE DATABASE` creates a file per catalog relation, some 300 of them,
/// which on a slow filesystem takes far longer than everything else a
/// provisioning does; a spare made earlier is renamed and given away instead.
pub const SPARE_PREFIX: &str = "nx_spare_";

/// Serialises refills across receivers sharing one cluster.
const SPARE_LOCK: &str = "SELECT pg_try_advisory_lock(hashtext('nx.spares'))";
const SPARE_UNLOCK: &str = "SELECT pg_advisory_unlock(hashtext('nx.spares'))";

/// Failures to provision; `sqlx` errors keep their text, which names the object.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot {action} for {database}: {source}")]
    Sql { action: &'static str, database: String, source: sqlx::Error },
    #[error("no database connections are left for {name}: the roles of apps and previews hold {held} of the cluster's max_connections of {max}, {reserved} are reserved for the platform (--db-reserved-connections), and it needs {want}; raise --db-max-connections (NX_DB_MAX_CONNECTIONS), lower --db-app-connections, or remove apps or previews with databases of their own")]
    Connections { name: String, want: u32, held: u32, max: u32, reserved: u32 },
    #[error("a {kind} named {name} already exists in the cluster and nothing was changed; if no app or preview uses it, it is a leftover: drop it (DROP DATABASE / DROP ROLE) and try again")]
    Exists { kind: &'static str, name: String },
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn sql<'a>(action: &'static str, database: &'a str) -> impl FnOnce(sqlx::Error) -> ProvisionError + 'a {
    move |source| ProvisionError::Sql { action, database: database.to_owned(), source }
}

async fn exists(admin: &mut PgConnection, query: &'static str, name: &str) -> Result<bool, ProvisionError> {
    sqlx::query_scalar(query).bind(name).fetch_one(&mut *admin).await.map_err(sql("look up existing objects", name))
}

/// The attributes of every role an app or the platform logs in with for it:
/// none that reaches past its own objects.
const PLAIN_ROLE: &str = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT";

/// Creates a new login role `name` with `password` (sent as a SCRAM verifier)
/// and `extra` attributes; an existing role of that name is an error, so no
/// creation ever takes over a role it did not make.
async fn create_role(admin: &mut PgConnection, name: &str, password: &str, extra: &str) -> Result<(), ProvisionError> {
    let salt: [u8; 16] = rand::random();
    let verifier = scram::verifier(password, &salt);
    admin.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", name))?;
    if exists(admin, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", name).await? {
        return Err(ProvisionError::Exists { kind: "role", name: name.to_owned() });
    }
    // The verifier is safe to inline: base64 and '$' ':' only, no quotes.
    let create = format!("CREATE ROLE {} {PLAIN_ROLE} {extra} PASSWORD '{verifier}'", quote_ident(name));
    admin.execute(create.as_str()).await.map_err(sql("create the role", name))?;
    Ok(())
}

/// Creates the role and the database of an app (or of a preview, a restore's
/// staging copy, a verification): both must be new. A name already taken is
/// an error that changes nothing, never a takeover of what is there.
///
/// The role's connection limit must fit the cluster's budget, and it gets the
/// `limits` a role cannot lift itself.
pub async fn create_app_database(
    admin: &mut PgConnection,
    name: &str,
    password: &str,
    limits: &Limits,
) -> Result<(), ProvisionError> {
    admin.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", name))?;
    if exists(admin, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).await? {
        return Err(ProvisionError::Exists { kind: "database", name: name.to_owned() });
    }
    admin.execute(BUDGET_LOCK).await.map_err(sql("take the connection budget lock", name))?;
    // The limits are applied under the lock too: the watchdog gives roles
    // their limits under it, and two ALTER ROLEs of one role at once fail
    // ("tuple concurrently updated").
    let role = async {
        admit(budget(admin).await?, limits.connections, limits.reserved, name)?;
        create_role(admin, name, password, &format!("CONNECTION LIMIT {}", limits.connections)).await?;
        Ok(apply_limits(admin, name, limits).await)
    }
    .await;
    let _ = admin.execute(BUDGET_UNLOCK).await;
    let created = match role? {
        Ok(()) => ensure_database(admin, name, Some(name)).await,
        Err(e) => Err(e),
    };
    if created.is_err() {
        let _ = admin.execute(format!("DROP ROLE IF EXISTS {}", quote_ident(name)).as_str()).await;
    }
    created
}

/// Creates a login role that holds the rights of `app_role` and nothing more,
/// for the platform's own sessions in the app's database (pg_dump): they are
/// not counted against the app's connection limit, and what the app's data
/// makes them do, the app could do itself. It expires within the hour should
/// the platform die before dropping it.
pub async fn create_member_role(
    admin: &mut PgConnection,
    name: &str,
    password: &str,
    app_role: &str,
) -> Result<(), ProvisionError> {
    let extra = format!("CONNECTION LIMIT 2 VALID UNTIL '{}' IN ROLE {}", valid_until(), quote_ident(app_role));
    create_role(admin, name, password, &extra).await
}

/// An hour from now, as a timestamp literal PostgreSQL reads.
fn valid_until() -> String {
    (chrono::Utc::now() + chrono::Duration::hours(1)).format("%Y-%m-%d %H:%M:%S+00").to_string()
}

/// The databases other than `except` in which something is held for `role`:
/// privileges an app granted it on its own objects, which keep the role from
/// being dropped.
pub async fn databases_holding(admin: &mut PgConnection, role: &str) -> Result<Vec<String>, ProvisionError> {
    sqlx::query_scalar(
        "SELECT DISTINCT d.datname::text FROM pg_shdepend s \
         JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.refobjid \
         WHERE r.rolname = $1 AND d.datname <> $1",
    )
    .bind(role)
    .fetch_all(&mut *admin)
    .await
    .map_err(sql("find what other databases hold for", role))
}

/// Drops what `role` owns and is granted in the database `conn` is connected
/// to. Runs no code of the database's.
pub async fn drop_owned(conn: &mut PgConnection, role: &str) -> Result<(), ProvisionError> {
    conn.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", role))?;
    conn.execute(format!("DROP OWNED BY {}", quote_ident(role)).as_str())
        .await
        .map_err(sql("drop what is held for", role))?;
    Ok(())
}

/// Drops a login role made by `create_member_role`.
pub async fn drop_role(admin: &mut PgConnection, name: &str) -> Result<(), ProvisionError> {
    admin.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", name))?;
    admin
        .execute(format!("DROP ROLE IF EXISTS {}", quote_ident(name)).as_str())
        .await
        .map_err(sql("drop the role", name))?;
    Ok(())
}

/// Gives everything `from` owns in the database `conn` is connected to, and
/// the database itself, to `to`, and drops what else `from` holds there
/// (privileges, default privileges), so `from` can be dropped. Runs no code of
/// the database's: ownership changes call no function.
pub async fn hand_over(conn: &mut PgConnection, from: &str, to: &str) -> Result<(), ProvisionError> {
    conn.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", from))?;
    let (from_i, to_i) = (quote_ident(from), quote_ident(to));
    conn.execute(format!("REASSIGN OWNED BY {from_i} TO {to_i}").as_str())
        .await
        .map_err(sql("give the restored objects to the app's role", from))?;
    conn.execute(format!("DROP OWNED BY {from_i}").as_str())
        .await
        .map_err(sql("drop what is left of the staging role", from))?;
    Ok(())
}

/// Creates database `name` unless it exists (owned by `owner`, or by the admin
/// role), and closes it to PUBLIC. An app's database is a spare renamed when
/// one is ready.
async fn ensure_database(admin: &mut PgConnection, name: &str, owner: Option<&str>) -> Result<(), ProvisionError> {
    let ident = quote_ident(name);
    let present = exists(admin, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).await?;
    let claimed = !present && owner.is_some() && claim_spare(admin, name).await?;
    if !present && !claimed {
        admin
            .execute(format!("CREATE DATABASE {ident} ENCODING 'UTF8' TEMPLATE template0").as_str())
            .await
            .map_err(sql("create the database", name))?;
    }
    // Always stated, so a crash between a rename and this line is repaired by
    // the next attempt rather than leaving the admin as the owner.
    if let Some(owner) = owner {
        admin
            .execute(format!("ALTER DATABASE {ident} OWNER TO {}", quote_ident(owner)).as_str())
            .await
            .map_err(sql("give the database to its role", name))?;
    }
    admin
        .execute(format!("REVOKE ALL ON DATABASE {ident} FROM PUBLIC").as_str())
        .await
        .map_err(sql("revoke public access", name))?;
    Ok(())
}

/// The spare databases, oldest name first.
async fn list_spares(admin: &mut PgConnection) -> Result<Vec<String>, ProvisionError> {
    // `_` is a LIKE wildcard unless escaped.
    let pattern = format!("{}%", SPARE_PREFIX.replace('_', "\\_"));
    sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE $1 ORDER BY datname")
        .bind(pattern)
        .fetch_all(&mut *admin)
        .await
        .map_err(sql("list", "the spare databases"))
}

/// Renames a spare to `name`; false when none is ready. Two receivers
/// racing for one spare are fine: the loser's rename fails and it takes the
/// next one.
async fn claim_spare(admin: &mut PgConnection, name: &str) -> Result<bool, ProvisionError> {
    for spare in list_spares(admin).await? {
        let rename = format!("ALTER DATABASE {} RENAME TO {}", quote_ident(&spare), quote_ident(name));
        if admin.execute(rename.as_str()).await.is_ok() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Creates or drops spares until exactly `want` are ready; returns how many
/// were created or dropped. A refill already running elsewhere makes this one
/// return at once.
pub async fn refill_spares(admin: &mut PgConnection, want: usize) -> Result<usize, ProvisionError> {
    let action = |a| sql(a, "the spare databases");
    admin.execute("SET search_path = pg_catalog").await.map_err(action("set search_path"))?;
    let locked: bool = sqlx::query_scalar(SPARE_LOCK).fetch_one(&mut *admin).await.map_err(action("take the lock"))?;
    if !locked {
        return Ok(0);
    }
    let result = async {
        // Listed again after each change: a spare may be claimed meanwhile.
        // Bounded, so a cluster that keeps undoing the changes cannot hold
        // this task forever.
        let mut changed = 0;
        while changed < want + 64 {
            let ready = list_spares(admin).await?;
            match ready.len().cmp(&want) {
                std::cmp::Ordering::Equal => break,
                std::cmp::Ordering::Greater => {
                    let drop = format!("DROP DATABASE IF EXISTS {}", quote_ident(&ready[0]));
                    admin.execute(drop.as_str()).await.map_err(action("drop"))?;
                }
                std::cmp::Ordering::Less => {
                    let ident = quote_ident(&format!("{SPARE_PREFIX}{}", hex::encode(rand::random::<[u8; 8]>())));
                    admin
                        .execute(format!("CREATE DATABASE {ident} ENCODING 'UTF8' TEMPLATE template0").as_str())
                        .await
                        .map_err(action("create"))?;
                    admin
                        .execute(format!("REVOKE ALL ON DATABASE {ident} FROM PUBLIC").as_str())
                        .await
                        .map_err(action("close"))?;
                }
            }
            changed += 1;
        }
        Ok(changed)
    }
    .await;
    let _ = admin.execute(SPARE_UNLOCK).await;
    result
}

/// Closes the metadata database to PUBLIC again (as its creation did; a
/// second wall, stated at every start) and `databases` to PUBLIC's
/// connections, in one round trip: it runs at every start before the API
/// answers.
pub async fn close_to_public(
    admin: &mut PgConnection,
    metadata: &str,
    databases: &[&str],
) -> Result<(), ProvisionError> {
    let mut statements = format!("REVOKE ALL ON DATABASE {} FROM PUBLIC;", quote_ident(metadata));
    for name in databases {
        statements.push_str(&format!("REVOKE CONNECT ON DATABASE {} FROM PUBLIC;", quote_ident(name)));
    }
    // No parameters: one simple-protocol query, which may hold several statements.
    admin.execute(statements.as_str()).await.map_err(sql("revoke public access", metadata))?;
    Ok(())
}

/// Drops the database and the role of the same name, if there is one. Used to
/// undo a creation that could not be recorded, when an app is removed, and for
/// preview, staging and scratch databases.
pub async fn drop_app_database(admin: &mut PgConnection, name: &str) -> Result<(), ProvisionError> {
    let ident = quote_ident(name);
    admin.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", name))?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)").as_str())
        .await
        .map_err(sql("drop the database", name))?;
    admin.execute(format!("DROP ROLE IF EXISTS {ident}").as_str()).await.map_err(sql("drop the role", name))?;
    Ok(())
}

/// Creates the metadata database when it does not exist and closes it to PUBLIC.
pub async fn ensure_metadata_database(admin: &mut PgConnection, name: &str) -> Result<(), ProvisionError> {
    admin.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", name))?;
    ensure_database(admin, name, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_is_admitted_only_within_the_budget() {
        let budget = Budget { max_connections: 100, held: 60 };
        assert!(admit(budget, 20, 20, "app_web").is_ok(), "exactly full is fine");
        let err = admit(budget, 21, 20, "app_web").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ProvisionError::Connections { want: 21, held: 60, max: 100, reserved: 20, .. }));
        assert!(text.contains("--db-max-connections") && text.contains("app_web"), "{text}");
        // Overflow does not wrap into admission.
        assert!(admit(Budget { max_connections: u32::MAX, held: u32::MAX }, 1, 0, "x").is_err());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("app_web"), "\"app_web\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
