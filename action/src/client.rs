//! The receiver's API as the CLI sees it: every request signed with the key,
//! every error answer turned into a [`Failure`] that carries the server's own
//! explanation.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt, StreamExt};
use nx_protocol::api::{app_of_path, ErrorBody};
use nx_protocol::auth::{
    sha256_hex, CanonicalRequest, Credential, FooterKey, DIGEST_IN_FOOTER, EMPTY_SHA256, FOOTER_LEN,
    HEADER_CONTENT_SHA256, HEADER_KEY, HEADER_META, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Target;
use crate::failure::Failure;
use crate::progress::Progress;

/// The SHA-256 of an upload's bytes, hashed on a blocking thread from the
/// moment [`digest_of`] is called; each attempt of the upload awaits a clone.
pub type PendingDigest = Shared<BoxFuture<'static, Result<String, String>>>;

/// Starts hashing `data` now.
pub fn digest_of(data: Bytes) -> PendingDigest {
    let hashing = tokio::task::spawn_blocking(move || sha256_hex(&data));
    async move { hashing.await.map_err(|e| format!("hashing the upload stopped: {e}")) }.boxed().shared()
}

/// How an upload's digest is signed.
#[derive(Debug, Clone)]
pub enum UploadDigest<'a> {
    /// Known before the upload: signed in the request's head.
    Ahead(&'a str),
    /// Still being computed while the bytes go out: sent after them in a
    /// footer signed for the request (`nx_protocol::auth::FooterKey`), to a
    /// receiver whose `/v1/target` says it takes one.
    InFooter(PendingDigest),
}

/// A signed API client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    key: Credential,
}

/// An HTTP client for requests to `base` and below.
///
/// Redirects are never followed: a signed request sent on to another host
/// could be replayed there within the clock window, and one from https to
/// http would travel in clear. A 3xx answer is reported instead. So a client
/// for an `http://` base makes no TLS connection (unless through an https
/// proxy), and it loads no root certificates: with the system's store among
/// them (the workspace's TLS features include it), that took about 5 ms,
/// which every command paid once per client.
fn http_client(base: &str) -> anyhow::Result<reqwest::Client> {
    let proxied_over_tls = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|proxy| uses_tls(&proxy)));
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .tls_built_in_root_certs(uses_tls(base) || proxied_over_tls)
        .user_agent(concat!("nx/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot set up the HTTP client: {e}"))
}

/// Whether requests to `base` go over TLS (scheme compared as URLs do,
/// without regard to case).
fn uses_tls(base: &str) -> bool {
    base.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

fn unreachable(server: &str, e: &reqwest::Error) -> Failure {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    Failure::Unreachable(format!(
        "cannot reach the receiver at {server} ({reason}); check the URL (`nx login --server URL` or NX_SERVER) and that nx-receiver runs there"
    ))
}

/// Turns an error answer into a [`Failure`] with the server's message, and
/// `hint` (how to set another credential) when it refused the credential.
async fn failure(resp: reqwest::Response, hint: &str) -> Failure {
    let status = resp.status();
    if status.is_redirection() {
        let to = resp.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("elsewhere");
        return Failure::Refused(format!(
            "the receiver answered {status}, redirecting to {to}; nx does not follow redirects with signed requests: set the server to the final URL (`nx login --server URL` or NX_SERVER)"
        ));
    }
    let text = resp.text().await.unwrap_or_default();
    let (message, credential) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error, body.credential),
        Err(_) if text.trim().is_empty() => (format!("the receiver answered {status}"), false),
        Err(_) => (format!("the receiver answered {status}: {}", text.trim()), false),
    };
    // Only a refusal of the key is mended by another key: a request over a
    // cap is refused whichever key sends it.
    if status == StatusCode::UNAUTHORIZED || credential {
        Failure::Refused(format!("{message}{hint}"))
    } else {
        Failure::Refused(message)
    }
}

/// Added to a refusal of a key.
const KEY_HINT: &str = " (set the key with `nx login --key KEY` or NX_KEY)";

/// GitHub's variables in a job with `permissions: id-token: write`: where to
/// ask for an OIDC token, and the bearer token to ask with.
const OIDC_REQUEST_URL: &str = "ACTIONS_ID_TOKEN_REQUEST_URL";
const OIDC_REQUEST_TOKEN: &str = "ACTIONS_ID_TOKEN_REQUEST_TOKEN";

/// Asks GitHub (at `url`, with the job's request `token`) for an OIDC token
/// whose audience is the receiver `server`, which accepts no other.
async fn github_oidc_token(url: &str, token: &str, server: &str) -> anyhow::Result<String> {
    let mut request = url::Url::parse(url)
        .map_err(|e| Failure::Usage(format!("{OIDC_REQUEST_URL} is not a URL ({e}); it is GitHub's to set")))?;
    request.query_pairs_mut().append_pair("audience", server);
    let origin = request.origin().ascii_serialization();
    let resp = http_client(request.as_str())?
        .get(request)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| Failure::Unreachable(format!("cannot ask {origin} for the job's OIDC token: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(Failure::Refused(format!(
            "GitHub refused the job's OIDC token ({status}: {}); the job needs `permissions: id-token: write`",
            text.trim()
        ))
        .into());
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        value: String,
    }
    let answer: Answer =
        resp.json().await.map_err(|e| Failure::Refused(format!("{origin} answered no OIDC token ({e})")))?;
    Ok(answer.value)
}

/// An unsigned GET, for the endpoints anyone may call (`/v1/health`, `/v1/target`).
pub async fn get_public<T: DeserializeOwned>(server: &str, path: &str) -> anyhow::Result<T> {
    public_get(&http_client(server)?, server, path).await
}

async fn public_get<T: DeserializeOwned>(http: &reqwest::Client, server: &str, path: &str) -> anyhow::Result<T> {
    let url = format!("{server}{path}");
    let resp = http.get(&url).send().await.map_err(|e| unreachable(server, &e))?;
    if !resp.status().is_success() {
        return Err(failure(resp, KEY_HINT).await.into());
    }
    resp.json().await.map_err(|e| Failure::Refused(format!("{url} did not answer with what nx expects: {e}")).into())
}

impl Client {
    pub fn new(target: &Target) -> anyhow::Result<Client> {
        let key = target.key.clone().ok_or_else(|| {
            Failure::Usage(
                "no key configured: pass --key, set NX_KEY, or run `nx login --key KEY` (an app's deploy key is printed by `nx apps create`; the admin token at the receiver's first start)"
                    .into(),
            )
        })?;
        Ok(Client { http: http_client(&target.server)?, server: target.server.clone(), key })
    }

    /// A client for a push: with the configured key, else, in a GitHub
    /// Actions job allowed to (`permissions: id-token: write`), with the
    /// job's OIDC token for this server, which the receiver accepts for the
    /// app that trusts the job's repository.
    pub async fn for_push(target: &Target) -> anyhow::Result<Client> {
        if target.key.is_some() {
            return Client::new(target);
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(url), Some(token)) = (env(OIDC_REQUEST_URL), env(OIDC_REQUEST_TOKEN)) else {
            return Err(Failure::Usage(
                "no key to push with: set NX_KEY or grant `permissions: id-token: write` to the workflow, whose \
                 repository the admin trusts with `nx apps set APP --github-trust owner/repo`"
                    .into(),
            )
            .into());
        };
        let jwt = github_oidc_token(&url, &token, &target.server).await?;
        Ok(Client {
            http: http_client(&target.server)?,
            server: target.server.clone(),
            key: Credential::github_oidc(&jwt),
        })
    }

    /// What to add to a refusal of this client's credential.
    fn hint(&self) -> &'static str {
        match self.key.bearer() {
            Some(_) => " (the workflow's GitHub OIDC token was used, as no NX_KEY is set)",
            None => KEY_HINT,
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// [`get_public`] on this client's connections.
    pub async fn get_public<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        public_get(&self.http, &self.server, path).await
    }

    fn signed_headers(&self, method: &Method, path: &str, body_sha: &str, len: u64, meta: Option<&[u8]>) -> HeaderMap {
        let timestamp = chrono::Utc::now().timestamp();
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let meta_sha = meta.map(sha256_hex);
        let canonical = CanonicalRequest {
            method: method.as_str(),
            path,
            app: app_of_path(path),
            key_id: self.key.key_id(),
            timestamp,
            nonce: &nonce,
            content_sha256: body_sha,
            content_length: len,
            meta_sha256: meta_sha.as_deref().unwrap_or(EMPTY_SHA256),
        };
        let signature = canonical.sign(self.key.expose_secret());
        let mut h = HeaderMap::new();
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        put(HEADER_KEY, self.key.key_id().to_owned());
        put(HEADER_TIMESTAMP, timestamp.to_string());
        put(HEADER_NONCE, nonce);
        put(HEADER_CONTENT_SHA256, body_sha.to_owned());
        put(HEADER_SIGNATURE, signature);
        if let Some(m) = meta {
            put(HEADER_META, B64.encode(m));
        }
        if let Some(token) = self.key.bearer() {
            if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                v.set_sensitive(true);
                h.insert(AUTHORIZATION, v);
            }
        }
        h
    }

    async fn send<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<T> {
        let body = body.unwrap_or_default();
        let sha = if body.is_empty() { EMPTY_SHA256.to_owned() } else { sha256_hex(&body) };
        let mut headers = self.signed_headers(&method, path, &sha, body.len() as u64, None);
        let mut req = self.http.request(method, format!("{}{path}", self.server));
        if !body.is_empty() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            req = req.body(body);
        }
        let resp = req.headers(headers).send().await.map_err(|e| unreachable(&self.server, &e))?;
        decode(resp, self.hint()).await
    }

    /// A signed GET whose body the caller reads as it arrives (logs).
    pub async fn get_stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let headers = self.signed_headers(&Method::GET, path, EMPTY_SHA256, 0, None);
        let resp = self
            .http
            .get(format!("{}{path}", self.server))
            .headers(headers)
            .send()
            .await
            .map_err(|e| unreachable(&self.server, &e))?;
        if !resp.status().is_success() {
            return Err(failure(resp, self.hint()).await.into());
        }
        Ok(resp)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(Method::POST, path, Some(serde_json::to_vec(body)?)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(Method::DELETE, path, None).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(Method::PUT, path, Some(serde_json::to_vec(body)?)).await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(Method::PATCH, path, Some(serde_json::to_vec(body)?)).await
    }

    /// Like [`Client::upload`] without metadata, for answers without a body.
    pub async fn upload_empty_answer<T: DeserializeOwned>(
        &self,
        api_path: &str,
        data: Bytes,
        sha256: &str,
        progress: Progress,
    ) -> anyhow::Result<T> {
        self.upload_with(api_path, data, UploadDigest::Ahead(sha256), None, progress).await
    }

    /// Sends `data` as the body of a signed POST, reporting progress.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        api_path: &str,
        data: Bytes,
        digest: UploadDigest<'_>,
        meta: &[u8],
        progress: Progress,
    ) -> anyhow::Result<T> {
        self.upload_with(api_path, data, digest, Some(meta), progress).await
    }

    /// The body is the bytes that were hashed, held in memory, rather than
    /// the file read again: no second read, and nothing a change to the file
    /// meanwhile could make differ from what was signed.
    async fn upload_with<T: DeserializeOwned>(
        &self,
        api_path: &str,
        data: Bytes,
        digest: UploadDigest<'_>,
        meta: Option<&[u8]>,
        progress: Progress,
    ) -> anyhow::Result<T> {
        let size = data.len() as u64;
        let (signed_digest, body_len) = match &digest {
            UploadDigest::Ahead(sha256) => (*sha256, size),
            UploadDigest::InFooter(_) => (DIGEST_IN_FOOTER, size + FOOTER_LEN),
        };
        let mut headers = self.signed_headers(&Method::POST, api_path, signed_digest, body_len, meta);
        // The footer's key is bound to this request's signature: a footer
        // vouches for the body of its own request only.
        let footer = match digest {
            UploadDigest::Ahead(_) => None,
            UploadDigest::InFooter(pending) => {
                let signature = headers.get(HEADER_SIGNATURE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let key = FooterKey::derive(self.key.expose_secret(), signature);
                Some(async move { pending.await.map(|sha256| Bytes::from(key.footer(&sha256))) })
            }
        };
        let pieces =
            (0..data.len()).step_by(UPLOAD_PIECE).map(move |at| data.slice(at..data.len().min(at + UPLOAD_PIECE)));
        let stream = futures_util::stream::iter(pieces)
            .map(move |piece| {
                progress.advance(piece.len() as u64);
                if progress.position() >= size {
                    progress.finish_upload();
                }
                Ok::<_, std::io::Error>(piece)
            })
            .chain(futures_util::stream::iter(footer).then(|footer| async move {
                // A failed hash ends the body short, which the receiver refuses.
                footer.await.map_err(std::io::Error::other)
            }));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let resp = self
            .http
            .post(format!("{}{api_path}", self.server))
            .headers(headers)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| unreachable(&self.server, &e))?;
        decode(resp, self.hint()).await
    }
}

/// The size of the pieces an upload is sent in, each one a progress step.
const UPLOAD_PIECE: usize = 256 << 10;

async fn decode<T: DeserializeOwned>(resp: reqwest::Response, hint: &str) -> anyhow::Result<T> {
    if !resp.status().is_success() {
        return Err(failure(resp, hint).await.into());
    }
    if resp.status() == StatusCode::NO_CONTENT {
        return serde_json::from_value(serde_json::Value::Null).map_err(|e| Failure::Refused(e.to_string()).into());
    }
    let url = resp.url().to_string();
    resp.json().await.map_err(|e| Failure::Refused(format!("{url} did not answer with what nx expects: {e}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_servers_load_root_certificates() {
        assert!(uses_tls("https://nx.example.com"));
        assert!(uses_tls("HTTPS://nx.example.com:8443"));
        assert!(!uses_tls("http://127.0.0.1:8070"));
        assert!(!uses_tls("http://"));
        assert!(!uses_tls(""));
    }
}
