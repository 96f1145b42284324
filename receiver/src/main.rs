//! `nx-receiver`: parse the command line, run it, report errors.

use std::process::ExitCode;

use clap::Parser;
use nx_receiver::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nx-receiver: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => {
            nx_receiver::telemetry::init(&config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(nx_receiver::server::serve(*config))
        }
        Command::StopAll(config) => {
            nx_receiver::telemetry::init(&nx_receiver::config::ServeConfig::defaults().log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(nx_receiver::server::stop_all(config))
        }
    }
}
