//! `nx ls`, `nx promote`, `nx rollback`, `nx logs`, `nx stop` and `nx open`.

use nx_protocol::api::{AppInfo, ClosedPull, DeploymentInfo, Promotion, ReplicaState};

use super::{client, print_json, resolve_app};
use crate::cli::{AppArg, Global, LogsArgs, LsArgs, OpenArgs, PromoteArgs, StopArgs};
use crate::client::Client;
use crate::failure::Failure;
use crate::output::{age, paint, state, table, Color};

pub async fn ls(g: &Global, args: LsArgs) -> anyhow::Result<()> {
    let client = client(g)?;
    let apps: Vec<AppInfo> = match &args.app {
        Some(a) => vec![client.get(&format!("/v1/apps/{a}")).await?],
        None => client.get("/v1/apps").await?,
    };
    let mut listing = Vec::new();
    for app in apps {
        let deployments: Vec<DeploymentInfo> = client.get(&format!("/v1/apps/{}/deployments", app.name)).await?;
        listing.push((app, deployments));
    }
    if g.json {
        let v: Vec<_> = listing.iter().map(|(a, d)| serde_json::json!({ "app": a, "deployments": d })).collect();
        return print_json(&v);
    }
    if listing.is_empty() {
        println!("no apps yet; create one with `nx apps create NAME`");
    }
    let now = chrono::Utc::now();
    for (app, deployments) in listing {
        println!("{}  {}", paint(app.name.as_str(), Color::Bold), app.production_url);
        if deployments.is_empty() {
            println!("  no deployments yet; push one with `nx push BINARY --app {}`", app.name);
            continue;
        }
        let mut rows =
            vec![vec!["  ID".into(), "STATE".into(), "AGE".into(), "DIGEST".into(), "PR".into(), "URL".into()]];
        // What an OIDC token proved about a push, under the table.
        let proved: Vec<String> = deployments
            .iter()
            .filter_map(|d| {
                let p = d.github.as_ref()?;
                Some(format!(
                    "  {} pushed by the GitHub workflow {} ({} of {} at {}, repository {} id {}, run by {})",
                    d.id,
                    p.workflow_ref,
                    p.event_name,
                    p.git_ref,
                    &p.sha[..p.sha.len().min(12)],
                    p.repository,
                    p.repository_id,
                    p.actor
                ))
            })
            .collect();
        let replicas: Vec<String> = deployments.iter().flat_map(replica_lines).collect();
        for d in deployments {
            let id = if d.production { format!("* {}", d.id) } else { format!("  {}", d.id) };
            rows.push(vec![
                id,
                state(d.state),
                age(d.created_at, now),
                d.digest[..12].to_owned(),
                d.pr.map_or_else(|| "-".into(), |p| format!("#{p}")),
                d.preview_url,
                limits(&d.limits),
            ]);
        }
        print!("{}", table(&rows));
        for line in replicas {
            println!("{line}");
        }
        for line in proved {
            println!("{}", nx_protocol::logs::neutralise(&line));
        }
    }
    Ok(())
}

/// One line per running replica of `d`: "  ab3k9x2m replica 1 (port
/// 20005): healthy, up 3m, 2 restarts, last exit: signal 9 (SIGKILL), killed for memory";
/// an unhealthy one says whether it is still routed, and why it is unhealthy last.
fn replica_lines(d: &DeploymentInfo) -> Vec<String> {
    d.replicas
        .iter()
        .map(|r| {
            let mut line = format!("  {} replica {} (port {}): {}", d.id, r.index, r.port, r.state.as_str());
            if r.state == ReplicaState::Unhealthy {
                line.push_str(if r.routed { ", still routed (no replica is healthy)" } else { ", not routed" });
            }
            if let Some(up) = r.uptime_secs {
                line.push_str(&format!(", up {}", uptime(up)));
            }
            line.push_str(&format!(", {} restart{}", r.restarts, if r.restarts == 1 { "" } else { "s" }));
            if let Some(exit) = &r.last_exit {
                line.push_str(&format!(", last exit: {exit}"));
                if r.oom_killed {
                    line.push_str(", killed for memory");
                }
            }
            if let Some(error) = &r.error {
                line.push_str(&format!("; {}", nx_protocol::logs::neutralise(error)));
            }
            line
        })
        .collect()
}

/// "42s", "3m", "5h", "2d".
fn uptime(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// The app a deployment belongs to, searched across the apps the key sees.
pub async fn app_of(client: &Client, id: &str) -> anyhow::Result<String> {
    let apps: Vec<AppInfo> = client.get("/v1/apps").await?;
    for app in apps {
        let deployments: Vec<DeploymentInfo> = client.get(&format!("/v1/apps/{}/deployments", app.name)).await?;
        if deployments.iter().any(|d| d.id.as_str() == id) {
            return Ok(app.name.to_string());
        }
    }
    Err(Failure::Refused(format!("no deployment {id} among your apps; `nx ls` lists them")).into())
}

pub async fn promote(g: &Global, args: PromoteArgs) -> anyhow::Result<()> {
    let client = client(g)?;
    let app = match args.app {
        Some(a) => a,
        None => app_of(&client, &args.deployment).await?,
    };
    let p: Promotion =
        client.post(&format!("/v1/apps/{app}/deployments/{}/promote", args.deployment), &serde_json::json!({})).await?;
    print_promotion(g, &p)
}

fn print_promotion(g: &Global, p: &Promotion) -> anyhow::Result<()> {
    if g.json {
        return print_json(p);
    }
    println!("{} is now production of {}: {}", paint(p.production.as_str(), Color::Bold), p.app, p.production_url);
    if let Some(prev) = &p.previous {
        println!("previous production {prev} stays up for a rollback (`nx rollback --app {}`)", p.app);
    }
    Ok(())
}

pub async fn rollback(g: &Global, args: AppArg) -> anyhow::Result<()> {
    let client = client(g)?;
    let app = resolve_app(&client, g, args.app.as_deref()).await?;
    let p: Promotion = client.post(&format!("/v1/apps/{app}/rollback"), &serde_json::json!({})).await?;
    print_promotion(g, &p)
}

/// "memory 512 MiB (cgroup v1), cpu 1.0 cores (cgroup v1), ... data 1 GiB (NOT ENFORCED)".
fn limits(all: &[nx_protocol::api::Enforcement]) -> String {
    all.iter()
        .map(|e| match &e.by {
            Some(by) => format!("{} {} ({by})", e.limit, e.value),
            None => paint(&format!("{} {} (NOT ENFORCED)", e.limit, e.value), Color::Red),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn logs(g: &Global, args: LogsArgs) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use std::io::Write;
    let client = client(g)?;
    let app = match args.app {
        Some(a) => a,
        None => app_of(&client, &args.deployment).await?,
    };
    let path =
        format!("/v1/apps/{app}/deployments/{}/logs?lines={}&follow={}", args.deployment, args.lines, args.follow);
    let resp = client.get_stream(&path).await?;
    let mut body = resp.bytes_stream();
    let neutral = !args.raw && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut out = std::io::stdout().lock();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Failure::Unreachable(format!("the log stream broke off: {e}")))?;
        if neutral {
            write_neutralised(&mut out, &mut pending, &chunk)?;
        } else {
            out.write_all(&chunk)?;
        }
        out.flush()?;
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        write_neutralised(&mut out, &mut Vec::new(), &pending)?;
    }
    Ok(())
}

/// Writes the whole lines of `pending` and `chunk` with what a terminal would
/// act on shown as escapes; keeps an unfinished line in `pending` (a chunk may
/// end inside a line, or inside a character).
fn write_neutralised(out: &mut impl std::io::Write, pending: &mut Vec<u8>, chunk: &[u8]) -> std::io::Result<()> {
    pending.extend_from_slice(chunk);
    let Some(end) = pending.iter().rposition(|b| *b == b'\n') else { return Ok(()) };
    let lines: Vec<u8> = pending.drain(..=end).collect();
    for line in String::from_utf8_lossy(&lines[..end]).split('\n') {
        writeln!(out, "{}", nx_protocol::logs::neutralise(line))?;
    }
    Ok(())
}

pub async fn stop(g: &Global, args: StopArgs) -> anyhow::Result<()> {
    let client = client(g)?;
    if let Some(pr) = args.pr {
        let app = resolve_app(&client, g, args.app.as_deref()).await?;
        let closed: ClosedPull =
            client.post(&format!("/v1/apps/{app}/pulls/{pr}/close"), &serde_json::json!({})).await?;
        if g.json {
            return print_json(&closed);
        }
        if closed.stopped.is_empty() {
            println!("no running previews of pull request #{pr} in {app}");
        }
        for id in &closed.stopped {
            println!("{id} of {app} stopped (pull request #{pr})");
        }
        return Ok(());
    }
    let id = args.deployment.unwrap_or_default();
    let app = match args.app {
        Some(a) => a,
        None => app_of(&client, &id).await?,
    };
    let d: DeploymentInfo =
        client.post(&format!("/v1/apps/{app}/deployments/{id}/stop"), &serde_json::json!({})).await?;
    if g.json {
        return print_json(&d);
    }
    println!("{} of {app} stopped; {} now says so", d.id, d.preview_url);
    Ok(())
}

pub async fn open(g: &Global, args: OpenArgs) -> anyhow::Result<()> {
    let client = client(g)?;
    let url = match &args.deployment {
        Some(id) => {
            let app = match &args.app.app {
                Some(a) => a.clone(),
                None => app_of(&client, id).await?,
            };
            client.get::<DeploymentInfo>(&format!("/v1/apps/{app}/deployments/{id}")).await?.preview_url
        }
        None => {
            let app = resolve_app(&client, g, args.app.app.as_deref()).await?;
            let info: AppInfo = client.get(&format!("/v1/apps/{app}")).await?;
            if info.production.is_none() {
                return Err(Failure::Refused(format!(
                    "{app} has no production yet; `nx promote ID` makes one, or `nx open ID` opens a preview"
                ))
                .into());
            }
            info.production_url
        }
    };
    if g.json {
        return print_json(&serde_json::json!({ "url": url }));
    }
    match crate::browser::open(&url) {
        Ok(how) => eprintln!("opened {url} with {how}"),
        Err(why) => {
            eprintln!("{why}; the URL:");
            println!("{url}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod log_tests {
    use super::write_neutralised;

    #[test]
    fn lines_split_across_chunks_are_neutralised_whole() {
        let text = "2026-01-01T00:00:00.000Z \u{1b}]0;pwned\u{7}é\r[nx] fake\n2026-01-01T00:00:01.000Z ok\tdone\n";
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut pending = Vec::new();
        // Cut inside the escape sequence and inside the two bytes of é.
        let e_acute = text.find('é').unwrap();
        for part in [&bytes[..27], &bytes[27..e_acute + 1], &bytes[e_acute + 1..]] {
            write_neutralised(&mut out, &mut pending, part).unwrap();
        }
        assert!(pending.is_empty());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-01-01T00:00:00.000Z \\x1b]0;pwned\\x07é\\x0d[nx] fake\n2026-01-01T00:00:01.000Z ok\tdone\n"
        );
    }
}
