//! Certificates from an ACME CA (RFC 8555): for verified custom domains by
//! HTTP-01 (the router answers the CA's challenge), and wildcards of the
//! platform's own domains (`--wildcard-domain`) by DNS-01 through a
//! [`DnsProvider`]. Each certificate and its key are stored sealed with the
//! master key and sent to the router with the route table. A certificate is
//! renewed `--acme-renew-before` its expiry; a failed attempt is retried
//! after `--acme-retry`, doubling up to a day, with the error kept for
//! `nx domains ls` (custom domains) and `nx status` (wildcards). What is due
//! is looked for every `--acme-interval` and whenever a domain is verified.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use tokio::sync::{watch, Notify};

use super::dns::{DnsError, DnsProvider, TxtRecord};
use crate::config::ServeConfig;
use crate::db::Db;
use crate::routing::RoutePublisher;
use crate::secrets::MasterKey;

/// The longest wait between two failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// How long the CA has to validate a challenge, and to issue once finalized.
const POLL: RetryPolicy = RetryPolicy::new().initial_delay(Duration::from_millis(250)).timeout(Duration::from_secs(90));

/// Why a certificate was not obtained; the text is what `nx domains ls` shows.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the ACME CA at {directory}: {source}")]
    Ca { directory: String, source: instant_acme::Error },
    #[error("the ACME CA refused the {kind} validation of {domain}: {detail}")]
    Invalid { kind: &'static str, domain: String, detail: String },
    #[error("the ACME CA offers no {kind} challenge for {domain}")]
    NoChallenge { kind: &'static str, domain: String },
    #[error("the DNS-01 challenge record of {domain} was not set: {source}")]
    Dns { domain: String, source: DnsError },
    #[error(
        "the DNS-01 challenge record {record} was created but not seen through --dns-resolver within {waited:?} \
         (--dns-propagation-timeout): {seen}"
    )]
    Propagation { record: String, waited: Duration, seen: String },
    #[error("the ACME CA's certificate for {domain} cannot be read: {reason}")]
    Certificate { domain: String, reason: String },
    #[error("the router did not take the challenge for {domain}: {reason}")]
    Router { domain: String, reason: String },
    #[error("the DNS records of {domain} are no longer found, so no certificate is asked for: {missing}")]
    Records { domain: String, missing: String },
    #[error("cannot read or store the ACME state: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the stored ACME account cannot be read: {0}")]
    Account(String),
}

/// How the CA is shown that a name is ours.
#[derive(Debug, Clone, Copy)]
enum Proof<'a> {
    /// The router answers `/.well-known/acme-challenge/<token>` on the name.
    Http01,
    /// A TXT record `_acme-challenge.<name>` is created through the provider.
    Dns01(&'a dyn DnsProvider),
}

impl Proof<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Proof::Http01 => "HTTP-01",
            Proof::Dns01(_) => "DNS-01",
        }
    }

    fn challenge_type(&self) -> ChallengeType {
        match self {
            Proof::Http01 => ChallengeType::Http01,
            Proof::Dns01(_) => ChallengeType::Dns01,
        }
    }
}

/// What an order put out for the CA to see, taken back once it is decided.
#[derive(Debug, Default)]
struct Posted {
    /// HTTP-01 tokens the router answers.
    tokens: Vec<String>,
    /// DNS-01 records the provider created.
    records: Vec<TxtRecord>,
}

/// The DNS-01 challenge record's label.
const DNS01_LABEL: &str = "_acme-challenge";

/// How often the resolver is asked whether a challenge record is seen.
const PROPAGATION_POLL: Duration = Duration::from_millis(500);

/// Obtains and renews the certificates of verified domains, and the
/// platform's wildcards when a DNS provider is configured.
#[derive(Debug)]
pub struct Acme {
    db: Db,
    master: Arc<MasterKey>,
    routes: Arc<RoutePublisher>,
    config: Arc<ServeConfig>,
    directory: String,
    dns: Option<Arc<dyn DnsProvider>>,
    wake: Notify,
}

impl Acme {
    /// The issuer, unless certificates are off (`--acme-directory off`, or no
    /// HTTPS listener to serve them).
    pub fn new(
        db: Db,
        master: Arc<MasterKey>,
        routes: Arc<RoutePublisher>,
        config: Arc<ServeConfig>,
    ) -> Option<Arc<Acme>> {
        let directory = config.acme_directory_url()?.to_owned();
        let dns = config
            .cloudflare_api_token
            .clone()
            .map(|token| Arc::new(super::dns::Cloudflare::new(&config.cloudflare_api, token)) as Arc<dyn DnsProvider>);
        Some(Arc::new(Acme { db, master, routes, config, directory, dns, wake: Notify::new() }))
    }

    /// Looks for due work now (a domain was just verified).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Obtains what is due, then waits `--acme-interval` or a wake-up, until
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        self.sweep().await;
        loop {
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "ACME round failed");
            }
            if let Err(e) = self.wildcard_round().await {
                tracing::warn!(error = %e, "ACME round of the wildcard certificates failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.acme_interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Deletes the DNS-01 records a receiver stopped during an order (the
    /// propagation wait is minutes long) left at the provider: nothing
    /// remembered them, and the operator's zone would keep one per
    /// interrupted attempt. Run before any order, so none is in flight.
    async fn sweep(&self) {
        let Some(dns) = &self.dns else { return };
        for domain in self.config.wildcard_domains() {
            let name = format!("{DNS01_LABEL}.{domain}");
            let leftovers = match dns.leftovers(&name).await {
                Ok(leftovers) => leftovers,
                Err(e) => {
                    tracing::warn!(record = %name, error = %e, "cannot list leftover DNS-01 challenge records");
                    continue;
                }
            };
            for record in &leftovers {
                match dns.remove_txt(record).await {
                    Ok(()) => tracing::info!(record = %name, "leftover DNS-01 challenge record deleted"),
                    Err(e) => {
                        tracing::warn!(record = %name, error = %e, "leftover DNS-01 challenge record not deleted")
                    }
                }
            }
        }
    }

    /// One pass over the verified domains: each that is due gets an attempt.
    async fn round(&self) -> Result<(), sqlx::Error> {
        let now = Utc::now();
        let renew_before = chrono::Duration::from_std(self.config.acme_renew_before).unwrap_or(chrono::Duration::MAX);
        for row in self.db.verified_domains().await? {
            if !due(row.expires_at, row.next_attempt_at, now, renew_before) {
                continue;
            }
            // A name is certified only while it is still ours: one that
            // changed hands (or lost its records) is not asked of the CA,
            // whose rate limits every app shares.
            let missing = match super::resolver(&self.config) {
                Ok(resolver) => super::missing(&resolver, &row, &self.config).await,
                Err(e) => vec![format!("no DNS resolver (--dns-resolver): {e}")],
            };
            let attempt = if missing.is_empty() {
                self.obtain(&row.name, Proof::Http01).await
            } else {
                Err(AcmeError::Records { domain: row.name.clone(), missing: missing.join("; ") })
            };
            match attempt {
                Ok(cert) => {
                    self.db
                        .set_certificate(
                            row.id,
                            &self.master.seal_str(&cert.chain_pem),
                            &self.master.seal_str(&cert.key_pem),
                            &cert.issuer,
                            cert.expires_at,
                        )
                        .await?;
                    tracing::info!(domain = %row.name, issuer = %cert.issuer, expires = %cert.expires_at, "certificate obtained");
                    let _ = self.routes.publish().await;
                }
                Err(e) => {
                    let next = Utc::now() + backoff(self.config.acme_retry, row.failures);
                    tracing::warn!(domain = %row.name, error = %e, next = %next, "certificate not obtained");
                    self.db.set_certificate_failure(row.id, &e.to_string(), next).await?;
                }
            }
        }
        Ok(())
    }

    /// One pass over the wildcard domains (none without a DNS provider):
    /// each whose certificate is due gets an attempt by DNS-01.
    async fn wildcard_round(&self) -> Result<(), sqlx::Error> {
        let Some(dns) = &self.dns else { return Ok(()) };
        let now = Utc::now();
        let renew_before = chrono::Duration::from_std(self.config.acme_renew_before).unwrap_or(chrono::Duration::MAX);
        let rows = self.db.wildcards().await?;
        for domain in self.config.wildcard_domains() {
            let row = rows.iter().find(|r| r.domain == domain);
            let failures = row.map_or(0, |r| r.failures);
            if !due(row.and_then(|r| r.expires_at), row.and_then(|r| r.next_attempt_at), now, renew_before) {
                continue;
            }
            let name = format!("*.{domain}");
            match self.obtain(&name, Proof::Dns01(dns.as_ref())).await {
                Ok(cert) => {
                    self.db
                        .set_wildcard_certificate(
                            &domain,
                            &self.master.seal_str(&cert.chain_pem),
                            &self.master.seal_str(&cert.key_pem),
                            &cert.issuer,
                            cert.expires_at,
                        )
                        .await?;
                    tracing::info!(domain = %name, issuer = %cert.issuer, expires = %cert.expires_at, "wildcard certificate obtained");
                    let _ = self.routes.publish().await;
                }
                Err(e) => {
                    let next = Utc::now() + backoff(self.config.acme_retry, failures);
                    tracing::warn!(domain = %name, error = %e, next = %next, "wildcard certificate not obtained");
                    self.db.set_wildcard_failure(&domain, &e.to_string(), next).await?;
                }
            }
        }
        Ok(())
    }

    fn ca(&self, source: instant_acme::Error) -> AcmeError {
        AcmeError::Ca { directory: self.directory.clone(), source }
    }

    /// The account at this directory: the stored one, else a new one, stored.
    async fn account(&self) -> Result<Account, AcmeError> {
        let builder = || match &self.config.acme_ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        if let Some(sealed) = self.db.acme_account(&self.directory).await? {
            let json = self.master.open_str(&sealed).map_err(|e| AcmeError::Account(e.to_string()))?;
            let credentials: AccountCredentials =
                serde_json::from_str(&json).map_err(|e| AcmeError::Account(e.to_string()))?;
            return builder().map_err(|e| self.ca(e))?.from_credentials(credentials).await.map_err(|e| self.ca(e));
        }
        let contact = self.config.acme_email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
        let (account, credentials) = builder()
            .map_err(|e| self.ca(e))?
            .create(&new, self.directory.clone(), None)
            .await
            .map_err(|e| self.ca(e))?;
        let json = serde_json::to_string(&credentials).map_err(|e| AcmeError::Account(e.to_string()))?;
        self.db.set_acme_account(&self.directory, &self.master.seal_str(&json)).await?;
        Ok(account)
    }

    /// One order for `name` (`*.<domain>` for a wildcard), proven by `proof`.
    async fn obtain(&self, name: &str, proof: Proof<'_>) -> Result<Obtained, AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await.map_err(|e| self.ca(e))?;
        let mut posted = Posted::default();
        let answered = self.answer(&mut order, name, proof, &mut posted).await;
        let status = match answered {
            Ok(()) => order.poll_ready(&POLL).await,
            Err(e) => {
                self.forget(name, proof, posted).await;
                return Err(e);
            }
        };
        self.forget(name, proof, posted).await;
        match status {
            Ok(OrderStatus::Ready) => {}
            // An invalid order, with or without the CA's problem on it: the
            // challenges say why.
            Ok(_) | Err(instant_acme::Error::Api(_)) => {
                let problem = status.err().map(|e| e.to_string());
                let detail = self.why_invalid(&mut order).await.or(problem);
                let detail = detail.unwrap_or_else(|| "the order became invalid without a reason".into());
                return Err(AcmeError::Invalid { kind: proof.kind(), domain: name.to_owned(), detail });
            }
            Err(e) => return Err(self.ca(e)),
        }
        let key_pem = order.finalize().await.map_err(|e| self.ca(e))?;
        let chain_pem = order.poll_certificate(&POLL).await.map_err(|e| self.ca(e))?;
        let (issuer, expires_at) = read_certificate(&chain_pem)
            .map_err(|reason| AcmeError::Certificate { domain: name.to_owned(), reason })?;
        Ok(Obtained { chain_pem, key_pem, issuer, expires_at })
    }

    /// Puts out the answer to each pending challenge of `order` (what was
    /// put out goes into `posted`) and tells the CA it may validate.
    async fn answer(
        &self,
        order: &mut instant_acme::Order,
        name: &str,
        proof: Proof<'_>,
        posted: &mut Posted,
    ) -> Result<(), AcmeError> {
        let mut auths = order.authorizations();
        while let Some(auth) = auths.next().await {
            let mut auth = auth.map_err(|e| self.ca(e))?;
            if auth.status != AuthorizationStatus::Pending {
                continue;
            }
            // The identifier without `*.`: the host HTTP-01 is asked of, or
            // the domain the DNS-01 record sits under.
            let Identifier::Dns(host) = auth.identifier().identifier.clone() else {
                return Err(AcmeError::NoChallenge { kind: proof.kind(), domain: name.to_owned() });
            };
            let mut challenge = auth
                .challenge(proof.challenge_type())
                .ok_or_else(|| AcmeError::NoChallenge { kind: proof.kind(), domain: name.to_owned() })?;
            match proof {
                Proof::Http01 => {
                    let answer = challenge.key_authorization().as_str().to_owned();
                    self.routes.set_challenge(&host, &challenge.token, Some(answer));
                    posted.tokens.push(challenge.token.clone());
                    self.routes
                        .publish()
                        .await
                        .map_err(|e| AcmeError::Router { domain: name.to_owned(), reason: e.to_string() })?;
                }
                Proof::Dns01(dns) => {
                    let record = format!("{DNS01_LABEL}.{host}");
                    let value = challenge.key_authorization().dns_value();
                    let created = dns
                        .set_txt(&record, &value)
                        .await
                        .map_err(|source| AcmeError::Dns { domain: name.to_owned(), source })?;
                    posted.records.push(created);
                    self.propagated(&record, &value).await?;
                }
            }
            challenge.set_ready().await.map_err(|e| self.ca(e))?;
        }
        Ok(())
    }

    /// Waits until `--dns-resolver` sees `value` in the TXT records at
    /// `record`: the CA would otherwise look too early and fail the order.
    async fn propagated(&self, record: &str, value: &str) -> Result<(), AcmeError> {
        let waited = self.config.dns_propagation_timeout;
        let deadline = tokio::time::Instant::now() + waited;
        let mut seen = "nothing".to_owned();
        while tokio::time::Instant::now() < deadline {
            seen = match super::resolver(&self.config) {
                Err(e) => format!("no DNS resolver: {e}"),
                Ok(resolver) => match super::txt_values(&resolver, record).await {
                    Ok(values) if values.iter().any(|v| v == value) => return Ok(()),
                    Ok(values) if values.is_empty() => "no TXT record".to_owned(),
                    Ok(values) => format!("other values: {}", values.join(", ")),
                    Err(e) => e,
                },
            };
            tokio::time::sleep(PROPAGATION_POLL).await;
        }
        Err(AcmeError::Propagation { record: record.to_owned(), waited, seen })
    }

    /// Takes back what `posted` put out for `name`.
    async fn forget(&self, name: &str, proof: Proof<'_>, posted: Posted) {
        if !posted.tokens.is_empty() {
            for token in &posted.tokens {
                self.routes.set_challenge(name, token, None);
            }
            let _ = self.routes.publish().await;
        }
        if let Proof::Dns01(dns) = proof {
            for record in &posted.records {
                if let Err(e) = dns.remove_txt(record).await {
                    tracing::warn!(record = %record.name, error = %e, "DNS-01 challenge record not deleted");
                }
            }
        }
    }

    /// What the CA said of the failed challenges of an invalid order.
    async fn why_invalid(&self, order: &mut instant_acme::Order) -> Option<String> {
        let mut details = Vec::new();
        let mut auths = order.authorizations();
        while let Some(Ok(mut auth)) = auths.next().await {
            let Ok(state) = auth.refresh().await else { continue };
            details.extend(
                state
                    .challenges
                    .iter()
                    .filter_map(|c| c.error.as_ref())
                    .map(|p| p.detail.clone().unwrap_or_else(|| p.to_string())),
            );
        }
        (!details.is_empty()).then(|| details.join("; "))
    }
}

/// A certificate as the CA gave it.
struct Obtained {
    chain_pem: String,
    key_pem: String,
    issuer: String,
    expires_at: DateTime<Utc>,
}

/// Whether a certificate expiring at `expires_at` is needed now: there is
/// none or it is within the renewal window, and no failed attempt holds it
/// back until `next_attempt_at`.
fn due(
    expires_at: Option<DateTime<Utc>>,
    next_attempt_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    renew_before: chrono::Duration,
) -> bool {
    let needed = expires_at.is_none_or(|exp| exp.checked_sub_signed(renew_before).is_none_or(|at| at <= now));
    needed && next_attempt_at.is_none_or(|at| at <= now)
}

/// The wait after `failures` failed attempts in a row: `base`, doubling, up to a day.
fn backoff(base: Duration, failures: i32) -> chrono::Duration {
    let wait = base.saturating_mul(1u32 << failures.clamp(0, 20)).min(MAX_BACKOFF);
    chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::days(1))
}

/// The issuer (common name, else organisation) and expiry of the first
/// certificate of a PEM chain.
fn read_certificate(chain_pem: &str) -> Result<(String, DateTime<Utc>), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    let issuer = cert.issuer();
    let name = issuer
        .iter_common_name()
        .chain(issuer.iter_organization())
        .find_map(|a| a.as_str().ok())
        .unwrap_or("unknown issuer")
        .to_owned();
    let expires = DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        .ok_or_else(|| "its expiry is out of range".to_owned())?;
    Ok((name, expires))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_due_when_missing_or_in_the_renewal_window_unless_backing_off() {
        let now = Utc::now();
        let window = chrono::Duration::days(30);
        assert!(due(None, None, now, window));
        assert!(!due(Some(now + chrono::Duration::days(60)), None, now, window));
        assert!(due(Some(now + chrono::Duration::days(29)), None, now, window));
        assert!(!due(None, Some(now + chrono::Duration::minutes(1)), now, window));
        assert!(due(None, Some(now - chrono::Duration::minutes(1)), now, window));
    }

    #[test]
    fn the_backoff_doubles_up_to_a_day() {
        let base = Duration::from_secs(300);
        assert_eq!(backoff(base, 0), chrono::Duration::minutes(5));
        assert_eq!(backoff(base, 1), chrono::Duration::minutes(10));
        assert_eq!(backoff(base, 3), chrono::Duration::minutes(40));
        assert_eq!(backoff(base, 30), chrono::Duration::days(1));
    }
}
