//! Real binaries for the suite, built on demand with real toolchains and cached
//! in `target/<profile>/fixtures`: Go programs built with Debian's golang-go (static,
//! with cgo, cross-compiled for macOS, Windows and arm64), C programs built with
//! gcc and musl-gcc. A build goes to a temporary name and is renamed into place,
//! so parallel tests never see half a binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{bin_dir, require_program};

fn fixtures_dir() -> PathBuf {
    let d = bin_dir().join("fixtures");
    std::fs::create_dir_all(&d).expect("fixtures dir");
    d
}

fn source(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// Builds `name` from `sources` unless a build of exactly these sources exists:
/// it lives in a directory named by a hash of their contents, so an edit rebuilds.
fn build_once(name: &str, sources: &[PathBuf], build: impl FnOnce(&Path)) -> PathBuf {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in sources {
        h.update(std::fs::read(s).unwrap_or_else(|e| panic!("fixture source {}: {e}", s.display())));
    }
    let dir = fixtures_dir().join(&hex::encode(h.finalize())[..12]);
    std::fs::create_dir_all(&dir).expect("fixture dir");
    let out = dir.join(name);
    if out.is_file() {
        return out;
    }
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    build(&tmp);
    std::fs::rename(&tmp, &out).expect("move fixture into place");
    out
}

fn run(mut cmd: Command, what: &str) {
    let out = crate::exec::output(&mut cmd).unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How to build `tests/fixtures/goweb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Go {
    /// linux/amd64 with CGO_ENABLED=0: fully static.
    Static,
    /// linux/amd64 with cgo: dynamically linked against glibc.
    Cgo,
    /// darwin/arm64 (a Mac with Apple silicon).
    DarwinArm64,
    /// darwin/amd64 (an Intel Mac).
    DarwinAmd64,
    /// windows/amd64.
    Windows,
    /// linux/arm64.
    LinuxArm64,
}

/// The goweb program built as `variant`.
pub fn go(variant: Go) -> PathBuf {
    let go = require_program("go", "golang-go");
    let (name, goos, goarch, cgo) = match variant {
        Go::Static => ("goweb-static", "linux", "amd64", "0"),
        Go::Cgo => ("goweb-cgo", "linux", "amd64", "1"),
        Go::DarwinArm64 => ("goweb-darwin-arm64", "darwin", "arm64", "0"),
        Go::DarwinAmd64 => ("goweb-darwin-amd64", "darwin", "amd64", "0"),
        Go::Windows => ("goweb.exe", "windows", "amd64", "0"),
        Go::LinuxArm64 => ("goweb-linux-arm64", "linux", "arm64", "0"),
    };
    build_once(name, &[source("goweb/main.go"), source("goweb/go.mod")], |out| {
        let cache = fixtures_dir().join("go-cache");
        let mut cmd = Command::new(go);
        cmd.args(["build", "-o"])
            .arg(out)
            .arg(".")
            .current_dir(source("goweb"))
            .env("GOOS", goos)
            .env("GOARCH", goarch)
            .env("CGO_ENABLED", cgo)
            .env("GOCACHE", &cache)
            .env("GOPATH", cache.join("gopath"))
            .env("GOFLAGS", "-mod=mod")
            .env("GOPROXY", "off");
        run(cmd, &format!("go build ({name})"));
    })
}

/// `tests/fixtures/c/hello.c` built with gcc: dynamic, glibc.
pub fn c_gcc() -> PathBuf {
    let gcc = require_program("gcc", "gcc");
    build_once("hello-c-gcc", &[source("c/hello.c")], |out| {
        let mut cmd = Command::new(gcc);
        cmd.args(["-O2", "-o"]).arg(out).arg(source("c/hello.c"));
        run(cmd, "gcc");
    })
}

/// `tests/fixtures/c/hello.c` built with musl-gcc -static.
pub fn c_musl_static() -> PathBuf {
    let musl = require_program("musl-gcc", "musl-tools");
    build_once("hello-c-musl", &[source("c/hello.c")], |out| {
        let mut cmd = Command::new(musl);
        cmd.args(["-static", "-O2", "-o"]).arg(out).arg(source("c/hello.c"));
        run(cmd, "musl-gcc");
    })
}

/// `tests/fixtures/auditable` built with `cargo auditable` (the dependency list
/// is embedded in the `.dep-v0` section).
pub fn rust_auditable() -> PathBuf {
    require_program("cargo-auditable", "cargo-auditable (cargo install --locked cargo-auditable)");
    build_once("auditable-fixture", &[source("auditable/src/main.rs"), source("auditable/Cargo.toml")], |out| {
        let target_dir = fixtures_dir().join("auditable-target");
        let mut cmd = Command::new("cargo");
        cmd.args(["auditable", "build", "--release", "--locked", "--manifest-path"])
            .arg(source("auditable/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir);
        run(cmd, "cargo auditable build");
        std::fs::copy(target_dir.join("release/auditable-fixture"), out).expect("copy the auditable build");
    })
}

/// A universal (fat) Mach-O holding the darwin/amd64 and darwin/arm64 builds,
/// laid out as `lipo -create` does: a big-endian header and arch table, each
/// slice aligned to 2^14 bytes.
pub fn go_universal() -> PathBuf {
    let slices = [(0x0100_0007u32, 3u32, go(Go::DarwinAmd64)), (0x0100_000c, 0, go(Go::DarwinArm64))];
    build_once("goweb-universal", &[slices[0].2.clone(), slices[1].2.clone()], |out| {
        const ALIGN: u32 = 14;
        let mut header = Vec::new();
        header.extend_from_slice(&0xcafe_babeu32.to_be_bytes());
        header.extend_from_slice(&(slices.len() as u32).to_be_bytes());
        let mut bodies = Vec::new();
        let mut offset = 1u32 << ALIGN;
        for (cputype, subtype, path) in &slices {
            let body = std::fs::read(path).expect("slice");
            for v in [*cputype, *subtype, offset, body.len() as u32, ALIGN] {
                header.extend_from_slice(&v.to_be_bytes());
            }
            offset = (offset + body.len() as u32).next_multiple_of(1 << ALIGN);
            bodies.push(body);
        }
        let mut file = header;
        for body in bodies {
            file.resize(file.len().next_multiple_of(1 << ALIGN), 0);
            file.extend_from_slice(&body);
        }
        std::fs::write(out, file).expect("write universal binary");
    })
}

/// The hostile app of the attack suite, built with gcc (dynamically linked, so
/// its sandbox has /usr and the host's setuid binaries to try).
pub fn evil() -> PathBuf {
    let gcc = require_program("gcc", "gcc");
    build_once("evil", &[source("evil/evil.c")], |out| {
        let mut cmd = Command::new(gcc);
        cmd.args(["-O2", "-o"]).arg(out).arg(source("evil/evil.c"));
        run(cmd, "gcc evil.c");
    })
}

/// A shared library whose constructor appends the name of the program that
/// loaded it to `$NX_PRELOAD_MARKER` (`tests/fixtures/evil/preload.c`): the
/// proof, if the file appears, that a program loaded it.
pub fn preload_marker() -> PathBuf {
    let gcc = require_program("gcc", "gcc");
    build_once("preload.so", &[source("evil/preload.c")], |out| {
        let mut cmd = Command::new(gcc);
        cmd.args(["-O2", "-shared", "-fPIC", "-o"]).arg(out).arg(source("evil/preload.c"));
        run(cmd, "gcc -shared preload.c");
    })
}
