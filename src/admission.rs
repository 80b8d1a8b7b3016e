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
//!   (`TRUSTED_PROXIES`): then it is the last address in `X-Forwarded-For` that is not a
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
use warp::http::HeaderMap;

use crate::binding::BindingSet;
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
    /// Proxies whose `X-Forwarded-For` is believed (TRUSTED_PROXIES).
    pub trusted_proxies: Vec<IpNet>,
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
        Ok(Slot {
            admission: self.clone(),
            key,
            share: Some(Share {
                admission: self.clone(),
                key,
                bindings: 0,
                exchanges: Vec::new(),
            }),
        })
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

    /// Addresses with state held now.
    pub fn addresses(&self) -> usize {
        self.addresses.len()
    }

    /// A connection closes: the address's state goes with its last connection if nothing
    /// else is charged to it and its bucket is full; otherwise it stays until a sweep
    /// finds it idle.
    fn release_connection(&self, key: ClientKey) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections_open.dec();
        let now = Instant::now();
        self.addresses.remove_if_mut(&key, |_, state| {
            state.connections = state.connections.saturating_sub(1);
            state.idle(now, &self.limits)
        });
    }

    /// A share is no longer held.
    fn release_share(&self, share: &mut Share) {
        let now = Instant::now();
        self.addresses.remove_if_mut(&share.key, |_, state| {
            state.bindings = state.bindings.saturating_sub(share.bindings);
            for exchange in share.exchanges.drain(..) {
                if let Some(n) = state.exchanges.get_mut(&exchange) {
                    *n -= 1;
                    if *n == 0 {
                        state.exchanges.remove(&exchange);
                    }
                }
            }
            state.idle(now, &self.limits)
        });
    }
}

/// An address as admission sees it: an IPv4-mapped IPv6 address is its IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
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

/// One open SSE connection, and (until it is taken) what it holds of its address's
/// share; dropping it frees both.
pub struct Slot {
    admission: Arc<Admission>,
    key: ClientKey,
    share: Option<Share>,
}

/// What one connection holds of its address's share: its bindings and exchanges.
/// Dropping it gives them back.
pub struct Share {
    admission: Arc<Admission>,
    key: ClientKey,
    bindings: usize,
    exchanges: Vec<Arc<str>>,
}

impl Slot {
    /// The address the connection counts against.
    pub fn client(&self) -> ClientKey {
        self.key
    }

    /// Counts `set` against the address's share, or says which share it would pass.
    pub fn hold(&mut self, set: &BindingSet) -> Result<(), OverShare> {
        match &mut self.share {
            Some(share) => share.hold(set),
            None => Ok(()),
        }
    }

    /// What the connection holds of its address's share, to be held elsewhere (with its
    /// subscription) from now on.
    pub fn take_share(&mut self) -> Option<Share> {
        self.share.take()
    }
}

impl Share {
    fn hold(&mut self, set: &BindingSet) -> Result<(), OverShare> {
        let limits = &self.admission.limits;
        let Some(mut state) = self.admission.addresses.get_mut(&self.key) else {
            return Ok(());
        };
        if state.bindings + set.len() > limits.bindings_per_address {
            return Err(OverShare::Bindings(limits.bindings_per_address));
        }
        let mut wanted: Vec<&str> = set.iter().map(|b| b.exchange.as_str()).collect();
        wanted.dedup();
        let new = wanted
            .iter()
            .filter(|e| !state.exchanges.contains_key(**e))
            .count();
        if state.exchanges.len() + new > limits.exchanges_per_address {
            return Err(OverShare::Exchanges(limits.exchanges_per_address));
        }
        state.bindings += set.len();
        self.bindings = set.len();
        for exchange in wanted {
            let key = match state.exchanges.get_key_value(exchange) {
                Some((key, _)) => key.clone(),
                None => Arc::from(exchange),
            };
            *state.exchanges.entry(key.clone()).or_insert(0) += 1;
            self.exchanges.push(key);
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The share first: the address's state may go with the connection.
        drop(self.share.take());
        self.admission.release_connection(self.key);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let admission = self.admission.clone();
        admission.release_share(self);
    }
}

#[cfg(test)]
mod tests;
