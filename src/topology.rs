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
use std::time::Instant;

use tokio::sync::watch;

use crate::message::{Frame, Incoming};
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

/// Global bounds on what clients may make the gateway (and the broker) hold.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Distinct subscriptions (binding sets) at once (MAX_SUBSCRIPTIONS).
    pub max_subscriptions: usize,
    /// Distinct (exchange, pattern) bindings at once, each one broker binding
    /// (MAX_BROKER_BINDINGS).
    pub max_bindings: usize,
    /// Exchanges in use at once, each one queue, one reconciler and two AMQP channels
    /// (MAX_EXCHANGES).
    pub max_exchanges: usize,
    /// Resumable subscriptions lingering with no client at once
    /// (MAX_LINGERING_SUBSCRIPTIONS); the oldest goes first.
    pub max_lingering: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            max_subscriptions: 20_000,
            max_bindings: 20_000,
            max_exchanges: 200,
            max_lingering: 2_000,
        }
    }
}

/// Why a new subscription was not created. `Display` is the text sent to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Too many new subscriptions from your address; try again in a few seconds")]
    AddressRate,
    #[error(
        "This server has reached its limit of {0} distinct subscriptions; try again later, or use bindings other clients already use"
    )]
    Subscriptions(usize),
    #[error("This server has reached its limit of {0} distinct bindings; try again later")]
    Bindings(usize),
    #[error("This server has reached its limit of {0} exchanges in use; try again later")]
    Exchanges(usize),
}

impl Refusal {
    /// The reason label of `events_gateway_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::AddressRate => "address_rate",
            Refusal::Subscriptions(_) => "subscriptions",
            Refusal::Bindings(_) => "bindings",
            Refusal::Exchanges(_) => "exchanges",
        }
    }
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
    /// adds would pass `caps`. Returns the exchanges whose wanted bindings changed (the
    /// broker must reconcile them).
    pub(crate) fn add(&self, sub: &Arc<Subscription>, caps: &Caps) -> Result<Vec<String>, Refusal> {
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
        if map.len() + new_exchanges.len() > caps.max_exchanges {
            return Err(Refusal::Exchanges(caps.max_exchanges));
        }
        let bindings: usize = map.values().map(|ex| ex.bindings.len()).sum();
        if bindings + new_bindings > caps.max_bindings {
            return Err(Refusal::Bindings(caps.max_bindings));
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

    /// Exchanges with at least one binding in use.
    pub fn exchanges(&self) -> Vec<String> {
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

    /// Sends one broker delivery to every subscription on `exchange` that it matches
    /// (through its routing key or any `CC` entry), encoding its frame once.
    /// Returns how many subscriptions it reached.
    pub fn deliver(&self, exchange: &str, msg: &Incoming<'_>) -> usize {
        let received = Instant::now();
        self.metrics.messages_received.inc();
        let mut targets: Vec<Arc<Subscription>> = Vec::new();
        {
            let map = self.read();
            if let Some(ex) = map.get(exchange) {
                let mut add = |s: &SubRef| targets.push(s.0.clone());
                ex.trie.matches(msg.routing_key, &mut add);
                for cc in &msg.cc {
                    ex.trie.matches(cc, &mut add);
                }
            }
        }
        // A subscription matched by several of its patterns, or by the key and a CC
        // entry, gets the message once.
        dedup_by_identity(&mut targets);
        if targets.is_empty() {
            self.metrics.dropped("unroutable", 1);
            return 0;
        }
        let frame = match msg.encode() {
            Ok(bytes) => Frame::message(bytes, received),
            Err(err) => {
                self.metrics.dropped("malformed", 1);
                log_malformed(exchange, msg.routing_key, &err);
                return 0;
            }
        };
        for sub in &targets {
            sub.send(frame.clone());
        }
        targets.len()
    }
}

impl Topology {
    /// Tells every subscription bound on `exchange` that messages may have been missed:
    /// the broker queue that feeds it was lost (deleted, expired during an outage, or
    /// declared anew under another name). Plain streams get the original's comment,
    /// resumable ones a `gap` event (`{"reason":"broker"}`).
    pub fn missed(&self, exchange: &str) {
        let frame = Frame::missed(crate::message::missed_comment(exchange));
        self.broadcast_to_exchange(exchange, frame, |_| true);
    }

    /// Ends the streams of every subscription bound on `exchange` with an `error` event
    /// (`text`): for clients already streaming when the broker refuses the exchange.
    pub fn fail_streams(&self, exchange: &str, text: &str) {
        let frame = Frame::end(crate::message::error_frame(text));
        self.broadcast_to_exchange(exchange, frame, |_| true);
    }

    /// The broker refused one binding: the clients waiting for it get `err` (their
    /// `ready` fails), and the streams of subscriptions that hold it end with it. Nothing
    /// else on the exchange changes.
    pub fn fail_binding(&self, exchange: &str, pattern: &str, err: BindError) {
        let frame = Frame::end(crate::message::error_frame(&err.to_string()));
        self.set_state(exchange, pattern, BindState::Failed(err));
        self.broadcast_to_exchange(exchange, frame, |sub| {
            sub.bindings()
                .iter()
                .any(|b| b.exchange == exchange && b.pattern == pattern)
        });
    }

    /// Sends `frame` to every subscription bound on `exchange` that `to` accepts.
    fn broadcast_to_exchange(
        &self,
        exchange: &str,
        frame: Frame,
        to: impl Fn(&Subscription) -> bool,
    ) {
        let mut targets: Vec<Arc<Subscription>> = Vec::new();
        {
            let map = self.read();
            if let Some(ex) = map.get(exchange) {
                ex.trie.for_each(&mut |s: &SubRef| {
                    if to(&s.0) {
                        targets.push(s.0.clone());
                    }
                });
            }
        }
        dedup_by_identity(&mut targets);
        for sub in targets {
            sub.send(frame.clone());
        }
    }

    /// Counts a redelivery skipped because its clients already had the message.
    pub fn count_duplicate(&self) {
        self.metrics.dropped("duplicate", 1);
    }
}

/// Removes repeated subscriptions (by identity) in O(n log n): many subscriptions can
/// match one message (every client set that includes `#`).
fn dedup_by_identity(targets: &mut Vec<Arc<Subscription>>) {
    if targets.len() > 1 {
        targets.sort_unstable_by_key(|t| Arc::as_ptr(t) as usize);
        targets.dedup_by(|a, b| Arc::ptr_eq(a, b));
    }
}

/// Logs a malformed message at most once per second, with how many were suppressed.
fn log_malformed(exchange: &str, routing_key: &str, err: &crate::message::MalformedBody) {
    static LIMITER: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
    if let Some(suppressed) = LIMITER.allow() {
        tracing::warn!(exchange, routing_key, error = %err, suppressed, "dropped a message that is not UTF-8 JSON");
    }
}
