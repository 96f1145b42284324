//! Custom domains, the platform's wildcard certificates and ACME accounts.

use chrono::{DateTime, Utc};

use super::Db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DomainRow {
    pub id: i64,
    pub name: String,
    pub app_id: i64,
    pub app_name: String,
    pub token: String,
    pub verified_at: Option<DateTime<Utc>>,
    pub cert_chain: Option<Vec<u8>>,
    pub cert_key: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub failures: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

const DOMAIN_COLUMNS: &str = "d.id, d.name, d.app_id, a.name AS app_name, d.token, d.verified_at, d.cert_chain, \
     d.cert_key, d.issuer, d.expires_at, d.last_error, d.failures, d.next_attempt_at \
     FROM domains d JOIN apps a ON a.id = d.app_id";

/// The wildcard certificate of one of the platform's domains (`*.<domain>`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WildcardRow {
    pub domain: String,
    pub cert_chain: Option<Vec<u8>>,
    pub cert_key: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub failures: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// What adding a domain found.
#[derive(Debug)]
pub enum Added {
    Added(DomainRow),
    /// The name is attached to this app already (this one or another).
    Taken {
        app: String,
    },
    /// The app has a domain already.
    Full {
        domain: String,
    },
}

impl Db {
    /// Attaches `name` to the app, unless the name belongs to an app already
    /// or the app has a domain: checked under the app's row lock and the
    /// name's unique index, so two racing requests attach it once.
    pub async fn add_domain(&self, app_id: i64, name: &str, token: &str) -> Result<Added, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT id FROM apps WHERE id = $1 FOR UPDATE").bind(app_id).execute(&mut *tx).await?;
        let owner: Option<String> =
            sqlx::query_scalar("SELECT a.name FROM domains d JOIN apps a ON a.id = d.app_id WHERE d.name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(app) = owner {
            return Ok(Added::Taken { app });
        }
        let existing: Option<String> = sqlx::query_scalar("SELECT name FROM domains WHERE app_id = $1")
            .bind(app_id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(domain) = existing {
            return Ok(Added::Full { domain });
        }
        let inserted =
            sqlx::query("INSERT INTO domains (name, app_id, token) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .bind(app_id)
                .bind(token)
                .execute(&mut *tx)
                .await?;
        if inserted.rows_affected() == 0 {
            // Another app's request took it between the check and the insert.
            tx.rollback().await?;
            let app = self.domain(name).await?.map(|d| d.app_name).unwrap_or_default();
            return Ok(Added::Taken { app });
        }
        tx.commit().await?;
        let row = self.domain(name).await?.ok_or(sqlx::Error::RowNotFound)?;
        Ok(Added::Added(row))
    }

    pub async fn domain(&self, name: &str) -> Result<Option<DomainRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DOMAIN_COLUMNS} WHERE d.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn app_domains(&self, app_id: i64) -> Result<Vec<DomainRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DOMAIN_COLUMNS} WHERE d.app_id = $1 ORDER BY d.name"))
            .bind(app_id)
            .fetch_all(&self.pool)
            .await
    }

    /// Every verified domain: the ones the router serves.
    pub async fn verified_domains(&self) -> Result<Vec<DomainRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DOMAIN_COLUMNS} WHERE d.verified_at IS NOT NULL ORDER BY d.name"))
            .fetch_all(&self.pool)
            .await
    }

    pub async fn remove_domain(&self, app_id: i64, name: &str) -> Result<bool, sqlx::Error> {
        sqlx::query("DELETE FROM domains WHERE app_id = $1 AND name = $2")
            .bind(app_id)
            .bind(name)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected() == 1)
    }

    pub async fn set_domain_verified(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE domains SET verified_at = COALESCE(verified_at, now()) WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Stores a new certificate (sealed chain and key) and clears the failures.
    pub async fn set_certificate(
        &self,
        id: i64,
        chain: &[u8],
        key: &[u8],
        issuer: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE domains SET cert_chain = $2, cert_key = $3, issuer = $4, expires_at = $5, \
             last_error = NULL, failures = 0, next_attempt_at = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(chain)
        .bind(key)
        .bind(issuer)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Records a failed attempt and when to try again.
    pub async fn set_certificate_failure(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE domains SET last_error = $2, failures = failures + 1, next_attempt_at = $3 WHERE id = $1")
            .bind(id)
            .bind(error)
            .bind(next_attempt_at)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// The sealed credentials of the ACME account at `directory`.
    pub async fn acme_account(&self, directory: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        sqlx::query_scalar("SELECT credentials FROM acme_accounts WHERE directory = $1")
            .bind(directory)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn set_acme_account(&self, directory: &str, sealed: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO acme_accounts (directory, credentials) VALUES ($1, $2) \
             ON CONFLICT (directory) DO UPDATE SET credentials = EXCLUDED.credentials",
        )
        .bind(directory)
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Every wildcard certificate asked for so far, obtained or not.
    pub async fn wildcards(&self) -> Result<Vec<WildcardRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT domain, cert_chain, cert_key, issuer, expires_at, last_error, failures, next_attempt_at \
             FROM wildcard_certificates ORDER BY domain",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Stores a new wildcard certificate of `domain` (sealed chain and key)
    /// and clears the failures.
    pub async fn set_wildcard_certificate(
        &self,
        domain: &str,
        chain: &[u8],
        key: &[u8],
        issuer: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO wildcard_certificates (domain, cert_chain, cert_key, issuer, expires_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (domain) DO UPDATE SET cert_chain = $2, cert_key = $3, \
             issuer = $4, expires_at = $5, last_error = NULL, failures = 0, next_attempt_at = NULL",
        )
        .bind(domain)
        .bind(chain)
        .bind(key)
        .bind(issuer)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Records a failed attempt at `domain`'s wildcard and when to try again.
    pub async fn set_wildcard_failure(
        &self,
        domain: &str,
        error: &str,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO wildcard_certificates (domain, last_error, failures, next_attempt_at) \
             VALUES ($1, $2, 1, $3) ON CONFLICT (domain) DO UPDATE SET last_error = $2, \
             failures = wildcard_certificates.failures + 1, next_attempt_at = $3",
        )
        .bind(domain)
        .bind(error)
        .bind(next_attempt_at)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }
}
