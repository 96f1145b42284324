//! Pushes through the real receiver and CLI: push to preview answering for
//! binaries of several sizes (the peer: copying and hashing the same bytes),
//! and many pushes at once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nx_e2e::receiver::Options;
use nx_e2e::Receiver;
use sha2::{Digest, Sha256};

use crate::stats::{verdict, Figure};

/// A runnable binary of `size` bytes that no earlier push had: the fixture's
/// static C server followed by random bytes (an ELF file may carry trailing
/// data).
fn binary_of_size(dir: &Path, name: &str, size: u64) -> anyhow::Result<PathBuf> {
    let mut bytes = std::fs::read(nx_e2e::fixtures::c_musl_static())?;
    let pad = (size as usize).saturating_sub(bytes.len()).max(16);
    let mut rest = vec![0u8; pad];
    rand::Rng::fill(&mut rand::thread_rng(), &mut rest[..]);
    bytes.extend_from_slice(&rest);
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(path)
}

/// The physical floor of a push: read the bytes, write them durably once,
/// hash them once.
fn copy_and_hash(file: &Path, dest: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file)?;
    let mut out = std::fs::File::create(dest)?;
    out.write_all(&bytes)?;
    out.sync_all()?;
    let _ = Sha256::digest(&bytes);
    Ok(())
}

/// Pushes and waits for the preview to answer; returns the deployment id.
fn push(r: &Receiver, file: &Path) -> anyhow::Result<String> {
    let out = r.nx(&["--json", "push", file.to_str().unwrap_or_default(), "--app", "bench"]);
    anyhow::ensure!(out.code == 0, "push failed: {}", out.stderr);
    let d = out.json()["deployment"].clone();
    let url = d["preview_url"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(r.get(&url).status == 200, "the preview {url} did not answer");
    Ok(d["id"].as_str().unwrap_or_default().to_owned())
}

/// A receiver pushed to, its times, and how many of its pushes started
/// from the sandbox made during their upload.
struct Side {
    r: Receiver,
    took: Figure,
    from_ready: usize,
}

impl Side {
    fn start(extra: &[&str]) -> Side {
        let mut args = vec!["--max-upload".to_owned(), "1GiB".to_owned()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let r = Receiver::start_with(Options { args, ..Options::default() });
        r.create_app("bench");
        Side { r, took: Figure::default(), from_ready: 0 }
    }

    fn push(&mut self, file: &Path) -> anyhow::Result<()> {
        let t = Instant::now();
        let id = push(&self.r, file)?;
        self.took.push_ms(t.elapsed());
        let logs = self.r.nx(&["logs", &id, "--app", "bench"]).stdout;
        self.from_ready += usize::from(logs.contains("started from a sandbox held ready"));
        self.r.nx(&["stop", &id, "--app", "bench"]);
        Ok(())
    }
}

/// Each size pushed `rounds` times to a receiver as it runs by default
/// (each push's sandbox made during its upload) and, in turns, to one with
/// `--push-ready 0` (each push's start a parked one), beside the floor.
pub fn sizes(sizes_mb: &[u64], rounds: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut figures = Vec::new();
    for &mb in sizes_mb {
        let mut sides = [Side::start(&[]), Side::start(&["--push-ready", "0"])];
        let mut floor = Figure::default();
        for round in 0..rounds {
            let file = binary_of_size(dir.path(), &format!("app-{mb}-{round}"), mb << 20)?;
            let t = Instant::now();
            copy_and_hash(&file, &dir.path().join("copy"))?;
            floor.push_ms(t.elapsed());
            // In turns, each side first in every other round.
            for i in [round % 2, 1 - round % 2] {
                sides[i].push(&file)?;
            }
            std::fs::remove_file(&file)?;
        }
        let [ours, parked] = sides;
        figures.push((mb, ours.took, ours.from_ready, parked.took, floor));
    }
    // Measured last: the start benchmark's process manager reaps every child
    // of this process, which the harness's own process handling cannot share.
    let start_ms = crate::sandbox::start(10, std::time::Duration::from_secs(1))?;
    println!();
    println!("push -> preview answering (nx push on loopback, {rounds} rounds each)");
    for (mb, ours, from_ready, parked, floor) in figures {
        let physical = floor.median() + start_ms;
        println!("{}", ours.line(&format!("{mb} MB: push to answer"), "ms"));
        println!("    ... started from the sandbox made during the upload: {from_ready} of {rounds}");
        println!("{}", parked.line(&format!("{mb} MB: with --push-ready 0, in turns"), "ms"));
        println!("{}", floor.line(&format!("{mb} MB: copy + sha256 (peer)"), "ms"));
        println!(
            "  {mb} MB: ratio to copy + sha256 + sandbox start ({physical:.1} ms): {:.2}x",
            ours.median() / physical
        );
        println!(
            "  {mb} MB: ratio to copy + sha256 alone: {:.2}x (with --push-ready 0: {:.2}x)",
            ours.median() / floor.median(),
            parked.median() / floor.median()
        );
        if mb == 20 {
            verdict("20 MB push at most 2x the floor (the design)", ours.median() <= 2.0 * physical);
            verdict("20 MB push at most 1.5x copy + sha256 (issue #22)", ours.median() <= 1.5 * floor.median());
        }
    }
    Ok(())
}

pub fn concurrent(n: usize) -> anyhow::Result<()> {
    let r = Receiver::start();
    r.create_app("bench");
    let dir = tempfile::tempdir()?;
    let files: Vec<PathBuf> =
        (0..n).map(|i| binary_of_size(dir.path(), &format!("app-{i}"), 0)).collect::<Result<_, _>>()?;
    let started = Instant::now();
    let results: Vec<anyhow::Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = files.iter().map(|f| s.spawn(|| push(&r, f))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a push thread panicked"))))
            .collect()
    });
    let took = started.elapsed();
    let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))).collect();
    println!("{n} pushes at once (distinct binaries, one app)");
    println!(
        "  all done in {:.2} s, {:.0} ms per push on average; {} failed",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / n as f64,
        failed.len()
    );
    for f in failed.iter().take(5) {
        println!("    {f}");
    }
    verdict(&format!("{n} concurrent pushes all succeed"), failed.is_empty());
    Ok(())
}
