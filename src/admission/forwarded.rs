//! Who a request comes from: the TCP peer, or, behind a trusted proxy, what the proxies
//! appended to `X-Forwarded-For` (see the module doc of `admission`).

use std::net::{IpAddr, Ipv6Addr};

use warp::http::HeaderMap;

use super::Admission;

impl Admission {
    /// The address a request comes from: the peer's, or what trusted proxies say.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        let trusted = |ip: &IpAddr| self.limits.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        // Proxies append: walk from the right past the trusted ones, and stop at the first
        // entry that is not an address (a value that is not text is one such entry).
        let entries: Vec<Option<IpAddr>> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| match v.to_str() {
                Ok(text) => text.split(',').map(forwarded_address).collect(),
                Err(_) => vec![None],
            })
            .collect();
        let mut nearest = peer;
        for entry in entries.iter().rev() {
            let Some(addr) = *entry else {
                break;
            };
            nearest = addr;
            if !trusted(&addr) {
                break;
            }
        }
        nearest
    }
}

/// An address as admission sees it: an IPv4-mapped IPv6 address is its IPv4 address.
pub(super) fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry as an address: `ip`, `ip:port`, `[v6]` or `[v6]:port`;
/// `None` for anything else (`unknown`, an obfuscated identifier, garbage).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let addr = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })?;
    Some(canonical(addr))
}
