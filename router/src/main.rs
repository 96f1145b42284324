//! `nx-router`: parse the configuration, run the proxy, report errors.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = nx_router::config::Config::parse();
    match nx_router::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nx-router: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
