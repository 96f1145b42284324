//! Request signing: HMAC-SHA256 over a canonical request, the one way every API
//! request is authenticated.
//!
//! The secret never crosses the wire. The client sends the key id, a timestamp, a
//! nonce, the sha256 of the body and of the deployment metadata, and the signature
//! over all of them together with the method, path and app. The receiver rebuilds
//! the same canonical text from what it received and compares the signatures in
//! constant time. The canonical text is plain lines, so anyone can reproduce a
//! signature with `printf ... | openssl dgst -sha256 -hmac SECRET` (ARCHITECTURE.md
//! has a worked vector, kept as a unit test below).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// The scheme name, first line of every canonical request.
pub const SCHEME: &str = "NX1-HMAC-SHA256";
/// Header naming the key that signed the request.
pub const HEADER_KEY: &str = "x-nx-key";
/// Header with the unix time in seconds at which the request was signed.
pub const HEADER_TIMESTAMP: &str = "x-nx-timestamp";
/// Header with a random value used once, so a captured request cannot be replayed.
pub const HEADER_NONCE: &str = "x-nx-nonce";
/// Header with the lowercase hex sha256 of the body.
pub const HEADER_CONTENT_SHA256: &str = "x-nx-content-sha256";
/// Header with the deployment metadata: base64url (no padding) of a JSON document.
pub const HEADER_META: &str = "x-nx-meta";
/// Header with the lowercase hex HMAC-SHA256 signature.
pub const HEADER_SIGNATURE: &str = "x-nx-signature";
/// How far a request's timestamp may be from the receiver's clock, in seconds.
pub const CLOCK_WINDOW_SECS: i64 = 300;
/// The sha256 of zero bytes, the content digest of a request without a body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// `x-nx-content-sha256` of an upload whose digest follows its bytes, in a
/// [`FOOTER_LEN`]-byte footer at the end of the body signed with a
/// [`FooterKey`]: the client hashes while it sends instead of before.
pub const DIGEST_IN_FOOTER: &str = "footer";
/// Length of an upload's footer: the sha256 of the bytes before it and that
/// digest's HMAC under the request's [`FooterKey`], both lowercase hex.
pub const FOOTER_LEN: u64 = 128;
/// First line of the text a [`FooterKey`] is derived from.
const FOOTER_SCHEME: &str = "NX1-HMAC-SHA256-FOOTER";

/// Key id of the admin token.
pub const ADMIN_KEY_ID: &str = "admin";
/// Key id of a request signed with a GitHub Actions OIDC token instead of a
/// key. Stored key ids are alphanumeric, so none can be this one.
pub const GITHUB_OIDC_KEY_ID: &str = "github-oidc";
const DEPLOY_KEY_PREFIX: &str = "nxk_";
const ADMIN_TOKEN_PREFIX: &str = "nxa_";

/// A secret credential as users hold it: a deploy key `nxk_<id>_<secret>` scoped
/// to one app, or the admin token `nxa_<secret>`. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    key_id: String,
    secret: String,
}

/// Why a credential string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("key is malformed: deploy keys look like nxk_<id>_<secret> and admin tokens like nxa_<secret>; create one with `nx keys create APP` or read the admin token printed at the receiver's first start")]
    Malformed,
}

impl Credential {
    /// Parses `nxk_<id>_<secret>` or `nxa_<secret>`.
    pub fn parse(s: &str) -> Result<Self, CredentialError> {
        let s = s.trim();
        let token_chars = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_alphanumeric());
        if let Some(rest) = s.strip_prefix(DEPLOY_KEY_PREFIX) {
            let (id, secret) = rest.split_once('_').ok_or(CredentialError::Malformed)?;
            if token_chars(id) && token_chars(secret) && secret.len() >= 32 {
                return Ok(Self { key_id: id.to_owned(), secret: s.to_owned() });
            }
        } else if let Some(secret) = s.strip_prefix(ADMIN_TOKEN_PREFIX) {
            if token_chars(secret) && secret.len() >= 32 {
                return Ok(Self { key_id: ADMIN_KEY_ID.to_owned(), secret: s.to_owned() });
            }
        }
        Err(CredentialError::Malformed)
    }

    /// Builds a deploy key from its id and random part.
    pub fn deploy_key(id: &str, random: &str) -> Self {
        Self { key_id: id.to_owned(), secret: format!("{DEPLOY_KEY_PREFIX}{id}_{random}") }
    }

    /// A GitHub Actions OIDC token (a JWT) used as a credential. The request
    /// carries the token itself in `Authorization: Bearer`, since the receiver
    /// must read its signed claims, and is signed like any other with the token
    /// as the HMAC key: the receiver keeps one request format and one check of
    /// method, path, body digest, metadata, clock and nonce for every caller.
    /// The HMAC adds no secrecy (the token travels with it); what makes the
    /// token worth little to a thief is its audience, its minutes of life and
    /// the one app it may push to.
    pub fn github_oidc(token: &str) -> Self {
        Self { key_id: GITHUB_OIDC_KEY_ID.to_owned(), secret: token.trim().to_owned() }
    }

    /// The bearer token to send with each request: a GitHub OIDC token, or
    /// nothing for keys, whose secret never crosses the wire.
    pub fn bearer(&self) -> Option<&str> {
        (self.key_id == GITHUB_OIDC_KEY_ID).then_some(self.secret.as_str())
    }

    /// Builds an admin token from its random part.
    pub fn admin_token(random: &str) -> Self {
        Self { key_id: ADMIN_KEY_ID.to_owned(), secret: format!("{ADMIN_TOKEN_PREFIX}{random}") }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn is_admin(&self) -> bool {
        self.key_id == ADMIN_KEY_ID
    }

    /// The whole secret string, as shown once to the user and used as HMAC key.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential").field("key_id", &self.key_id).field("secret", &"<redacted>").finish()
    }
}

/// Everything a signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalRequest<'a> {
    /// Upper-case HTTP method.
    pub method: &'a str,
    /// Path and query exactly as sent, for example `/v1/apps/web/deployments`.
    pub path: &'a str,
    /// The app the request acts on, or empty for requests not scoped to one app.
    pub app: &'a str,
    pub key_id: &'a str,
    pub timestamp: i64,
    pub nonce: &'a str,
    /// Lowercase hex sha256 of the body.
    pub content_sha256: &'a str,
    pub content_length: u64,
    /// Lowercase hex sha256 of the metadata bytes (after base64 decoding), or of
    /// nothing when there is no metadata.
    pub meta_sha256: &'a str,
}

impl CanonicalRequest<'_> {
    /// The exact text that is signed: one `name:value` line per field, `\n`
    /// separated, no trailing newline.
    pub fn to_text(&self) -> String {
        format!(
            "{SCHEME}\nmethod:{}\npath:{}\napp:{}\nkey:{}\ntimestamp:{}\nnonce:{}\ncontent-sha256:{}\ncontent-length:{}\nmeta-sha256:{}",
            self.method,
            self.path,
            self.app,
            self.key_id,
            self.timestamp,
            self.nonce,
            self.content_sha256,
            self.content_length,
            self.meta_sha256
        )
    }

    /// Lowercase hex HMAC-SHA256 of the canonical text under `secret`.
    pub fn sign(&self, secret: &str) -> String {
        hex::encode(self.mac(secret).finalize().into_bytes())
    }

    /// Checks `signature` (lowercase hex) in constant time.
    pub fn verify(&self, secret: &str, signature: &str) -> bool {
        match hex::decode(signature) {
            Ok(bytes) => self.mac(secret).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    fn mac(&self, secret: &str) -> Hmac<Sha256> {
        let mut mac = hmac_of(secret.as_bytes());
        mac.update(self.to_text().as_bytes());
        mac
    }
}

/// The key that signs one request's footer: HMAC-SHA256, keyed with the
/// whole secret, of `NX1-HMAC-SHA256-FOOTER\nsignature:<the head's
/// signature>`. Bound to that signature, a footer vouches for the body of
/// its own request only (its nonce, path, length, key); derived, it lets the
/// receiver check a body that takes minutes to arrive without keeping the
/// key's secret, which signs any request, for as long.
#[derive(Clone, Debug)]
pub struct FooterKey(Secret<[u8; 32]>);

/// Why a footer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FooterError {
    #[error("the body's last {FOOTER_LEN} bytes are not a footer (the sha256 of the bytes before them and its signature, lowercase hex)")]
    Malformed,
    #[error("the body's footer is not signed with this request's key: the body was changed after it was signed, or the key is wrong")]
    Forged,
}

impl FooterKey {
    pub fn derive(secret: &str, head_signature: &str) -> FooterKey {
        let mut mac = hmac_of(secret.as_bytes());
        mac.update(format!("{FOOTER_SCHEME}\nsignature:{head_signature}").as_bytes());
        FooterKey(Secret::new(mac.finalize().into_bytes().into()))
    }

    /// The footer of a body whose bytes have the sha256 `sha256` (lowercase hex).
    pub fn footer(&self, sha256: &str) -> Vec<u8> {
        let mut footer = sha256.as_bytes().to_vec();
        footer.extend_from_slice(hex::encode(self.mac(sha256).finalize().into_bytes()).as_bytes());
        footer
    }

    /// The digest `footer` vouches for, once its signature is checked (in
    /// constant time).
    pub fn open(&self, footer: &[u8]) -> Result<String, FooterError> {
        let text = std::str::from_utf8(footer).map_err(|_| FooterError::Malformed)?;
        let (sha256, signature) = text.split_at_checked(64).ok_or(FooterError::Malformed)?;
        if !is_sha256_hex(sha256) || !is_sha256_hex(signature) {
            return Err(FooterError::Malformed);
        }
        let signature = hex::decode(signature).map_err(|_| FooterError::Malformed)?;
        self.mac(sha256).verify_slice(&signature).map_err(|_| FooterError::Forged)?;
        Ok(sha256.to_owned())
    }

    fn mac(&self, sha256: &str) -> Hmac<Sha256> {
        let mut mac = hmac_of(self.0.expose());
        mac.update(format!("content-sha256:{sha256}").as_bytes());
        mac
    }
}

fn hmac_of(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("hmac takes keys of any length"))
}

/// Whether `timestamp` is within the accepted window around `now`.
pub fn timestamp_fresh(timestamp: i64, now: i64) -> bool {
    // abs_diff: a subtraction could overflow for a timestamp near i64::MIN.
    timestamp.abs_diff(now) <= CLOCK_WINDOW_SECS.unsigned_abs()
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `s` looks like a lowercase hex sha256.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Whether `s` is an acceptable nonce: 16 to 64 characters of [A-Za-z0-9_-].
pub fn is_valid_nonce(s: &str) -> bool {
    (16..=64).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked vector in ARCHITECTURE.md. Reproduce it with:
    /// printf 'NX1-HMAC-SHA256\nmethod:POST\n...' | openssl dgst -sha256 -hmac 'nxk_k1_...'
    const VECTOR_SECRET: &str = "nxk_k1_0123456789abcdefghijklmnopqrstuv";
    const VECTOR_SIGNATURE: &str = "ed3da4d47b4fa9a9ee6a6795c780cd0779680473d0c478fbe09ed0e76b8ccf39";

    fn vector() -> CanonicalRequest<'static> {
        CanonicalRequest {
            method: "POST",
            path: "/v1/apps/web/deployments",
            app: "web",
            key_id: "k1",
            timestamp: 1_700_000_000,
            nonce: "0123456789abcdef0123456789abcdef",
            content_sha256: "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
            content_length: 6,
            meta_sha256: EMPTY_SHA256,
        }
    }

    #[test]
    fn worked_vector_matches_the_documented_signature() {
        let text = vector().to_text();
        assert!(text.starts_with("NX1-HMAC-SHA256\nmethod:POST\npath:/v1/apps/web/deployments\napp:web\n"));
        assert!(!text.ends_with('\n'));
        assert_eq!(vector().sign(VECTOR_SECRET), VECTOR_SIGNATURE);
        assert!(vector().verify(VECTOR_SECRET, VECTOR_SIGNATURE));
    }

    #[test]
    fn any_changed_field_breaks_the_signature() {
        let sig = vector().sign(VECTOR_SECRET);
        let mut changed = vector();
        changed.content_length = 7;
        assert!(!changed.verify(VECTOR_SECRET, &sig));
        let mut changed = vector();
        changed.app = "other";
        assert!(!changed.verify(VECTOR_SECRET, &sig));
        let mut changed = vector();
        changed.meta_sha256 = "00";
        assert!(!changed.verify(VECTOR_SECRET, &sig));
        assert!(!vector().verify("nxk_k1_wrongwrongwrongwrongwrongwrongwrong", &sig));
        assert!(!vector().verify(VECTOR_SECRET, "not hex"));
    }

    /// The footer's worked vector in ARCHITECTURE.md ("Request signing"),
    /// for the body `hello\n` of the request above signed with the footer
    /// instead of its digest (the same head signature stands in here).
    const VECTOR_FOOTER_MAC: &str = "399148a06ca8b128807c73d8da615c6859fa8aa980320f3e76e08992ebaec16f";

    #[test]
    fn a_footer_vouches_for_its_digest_under_its_request_only() {
        let key = FooterKey::derive(VECTOR_SECRET, VECTOR_SIGNATURE);
        let digest = vector().content_sha256;
        let footer = key.footer(digest);
        assert_eq!(footer.len() as u64, FOOTER_LEN);
        assert_eq!(String::from_utf8(footer.clone()).unwrap(), format!("{digest}{VECTOR_FOOTER_MAC}"));
        assert_eq!(key.open(&footer).as_deref(), Ok(digest));
        assert_eq!(format!("{key:?}"), "FooterKey(<redacted>)", "the derived key is never printed");

        // Another request's key (another head signature), or another secret.
        let other_request = FooterKey::derive(VECTOR_SECRET, &"0".repeat(64));
        assert_eq!(other_request.open(&footer), Err(FooterError::Forged));
        let other_secret = FooterKey::derive("nxk_k1_wrongwrongwrongwrongwrongwrongwrong", VECTOR_SIGNATURE);
        assert_eq!(other_secret.open(&footer), Err(FooterError::Forged));
        // A digest changed under the same signature.
        let mut changed = footer.clone();
        changed[0] = if changed[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(key.open(&changed), Err(FooterError::Forged));
        // Not a footer's shape.
        assert_eq!(key.open(&footer[..127]), Err(FooterError::Malformed));
        assert_eq!(key.open(&[footer.as_slice(), b"0"].concat()), Err(FooterError::Malformed));
        assert_eq!(key.open(&footer.to_ascii_uppercase()), Err(FooterError::Malformed));
        assert_eq!(key.open(&[0xff; 128]), Err(FooterError::Malformed));
    }

    #[test]
    fn credentials_parse_and_hide_their_secret() {
        let key = Credential::parse(VECTOR_SECRET).unwrap();
        assert_eq!(key.key_id(), "k1");
        assert!(!key.is_admin());
        assert!(!format!("{key:?}").contains("0123456789abcdef"));
        let admin = Credential::parse("nxa_0123456789abcdefghijklmnopqrstuvwxyz").unwrap();
        assert!(admin.is_admin());
        for bad in
            ["", "nxk_", "nxk_id", "nxk_id_short", "nxa_short", "token", "nxk_a-b_0123456789abcdefghijklmnopqrstuvwxyz"]
        {
            assert_eq!(Credential::parse(bad), Err(CredentialError::Malformed), "{bad}");
        }
    }

    #[test]
    fn clock_window_is_five_minutes_each_way() {
        assert!(timestamp_fresh(1000, 1300));
        assert!(timestamp_fresh(1300, 1000));
        assert!(!timestamp_fresh(1000, 1301));
        assert!(!timestamp_fresh(1301, 1000));
        assert!(!timestamp_fresh(i64::MIN, 1000), "no overflow lets a far timestamp through");
    }

    #[test]
    fn empty_digest_constant_is_right() {
        assert_eq!(sha256_hex(b""), EMPTY_SHA256);
        assert!(is_sha256_hex(EMPTY_SHA256));
        assert!(!is_sha256_hex("E3B0"));
    }
}
