//! Calls to GitHub's REST API through octocrab, as a token or as a GitHub App
//! (a JWT for the app, installation tokens for the repositories), each retried
//! with backoff when GitHub or the network fails.

use std::collections::HashMap;
use std::time::Duration;

use octocrab::models::{AppId, InstallationId};
use octocrab::service::middleware::retry::RetryConfig;
use octocrab::Octocrab;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::config::ServeConfig;
use crate::db::Db;

/// Attempts of one call before it is given up, and the first pause between
/// two; the pause doubles each time (0.5 s, 1 s, 2 s, 4 s, 8 s).
const ATTEMPTS: u32 = 6;
const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// Why a call to GitHub failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("GitHub answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("GitHub could not be reached: {0}")]
    Unreachable(String),
    #[error("no installation of the GitHub App covers {repository}: install the app on it")]
    NotInstalled { repository: String },
}

impl CallError {
    fn from_octocrab(e: octocrab::Error) -> CallError {
        match e {
            octocrab::Error::GitHub { source, .. } => {
                CallError::Refused { status: source.status_code.as_u16(), message: source.message }
            }
            other => CallError::Unreachable(other.to_string()),
        }
    }

    /// Whether trying again may help: GitHub's own failures, rate limits and
    /// the network, not a refusal of the request itself.
    fn is_transient(&self) -> bool {
        match self {
            CallError::Refused { status, message } => {
                *status >= 500 || *status == 429 || (*status == 403 && message.to_lowercase().contains("rate limit"))
            }
            CallError::Unreachable(_) => true,
            CallError::NotInstalled { .. } => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            CallError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The HTTP methods the integration uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Patch,
}

/// A GitHub API client for the repositories apps are linked to.
#[derive(Debug)]
pub struct Client {
    /// Authenticated with the token, or as the app (JWT).
    base: Octocrab,
    is_app: bool,
    db: Db,
    /// Installation clients by repository owner.
    installations: Mutex<HashMap<String, Octocrab>>,
}

impl Client {
    /// The client the configuration asks for, if any.
    pub fn from_config(config: &ServeConfig, db: Db) -> anyhow::Result<Option<Client>> {
        use anyhow::Context as _;
        let builder = || -> anyhow::Result<_> {
            Ok(Octocrab::builder()
                .base_uri(config.github_api.as_str())
                .with_context(|| format!("--github-api {} is not a URL", config.github_api))?
                // Retries are ours, with backoff.
                .add_retry_config(RetryConfig::None))
        };
        let (base, is_app) = match (&config.github_token, config.github_app_id, &config.github_app_key) {
            (Some(token), _, _) => (builder()?.personal_token(token.expose().clone()).build()?, false),
            (None, Some(id), Some(key_file)) => {
                let pem = std::fs::read(key_file)
                    .with_context(|| format!("cannot read the GitHub App key {}", key_file.display()))?;
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem)
                    .with_context(|| format!("{} is not an RSA private key in PEM", key_file.display()))?;
                (builder()?.app(AppId(id), key).build()?, true)
            }
            _ => return Ok(None),
        };
        Ok(Some(Client { base, is_app, db, installations: Mutex::new(HashMap::new()) }))
    }

    /// The client that may act on `repository` (`owner/name`).
    async fn for_repository(&self, repository: &str) -> Result<Octocrab, CallError> {
        if !self.is_app {
            return Ok(self.base.clone());
        }
        let owner = repository.split('/').next().unwrap_or_default().to_lowercase();
        if let Some(c) = self.installations.lock().await.get(&owner) {
            return Ok(c.clone());
        }
        let known = self.db.github_installation(&owner).await.map_err(|e| CallError::Unreachable(e.to_string()))?;
        let id = match known {
            Some(id) => id,
            None => {
                let found: Value = self
                    .base
                    .get(format!("/repos/{repository}/installation"), None::<&()>)
                    .await
                    .map_err(CallError::from_octocrab)
                    .map_err(|e| match e.status() {
                        Some(404) => CallError::NotInstalled { repository: repository.to_owned() },
                        _ => e,
                    })?;
                let id = found["id"]
                    .as_i64()
                    .ok_or_else(|| CallError::NotInstalled { repository: repository.to_owned() })?;
                let _ = self.db.add_github_installation(id, &owner).await;
                id
            }
        };
        let client = self.base.installation(InstallationId(id as u64)).map_err(CallError::from_octocrab)?;
        self.installations.lock().await.insert(owner, client.clone());
        Ok(client)
    }

    /// Forgets the installation client of `owner` (the app was uninstalled).
    pub async fn forget_installation(&self, owner: &str) {
        self.installations.lock().await.remove(&owner.to_lowercase());
    }

    /// The numeric ids of `repository` (`owner/name`) and of its owner, and
    /// its name as GitHub writes it (`GET /repos/{owner}/{name}`): what the
    /// admin's link by name is identified by. `None` when GitHub does not show
    /// the repository to the receiver or cannot be asked (logged).
    pub async fn repository_ids(&self, repository: &str) -> Option<(u64, u64, String)> {
        match self.call(repository, Method::Get, &format!("/repos/{repository}"), None).await {
            Ok(v) => Some((v["id"].as_u64()?, v["owner"]["id"].as_u64()?, v["full_name"].as_str()?.to_owned())),
            Err(e) => {
                tracing::warn!(repository, error = %e, "cannot ask GitHub for the repository's id; linked by name");
                None
            }
        }
    }

    /// One API call on behalf of `repository`, retried with backoff while
    /// the failure is transient.
    pub async fn call(
        &self,
        repository: &str,
        method: Method,
        route: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let mut pause = FIRST_PAUSE;
        let mut attempt = 1;
        loop {
            let result = async {
                let crab = self.for_repository(repository).await?;
                let answer = match method {
                    Method::Get => crab.get::<Value, _, ()>(route, None).await,
                    Method::Post => crab.post::<_, Value>(route, body).await,
                    Method::Patch => crab.patch::<Value, _, _>(route, body).await,
                };
                answer.map_err(CallError::from_octocrab)
            }
            .await;
            match result {
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tracing::info!(route, attempt, error = %e, pause_ms = pause.as_millis() as u64, "GitHub call failed; trying again");
                    crate::counters::platform().github_retries.inc();
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
