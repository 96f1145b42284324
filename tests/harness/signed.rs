//! Hand-made signed requests, for the tests that send what `nx` never would:
//! tampered bodies and metadata, stale timestamps, replayed nonces, cut uploads.

use nx_protocol::api::app_of_path;
use nx_protocol::auth::{
    sha256_hex, CanonicalRequest, Credential, FooterKey, DIGEST_IN_FOOTER, EMPTY_SHA256, FOOTER_LEN,
    HEADER_CONTENT_SHA256, HEADER_KEY, HEADER_META, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};

/// Everything a signature covers, editable before and after signing.
#[derive(Debug, Clone)]
pub struct Signed {
    pub method: String,
    pub path: String,
    pub body_sha256: String,
    pub content_length: u64,
    pub meta: Option<Vec<u8>>,
    pub timestamp: i64,
    pub nonce: String,
}

impl Signed {
    pub fn new(method: &str, path: &str, body: &[u8], meta: Option<&[u8]>) -> Signed {
        Signed {
            method: method.into(),
            path: path.into(),
            body_sha256: if body.is_empty() { EMPTY_SHA256.into() } else { sha256_hex(body) },
            content_length: body.len() as u64,
            meta: meta.map(<[u8]>::to_vec),
            timestamp: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64,
            nonce: hex::encode(rand::random::<[u8; 16]>()),
        }
    }

    /// An upload of `len` bytes whose digest follows them in a footer, as
    /// `nx push` sends one to a receiver that takes it.
    pub fn with_footer(method: &str, path: &str, len: u64, meta: Option<&[u8]>) -> Signed {
        Signed {
            body_sha256: DIGEST_IN_FOOTER.into(),
            content_length: len + FOOTER_LEN,
            ..Signed::new(method, path, b"", meta)
        }
    }

    /// The footer vouching for `sha256` under this request signed with `key`.
    pub fn footer(&self, key: &str, sha256: &str) -> Vec<u8> {
        let cred = Credential::parse(key).expect("a well-formed key");
        let meta_sha = self.meta.as_deref().map(sha256_hex);
        let signature = self.canonical(&cred, meta_sha.as_deref()).sign(cred.expose_secret());
        FooterKey::derive(cred.expose_secret(), &signature).footer(sha256)
    }

    fn canonical<'a>(&'a self, cred: &'a Credential, meta_sha: Option<&'a str>) -> CanonicalRequest<'a> {
        CanonicalRequest {
            method: &self.method,
            path: &self.path,
            app: app_of_path(&self.path),
            key_id: cred.key_id(),
            timestamp: self.timestamp,
            nonce: &self.nonce,
            content_sha256: &self.body_sha256,
            content_length: self.content_length,
            meta_sha256: meta_sha.unwrap_or(EMPTY_SHA256),
        }
    }

    /// The headers for `key` (a deploy key or admin token string).
    pub fn headers(&self, key: &str) -> Vec<(&'static str, String)> {
        self.headers_for(&Credential::parse(key).expect("a well-formed key"))
    }

    /// The headers for a credential, a GitHub OIDC token's included.
    pub fn headers_for(&self, cred: &Credential) -> Vec<(&'static str, String)> {
        use base64::Engine as _;
        let meta_sha = self.meta.as_deref().map(sha256_hex);
        let canonical = self.canonical(cred, meta_sha.as_deref());
        let mut h = vec![
            (HEADER_KEY, cred.key_id().to_owned()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_CONTENT_SHA256, self.body_sha256.clone()),
            (HEADER_SIGNATURE, canonical.sign(cred.expose_secret())),
        ];
        if let Some(m) = &self.meta {
            h.push((HEADER_META, base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(m)));
        }
        if let Some(token) = cred.bearer() {
            h.push(("authorization", format!("Bearer {token}")));
        }
        h
    }
}

/// Sends `s` to the receiver at `api`, signed with `key`, with `body` (which
/// a test may make differ from what was signed); the status and the text.
pub fn send(api: &str, s: &Signed, key: &str, body: Vec<u8>) -> (u16, String) {
    send_as(api, s, &Credential::parse(key).expect("a well-formed key"), body)
}

/// `method path` with `body`, signed with a GitHub OIDC token as `nx push`
/// signs with one; the status and the text.
pub fn send_with_token(api: &str, method: &str, path: &str, body: &[u8], token: &str) -> (u16, String) {
    send_as(api, &Signed::new(method, path, body, None), &Credential::github_oidc(token), body.to_vec())
}

/// Sends `s` signed with `cred` (a key or a GitHub OIDC token), with `body`.
pub fn send_as(api: &str, s: &Signed, cred: &Credential, body: Vec<u8>) -> (u16, String) {
    let client =
        reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(60)).build().expect("a client");
    let mut req = client.request(s.method.parse().expect("a method"), format!("{api}{}", s.path)).body(body);
    for (k, v) in s.headers_for(cred) {
        req = req.header(k, v);
    }
    let resp = req.send().expect("the receiver answers");
    (resp.status().as_u16(), resp.text().unwrap_or_default())
}
