//! `nx status`: is the receiver up, which version, and what it enforces.

use nx_protocol::api::{Enforcement, Health, ServerStatus};
use nx_protocol::units::format_duration;

use super::print_json;
use crate::cli::Global;
use crate::client::{get_public, Client};
use crate::output::{bytes, paint, table, Color};

fn rows(title: &str, entries: &[Enforcement]) -> String {
    let mut rows = vec![vec![format!("{title}:")]];
    rows.extend(entries.iter().map(|e| {
        let by = match &e.by {
            Some(by) => by.clone(),
            None => paint(&format!("NOT ENFORCED ({})", e.note.as_deref().unwrap_or("?")), Color::Red),
        };
        vec![format!("  {}", e.limit), e.value.clone(), by]
    }));
    table(&rows)
}

pub async fn run(g: &Global) -> anyhow::Result<()> {
    let target = crate::config::resolve(g.server.as_deref(), g.key.as_deref(), g.insecure)?;
    let health: Health = get_public(&target.server, "/v1/health").await?;
    if target.key.is_none() {
        if g.json {
            return print_json(&health);
        }
        println!("nx-receiver {} is up at {}", health.version, target.server);
        println!("log in with a key (`nx login --key KEY`) to see its limits and deployments");
        return Ok(());
    }
    let status: ServerStatus = Client::new(&target)?.get("/v1/status").await?;
    if g.json {
        return print_json(&status);
    }
    let up = std::time::Duration::from_secs(status.uptime_secs);
    println!(
        "nx-receiver {} is {} at {}, up {}",
        status.version,
        paint("up", Color::Green),
        target.server,
        format_duration(up)
    );
    let states: Vec<String> = status.deployments.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!(
        "apps: {}   deployments: {}",
        status.apps,
        if states.is_empty() { "none".into() } else { states.join(", ") }
    );
    println!("apps are served at *.{} (router {})", status.domain, status.router);
    println!("database: {}", status.database);
    println!("store: {}", status.store);
    print!("{}", rows("limits of a deployment unless its app sets its own", &status.default_limits));
    print!("{}", rows("isolation", &status.isolation));
    for w in &status.wildcards {
        let state = match (&w.issuer, w.expires_at) {
            (Some(issuer), Some(expires)) => format!("from {issuer}, expires {}", expires.format("%Y-%m-%d %H:%M UTC")),
            _ => "not obtained yet".to_owned(),
        };
        println!("certificate {}: {state}", w.name);
        if let Some(error) = &w.last_error {
            let next = w.next_attempt_at.map(|t| format!(" (next attempt {})", t.format("%Y-%m-%d %H:%M:%S UTC")));
            println!("{}", paint(&format!("  last attempt failed: {error}{}", next.unwrap_or_default()), Color::Red));
        }
    }
    for (app, quota) in &status.databases_over_quota {
        println!("{}", paint(&format!("{app}: {quota}"), Color::Red));
    }
    println!(
        "uploads up to {}; previews stop after {} without requests; the last {} deployments of each app are kept",
        bytes(status.max_upload_bytes),
        format_duration(std::time::Duration::from_secs(status.preview_idle_secs)),
        status.keep_deployments
    );
    Ok(())
}
