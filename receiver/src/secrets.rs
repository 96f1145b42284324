//! Secrets at rest: the master key file and the sealing of every secret the
//! metadata database holds (deploy keys, the admin token, app database
//! passwords, app environment values).
//!
//! A dump of the metadata database alone reveals none of them: each is sealed
//! with ChaCha20-Poly1305 under a 32-byte key kept in `<data>/secrets/master.key`
//! (mode 0600), outside the database. Back up the key file with the database.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::distributions::{Alphanumeric, DistString};
use rand::RngCore;

const NONCE_LEN: usize = 12;

/// What sealing adds to a secret: the nonce before it and the tag after it,
/// so sizes of plain values can be told from the sealed ones.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// Errors about secrets; messages name the file involved.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the master key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot create the master key {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("master key {path} is {len} bytes, expected 32; restore it from your backup")]
    BadLength { path: PathBuf, len: usize },
    #[error("master key {path} is readable by other users (mode {mode:o}); run chmod 600 on it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("a sealed secret could not be opened: the master key does not match the database")]
    Open,
}

/// The key that seals secrets. `Debug` shows nothing of it.
pub struct MasterKey {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Loads the key at `path`, creating it on first start.
    pub fn load_or_create(path: &Path) -> Result<MasterKey, SecretError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(path)
                    .map_err(|source| SecretError::Read { path: path.to_owned(), source })?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SecretError::Exposed { path: path.to_owned(), mode: mode & 0o777 });
                }
                if bytes.len() != 32 {
                    return Err(SecretError::BadLength { path: path.to_owned(), len: bytes.len() });
                }
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut bytes);
                create_private(path, &bytes).map_err(|source| SecretError::Create { path: path.to_owned(), source })?;
                Ok(Self::from_bytes(&bytes))
            }
            Err(source) => Err(SecretError::Read { path: path.to_owned(), source }),
        }
    }

    fn from_bytes(bytes: &[u8]) -> MasterKey {
        MasterKey { cipher: ChaCha20Poly1305::new(Key::from_slice(bytes)) }
    }

    /// Seals `plain`: a random nonce followed by the ciphertext and tag.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        // Encryption with a fresh nonce and an in-memory buffer cannot fail.
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .unwrap_or_else(|_| unreachable!("chacha20poly1305 encryption is infallible"));
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`MasterKey::seal`] produced.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher.decrypt(Nonce::from_slice(nonce), body).map_err(|_| SecretError::Open)
    }

    pub fn seal_str(&self, plain: &str) -> Vec<u8> {
        self.seal(plain.as_bytes())
    }

    pub fn open_str(&self, sealed: &[u8]) -> Result<String, SecretError> {
        String::from_utf8(self.open(sealed)?).map_err(|_| SecretError::Open)
    }
}

/// A random token of `len` characters [A-Za-z0-9] from the OS generator.
/// Writes a new file only its owner can read (mode 0600), durably; fails if
/// it exists, so a secret is never overwritten.
pub fn create_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

pub fn random_token(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rngs::OsRng, len)
}

/// A random token of lowercase letters and digits, for ids that end up in host
/// names or key ids.
pub fn random_lower(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nx-secrets-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sealed_values_round_trip_and_hide_the_plaintext() {
        let d = dir("roundtrip");
        let key = MasterKey::load_or_create(&d.join("master.key")).unwrap();
        let sealed = key.seal_str("hunter2-very-secret");
        assert!(!sealed.windows(6).any(|w| w == b"hunter"));
        assert_eq!(key.open_str(&sealed).unwrap(), "hunter2-very-secret");
        assert_eq!(sealed.len(), "hunter2-very-secret".len() + SEAL_OVERHEAD, "variable sizes are told from this");
        // The same key is loaded again on the next start.
        let again = MasterKey::load_or_create(&d.join("master.key")).unwrap();
        assert_eq!(again.open_str(&sealed).unwrap(), "hunter2-very-secret");
        assert_eq!(std::fs::metadata(d.join("master.key")).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn tampering_or_another_key_is_detected() {
        let d = dir("tamper");
        let key = MasterKey::load_or_create(&d.join("a.key")).unwrap();
        let other = MasterKey::load_or_create(&d.join("b.key")).unwrap();
        let mut sealed = key.seal_str("x");
        assert!(other.open(&sealed).is_err());
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(key.open(&sealed).is_err());
        assert!(key.open(b"short").is_err());
    }

    #[test]
    fn an_exposed_or_damaged_key_is_refused_with_the_fix() {
        let d = dir("exposed");
        let path = d.join("master.key");
        MasterKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(MasterKey::load_or_create(&path), Err(SecretError::BadLength { len: 5, .. })));
    }

    #[test]
    fn tokens_have_the_requested_shape() {
        assert_eq!(random_token(40).len(), 40);
        assert!(random_lower(10).bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(random_token(32), random_token(32));
    }
}
