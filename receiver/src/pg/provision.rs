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

/// Connections one app may hold at once; the platform keeps the rest.
pub const CONNECTION_LIMIT: u32 = 20;

/// Failures to provision; `sqlx` errors keep their text, which names the object.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot {action} for {database}: {source}")]
    Sql { action: &'static str, database: String, source: sqlx::Error },
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

/// Creates (or, after a crash half-way, completes) the role and the database.
/// An existing database is kept as it is, so nothing is ever lost here.
pub async fn create_app_database(admin: &mut PgConnection, name: &str, password: &str) -> Result<(), ProvisionError> {
    let ident = quote_ident(name);
    let salt: [u8; 16] = rand::random();
    let verifier = scram::verifier(password, &salt);
    // The verifier is safe to inline: base64 and '$' ':' only, no quotes.
    let attrs = format!(
        "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT CONNECTION LIMIT {CONNECTION_LIMIT} PASSWORD '{verifier}'"
    );
    admin.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", name))?;
    let role_exists = exists(admin, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", name).await?;
    let verb = if role_exists { "ALTER" } else { "CREATE" };
    admin.execute(format!("{verb} ROLE {ident} {attrs}").as_str()).await.map_err(sql("create the role", name))?;
    ensure_database(admin, name, Some(name)).await
}

/// Creates database `name` unless it exists (owned by `owner`, or by the admin
/// role), and closes it to PUBLIC.
async fn ensure_database(admin: &mut PgConnection, name: &str, owner: Option<&str>) -> Result<(), ProvisionError> {
    let ident = quote_ident(name);
    if !exists(admin, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).await? {
        let owner = owner.map(|o| format!(" OWNER {}", quote_ident(o))).unwrap_or_default();
        admin
            .execute(format!("CREATE DATABASE {ident}{owner} ENCODING 'UTF8' TEMPLATE template0").as_str())
            .await
            .map_err(sql("create the database", name))?;
    }
    admin
        .execute(format!("REVOKE ALL ON DATABASE {ident} FROM PUBLIC").as_str())
        .await
        .map_err(sql("revoke public access", name))?;
    Ok(())
}

/// Revokes PUBLIC's right to connect to `databases`.
pub async fn close_to_public(admin: &mut PgConnection, databases: &[&str]) -> Result<(), ProvisionError> {
    for name in databases {
        admin
            .execute(format!("REVOKE CONNECT ON DATABASE {} FROM PUBLIC", quote_ident(name)).as_str())
            .await
            .map_err(sql("revoke public access", name))?;
    }
    Ok(())
}

/// Creates database `name` owned by the existing role `owner` (a restore's
/// staging database), closed to PUBLIC.
pub async fn create_database_owned_by(admin: &mut PgConnection, name: &str, owner: &str) -> Result<(), ProvisionError> {
    admin.execute("SET search_path = pg_catalog").await.map_err(sql("set search_path", name))?;
    ensure_database(admin, name, Some(owner)).await
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
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("app_web"), "\"app_web\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
