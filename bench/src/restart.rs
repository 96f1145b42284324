//! Receiver restarts and upgrades with three apps running, as an operator
//! does them: SIGTERM the receiver, start it again (the same binary, or a
//! copy at another path standing for a new version), and time from the new
//! process's exec to the first 200 of `GET /v1/health` (the API is back) and
//! to `"reconciled": true` (every deployment taken back). The peer is the
//! floor of starting this program at all: exec to exit of the same binary's
//! `--help`. The receiver logs its start's stages (`nx_receiver::startup`);
//! their medians say where the time goes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::Options;
use nx_e2e::{bin, Receiver};

use crate::stats::{verdict, Figure};

/// How long a start may take before the benchmark gives up.
const GIVE_UP: Duration = Duration::from_secs(60);

/// One `GET /v1/health` on a fresh connection: the status and whether the
/// body says `"reconciled": true`. A refused connection (nothing listens
/// yet) is `None`; a connection made while the receiver starts waits in its
/// listener's backlog until the API is served, which is what is timed.
fn health(port: u16) -> Option<(u16, bool)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(GIVE_UP)).ok()?;
    stream
        .write_all(format!("GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let reconciled = serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| v["reconciled"] == true);
    Some((status, reconciled))
}

/// Times from `started` (just before exec) to the API's first 200 and to
/// `"reconciled": true`, polling every millisecond while nothing listens and
/// every 5 ms while the deployments are taken back.
fn watch_start(port: u16, started: Instant) -> anyhow::Result<(Duration, Duration)> {
    let mut api = None;
    loop {
        anyhow::ensure!(started.elapsed() < GIVE_UP, "the receiver's API did not answer within {GIVE_UP:?}");
        match health(port) {
            None => std::thread::sleep(Duration::from_millis(1)),
            Some((200, reconciled)) => {
                let now = started.elapsed();
                let api = *api.get_or_insert(now);
                if reconciled {
                    return Ok((api, now));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Some((status, _)) => anyhow::bail!("GET /v1/health answered {status} during the start"),
        }
    }
}

/// The stages of the receiver's last start, from its JSON log: name and milliseconds taken.
fn last_start_stages(log: &str) -> Vec<(String, f64)> {
    let mut stages: Vec<(String, f64)> = Vec::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["target"] != "nx_receiver::startup" {
            continue;
        }
        let (Some(stage), Some(ms)) = (v["fields"]["stage"].as_str(), v["fields"]["took_ms"].as_f64()) else {
            continue;
        };
        // The first stage of a start begins a new list.
        if stages.iter().any(|(s, _)| s == stage) {
            stages.clear();
        }
        stages.push((stage.to_owned(), ms));
    }
    stages
}

/// A copy of nx-receiver, nx-router and nx-shim in a new directory: a new
/// version of the platform's binaries, as an upgrade installs them.
fn new_binaries(r: &Receiver, version: usize) -> anyhow::Result<PathBuf> {
    let dir = r.dir.path().join(format!("v{version}"));
    std::fs::create_dir(&dir)?;
    for name in ["nx-receiver", "nx-router", "nx-shim"] {
        std::fs::copy(bin(name), dir.join(name))?;
    }
    Ok(dir.join("nx-receiver"))
}

/// Exec to exit of `program --help`: the floor of starting the program.
fn help(program: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = std::process::Command::new(program).arg("--help").output()?;
    let took = t.elapsed();
    anyhow::ensure!(out.status.success(), "{} --help failed", program.display());
    Ok(took)
}

pub fn run(rounds: usize, upgrades: usize) -> anyhow::Result<()> {
    let mut r = Receiver::start_with(Options {
        args: vec!["--log-format".into(), "json".into()],
        env: vec![("RUST_LOG".into(), "info,sqlx=warn,nx_receiver::startup=debug".into())],
        ..Options::default()
    });
    for (app, binary) in
        [("web", fixtures::go(Go::Static)), ("site", fixtures::go(Go::Static)), ("counter", bin("hello"))]
    {
        r.create_app(app);
        r.push(app, &binary, &["--env", &format!("GREETING={app}-answers"), "--promote"]);
    }
    let (mut api, mut reconciled) = (Figure::default(), Figure::default());
    let (mut upgrade_api, mut upgrade_reconciled) = (Figure::default(), Figure::default());
    let mut stages: BTreeMap<String, (usize, Figure)> = BTreeMap::new();
    let total = rounds + upgrades;
    for round in 0..total {
        let upgrade = round >= rounds;
        let status = r.stop_with(Signal::SIGTERM);
        anyhow::ensure!(status.success(), "nx-receiver exited with {status} on SIGTERM:\n{}", r.log());
        if upgrade {
            r.options.bin = Some(new_binaries(&r, round)?);
        }
        let started = r.launch_again();
        let (to_api, to_reconciled) = watch_start(r.api_port, started)?;
        r.wait_up(started);
        let (a, b) = if upgrade { (&mut upgrade_api, &mut upgrade_reconciled) } else { (&mut api, &mut reconciled) };
        a.push_ms(to_api);
        b.push_ms(to_reconciled);
        if !upgrade {
            for (i, (stage, ms)) in last_start_stages(&r.log()).into_iter().enumerate() {
                stages.entry(stage).or_insert_with(|| (i, Figure::default())).1.push(ms);
            }
        }
    }
    let mut floor = Figure::default();
    for _ in 0..rounds {
        floor.push_ms(help(&bin("nx-receiver"))?);
    }
    println!("receiver restart with 3 apps running (release, embedded PostgreSQL, local store)");
    println!("{}", api.line(&format!("restart: exec to API 200 ({rounds}x)"), "ms"));
    println!("{}", reconciled.line("restart: exec to reconciled", "ms"));
    println!("{}", upgrade_api.line(&format!("upgrade: exec to API 200 ({upgrades}x)"), "ms"));
    println!("{}", upgrade_reconciled.line("upgrade: exec to reconciled", "ms"));
    println!("{}", floor.line("nx-receiver --help, exec to exit (peer)", "ms"));
    println!("  ratio restart API / peer: {:.1}x", api.median() / floor.median());
    println!("  stages of a restart (receiver log, median of {rounds}):");
    let mut ordered: Vec<_> = stages.into_iter().collect();
    ordered.sort_by_key(|(_, (i, _))| *i);
    for (stage, (_, figure)) in ordered {
        println!("  {}", figure.line(&stage, "ms"));
    }
    verdict("API back within 1 s of a restart (median)", api.median() < 1000.0);
    verdict("API back within 1 s of an upgrade (median)", upgrade_api.median() < 1000.0);
    Ok(())
}
