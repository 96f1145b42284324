//! Network isolation: sandboxes share the host's network namespace (so they can
//! bind their loopback port and reach their database), and an nftables table of
//! our own, matched on the apps' uid range, keeps them off everything else on
//! this host: other apps' ports, the receiver's API, the router, the metadata
//! service at 169.254.169.254. The internet stays reachable.
//!
//! Rules, in order, for packets leaving a socket owned by an app uid: replies
//! on connections others opened to the app pass; new connections to a local
//! address pass only to the database port and DNS; every other local address is
//! refused (a TCP reset, so clients fail at once instead of timing out); link-
//! local and cloud metadata addresses are refused.

use nx_protocol::api::Enforcement;
use nx_runtime::process::{Command, ProcessManager};

/// How many uids one receiver hands to apps, starting at its uid base.
pub const UID_SPAN: u32 = 65_536;

const NFT: &str = "/usr/sbin/nft";

/// Failures to install the rules.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("nftables is needed to keep apps off each other's ports and the receiver's API: {NFT} is missing (apt-get install nftables); or start with --network-isolation off to run without that protection")]
    Missing,
    #[error(
        "cannot install the nftables rules: {0}; or start with --network-isolation off to run without that protection"
    )]
    Nft(String),
    #[error(transparent)]
    Spawn(#[from] nx_runtime::process::SpawnError),
}

/// The table for one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub uid_first: u32,
    pub db_port: u16,
}

impl Policy {
    fn table(&self) -> String {
        format!("nx_sandbox_{}", self.uid_first)
    }

    /// The ruleset: creates the table if missing, deletes it, and defines it
    /// anew, all in one nft transaction, so applying it twice is harmless and
    /// no packet ever sees half a table.
    pub fn ruleset(&self) -> String {
        let t = self.table();
        let last = self.uid_first + UID_SPAN - 1;
        format!(
            "table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\tmeta skuid != {first}-{last} accept\n\
             \t\tct state established,related accept\n\
             \t\tfib daddr type local tcp dport {db} accept\n\
             \t\tfib daddr type local meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             \t\tfib daddr type local meta l4proto tcp reject with tcp reset\n\
             \t\tfib daddr type local reject with icmpx admin-prohibited\n\
             \t\tip daddr 169.254.0.0/16 reject with icmpx admin-prohibited\n\
             \t\tip6 daddr {{ fe80::/10, fd00:ec2::254 }} reject with icmpx admin-prohibited\n\
             \t}}\n\
             }}\n",
            first = self.uid_first,
            db = self.db_port,
        )
    }

    /// Installs (or replaces) the table.
    pub async fn install(&self, pm: &ProcessManager) -> Result<(), NetworkError> {
        if !std::path::Path::new(NFT).exists() {
            return Err(NetworkError::Missing);
        }
        let file = std::env::temp_dir().join(format!("nx-nft-{}-{}.nft", self.uid_first, std::process::id()));
        std::fs::write(&file, self.ruleset()).map_err(|e| NetworkError::Nft(e.to_string()))?;
        let out = pm.output(Command::new(NFT).arg("-f").arg(&file)).await;
        let _ = std::fs::remove_file(&file);
        let out = out?;
        if !out.status.success() {
            return Err(NetworkError::Nft(out.last_words()));
        }
        tracing::info!(table = %self.table(), uids = %format!("{}-{}", self.uid_first, self.uid_first + UID_SPAN - 1), "network isolation installed");
        Ok(())
    }

    /// Removes the table (at shutdown, once no sandbox runs).
    pub async fn remove(&self, pm: &ProcessManager) {
        let out = pm.output(Command::new(NFT).args(["delete", "table", "inet"]).arg(self.table())).await;
        if let Ok(o) = out {
            if !o.status.success() {
                tracing::warn!(error = %o.last_words(), "cannot remove the nftables table");
            }
        }
    }

    /// The report line every deployment carries.
    pub fn enforcement(&self) -> Enforcement {
        Enforcement::enforced(
            "network",
            format!("local ports closed except the database ({})", self.db_port),
            "nftables",
        )
    }
}

/// The report line when isolation is switched off.
pub fn not_enforced() -> Enforcement {
    Enforcement::missing(
        "network",
        "local ports closed".into(),
        "--network-isolation off: apps can reach every loopback port of this host",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_matches_only_this_receivers_uids() {
        let r = Policy { uid_first: 700_000, db_port: 54320 }.ruleset();
        assert!(r.starts_with("table inet nx_sandbox_700000\ndelete table inet nx_sandbox_700000\n"), "{r}");
        assert!(r.contains("meta skuid != 700000-765535 accept"), "{r}");
        assert!(r.contains("tcp dport 54320 accept"), "{r}");
        let established = r.find("ct state established").unwrap();
        let refuse = r.find("reject with tcp reset").unwrap();
        assert!(established < refuse, "replies pass before anything is refused");
        assert!(r.contains("169.254.0.0/16 reject"));
    }
}
