//! Who a request comes from: the TCP peer, or, behind a trusted proxy, what the proxies
//! appended to `X-Forwarded-For` or `Forwarded` (see the module doc of `admission`).

use std::net::{IpAddr, Ipv6Addr};

use warp::http::HeaderMap;

use super::{Admission, ForwardedHeader};

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
        let header = self.limits.forwarded_header;
        let name = match header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        let entries: Vec<Option<IpAddr>> = headers
            .get_all(name)
            .iter()
            .flat_map(|v| match (v.to_str(), header) {
                (Ok(text), ForwardedHeader::XForwardedFor) => {
                    text.split(',').map(forwarded_address).collect()
                }
                (Ok(text), ForwardedHeader::Forwarded) => {
                    rfc7239::parse(text).map(forwarded_for).collect()
                }
                (Err(_), _) => vec![None],
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

/// One `Forwarded` element's `for=` as an address; `None` for an element without one, a
/// node that is not an address (`unknown`, an obfuscated `_name`) or one that does not
/// parse. Elements are split at every comma, even one inside a quoted string: only text
/// left of the nearest proxy's own element, which a client wrote, can be cut wrong, and
/// the walk never believes that.
fn forwarded_for(element: Result<rfc7239::Forwarded<'_>, rfc7239::RfcError>) -> Option<IpAddr> {
    let node = element.ok()?.forwarded_for?;
    node.ip().copied().map(canonical)
}
