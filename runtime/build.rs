//! Builds `nx-init` (src/init.rs), the sandbox's pid 1, as a static
//! executable in `OUT_DIR`, where `nx_runtime::spec::install_init` takes it
//! from. It is compiled with the same rustc on its own rather than as a
//! binary of this crate: cargo cannot link one binary of a workspace
//! statically, and a dynamically linked pid 1 would cost each sandbox the
//! loader's and libc's private pages, the very memory it is there to save.
//!
//! The musl target is used when its standard library is installed (`rustup
//! target add <arch>-unknown-linux-musl`): glibc's static start-up probes the
//! CPU's caches with `cpuid`, which a virtual machine traps, and costs about
//! 1 ms per sandbox start where musl's costs about 0.3 ms. Without it, glibc
//! is linked statically and the build says so.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/init.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("src/init.rs");
    let root = out.join("nx-init.rs");
    std::fs::write(
        &root,
        format!("#[path = {source:?}]\nmod init;\n\nfn main() -> std::process::ExitCode {{\n    init::main()\n}}\n"),
    )
    .expect("cannot write nx-init's crate root");
    let rustc = PathBuf::from(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()));
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let musl = target.replace("-linux-gnu", "-linux-musl");
    let mut build = Command::new(&rustc);
    build.args(["--edition=2021", "--crate-name=nx_init", "--crate-type=bin"]).args([
        "-C",
        "opt-level=s",
        "-C",
        "panic=abort",
        "-C",
        "strip=symbols",
        "-C",
        "relocation-model=static",
    ]);
    let musl_std = std_dir(&rustc, &musl);
    if let Some(dir) = &musl_std {
        // Adding or updating the target builds nx-init again.
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    if target == musl || musl_std.is_some() {
        build.args(["--target", &musl]);
    } else {
        println!(
            "cargo:warning=nx-init is linked with glibc, which makes each sandbox start about 1 ms slower on a virtual machine; `rustup target add {musl}` avoids it"
        );
        build.args(["--target", &target, "-C", "target-feature=+crt-static"]);
    }
    // The linker cargo was told to use for the crate's own target, if any.
    if let (true, Some(linker)) = (target == musl || musl_std.is_none(), std::env::var_os("RUSTC_LINKER")) {
        build.arg("-C").arg(format!("linker={}", linker.to_string_lossy()));
    }
    let status = build
        .arg("-o")
        .arg(out.join("nx-init"))
        .arg(&root)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", rustc.display()));
    assert!(
        status.success(),
        "building nx-init failed ({status}): install Rust's musl target (`rustup target add {musl}`) or glibc's static library (Debian's libc6-dev)"
    );
}

/// Where `rustc` keeps the standard library of `target`, if it is installed.
fn std_dir(rustc: &Path, target: &str) -> Option<PathBuf> {
    let out = Command::new(rustc).args(["--print", "target-libdir", "--target", target]).output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let has_std =
        std::fs::read_dir(&dir).ok()?.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-")));
    (out.status.success() && has_std).then_some(dir)
}
