//! `nx-bench`: the performance claims of NX Sandbox, each measured next to the
//! peer that shows what the figure means, in the same run. Prints the median
//! with min and max over the rounds, the ratio to the peer, and whether the
//! target of DESIGN.md section 7 is met. `bench/run.sh` builds and runs it.

mod density;
mod pg;
mod promote;
mod push;
mod replicas;
mod restart;
mod sandbox;
mod stats;
mod wake;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "nx-bench", about = "NX Sandbox benchmarks, each next to its peer")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Sandbox start to first answer, against the same binary started plainly.
    Start {
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// Pause before each start, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        gap_ms: u64,
    },
    /// N idle sandboxes: time until all are healthy, memory beyond the app.
    Density {
        #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
        counts: Vec<usize>,
    },
    /// App database provisioning, against a raw CREATE ROLE + CREATE DATABASE.
    Provision {
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
    /// Push to preview answering, against copying and hashing the bytes.
    Push {
        #[arg(long, value_delimiter = ',', default_value = "1,20,100")]
        sizes_mb: Vec<u64>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// 50 pushes at once: all must succeed.
    Concurrent {
        #[arg(long, default_value_t = 50)]
        pushes: usize,
    },
    /// Wake on request: first byte of a request to a sleeping app, against a running one.
    Wake {
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Promotions and rollbacks under load: failed requests and the latency blip.
    Promote {
        #[arg(long, default_value_t = 20)]
        swaps: usize,
    },
    /// Requests/s of a CPU-bound app as three replicas, against one.
    Replicas {
        #[arg(long, default_value_t = 6)]
        rounds: usize,
        /// Seconds of load per app and round.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value_t = 32)]
        conns: u32,
    },
    /// Receiver restarts and upgrades with three apps: exec to the API's
    /// first answer, against exec to exit of `nx-receiver --help`.
    Restart {
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Upgrades (a copy of the binaries at another path) after the restarts.
        #[arg(long, default_value_t = 3)]
        upgrades: usize,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.bench {
        Bench::Start { rounds, gap_ms } => sandbox::start(rounds, std::time::Duration::from_millis(gap_ms)).map(|_| ()),
        Bench::Density { counts } => density::run(&counts),
        Bench::Provision { rounds } => pg::provision(rounds),
        Bench::Push { sizes_mb, rounds } => push::sizes(&sizes_mb, rounds),
        Bench::Concurrent { pushes } => push::concurrent(pushes),
        Bench::Promote { swaps } => promote::run(swaps),
        Bench::Replicas { rounds, secs, conns } => replicas::run(rounds, secs, conns),
        Bench::Restart { rounds, upgrades } => restart::run(rounds, upgrades),
        Bench::Wake { rounds } => wake::run(rounds),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nx-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
