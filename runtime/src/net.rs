//! Who a network client is, for the servers that share their connections out
//! per client (nx-router, and the receiver's own API and SSH listeners).

use std::net::{IpAddr, Ipv6Addr};

/// The client a connection is counted against: its IPv4 address (an
/// IPv4-mapped IPv6 one too), or the /64 of an IPv6 address, as a client
/// usually holds a whole /64 and could take one address per connection.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}
