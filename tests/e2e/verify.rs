//! `nx verify` and the receiver's own check, on real binaries built here with
//! real toolchains, and the inspector against truncated and mutated binaries.

use std::path::{Path, PathBuf};

use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::NxOutput;
use nx_e2e::{bin, require_program, Receiver};

fn verify(r: &Receiver, path: &Path) -> (NxOutput, serde_json::Value) {
    let out = r.nx(&["--json", "verify", path.to_str().unwrap(), "--server", &r.api()]);
    let json = if out.stdout.trim().is_empty() { serde_json::Value::Null } else { out.json() };
    (out, json)
}

fn write(r: &Receiver, name: &str, bytes: &[u8]) -> PathBuf {
    let p = r.dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A copy of `path` whose highest GLIBC_2.x requirement is renamed GLIBC_2.99:
/// a binary that really needs a newer glibc than the server's.
fn needing_newer_glibc(r: &Receiver, path: &Path) -> PathBuf {
    let mut bytes = std::fs::read(path).unwrap();
    let report = nx_verify::inspect(&bytes);
    let needed = format!("GLIBC_{}\0", report.glibc_required.expect("a glibc binary"));
    let at = bytes.windows(needed.len()).position(|w| w == needed.as_bytes()).expect("version string");
    let replacement = format!("{:\0<width$}", "GLIBC_2.99", width = needed.len());
    bytes[at..at + needed.len()].copy_from_slice(replacement.as_bytes());
    write(r, "needs-glibc-2.99", &bytes)
}

#[test]
fn real_binaries_get_the_right_facts_and_verdict() {
    let r = Receiver::start();
    let caddy = require_program("caddy", "caddy");

    let (out, j) = verify(&r, &caddy);
    assert_eq!(out.code, 0, "{out:?}");
    let rep = &j["report"];
    assert_eq!(
        (rep["format"].as_str(), rep["arch"].as_str(), rep["linkage"].as_str()),
        (Some("elf"), Some("amd64"), Some("dynamic"))
    );
    assert_eq!(rep["interpreter"], "/lib64/ld-linux-x86-64.so.2");
    assert!(rep["needed"].as_array().unwrap().iter().any(|n| n == "libc.so.6"));
    assert!(rep["glibc_required"].as_str().unwrap().starts_with("2."));
    assert_eq!(rep["go"]["goos"], "linux");
    assert_eq!(rep["go"]["cgo_enabled"], true);
    assert!(rep["go"]["path"].as_str().unwrap().contains("caddy"));
    assert!(j["target"]["glibc"].as_str().unwrap().starts_with("2."), "the server's glibc is known: {}", j["target"]);

    let (out, j) = verify(&r, &fixtures::go(Go::Static));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(j["report"]["linkage"], "static");
    assert_eq!(j["report"]["libc"], "none");
    assert_eq!(j["report"]["go"]["cgo_enabled"], false);
    assert_eq!(j["report"]["go"]["main_module"], "example.com/goweb");
    assert!(j["report"]["go"]["go_version"].as_str().unwrap().starts_with("go1."));

    let (out, j) = verify(&r, &fixtures::go(Go::Cgo));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!((j["report"]["linkage"].as_str(), j["report"]["libc"].as_str()), (Some("dynamic"), Some("glibc")));
    assert_eq!(j["report"]["go"]["cgo_enabled"], true);

    let (out, j) = verify(&r, &fixtures::c_gcc());
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!((j["report"]["toolchain"].as_str(), j["report"]["linkage"].as_str()), (Some("c"), Some("dynamic")));
    assert!(j["report"]["compiler"].as_str().unwrap().contains("GCC"));

    let (out, j) = verify(&r, &fixtures::c_musl_static());
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(j["report"]["linkage"], "static");
    assert!(j["report"]["needed"].as_array().unwrap().is_empty());

    let (out, j) = verify(&r, &bin("hello"));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(j["report"]["toolchain"], "rust");
    assert!(j["report"]["compiler"].as_str().unwrap().contains("rustc"));
    assert!(j["report"]["rust_dependencies"].is_null(), "a plain cargo build embeds no dependency list");

    let (out, j) = verify(&r, &fixtures::rust_auditable());
    assert_eq!(out.code, 0, "{out:?}");
    let deps = j["report"]["rust_dependencies"].as_array().expect("cargo-auditable's list is read");
    assert!(deps.iter().any(|d| d["name"] == "itoa" && d["version"].as_str().unwrap().starts_with("1.")), "{deps:?}");
    assert!(deps.iter().any(|d| d["name"] == "auditable-fixture"), "{deps:?}");
}

/// The bytes searched for Go's build information and Rust's source paths
/// are where Go's tools and Rust's panics put them, not the whole file: a Go
/// program without its section table is still known by its first writable
/// segment, and a C program with a Go program and Rust's paths appended
/// after its end (data no loader maps) is still a C program.
#[test]
fn go_and_rust_marks_are_read_where_their_toolchains_put_them() {
    use nx_verify::report::Toolchain;
    let go = std::fs::read(fixtures::go(Go::Static)).unwrap();
    let mut no_sections = go.clone();
    // e_shoff, then e_shentsize, e_shnum and e_shstrndx of an ELF64 header.
    no_sections[0x28..0x30].fill(0);
    no_sections[0x3a..0x40].fill(0);
    let report = nx_verify::inspect(&no_sections);
    assert!(report.parse_errors.is_empty(), "{:?}", report.parse_errors);
    let info = report.go.as_ref().expect("Go's build information found without the section table");
    assert!(info.go_version.starts_with("go1."), "{info:?}");
    assert_eq!(info.main_module.as_deref(), Some("example.com/goweb"));
    assert_eq!(report.toolchain, Toolchain::Go);

    let c = std::fs::read(fixtures::c_musl_static()).unwrap();
    assert_eq!(nx_verify::inspect(&c).toolchain, Toolchain::C);
    let mut padded = c;
    padded.extend_from_slice(&go);
    padded.extend_from_slice(b"/rustc/90b35a6239c3d8bdabc530a6a0816f7ff89a0aaf/library/core/src/panicking.rs");
    let report = nx_verify::inspect(&padded);
    assert!(report.go.is_none(), "{:?}", report.go);
    assert_eq!(report.toolchain, Toolchain::C);
}

/// (file, exit code, words the verdict must contain)
fn refusals(r: &Receiver) -> Vec<(PathBuf, &'static [&'static str])> {
    let caddy = std::fs::read(require_program("caddy", "caddy")).unwrap();
    let random: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let zip = r.dir.path().join("bundle.zip");
    let status = std::process::Command::new("python3")
        .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1], 'w').writestr('app', 'x')"])
        .arg(&zip)
        .status()
        .unwrap();
    assert!(status.success());
    vec![
        (fixtures::go(Go::DarwinArm64), &["macOS", "arm64", "GOOS=linux GOARCH=amd64 CGO_ENABLED=0 go build"]),
        (
            fixtures::go_universal(),
            &["macOS program (Mach-O, amd64, arm64)", "GOOS=linux GOARCH=amd64 CGO_ENABLED=0 go build"],
        ),
        (fixtures::go(Go::Windows), &["Windows", "GOOS=linux GOARCH=amd64 CGO_ENABLED=0 go build"]),
        (fixtures::go(Go::LinuxArm64), &["built for arm64 but the server runs amd64", "GOARCH=amd64"]),
        (
            needing_newer_glibc(r, &fixtures::c_gcc()),
            &["needs GLIBC_2.99", "the server has glibc 2.", "musl-gcc -static"],
        ),
        (write(r, "run.sh", b"#!/bin/sh\necho hi\n"), &["script (#!/bin/sh)", "compile"]),
        (write(r, "empty", b""), &["empty"]),
        (write(r, "random", &random), &["not an executable"]),
        (zip, &["zip archive", "unpack"]),
        (write(r, "truncated", &caddy[..200]), &["damaged or truncated"]),
    ]
}

#[test]
fn binaries_that_cannot_run_are_refused_with_the_fix_by_cli_and_server_alike() {
    let r = Receiver::start();
    r.create_app("web");
    for (path, words) in refusals(&r) {
        let (out, j) = verify(&r, &path);
        assert_eq!(out.code, 1, "{}: {out:?}", path.display());
        assert_eq!(j["verdict"]["runs"], false);
        let problems = j["verdict"]["problems"].as_array().unwrap();
        let text: String = problems
            .iter()
            .map(|p| format!("{}; {}\n", p["problem"].as_str().unwrap(), p["remedy"].as_str().unwrap()))
            .collect();
        for w in words {
            assert!(text.contains(w), "{}: {w:?} missing from {text}", path.display());
        }
        // The receiver runs the same check on the upload and says the same.
        let push = r.nx(&["push", path.to_str().unwrap(), "--app", "web", "--skip-verify"]);
        assert_eq!(push.code, 1, "{}: {push:?}", path.display());
        let first = problems[0]["problem"].as_str().unwrap();
        assert!(push.stderr.contains(first), "{}: server said {}", path.display(), push.stderr);
    }
    assert_eq!(
        std::fs::read_dir(r.data_dir().join("store/artifacts")).unwrap().count(),
        0,
        "refused binaries are not kept"
    );

    let human = r.nx(&["verify", fixtures::go(Go::DarwinArm64).to_str().unwrap(), "--target", "linux/amd64"]);
    assert_eq!(human.code, 1);
    assert!(human.stdout.contains("will not run on linux/amd64"), "{}", human.stdout);
    assert!(human.stdout.contains("fix: build with GOOS=linux"), "{}", human.stdout);
    let missing = r.nx(&["verify", "/nonexistent/binary"]);
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(missing.stderr.contains("cannot read /nonexistent/binary"));
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn the_inspector_survives_truncated_and_mutated_binaries() {
    let target = nx_verify::target::detect(Path::new("/"));
    let inputs = [
        fixtures::go(Go::Static),
        fixtures::go(Go::DarwinArm64),
        fixtures::go(Go::Windows),
        fixtures::c_gcc(),
        fixtures::c_musl_static(),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for path in inputs {
        let original = std::fs::read(&path).unwrap();
        // Every cut in the headers, then cuts across the whole file.
        for len in (0..4096.min(original.len())).chain((0..200).map(|_| rng.below(original.len()))) {
            let report = nx_verify::inspect(&original[..len]);
            let _ = nx_verify::judge(&report, &target);
        }
        // Bytes flipped where parsers look: headers, tables, the end.
        for _ in 0..1000 {
            let mut m = original.clone();
            for _ in 0..1 + rng.below(16) {
                let region = match rng.below(3) {
                    0 => rng.below(4096.min(m.len())),
                    1 => rng.below(m.len()),
                    _ => m.len() - 1 - rng.below(4096.min(m.len())),
                };
                m[region] = rng.next() as u8;
            }
            let report = nx_verify::inspect(&m);
            let _ = nx_verify::judge(&report, &target);
        }
    }
}
