//! The binding table: which `(exchange, pattern)` pairs are wanted, how many subscriptions
//! want each, whether the broker has confirmed it, and the per-exchange topic tries that
//! route each delivery to the subscriptions it matches.
//!
//! Invariants enforced here:
//! - a binding is present exactly while at least one subscription uses it (`refs > 0`);
//!   the broker side reconciles the broker towards [`Topology::wanted`], so the last
//!   subscription to leave makes its binding disappear from the broker;
//! - each delivery is encoded once and sent once per matching subscription, however many
//!   of the subscription's patterns match its routing key and `CC` entries;
//! - the lock is a std `RwLock`, never held across an `.await` nor while sending to
//!   clients: dispatch copies the matching subscriptions out, then sends.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::subscription::Subscription;
use crate::topic::TopicTrie;

/// Where the broker stands on one binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindState {
    /// Not (yet, or no longer) confirmed by the broker.
    Pending,
    /// The broker confirmed the binding (bind-ok).
    Bound,
    /// The broker refused it; the clients that asked are told why.
    Failed(BindError),
}

/// The topology's own bounds: the bindings and exchanges it may route at once.
#[derive(Clone, Copy, Debug)]
pub struct Room {
    pub max_bindings: usize,
    pub max_exchanges: usize,
}

/// A subscription's bindings would pass a bound of [`Room`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRoom {
    Bindings,
    Exchanges,
}

/// Why the broker refused a binding. `Display` is the text sent to clients.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("Exchange `{0}` does not exist")]
    NoSuchExchange(String),
    #[error("Access to exchange `{0}` was refused by the broker")]
    AccessRefused(String),
    #[error(
        "The broker refused the routing key pattern `{pattern}` on exchange `{exchange}`: {reason}"
    )]
    PatternRefused {
        exchange: String,
        pattern: String,
        reason: String,
    },
    #[error("Timed out waiting for the broker to confirm the bindings; try again later")]
    Timeout,
    #[error("Unknown Internal Error")]
    Internal,
}

#[derive(Default)]
struct ExchangeRoutes {
    trie: TopicTrie<SubRef>,
    bindings: HashMap<String, BindingEntry>,
}

struct BindingEntry {
    /// Subscriptions using this binding.
    refs: usize,
    /// Broker state; clients waiting for `ready` watch it.
    status: watch::Sender<BindState>,
}

/// A subscription compared by identity, as stored in the tries.
#[derive(Clone)]
struct SubRef(Arc<Subscription>);

impl PartialEq for SubRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The table shared by the registry (writes), the broker (reads wanted bindings, writes
/// their state) and dispatch (reads routes).
pub struct Topology {
    exchanges: RwLock<HashMap<String, ExchangeRoutes>>,
    metrics: Metrics,
}

impl Topology {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            exchanges: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, ExchangeRoutes>> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping service, so a poisoned lock is used as is.
        self.exchanges.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, ExchangeRoutes>> {
        self.exchanges.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes a new subscription's bindings to it, unless the bindings or exchanges it
    /// adds would pass `room`. Returns the exchanges whose wanted bindings changed (the
    /// broker must reconcile them).
    pub(crate) fn add(&self, sub: &Arc<Subscription>, room: Room) -> Result<Vec<String>, NoRoom> {
        let mut changed = Vec::new();
        let mut map = self.write();
        let (mut new_exchanges, mut new_bindings) = (Vec::new(), 0);
        for b in sub.bindings().iter() {
            match map.get(&b.exchange) {
                None => {
                    if !new_exchanges.contains(&&b.exchange) {
                        new_exchanges.push(&b.exchange);
                    }
                    new_bindings += 1;
                }
                Some(ex) if !ex.bindings.contains_key(&b.pattern) => new_bindings += 1,
                Some(_) => {}
            }
        }
        if map.len() + new_exchanges.len() > room.max_exchanges {
            return Err(NoRoom::Exchanges);
        }
        let bindings: usize = map.values().map(|ex| ex.bindings.len()).sum();
        if bindings + new_bindings > room.max_bindings {
            return Err(NoRoom::Bindings);
        }
        for b in sub.bindings().iter() {
            let ex = map.entry(b.exchange.clone()).or_default();
            ex.trie.insert(&b.pattern, SubRef(sub.clone()));
            match ex.bindings.get_mut(&b.pattern) {
                Some(entry) => {
                    entry.refs += 1;
                    if matches!(*entry.status.borrow(), BindState::Failed(_)) {
                        // A new subscription asks again: retry instead of failing forever.
                        entry.status.send_replace(BindState::Pending);
                        changed.push(b.exchange.clone());
                    }
                }
                None => {
                    let (status, _) = watch::channel(BindState::Pending);
                    ex.bindings
                        .insert(b.pattern.clone(), BindingEntry { refs: 1, status });
                    changed.push(b.exchange.clone());
                }
            }
        }
        changed.dedup();
        self.metrics.exchanges.set(map.len() as i64);
        Ok(changed)
    }

    /// Removes a departing subscription. Returns the exchanges whose wanted bindings changed.
    pub(crate) fn remove(&self, sub: &Arc<Subscription>) -> Vec<String> {
        let mut changed = Vec::new();
        let mut map = self.write();
        let me = SubRef(sub.clone());
        for b in sub.bindings().iter() {
            let Some(ex) = map.get_mut(&b.exchange) else {
                continue;
            };
            ex.trie.remove(&b.pattern, &me);
            if let Some(entry) = ex.bindings.get_mut(&b.pattern) {
                entry.refs -= 1;
                if entry.refs == 0 {
                    ex.bindings.remove(&b.pattern);
                    changed.push(b.exchange.clone());
                }
            }
            if ex.bindings.is_empty() {
                map.remove(&b.exchange);
            }
        }
        changed.dedup();
        self.metrics.exchanges.set(map.len() as i64);
        changed
    }

    /// Watchers of the broker state of each binding in `sub`, for a client waiting for
    /// `ready`.
    pub(crate) fn statuses(&self, sub: &Subscription) -> Vec<watch::Receiver<BindState>> {
        let map = self.read();
        sub.bindings()
            .iter()
            .filter_map(|b| {
                let entry = map.get(&b.exchange)?.bindings.get(&b.pattern)?;
                Some(entry.status.subscribe())
            })
            .collect()
    }

    /// Patterns on `exchange` that should be bound on the broker now (in use and not
    /// refused by the broker).
    pub fn wanted(&self, exchange: &str) -> Vec<String> {
        let map = self.read();
        let Some(ex) = map.get(exchange) else {
            return Vec::new();
        };
        ex.bindings
            .iter()
            .filter(|(_, e)| !matches!(*e.status.borrow(), BindState::Failed(_)))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Exchanges with at least one binding in use (for tests).
    #[cfg(test)]
    pub(crate) fn exchanges(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Marks a binding Bound if it is Pending (the broker already has it).
    pub fn confirm_if_pending(&self, exchange: &str, pattern: &str) {
        let map = self.read();
        if let Some(entry) = map.get(exchange).and_then(|ex| ex.bindings.get(pattern)) {
            entry.status.send_if_modified(|s| {
                let pending = *s == BindState::Pending;
                if pending {
                    *s = BindState::Bound;
                }
                pending
            });
        }
    }

    /// Puts the refused bindings of `sub` back to Pending, for a new client of the same
    /// binding set: the exchange may exist (or be allowed) by now. Returns the exchanges
    /// to reconcile.
    pub(crate) fn retry_refused(&self, sub: &Subscription) -> Vec<String> {
        let map = self.read();
        let mut changed = Vec::new();
        for b in sub.bindings().iter() {
            let Some(entry) = map
                .get(&b.exchange)
                .and_then(|ex| ex.bindings.get(&b.pattern))
            else {
                continue;
            };
            let reset = entry.status.send_if_modified(|s| {
                let failed = matches!(s, BindState::Failed(_));
                if failed {
                    *s = BindState::Pending;
                }
                failed
            });
            if reset {
                changed.push(b.exchange.clone());
            }
        }
        changed.dedup();
        changed
    }

    /// Records the broker's answer for one binding.
    pub fn set_state(&self, exchange: &str, pattern: &str, state: BindState) {
        let map = self.read();
        if let Some(entry) = map.get(exchange).and_then(|ex| ex.bindings.get(pattern)) {
            entry.status.send_replace(state);
        }
    }

    /// Marks every binding of `exchange` that is not refused as `state` (`Pending` after a
    /// lost connection, `Failed` when the exchange turned out not to exist).
    pub fn set_all(&self, exchange: &str, state: BindState) {
        let map = self.read();
        if let Some(ex) = map.get(exchange) {
            for entry in ex.bindings.values() {
                if !matches!(*entry.status.borrow(), BindState::Failed(_)) {
                    entry.status.send_replace(state.clone());
                }
            }
        }
    }
}

mod deliver;
