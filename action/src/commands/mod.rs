//! One module per command group; [`run`] dispatches.

mod apps;
mod db;
mod deployments;
mod github;
mod keys;
mod login;
mod push;
mod verify;

use crate::cli::{Cli, Command};

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Login(args) => login::run(g, args).await,
        Command::Apps(cmd) => apps::run(g, cmd).await,
        Command::Push(args) => push::run(g, args).await,
        Command::Ls(args) => deployments::ls(g, args).await,
        Command::Promote(args) => deployments::promote(g, args).await,
        Command::Logs(args) => deployments::logs(g, args).await,
        Command::Keys(cmd) => keys::run(g, cmd).await,
        Command::Db(cmd) => db::run(g, cmd).await,
        Command::Stop(args) => deployments::stop(g, args).await,
        Command::Verify(args) => verify::run(g, args).await,
        Command::GithubAction => github::run(g).await,
    }
}

/// Prints `value` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The signed client for the configured server and key.
fn client(g: &crate::cli::Global) -> anyhow::Result<crate::client::Client> {
    let target = crate::config::resolve(g.server.as_deref(), g.key.as_deref())?;
    crate::client::Client::new(&target)
}
