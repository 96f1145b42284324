//! What the metrics read of the cluster: each app database's size and
//! sessions (`pg_database_size`, `pg_stat_activity`), previews' own included.

use super::Db;

/// One database's size and open sessions.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DatabaseFigures {
    pub app: String,
    pub database: String,
    pub bytes: i64,
    pub connections: i64,
}

impl Db {
    /// The size and open sessions of every app's database and of every
    /// running preview's own database. Cluster-wide catalogs, read from the
    /// metadata database as the admin role.
    pub async fn database_figures(&self) -> Result<Vec<DatabaseFigures>, sqlx::Error> {
        sqlx::query_as(
            "WITH owned AS ( \
                 SELECT a.name AS app, a.db_name AS database FROM apps a \
                 UNION SELECT a.name, d.db_name FROM deployments d JOIN apps a ON a.id = d.app_id \
                     WHERE d.db_name IS NOT NULL AND d.state IN ('pending', 'starting', 'healthy')) \
             SELECT o.app, o.database, pg_database_size(p.oid) AS bytes, \
                    (SELECT count(*) FROM pg_stat_activity s WHERE s.datid = p.oid) AS connections \
             FROM owned o JOIN pg_database p ON p.datname = o.database ORDER BY o.app, o.database",
        )
        .fetch_all(&self.pool)
        .await
    }
}
