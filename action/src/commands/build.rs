//! `nx build`: build the project in a directory for the server, then check
//! the result will run there.

use std::path::{Path, PathBuf};

use super::print_json;
use crate::build::{plan, Host};
use crate::cli::{BuildArgs, Global};
use crate::failure::Failure;
use crate::manifest::Manifest;
use crate::output::bytes;
use nx_protocol::target::ServerTarget;

/// Builds the project in `dir` (with its nx.toml, `manifest`, already read)
/// for `target`, copies the binary to `output` when given, and verifies it
/// against `target`. Returns where the binary is.
pub async fn build_dir(
    dir: &Path,
    manifest: Option<&Manifest>,
    output: Option<&Path>,
    target: &ServerTarget,
) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Failure::Usage(format!("{} is not a directory", dir.display())).into());
    }
    let plan = plan(dir, manifest, target, &Host::probe())?;
    eprintln!(
        "building the {} in {} for {}/{}:\n  {}",
        plan.kind,
        dir.display(),
        target.os,
        target.arch,
        plan.display()
    );
    let built = tokio::task::spawn_blocking(move || crate::build::run(&plan)).await??;
    let binary = match output {
        Some(o) => {
            std::fs::copy(&built, o).map_err(|e| Failure::Usage(format!("cannot write {}: {e}", o.display())))?;
            o.to_owned()
        }
        None => built,
    };
    let data =
        tokio::fs::read(&binary).await.map_err(|e| Failure::Usage(format!("cannot read {}: {e}", binary.display())))?;
    if let Some(refused) = super::verify::refusal(&binary, &data, target) {
        return Err(refused.into());
    }
    eprintln!(
        "built {} ({}); it will run on {}/{}",
        binary.display(),
        bytes(data.len() as u64),
        target.os,
        target.arch
    );
    Ok(binary)
}

pub async fn run(g: &Global, args: BuildArgs) -> anyhow::Result<()> {
    let target = super::verify::server_target(g, args.target.as_deref()).await?;
    let manifest = crate::manifest::load_for(&args.dir, g.manifest.as_deref())?;
    let binary = build_dir(&args.dir, manifest.as_ref().map(|(_, m)| m), args.output.as_deref(), &target).await?;
    if g.json {
        print_json(&serde_json::json!({ "binary": binary }))
    } else {
        println!("{}", binary.display());
        Ok(())
    }
}
