//! The route table the receiver publishes to the router: which host goes to which
//! sandbox port, or which page to show instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Where the control channel takes a whole new table (`PUT`) or shows the current
/// one (`GET`).
pub const CONTROL_ROUTES_PATH: &str = "/routes";

/// Where the control channel tells when each deployment was last requested
/// (`GET`, an [`Activity`]); the receiver stops previews nobody visits.
pub const CONTROL_ACTIVITY_PATH: &str = "/activity";

/// Where the control channel tells which hosts have a certificate of the
/// receiver's (`GET`, a list of host names): a router restarted from its
/// state file has none until it is sent a table, as certificates are never
/// written to disk.
pub const CONTROL_CERTIFICATES_PATH: &str = "/certificates";

/// Where the receiver long-polls for the sleeping deployments a request is
/// held for (`GET`, a [`WakeRequests`]): the router answers as soon as there
/// is one, or empty after [`WAKES_POLL_SECS`]. Each is handed out once.
pub const CONTROL_WAKES_PATH: &str = "/wakes";

/// The longest a `GET /wakes` waits before answering empty: well within the
/// receiver's timeout on a control request.
pub const WAKES_POLL_SECS: u64 = 5;

/// Sleeping deployments a request waits for: the receiver starts each one
/// that is still `sleeping` in its records, and nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeRequests {
    pub deployments: Vec<String>,
}

/// The path prefix of ACME HTTP-01 challenges (RFC 8555 section 8.3).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// When each deployment last had a request through this router, in Unix
/// seconds; deployments without one since the router started are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub deployments: BTreeMap<String, u64>,
}

/// What a host is served by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// A healthy sandbox listening on this address.
    Live { addr: SocketAddr },
    /// Several healthy replicas of one deployment, each on its own address:
    /// the router balances across them. One healthy replica is sent as
    /// [`Target::Live`], so tables without replicas read as they always did.
    Replicas { addrs: Vec<SocketAddr> },
    /// The deployment is starting: answer 503 with a page that says so.
    Starting,
    /// The deployment was stopped: answer 410 with a page that says so, and
    /// why when the receiver said (idle, pull request closed).
    Stopped {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The deployment failed to start: answer 502 with a page that says so.
    Failed,
    /// The deployment sleeps: hold the request, ask the receiver to wake it
    /// (`GET /wakes`), and forward it once the route is live again.
    Sleeping,
}

/// One host's route; `app` and `deployment` go into the access log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub app: String,
    pub deployment: String,
    pub target: Target,
}

/// The whole table. The receiver always sends the whole table, so a lost update
/// is repaired by the next one and the router needs no merge logic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Increases with every change the receiver makes; the router refuses an
    /// older table than the one it has, so a slow request cannot undo a newer one.
    pub generation: u64,
    /// Lowercase host names without port.
    pub routes: BTreeMap<String, Route>,
    /// ACME HTTP-01 answers: host, then token, then key authorization. The
    /// router answers `/.well-known/acme-challenge/<token>` with it on that host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub challenges: BTreeMap<String, BTreeMap<String, String>>,
    /// Certificates served by SNI. They hold private keys: the router keeps
    /// them in memory and never writes them to its state file; the receiver
    /// sends them with every table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Certificate>,
}

/// A certificate chain and its private key, both PEM, for the hosts it names.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub hosts: Vec<String>,
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate").field("hosts", &self.hosts).field("key_pem", &"<redacted>").finish()
    }
}

/// Normalises a `Host` header value to a table key: lowercase, port and a
/// trailing dot removed.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') && port.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalize_host("Web.LocalHost:8080"), "web.localhost");
        assert_eq!(normalize_host("web.example.com."), "web.example.com");
        assert_eq!(normalize_host("web.localhost"), "web.localhost");
    }

    #[test]
    fn tables_round_trip_as_json() {
        let mut t = RouteTable { generation: 3, ..Default::default() };
        t.routes.insert(
            "web.localhost".into(),
            Route {
                app: "web".into(),
                deployment: "abcdefgh".into(),
                target: Target::Live { addr: "127.0.0.1:20001".parse().unwrap() },
            },
        );
        t.routes.insert(
            "x.localhost".into(),
            Route { app: "x".into(), deployment: "hgfedcba".into(), target: Target::Stopped { reason: None } },
        );
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains(r#""kind":"live""#));
        assert_eq!(serde_json::from_str::<RouteTable>(&json).unwrap(), t);
        let replicas = Target::Replicas { addrs: vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()] };
        let json = serde_json::to_string(&replicas).unwrap();
        assert_eq!(json, r#"{"kind":"replicas","addrs":["127.0.0.1:1","127.0.0.1:2"]}"#);
        assert_eq!(serde_json::from_str::<Target>(&json).unwrap(), replicas);
        // Tables saved before stop reasons existed still load.
        let old: Target = serde_json::from_str(r#"{"kind":"stopped"}"#).unwrap();
        assert_eq!(old, Target::Stopped { reason: None });
    }
}
