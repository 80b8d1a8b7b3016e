//! The subscription registry: clients with equal binding sets share one [`Subscription`]
//! (one log of frames, one set of writers), whatever their number.
//!
//! Invariants enforced here:
//! - a subscription exists while at least one [`Client`] holds it, and, if it is resumable,
//!   for the grace period after its last client left (it lingers; see `linger`): the count
//!   of clients is changed only under the dashmap shard lock of its key (`entry()` to join,
//!   `remove_if()` to leave), so a client can never join a subscription that is being torn
//!   down;
//! - the subscription leaves the [`Topology`] when it goes from the map (its last client
//!   left, or its grace period ended, or a live client needed its room), which makes the
//!   broker side drop bindings no one uses any more;
//! - what a client holds of its address's share is given back when it leaves, or kept
//!   with a lingering subscription until that goes or a client holds it again;
//! - a client reads every frame sent after it subscribed: its position in the
//!   subscription's log is pinned from [`Registry::subscribe`] until its stream is
//!   attached to a writer ([`Client::attach`]) or it leaves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::binding::BindingSet;
use crate::broker::Reconcile;
use crate::message::Frame;
use crate::metrics::Metrics;
use crate::subscription::{Fanout, Lease, Subscription};
use crate::topology::Topology;

/// Every live subscription, keyed by its canonical binding set.
pub struct Registry {
    subscriptions: DashMap<Arc<BindingSet>, Arc<Subscription>>,
    topology: Arc<Topology>,
    broker: Arc<dyn Reconcile>,
    /// What every subscription's writers share (settings, metrics, the stop signal).
    fanout: Arc<Fanout>,
    caps: Caps,
    /// Subscriptions in the map (dashmap's `len` locks every shard).
    count: AtomicUsize,
    metrics: Metrics,
    /// Resumable subscriptions that outlive their last client, by deadline.
    lingering: Arc<Lingering>,
    /// Subscriptions in the map with no client (lingering); changed under the map's lock
    /// of each one's key.
    lingering_count: AtomicUsize,
}

/// Lingering subscriptions one subscribe may evict to make room (each frees at least
/// one subscription, and its bindings and exchanges if nobody else uses them).
const MAX_EVICTIONS_PER_SUBSCRIBE: usize = 16;

/// The client's rate token, asked for at most once however many times a subscribe is
/// tried.
struct Token<F> {
    ask: Option<F>,
    granted: bool,
}

impl<F: FnOnce() -> bool> Token<F> {
    fn new(ask: F) -> Self {
        Self {
            ask: Some(ask),
            granted: false,
        }
    }

    fn take(&mut self) -> bool {
        if let Some(ask) = self.ask.take() {
            self.granted = ask();
        }
        self.granted
    }
}

impl Registry {
    pub fn new(
        topology: Arc<Topology>,
        broker: Arc<dyn Reconcile>,
        fanout: Arc<Fanout>,
        caps: Caps,
        metrics: Metrics,
    ) -> Self {
        Self {
            subscriptions: DashMap::new(),
            topology,
            broker,
            fanout,
            caps,
            count: AtomicUsize::new(0),
            metrics,
            lingering: Arc::default(),
            lingering_count: AtomicUsize::new(0),
        }
    }

    /// Joins (or creates) the subscription for `set`. Every frame sent from now on is
    /// kept for the client; [`Client::ready`] tells when the broker has confirmed every
    /// binding. Creating a subscription, or joining one that lingers with no client,
    /// takes a token from the client (`may_create`, its address's rate); creating one
    /// must fit the global caps, and the oldest lingering subscriptions go to make room.
    pub fn subscribe(
        self: &Arc<Self>,
        set: BindingSet,
        may_create: impl FnOnce() -> bool,
    ) -> Result<Client, Refusal> {
        let key = Arc::new(set);
        let mut token = Token::new(may_create);
        let mut evicted = 0;
        let (sub, changed) = loop {
            match self.join_or_create(&key, &mut token) {
                Ok(joined) => break joined,
                // A live client needs the room a lingering subscription holds.
                Err(Refusal::Subscriptions(_) | Refusal::Bindings(_) | Refusal::Exchanges(_))
                    if evicted < MAX_EVICTIONS_PER_SUBSCRIBE && self.evict_oldest_lingering() =>
                {
                    evicted += 1;
                }
                Err(refusal) => return Err(refusal),
            }
        };
        for exchange in changed {
            self.broker.exchange_changed(&exchange);
        }
        let pinned_at = sub.pin();
        let statuses = self.topology.statuses(&sub);
        Ok(Client::new(self.clone(), sub, pinned_at, statuses))
    }

    /// Joins the subscription for `key`, or creates it; returns it and the exchanges whose
    /// bindings changed. The map's lock for `key` is held throughout, and released before
    /// the caller evicts anything.
    fn join_or_create(
        &self,
        key: &Arc<BindingSet>,
        token: &mut Token<impl FnOnce() -> bool>,
    ) -> Result<(Arc<Subscription>, Vec<String>), Refusal> {
        match self.subscriptions.entry(key.clone()) {
            Entry::Occupied(e) => {
                let sub = e.get().clone();
                if sub.clients.load(Ordering::Relaxed) == 0 {
                    // It lingers: bringing it back costs what creating it would, or one
                    // address could hold every lingering subscription by re-joining.
                    if !token.take() {
                        return Err(Refusal::AddressRate);
                    }
                    self.lingering_count.fetch_sub(1, Ordering::Relaxed);
                    self.metrics.subscriptions_lingering.dec();
                    // The new client holds it now: the charge of the one that left goes.
                    drop(lock(&sub.charge).take());
                }
                sub.clients.fetch_add(1, Ordering::Relaxed);
                drop(e);
                // A refused binding is asked for again by this new client.
                let changed = self.topology.retry_refused(&sub);
                Ok((sub, changed))
            }
            Entry::Vacant(v) => {
                if !token.take() {
                    return Err(Refusal::AddressRate);
                }
                let count = self.count.load(Ordering::Acquire);
                if count >= self.caps.max_subscriptions {
                    return Err(Refusal::Subscriptions(self.caps.max_subscriptions));
                }
                let sub = Arc::new(Subscription::new(key.clone(), self.fanout.clone()));
                // Routed before the shard lock is released: a second client finding this
                // subscription also finds its bindings in the topology.
                let changed = self
                    .topology
                    .add(&sub, self.caps.room())
                    .map_err(|full| self.caps.refusal(full))?;
                v.insert(sub.clone());
                self.count.fetch_add(1, Ordering::AcqRel);
                self.metrics.subscriptions.inc();
                tracing::debug!(bindings = %Abridged(sub.bindings()), "subscription created");
                Ok((sub, changed))
            }
        }
    }

    /// Removes the lingering subscription whose grace period ends first, to make room for
    /// a live client. Returns whether one went.
    fn evict_oldest_lingering(self: &Arc<Self>) -> bool {
        while let Some(sub) = self.lingering.take_oldest() {
            if self.remove_if_lingering(&sub, |_| true) {
                tracing::debug!(bindings = %Abridged(sub.bindings()), "lingering subscription evicted for a live client");
                return true;
            }
        }
        false
    }

    /// Removes `sub` if it is in the map with no client and `expired` says its grace
    /// period is over (given when its last client left); a subscription a client holds
    /// leaves the grace-period queue. Returns whether it was removed (and forgotten).
    fn remove_if_lingering(
        &self,
        sub: &Arc<Subscription>,
        expired: impl FnOnce(Option<Instant>) -> bool,
    ) -> bool {
        let removed = self
            .subscriptions
            .remove_if(sub.bindings(), |_, s| {
                if !Arc::ptr_eq(s, sub) {
                    return false;
                }
                if s.clients.load(Ordering::Relaxed) > 0 {
                    s.queued.store(false, Ordering::Relaxed);
                    return false;
                }
                expired(*lock(&s.left_at))
            })
            .is_some();
        if removed {
            self.lingering_count.fetch_sub(1, Ordering::Relaxed);
            self.metrics.subscriptions_lingering.dec();
            self.forget(sub);
        }
        removed
    }

    /// A client leaves, giving back `charge` (what it held of its address's share). The
    /// last one removes the subscription, unless it is resumable: then it lingers for the
    /// grace period (a reconnect finds its history and its broker bindings still there),
    /// still charged to the address of that last client, and goes at the end of it if no
    /// client came back (see `linger`), or sooner to make room for live clients.
    fn release(self: &Arc<Self>, sub: &Arc<Subscription>, charge: Option<Lease>) {
        let grace = self.fanout.settings.resume_grace;
        let can_linger = !grace.is_zero() && tokio::runtime::Handle::try_current().is_ok();
        let now = Instant::now();
        let mut queue = false;
        let mut lingers = false;
        let mut charge = charge;
        let removed = self
            .subscriptions
            .remove_if(sub.bindings(), |_, s| {
                if !Arc::ptr_eq(s, sub) || s.clients.fetch_sub(1, Ordering::Relaxed) != 1 {
                    return false;
                }
                if can_linger && s.is_resumable() {
                    *lock(&s.left_at) = Some(now);
                    queue = !s.queued.swap(true, Ordering::Relaxed);
                    lingers = true;
                    // Swapped, not dropped here: a charge is given back outside the lock.
                    std::mem::swap(&mut *lock(&s.charge), &mut charge);
                    return false;
                }
                true
            })
            .is_some();
        // The charge of a client that was not the last, or a lingering one's older charge.
        drop(charge);
        if lingers {
            let lingering = self.lingering_count.fetch_add(1, Ordering::Relaxed) + 1;
            self.metrics.subscriptions_lingering.inc();
            if lingering > self.caps.max_lingering {
                self.evict_oldest_lingering();
            }
        }
        if queue {
            self.lingering.push(self, sub.clone(), now + grace);
        }
        if removed {
            self.forget(sub);
        }
    }

    /// Ends the grace periods that are over at `now`: a subscription goes if no client
    /// came back and its last client left a grace period ago or more; one a client left
    /// since waits until the new deadline; one a client holds leaves the queue.
    fn end_grace_periods(self: &Arc<Self>, now: Instant) {
        let grace = self.fanout.settings.resume_grace;
        for sub in self.lingering.take_due(now) {
            let mut requeue = None;
            let removed = self.remove_if_lingering(&sub, |left_at| {
                let deadline = left_at.map_or(now, |at| at + grace);
                if deadline > now {
                    requeue = Some(deadline);
                    return false;
                }
                true
            });
            if let (false, Some(deadline)) = (removed, requeue) {
                self.lingering.push(self, sub.clone(), deadline);
            }
        }
    }

    /// A subscription removed from the map: out of the topology (the broker drops the
    /// bindings nobody else uses).
    fn forget(&self, sub: &Arc<Subscription>) {
        // Whatever it was still charged to is given back.
        drop(lock(&sub.charge).take());
        {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.metrics.subscriptions.dec();
            tracing::debug!(bindings = %Abridged(sub.bindings()), "subscription released");
            for exchange in self.topology.remove(sub) {
                self.broker.exchange_changed(&exchange);
            }
        }
    }

    /// Tells every live stream that the gateway is draining (see [`Frame::drain`]).
    /// Streams that subscribe after this see the draining token before they stream.
    pub fn announce_drain(&self) {
        for sub in self.subscriptions.iter() {
            sub.send(Frame::drain());
        }
    }

    /// Number of live subscriptions.
    pub fn len(&self) -> usize {
        self.subscriptions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty()
    }
}

/// Locks a subscription's linger fields (changed only under the map lock, so never
/// contended); a panic elsewhere is no reason to stop serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A binding set for a log line: the first few bindings and how many there are (a set
/// may hold a hundred bindings of 255 bytes each).
struct Abridged<'a>(&'a BindingSet);

impl std::fmt::Display for Abridged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 3;
        const MAX_CHARS: usize = 120;
        for (i, b) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let text = format!("{}:{}", b.exchange, b.pattern);
            match text.char_indices().nth(MAX_CHARS) {
                Some((at, _)) => write!(f, "{}…", &text[..at])?,
                None => f.write_str(&text)?,
            }
        }
        if self.0.len() > SHOWN {
            write!(f, " (+{} more)", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

mod caps;
mod client;
mod linger;

pub use caps::{Caps, Refusal};
pub use client::{Client, Member};
#[cfg(test)]
mod tests;

use linger::Lingering;
