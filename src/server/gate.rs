//! Limits before admission: what a socket may cost before its request is read and
//! answered, when admission's own limits (per connection, per address) cannot apply yet.
//!
//! Invariants:
//! - a connection is *pending* while its request head is read or answered by a short
//!   answer (204, 503, an error, a route served by hyper), and on a kept-alive connection
//!   between requests; it stops being pending when a connect request goes on to be
//!   admitted (admission counts it from then on). Pending connections are capped per
//!   client address (`MAX_PENDING_PER_ADDRESS`; trusted proxies, which carry many
//!   clients, only by the global cap) and in the process (`MAX_PENDING_CONNECTIONS`):
//!   one over a cap is closed as soon as it is accepted, and counted;
//! - a reserve of descriptors (`FD_RESERVE`) stays below the process's open-file limit:
//!   once the sockets held (pending and admitted) reach the limit less the reserve, a new
//!   connection is served only within the reserve, with a short head deadline, and only
//!   for what costs nothing to keep: health, version, metrics and every refusal. So the
//!   gateway can always answer, refuse, and serve its health checks;
//! - a connection's head deadline is set once, when it is accepted: requests kept alive
//!   on one connection share it, so a connection that never streams cannot be kept open
//!   by a request every few seconds.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::admission::Admission;
use crate::metrics::Metrics;

/// What the gate allows.
#[derive(Clone, Copy, Debug)]
pub struct GateLimits {
    /// Pending connections in the process (MAX_PENDING_CONNECTIONS).
    pub max_pending: usize,
    /// Pending connections from one address (MAX_PENDING_PER_ADDRESS).
    pub max_pending_per_address: usize,
    /// Sockets the process may hold before only the reserve is left: the open-file
    /// limit less FD_RESERVE (and the descriptors the process needs for itself).
    pub sockets: usize,
    /// Descriptors kept for health checks and refusals (FD_RESERVE).
    pub reserve: usize,
}

/// How a new connection is let in.
pub enum Entry {
    /// Served as usual.
    Open(Pending),
    /// Within the reserve: a short head deadline, no stream.
    Reserve(Pending),
    /// Closed at once.
    Refused,
}

/// The process's pending connections.
pub struct Gate {
    limits: GateLimits,
    pending: AtomicUsize,
    by_address: DashMap<IpAddr, usize>,
    /// Admitted connections count against the descriptors too.
    admission: Arc<Admission>,
    /// Addresses whose connections carry many clients (TRUSTED_PROXIES).
    trusted: Vec<ipnet::IpNet>,
    metrics: Metrics,
}

impl Gate {
    pub fn new(
        limits: GateLimits,
        admission: Arc<Admission>,
        trusted: Vec<ipnet::IpNet>,
        metrics: Metrics,
    ) -> Arc<Self> {
        metrics.set_limit("pending_connections", limits.max_pending);
        metrics.set_limit("sockets", limits.sockets);
        Arc::new(Self {
            limits,
            pending: AtomicUsize::new(0),
            by_address: DashMap::new(),
            admission,
            trusted,
            metrics,
        })
    }

    /// Lets a connection from `peer` in (see the module doc).
    pub fn enter(self: &Arc<Self>, peer: IpAddr) -> Entry {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        let held = self.pending.load(Ordering::Acquire) + self.admission.open();
        let reserve = held >= self.limits.sockets;
        if held >= self.limits.sockets + self.limits.reserve {
            return self.refuse("no_descriptors");
        }
        let cap = self.limits.max_pending;
        let taken = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            });
        if taken.is_err() {
            return self.refuse("pending_connections");
        }
        let per_address = !self.trusted.iter().any(|n| n.contains(&peer));
        if per_address {
            let mut n = self.by_address.entry(peer).or_insert(0);
            if *n >= self.limits.max_pending_per_address {
                drop(n);
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return self.refuse("pending_per_address");
            }
            *n += 1;
        }
        self.metrics.connections_pending.inc();
        let pending = Pending {
            gate: self.clone(),
            peer: per_address.then_some(peer),
        };
        match reserve {
            false => Entry::Open(pending),
            true => Entry::Reserve(pending),
        }
    }

    fn refuse(&self, reason: &'static str) -> Entry {
        self.metrics.refused(reason);
        Entry::Refused
    }

    fn leave(&self, peer: Option<IpAddr>) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections_pending.dec();
        if let Some(peer) = peer {
            self.by_address.remove_if_mut(&peer, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

/// A pending connection; dropping it (the connection closes, or goes on to admission)
/// frees its place.
pub struct Pending {
    gate: Arc<Gate>,
    /// The address it counts against (`None`: a trusted proxy's).
    peer: Option<IpAddr>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.gate.leave(self.peer);
    }
}

/// The process's soft limit on open files, from `/proc/self/limits` (Linux); `None`
/// elsewhere or if it is unlimited.
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::AdmissionLimits;

    fn gate(limits: GateLimits) -> Arc<Gate> {
        let metrics = Metrics::new();
        let admission = Admission::new(AdmissionLimits::default(), metrics.clone());
        Gate::new(
            limits,
            admission,
            vec!["10.0.0.0/8".parse().expect("net")],
            metrics,
        )
    }

    fn open(entry: Entry) -> Pending {
        match entry {
            Entry::Open(p) => p,
            Entry::Reserve(_) => panic!("in the reserve"),
            Entry::Refused => panic!("refused"),
        }
    }

    #[test]
    fn pending_connections_are_capped_per_address_and_in_all() {
        let g = gate(GateLimits {
            max_pending: 5,
            max_pending_per_address: 2,
            sockets: 100,
            reserve: 10,
        });
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        let proxy: IpAddr = "10.0.0.1".parse().expect("ip");
        let held_a = [open(g.enter(a)), open(g.enter(a))];
        assert!(matches!(g.enter(a), Entry::Refused), "per address");
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().expect("ip");
        assert!(
            matches!(g.enter(mapped), Entry::Refused),
            "the same address"
        );
        let _b = open(g.enter(b));
        let _p = [open(g.enter(proxy)), open(g.enter(proxy))];
        assert!(matches!(g.enter(proxy), Entry::Refused), "in all");
        drop(held_a);
        let _again = open(g.enter(a));
        assert_eq!(
            g.by_address.len(),
            2,
            "addresses with nothing pending are forgotten"
        );
    }

    #[test]
    fn near_the_descriptor_limit_only_the_reserve_is_left() {
        let g = gate(GateLimits {
            max_pending: 100,
            max_pending_per_address: 100,
            sockets: 3,
            reserve: 2,
        });
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let _held = [open(g.enter(a)), open(g.enter(a)), open(g.enter(a))];
        let in_reserve = [g.enter(a), g.enter(a)];
        assert!(in_reserve.iter().all(|e| matches!(e, Entry::Reserve(_))));
        assert!(
            matches!(g.enter(a), Entry::Refused),
            "the reserve is used up"
        );
    }
}
