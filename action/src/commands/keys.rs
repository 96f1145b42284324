//! `nx keys`: deploy keys, SSH keys for SFTP uploads, and the admin token.

use nx_protocol::api::{AddSshKey, CreatedKey, KeyInfo, SshKeyInfo};

use super::{client, print_json};
use crate::cli::{Global, KeysCommand};
use crate::failure::Failure;
use crate::output::{age, paint, table, Color};

fn show_created(g: &Global, k: &CreatedKey, what: &str) -> anyhow::Result<()> {
    if g.json {
        return print_json(k);
    }
    if let Some(old) = &k.replaces {
        println!("{old} no longer works.");
    }
    println!(
        "{what} {} (shown once; store it now, for example as the NX_KEY secret):\n\n    {}\n",
        k.info.id, k.secret
    );
    Ok(())
}

/// Keys as a table: id, kind, age, last use and whether they still work.
fn key_table(keys: Vec<KeyInfo>) -> String {
    let now = chrono::Utc::now();
    let mut rows = vec![vec!["ID".into(), "KIND".into(), "CREATED".into(), "LAST USED".into(), "STATE".into()]];
    for k in keys {
        let state = match k.revoked_at {
            Some(t) => paint(&format!("revoked {}", age(t, now)), Color::Dim),
            None => paint("live", Color::Green),
        };
        rows.push(vec![
            k.id,
            k.kind,
            age(k.created_at, now),
            k.last_used_at.map_or_else(|| "never".into(), |t| age(t, now)),
            state,
        ]);
    }
    table(&rows)
}

pub async fn run(g: &Global, cmd: KeysCommand) -> anyhow::Result<()> {
    let client = client(g)?;
    let empty = serde_json::json!({});
    match cmd {
        KeysCommand::Create { app: Some(app), .. } => {
            let k: CreatedKey = client.post(&format!("/v1/apps/{app}/keys"), &empty).await?;
            show_created(g, &k, "new deploy key")
        }
        KeysCommand::Create { app: None, .. } => {
            let k: CreatedKey = client.post("/v1/keys", &empty).await?;
            show_created(g, &k, "new read-only key")
        }
        KeysCommand::RevokeReadOnly { key_id } => {
            let k: KeyInfo = client.delete(&format!("/v1/keys/{key_id}")).await?;
            if g.json {
                return print_json(&k);
            }
            println!("read-only key {} revoked", k.id);
            Ok(())
        }
        KeysCommand::Ls { app: None } => {
            let keys: Vec<KeyInfo> = client.get("/v1/keys").await?;
            if g.json {
                return print_json(&serde_json::json!({ "platform_keys": keys }));
            }
            print!("{}", key_table(keys));
            Ok(())
        }
        KeysCommand::Rotate { app, key_id } => {
            let k: CreatedKey = client.post(&format!("/v1/apps/{app}/keys/{key_id}/rotate"), &empty).await?;
            show_created(g, &k, "new deploy key")
        }
        KeysCommand::RotateAdmin => {
            let k: CreatedKey = client.post("/v1/admin/token", &empty).await?;
            show_created(g, &k, "new admin token, id")?;
            if !g.json {
                eprintln!("run `nx login --key NEW_TOKEN` if your config file held the old one");
            }
            Ok(())
        }
        KeysCommand::AddSsh { app, file } => {
            let public_key = std::fs::read_to_string(&file)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?;
            if public_key.contains("PRIVATE KEY") {
                return Err(Failure::Usage(format!(
                    "{} is a private key; give its .pub file, which is safe to share",
                    file.display()
                ))
                .into());
            }
            let k: SshKeyInfo = client.post(&format!("/v1/apps/{app}/ssh-keys"), &AddSshKey { public_key }).await?;
            if g.json {
                return print_json(&k);
            }
            println!(
                "{} ({} {}) may now upload to {app} over SFTP, as {}",
                k.id, k.algorithm, k.fingerprint, k.comment
            );
            Ok(())
        }
        KeysCommand::Revoke { app, key_id } if key_id.starts_with("ssh_") => {
            client.delete::<()>(&format!("/v1/apps/{app}/ssh-keys/{key_id}")).await?;
            if g.json {
                return print_json(&serde_json::json!({ "removed": key_id }));
            }
            println!("SSH key {key_id} of {app} removed");
            Ok(())
        }
        KeysCommand::Revoke { app, key_id } => {
            let k: KeyInfo = client.delete(&format!("/v1/apps/{app}/keys/{key_id}")).await?;
            if g.json {
                return print_json(&k);
            }
            println!("key {} of {app} revoked", k.id);
            Ok(())
        }
        KeysCommand::Ls { app: Some(app) } => {
            let keys: Vec<KeyInfo> = client.get(&format!("/v1/apps/{app}/keys")).await?;
            let ssh: Vec<SshKeyInfo> = client.get(&format!("/v1/apps/{app}/ssh-keys")).await?;
            if g.json {
                return print_json(&serde_json::json!({ "deploy_keys": keys, "ssh_keys": ssh }));
            }
            let now = chrono::Utc::now();
            print!("{}", key_table(keys));
            if !ssh.is_empty() {
                let mut rows = vec![vec!["SSH KEY".into(), "FINGERPRINT".into(), "COMMENT".into(), "LAST USED".into()]];
                for k in ssh {
                    rows.push(vec![
                        k.id,
                        k.fingerprint,
                        k.comment,
                        k.last_used_at.map_or_else(|| "never".into(), |t| age(t, now)),
                    ]);
                }
                print!("\n{}", table(&rows));
            }
            Ok(())
        }
    }
}
