//! Custom domains: which DNS records attach a name to an app, whether they
//! exist (asked of `--dns-resolver`), and the certificates ACME gives for the
//! verified ones ([`acme`]), which also obtains the platform's wildcard
//! certificates by DNS-01 through a DNS provider ([`dns`]).
//!
//! A name is attached to one app at most; it is served once verified: a TXT
//! record `_nx-verify.<name>` holding the domain's token proves the app's
//! owner controls the name's DNS, and a CNAME to the app's production host
//! (or, for an apex, A/AAAA records to `--public-address`) sends it here.

pub mod acme;
pub mod dns;

use std::net::IpAddr;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{ResolveError, TokioResolver};
use nx_protocol::api::{DnsRecord, DomainInfo};
use nx_protocol::names::{production_host, AppName};

use crate::config::ServeConfig;
use crate::db::DomainRow;

/// The label under a domain whose TXT record proves ownership.
pub const VERIFY_LABEL: &str = "_nx-verify";

/// Why a domain name cannot be attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "{name:?} is not a domain name: use letters, digits and hyphens in dot-separated labels of 1 to 63 \
         characters (253 at most in all), with at least two labels, e.g. www.example.com"
    )]
    Invalid { name: String },
    #[error(
        "{name} is an IP address, not a domain name: a certificate and a CNAME need a name; attach a domain \
         whose A/AAAA records point at this server instead"
    )]
    IpLiteral { name: String },
    #[error("{name} is under the platform's own domain {platform}; its hosts are given to apps already")]
    Platform { name: String, platform: String },
    #[error(
        "{name} is an apex domain, which cannot be a CNAME: it needs A/AAAA records to the server's public \
         addresses, and this server has none configured (--public-address); use a subdomain such as www.{name}"
    )]
    ApexWithoutAddress { name: String },
}

/// `name` lowercased and without a trailing dot, if it is a domain name an
/// app may have: not the platform's own, nor under it.
pub fn normalize(name: &str, config: &ServeConfig) -> Result<String, NameError> {
    let lower = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let invalid = || NameError::Invalid { name: name.to_owned() };
    let labels: Vec<&str> = lower.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    // An IPv4 literal is dot-separated digits; no top-level domain is all
    // digits (RFC 3696 §2), so such a name is an address in any case.
    if lower.parse::<IpAddr>().is_ok()
        || labels.last().is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(NameError::IpLiteral { name: lower });
    }
    if lower.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(invalid());
    }
    for platform in [config.domain.as_str(), config.preview_domain()] {
        if lower == platform || lower.ends_with(&format!(".{platform}")) {
            return Err(NameError::Platform { name: lower, platform: platform.to_owned() });
        }
    }
    if is_apex(&lower) && config.public_addresses.is_empty() {
        return Err(NameError::ApexWithoutAddress { name: lower });
    }
    Ok(lower)
}

/// Whether `name` is a registrable domain itself (two labels), which DNS
/// forbids to be a CNAME. Names under a multi-label public suffix
/// (`example.co.uk`) are taken for subdomains: their owner is told to make
/// a CNAME, which their DNS provider refuses if it is an apex (many offer
/// CNAME flattening, which works as well).
pub fn is_apex(name: &str) -> bool {
    name.matches('.').count() == 1
}

/// A random token for the TXT record, 128 bits in hex.
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The TXT record's name and value.
fn ownership(name: &str, token: &str) -> DnsRecord {
    DnsRecord { kind: "TXT".into(), name: format!("{VERIFY_LABEL}.{name}"), value: format!("nx-verify={token}") }
}

/// Where a name must point: a CNAME to the app's production host, or A/AAAA
/// records to the public addresses for an apex.
fn pointing(name: &str, app: &AppName, config: &ServeConfig) -> Vec<DnsRecord> {
    if is_apex(name) {
        config
            .public_addresses
            .iter()
            .map(|ip| DnsRecord {
                kind: if ip.is_ipv4() { "A" } else { "AAAA" }.into(),
                name: name.to_owned(),
                value: ip.to_string(),
            })
            .collect()
    } else {
        vec![DnsRecord { kind: "CNAME".into(), name: name.to_owned(), value: production_host(app, &config.domain) }]
    }
}

/// What the API says of a domain.
pub fn info(row: &DomainRow, config: &ServeConfig) -> Option<DomainInfo> {
    let app = AppName::parse(&row.app_name).ok()?;
    let mut records = pointing(&row.name, &app, config);
    records.push(ownership(&row.name, &row.token));
    Some(DomainInfo {
        domain: row.name.clone(),
        app,
        records,
        verified_at: row.verified_at,
        issuer: row.issuer.clone(),
        expires_at: row.expires_at,
        last_error: row.last_error.clone(),
        next_attempt_at: row.next_attempt_at,
    })
}

/// The resolver `nx domains verify` asks: `--dns-resolver`, else the
/// system's. Nothing is cached, so a record just created is seen.
pub fn resolver(config: &ServeConfig) -> Result<TokioResolver, ResolveError> {
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.attempts = 2;
    let builder = match config.dns_resolver {
        Some(addr) => TokioResolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                vec![],
                NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
            ),
            TokioConnectionProvider::default(),
        ),
        None => TokioResolver::builder_tokio()?,
    };
    Ok(builder.with_options(opts).build())
}

/// The records of `kind` at `name` as text; none when the name or the
/// records do not exist.
async fn lookup(resolver: &TokioResolver, name: &str, kind: RecordType) -> Result<Vec<RData>, String> {
    match resolver.lookup(format!("{name}."), kind).await {
        Ok(found) => Ok(found.record_iter().filter(|r| r.record_type() == kind).map(|r| r.data().clone()).collect()),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
        Err(e) => Err(format!("the DNS lookup of {kind} records at {name} failed: {e}")),
    }
}

/// The values of the TXT records at `name` (each record's strings joined).
async fn txt_values(resolver: &TokioResolver, name: &str) -> Result<Vec<String>, String> {
    let found = lookup(resolver, name, RecordType::TXT).await?;
    Ok(found
        .iter()
        .filter_map(|d| match d {
            RData::TXT(t) => Some(t.txt_data().iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect()),
            _ => None,
        })
        .collect())
}

/// What is missing for `row` to be verified, each a sentence saying which
/// record to create; empty when everything is there.
pub async fn missing(resolver: &TokioResolver, row: &DomainRow, config: &ServeConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(app) = AppName::parse(&row.app_name) else { return vec![format!("app {:?} is invalid", row.app_name)] };
    let txt = ownership(&row.name, &row.token);
    match txt_values(resolver, &txt.name).await {
        Err(e) => problems.push(e),
        Ok(values) => {
            if values.is_empty() {
                problems.push(format!("no TXT record at {}; create it with the value {}", txt.name, txt.value));
            } else if !values.contains(&txt.value) {
                problems.push(format!(
                    "the TXT records at {} are {}, and none is {}; add that value",
                    txt.name,
                    values.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", "),
                    txt.value
                ));
            }
        }
    }
    if let Some(problem) = points_here(resolver, &row.name, &app, config).await {
        problems.push(problem);
    }
    problems
}

/// Why `name` does not point at the app, if it does not: a CNAME to its
/// production host, or addresses that are all public addresses of this server.
async fn points_here(resolver: &TokioResolver, name: &str, app: &AppName, config: &ServeConfig) -> Option<String> {
    let expected = production_host(app, &config.domain);
    let cnames = match lookup(resolver, name, RecordType::CNAME).await {
        Ok(found) => found
            .iter()
            .filter_map(|d| match d {
                RData::CNAME(c) => Some(c.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Err(e) => return Some(e),
    };
    if cnames.contains(&expected) {
        return None;
    }
    let mut addresses: Vec<IpAddr> = Vec::new();
    for kind in [RecordType::A, RecordType::AAAA] {
        match lookup(resolver, name, kind).await {
            Ok(found) => addresses.extend(found.iter().filter_map(|d| match d {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })),
            Err(e) => return Some(e),
        }
    }
    if !addresses.is_empty() && addresses.iter().all(|a| config.public_addresses.contains(a)) {
        return None;
    }
    let wanted = pointing(name, app, config)
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.kind, r.value))
        .collect::<Vec<_>>()
        .join(" and ");
    Some(match (cnames.first(), addresses.is_empty()) {
        (Some(other), _) => format!("{name} is a CNAME to {other}, not to {expected}; change it to {wanted}"),
        (None, true) => format!("{name} has no CNAME, A or AAAA record; create {wanted}"),
        (None, false) => format!(
            "{name} points at {}, which is not this server; create {wanted}",
            addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn config(extra: &[&str]) -> ServeConfig {
        ServeConfig::parse(&[&["--domain", "apps.test", "--preview-domain", "previews.test"], extra].concat()).unwrap()
    }

    #[test]
    fn names_are_normalised_and_bad_ones_say_why() {
        let c = config(&[]);
        assert_eq!(normalize("WWW.Example.Test.", &c).unwrap(), "www.example.test");
        for bad in ["localhost", "-a.example.test", "a..example.test", "a_b.example.test", "*.example.test", ""] {
            assert!(matches!(normalize(bad, &c), Err(NameError::Invalid { .. })), "{bad}");
        }
        assert_eq!(
            normalize("web.apps.test", &c).unwrap_err().to_string(),
            "web.apps.test is under the platform's own domain apps.test; its hosts are given to apps already"
        );
        assert!(matches!(normalize("x--web.previews.test", &c), Err(NameError::Platform { .. })));
        for address in ["192.0.2.1", "192.0.2.1.", "10.1", "2001:db8::1", "www.example.123"] {
            assert!(matches!(normalize(address, &c), Err(NameError::IpLiteral { .. })), "{address}");
        }
        assert_eq!(
            normalize("192.0.2.1", &c).unwrap_err().to_string(),
            "192.0.2.1 is an IP address, not a domain name: a certificate and a CNAME need a name; attach a domain \
             whose A/AAAA records point at this server instead"
        );
        assert_eq!(normalize("1.example.test", &c).unwrap(), "1.example.test", "digits in other labels are fine");
        assert!(matches!(normalize("example.test", &c), Err(NameError::ApexWithoutAddress { .. })));
        assert_eq!(normalize("example.test", &config(&["--public-address", "192.0.2.1"])).unwrap(), "example.test");
    }

    #[test]
    fn a_subdomain_gets_a_cname_and_an_apex_gets_addresses() {
        let c = config(&["--public-address", "192.0.2.1,2001:db8::1"]);
        let app = AppName::parse("web").unwrap();
        let cname = pointing("www.example.test", &app, &c);
        assert_eq!(
            cname,
            [DnsRecord { kind: "CNAME".into(), name: "www.example.test".into(), value: "web.apps.test".into() }]
        );
        let apex = pointing("example.test", &app, &c);
        assert_eq!(
            apex.iter().map(|r| (r.kind.as_str(), r.value.as_str())).collect::<Vec<_>>(),
            [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")]
        );
        assert_eq!(ownership("www.example.test", "abc").name, "_nx-verify.www.example.test");
        assert_eq!(ownership("www.example.test", "abc").value, "nx-verify=abc");
    }
}
