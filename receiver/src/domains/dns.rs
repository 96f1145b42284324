//! DNS providers, through which ACME DNS-01 challenges are answered: a TXT
//! record `_acme-challenge.<domain>` is created for the CA to find and
//! deleted afterwards. Cloudflare's API (v4) is the first; another provider
//! is one more implementation of [`DnsProvider`]. Records are marked as the
//! receiver's ([`MARK`]), so those a stopped receiver left behind are found
//! and deleted at the next start without touching the operator's own.

use futures_util::future::BoxFuture;
use nx_protocol::secret::Secret;
use serde::Deserialize;
use serde_json::{json, Value};

/// A TXT record a provider created, as needed to delete it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxtRecord {
    /// The record's name, without a trailing dot.
    pub name: String,
    /// The provider's handle on it (Cloudflare: zone and record ids).
    pub handle: String,
}

/// Why a provider did not create or delete a record.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot reach the Cloudflare API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Cloudflare refused to {what} (HTTP {status}): {errors}{hint}")]
    Refused { what: String, status: u16, errors: String, hint: &'static str },
    #[error("Cloudflare's answer to {what} cannot be read: {reason}")]
    Answer { what: String, reason: String },
    #[error(
        "no Cloudflare zone that the token can see holds {name}: add the domain's zone to the account, or give \
         the token (--cloudflare-api-token) Zone:Read and DNS:Edit on it"
    )]
    NoZone { name: String },
}

/// Creates and deletes the TXT records of DNS-01 challenges.
pub trait DnsProvider: std::fmt::Debug + Send + Sync {
    /// Creates a TXT record `name` holding `value`, next to any others there.
    fn set_txt<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<TxtRecord, DnsError>>;

    /// Deletes a record [`DnsProvider::set_txt`] created.
    fn remove_txt<'a>(&'a self, record: &'a TxtRecord) -> BoxFuture<'a, Result<(), DnsError>>;

    /// The TXT records `name` holds that [`DnsProvider::set_txt`] created
    /// (those an interrupted order left); the provider's other records
    /// there are not listed.
    fn leftovers<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<TxtRecord>, DnsError>>;
}

/// The comment the receiver's records carry at Cloudflare: what marks them
/// as its own.
pub const MARK: &str = "nx-sandbox acme dns-01";

/// Cloudflare's DNS, through its API with a scoped API token.
#[derive(Debug)]
pub struct Cloudflare {
    api: String,
    token: Secret<String>,
    http: reqwest::Client,
}

/// Said after a refusal for lack of authentication or permission.
const TOKEN_HINT: &str = "; check --cloudflare-api-token: it must be a valid API token with Zone:Read and DNS:Edit \
                          permissions on the zone";

/// Every answer of Cloudflare's API comes in this envelope.
#[derive(Debug, Deserialize)]
struct Envelope {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
    #[serde(default)]
    result: Value,
}

#[derive(Debug, Deserialize)]
struct ApiMessage {
    code: i64,
    message: String,
}

impl Cloudflare {
    /// The provider at `api` (`https://api.cloudflare.com/client/v4`).
    pub fn new(api: &str, token: Secret<String>) -> Cloudflare {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Cloudflare { api: api.trim_end_matches('/').to_owned(), token, http }
    }

    /// One call; its `result` when Cloudflare says it succeeded.
    async fn call(
        &self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DnsError> {
        let url = format!("{}{path}", self.api);
        let mut request = self.http.request(method, &url).bearer_auth(self.token.expose());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response =
            request.send().await.map_err(|e| DnsError::Unreachable { url: self.api.clone(), reason: e.to_string() })?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| DnsError::Unreachable { url: self.api.clone(), reason: e.to_string() })?;
        let envelope: Envelope = serde_json::from_str(&text)
            .map_err(|e| DnsError::Answer { what: what.to_owned(), reason: format!("HTTP {status}, {e}") })?;
        if envelope.success && (200..300).contains(&status) {
            return Ok(envelope.result);
        }
        let errors = match envelope.errors.as_slice() {
            [] => "no reason given".to_owned(),
            errors => errors.iter().map(|e| format!("{} {}", e.code, e.message)).collect::<Vec<_>>().join("; "),
        };
        let hint = if matches!(status, 400 | 401 | 403) { TOKEN_HINT } else { "" };
        Err(DnsError::Refused { what: what.to_owned(), status, errors, hint })
    }

    /// The id of the zone holding `name`: the longest of its parent domains
    /// that is a zone of the account.
    async fn zone(&self, name: &str) -> Result<String, DnsError> {
        let labels: Vec<&str> = name.split('.').collect();
        for start in 1..labels.len().saturating_sub(1) {
            let candidate = labels[start..].join(".");
            let what = format!("look up the zone {candidate}");
            let zones = self.call(&what, reqwest::Method::GET, &format!("/zones?name={candidate}"), None).await?;
            let found = zones.as_array().into_iter().flatten().find(|z| z["name"].as_str() == Some(candidate.as_str()));
            if let Some(zone) = found {
                return zone["id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| DnsError::Answer { what, reason: "the zone has no id".into() });
            }
        }
        Err(DnsError::NoZone { name: name.to_owned() })
    }
}

impl DnsProvider for Cloudflare {
    fn set_txt<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<TxtRecord, DnsError>> {
        Box::pin(async move {
            let zone = self.zone(name).await?;
            let what = format!("create the TXT record {name}");
            // A short TTL: resolvers must not keep an old challenge's value.
            let body = json!({ "type": "TXT", "name": name, "content": value, "ttl": 60, "comment": MARK });
            let created =
                self.call(&what, reqwest::Method::POST, &format!("/zones/{zone}/dns_records"), Some(body)).await?;
            let id = created["id"]
                .as_str()
                .ok_or_else(|| DnsError::Answer { what, reason: "the record has no id".into() })?;
            Ok(TxtRecord { name: name.to_owned(), handle: format!("{zone}/{id}") })
        })
    }

    fn remove_txt<'a>(&'a self, record: &'a TxtRecord) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let what = format!("delete the TXT record {}", record.name);
            let (zone, id) = record.handle.split_once('/').ok_or_else(|| DnsError::Answer {
                what: what.clone(),
                reason: "not a record of Cloudflare's".into(),
            })?;
            self.call(&what, reqwest::Method::DELETE, &format!("/zones/{zone}/dns_records/{id}"), None)
                .await
                .map(|_| ())
        })
    }

    fn leftovers<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<TxtRecord>, DnsError>> {
        Box::pin(async move {
            let zone = self.zone(name).await?;
            let what = format!("list the TXT records {name}");
            let query: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("type", "TXT")
                .append_pair("name", name)
                .append_pair("comment", MARK)
                .append_pair("per_page", "100")
                .finish();
            let listed =
                self.call(&what, reqwest::Method::GET, &format!("/zones/{zone}/dns_records?{query}"), None).await?;
            // Filtered again here: only a record of this name and mark is
            // the receiver's to delete, whatever the API's filters did.
            Ok(listed
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["type"] == "TXT" && r["name"] == name && r["comment"] == MARK)
                .filter_map(|r| r["id"].as_str())
                .map(|id| TxtRecord { name: name.to_owned(), handle: format!("{zone}/{id}") })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Path, Query};
    use axum::routing::{delete, get};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// N1: a Cloudflare zone holding the receiver's leftover, the operator's
    /// own TXT record at the same name and a marked one of another name;
    /// only the first is listed and deleted.
    #[tokio::test]
    async fn leftovers_are_the_receivers_records_of_that_name_only() {
        let deleted: Arc<Mutex<Vec<String>>> = Arc::default();
        let asked: Arc<Mutex<Vec<HashMap<String, String>>>> = Arc::default();
        let record = |id: &str, name: &str, comment: Option<&str>| json!({ "id": id, "type": "TXT", "name": name, "content": "v", "comment": comment });
        // Like a Cloudflare that ignores the filters: the client must not.
        let records = json!([
            record("ours", "_acme-challenge.example.com", Some(MARK)),
            record("operators", "_acme-challenge.example.com", None),
            record("other-name", "_acme-challenge.other.example.com", Some(MARK)),
        ]);
        let app = axum::Router::new()
            .route(
                "/zones",
                get(|| async {
                    axum::Json(json!({ "success": true, "result": [{ "id": "z1", "name": "example.com" }] }))
                }),
            )
            .route(
                "/zones/z1/dns_records",
                get({
                    let asked = asked.clone();
                    move |Query(q): Query<HashMap<String, String>>| async move {
                        asked.lock().unwrap_or_else(|e| e.into_inner()).push(q);
                        axum::Json(json!({ "success": true, "result": records }))
                    }
                }),
            )
            .route(
                "/zones/z1/dns_records/{id}",
                delete({
                    let deleted = deleted.clone();
                    move |Path(id): Path<String>| async move {
                        deleted.lock().unwrap_or_else(|e| e.into_inner()).push(id.clone());
                        axum::Json(json!({ "success": true, "result": { "id": id } }))
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let cf = Cloudflare::new(&format!("http://{addr}"), Secret::new("t".to_owned()));

        let found = cf.leftovers("_acme-challenge.example.com").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found, [TxtRecord { name: "_acme-challenge.example.com".into(), handle: "z1/ours".into() }]);
        let q = asked.lock().unwrap_or_else(|e| e.into_inner())[0].clone();
        assert_eq!(q.get("type").map(String::as_str), Some("TXT"));
        assert_eq!(q.get("name").map(String::as_str), Some("_acme-challenge.example.com"));
        assert_eq!(q.get("comment").map(String::as_str), Some(MARK));
        for record in &found {
            cf.remove_txt(record).await.unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(*deleted.lock().unwrap_or_else(|e| e.into_inner()), ["ours"]);
    }
}
