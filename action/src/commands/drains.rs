//! `nx drains`: where an app's logs (or every app's, `--platform`) are shipped.

use nx_protocol::api::{AddDrain, DrainInfo};

use super::{client, print_json};
use crate::cli::{DrainsCommand, Global};
use crate::output::{age, table};

/// The API path of the drains of APP, or the platform's, from the command's
/// positional words: `[APP] LAST` (APP absent with --platform).
fn split(platform: bool, mut args: Vec<String>, last: &str) -> anyhow::Result<(String, String)> {
    let value = match args.pop() {
        Some(v) => v,
        None => anyhow::bail!("give the {last}"),
    };
    match (platform, args.pop()) {
        (true, None) => Ok(("/v1/drains".into(), value)),
        (true, Some(app)) => {
            anyhow::bail!("--platform takes no app ({app}); write `nx drains ... --platform {last}` or drop --platform")
        }
        (false, Some(app)) => Ok((format!("/v1/apps/{app}/drains"), value)),
        (false, None) => anyhow::bail!("give the app, then the {last} (or --platform for every app's)"),
    }
}

pub async fn run(g: &Global, cmd: DrainsCommand) -> anyhow::Result<()> {
    let client = client(g)?;
    match cmd {
        DrainsCommand::Add { args, platform } => {
            let (path, url) = split(platform, args, "URL")?;
            let d: DrainInfo = client.post(&path, &AddDrain { url }).await?;
            if g.json {
                return print_json(&d);
            }
            let whose = d.app.as_deref().map_or_else(|| "every app's".to_owned(), |a| format!("{a}'s"));
            println!("{} ships {whose} logs to {}", d.id, d.url);
            Ok(())
        }
        // Clap requires an app unless --platform is given, and refuses both.
        DrainsCommand::Ls { app, platform: _ } => {
            let path = match &app {
                Some(app) => format!("/v1/apps/{app}/drains"),
                None => "/v1/drains".to_owned(),
            };
            let drains: Vec<DrainInfo> = client.get(&path).await?;
            if g.json {
                return print_json(&drains);
            }
            if drains.is_empty() {
                match &app {
                    Some(app) => {
                        println!("{app} has no log drain; add one with `nx drains add {app} syslog+tls://HOST:PORT`")
                    }
                    None => println!("no platform-wide log drain; add one with `nx drains add --platform URL`"),
                }
                return Ok(());
            }
            let now = chrono::Utc::now();
            let mut rows = vec![vec!["ID".into(), "URL".into(), "ADDED".into(), "BY".into()]];
            for d in &drains {
                rows.push(vec![d.id.clone(), d.url.clone(), age(d.created_at, now), d.created_by.clone()]);
            }
            print!("{}", table(&rows));
            Ok(())
        }
        DrainsCommand::Rm { args, platform } => {
            let (path, id) = split(platform, args, "ID")?;
            client.delete::<()>(&format!("{path}/{id}")).await?;
            if !g.json {
                println!("{id} removed; nothing more is shipped to it");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_words_name_an_apps_drains_or_the_platforms() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            split(false, words(&["web", "https://x.example/in"]), "URL").unwrap_or_default(),
            ("/v1/apps/web/drains".into(), "https://x.example/in".into())
        );
        assert_eq!(split(true, words(&["dr1"]), "ID").unwrap_or_default(), ("/v1/drains".into(), "dr1".into()));
        let e = split(false, words(&["https://x.example/in"]), "URL").unwrap_err().to_string();
        assert_eq!(e, "give the app, then the URL (or --platform for every app's)");
        let e = split(true, words(&["web", "dr1"]), "ID").unwrap_err().to_string();
        assert_eq!(e, "--platform takes no app (web); write `nx drains ... --platform ID` or drop --platform");
    }
}
