//! `nx env set|unset|ls`: an app's variables. Values go to the server and are
//! never printed back.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};

use nx_protocol::api::{EnvChange, EnvChanged, EnvVar};

use super::{client, print_json, resolve_app};
use crate::cli::{EnvCommand, Global};
use crate::failure::Failure;
use crate::output::{age, paint, table, Color};

/// Splits `KEY=VALUE` arguments; at most one bare `KEY` takes its value from
/// stdin (a prompt without echo on a terminal).
fn parse_vars(vars: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut set = BTreeMap::new();
    let mut from_stdin = None;
    for v in vars {
        match v.split_once('=') {
            Some((k, value)) => {
                set.insert(k.to_owned(), value.to_owned());
            }
            None if from_stdin.is_some() => {
                return Err(Failure::Usage(format!(
                    "only one variable can be read from stdin; give {v} a value with {v}=VALUE"
                ))
                .into())
            }
            None => from_stdin = Some(v.clone()),
        }
    }
    if let Some(k) = from_stdin {
        let value = if std::io::stdin().is_terminal() {
            rpassword::prompt_password(format!("value of {k} (not shown): "))?
        } else {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            if text.is_empty() {
                return Err(Failure::Usage(nothing_piped(&k)).into());
            }
            text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_owned()
        };
        set.insert(k, value);
    }
    if let Some(k) = set.keys().find(|k| k.is_empty()) {
        return Err(Failure::Usage(format!("variable name {k:?} is empty; write KEY=VALUE")).into());
    }
    Ok(set)
}

/// Why a bare `KEY` got no value: nothing was piped in. Setting it empty
/// would change the app silently, and the usual cause is an app name given
/// without `--app`.
fn nothing_piped(key: &str) -> String {
    let mut why = format!(
        "no value for {key}: nothing was piped in; write {key}=VALUE (or {key}= for an empty value), or pipe the value in"
    );
    if key.chars().any(|c| c.is_ascii_lowercase()) {
        why.push_str(&format!("; to choose the app, use --app {key}"));
    }
    why
}

pub async fn run(g: &Global, cmd: EnvCommand) -> anyhow::Result<()> {
    let client = client(g)?;
    let (change, app) = match cmd {
        EnvCommand::Ls { app } => {
            let app = resolve_app(&client, g, app.app.as_deref()).await?;
            let vars: Vec<EnvVar> = client.get(&format!("/v1/apps/{app}/env")).await?;
            if g.json {
                return print_json(&vars);
            }
            if vars.is_empty() {
                println!("{app} has no variables; set one with `nx env set KEY=VALUE --app {app}`");
                return Ok(());
            }
            let now = chrono::Utc::now();
            let mut rows = vec![vec!["NAME".into(), "CHANGED".into()]];
            rows.extend(vars.iter().map(|v| vec![v.name.clone(), age(v.updated_at, now)]));
            print!("{}", table(&rows));
            return Ok(());
        }
        EnvCommand::Set { vars, app } => (EnvChange { set: parse_vars(&vars)?, unset: Vec::new() }, app),
        EnvCommand::Unset { names, app } => (EnvChange { set: BTreeMap::new(), unset: names }, app),
    };
    let app = resolve_app(&client, g, app.app.as_deref()).await?;
    if !g.json {
        eprintln!("updating {app}; running deployments restart with the new variables");
    }
    let changed: EnvChanged = client.patch(&format!("/v1/apps/{app}/env"), &change).await?;
    if g.json {
        print_json(&changed)?;
    } else {
        report(&app, &changed);
    }
    if changed.failed.is_empty() {
        Ok(())
    } else {
        let why: Vec<String> = changed.failed.iter().map(|(id, e)| format!("{id}: {e}")).collect();
        Err(Failure::Refused(format!(
            "the variables are saved, but not every deployment came back:\n  {}",
            why.join("\n  ")
        ))
        .into())
    }
}

fn report(app: &str, changed: &EnvChanged) {
    if changed.changed.is_empty() {
        println!("nothing changed in {app}");
        return;
    }
    println!("{app}: {} changed", changed.changed.join(", "));
    for id in &changed.restarted {
        println!("  {} restarted", paint(id.as_str(), Color::Bold));
    }
    if let Some(p) = &changed.production {
        println!(
            "  production is now {} (same binary, new variables): {}",
            paint(p.production.as_str(), Color::Bold),
            p.production_url
        );
        if let Some(prev) = &p.previous {
            println!("  {prev} stays up as the rollback target");
        }
    }
}
