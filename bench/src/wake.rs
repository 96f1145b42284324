//! Wake on request: the first byte of a request that arrives while its app
//! sleeps (the router holds it, the receiver starts the sandbox, the router
//! forwards it once the app is healthy), next to the same request to the
//! app running.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nx_e2e::Receiver;

use crate::stats::{verdict, Figure};

/// The state of the one deployment of app `bench`, as `nx ls` reports it.
fn state(r: &Receiver) -> anyhow::Result<String> {
    let out = r.nx(&["--json", "ls", "bench"]);
    anyhow::ensure!(out.code == 0, "nx ls failed: {}", out.stderr);
    let listing = out.json();
    Ok(listing[0]["deployments"][0]["state"].as_str().unwrap_or_default().to_owned())
}

/// Time from sending `GET /` for `host` through the router to the first
/// byte of the answer, which must be a 200.
fn first_byte(router_port: u16, host: &str) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", router_port))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let took = t0.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    let head = [&first[..], &rest].concat();
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{host} answered {:?}",
        String::from_utf8_lossy(&head[..head.len().min(80)])
    );
    Ok(took)
}

/// How long each wake took the receiver, from its state `starting` until
/// the state `healthy` is committed and the whole route table published
/// (after the held request was forwarded), as its JSON log says
/// ("deployment woke").
fn receiver_wakes(log: &str) -> Figure {
    let mut took = Figure::default();
    for v in log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        if v["fields"]["message"] == "deployment woke" {
            if let Some(micros) = v["fields"]["micros"].as_u64() {
                took.push_ms(Duration::from_micros(micros));
            }
        }
    }
    took
}

/// A receiver with one sleepy preview of the static C server, and what
/// its wakes measured.
struct Side {
    r: Receiver,
    host: String,
    id: String,
    woken: Figure,
    running: Figure,
}

impl Side {
    /// A receiver started with `args` besides the JSON log.
    fn start(args: &[&str]) -> anyhow::Result<Side> {
        let mut all = vec!["--log-format".to_owned(), "json".to_owned()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let r = Receiver::start_with(nx_e2e::receiver::Options { args: all, ..nx_e2e::receiver::Options::default() });
        r.create_app("bench");
        let out = r.nx(&["apps", "set", "bench", "--sleep-after", "2s"]);
        anyhow::ensure!(out.code == 0, "cannot set sleep_after: {}", out.stderr);
        let d = r.push("bench", &nx_e2e::fixtures::c_musl_static(), &[]);
        let url = d["preview_url"].as_str().unwrap_or_default().to_owned();
        let host = url.trim_start_matches("http://").split('/').next().unwrap_or_default().to_owned();
        let id = d["id"].as_str().unwrap_or_default().to_owned();
        Ok(Side { r, host, id, woken: Figure::default(), running: Figure::default() })
    }

    fn wait_asleep(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while state(&self.r)? != "sleeping" {
            anyhow::ensure!(Instant::now() < deadline, "the preview did not fall asleep within 60s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn wake(&mut self) -> anyhow::Result<()> {
        self.woken.push_ms(first_byte(self.r.router_port, &self.host)?);
        self.running.push_ms(first_byte(self.r.router_port, &self.host)?);
        Ok(())
    }

    /// How many of its wakes started from a sandbox made ready: the log's
    /// starts from one but the push's first (made during its upload).
    fn ready_wakes(&self) -> usize {
        let logs = self.r.nx(&["logs", &self.id, "--app", "bench", "--lines", "100000"]).stdout;
        let mut starts = logs.lines().filter(|l| l.contains("[nx] sandbox started") || l.contains("held ready"));
        let pushed_ready = starts.next().is_some_and(|first| first.contains("held ready"));
        logs.matches("started from a sandbox held ready").count() - usize::from(pushed_ready)
    }
}

/// Wakes, in turns, of a receiver as users run it (sleeping sandboxes made
/// ready) and of one with `--wake-ready 0` (each wake a parked start).
pub fn run(rounds: usize) -> anyhow::Result<()> {
    let mut sides = [Side::start(&[])?, Side::start(&["--wake-ready", "0"])?];
    for round in 0..rounds {
        for side in &sides {
            side.wait_asleep()?;
        }
        // Asleep a moment, as a visitor would find it.
        std::thread::sleep(Duration::from_millis(500));
        // Which goes first alternates.
        let (a, b) = sides.split_at_mut(1);
        let (first, second) = if round % 2 == 0 { (&mut a[0], &mut b[0]) } else { (&mut b[0], &mut a[0]) };
        first.wake()?;
        second.wake()?;
    }
    let [ready, parked] = &sides;
    println!("wake on request -> first byte ({rounds} rounds, a static C server, sleep_after 2s)");
    println!("{}", ready.woken.line("asleep: held, woken, answered", "ms"));
    println!("{}", ready.running.line("running (peer)", "ms"));
    println!(
        "{}",
        receiver_wakes(&ready.r.log()).line("  the receiver's whole wake (to healthy, recorded and published)", "ms")
    );
    println!("  {} of {rounds} wakes from a sandbox made ready", ready.ready_wakes());
    println!("{}", parked.woken.line("with --wake-ready 0 (a parked start), in turns", "ms"));
    println!("  the wake costs {:.2} ms", ready.woken.median() - ready.running.median());
    verdict("first byte of a held request <= 10 ms median", ready.woken.median() <= 10.0);
    Ok(())
}
