//! SCRAM-SHA-256 password verifiers, computed here so that `CREATE ROLE` and
//! `ALTER ROLE` never carry a plaintext password: nothing in the server's logs or
//! `pg_stat_activity` can reveal it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// PostgreSQL's default iteration count.
const ITERATIONS: u32 = 4096;

/// The verifier PostgreSQL stores for `password` with `salt`:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub fn verifier(password: &str, salt: &[u8; 16]) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, ITERATIONS, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!("SCRAM-SHA-256${ITERATIONS}:{}${}:{}", B64.encode(salt), B64.encode(stored_key), B64.encode(server_key))
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("hmac takes any key"));
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_has_postgres_format() {
        let v = verifier("secret", &[7u8; 16]);
        let (head, keys) = v.split_once('$').unwrap();
        assert_eq!(head, "SCRAM-SHA-256");
        assert!(keys.starts_with("4096:"));
        assert_eq!(keys.matches('$').count(), 1);
        assert_eq!(keys.matches(':').count(), 2);
        assert!(!v.contains("secret"));
        assert_ne!(v, verifier("other", &[7u8; 16]));
    }
}
