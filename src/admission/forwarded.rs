//! Who a request comes from: the TCP peer, or, behind a trusted proxy, what the proxies
//! appended to `X-Forwarded-For` or `Forwarded` (see the module doc of `admission`).
//!
//! Everything left of the nearest proxy's own entry was written by the client, so the
//! reading is built to fail closed: entries are split at every comma, quoted or not (a
//! client's opening quote cannot swallow the proxy's entry), each comma-separated piece is
//! read on its own (bytes that are not text spoil only their piece), and a `Forwarded`
//! element counts only with exactly one well-formed `for=` (RFC 7239 §4 allows one: a
//! second, say from a `Host` the proxy copied after its own `for=`, is refused rather
//! than believed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
        let (name, entry): (_, fn(&str) -> Option<IpAddr>) = match self.limits.forwarded_header {
            ForwardedHeader::XForwardedFor => ("x-forwarded-for", forwarded_address),
            ForwardedHeader::Forwarded => ("forwarded", forwarded_for),
        };
        // Proxies append: walk from the right (the last line, its last piece) past the
        // trusted ones, and stop at the first entry that is not an address.
        let entries = headers.get_all(name).iter().rev().flat_map(|line| {
            line.as_bytes()
                .split(|b| *b == b',')
                .rev()
                .map(move |piece| std::str::from_utf8(piece).ok().and_then(entry))
        });
        let mut nearest = peer;
        for found in entries {
            let Some(addr) = found else {
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

/// One `Forwarded` element's client address (RFC 7239): its one `for=` parameter, a
/// token or a quoted string naming `ipv4[:port]` or `"[ipv6][:port]"`. `None` for an
/// element with no `for=` or more than one, a node that is not an address (`unknown`,
/// an obfuscated `_name`) or a value that does not parse. Other parameters (`by`,
/// `proto`, `host`, extensions, empty pairs) are not read, so an odd one spoils nothing.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let mut values = element.split(';').filter_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then_some(value)
    });
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.trim();
    let node = match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => value,
    };
    if node.contains(['"', '\\']) {
        return None;
    }
    node_address(node).map(canonical)
}

/// An RFC 7239 node's address: `1.2.3.4`, `1.2.3.4:port`, `[v6]` or `[v6]:port`, where
/// a port is up to five digits below 65536 or an obfuscated `_port`.
fn node_address(node: &str) -> Option<IpAddr> {
    let (name, port) = match node.strip_prefix('[') {
        Some(v6) => {
            let (name, rest) = v6.split_once(']')?;
            let port = match rest {
                "" => None,
                rest => Some(rest.strip_prefix(':')?),
            };
            (IpAddr::V6(name.parse::<Ipv6Addr>().ok()?), port)
        }
        None => {
            let (name, port) = match node.split_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (node, None),
            };
            (IpAddr::V4(name.parse::<Ipv4Addr>().ok()?), port)
        }
    };
    let port_ok = port.is_none_or(|p| {
        let obfuscated = p.strip_prefix('_').is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
        let digits = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
        obfuscated || (digits && p.parse::<u16>().is_ok())
    });
    port_ok.then_some(name)
}
