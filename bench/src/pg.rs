//! App database provisioning as the receiver does it (a role with a SCRAM
//! verifier, a database it owns, closed to PUBLIC), next to the raw
//! `CREATE ROLE` + `CREATE DATABASE` on the same embedded cluster.

use std::time::Instant;

use nx_cluster::embedded::{ensure_system_user, find_bin_dir, Embedded, EmbeddedConfig};
use nx_cluster::provision;
use nx_receiver::config::ServeConfig;
use nx_runtime::{Log, LogLimits, ProcessManager};
use sqlx::{Connection, Executor};

use crate::stats::{verdict, Figure};

pub fn provision(rounds: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let pm = ProcessManager::global()?;
        let dir = tempfile::Builder::new().prefix("nx-bench-pg-").tempdir_in("/tmp")?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let config = EmbeddedConfig {
            bin: find_bin_dir(None, &["initdb", "postgres"])?,
            root: dir.path().join("postgres"),
            port: crate::sandbox::free_port()?,
            ids: ensure_system_user(&pm, "nx-postgres").await?,
            log_path: dir.path().join("postgres.log"),
            max_connections: ServeConfig::defaults().db_max_connections,
            shim: nx_e2e::bin("nx-shim"),
        };
        let limits = ServeConfig::defaults().cluster().limits;
        let password = nx_receiver::secrets::random_token(32);
        let options = config.admin_options(&password);
        let log = Log::open(&dir.path().join("cluster.log"), LogLimits::default())?;
        let root = config.root.clone();
        Embedded::start(&pm, config, &password, log).await?;
        let mut admin = sqlx::PgConnection::connect_with(&options).await?;
        let mut figures = [Figure::default(), Figure::default(), Figure::default(), Figure::default()];
        let [ours, cold, raw, raw_db] = &mut figures;
        for i in 0..rounds {
            // The receiver refills its spares in the background between
            // provisionings; here that happens off the clock.
            provision::refill_spares(&mut admin, 2).await?;
            let t = Instant::now();
            provision::create_app_database(&mut admin, &format!("app_bench_{i}"), "a-password-of-the-app", &limits)
                .await?;
            ours.push_ms(t.elapsed());
            provision::refill_spares(&mut admin, 0).await?;
            let t = Instant::now();
            provision::create_app_database(&mut admin, &format!("app_cold_{i}"), "a-password-of-the-app", &limits)
                .await?;
            cold.push_ms(t.elapsed());
            let t = Instant::now();
            admin.execute(format!("CREATE ROLE raw_{i} LOGIN PASSWORD 'a-password-of-the-app'").as_str()).await?;
            let db = Instant::now();
            admin.execute(format!("CREATE DATABASE raw_{i} OWNER raw_{i}").as_str()).await?;
            raw_db.push_ms(db.elapsed());
            raw.push_ms(t.elapsed());
        }
        drop(admin);
        nx_cluster::embedded::stop(&root).await?;
        println!("app database provisioning ({rounds} rounds, embedded PostgreSQL)");
        println!("{}", ours.line("nx, a spare database ready", "ms"));
        println!("{}", cold.line("nx, no spare (CREATE DATABASE)", "ms"));
        println!("{}", raw.line("raw CREATE ROLE + DATABASE (peer)", "ms"));
        println!("{}", raw_db.line("  ... of which CREATE DATABASE", "ms"));
        println!("  ratio nx/raw: {:.2}x", ours.median() / raw.median());
        verdict("role + database <= 30 ms median", ours.median() <= 30.0);
        anyhow::Ok(())
    })
}
