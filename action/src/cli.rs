//! The command line, as clap sees it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nx_protocol::units::parse_size;

const EXAMPLES: &str = "\
Examples:
  nx login --server http://127.0.0.1:8070 --key nxa_...
  nx apps create web
  nx push ./server --app web --arg --port --arg '$PORT'
  nx build -o server && nx push server     # or just: nx push .
  nx ls web
  nx promote 7kq3mz2a --app web
  nx rollback --app web
  nx env set DATABASE_POOL=10 --app web
  printf %s \"$SECRET\" | nx env set API_KEY --app web
  nx logs -f 7kq3mz2a
  nx verify ./server --server http://127.0.0.1:8070

Commands that take --app find it in nx.toml when it is not given, or use the
only app the key can see.

Environment: NX_SERVER and NX_KEY override the config file `nx login` writes;
NX_MANIFEST names the nx.toml to read; NO_COLOR turns colour off.

Exit codes: 0 success; 1 refused or failed (a binary that will not run, a
deployment that failed); 2 usage, configuration or local error; 3 the server
could not be reached.";

/// Push a binary, get a preview URL, promote it to production.
#[derive(Debug, Parser)]
#[command(name = "nx", version, about, after_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Receiver URL; overrides NX_SERVER and the config file.
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Deploy key or admin token; overrides NX_KEY and the config file.
    #[arg(long, global = true, value_name = "KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Allow a plain http:// receiver on another machine (its answers carry
    /// keys and database passwords in clear).
    #[arg(long, global = true, env = "NX_INSECURE")]
    pub insecure: bool,
    /// The nx.toml to read, instead of looking in this directory and its
    /// parents up to the repository root.
    #[arg(long, global = true, env = "NX_MANIFEST", value_name = "PATH")]
    pub manifest: Option<PathBuf>,
}

/// An app, named or taken from nx.toml.
#[derive(Debug, Clone, Args)]
pub struct AppArg {
    /// The app (default: `app` in nx.toml, or the only app the key can see).
    #[arg(long, short)]
    pub app: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check --server and --key (or NX_SERVER and NX_KEY) and store them in
    /// the config file (mode 0600).
    Login,
    /// Create and list apps.
    #[command(subcommand)]
    Apps(AppsCommand),
    /// Build the project in a directory for the server (Go, Rust, Zig, Bun,
    /// or nx.toml's `build` command) and check the binary will run there.
    Build(BuildArgs),
    /// Verify, upload and start a binary (or build a directory first); prints
    /// its preview URL.
    Push(PushArgs),
    /// List apps and their deployments.
    Ls(LsArgs),
    /// Make a deployment the production of its app.
    Promote(PromoteArgs),
    /// Make the previous production production again (a second rollback undoes it).
    Rollback(AppArg),
    /// Print a deployment's log (what it printed and what the platform said).
    Logs(LogsArgs),
    /// Stop a deployment, or every preview of a pull request; their URLs then
    /// say so. Production cannot be stopped.
    Stop(StopArgs),
    /// Set, remove and list an app's variables; running deployments restart
    /// with them (production without downtime). Values are never printed.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Open production, or a deployment's preview, in the browser ($BROWSER or
    /// xdg-open); prints the URL when there is none.
    Open(OpenArgs),
    /// The receiver's health, version, limits and isolation.
    Status,
    /// The audit log: who pushed, promoted, rolled back, changed variables
    /// (names only), keys or links, and when. A deploy key sees its own app's.
    Events(EventsArgs),
    /// Every app's running deployments, refreshing: requests/s, p50 and p99
    /// latency, error rate, CPU, memory and restarts. With --json, one
    /// measurement over --interval. A deploy key sees its own app.
    Top(TopArgs),
    /// What `nx top` shows, for one app.
    Metrics(MetricsArgs),
    /// Print a completion script for your shell, for example
    /// `nx completions bash > /etc/bash_completion.d/nx`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Back up, restore and reach an app's database.
    #[command(subcommand)]
    Db(DbCommand),
    /// Create, list, rotate and revoke deploy keys; rotate the admin token.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Custom domains of an app's production (admin): the DNS records to
    /// create, their verification, and the certificates obtained for them.
    #[command(subcommand)]
    Domains(DomainsCommand),
    /// Log drains: ship an app's output, its platform events and the
    /// router's access lines for it to syslog (TCP or TLS) or an HTTPS
    /// endpoint (NDJSON); with --platform, every app's (admin).
    #[command(subcommand)]
    Drains(DrainsCommand),
    /// Say whether a binary will run on the server, and how to fix it if not.
    Verify(VerifyArgs),
    /// The step of the GitHub Action: reads INPUT_* and GITHUB_* variables.
    #[command(hide = true)]
    GithubAction,
}

#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Create an app with its own database and a deploy key (shown once).
    Create {
        /// DNS-safe name: a-z, 0-9 and '-'.
        name: String,
    },
    /// List apps.
    Ls,
    /// Remove an app with its database, data, deployments, keys and backups,
    /// for good (admin token). Asks for the name unless --yes.
    Rm {
        name: String,
        /// Do not ask; needed when not on a terminal.
        #[arg(long)]
        yes: bool,
    },
    /// Change an app's limits and health check; new deployments use them.
    Set(Box<SetArgs>),
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Print the database URL (the password included) of APP.
    Url { app: String },
    /// Save `pg_dump -Fc` of APP's database to a file, or with --store to the
    /// object store (verified by a restore into a scratch database).
    Backup {
        app: String,
        /// Where to write the dump; default APP-<time>.dump.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Keep the backup in the receiver's object store instead.
        #[arg(long, conflicts_with = "output")]
        store: bool,
        /// With --store: how many backups to keep.
        #[arg(long, requires = "store", default_value_t = 7)]
        keep: usize,
    },
    /// List the backups in the object store.
    Backups { app: String },
    /// Load a dump into APP's database; the old data stays if it fails.
    Restore { app: String, file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Set variables: KEY=VALUE, or KEY alone to read the value from stdin
    /// (keeps secrets out of shell history).
    Set {
        #[arg(required = true, value_name = "KEY[=VALUE]")]
        vars: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// Remove variables.
    Unset {
        #[arg(required = true, value_name = "KEY")]
        names: Vec<String>,
        #[command(flatten)]
        app: AppArg,
    },
    /// List the variables' names and when each changed (never their values).
    Ls {
        #[command(flatten)]
        app: AppArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum DomainsCommand {
    /// Attach DOMAIN to APP's production and print the DNS records to create:
    /// a CNAME to the app's host (A/AAAA for an apex) and a TXT record proving
    /// the domain is yours.
    Add { app: String, domain: String },
    /// The app's domains: verified or not, certificate issuer and expiry, and
    /// why the last attempt to obtain one failed.
    Ls { app: String },
    /// Look the DNS records up; says exactly which is missing, else the
    /// domain is served from now on and its certificate is obtained.
    Verify { app: String, domain: String },
    /// Stop serving DOMAIN for APP and forget its certificate.
    Rm { app: String, domain: String },
}

#[derive(Debug, Subcommand)]
pub enum DrainsCommand {
    /// `nx drains add APP URL`, or `nx drains add --platform URL`: ship logs
    /// to URL: syslog+tls://HOST:PORT (RFC 5424 over TLS), syslog+tcp://HOST:PORT
    /// or https://HOST/PATH (NDJSON batches POSTed).
    Add {
        /// APP, then URL (with --platform, URL alone).
        #[arg(num_args = 1..=2, required = true, value_names = ["APP", "URL"])]
        args: Vec<String>,
        /// A platform-wide drain: every app's records and the platform's events (admin).
        #[arg(long)]
        platform: bool,
    },
    /// The drains of APP (or with --platform the platform-wide ones), their URLs masked.
    Ls {
        #[arg(required_unless_present = "platform")]
        app: Option<String>,
        #[arg(long, conflicts_with = "app")]
        platform: bool,
    },
    /// `nx drains rm APP ID`, or `nx drains rm --platform ID`: stop shipping to a drain.
    Rm {
        /// APP, then the drain's ID (with --platform, ID alone).
        #[arg(num_args = 1..=2, required = true, value_names = ["APP", "ID"])]
        args: Vec<String>,
        #[arg(long)]
        platform: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// A new deploy key for APP, or with --read-only a key that reads every
    /// app and changes nothing, for dashboards and monitoring (shown once).
    Create {
        #[arg(required_unless_present = "read_only")]
        app: Option<String>,
        #[arg(long, conflicts_with = "app")]
        read_only: bool,
    },
    /// The deploy and SSH keys of APP, without their secrets; without APP,
    /// the admin token and the read-only keys.
    Ls { app: Option<String> },
    /// Let an SSH public key upload to APP over SFTP (give the .pub file).
    AddSsh { app: String, file: PathBuf },
    /// Revoke a key of APP at once (a deploy key, or an SSH key `ssh_...`).
    Revoke { app: String, key_id: String },
    /// Replace a key of APP by a new one (shown once); the old one stops working.
    Rotate { app: String, key_id: String },
    /// Revoke a read-only key at once.
    RevokeReadOnly { key_id: String },
    /// Replace the admin token (shown once); the old one stops working.
    RotateAdmin,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("per_role").multiple(true).args(["sleep_after", "replicas"])))]
pub struct SetArgs {
    pub app: String,
    /// Memory per sandbox, like 256MiB.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// CPU cores per sandbox, like 0.5.
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Processes and threads per sandbox.
    #[arg(long)]
    pub pids: Option<u32>,
    /// Open files per process.
    #[arg(long)]
    pub nofile: Option<u64>,
    /// Size of /tmp, like 64MiB.
    #[arg(long, value_parser = parse_size)]
    pub tmp: Option<u64>,
    /// Size of the /data volume, like 1GiB (takes effect when the volume is first made).
    #[arg(long, value_parser = parse_size)]
    pub data: Option<u64>,
    /// Health check: `GET PATH` must answer 2xx or 3xx.
    #[arg(long, value_name = "PATH", conflicts_with = "health_tcp")]
    pub health_path: Option<String>,
    /// Health check: a TCP connection is accepted.
    #[arg(long)]
    pub health_tcp: bool,
    /// The database of pull-request previews: shared, empty or copy.
    #[arg(long, value_parser = ["shared", "empty", "copy"])]
    pub preview_db: Option<String>,
    /// Arguments for pushes that bring none, like SFTP uploads (repeatable;
    /// replaces the app's; `--args-clear` removes them).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Remove the app's default arguments.
    #[arg(long, conflicts_with = "args")]
    pub args_clear: bool,
    /// What makes production besides `nx promote` and the Promote button:
    /// push (the action, on the production branch), merge, approval or manual.
    #[arg(long, value_parser = ["push", "merge", "approval", "manual"])]
    pub promote_on: Option<String>,
    /// Previews of pull requests from forks: never, or label (a
    /// `pull_request_target` run previews the head commit someone with write
    /// access labeled; see workflows/README.md).
    #[arg(long, value_parser = ["never", "label"])]
    pub preview_forks: Option<String>,
    /// The label that opts a fork's pull request in (default nx-preview).
    #[arg(long, value_name = "LABEL")]
    pub fork_label: Option<String>,
    /// How many sandboxes production runs (1 to 16), each on its own port,
    /// health-checked on its own; the router balances across the healthy
    /// ones. Each costs the app's memory and cpu limits. With `--role
    /// preview`, how many each preview runs (default 1).
    #[arg(long, value_name = "N")]
    pub replicas: Option<u32>,
    /// The GitHub repository (owner/name) whose webhooks act on this app, or
    /// `none` (admin token: the receiver reports there with its own identity).
    /// Links without trusting its workflows; see --github-trust.
    #[arg(long, value_name = "OWNER/NAME", conflicts_with = "github_trust")]
    pub github_repo: Option<String>,
    /// Links the app to the repository and lets its GitHub Actions runs push
    /// with their OIDC token (`permissions: id-token: write`) instead of a
    /// deploy key: only the workflow file given (`deploy.yml` or
    /// `.github/workflows/deploy.yml`) and refs matching the pattern
    /// (`main`, `refs/heads/*`, `refs/tags/v*`) when given (admin token).
    #[arg(long, value_name = "OWNER/REPO[:WORKFLOW][@REF]")]
    pub github_trust: Option<String>,
    /// Stop deployments after this long without a request (like 15m, at
    /// least 2s), or `off`; the next request starts them again. For the
    /// role --role names (default: preview; previews sleep after 15m unless
    /// told otherwise, production never).
    #[arg(long, value_name = "DURATION|off")]
    pub sleep_after: Option<String>,
    /// Which deployments --sleep-after (default: preview) or --replicas
    /// (default: production) is for: preview (every deployment but
    /// production and the rollback target) or production.
    #[arg(long, value_parser = ["preview", "production"], requires = "per_role")]
    pub role: Option<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The project's directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Where to put the binary (default: where the toolchain puts it).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Build for this platform instead of the server's, like linux/arm64.
    #[arg(long, value_name = "OS/ARCH")]
    pub target: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The binary to push, or a project directory to build first.
    pub path: PathBuf,
    #[command(flatten)]
    pub app: AppArg,
    /// Argument for the binary (repeatable; replaces `args` of nx.toml); $PORT
    /// and $HOST are expanded on the server.
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Environment variable KEY=VALUE for this deployment (repeatable; over
    /// the `[env]` of nx.toml).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Promote to production once healthy.
    #[arg(long)]
    pub promote: bool,
    /// Push even if the local check says the binary will not run (the server
    /// checks again and has the last word).
    #[arg(long)]
    pub skip_verify: bool,
    /// The pull request this build is for (previews may get their own database).
    #[arg(long)]
    pub pr: Option<u64>,
    /// The commit this build is of.
    #[arg(long, value_name = "SHA")]
    pub git_sha: Option<String>,
    /// The branch or tag this build is of.
    #[arg(long, value_name = "REF")]
    pub git_ref: Option<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only this app.
    pub app: Option<String>,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// Deployment id, as printed by `nx push` and `nx ls`.
    pub deployment: String,
    /// The deployment's app (found by id when not given).
    #[arg(long, short)]
    pub app: Option<String>,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Deployment id, as printed by `nx push` and `nx ls`.
    #[arg(required_unless_present = "pr")]
    pub deployment: Option<String>,
    /// Stop every preview of this pull request instead.
    #[arg(long, conflicts_with = "deployment")]
    pub pr: Option<u64>,
    /// The app (found by the deployment's id, nx.toml, or the key's only app).
    #[arg(long, short)]
    pub app: Option<String>,
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    /// A deployment to open the preview of; production when not given.
    pub deployment: Option<String>,
    #[command(flatten)]
    pub app: AppArg,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only this app's events.
    #[arg(long, short)]
    pub app: Option<String>,
    /// How far back: a duration (24h, 7d) or an RFC 3339 time.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// At most this many events, newest first (up to 1000).
    #[arg(long, short = 'n', default_value_t = 100)]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Time between two readings: rates are over it, and the view refreshes at it.
    #[arg(long, short = 'n', default_value = "2s", value_parser = parse_interval)]
    pub interval: std::time::Duration,
    /// Print one measurement and stop (as --json does).
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The app (default: `app` in nx.toml, or the only app the key can see).
    pub app: Option<String>,
    #[command(flatten)]
    pub top: TopArgs,
}

/// An interval for `nx top`: a duration of at least 100ms.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = nx_protocol::units::parse_duration(s)?;
    if d < std::time::Duration::from_millis(100) {
        return Err(format!("{s} is too short; give at least 100ms (for example 1s or 5s)"));
    }
    Ok(d)
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Deployment id.
    pub deployment: String,
    /// The deployment's app (found by id when not given).
    #[arg(long, short)]
    pub app: Option<String>,
    /// Keep printing new lines until the deployment stops or Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// How many of the last lines to print first.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub lines: usize,
    /// Write the lines as stored, control characters included. Without it,
    /// on a terminal, escape sequences, carriage returns, bidirectional and
    /// invisible characters an app printed are shown as escapes (`\x1b`)
    /// instead of acting on the terminal; into a pipe or file, lines are
    /// always written as stored.
    #[arg(long)]
    pub raw: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The file to check.
    pub path: PathBuf,
    /// Check against this platform instead of a server, for example linux/amd64.
    #[arg(long, value_name = "OS/ARCH", conflicts_with = "server")]
    pub target: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
