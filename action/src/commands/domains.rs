//! `nx domains`: custom domains of an app's production, and their certificates.

use nx_protocol::api::{AddDomain, DomainInfo};

use super::{client, print_json};
use crate::cli::{DomainsCommand, Global};
use crate::output::{age, paint, table, Color};

/// The records to create, one per line, aligned.
fn records(d: &DomainInfo) -> String {
    let rows: Vec<Vec<String>> =
        d.records.iter().map(|r| vec![format!("    {}", r.name), r.kind.clone(), r.value.clone()]).collect();
    table(&rows)
}

/// Domains as a table: name, state, certificate issuer and expiry, last error.
fn domain_table(domains: &[DomainInfo]) -> String {
    let now = chrono::Utc::now();
    let mut rows = vec![vec!["DOMAIN".into(), "STATE".into(), "ISSUER".into(), "EXPIRES".into(), "LAST ERROR".into()]];
    for d in domains {
        let state = match (d.verified_at, d.expires_at) {
            (None, _) => paint("unverified", Color::Yellow),
            (Some(_), None) => paint("verified, no certificate yet", Color::Yellow),
            (Some(_), Some(_)) => paint("https", Color::Green),
        };
        let expires = d
            .expires_at
            .map_or_else(|| "-".into(), |t| format!("{} ({})", t.format("%Y-%m-%d %H:%M UTC"), until(t, now)));
        let error = match (&d.last_error, d.next_attempt_at) {
            (Some(e), Some(next)) => format!("{e} (next attempt {})", until(next, now)),
            (Some(e), None) => e.clone(),
            (None, _) => "-".into(),
        };
        rows.push(vec![d.domain.clone(), state, d.issuer.clone().unwrap_or_else(|| "-".into()), expires, error]);
    }
    table(&rows)
}

/// "in 3d" for a time to come, else how long ago.
fn until(t: chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) -> String {
    if t > now {
        let secs = (t - now).num_seconds();
        match secs {
            s if s >= 86_400 => format!("in {}d", s / 86_400),
            s if s >= 3600 => format!("in {}h", s / 3600),
            s if s >= 60 => format!("in {}m", s / 60),
            s => format!("in {s}s"),
        }
    } else {
        age(t, now)
    }
}

pub async fn run(g: &Global, cmd: DomainsCommand) -> anyhow::Result<()> {
    let client = client(g)?;
    match cmd {
        DomainsCommand::Add { app, domain } => {
            let d: DomainInfo = client.post(&format!("/v1/apps/{app}/domains"), &AddDomain { domain }).await?;
            if g.json {
                return print_json(&d);
            }
            println!("{} is attached to {app}. Create these DNS records at your DNS provider:\n", d.domain);
            print!("{}", records(&d));
            println!("\nthen run `nx domains verify {app} {}`; it is served once they are found.", d.domain);
            Ok(())
        }
        DomainsCommand::Ls { app } => {
            let domains: Vec<DomainInfo> = client.get(&format!("/v1/apps/{app}/domains")).await?;
            if g.json {
                return print_json(&domains);
            }
            if domains.is_empty() {
                println!("{app} has no custom domain; add one with `nx domains add {app} www.example.com`");
                return Ok(());
            }
            print!("{}", domain_table(&domains));
            Ok(())
        }
        DomainsCommand::Verify { app, domain } => {
            let d: DomainInfo =
                client.post(&format!("/v1/apps/{app}/domains/{domain}/verify"), &serde_json::json!({})).await?;
            if g.json {
                return print_json(&d);
            }
            println!("{} is verified and served by {app}", d.domain);
            if d.expires_at.is_none() {
                println!("its certificate is being obtained; `nx domains ls {app}` shows when it is there");
            }
            Ok(())
        }
        DomainsCommand::Rm { app, domain } => {
            client.delete::<()>(&format!("/v1/apps/{app}/domains/{domain}")).await?;
            if !g.json {
                println!("{domain} is no longer attached to {app}");
            }
            Ok(())
        }
    }
}
