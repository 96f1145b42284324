//! GitHub Actions OIDC tokens: a workflow with `permissions: id-token: write`
//! pushes with a short-lived token GitHub signs instead of a deploy key kept
//! in the repository's secrets.
//!
//! [`Verifier::verify`] proves a token came from the configured issuer for
//! this receiver: RS256 only, the key named by `kid` taken from the issuer's
//! JWKS (fetched from `/.well-known/openid-configuration`, cached, fetched
//! again for an unknown key at most once per `--github-oidc-refresh`), then
//! `iss`, `aud`, `exp`, `nbf` and `iat` with [`SKEW_SECS`] of tolerance.
//! [`trusts`] then says whether the app the request names trusts what the
//! token proves: the repository (by id once known, and its owner's id), the
//! ref, the workflow and the event; a `pull_request_target` run's token only
//! where the app previews forks' pull requests by label, and then only as a
//! [`Admission::ForkPreview`]. Every refusal says exactly what was wrong.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use nx_protocol::api::{AppSettings, ForkPreviews, VerifiedGitHub};
use serde::Deserialize;

/// Tolerance on `exp`, `nbf` and `iat` for clocks that disagree a little.
pub const SKEW_SECS: i64 = 60;

/// Why a token was refused; the text is the 401 answer.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the GitHub OIDC token is not a JWT ({0}); send the token GitHub's ACTIONS_ID_TOKEN_REQUEST_URL returns")]
    Malformed(String),
    #[error("the GitHub OIDC token is signed with {alg:?}; only RS256 tokens are accepted")]
    Algorithm { alg: String },
    #[error("the GitHub OIDC token names no signing key (kid)")]
    NoKeyId,
    #[error("the GitHub OIDC token is signed with key {kid:?}, which {issuer} does not publish")]
    UnknownKey { kid: String, issuer: String },
    #[error("cannot fetch the signing keys of {issuer}: {reason}")]
    Keys { issuer: String, reason: String },
    #[error("the GitHub OIDC token's signature does not verify with key {kid:?} of {issuer}")]
    Signature { kid: String, issuer: String },
    #[error("the GitHub OIDC token was issued by {got:?}, not by {expected} (the receiver's --github-oidc-issuer)")]
    Issuer { got: String, expected: String },
    #[error(
        "the GitHub OIDC token is for audience {got:?}, not for this receiver ({expected}); the action asks for \
         its server URL as audience: set NX_SERVER to {expected}, or the receiver's --github-oidc-audience"
    )]
    Audience { got: String, expected: String },
    #[error("the GitHub OIDC token expired at {exp} (unix time; now {now}); request a new one")]
    Expired { exp: i64, now: i64 },
    #[error("the GitHub OIDC token is not valid before {nbf} (unix time; now {now}); check the clocks")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("the GitHub OIDC token was issued in the future ({iat}, unix time; now {now}); check the clocks")]
    IssuedLater { iat: i64, now: i64 },
    #[error("the GitHub OIDC token lacks the claim {0}, or it is not what GitHub sends")]
    Claim(&'static str),
}

impl OidcError {
    /// Whether the receiver, not the token, is at fault (the issuer is out of reach).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, OidcError::Keys { .. })
    }
}

/// Why an app does not take a verified token; the text is the 401 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error(
        "app {app} trusts no GitHub workflow, so it takes no OIDC token; the admin allows one with \
         `nx apps set {app} --github-trust owner/repo[:workflow][@ref]`, or push with the app's deploy key (NX_KEY)"
    )]
    NoPolicy { app: String },
    #[error("the repository {repository} (id {id}) is not trusted for app {app}: it trusts {trusted}")]
    Repository { app: String, repository: String, id: u64, trusted: String },
    #[error(
        "the repository {repository} now belongs to another owner (id {owner}, trusted {trusted}); the admin trusts \
         it again with `nx apps set {app} --github-trust {repository}`"
    )]
    Owner { app: String, repository: String, owner: u64, trusted: u64 },
    #[error("the ref {git_ref} is not trusted for app {app}: it trusts {pattern}")]
    Ref { app: String, git_ref: String, pattern: String },
    #[error("the workflow {workflow} is not trusted for app {app}: it trusts {trusted}")]
    Workflow { app: String, workflow: String, trusted: String },
    #[error(
        "tokens of pull_request_target runs are never trusted as workflows: they run with the base repository's \
         rights on code a pull request may have written; deploy from push, pull_request or workflow_dispatch runs, \
         or let the app preview forks' pull requests a maintainer labels (`[preview] forks = \"label\"`)"
    )]
    PullRequestTarget,
}

/// The claims of a GitHub Actions token this receiver reads. GitHub sends
/// numeric ids as strings.
#[derive(Debug, Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    repository: Option<String>,
    repository_id: Option<String>,
    repository_owner_id: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    sha: Option<String>,
    workflow_ref: Option<String>,
    event_name: Option<String>,
    actor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The issuer's keys as last fetched.
#[derive(Debug)]
struct Keys {
    set: JwkSet,
    fetched: Option<Instant>,
}

/// Verifies tokens of one issuer for one audience.
#[derive(Debug)]
pub struct Verifier {
    issuer: String,
    audience: String,
    refresh: Duration,
    http: reqwest::Client,
    /// A fetch holds the lock, so concurrent requests with a new key wait for
    /// one fetch instead of each making their own.
    keys: tokio::sync::Mutex<Keys>,
}

impl Verifier {
    pub fn new(issuer: &str, audience: &str, refresh: Duration) -> Verifier {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("nx-receiver/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Verifier {
            issuer: issuer.trim_end_matches('/').to_owned(),
            audience: audience.to_owned(),
            refresh,
            http,
            keys: tokio::sync::Mutex::new(Keys { set: JwkSet { keys: Vec::new() }, fetched: None }),
        }
    }

    /// Verifies `token` and returns what it proves.
    pub async fn verify(&self, token: &str) -> Result<VerifiedGitHub, OidcError> {
        let (alg, kid) = header(token)?;
        if alg != "RS256" {
            return Err(OidcError::Algorithm { alg });
        }
        let kid = kid.ok_or(OidcError::NoKeyId)?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        // The signature alone is jsonwebtoken's to check; the claims are
        // checked below, so each refusal can say what was wrong.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    OidcError::Signature { kid: kid.clone(), issuer: self.issuer.clone() }
                }
                _ => OidcError::Malformed(e.to_string()),
            })?
            .claims;
        self.check_claims(claims, chrono::Utc::now().timestamp())
    }

    fn check_claims(&self, c: Claims, now: i64) -> Result<VerifiedGitHub, OidcError> {
        let iss = c.iss.ok_or(OidcError::Claim("iss"))?;
        if iss.trim_end_matches('/') != self.issuer {
            return Err(OidcError::Issuer { got: iss, expected: self.issuer.clone() });
        }
        let aud = match c.aud.ok_or(OidcError::Claim("aud"))? {
            Audience::One(a) => vec![a],
            Audience::Many(a) => a,
        };
        if !aud.iter().any(|a| a.trim_end_matches('/') == self.audience) {
            return Err(OidcError::Audience { got: aud.join(", "), expected: self.audience.clone() });
        }
        let exp = c.exp.ok_or(OidcError::Claim("exp"))?;
        if now > exp.saturating_add(SKEW_SECS) {
            return Err(OidcError::Expired { exp, now });
        }
        if let Some(nbf) = c.nbf {
            if nbf > now.saturating_add(SKEW_SECS) {
                return Err(OidcError::NotYetValid { nbf, now });
            }
        }
        let iat = c.iat.ok_or(OidcError::Claim("iat"))?;
        if iat > now.saturating_add(SKEW_SECS) {
            return Err(OidcError::IssuedLater { iat, now });
        }
        let id = |v: Option<String>, name| v.and_then(|v| v.parse::<u64>().ok()).ok_or(OidcError::Claim(name));
        let sha = c.sha.ok_or(OidcError::Claim("sha"))?;
        if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(OidcError::Claim("sha"));
        }
        Ok(VerifiedGitHub {
            repository: c
                .repository
                .filter(|r| nx_protocol::api::is_repository_name(r))
                .ok_or(OidcError::Claim("repository"))?,
            repository_id: id(c.repository_id, "repository_id")?,
            repository_owner_id: id(c.repository_owner_id, "repository_owner_id")?,
            git_ref: c.git_ref.filter(|r| r.starts_with("refs/")).ok_or(OidcError::Claim("ref"))?,
            sha,
            workflow_ref: c.workflow_ref.ok_or(OidcError::Claim("workflow_ref"))?,
            event_name: c.event_name.ok_or(OidcError::Claim("event_name"))?,
            actor: c.actor.ok_or(OidcError::Claim("actor"))?,
        })
    }

    /// The issuer's key `kid`: from the cache, else from a new fetch unless
    /// the last one is more recent than the refresh interval.
    async fn key(&self, kid: &str) -> Result<DecodingKey, OidcError> {
        let mut keys = self.keys.lock().await;
        if keys.set.find(kid).is_none() && keys.fetched.is_none_or(|at| at.elapsed() >= self.refresh) {
            let fetched = self.fetch().await;
            // A failed fetch counts too: an issuer that is down is not asked
            // again for every request.
            keys.fetched = Some(Instant::now());
            keys.set = fetched?;
        }
        let jwk = keys
            .set
            .find(kid)
            .ok_or_else(|| OidcError::UnknownKey { kid: kid.to_owned(), issuer: self.issuer.clone() })?;
        DecodingKey::from_jwk(jwk).map_err(|e| OidcError::Keys {
            issuer: self.issuer.clone(),
            reason: format!("its key {kid:?} is not an RSA key this receiver can use: {e}"),
        })
    }

    async fn fetch(&self) -> Result<JwkSet, OidcError> {
        let failed = |reason: String| OidcError::Keys { issuer: self.issuer.clone(), reason };
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let discovery = format!("{}/.well-known/openid-configuration", self.issuer);
        let jwks_uri = match self.get::<Discovery>(&discovery).await {
            Ok(d) => d.jwks_uri,
            // Issuers without discovery publish their keys at the usual place.
            Err(_) => format!("{}/.well-known/jwks", self.issuer),
        };
        let set: JwkSet = self.get(&jwks_uri).await.map_err(failed)?;
        tracing::info!(issuer = %self.issuer, keys = set.keys.len(), "fetched the OIDC issuer's signing keys");
        Ok(set)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let resp = self.http.get(url).send().await.map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url} answered {}", resp.status()));
        }
        resp.json().await.map_err(|e| format!("{url}: {e}"))
    }
}

/// The `alg` and `kid` of a token's header, read by hand: jsonwebtoken
/// cannot even parse `"alg": "none"`, which deserves its own answer.
fn header(token: &str) -> Result<(String, Option<String>), OidcError> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
        kid: Option<String>,
    }
    let first = token.split('.').next().unwrap_or_default();
    let bytes = B64.decode(first.trim_end_matches('=')).map_err(|e| OidcError::Malformed(format!("header: {e}")))?;
    let h: Header = serde_json::from_slice(&bytes).map_err(|e| OidcError::Malformed(format!("header: {e}")))?;
    Ok((h.alg, h.kid))
}

/// What a token an app takes may do there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A run of a trusted workflow: a push of the action (`Role::Workflow`).
    Workflow,
    /// A `pull_request_target` run of a trusted workflow, for an app whose
    /// forks' pull requests may be previewed by label: a preview of a labeled
    /// commit and nothing else (`Role::ForkPreview`).
    ForkPreview,
}

/// Whether the app `app`, with `settings` (`None`: no such app), takes a
/// push proved by `claims`, and as what.
pub fn trusts(app: &str, settings: Option<&AppSettings>, claims: &VerifiedGitHub) -> Result<Admission, Untrusted> {
    let link = settings.and_then(|s| s.github.as_ref());
    let (Some(link), Some(trust)) = (link, link.and_then(|l| l.trust.as_ref())) else {
        return Err(Untrusted::NoPolicy { app: app.to_owned() });
    };
    let same_repository = match link.id {
        // Once known, the id is what counts: a rename keeps it, a repository
        // created anew under the old name does not have it.
        Some(id) => id == claims.repository_id,
        None => link.repository.eq_ignore_ascii_case(&claims.repository),
    };
    if !same_repository {
        let trusted = match link.id {
            Some(id) => format!("{} (id {id})", link.repository),
            None => link.repository.clone(),
        };
        return Err(Untrusted::Repository {
            app: app.to_owned(),
            repository: claims.repository.clone(),
            id: claims.repository_id,
            trusted,
        });
    }
    if let Some(owner) = link.owner_id.filter(|o| *o != claims.repository_owner_id) {
        return Err(Untrusted::Owner {
            app: app.to_owned(),
            repository: claims.repository.clone(),
            owner: claims.repository_owner_id,
            trusted: owner,
        });
    }
    // Such a run may execute a fork's code with the repository's rights, and
    // any of its steps can ask for a token: only a preview of the commit a
    // maintainer labeled, and only where the app asks for those.
    let admission = match settings.map(|s| s.preview_forks) {
        _ if !claims.is_pull_request_target() => Admission::Workflow,
        Some(ForkPreviews::Label) => Admission::ForkPreview,
        _ => return Err(Untrusted::PullRequestTarget),
    };
    if !trust.ref_matches(&claims.git_ref) {
        return Err(Untrusted::Ref {
            app: app.to_owned(),
            git_ref: claims.git_ref.clone(),
            pattern: trust.ref_pattern.clone().unwrap_or_default(),
        });
    }
    if let Some(trusted) = &trust.workflow {
        let workflow = workflow_path(&claims.workflow_ref, &claims.repository);
        if workflow != Some(trusted.as_str()) {
            return Err(Untrusted::Workflow {
                app: app.to_owned(),
                workflow: claims.workflow_ref.clone(),
                trusted: trusted.clone(),
            });
        }
    }
    Ok(admission)
}

/// `.github/workflows/deploy.yml` of `owner/repo/.github/workflows/deploy.yml@refs/heads/main`,
/// when the workflow is the repository's own (not one of another repository
/// called as a reusable workflow).
fn workflow_path<'a>(workflow_ref: &'a str, repository: &str) -> Option<&'a str> {
    let (path, _) = workflow_ref.rsplit_once('@')?;
    let (repo, file) = path.split_at_checked(repository.len())?;
    repo.eq_ignore_ascii_case(repository).then_some(file.strip_prefix('/')?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nx_protocol::api::{GitHubLink, WorkflowTrust};

    fn claims() -> VerifiedGitHub {
        VerifiedGitHub {
            repository: "acme/web".into(),
            repository_id: 42,
            repository_owner_id: 7,
            git_ref: "refs/heads/main".into(),
            sha: "a".repeat(40),
            workflow_ref: "acme/web/.github/workflows/deploy.yml@refs/heads/main".into(),
            event_name: "push".into(),
            actor: "octocat".into(),
        }
    }

    fn link(id: Option<u64>, trust: WorkflowTrust) -> AppSettings {
        let github = GitHubLink { repository: "acme/web".into(), id, owner_id: id.map(|_| 7), trust: Some(trust) };
        AppSettings { github: Some(github), ..AppSettings::default() }
    }

    #[test]
    fn a_link_without_trust_takes_no_token() {
        let plain = AppSettings {
            github: Some(GitHubLink { repository: "acme/web".into(), id: Some(42), owner_id: None, trust: None }),
            ..AppSettings::default()
        };
        for l in [None, Some(&AppSettings::default()), Some(&plain)] {
            assert_eq!(trusts("web", l, &claims()), Err(Untrusted::NoPolicy { app: "web".into() }));
        }
    }

    #[test]
    fn the_repository_is_its_id_once_known_and_its_name_before() {
        let trust = WorkflowTrust::default();
        assert_eq!(trusts("web", Some(&link(None, trust.clone())), &claims()), Ok(Admission::Workflow));
        let renamed = VerifiedGitHub { repository: "acme/site".into(), ..claims() };
        assert_eq!(trusts("web", Some(&link(Some(42), trust.clone())), &renamed), Ok(Admission::Workflow));
        let impostor = VerifiedGitHub { repository_id: 43, ..claims() };
        assert_eq!(
            trusts("web", Some(&link(Some(42), trust.clone())), &impostor),
            Err(Untrusted::Repository {
                app: "web".into(),
                repository: "acme/web".into(),
                id: 43,
                trusted: "acme/web (id 42)".into()
            })
        );
        let moved = VerifiedGitHub { repository_owner_id: 8, ..claims() };
        assert!(matches!(trusts("web", Some(&link(Some(42), trust)), &moved), Err(Untrusted::Owner { .. })));
    }

    #[test]
    fn refs_workflows_and_events_are_checked() {
        let trust = WorkflowTrust {
            workflow: Some(".github/workflows/deploy.yml".into()),
            ref_pattern: Some("refs/heads/*".into()),
        };
        let l = link(Some(42), trust);
        assert_eq!(trusts("web", Some(&l), &claims()), Ok(Admission::Workflow));
        let tag = VerifiedGitHub { git_ref: "refs/tags/v1".into(), ..claims() };
        assert!(matches!(trusts("web", Some(&l), &tag), Err(Untrusted::Ref { .. })));
        let other =
            VerifiedGitHub { workflow_ref: "acme/web/.github/workflows/ci.yml@refs/heads/main".into(), ..claims() };
        assert!(matches!(trusts("web", Some(&l), &other), Err(Untrusted::Workflow { .. })));
        let reusable =
            VerifiedGitHub { workflow_ref: "evil/x/.github/workflows/deploy.yml@refs/heads/main".into(), ..claims() };
        assert!(matches!(trusts("web", Some(&l), &reusable), Err(Untrusted::Workflow { .. })));
        let target = VerifiedGitHub { event_name: "pull_request_target".into(), ..claims() };
        assert_eq!(trusts("web", Some(&l), &target), Err(Untrusted::PullRequestTarget));
    }

    #[test]
    fn pull_request_target_runs_only_preview_forks_where_the_app_asks_for_it() {
        let trust = WorkflowTrust { workflow: Some(".github/workflows/deploy.yml".into()), ref_pattern: None };
        let labeled = AppSettings { preview_forks: ForkPreviews::Label, ..link(Some(42), trust) };
        let target = VerifiedGitHub { event_name: "pull_request_target".into(), ..claims() };
        assert_eq!(trusts("web", Some(&labeled), &target), Ok(Admission::ForkPreview));
        assert_eq!(trusts("web", Some(&labeled), &claims()), Ok(Admission::Workflow), "other events as before");
        // The rest of the trust still holds for it.
        let other = VerifiedGitHub {
            workflow_ref: "acme/web/.github/workflows/labeler.yml@refs/heads/main".into(),
            ..target.clone()
        };
        assert!(matches!(trusts("web", Some(&labeled), &other), Err(Untrusted::Workflow { .. })));
        let impostor = VerifiedGitHub { repository_id: 43, ..target };
        assert!(matches!(trusts("web", Some(&labeled), &impostor), Err(Untrusted::Repository { .. })));
    }

    #[test]
    fn claims_are_checked_with_a_minute_of_skew() {
        let v = Verifier::new("https://issuer.test/", "https://nx.test", Duration::from_secs(60));
        let raw = |exp: i64, nbf: i64, iat: i64, aud: &str, iss: &str| -> Claims {
            serde_json::from_value(serde_json::json!({
                "iss": iss, "aud": aud, "exp": exp, "nbf": nbf, "iat": iat,
                "repository": "acme/web", "repository_id": "42", "repository_owner_id": "7",
                "ref": "refs/heads/main", "sha": "a".repeat(40),
                "workflow_ref": "acme/web/.github/workflows/deploy.yml@refs/heads/main",
                "event_name": "push", "actor": "octocat"
            }))
            .unwrap()
        };
        let (iss, aud, now) = ("https://issuer.test", "https://nx.test", 1_000_000);
        assert_eq!(v.check_claims(raw(now - 59, now, now, aud, iss), now).unwrap(), claims());
        assert!(matches!(v.check_claims(raw(now - 61, now, now, aud, iss), now), Err(OidcError::Expired { .. })));
        assert!(matches!(
            v.check_claims(raw(now + 300, now + 61, now, aud, iss), now),
            Err(OidcError::NotYetValid { .. })
        ));
        assert!(matches!(
            v.check_claims(raw(now + 300, now, now + 61, aud, iss), now),
            Err(OidcError::IssuedLater { .. })
        ));
        assert!(matches!(
            v.check_claims(raw(now + 300, now, now, "https://other", iss), now),
            Err(OidcError::Audience { .. })
        ));
        assert!(matches!(
            v.check_claims(raw(now + 300, now, now, aud, "https://evil.test"), now),
            Err(OidcError::Issuer { .. })
        ));
    }

    #[test]
    fn alg_none_is_named_as_such() {
        let token = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode("{}"));
        assert_eq!(header(&token).unwrap(), ("none".to_owned(), None));
    }
}
