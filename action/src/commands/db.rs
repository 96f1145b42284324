//! `nx db`: credentials, backups and restores of an app's database.

use std::io::Write;
use std::path::Path;

use futures_util::StreamExt;
use nx_protocol::api::{BackupInfo, DbCredentials};
use nx_protocol::auth::HEADER_CONTENT_SHA256;
use sha2::{Digest, Sha256};

use super::{client, print_json};
use crate::cli::{DbCommand, Global};
use crate::failure::Failure;
use crate::output::{age, bytes, table};
use crate::progress::Progress;

pub async fn run(g: &Global, cmd: DbCommand) -> anyhow::Result<()> {
    let client = client(g)?;
    match cmd {
        DbCommand::Url { app } => {
            let c: DbCredentials = client.get(&format!("/v1/apps/{app}/db")).await?;
            if g.json {
                return print_json(&c);
            }
            println!("{}", c.url);
            Ok(())
        }
        DbCommand::Backup { app, store: true, keep, .. } => {
            eprintln!("dumping {app}'s database, checking the dump restores, storing it");
            let b: BackupInfo =
                client.post(&format!("/v1/apps/{app}/db/backups?keep={keep}"), &serde_json::json!({})).await?;
            if g.json {
                return print_json(&b);
            }
            println!("backup {} stored ({}, sha256:{}), verified by a restore", b.id, bytes(b.size), &b.sha256[..12]);
            Ok(())
        }
        DbCommand::Backup { app, output, .. } => {
            let path =
                output.unwrap_or_else(|| format!("{app}-{}.dump", chrono::Utc::now().format("%Y%m%dT%H%M%SZ")).into());
            download(&client, &app, &path, g.json).await?;
            if g.json {
                return print_json(&serde_json::json!({ "file": path }));
            }
            Ok(())
        }
        DbCommand::Backups { app } => {
            let list: Vec<BackupInfo> = client.get(&format!("/v1/apps/{app}/db/backups")).await?;
            if g.json {
                return print_json(&list);
            }
            let now = chrono::Utc::now();
            let mut rows = vec![vec!["ID".into(), "AGE".into(), "SIZE".into(), "SHA256".into(), "VERIFIED".into()]];
            for b in list {
                rows.push(vec![
                    b.id.to_string(),
                    age(b.created_at, now),
                    bytes(b.size),
                    b.sha256[..12].to_owned(),
                    if b.verified_at.is_some() { "yes".into() } else { "no".into() },
                ]);
            }
            print!("{}", table(&rows));
            Ok(())
        }
        DbCommand::Restore { app, file } => {
            let data = tokio::fs::read(&file)
                .await
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?;
            let sha = hex::encode(Sha256::digest(&data));
            let progress = Progress::upload(data.len() as u64, "restoring on the server", g.json);
            let result: anyhow::Result<serde_json::Value> = client
                .upload_empty_answer(&format!("/v1/apps/{app}/db/restore"), data.into(), &sha, progress.clone())
                .await;
            progress.clear();
            result?;
            if !g.json {
                println!("{app}'s database now holds the data of {}", file.display());
            }
            Ok(())
        }
    }
}

/// Streams the dump into `path.partial`, checks its length and sha256 against
/// what the server sent, then renames it into place.
async fn download(client: &crate::client::Client, app: &str, path: &Path, quiet: bool) -> anyhow::Result<()> {
    let resp = client.get_stream(&format!("/v1/apps/{app}/db/dump")).await?;
    let expected_sha = resp.headers().get(HEADER_CONTENT_SHA256).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let size = resp.content_length().unwrap_or(0);
    let partial = path.with_extension("partial");
    let mut out = std::fs::File::create(&partial)
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", partial.display())))?;
    let progress = Progress::upload(size, "done", quiet);
    let mut hasher = Sha256::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Failure::Unreachable(format!("the download broke off: {e}")))?;
        hasher.update(&chunk);
        out.write_all(&chunk)?;
        progress.advance(chunk.len() as u64);
    }
    progress.clear();
    out.sync_all()?;
    let sha = hex::encode(hasher.finalize());
    if expected_sha.as_deref() != Some(sha.as_str()) {
        let _ = std::fs::remove_file(&partial);
        return Err(Failure::Refused(format!(
            "the dump arrived damaged (sha256 {sha}, the server said {expected_sha:?}); try again"
        ))
        .into());
    }
    std::fs::rename(&partial, path)?;
    if !quiet {
        eprintln!("saved {} ({}, sha256:{})", path.display(), bytes(progress.position()), &sha[..12]);
    }
    Ok(())
}
