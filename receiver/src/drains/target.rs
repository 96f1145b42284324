//! A drain's URL: what it names (syslog over TCP or TLS, or an HTTPS
//! endpoint), the form the API shows (credentials masked), and where the
//! receiver may connect. The URL is hostile input: the receiver runs on the
//! host's network as root, so a drain must not become a way to reach the
//! host's own services or the private network (SSRF); every address a name
//! resolves to is checked at each connection, not once at `add`, so a name
//! re-pointed later (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::network::{METADATA_V4, METADATA_V6};

/// Which non-public addresses the operator lets drains reach. Link-local,
/// cloud metadata (AWS/GCP/Azure 169.254.169.254, AWS's fd00:ec2::254,
/// Alibaba's 100.100.100.200, Azure's WireServer 168.63.129.16) and the
/// other special ranges stay refused whatever is set: they hand out the
/// host's credentials and no log host lives there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    /// `--drain-allow-private`: RFC 1918, IPv6 unique-local and shared
    /// address space (CGNAT), where private log hosts live.
    pub private: bool,
    /// `--drain-allow-loopback`: the host itself (127.0.0.0/8, ::1,
    /// localhost), where PostgreSQL and the API listen; for tests.
    pub loopback: bool,
}

/// What kind of address a drain would reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Public,
    Private,
    Loopback,
    /// Link-local, metadata, unspecified, multicast, reserved: never.
    Never,
}

impl Reach {
    /// Whether the receiver may connect to `addr`.
    pub fn allows(self, addr: IpAddr) -> bool {
        match kind(addr) {
            Kind::Public => true,
            Kind::Private => self.private,
            Kind::Loopback => self.loopback,
            Kind::Never => false,
        }
    }

    /// The flag that would let drains reach `addr`, if any does.
    fn flag_for(addr: IpAddr) -> &'static str {
        match kind(addr) {
            Kind::Private => "unless the operator starts the receiver with --drain-allow-private",
            Kind::Loopback => "unless the operator starts the receiver with --drain-allow-loopback",
            Kind::Public | Kind::Never => "whatever the receiver allows (link-local, metadata or reserved)",
        }
    }
}

/// Where a drain ships to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// RFC 5424 messages over TCP, octet-counting framing (RFC 6587), in
    /// TLS (RFC 5425) when `tls`.
    Syslog { tls: bool, host: String, port: u16 },
    /// NDJSON batches POSTed to this URL.
    Https(url::Url),
}

/// Why a drain URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the drain URL is not a URL ({reason}); write syslog+tls://HOST:PORT, syslog+tcp://HOST:PORT or https://HOST/PATH")]
    Unparsable { reason: String },
    #[error(
        "the drain URL's scheme is {scheme:?}; write syslog+tls://HOST:PORT, syslog+tcp://HOST:PORT or https://HOST/PATH \
         (plain http is refused: logs hold what apps print)"
    )]
    Scheme { scheme: String },
    #[error("the drain URL {shown} names no host")]
    NoHost { shown: String },
    #[error("a syslog drain takes no user, password, path or query ({shown}); write syslog+tls://HOST:PORT")]
    SyslogExtras { shown: String },
    #[error("the drain URL {shown} reaches {addr}, which is not a public address; drains may not go there {flag}")]
    Private { shown: String, addr: IpAddr, flag: &'static str },
}

/// Default ports: syslog over TLS (RFC 5425), syslog over TCP.
const SYSLOG_TLS_PORT: u16 = 6514;
const SYSLOG_TCP_PORT: u16 = 514;

impl Target {
    /// Parses `url`; a literal address is checked against the policy at once.
    pub fn parse(url: &str, reach: Reach) -> Result<Target, TargetError> {
        let parsed = url::Url::parse(url.trim()).map_err(|e| TargetError::Unparsable { reason: e.to_string() })?;
        let shown = shown(&parsed);
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(TargetError::NoHost { shown }),
        };
        let target = match parsed.scheme() {
            scheme @ ("syslog+tls" | "syslog+tcp") => {
                let extras = !parsed.username().is_empty()
                    || parsed.password().is_some()
                    || !matches!(parsed.path(), "" | "/")
                    || parsed.query().is_some()
                    || parsed.fragment().is_some();
                if extras {
                    return Err(TargetError::SyslogExtras { shown });
                }
                let tls = scheme == "syslog+tls";
                let port = parsed.port().unwrap_or(if tls { SYSLOG_TLS_PORT } else { SYSLOG_TCP_PORT });
                Target::Syslog { tls, host: host.clone(), port }
            }
            "https" => Target::Https(parsed.clone()),
            other => return Err(TargetError::Scheme { scheme: other.to_owned() }),
        };
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        let named_local = host == "localhost" || host.ends_with(".localhost");
        let addr = match literal {
            Some(addr) => Some(addr),
            None if named_local => Some(Ipv4Addr::LOCALHOST.into()),
            None => None,
        };
        match addr {
            Some(addr) if !reach.allows(addr) => Err(TargetError::Private { shown, addr, flag: Reach::flag_for(addr) }),
            _ => Ok(target),
        }
    }

    /// The host and port connected to.
    pub fn host_port(&self) -> (String, u16) {
        match self {
            Target::Syslog { host, port, .. } => (host.clone(), *port),
            Target::Https(url) => {
                (url.host_str().unwrap_or_default().to_owned(), url.port_or_known_default().unwrap_or(443))
            }
        }
    }
}

/// `url` as the API shows it: user and password become `***`, the query
/// `?***`, and each path segment longer than 12 characters keeps its first 4
/// (tokens often live there); scheme, host and port are kept.
pub fn shown(url: &url::Url) -> String {
    let mut out = format!("{}://", url.scheme());
    if !url.username().is_empty() || url.password().is_some() {
        out.push_str("***@");
    }
    out.push_str(url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        out.push_str(&format!(":{port}"));
    }
    if !matches!(url.path(), "" | "/") {
        for segment in url.path().trim_start_matches('/').split('/') {
            out.push('/');
            if segment.chars().count() > 12 {
                out.extend(segment.chars().take(4));
                out.push_str("***");
            } else {
                out.push_str(segment);
            }
        }
    }
    if url.query().is_some() {
        out.push_str("?***");
    }
    out
}

/// Whether `addr` is a public address, which drains reach whatever the
/// operator allows.
pub fn public(addr: IpAddr) -> bool {
    kind(addr) == Kind::Public
}

/// Sorts `addr`; an IPv4 address written as IPv6 counts as itself.
fn kind(addr: IpAddr) -> Kind {
    match addr {
        IpAddr::V4(v4) => kind_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => kind_v4(v4),
            None => kind_v6(v6),
        },
    }
}

/// Metadata addresses outside link-local, refused before their ranges
/// (private, shared or public) are looked at.
fn metadata_v4(ip: Ipv4Addr) -> bool {
    METADATA_V4.split(", ").any(|m| m.parse() == Ok(ip))
}

fn kind_v4(ip: Ipv4Addr) -> Kind {
    let [a, b, c, _] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b);
    // IETF protocol assignments (192.0.0.0/24) and benchmarking (198.18.0.0/15).
    let reserved = (a == 192 && b == 0 && c == 0) || (a == 198 && (b & 0xfe) == 18) || a == 0 || a >= 240;
    if metadata_v4(ip)
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || reserved
    {
        Kind::Never
    } else if ip.is_loopback() {
        Kind::Loopback
    } else if ip.is_private() || shared {
        Kind::Private
    } else {
        Kind::Public
    }
}

fn kind_v6(ip: Ipv6Addr) -> Kind {
    let first = ip.segments()[0];
    let unique_local = first & 0xfe00 == 0xfc00;
    let link_local = first & 0xffc0 == 0xfe80;
    // NAT64 and 6to4 embed an IPv4 address that may be private or metadata.
    let embeds_v4 = first == 0x0064 || first == 0x2002;
    let metadata = METADATA_V6.split(", ").any(|m| m.parse() == Ok(ip));
    if metadata || ip.is_unspecified() || ip.is_multicast() || link_local || embeds_v4 {
        Kind::Never
    } else if ip.is_loopback() {
        Kind::Loopback
    } else if unique_local {
        Kind::Private
    } else {
        Kind::Public
    }
}

/// The addresses `host:port` resolves to that the policy lets the receiver
/// reach; an error names the first refused one when none is left.
pub async fn resolve(host: &str, port: u16, reach: Reach) -> std::io::Result<Vec<SocketAddr>> {
    let all: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let (ok, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = all.into_iter().partition(|a| reach.allows(a.ip()));
    match (ok.is_empty(), refused.first()) {
        (true, Some(first)) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{host} resolves to {}, which drains may not reach {}", first.ip(), Reach::flag_for(first.ip())),
        )),
        _ => Ok(ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_shown_without_their_secrets() {
        assert_eq!(
            Target::parse("syslog+tls://logs.example.com:6514", Reach::default()),
            Ok(Target::Syslog { tls: true, host: "logs.example.com".into(), port: 6514 })
        );
        assert_eq!(
            Target::parse("syslog+tcp://logs.example.com", Reach::default()),
            Ok(Target::Syslog { tls: false, host: "logs.example.com".into(), port: 514 })
        );
        let url = url::Url::parse("https://user:s3cr3t@in.example.com:8443/v1/abcdefghijklmnopq/x?token=s3cr3t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shown(&url), "https://***@in.example.com:8443/v1/abcd***/x?***");
        assert!(matches!(
            Target::parse("https://user:s3cr3t@in.example.com/x", Reach::default()),
            Ok(Target::Https(u)) if u.password() == Some("s3cr3t")
        ));
    }

    #[test]
    fn bad_urls_say_what_to_write_and_never_echo_credentials() {
        let e = Target::parse("http://user:s3cr3t@in.example.com/x", Reach::default()).unwrap_err().to_string();
        assert_eq!(
            e,
            "the drain URL's scheme is \"http\"; write syslog+tls://HOST:PORT, syslog+tcp://HOST:PORT or \
             https://HOST/PATH (plain http is refused: logs hold what apps print)"
        );
        let e =
            Target::parse("syslog+tls://user:s3cr3t@logs.example.com:6514", Reach::default()).unwrap_err().to_string();
        assert_eq!(
            e,
            "a syslog drain takes no user, password, path or query (syslog+tls://***@logs.example.com:6514); write \
             syslog+tls://HOST:PORT"
        );
        assert!(!e.contains("s3cr3t"));
        assert!(Target::parse("logs.example.com:6514", Reach::default()).is_err());
    }

    const BOTH: Reach = Reach { private: true, loopback: true };

    #[test]
    fn private_targets_need_allow_private_and_loopback_needs_allow_loopback() {
        let private = Reach { private: true, loopback: false };
        let loopback = Reach { private: false, loopback: true };
        for url in [
            "syslog+tcp://10.1.2.3:514",
            "https://192.168.1.1/x",
            "https://172.16.0.1/x",
            "https://100.64.0.1/x",
            "https://[fd00::1]/x",
            "https://[::ffff:10.0.0.1]/x",
        ] {
            let e = Target::parse(url, Reach::default()).unwrap_err();
            assert!(matches!(e, TargetError::Private { flag, .. } if flag.contains("--drain-allow-private")), "{url}");
            assert!(Target::parse(url, loopback).is_err(), "{url} needs allow-private");
            assert!(Target::parse(url, private).is_ok(), "{url} allowed");
        }
        for url in [
            "syslog+tls://127.0.0.1:6514",
            "https://127.8.9.10/x",
            "https://[::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://localhost/x",
            "https://api.localhost/x",
        ] {
            let e = Target::parse(url, private).unwrap_err();
            assert!(matches!(e, TargetError::Private { flag, .. } if flag.contains("--drain-allow-loopback")), "{url}");
            assert!(Target::parse(url, loopback).is_ok(), "{url} allowed");
        }
        let e = Target::parse("https://10.1.2.3/x", Reach::default()).unwrap_err().to_string();
        assert_eq!(
            e,
            "the drain URL https://10.1.2.3/x reaches 10.1.2.3, which is not a public address; drains may not go \
             there unless the operator starts the receiver with --drain-allow-private"
        );
        assert!(public("93.184.216.34".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(public("2606:2800:220:1:248:1893:25c8:1946".parse().unwrap_or_else(|e| panic!("{e}"))));
    }

    /// D2: metadata and link-local stay closed with every flag on.
    #[test]
    fn metadata_link_local_and_reserved_targets_are_refused_whatever_is_allowed() {
        for url in [
            "https://169.254.169.254/latest/meta-data",
            "https://169.254.1.1/x",
            "https://[fd00:ec2::254]/latest/meta-data",
            "https://100.100.100.200/latest/meta-data",
            "https://168.63.129.16/machine",
            "https://[::ffff:169.254.169.254]/x",
            "https://[fe80::1]/x",
            "https://0.0.0.0/x",
            "https://[::]/x",
            "https://192.0.0.170/x",
            "https://198.18.0.1/x",
            "https://240.0.0.1/x",
            "https://[64:ff9b::a9fe:a9fe]/x",
            "https://[2002:a9fe:a9fe::1]/x",
            "syslog+tcp://224.0.0.1:514",
        ] {
            let e = Target::parse(url, BOTH).unwrap_err();
            assert!(
                matches!(&e, TargetError::Private { flag, .. } if flag.starts_with("whatever the receiver allows")),
                "{url}: {e}"
            );
        }
        let e = Target::parse("https://168.63.129.16/machine", BOTH).unwrap_err().to_string();
        assert_eq!(
            e,
            "the drain URL https://168.63.129.16/machine reaches 168.63.129.16, which is not a public address; drains \
             may not go there whatever the receiver allows (link-local, metadata or reserved)"
        );
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_at_connection() {
        let private = Reach { private: true, loopback: false };
        let e = resolve("localhost", 6514, private).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(e.to_string().starts_with("localhost resolves to "), "{e}");
        assert!(e.to_string().ends_with("--drain-allow-loopback"), "{e}");
        assert!(!resolve("localhost", 6514, BOTH).await.unwrap_or_default().is_empty());
    }
}
