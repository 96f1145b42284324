//! Network isolation: sandboxes share the host's network namespace (so they can
//! bind their loopback port and reach their database), and an nftables table of
//! our own, matched on the apps' uid range, keeps them off everything else on
//! this host: other apps' ports, the receiver's API, the router, the cloud metadata
//! services (169.254.169.254 and the others in `METADATA_V4`). The internet
//! stays reachable.
//!
//! Rules, in order, for packets leaving a socket owned by an app uid: replies
//! on connections others opened to the app pass; new connections to a local
//! address pass only to the database port (and to port 53 with
//! `--allow-host-dns`); every other local address is refused (a TCP reset, so
//! clients fail at once instead of timing out); cloud metadata addresses are
//! refused; the host's resolvers pass on port 53 with `--allow-host-dns`; the
//! operator's `--allow-egress` ranges pass; private, shared (CGNAT), link-local
//! and unique-local destinations are refused: the host's neighbours, its VPC
//! and its management network are not the internet.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

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

/// An address range, `10.0.0.0/8` or `fd00::/8`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A range that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an address range; write it like 10.1.0.0/16 or fd00:1::/32")]
    Syntax(String),
    #[error("{0:?} has bits set after its prefix; write the range's first address ({1})")]
    HostBits(String, Cidr),
}

impl Cidr {
    fn bits(addr: IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ((net, width), (value, other)) = (Cidr::bits(self.addr), Cidr::bits(ip));
        let shift = u32::from(width - self.prefix);
        width == other && net.checked_shr(shift).unwrap_or(0) == value.checked_shr(shift).unwrap_or(0)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        let (value, width) = Cidr::bits(addr);
        if prefix > width {
            return Err(syntax());
        }
        let host = if prefix == width { 0 } else { (1u128 << (width - prefix)) - 1 };
        if value & host != 0 {
            let first = match addr {
                IpAddr::V4(_) => IpAddr::V4(((value & !host) as u32).into()),
                IpAddr::V6(_) => IpAddr::V6((value & !host).into()),
            };
            return Err(CidrError::HostBits(s.to_owned(), Cidr { addr: first, prefix }));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Destinations closed to apps unless the operator allows them: private
/// (RFC 1918), shared address space (CGNAT, RFC 6598), link-local, multicast
/// and broadcast (mDNS, SSDP, LLMNR reach the LAN's neighbours), and IPv6
/// unique-local, link-local, multicast and the NAT64 prefixes (which reach
/// private IPv4 hosts through a NAT64 gateway).
pub const PRIVATE_V4: &str =
    "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, 169.254.0.0/16, 224.0.0.0/4, 255.255.255.255";
pub const PRIVATE_V6: &str = "fc00::/7, fe80::/10, ff00::/8, 64:ff9b::/96, 64:ff9b:1::/48";
/// Addresses that hand out the host's credentials or control its agent
/// (AWS/GCP/Azure metadata, Azure's WireServer, Alibaba's metadata inside
/// the shared range an operator may open for a VPN): closed whatever is
/// allowed, to apps and to log drains alike.
pub const METADATA_V4: &str = "169.254.169.254, 168.63.129.16, 100.100.100.200";
/// AWS's IPv6 metadata address, closed the same way.
pub const METADATA_V6: &str = "fd00:ec2::254";

/// The nameservers a resolv.conf names.
pub fn nameservers(resolv: &str) -> Vec<IpAddr> {
    resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .collect()
}

/// Resolvers for sandboxes when none of the host's is reachable for them.
const PUBLIC_RESOLVERS: &str = "nameserver 1.1.1.1\nnameserver 9.9.9.9\n";

/// The name of the table of the receiver whose apps start at `uid_first`.
fn table_name(uid_first: u32) -> String {
    format!("nx_sandbox_{uid_first}")
}

/// Removes the table of the receiver whose apps start at `uid_first`, once
/// no sandbox of it runs (`nx-receiver stop-all`): it outlives the receiver
/// with the apps it confines. A table that is not there is no error.
pub async fn remove_table(pm: &ProcessManager, uid_first: u32) {
    if !std::path::Path::new(NFT).exists() {
        return;
    }
    let out = pm.output(Command::new(NFT).args(["delete", "table", "inet"]).arg(table_name(uid_first))).await;
    if let Ok(o) = out {
        if !o.status.success() && !o.last_words().contains("No such file or directory") {
            tracing::warn!(error = %o.last_words(), "cannot remove the nftables table");
        }
    }
}

/// The table for one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub uid_first: u32,
    pub db_port: u16,
    /// Ranges apps may reach although they are private (`--allow-egress`).
    pub allow_egress: Vec<Cidr>,
    /// The host's resolvers apps may ask on port 53 (`--allow-host-dns`):
    /// local addresses and these, the nameservers of its resolv.conf.
    pub host_dns: Option<Vec<IpAddr>>,
}

impl Policy {
    fn table(&self) -> String {
        table_name(self.uid_first)
    }

    /// The ruleset: creates the table if missing, deletes it, and defines it
    /// anew, all in one nft transaction, so applying it twice is harmless and
    /// no packet ever sees half a table.
    pub fn ruleset(&self) -> String {
        let t = self.table();
        let last = self.uid_first + UID_SPAN - 1;
        let mut rules = vec![
            format!("meta skuid != {}-{last} accept", self.uid_first),
            "ct state established,related accept".to_owned(),
            format!("fib daddr type local tcp dport {} accept", self.db_port),
        ];
        if let Some(resolvers) = &self.host_dns {
            rules.push("fib daddr type local meta l4proto { tcp, udp } th dport 53 accept".to_owned());
            for ip in resolvers {
                let family = if ip.is_ipv4() { "ip" } else { "ip6" };
                rules.push(format!("{family} daddr {ip} meta l4proto {{ tcp, udp }} th dport 53 accept"));
            }
        }
        rules.push("fib daddr type local meta l4proto tcp reject with tcp reset".to_owned());
        rules.push("fib daddr type local reject with icmpx admin-prohibited".to_owned());
        // Cloud metadata stays closed whatever else is allowed: it hands out
        // the host's credentials.
        rules.push(format!("ip daddr {{ {METADATA_V4} }} reject with icmpx admin-prohibited"));
        rules.push(format!("ip6 daddr {{ {METADATA_V6} }} reject with icmpx admin-prohibited"));
        // One rule per range: overlapping ranges in one set are an nft error.
        for range in &self.allow_egress {
            let family = if range.is_v4() { "ip" } else { "ip6" };
            rules.push(format!("{family} daddr {range} accept"));
        }
        rules.push(format!("ip daddr {{ {PRIVATE_V4} }} reject with icmpx admin-prohibited"));
        rules.push(format!("ip6 daddr {{ {PRIVATE_V6} }} reject with icmpx admin-prohibited"));
        let body: String = rules.iter().map(|r| format!("\t\t{r}\n")).collect();
        format!(
            "table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             {body}\
             \t}}\n\
             }}\n"
        )
    }

    /// Whether an app may send DNS queries to `ip`.
    fn reaches_dns(&self, ip: IpAddr) -> bool {
        if self.host_dns.as_ref().is_some_and(|r| r.contains(&ip)) {
            return true;
        }
        let private = PRIVATE_V4.split(", ").chain(PRIVATE_V6.split(", ")).filter_map(|r| r.parse::<Cidr>().ok());
        let closed = ip.is_loopback() || ip.is_unspecified() || private.into_iter().any(|r| r.contains(ip));
        !closed || self.allow_egress.iter().any(|r| r.contains(ip))
    }

    /// The resolv.conf sandboxes get, given the host's: the host's own with
    /// `--allow-host-dns`, else only the nameservers apps can reach, else
    /// public resolvers (a resolver they could not reach would make every
    /// lookup wait for its timeout).
    pub fn resolv_conf(&self, host: &str) -> String {
        if self.host_dns.is_some() {
            return host.to_owned();
        }
        let reachable: String = nameservers(host)
            .into_iter()
            .filter(|ip| self.reaches_dns(*ip))
            .map(|ip| format!("nameserver {ip}\n"))
            .collect();
        if reachable.is_empty() {
            PUBLIC_RESOLVERS.to_owned()
        } else {
            reachable
        }
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

    /// The report line every deployment carries.
    pub fn enforcement(&self) -> Enforcement {
        let mut value = format!("local ports closed except the database ({})", self.db_port);
        value.push_str(if self.host_dns.is_some() { " and DNS" } else { "" });
        value.push_str("; private, CGNAT, link-local and unique-local addresses closed");
        if !self.allow_egress.is_empty() {
            let ranges: Vec<String> = self.allow_egress.iter().map(Cidr::to_string).collect();
            value.push_str(&format!(" except {}", ranges.join(", ")));
        }
        Enforcement::enforced("network", value, "nftables")
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

    fn policy() -> Policy {
        Policy { uid_first: 700_000, db_port: 54320, allow_egress: vec![], host_dns: None }
    }

    #[test]
    fn ruleset_matches_only_this_receivers_uids() {
        let r = policy().ruleset();
        assert!(r.starts_with("table inet nx_sandbox_700000\ndelete table inet nx_sandbox_700000\n"), "{r}");
        assert!(r.contains("meta skuid != 700000-765535 accept"), "{r}");
        assert!(r.contains("tcp dport 54320 accept"), "{r}");
        let established = r.find("ct state established").unwrap();
        let refuse = r.find("reject with tcp reset").unwrap();
        assert!(established < refuse, "replies pass before anything is refused");
        assert!(r.contains("ip daddr { 169.254.169.254, 168.63.129.16, 100.100.100.200 } reject"));
    }

    #[test]
    fn private_ranges_and_host_dns_are_closed_by_default() {
        let r = policy().ruleset();
        assert!(
            r.contains(
                "\t\tip daddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, 169.254.0.0/16, \
                 224.0.0.0/4, 255.255.255.255 } reject with icmpx admin-prohibited\n"
            ),
            "{r}"
        );
        assert!(
            r.contains(
                "\t\tip6 daddr { fc00::/7, fe80::/10, ff00::/8, 64:ff9b::/96, 64:ff9b:1::/48 } \
                 reject with icmpx admin-prohibited\n"
            ),
            "{r}"
        );
        assert!(!r.contains("dport 53"), "no DNS unless allowed: {r}");
        assert!(!r.contains(" accept\n\t\tip daddr {"), "nothing allowed before the private ranges: {r}");
    }

    #[test]
    fn allowed_ranges_and_resolvers_pass_before_the_private_ranges_close() {
        let p = Policy {
            allow_egress: vec!["10.20.0.0/16".parse().unwrap(), "fd00:1::/32".parse().unwrap()],
            host_dns: Some(vec!["10.255.255.53".parse().unwrap()]),
            ..policy()
        };
        let r = p.ruleset();
        let at = |needle: &str| r.find(needle).unwrap_or_else(|| panic!("{needle:?} missing from {r}"));
        let closed = at("ip daddr { 10.0.0.0/8");
        assert!(at("\t\tip daddr 10.20.0.0/16 accept\n") < closed);
        assert!(at("\t\tip6 daddr fd00:1::/32 accept\n") < at("ip6 daddr { fc00::/7"));
        assert!(at("fib daddr type local meta l4proto { tcp, udp } th dport 53 accept") < at("tcp reset"));
        assert!(at("\t\tip daddr 10.255.255.53 meta l4proto { tcp, udp } th dport 53 accept\n") < closed);
        // Metadata stays closed even inside an allowed range.
        assert!(at("ip daddr { 169.254.169.254, 168.63.129.16, 100.100.100.200 } reject") < at("10.20.0.0/16 accept"));
        assert!(p.enforcement().value.ends_with(" except 10.20.0.0/16, fd00:1::/32"), "{:?}", p.enforcement());
    }

    #[test]
    fn sandboxes_get_only_resolvers_they_can_reach() {
        let host = "# generated\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver 8.8.8.8\noptions edns0\n";
        assert_eq!(nameservers(host).len(), 3);
        assert_eq!(policy().resolv_conf(host), "nameserver 8.8.8.8\n");
        assert_eq!(policy().resolv_conf("nameserver 127.0.0.53\nnameserver fe80::1%eth0\n"), PUBLIC_RESOLVERS);
        let allowed = Policy { allow_egress: vec!["10.255.0.0/16".parse().unwrap()], ..policy() };
        assert_eq!(allowed.resolv_conf(host), "nameserver 10.255.255.53\nnameserver 8.8.8.8\n");
        let host_dns = Policy { host_dns: Some(nameservers(host)), ..policy() };
        assert_eq!(host_dns.resolv_conf(host), host);
    }

    #[test]
    fn ranges_contain_their_addresses_only() {
        let r: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(r.contains("172.31.255.255".parse().unwrap()));
        assert!(!r.contains("172.32.0.0".parse().unwrap()));
        assert!(!r.contains("::ffff:172.16.0.1".parse().unwrap()), "families never mix");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!("fc00::/7".parse::<Cidr>().unwrap().contains("fd00:ec2::254".parse().unwrap()));
    }

    #[test]
    fn ranges_parse_strictly() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!("192.168.1.7/32".parse::<Cidr>().unwrap().prefix, 32);
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap_err().to_string(),
            "\"10.1.2.3/8\" has bits set after its prefix; write the range's first address (10.0.0.0/8)"
        );
        for bad in ["10.0.0.0", "10.0.0.0/33", "::/129", "ten/8", "10.0.0.0/-1", ""] {
            assert_eq!(bad.parse::<Cidr>(), Err(CidrError::Syntax(bad.to_owned())), "{bad}");
        }
    }
}
