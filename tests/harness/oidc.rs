//! A local GitHub Actions OIDC issuer: it serves
//! `/.well-known/openid-configuration` and its JWKS over loopback HTTP, signs
//! tokens with an RSA key made by `openssl genrsa` when it starts, and answers
//! the token request a job makes (`ACTIONS_ID_TOKEN_REQUEST_URL` with
//! `ACTIONS_ID_TOKEN_REQUEST_TOKEN`, `&audience=...`) as GitHub does. A test
//! says what the next tokens look like ([`Mint`]): their claims, their
//! signature, their header.

use std::convert::Infallible;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The repository, ids, ref and workflow tokens name unless a test changes them.
pub const REPOSITORY: &str = "nx-test/web";
pub const REPOSITORY_ID: u64 = 700_001;
pub const OWNER_ID: u64 = 9_001;
pub const WORKFLOW: &str = ".github/workflows/deploy.yml";
pub const SHA: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b";
/// The key id the issuer publishes.
pub const KID: &str = "nx-test-key-1";
/// What a job shows GitHub to get a token.
pub const REQUEST_TOKEN: &str = "job-request-token-for-tests";

/// How the next tokens are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// RS256 with the published key.
    Good,
    /// RS256 with a key the issuer never published, under the published kid.
    OtherKey,
    /// RS256 with the published key, under a kid the issuer does not publish.
    UnknownKid,
    /// HS256 keyed with the published key's public modulus (the classic
    /// confusion attack).
    Hs256,
    /// `"alg": "none"`, no signature.
    None,
}

/// What the next tokens look like: changes to the default claims (a `null`
/// removes one) and the signing.
#[derive(Debug, Clone)]
pub struct Mint {
    pub claims: Vec<(&'static str, Value)>,
    pub signing: Signing,
}

impl Default for Mint {
    fn default() -> Mint {
        Mint { claims: Vec::new(), signing: Signing::Good }
    }
}

impl Mint {
    pub fn with(changes: &[(&'static str, Value)]) -> Mint {
        Mint { claims: changes.to_vec(), signing: Signing::Good }
    }

    pub fn signed(signing: Signing) -> Mint {
        Mint { claims: Vec::new(), signing }
    }
}

#[derive(Debug)]
struct State {
    url: String,
    key_pem: Vec<u8>,
    other_pem: Vec<u8>,
    modulus: Vec<u8>,
    mint: Mutex<Mint>,
    jwks_fetches: AtomicU32,
}

/// The issuer, serving on a loopback port until dropped.
#[derive(Debug)]
pub struct Issuer {
    pub url: String,
    state: Arc<State>,
    _dir: tempfile::TempDir,
    _server: crate::server::Local,
}

/// A new 2048-bit RSA key (PEM) and its modulus.
fn rsa_key(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let path = dir.join(name);
    let out = Command::new("openssl").args(["genrsa", "-out"]).arg(&path).arg("2048").output().expect("run openssl");
    assert!(out.status.success(), "openssl genrsa: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("openssl").args(["rsa", "-noout", "-modulus", "-in"]).arg(&path).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let modulus = hex::decode(text.trim().strip_prefix("Modulus=").expect("openssl prints Modulus=")).unwrap();
    (std::fs::read(&path).unwrap(), modulus)
}

impl Issuer {
    pub fn start() -> Issuer {
        crate::require_program("openssl", "openssl");
        let dir = tempfile::tempdir().unwrap();
        let (key_pem, modulus) = rsa_key(dir.path(), "issuer.pem");
        let (other_pem, _) = rsa_key(dir.path(), "other.pem");
        let (server, state) = crate::server::serve(
            |url| State {
                url: url.to_owned(),
                key_pem,
                other_pem,
                modulus,
                mint: Mutex::new(Mint::default()),
                jwks_fetches: AtomicU32::new(0),
            },
            answer,
        );
        Issuer { url: server.url.clone(), state, _dir: dir, _server: server }
    }

    /// The flags that make a receiver trust this issuer.
    pub fn receiver_args(&self) -> Vec<String> {
        vec!["--github-oidc-issuer".into(), self.url.clone()]
    }

    /// The variables GitHub gives a job with `permissions: id-token: write`.
    pub fn job_env(&self) -> [(&'static str, String); 2] {
        [
            ("ACTIONS_ID_TOKEN_REQUEST_URL", format!("{}/token?api-version=2.0", self.url)),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN.to_owned()),
        ]
    }

    /// Makes the next tokens look like `mint`.
    pub fn next(&self, mint: Mint) {
        *self.state.mint.lock().unwrap() = mint;
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u32 {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// A token for `audience` as the next request would get it.
    pub fn token(&self, audience: &str) -> String {
        let mint = self.state.mint.lock().unwrap().clone();
        token(&self.state, audience, &mint)
    }
}

/// The claims GitHub puts in a push's token (see GitHub's "About security
/// hardening with OpenID Connect"), ids as strings as GitHub sends them.
fn claims(issuer: &str, audience: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "jti": hex::encode(rand::random::<[u8; 16]>()),
        "sub": format!("repo:{REPOSITORY}:ref:refs/heads/main"),
        "aud": audience,
        "ref": "refs/heads/main",
        "sha": SHA,
        "repository": REPOSITORY,
        "repository_owner": "nx-test",
        "repository_owner_id": OWNER_ID.to_string(),
        "repository_visibility": "private",
        "repository_id": REPOSITORY_ID.to_string(),
        "run_id": "5555",
        "run_number": "12",
        "run_attempt": "1",
        "actor": "octocat",
        "actor_id": "1",
        "workflow": "deploy",
        "workflow_ref": format!("{REPOSITORY}/{WORKFLOW}@refs/heads/main"),
        "workflow_sha": SHA,
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_type": "branch",
        "job_workflow_ref": format!("{REPOSITORY}/{WORKFLOW}@refs/heads/main"),
        "runner_environment": "github-hosted",
        "iss": issuer,
        "nbf": now - 5,
        "exp": now + 300,
        "iat": now - 5,
    })
}

fn token(state: &State, audience: &str, mint: &Mint) -> String {
    let mut c = claims(&state.url, audience);
    for (name, value) in &mint.claims {
        match value {
            Value::Null => {
                c.as_object_mut().unwrap().remove(*name);
            }
            v => c[*name] = v.clone(),
        }
    }
    let rs256 = |pem: &[u8], kid: &str| {
        let header = Header { kid: Some(kid.to_owned()), ..Header::new(Algorithm::RS256) };
        jsonwebtoken::encode(&header, &c, &EncodingKey::from_rsa_pem(pem).unwrap()).unwrap()
    };
    match mint.signing {
        Signing::Good => rs256(&state.key_pem, KID),
        Signing::OtherKey => rs256(&state.other_pem, KID),
        Signing::UnknownKid => rs256(&state.key_pem, "nx-test-key-never-published"),
        Signing::Hs256 => {
            let header = Header { kid: Some(KID.to_owned()), ..Header::new(Algorithm::HS256) };
            jsonwebtoken::encode(&header, &c, &EncodingKey::from_secret(&state.modulus)).unwrap()
        }
        Signing::None => {
            let header = json!({ "alg": "none", "typ": "JWT", "kid": KID });
            format!("{}.{}.", B64.encode(header.to_string()), B64.encode(c.to_string()))
        }
    }
}

async fn answer(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, value: Value| {
        let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert("content-type", "application/json".parse().unwrap());
        Ok(r)
    };
    match req.uri().path() {
        "/.well-known/openid-configuration" => reply(
            200,
            json!({
                "issuer": state.url,
                "jwks_uri": format!("{}/.well-known/jwks", state.url),
                "subject_types_supported": ["public", "pairwise"],
                "response_types_supported": ["id_token"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }),
        ),
        "/.well-known/jwks" => {
            state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            reply(
                200,
                json!({ "keys": [{
                    "kty": "RSA", "alg": "RS256", "use": "sig", "kid": KID,
                    "n": B64.encode(&state.modulus), "e": "AQAB",
                }]}),
            )
        }
        "/token" => {
            let authorized = req.headers().get("authorization").and_then(|v| v.to_str().ok())
                == Some(&format!("Bearer {REQUEST_TOKEN}"));
            if !authorized {
                return reply(401, json!({ "message": "Bad credentials" }));
            }
            let query = req.uri().query().unwrap_or_default();
            let audience = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "audience")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let mint = state.mint.lock().unwrap().clone();
            reply(200, json!({ "count": 1, "value": token(&state, &audience, &mint) }))
        }
        _ => reply(404, json!({ "message": "Not Found" })),
    }
}
