//! Admission of SSE connections and of what they ask for: at most `max` connections in
//! the process, at most `per_address` from one client address; the connections of one
//! address may together hold at most so many bindings and so many distinct exchanges (so
//! that one address cannot use up the global caps every other client needs); and new
//! subscriptions from one address come at a bounded rate (a token bucket).
//!
//! Invariants:
//! - a [`Slot`] is held for exactly as long as its connection streams (or waits for
//!   `ready`); the `connections_open` gauge and each address's count follow the slots;
//! - what a connection holds of its address's share (its bindings and exchanges) is a
//!   [`Share`], charged for as long as the subscription is held: it can leave the slot
//!   ([`Slot::take_share`]) to be held with the subscription, which keeps it while it
//!   lingers for a resumable reconnect after its last client left;
//! - an address's state exists only while it has a connection open or a bucket not yet
//!   refilled (the rate must hold across connections: each connection makes one
//!   subscription, so an address that connects, subscribes and leaves in a loop would
//!   otherwise start every time with a full bucket): memory follows the addresses in use
//!   in the last `burst / rate` seconds, never the addresses ever seen;
//! - a client's address is the TCP peer's, unless the peer is a trusted proxy
//!   (`TRUSTED_PROXIES`): then it is the last address in `X-Forwarded-For` (or in
//!   `Forwarded`'s `for=` parameters, with `FORWARDED_HEADER=forwarded`: one header is
//!   read, the one the proxies write, since a client can write the other) that is not a
//!   trusted proxy itself (what a chain of trusted proxies appended). The walk from the
//!   right ends at an entry that is not an address (`unknown`, garbage): the request then
//!   counts as the nearest address that was one, so an entry a client wrote itself is
//!   never believed past one that no trusted proxy could have written. Entries may carry
//!   a port (`ip:port`, `[v6]:port`); an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, how
//!   a dual-stack listener sees an IPv4 peer) is its IPv4 address. An IPv6 client counts
//!   by its /64, which one host usually holds whole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use ipnet::IpNet;

use crate::metrics::Metrics;

/// What admission allows.
#[derive(Clone, Debug)]
pub struct AdmissionLimits {
    /// Connections in the process (MAX_CONNECTIONS).
    pub max_connections: usize,
    /// Connections from one address (MAX_CONNECTIONS_PER_ADDRESS).
    pub per_address: usize,
    /// New subscriptions one address may create per second (ADDRESS_SUBSCRIPTION_RATE).
    pub subscription_rate: f64,
    /// ... and at once after a quiet spell (ADDRESS_SUBSCRIPTION_BURST).
    pub subscription_burst: f64,
    /// Bindings the connections of one address may hold together, counted per
    /// connection (MAX_BINDINGS_PER_ADDRESS).
    pub bindings_per_address: usize,
    /// Distinct exchanges the connections of one address may use together
    /// (MAX_EXCHANGES_PER_ADDRESS).
    pub exchanges_per_address: usize,
    /// Proxies whose forwarding header is believed (TRUSTED_PROXIES).
    pub trusted_proxies: Vec<IpNet>,
    /// The header those proxies write the client's address into (FORWARDED_HEADER).
    pub forwarded_header: ForwardedHeader,
}

/// The header trusted proxies append the client's address to. Only that one is read:
/// behind a proxy that writes one of them, a client can write the other, whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1` (what most proxies and ingresses write).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[v6]:port"`.
    Forwarded,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_connections: 15_000,
            per_address: 1_000,
            subscription_rate: 5.0,
            subscription_burst: 50.0,
            bindings_per_address: 5_000,
            exchanges_per_address: 50,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
        }
    }
}

/// Why an address may not hold what a connection asks for. `Display` is the text sent
/// to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverShare {
    #[error(
        "The connections from your address hold too many bindings (at most {0} together); close some first"
    )]
    Bindings(usize),
    #[error(
        "The connections from your address use too many exchanges (at most {0} together); close some first"
    )]
    Exchanges(usize),
}

impl OverShare {
    /// The reason label of `events_gateway_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            OverShare::Bindings(_) => "address_bindings",
            OverShare::Exchanges(_) => "address_exchanges",
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// MAX_CONNECTIONS connections are open.
    Process,
    /// MAX_CONNECTIONS_PER_ADDRESS connections are open from this address.
    Address,
}

/// A client address as admission counts it (an IPv6 address by its /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
            v4 => Self(v4),
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// One address's connections, what they hold, and its subscription tokens.
struct AddressState {
    connections: usize,
    /// Bindings its connections hold, each counted per connection.
    bindings: usize,
    /// The exchanges its connections use, with how many connections use each.
    exchanges: HashMap<Arc<str>, usize>,
    tokens: f64,
    refilled_at: Instant,
}

impl AddressState {
    /// The bucket refilled to `now` (and its clock moved to `now`).
    fn refill(&mut self, now: Instant, limits: &AdmissionLimits) {
        let add = now.duration_since(self.refilled_at).as_secs_f64() * limits.subscription_rate;
        self.tokens = (self.tokens + add).min(limits.subscription_burst);
        self.refilled_at = now;
    }

    /// Nothing to remember: no connection, no share charged, and a full bucket.
    fn idle(&mut self, now: Instant, limits: &AdmissionLimits) -> bool {
        self.refill(now, limits);
        self.connections == 0
            && self.bindings == 0
            && self.exchanges.is_empty()
            && self.tokens >= limits.subscription_burst
    }
}

/// Admissions between two sweeps of idle addresses.
const SWEEP_EVERY: usize = 1024;

/// The process's admission state.
pub struct Admission {
    open: AtomicUsize,
    limits: AdmissionLimits,
    addresses: DashMap<ClientKey, AddressState>,
    /// Admissions since the last sweep.
    since_sweep: AtomicUsize,
    metrics: Metrics,
}

impl Admission {
    pub fn new(limits: AdmissionLimits, metrics: Metrics) -> Arc<Self> {
        metrics.connections_limit.set(limits.max_connections as i64);
        Arc::new(Self {
            open: AtomicUsize::new(0),
            limits,
            addresses: DashMap::new(),
            since_sweep: AtomicUsize::new(0),
            metrics,
        })
    }

    /// Takes a connection slot for `client`, or says which limit is reached.
    pub fn try_take(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Full> {
        if self.since_sweep.fetch_add(1, Ordering::Relaxed) >= SWEEP_EVERY {
            self.since_sweep.store(0, Ordering::Relaxed);
            let now = Instant::now();
            self.addresses
                .retain(|_, state| !state.idle(now, &self.limits));
        }
        let key = ClientKey::of(client);
        let taken = {
            let mut state = self.addresses.entry(key).or_insert_with(|| AddressState {
                connections: 0,
                bindings: 0,
                exchanges: HashMap::new(),
                tokens: self.limits.subscription_burst,
                refilled_at: Instant::now(),
            });
            if state.connections >= self.limits.per_address {
                Err(Full::Address)
            } else {
                let process = self
                    .open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.limits.max_connections).then_some(n + 1)
                    });
                match process {
                    Ok(_) => {
                        state.connections += 1;
                        Ok(())
                    }
                    Err(_) => Err(Full::Process),
                }
            }
        };
        if let Err(full) = taken {
            let now = Instant::now();
            self.addresses
                .remove_if_mut(&key, |_, state| state.idle(now, &self.limits));
            return Err(full);
        }
        self.metrics.connections_open.inc();
        Ok(Slot::new(self.clone(), key))
    }

    /// Takes a token for a new subscription from `client`'s bucket. Returns whether there
    /// was one.
    pub fn allow_new_subscription(&self, client: ClientKey) -> bool {
        let Some(mut state) = self.addresses.get_mut(&client) else {
            return true;
        };
        state.refill(Instant::now(), &self.limits);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// At `MAX_CONNECTIONS`: the next connect gets 503.
    pub fn full(&self) -> bool {
        self.open() >= self.limits.max_connections
    }

    /// Addresses with state held now.
    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.addresses.len()
    }
}

mod forwarded;
mod slot;

pub use slot::Slot;

#[cfg(test)]
mod tests;
