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
    let (target, libc_flags): (&str, &[&str]) = if musl != target && has_std(&rustc, &musl) {
        (&musl, &[])
    } else {
        println!(
            "cargo:warning=nx-init is linked with glibc, which makes each sandbox start about 1 ms slower on a virtual machine; `rustup target add {musl}` avoids it"
        );
        (&target, &["-C", "target-feature=+crt-static"])
    };
    let status = Command::new(&rustc)
        .args(["--edition=2021", "--crate-name=nx_init", "--crate-type=bin", "--target", target])
        .args(["-C", "opt-level=s", "-C", "panic=abort", "-C", "strip=symbols", "-C", "relocation-model=static"])
        .args(libc_flags)
        .arg("-o")
        .arg(out.join("nx-init"))
        .arg(&root)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", rustc.display()));
    assert!(status.success(), "building nx-init for {target} failed ({status})");
}

/// Whether `rustc` has the standard library of `target` installed.
fn has_std(rustc: &Path, target: &str) -> bool {
    Command::new(rustc)
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|dir| std::fs::read_dir(dir.trim()).ok())
        .is_some_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-")))
        })
}
