//! One replica against three of a CPU-bound app, through the router: two
//! apps of the same binary in one receiver, `one` running production as one
//! replica and `three` as three, each loaded in turn with wrk on goweb's
//! `/work` (SHA-256 rounds, a few milliseconds of CPU per request). Each
//! replica has the app's cpu limit (1 core by default), so three can use
//! three cores where one uses one; the machine's cores bound what they get.

use std::process::Command;
use std::time::Duration;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::{eventually, require_program, Receiver};

use crate::stats::{verdict, Figure};

/// The CPU-bound request: 10000 rounds of SHA-256.
const PATH: &str = "/work?n=10000";

pub fn run(rounds: usize, secs: u64, conns: u32) -> anyhow::Result<()> {
    let wrk = require_program("wrk", "wrk");
    let r = Receiver::start();
    let goweb = fixtures::go(Go::Static);
    let apps = [("one", 1), ("three", 3)];
    for (app, replicas) in apps {
        r.create_app(app);
        r.nx_ok(&["apps", "set", app, "--replicas", &replicas.to_string()]);
        r.push(app, &goweb, &["--promote"]);
        eventually(60, "every replica healthy", || {
            let listing = r.nx(&["--json", "ls", app]).success().json();
            let production = listing[0]["deployments"].as_array()?.iter().find(|d| d["production"] == true)?.clone();
            let all = production["replicas"].as_array()?.clone();
            (all.len() == replicas && all.iter().all(|x| x["state"] == "healthy")).then_some(())
        });
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "one replica against three of a CPU-bound app (GET {PATH} through the router, wrk -t2 -c{conns} -d{secs}s, \
         {rounds} rounds, each app first in half of them; {cores} cores)"
    );
    let (mut figures, mut failed) = ([Figure::default(), Figure::default()], 0u64);
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let host = format!("{}.localhost:{}", apps[i].0, r.router_port);
            let (rps, errors) = load(&wrk, r.router_port, &host, secs, conns)?;
            figures[i].push(rps);
            failed += errors;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    println!("{}", figures[0].line("one replica (peer)", "req/s"));
    println!("{}", figures[1].line("three replicas", "req/s"));
    let ratio = figures[1].median() / figures[0].median();
    println!("  ratio three/one: {ratio:.2}x (bounded by the {cores} cores, which the router and wrk share)");
    println!("  failed requests: {failed}");
    verdict("zero failed requests", failed == 0);
    Ok(())
}

/// One wrk run against `host` through the router on `port`: requests per
/// second, and the requests that failed (socket errors, non-2xx answers).
fn load(wrk: &std::path::Path, port: u16, host: &str, secs: u64, conns: u32) -> anyhow::Result<(f64, u64)> {
    let out = Command::new(wrk)
        .args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s"), "-H", &format!("Host: {host}")])
        .arg(format!("http://127.0.0.1:{port}{PATH}"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let field =
        |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix)).map(|rest| rest.trim().to_owned());
    let rps: f64 =
        field("Requests/sec:").ok_or_else(|| anyhow::anyhow!("no Requests/sec in wrk's output: {text}"))?.parse()?;
    let non_2xx: u64 = field("Non-2xx or 3xx responses:").map_or(Ok(0), |n| n.parse())?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket: u64 = field("Socket errors:")
        .map_or(0, |l| l.split(',').filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok()).sum());
    Ok((rps, non_2xx + socket))
}
