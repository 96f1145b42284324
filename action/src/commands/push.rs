//! `nx push`: verify locally against the server's target, upload with progress,
//! wait for the health check, print the preview URL.

use std::collections::BTreeMap;

use nx_protocol::api::{DeploymentInfo, DeploymentState, Promotion, PushMeta, Source};
use nx_protocol::target::ServerTarget;
use nx_protocol::AppName;
use sha2::{Digest, Sha256};

use super::{client, print_json};
use crate::cli::{Global, PushArgs};
use crate::client::get_public;
use crate::failure::Failure;
use crate::output::{bytes, paint, state, Color};
use crate::progress::Progress;

/// Parses repeated `KEY=VALUE` flags.
pub fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut env = BTreeMap::new();
    for p in pairs {
        let (k, v) = p.split_once('=').ok_or_else(|| Failure::Usage(format!("--env {p:?} must be KEY=VALUE")))?;
        if k.is_empty() {
            return Err(Failure::Usage(format!("--env {p:?} has an empty name")));
        }
        env.insert(k.to_owned(), v.to_owned());
    }
    Ok(env)
}

pub async fn run(g: &Global, args: PushArgs) -> anyhow::Result<()> {
    let app = AppName::parse(&args.app).map_err(|e| Failure::Usage(e.to_string()))?;
    let env = parse_env(&args.env)?;
    let client = client(g)?;
    let data = tokio::fs::read(&args.path)
        .await
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", args.path.display())))?;
    let size = data.len() as u64;
    let sha256 = hex::encode(Sha256::digest(&data));

    if !args.skip_verify {
        let target: ServerTarget = get_public(client.server(), "/v1/target").await?;
        let report = nx_verify::inspect(&data);
        let verdict = nx_verify::judge(&report, &target);
        if !verdict.runs {
            return Err(Failure::Refused(format!(
                "{} will not run on the server ({}/{}):\n{}",
                args.path.display(),
                target.os,
                target.arch,
                verdict.problems.iter().map(|p| format!("  - {}\n    fix: {}", p.problem, p.remedy)).collect::<Vec<_>>().join("\n")
            ))
            .into());
        }
    }
    drop(data);

    let meta = PushMeta {
        args: args.args.clone(),
        env,
        filename: args.path.file_name().map(|f| f.to_string_lossy().into_owned()),
        source: Source::Cli,
        ..PushMeta::default()
    };
    let meta_json = serde_json::to_vec(&meta)?;
    eprintln!("pushing {} ({}, sha256:{}) to {}", args.path.display(), bytes(size), &sha256[..12], app);
    let progress = Progress::upload(size, "verifying and starting on the server", g.json);
    let path = format!("/v1/apps/{app}/deployments");
    let result: anyhow::Result<DeploymentInfo> = client.upload(&path, &args.path, &sha256, size, &meta_json, progress.clone()).await;
    progress.clear();
    let info = result?;

    let promotion = if args.promote && info.state == DeploymentState::Healthy {
        let p: Promotion = client.post(&format!("/v1/apps/{app}/deployments/{}/promote", info.id), &serde_json::json!({})).await?;
        Some(p)
    } else {
        None
    };
    if g.json {
        print_json(&serde_json::json!({ "deployment": info, "promotion": promotion }))?;
    } else {
        println!("{} {} {}", app, paint(info.id.as_str(), Color::Bold), state(info.state));
        println!("  preview:  {}", info.preview_url);
        println!("  digest:   sha256:{}", info.digest);
        if let Some(p) = &promotion {
            println!("  production: {}", p.production_url);
        }
    }
    if info.state != DeploymentState::Healthy {
        let mut msg = format!("deployment {} {}", info.id, info.state);
        if let Some(e) = &info.error {
            msg.push_str(&format!(": {e}"));
        }
        if !info.log_tail.is_empty() {
            msg.push_str("\nlast lines of its log:\n");
            msg.push_str(&info.log_tail.iter().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n"));
        }
        return Err(Failure::Refused(msg).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flags_parse() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        assert!(parse_env(&["NOEQUALS".into()]).is_err());
        assert!(parse_env(&["=v".into()]).is_err());
    }
}
