//! Example app for NX Sandbox: serves HTTP on `$HOST:$PORT` and counts visits in
//! its own PostgreSQL database (`DATABASE_URL`), so the count outlives every
//! deployment. `GREETING` changes the first word, to tell versions apart.

use std::process::ExitCode;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

#[derive(Clone)]
struct App {
    pool: PgPool,
    greeting: String,
    name: String,
}

async fn index(State(app): State<App>) -> Result<String, (axum::http::StatusCode, String)> {
    let count: i64 =
        sqlx::query_scalar("INSERT INTO visits DEFAULT VALUES RETURNING (SELECT count(*) + 1 FROM visits)")
            .fetch_one(&app.pool)
            .await
            .map_err(|e| (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("database error: {e}\n")))?;
    Ok(format!("{} from {}: visit number {count}\n", app.greeting, app.name))
}

async fn run() -> Result<(), String> {
    let env = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set; run this under nx-receiver or set it"));
    let port: u16 = env("PORT")?.parse().map_err(|e| format!("PORT is not a port: {e}"))?;
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&env("DATABASE_URL")?)
        .await
        .map_err(|e| format!("cannot connect to DATABASE_URL: {e}"))?;
    sqlx::query("CREATE TABLE IF NOT EXISTS visits (id BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(&pool)
        .await
        .map_err(|e| format!("cannot create the visits table: {e}"))?;
    let app = App {
        pool,
        greeting: std::env::var("GREETING").unwrap_or_else(|_| "hello".into()),
        name: format!(
            "{} deployment {}",
            std::env::var("NX_APP").unwrap_or_else(|_| "hello".into()),
            std::env::var("NX_DEPLOYMENT").unwrap_or_else(|_| "local".into())
        ),
    };
    let router = Router::new().route("/", get(index)).route("/healthz", get(|| async { "ok\n" })).with_state(app);
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot listen on {host}:{port}: {e}"))?;
    println!("listening on {host}:{port}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                term.recv().await;
            }
            println!("SIGTERM: finishing requests in flight");
        })
        .await
        .map_err(|e| format!("server failed: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}
