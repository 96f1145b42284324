//! One module per command group; [`run`] dispatches.

mod apps;
mod build;
mod db;
mod deployments;
mod domains;
mod drains;
mod env;
mod events;
mod github;
mod keys;
mod login;
mod metrics;
mod push;
mod status;
mod verify;

use nx_protocol::api::AppInfo;

use crate::cli::{Cli, Command, Global};
use crate::client::Client;
use crate::failure::Failure;

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Login => login::run(g).await,
        Command::Apps(cmd) => apps::run(g, cmd).await,
        Command::Build(args) => build::run(g, args).await,
        Command::Push(args) => push::run(g, args).await,
        Command::Ls(args) => deployments::ls(g, args).await,
        Command::Promote(args) => deployments::promote(g, args).await,
        Command::Rollback(args) => deployments::rollback(g, args).await,
        Command::Logs(args) => deployments::logs(g, args).await,
        Command::Keys(cmd) => keys::run(g, cmd).await,
        Command::Domains(cmd) => domains::run(g, cmd).await,
        Command::Drains(cmd) => drains::run(g, cmd).await,
        Command::Db(cmd) => db::run(g, cmd).await,
        Command::Stop(args) => deployments::stop(g, args).await,
        Command::Env(cmd) => env::run(g, cmd).await,
        Command::Open(args) => deployments::open(g, args).await,
        Command::Status => status::run(g).await,
        Command::Events(args) => events::run(g, args).await,
        Command::Top(args) => metrics::top(g, args).await,
        Command::Metrics(args) => metrics::app(g, args).await,
        Command::Verify(args) => verify::run(g, args).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "nx", &mut std::io::stdout());
            Ok(())
        }
        Command::GithubAction => github::run(g).await,
    }
}

/// Prints `value` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The signed client for the configured server and key.
fn client(g: &Global) -> anyhow::Result<Client> {
    let target = crate::config::resolve(g.server.as_deref(), g.key.as_deref(), g.insecure)?;
    Client::new(&target)
}

/// The app a command acts on: `--app`, else `app` in nx.toml, else the only
/// app the key can see.
async fn resolve_app(client: &Client, g: &Global, flag: Option<&str>) -> anyhow::Result<String> {
    let named = match flag {
        Some(app) => Some(app.to_owned()),
        None => crate::manifest::load(g.manifest.as_deref())?.and_then(|(_, m)| m.app),
    };
    named_or_only_app(client, named).await
}

/// `named`, else the only app the key can see.
async fn named_or_only_app(client: &Client, named: Option<String>) -> anyhow::Result<String> {
    if let Some(app) = named {
        return Ok(app);
    }
    let apps: Vec<AppInfo> = client.get("/v1/apps").await?;
    match apps.as_slice() {
        [only] => Ok(only.name.to_string()),
        [] => Err(Failure::Usage("there are no apps yet; create one with `nx apps create NAME`".into()).into()),
        many => Err(Failure::Usage(format!(
            "name the app with --app, or with `app = \"NAME\"` in nx.toml; the apps are: {}",
            many.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
        ))
        .into()),
    }
}
