//! `nx`: parse the command line, run it, print the error chain, exit with the
//! documented code.

use std::process::ExitCode;

use clap::Parser;
use nx_action::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nx: error: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(nx_action::commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nx: error: {e:#}");
            ExitCode::from(nx_action::failure::exit_code(&e))
        }
    }
}
