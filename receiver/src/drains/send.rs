//! Writing records to a drain: RFC 5424 syslog messages with octet-counting
//! framing (`LEN SP MSG`, RFC 6587 3.4.1, as RFC 5425 requires over TLS) on
//! a kept TCP or TLS connection, or NDJSON batches POSTed over HTTPS. TLS is
//! verified against the webpki roots (and `--drain-ca`); every connection
//! resolves the name again and reaches only addresses the policy allows
//! ([`super::target`]); HTTPS redirects are not followed (a redirect could
//! point anywhere). Errors name the drain by its shown form, never its URL.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::target::{self, Target};
use super::{Record, Settings, Source};

/// How long a connection, a TLS handshake or a batch's write may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a batch was not shipped.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot reach the drain {shown}: {reason}")]
    Connect { shown: String, reason: String },
    #[error("the drain {shown} failed while written to: {reason}")]
    Write { shown: String, reason: String },
    #[error("the drain {shown} answered {status}")]
    Status { shown: String, status: u16 },
}

trait Connection: AsyncWrite + Unpin + Send {}
impl<T: AsyncWrite + Unpin + Send> Connection for T {}

enum Way {
    Syslog {
        tls: Option<(tokio_rustls::TlsConnector, String)>,
        host: String,
        port: u16,
        conn: Option<Box<dyn Connection>>,
    },
    Https {
        url: url::Url,
        client: reqwest::Client,
    },
}

/// Ships batches to one drain.
pub struct Shipper {
    way: Way,
    shown: String,
    hostname: String,
    reach: target::Reach,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").field("shown", &self.shown).finish_non_exhaustive()
    }
}

/// Resolves names for the HTTPS client, keeping only addresses drains may reach.
struct Guarded {
    reach: target::Reach,
}

impl reqwest::dns::Resolve for Guarded {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let reach = self.reach;
        Box::pin(async move {
            let addrs = target::resolve(name.as_str(), 0, reach).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn roots(extra: Option<&[u8]>) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(pem) = extra {
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
            roots.add(cert?)?;
        }
    }
    Ok(roots)
}

impl Shipper {
    pub fn new(target: Target, shown: String, settings: &Settings) -> anyhow::Result<Shipper> {
        let way = match target {
            Target::Syslog { tls, host, port } => {
                let tls = if tls {
                    let config =
                        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                            .with_safe_default_protocol_versions()?
                            .with_root_certificates(roots(settings.extra_roots.as_deref())?)
                            .with_no_client_auth();
                    Some((tokio_rustls::TlsConnector::from(Arc::new(config)), host.clone()))
                } else {
                    None
                };
                Way::Syslog { tls, host, port, conn: None }
            }
            Target::Https(url) => {
                let mut builder = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .connect_timeout(TIMEOUT)
                    .timeout(TIMEOUT * 3)
                    .dns_resolver(Arc::new(Guarded { reach: settings.reach }));
                if let Some(pem) = &settings.extra_roots {
                    for cert in reqwest::Certificate::from_pem_bundle(pem)? {
                        builder = builder.add_root_certificate(cert);
                    }
                }
                Way::Https { url, client: builder.build()? }
            }
        };
        Ok(Shipper { way, shown, hostname: settings.hostname.clone(), reach: settings.reach })
    }

    /// The drain's URL as the API shows it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Writes `batch` to the drain, connecting first when needed.
    pub async fn send(&mut self, batch: &[Arc<Record>]) -> Result<(), SendError> {
        let shown = self.shown.clone();
        match &mut self.way {
            Way::Syslog { tls, host, port, conn } => {
                if conn.is_none() {
                    *conn = Some(
                        connect(host, *port, tls.as_ref(), self.reach)
                            .await
                            .map_err(|reason| SendError::Connect { shown: shown.clone(), reason })?,
                    );
                }
                let mut bytes = Vec::new();
                for record in batch {
                    let message = syslog_message(record, &self.hostname);
                    bytes.extend_from_slice(format!("{} ", message.len()).as_bytes());
                    bytes.extend_from_slice(message.as_bytes());
                }
                let Some(c) = conn.as_mut() else { return Ok(()) };
                let written = tokio::time::timeout(TIMEOUT, async {
                    c.write_all(&bytes).await?;
                    c.flush().await
                })
                .await;
                match written {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        *conn = None;
                        Err(SendError::Write { shown, reason: e.to_string() })
                    }
                    Err(_) => {
                        *conn = None;
                        Err(SendError::Write { shown, reason: format!("no progress in {}s", TIMEOUT.as_secs()) })
                    }
                }
            }
            Way::Https { url, client } => {
                // A literal address is not resolved, so not seen by `Guarded`.
                if let Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) = url.host() {
                    let (host, port) = Target::Https(url.clone()).host_port();
                    target::resolve(&host, port, self.reach)
                        .await
                        .map_err(|e| SendError::Connect { shown: shown.clone(), reason: e.to_string() })?;
                }
                let mut body = Vec::new();
                for record in batch {
                    // A map of strings and JSON values always serializes.
                    let _ = serde_json::to_writer(&mut body, &ndjson(record));
                    body.push(b'\n');
                }
                let response = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| SendError::Connect { shown: shown.clone(), reason: e.without_url().to_string() })?;
                if !response.status().is_success() {
                    return Err(SendError::Status { shown, status: response.status().as_u16() });
                }
                Ok(())
            }
        }
    }
}

async fn connect(
    host: &str,
    port: u16,
    tls: Option<&(tokio_rustls::TlsConnector, String)>,
    reach: target::Reach,
) -> Result<Box<dyn Connection>, String> {
    let addrs = target::resolve(host, port, reach).await.map_err(|e| e.to_string())?;
    let mut last = format!("{host} resolves to no address");
    for addr in addrs {
        let tcp = match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                last = format!("{addr}: {e}");
                continue;
            }
            Err(_) => {
                last = format!("{addr}: no answer in {}s", TIMEOUT.as_secs());
                continue;
            }
        };
        let Some((connector, name)) = tls else { return Ok(Box::new(tcp)) };
        let server = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| e.to_string())?;
        return match tokio::time::timeout(TIMEOUT, connector.connect(server, tcp)).await {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            Ok(Err(e)) => Err(format!("TLS with {addr}: {e}")),
            Err(_) => Err(format!("TLS with {addr}: no handshake in {}s", TIMEOUT.as_secs())),
        };
    }
    Err(last)
}

/// The RFC 5424 message of `record`: facility user; severity notice for
/// events, info else; APP-NAME the app (`nx` for the platform's events);
/// PROCID the deployment; MSGID the source; no structured data.
pub fn syslog_message(record: &Record, hostname: &str) -> String {
    let severity = if record.source == Source::Event { 5 } else { 6 };
    let pri = 8 + severity;
    format!(
        "<{pri}>1 {} {} {} {} {} - {}",
        record.at.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
        printable(hostname, 255),
        printable(record.app.as_deref().unwrap_or("nx"), 48),
        printable(record.deployment.as_deref().unwrap_or("-"), 128),
        record.source.as_str(),
        record.message
    )
}

/// A header field of RFC 5424: printable US-ASCII, bounded, `-` when empty.
fn printable(s: &str, max: usize) -> String {
    let kept: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if kept.is_empty() {
        "-".to_owned()
    } else {
        kept
    }
}

/// The NDJSON object of `record`.
pub fn ndjson(record: &Record) -> serde_json::Value {
    let mut object = serde_json::json!({
        "at": record.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "app": record.app,
        "deployment": record.deployment,
        "source": record.source.as_str(),
        "message": record.message,
    });
    if let (Some(fields), Some(map)) = (&record.fields, object.as_object_mut()) {
        map.insert(record.source.as_str().to_owned(), fields.clone());
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn syslog_messages_follow_rfc_5424() {
        let record = Record {
            at: chrono::Utc.with_ymd_and_hms(2026, 11, 30, 3, 30, 0).single().unwrap_or_default(),
            app: Some("web".into()),
            deployment: Some("d1".into()),
            source: Source::App,
            message: "hello world".into(),
            fields: None,
        };
        assert_eq!(
            syslog_message(&record, "host 1"),
            "<14>1 2026-11-30T03:30:00.000000Z host1 web d1 app - hello world"
        );
        let event = Record { app: None, deployment: None, source: Source::Event, ..record.clone() };
        assert_eq!(syslog_message(&event, ""), "<13>1 2026-11-30T03:30:00.000000Z - nx - event - hello world");
        assert_eq!(
            ndjson(&record).to_string(),
            r#"{"app":"web","at":"2026-11-30T03:30:00.000000Z","deployment":"d1","message":"hello world","source":"app"}"#
        );
    }
}
