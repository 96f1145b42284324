//! Tracing setup for the router: one subscriber, text or JSON, filtered by
//! `RUST_LOG` (default `info`). Pingora's own `log` records are captured too.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = if format == "json" { builder.json().try_init() } else { builder.try_init() };
    // A second init (in tests) keeps the first subscriber.
    let _ = result;
}
