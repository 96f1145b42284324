//! Self-signed certificates for the router's HTTPS tests, made by the real
//! `openssl` command line.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A one-day self-signed certificate for `names` and its key, written into
/// `dir`: `(cert.pem, key.pem)`.
pub fn self_signed(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
    crate::require_program("openssl", "openssl");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let alt: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args([
            "-addext",
            &format!("subjectAltName={}", alt.join(",")),
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}
