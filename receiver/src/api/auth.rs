//! Request authentication and authorization: every `/v1` request except
//! health, target and GitHub's webhook is signed (see `nx_protocol::auth`). Each
//! signed route has a guard ([`guard`]) that checks the signature before the
//! body is read, records the nonce so the same request cannot be replayed, and
//! asks `access::decide` whether the key may perform the route's action; for a
//! route on one app it then loads the app, which the handler takes as an
//! [`AppScope`]. Bodies are checked against the signed digest as they are read:
//! by [`VerifiedJson`] for small JSON bodies, by the artifact store for uploads.
//!
//! A GitHub Actions run may sign with its OIDC token instead of a key (key id
//! `github-oidc`, the token in `Authorization: Bearer`): the token is verified
//! (`github::oidc`), the app named in the path must trust what it proves,
//! and the caller is then a [`Role::Workflow`] of that app (or, for a
//! `pull_request_target` run where the app previews forks by label, a
//! [`Role::ForkPreview`]), decided on like any other role.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use nx_protocol::api::app_of_path;
use nx_protocol::api::VerifiedGitHub;
use nx_protocol::auth::{
    is_sha256_hex, is_valid_nonce, sha256_hex, timestamp_fresh, CanonicalRequest, FooterKey, CLOCK_WINDOW_SECS,
    DIGEST_IN_FOOTER, EMPTY_SHA256, GITHUB_OIDC_KEY_ID, HEADER_CONTENT_SHA256, HEADER_KEY, HEADER_META, HEADER_NONCE,
    HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use serde::de::DeserializeOwned;

use super::access::{self, Action, Role};
use super::error::{unknown_app, ApiError};
use super::AppState;
use crate::db::AppRow;
use crate::github::oidc::Admission;

/// Largest JSON body an API call takes.
const MAX_JSON_BODY: usize = 1 << 20;

/// Who made a request, and what it signed.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub role: Role,
    /// sha256 the body must have, or [`DIGEST_IN_FOOTER`] for an upload
    /// whose digest follows its bytes (see [`Caller::upload_digest`]).
    content_sha256: String,
    /// What checks that footer's signature; only with [`DIGEST_IN_FOOTER`].
    footer_key: Option<FooterKey>,
    /// Declared body length, when the request had one.
    pub content_length: Option<u64>,
    /// Decoded `x-nx-meta`, covered by the signature.
    pub meta: Option<Vec<u8>>,
    /// What the GitHub OIDC token proved, for a [`Role::Workflow`] or a
    /// [`Role::ForkPreview`].
    pub github: Option<VerifiedGitHub>,
    /// The stored (sealed) secret of the key it signed with; empty for a
    /// workflow. Rotating the admin token replaces it, and
    /// [`Caller::still_valid`] then refuses what the old token has open.
    sealed_secret: Vec<u8>,
}

impl Caller {
    /// The actor recorded in the audit log.
    pub fn actor(&self) -> String {
        match &self.role {
            Role::Admin => "admin".to_owned(),
            Role::Deploy { app, .. } => format!("key:{}@{app}", self.key_id),
            Role::ReadOnly => format!("key:{}(read-only)", self.key_id),
            Role::Workflow { .. } | Role::ForkPreview { .. } => match &self.github {
                Some(g) if g.is_pull_request_target() => format!("github-fork:{} ({})", g.workflow_ref, g.actor),
                Some(g) => format!("github:{} ({})", g.workflow_ref, g.actor),
                None => "github".to_owned(),
            },
        }
    }

    /// Whether this caller may see that `app` exists.
    pub fn sees(&self, app: &str) -> bool {
        access::sees(&self.role, app)
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// What an upload's bytes must hash to: the signed header's digest, or
    /// the one in the body's footer, signed for this request.
    pub fn upload_digest(&self) -> nx_store::Expected<'_> {
        match &self.footer_key {
            Some(key) => nx_store::Expected::Footer(key),
            None => nx_store::Expected::Digest(&self.content_sha256),
        }
    }

    /// The body's signed length and the upload's own within it (without
    /// its footer), refused before anything else is done with the request
    /// when there is none or it is too short to end in a footer. `what`:
    /// the request, as the error names it ("a push").
    pub fn upload_lengths(&self, what: &str) -> Result<(u64, u64), ApiError> {
        let body = self.content_length.ok_or_else(|| {
            ApiError::LengthRequired(format!("{what} needs Content-Length: the size is signed and checked"))
        })?;
        let upload = body
            .checked_sub(self.upload_digest().footer_len())
            .ok_or_else(|| ApiError::BadRequest(nx_protocol::auth::FooterError::Malformed.to_string()))?;
        Ok((body, upload))
    }

    /// Refuses a caller whose key was revoked (or its app removed) since its
    /// request was let in: an upload takes long enough for that, and what it
    /// brought must then not be deployed.
    pub async fn still_valid(&self, state: &AppState) -> Result<(), ApiError> {
        // A workflow has no key to revoke: what can be withdrawn is its app's
        // trust (or the app itself).
        if let (Role::Workflow { app, .. } | Role::ForkPreview { app, .. }, Some(claims)) = (&self.role, &self.github) {
            let row = state.db.app(app).await?;
            let admitted = crate::github::oidc::trusts(app, row.as_ref().map(|r| &r.settings.0), claims);
            return match admitted {
                Ok(a) if role_of(a, 0, app).kind() == self.role.kind() => Ok(()),
                _ => Err(ApiError::Unauthorized(format!(
                    "app {app} stopped trusting this workflow, or was removed, while its upload was in progress; \
                     nothing was deployed"
                ))),
            };
        }
        match state.db.key(&self.key_id).await? {
            Some(key) if key.revoked_at.is_none() && key.secret == self.sealed_secret => Ok(()),
            _ => Err(ApiError::Unauthorized(format!(
                "key {} was revoked, or its app removed, while its upload was in progress; nothing was deployed",
                self.key_id
            ))),
        }
    }
}

/// What a signed route's guard needs: the state and the route's action.
#[derive(Debug, Clone)]
pub struct Guard {
    state: AppState,
    action: Action,
}

impl Guard {
    pub fn new(state: &AppState, action: Action) -> Guard {
        Guard { state: state.clone(), action }
    }
}

/// The middleware every signed route gets (with [`Guard`] as its state):
/// authentication, then authorization of the route's action, then, for a
/// route on one app, the app itself.
pub async fn authorize(State(g): State<Guard>, req: Request, next: Next) -> Result<Response, ApiError> {
    // The body is set aside unread: the signature is checked on the head alone.
    let (mut parts, body) = req.into_parts();
    let caller = check(&g.state, &parts).await?;
    let app = app_of_path(parts.uri.path());
    if let Err(denied) = access::decide(&caller.role, &caller.key_id, g.action, app) {
        return Err(ApiError::Denied(denied.to_string()));
    }
    if g.action.app_scoped() {
        let row = match g.state.db.app(app).await? {
            Some(row) => row,
            None => {
                let names: Vec<String> =
                    g.state.db.apps().await?.into_iter().map(|a| a.name).filter(|n| caller.sees(n)).collect();
                return Err(unknown_app(app, &names));
            }
        };
        parts.extensions.insert(row);
    }
    parts.extensions.insert(caller);
    Ok(next.run(Request::from_parts(parts, body)).await)
}

/// A request on one app that its guard let through: the caller and the app.
#[derive(Debug, Clone)]
pub struct AppScope {
    pub caller: Caller,
    pub app: AppRow,
}

impl FromRequestParts<AppState> for AppScope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &AppState) -> Result<Self, ApiError> {
        let caller = parts.extensions.get::<Caller>().cloned();
        let app = parts.extensions.get::<AppRow>().cloned();
        match (caller, app) {
            (Some(caller), Some(app)) => Ok(AppScope { caller, app }),
            // Fails closed: a handler that takes an app on a route whose
            // action is not on one app never runs.
            _ => Err(ApiError::internal(anyhow::anyhow!("AppScope used on a route without an app-scoped guard"))),
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    let value = headers.get(name).ok_or_else(|| {
        ApiError::Unauthorized(format!(
            "missing header {name}: requests must be signed; use `nx`, which signs them with NX_KEY"
        ))
    })?;
    value.to_str().map_err(|_| ApiError::Unauthorized(format!("header {name} is not valid text")))
}

async fn check(state: &AppState, req: &axum::http::request::Parts) -> Result<Caller, ApiError> {
    let h = &req.headers;
    let key_id = header(h, HEADER_KEY)?;
    let timestamp: i64 = header(h, HEADER_TIMESTAMP)?
        .parse()
        .map_err(|_| ApiError::Unauthorized(format!("header {HEADER_TIMESTAMP} must be unix seconds")))?;
    let now = chrono::Utc::now().timestamp();
    if !timestamp_fresh(timestamp, now) {
        return Err(ApiError::Unauthorized(format!(
            "header {HEADER_TIMESTAMP} is {}s away from the receiver's clock (the limit is {CLOCK_WINDOW_SECS}s); fix the clock of the client or the server",
            timestamp.saturating_sub(now)
        )));
    }
    let nonce = header(h, HEADER_NONCE)?;
    if !is_valid_nonce(nonce) {
        return Err(ApiError::Unauthorized(format!(
            "header {HEADER_NONCE} must be 16 to 64 characters of A-Z a-z 0-9 - _"
        )));
    }
    let content_sha256 = header(h, HEADER_CONTENT_SHA256)?;
    if !is_sha256_hex(content_sha256) && content_sha256 != DIGEST_IN_FOOTER {
        return Err(ApiError::Unauthorized(format!(
            "header {HEADER_CONTENT_SHA256} must be a lowercase hex sha256, or {DIGEST_IN_FOOTER:?} for an upload \
             whose digest is in its footer"
        )));
    }
    let content_length = match h.get(axum::http::header::CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Content-Length is not a number".into()))?,
        ),
        None => None,
    };
    let meta =
        match h.get(HEADER_META) {
            Some(v) => Some(v.to_str().ok().and_then(|v| B64.decode(v).ok()).ok_or_else(|| {
                ApiError::Unauthorized(format!("header {HEADER_META} is not base64url without padding"))
            })?),
            None => None,
        };
    let signature = header(h, HEADER_SIGNATURE)?;

    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let signer = match key_id {
        GITHUB_OIDC_KEY_ID => workflow(state, h, app_of_path(path)).await?,
        _ => key(state, key_id).await?,
    };
    let meta_sha = meta.as_deref().map(sha256_hex);
    let canonical = CanonicalRequest {
        method: req.method.as_str(),
        path,
        app: app_of_path(path),
        key_id,
        timestamp,
        nonce,
        content_sha256,
        content_length: content_length.unwrap_or(0),
        meta_sha256: meta_sha.as_deref().unwrap_or(EMPTY_SHA256),
    };
    if !canonical.verify(&signer.secret, signature) {
        return Err(ApiError::Unauthorized(format!(
            "the signature (header {HEADER_SIGNATURE}) does not match: the key is wrong, or the request was changed after it was signed"
        )));
    }
    if !state.db.record_nonce(nonce, key_id).await? {
        return Err(ApiError::Unauthorized(format!(
            "nonce {nonce} was already used: this request is a replay; sign every request anew"
        )));
    }
    if signer.record_use {
        if let Err(e) = state.db.touch_key(key_id).await {
            tracing::warn!(key = key_id, error = %e, "cannot record key use");
        }
    }
    let footer_key = (content_sha256 == DIGEST_IN_FOOTER).then(|| FooterKey::derive(&signer.secret, signature));
    Ok(Caller {
        key_id: key_id.to_owned(),
        role: signer.role,
        content_sha256: content_sha256.to_owned(),
        footer_key,
        content_length,
        meta,
        github: signer.github,
        sealed_secret: signer.sealed,
    })
}

/// What signed a request: the HMAC key to check the signature with, and the
/// role it gives.
struct Signer {
    secret: String,
    role: Role,
    github: Option<VerifiedGitHub>,
    /// The key's secret as stored ([`Caller`]'s `sealed_secret`).
    sealed: Vec<u8>,
    /// Whether this request's use is to be recorded: a stored key whose
    /// last use on record is older than [`KEY_USE_PRECISION`].
    record_use: bool,
}

/// How precisely a key's last use is kept (`nx keys ls`). Recording it is a
/// write and a row lock on every request, which concurrent requests of one
/// key wait on; within this time a request records nothing.
const KEY_USE_PRECISION: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Whether a key last recorded as used at `last` is to be recorded again
/// `now` (also when the clock went back).
fn use_is_news(last: Option<chrono::DateTime<chrono::Utc>>, now: chrono::DateTime<chrono::Utc>) -> bool {
    last.is_none_or(|last| now - last >= KEY_USE_PRECISION || last > now)
}

/// A stored key, unless unknown or revoked.
async fn key(state: &AppState, key_id: &str) -> Result<Signer, ApiError> {
    let key = state.db.key(key_id).await?.ok_or_else(|| {
        ApiError::Unauthorized(format!(
            "unknown key {key_id} (header {HEADER_KEY}): it never existed or its app was removed; create one with `nx keys create APP`"
        ))
    })?;
    if let Some(at) = key.revoked_at {
        return Err(ApiError::Unauthorized(format!("key {key_id} was revoked at {at}; use a current key")));
    }
    let secret = state.master.open_str(&key.secret).map_err(ApiError::internal)?;
    let role = match (key.kind.as_str(), key.app_id, key.app_name) {
        ("admin", _, _) => Role::Admin,
        ("read", _, _) => Role::ReadOnly,
        ("deploy", Some(app_id), Some(app)) => Role::Deploy { app_id, app },
        (kind, _, _) => return Err(ApiError::internal(anyhow::anyhow!("key {key_id} of kind {kind} has no role"))),
    };
    let record_use = use_is_news(key.last_used_at, chrono::Utc::now());
    Ok(Signer { secret, role, github: None, sealed: key.secret, record_use })
}

/// A GitHub Actions OIDC token (`Authorization: Bearer`), verified, for the
/// app named in the path, which must trust what it proves. Nothing is
/// written here: the app's link learns the repository's ids at the push.
async fn workflow(state: &AppState, h: &HeaderMap, app: &str) -> Result<Signer, ApiError> {
    let token = header(h, axum::http::header::AUTHORIZATION.as_str())?
        .strip_prefix("Bearer ")
        .ok_or_else(|| {
            ApiError::Unauthorized(format!(
                "a request signed as {GITHUB_OIDC_KEY_ID} carries the workflow's OIDC token as `Authorization: Bearer TOKEN`"
            ))
        })?
        .trim();
    let claims = state.oidc.verify(token).await.map_err(|e| {
        if e.is_unavailable() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Unauthorized(e.to_string())
        }
    })?;
    if app.is_empty() {
        // No app-less action is a workflow's (see access::decide); refused
        // here too, since without an app no trust can be checked.
        let denied = if claims.is_pull_request_target() {
            super::access::Denied::ForkPreview
        } else {
            super::access::Denied::Workflow
        };
        return Err(ApiError::Denied(denied.to_string()));
    }
    // An app that does not exist trusts nothing: the same answer as an app
    // without a policy, so a token cannot probe which apps exist.
    let row = state.db.app(app).await?;
    let admitted = crate::github::oidc::trusts(app, row.as_ref().map(|r| &r.settings.0), &claims)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let Some(row) = row else { return Err(ApiError::internal(anyhow::anyhow!("a trusted app {app} has no row"))) };
    Ok(Signer {
        secret: token.to_owned(),
        role: role_of(admitted, row.id, &row.name),
        github: Some(claims),
        sealed: Vec::new(),
        record_use: false,
    })
}

/// The role a token an app admitted gets.
fn role_of(admitted: Admission, app_id: i64, app: &str) -> Role {
    match admitted {
        Admission::Workflow => Role::Workflow { app_id, app: app.to_owned() },
        Admission::ForkPreview => Role::ForkPreview { app_id, app: app.to_owned() },
    }
}

/// A JSON body whose sha256 matches the signed digest.
#[derive(Debug)]
pub struct VerifiedJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for VerifiedJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("VerifiedJson used on an unauthenticated route")))?;
        if caller.footer_key.is_some() {
            return Err(ApiError::BadRequest(format!(
                "{HEADER_CONTENT_SHA256}: {DIGEST_IN_FOOTER} is for uploads (a push, a database restore); sign this \
                 request with its body's sha256"
            )));
        }
        let too_large = || ApiError::TooLarge(format!("JSON bodies are limited to {MAX_JSON_BODY} bytes"));
        // Refused on the signed length before reading, and while streaming
        // for a body longer than it said: never buffered past the limit.
        if caller.content_length.is_some_and(|n| n > MAX_JSON_BODY as u64) {
            return Err(too_large());
        }
        // A deadline for the whole body, so a trickle cannot hold the
        // connection and its handler for ever.
        let deadline = state.config.api_body_timeout;
        let reading = tokio::time::timeout(deadline, axum::body::to_bytes(req.into_body(), MAX_JSON_BODY));
        let body: Bytes = reading
            .await
            .map_err(|_| {
                ApiError::Timeout(format!(
                    "the request body did not arrive whole within {}s (--api-body-timeout)",
                    deadline.as_secs_f32()
                ))
            })?
            .map_err(|e| {
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                let limited = std::iter::from_fn(|| {
                    let current = cause?;
                    cause = current.source();
                    Some(current)
                })
                .any(|c| c.is::<http_body_util::LengthLimitError>());
                if limited {
                    too_large()
                } else {
                    ApiError::BadRequest(format!("cannot read the request body: {e}"))
                }
            })?;
        if sha256_hex(&body) != caller.content_sha256 {
            return Err(ApiError::BadRequest(format!(
                "the body does not match header {HEADER_CONTENT_SHA256}; it was changed after signing"
            )));
        }
        // The body may have taken up to the deadline: a key revoked (or a
        // trust withdrawn) meanwhile changes nothing with it.
        caller.still_valid(state).await.map_err(|e| match e {
            ApiError::Unauthorized(_) => ApiError::Unauthorized(format!(
                "key {} was revoked, its app removed or its trust withdrawn while this request's body arrived; \
                 nothing was changed",
                caller.key_id
            )),
            other => other,
        })?;
        serde_json::from_slice(&body)
            .map(VerifiedJson)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not what this call takes: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_use_is_recorded_once_a_minute_and_again_after_the_clock_goes_back() {
        let now = chrono::Utc::now();
        assert!(use_is_news(None, now), "a first use");
        assert!(!use_is_news(Some(now), now));
        assert!(!use_is_news(Some(now - chrono::TimeDelta::seconds(59)), now));
        assert!(use_is_news(Some(now - KEY_USE_PRECISION), now));
        assert!(use_is_news(Some(now + chrono::TimeDelta::seconds(5)), now), "a last use in the future");
    }
}
