//! `nx apps create|ls|set|rm`.

use nx_protocol::api::{AppInfo, CreateApp, CreatedApp, HealthSetting, Role, SetGitHub, WorkflowTrust};
use nx_protocol::AppName;

use super::{client, print_json};
use crate::cli::{AppsCommand, Global};
use crate::failure::Failure;
use crate::output::{paint, table, Color};

/// Asks for the app's name on the terminal before a removal.
fn confirm_removal(info: &AppInfo) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    let name = info.name.as_str();
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "removing {name} cannot be undone; pass --yes to remove it without a prompt"
        ))
        .into());
    }
    eprint!(
        "This removes app {name} for good: its database {}, its data volume, every deployment, key and backup.\n\
         Take a backup first with `nx db backup {name}` if you may need the data.\n\
         Type the app's name to remove it: ",
        info.database
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != name {
        return Err(Failure::Refused(format!("{name} was not removed: the name typed did not match")).into());
    }
    Ok(())
}

pub async fn run(g: &Global, cmd: AppsCommand) -> anyhow::Result<()> {
    let client = client(g)?;
    match cmd {
        AppsCommand::Create { name } => {
            let name = AppName::parse(&name).map_err(|e| Failure::Usage(e.to_string()))?;
            let created: CreatedApp = client.post("/v1/apps", &CreateApp { name }).await?;
            if g.json {
                return print_json(&created);
            }
            println!(
                "created app {} (database {})",
                paint(created.app.name.as_str(), Color::Bold),
                created.app.database
            );
            println!("production URL: {}", created.app.production_url);
            println!(
                "deploy key (shown once, store it as a secret, e.g. NX_KEY in GitHub):\n\n    {}\n",
                created.deploy_key
            );
            Ok(())
        }
        AppsCommand::Set(args) => {
            let args = *args;
            // The link first: its own call, the admin's alone.
            let link = match (args.github_repo.as_deref(), args.github_trust.as_deref()) {
                (Some("none"), _) => Some(SetGitHub { repository: None, trust: None }),
                (Some(repo), _) => Some(SetGitHub { repository: Some(repo.to_owned()), trust: None }),
                (None, Some(spec)) => {
                    let (repository, trust) = WorkflowTrust::parse(spec)
                        .map_err(|e| Failure::Usage(format!("--github-trust {spec}: {e}")))?;
                    Some(SetGitHub { repository: Some(repository), trust: Some(trust) })
                }
                (None, None) => None,
            };
            if let Some(link) = &link {
                client.put::<_, AppInfo>(&format!("/v1/apps/{}/github", args.app), link).await?;
            }
            let mut info: AppInfo = client.get(&format!("/v1/apps/{}", args.app)).await?;
            let l = &mut info.settings.limits;
            let mib = |b: u64| (b >> 20).max(1);
            l.memory_mib = args.memory.map(mib).or(l.memory_mib);
            l.cpu = args.cpu.or(l.cpu);
            l.pids = args.pids.or(l.pids);
            l.nofile = args.nofile.or(l.nofile);
            l.tmp_mib = args.tmp.map(mib).or(l.tmp_mib);
            l.data_mib = args.data.map(mib).or(l.data_mib);
            if let Some(path) = args.health_path {
                info.settings.health = Some(HealthSetting::Http { path });
            } else if args.health_tcp {
                info.settings.health = Some(HealthSetting::Tcp);
            }
            if let Some(mode) = args.preview_db {
                info.settings.preview_db = serde_json::from_value(serde_json::Value::String(mode))?;
            }
            if !args.args.is_empty() || args.args_clear {
                info.settings.args = args.args.clone();
            }
            if let Some(on) = args.promote_on {
                info.settings.promote_on = serde_json::from_value(serde_json::Value::String(on))?;
            }
            if let Some(forks) = args.preview_forks {
                info.settings.preview_forks = serde_json::from_value(serde_json::Value::String(forks))?;
            }
            if let Some(label) = args.fork_label {
                info.settings.fork_label = Some(label);
            }
            let role = |default: Role| match args.role.as_deref() {
                Some("production") => Role::Production,
                Some(_) => Role::Preview,
                None => default,
            };
            if let Some(after) = &args.sleep_after {
                info.settings
                    .scale
                    .set(role(Role::Preview), after)
                    .map_err(|e| Failure::Usage(format!("--sleep-after: {e}")))?;
            }
            if let Some(n) = args.replicas {
                match role(Role::Production) {
                    Role::Production => info.settings.scale.replicas = Some(n),
                    Role::Preview => info.settings.scale.preview_replicas = Some(n),
                }
            }
            let updated: AppInfo = client.put(&format!("/v1/apps/{}/settings", args.app), &info.settings).await?;
            if g.json {
                return print_json(&updated);
            }
            println!("settings of {} saved; deployments started from now on use them", updated.name);
            if let Some(link) = &updated.settings.github {
                match &link.trust {
                    Some(trust) => println!(
                        "GitHub: linked to {}; runs of {} may push with their OIDC token, no deploy key needed",
                        link.repository,
                        trust.spec(&link.repository)
                    ),
                    None => match link.id {
                        Some(id) => println!("GitHub: linked to {} (repository id {id})", link.repository),
                        None => println!(
                            "GitHub: linked to {}, whose id GitHub did not give the receiver (no --github-token or \
                             GitHub App, or it cannot see the repository): webhooks and reports wait until it is \
                             known, from a push of the admin token or one proved by a trusted workflow's OIDC token",
                            link.repository
                        ),
                    },
                }
            }
            Ok(())
        }
        AppsCommand::Rm { name, yes } => {
            // Say what goes before anything goes: an unknown name or a deploy
            // key is refused here, with the server's explanation.
            let info: AppInfo = client.get(&format!("/v1/apps/{name}")).await?;
            if !yes {
                confirm_removal(&info)?;
            }
            client.delete::<()>(&format!("/v1/apps/{name}?confirm={name}")).await?;
            if g.json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("app {name} removed, with its database, data, deployments, keys and backups");
            Ok(())
        }
        AppsCommand::Ls => {
            let apps: Vec<AppInfo> = client.get("/v1/apps").await?;
            if g.json {
                return print_json(&apps);
            }
            let mut rows = vec![vec!["APP".into(), "PRODUCTION".into(), "URL".into()]];
            for a in &apps {
                let prod = a.production.as_ref().map_or_else(|| paint("-", Color::Dim), ToString::to_string);
                rows.push(vec![a.name.to_string(), prod, a.production_url.clone()]);
            }
            print!("{}", table(&rows));
            for a in &apps {
                if let Some(quota) = a.database_quota {
                    eprintln!("{}: {quota}", a.name);
                }
            }
            Ok(())
        }
    }
}
