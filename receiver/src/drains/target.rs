//! A drain's URL: what it names (syslog over TCP or TLS, or an HTTPS
//! endpoint), the form the API shows (credentials masked), and where the
//! receiver may connect. The URL is hostile input: the receiver runs on the
//! host's network as root, so a drain must not become a way to reach the
//! host's own services or the private network (SSRF); every address a name
//! resolves to is checked at each connection, not once at `add`, so a name
//! re-pointed later (DNS rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
    #[error(
        "the drain URL {shown} reaches {addr}, a loopback, link-local or private address; drains go to public \
         addresses unless the operator starts the receiver with --drain-allow-private"
    )]
    Private { shown: String, addr: IpAddr },
}

/// Default ports: syslog over TLS (RFC 5425), syslog over TCP.
const SYSLOG_TLS_PORT: u16 = 6514;
const SYSLOG_TCP_PORT: u16 = 514;

impl Target {
    /// Parses `url`; a literal address is checked against the policy at once.
    pub fn parse(url: &str, allow_private: bool) -> Result<Target, TargetError> {
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
        if !allow_private {
            let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
            let named_local = host == "localhost" || host.ends_with(".localhost");
            match literal {
                Some(addr) if !public(addr) => return Err(TargetError::Private { shown, addr }),
                None if named_local => return Err(TargetError::Private { shown, addr: Ipv4Addr::LOCALHOST.into() }),
                _ => {}
            }
        }
        Ok(target)
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

/// Whether the receiver may connect to `addr` without --drain-allow-private:
/// not loopback, link-local, private (RFC 1918, unique local, shared
/// address space), unspecified, multicast or broadcast, nor an IPv4 address
/// of those written as IPv6.
pub fn public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => public_v4(v4),
            None => public_v6(v6),
        },
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b);
    let this_network = a == 0;
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || shared
        || this_network
        || a >= 240)
}

fn public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let unique_local = first & 0xfe00 == 0xfc00;
    let link_local = first & 0xffc0 == 0xfe80;
    // NAT64 and 6to4 embed an IPv4 address that may be private.
    let embeds_v4 = first == 0x0064 || first == 0x2002;
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || unique_local || link_local || embeds_v4)
}

/// The addresses `host:port` resolves to that the policy lets the receiver
/// reach; an error names the first refused one when none is left.
pub async fn resolve(host: &str, port: u16, allow_private: bool) -> std::io::Result<Vec<SocketAddr>> {
    let all: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if allow_private {
        return Ok(all);
    }
    let (ok, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = all.into_iter().partition(|a| public(a.ip()));
    match (ok.is_empty(), refused.first()) {
        (true, Some(first)) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{host} resolves to {}, which drains may not reach (--drain-allow-private)", first.ip()),
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
            Target::parse("syslog+tls://logs.example.com:6514", false),
            Ok(Target::Syslog { tls: true, host: "logs.example.com".into(), port: 6514 })
        );
        assert_eq!(
            Target::parse("syslog+tcp://logs.example.com", false),
            Ok(Target::Syslog { tls: false, host: "logs.example.com".into(), port: 514 })
        );
        let url = url::Url::parse("https://user:s3cr3t@in.example.com:8443/v1/abcdefghijklmnopq/x?token=s3cr3t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shown(&url), "https://***@in.example.com:8443/v1/abcd***/x?***");
        assert!(matches!(
            Target::parse("https://user:s3cr3t@in.example.com/x", false),
            Ok(Target::Https(u)) if u.password() == Some("s3cr3t")
        ));
    }

    #[test]
    fn bad_urls_say_what_to_write_and_never_echo_credentials() {
        let e = Target::parse("http://user:s3cr3t@in.example.com/x", false).unwrap_err().to_string();
        assert_eq!(
            e,
            "the drain URL's scheme is \"http\"; write syslog+tls://HOST:PORT, syslog+tcp://HOST:PORT or \
             https://HOST/PATH (plain http is refused: logs hold what apps print)"
        );
        let e = Target::parse("syslog+tls://user:s3cr3t@logs.example.com:6514", false).unwrap_err().to_string();
        assert_eq!(
            e,
            "a syslog drain takes no user, password, path or query (syslog+tls://***@logs.example.com:6514); write \
             syslog+tls://HOST:PORT"
        );
        assert!(!e.contains("s3cr3t"));
        assert!(Target::parse("logs.example.com:6514", false).is_err());
    }

    #[test]
    fn loopback_link_local_and_private_targets_are_refused_unless_allowed() {
        for url in [
            "syslog+tls://127.0.0.1:6514",
            "syslog+tcp://10.1.2.3:514",
            "https://192.168.1.1/x",
            "https://172.16.0.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://[::1]/x",
            "https://[fe80::1]/x",
            "https://[fd00::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://localhost/x",
            "https://api.localhost/x",
        ] {
            let e = Target::parse(url, false).unwrap_err();
            assert!(matches!(e, TargetError::Private { .. }), "{url}: {e}");
            assert!(Target::parse(url, true).is_ok(), "{url} allowed");
        }
        let e = Target::parse("https://169.254.169.254/latest/meta-data", false).unwrap_err().to_string();
        assert_eq!(
            e,
            "the drain URL https://169.254.169.254/latest/meta-data reaches 169.254.169.254, a loopback, link-local \
             or private address; drains go to public addresses unless the operator starts the receiver with \
             --drain-allow-private"
        );
        assert!(public("93.184.216.34".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(public("2606:2800:220:1:248:1893:25c8:1946".parse().unwrap_or_else(|e| panic!("{e}"))));
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_at_connection() {
        let e = resolve("localhost", 6514, false).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(e.to_string().starts_with("localhost resolves to "), "{e}");
        assert!(!resolve("localhost", 6514, true).await.unwrap_or_default().is_empty());
    }
}
