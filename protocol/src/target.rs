//! What a server can run: the facts `nx verify --server` checks a binary against.

use serde::{Deserialize, Serialize};

/// The execution environment the receiver offers to sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTarget {
    /// `linux`.
    pub os: String,
    /// Architecture in Go/Docker spelling: `amd64`, `arm64`.
    pub arch: String,
    /// The glibc version inside the sandbox, `2.36`, when the host has glibc.
    pub glibc: Option<String>,
    /// Dynamic loaders available inside the sandbox (`/lib64/ld-linux-x86-64.so.2`).
    pub interpreters: Vec<String>,
    /// Shared library sonames the sandbox can load (`libc.so.6`, ...).
    pub libraries: Vec<String>,
    /// Whether the receiver takes an upload whose sha256 follows its bytes
    /// (`x-nx-content-sha256: footer`, see `auth::DIGEST_IN_FOOTER`), so that
    /// `nx push` hashes while it sends; absent, so false, from a receiver
    /// that predates it, which `nx push` then signs the digest ahead for.
    #[serde(default)]
    pub digest_in_footer: bool,
}

impl ServerTarget {
    /// A target known only by os and architecture (`nx verify --target linux/amd64`):
    /// static binaries can be judged, dynamic ones only partly.
    pub fn parse_os_arch(s: &str) -> Option<Self> {
        let (os, arch) = s.split_once('/')?;
        let arch = match arch {
            "amd64" | "x86_64" => "amd64",
            "arm64" | "aarch64" => "arm64",
            _ => return None,
        };
        (os == "linux").then(|| Self {
            os: os.to_owned(),
            arch: arch.to_owned(),
            glibc: None,
            interpreters: Vec::new(),
            libraries: Vec::new(),
            digest_in_footer: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_arch_targets_parse() {
        assert_eq!(ServerTarget::parse_os_arch("linux/x86_64").unwrap().arch, "amd64");
        assert_eq!(ServerTarget::parse_os_arch("linux/arm64").unwrap().arch, "arm64");
        assert!(ServerTarget::parse_os_arch("darwin/arm64").is_none());
        assert!(ServerTarget::parse_os_arch("linux").is_none());
    }
}
