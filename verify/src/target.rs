//! What this host offers to sandboxes, read from a root directory (`/` in
//! production, a temporary tree in tests): architecture, glibc version, loaders
//! and shared libraries. The receiver serves it at `GET /v1/target`.

use std::path::Path;

use nx_protocol::target::ServerTarget;

use crate::elf::highest_glibc_defined;

/// Loaders a dynamic binary may ask for.
const LOADERS: [&str; 6] = [
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/ld-linux-aarch64.so.1",
    "/lib/ld-linux-x86-64.so.2",
    "/lib/ld-linux.so.2",
    "/lib/ld-musl-x86_64.so.1",
    "/lib/ld-musl-aarch64.so.1",
];

/// Directories searched for shared libraries, as the loader does on Debian.
const LIB_DIRS: [&str; 8] = [
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
];

/// The host's architecture in Go spelling.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// Reads the target below `root`.
pub fn detect(root: &Path) -> ServerTarget {
    let interpreters: Vec<String> =
        LOADERS.iter().filter(|l| root.join(l.trim_start_matches('/')).exists()).map(|l| l.to_string()).collect();
    let mut libraries = Vec::new();
    let mut glibc = None;
    for dir in LIB_DIRS {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".so") {
                if glibc.is_none() && name == "libc.so.6" {
                    glibc = std::fs::read(e.path()).ok().and_then(|d| highest_glibc_defined(&d));
                }
                libraries.push(name);
            }
        }
    }
    libraries.sort();
    libraries.dedup();
    ServerTarget {
        os: "linux".into(),
        arch: host_arch().into(),
        glibc,
        interpreters,
        libraries,
        digest_in_footer: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_has_glibc_and_its_loader() {
        let t = detect(Path::new("/"));
        assert_eq!(t.os, "linux");
        let glibc = t.glibc.expect("Debian has glibc");
        assert!(glibc.starts_with("2."), "{glibc}");
        assert!(t.libraries.iter().any(|l| l == "libc.so.6"));
        assert!(!t.interpreters.is_empty());
    }

    #[test]
    fn an_empty_root_offers_nothing_dynamic() {
        let dir = std::env::temp_dir().join(format!("nx-target-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = detect(&dir);
        assert!(t.glibc.is_none() && t.interpreters.is_empty() && t.libraries.is_empty());
    }
}
