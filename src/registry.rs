//! The subscription registry: clients with equal binding sets share one [`Subscription`]
//! (one log of frames, one set of writers), whatever their number.
//!
//! Invariants enforced here:
//! - a subscription exists exactly while at least one [`Client`] holds it: the count of
//!   clients is changed only under the dashmap shard lock of its key (`entry()` to join,
//!   `remove_if()` to leave), so a client can never join a subscription that is being torn
//!   down;
//! - the last client to leave removes the subscription from the [`Topology`], which makes
//!   the broker side drop bindings no one uses any more;
//! - a client reads every frame sent after it subscribed: its position in the
//!   subscription's log is pinned from [`Registry::subscribe`] until its stream is
//!   attached to a writer ([`Client::attach`]) or it leaves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;

use crate::binding::BindingSet;
use crate::broker::Reconcile;
use crate::message::Frame;
use crate::metrics::Metrics;
use crate::subscription::{Conn, Fanout, Gap, Subscription};
use crate::topology::{BindError, BindState, Caps, Refusal, Topology};

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
        }
    }

    /// Joins (or creates) the subscription for `set`. Every frame sent from now on is
    /// kept for the client; [`Client::ready`] tells when the broker has confirmed every
    /// binding. Creating a subscription (not joining one) takes a token from the client
    /// (`may_create`, its address's rate) and must fit the global caps.
    pub fn subscribe(
        self: &Arc<Self>,
        set: BindingSet,
        may_create: impl FnOnce() -> bool,
    ) -> Result<Client, Refusal> {
        let key = Arc::new(set);
        let (sub, changed) = match self.subscriptions.entry(key.clone()) {
            Entry::Occupied(e) => {
                let sub = e.get().clone();
                sub.clients.fetch_add(1, Ordering::Relaxed);
                drop(e);
                // A refused binding is asked for again by this new client.
                let changed = self.topology.retry_refused(&sub);
                (sub, changed)
            }
            Entry::Vacant(v) => {
                if !may_create() {
                    return Err(Refusal::AddressRate);
                }
                let count = self.count.load(Ordering::Acquire);
                if count >= self.caps.max_subscriptions {
                    return Err(Refusal::Subscriptions(self.caps.max_subscriptions));
                }
                let sub = Arc::new(Subscription::new(key, self.fanout.clone()));
                // Routed before the shard lock is released: a second client finding this
                // subscription also finds its bindings in the topology.
                let changed = self.topology.add(&sub, &self.caps)?;
                v.insert(sub.clone());
                self.count.fetch_add(1, Ordering::AcqRel);
                self.metrics.subscriptions.inc();
                tracing::debug!(bindings = %Abridged(sub.bindings()), "subscription created");
                (sub, changed)
            }
        };
        for exchange in changed {
            self.broker.exchange_changed(&exchange);
        }
        let pinned_at = sub.pin();
        let statuses = self.topology.statuses(&sub);
        Ok(Client {
            member: Some(Member {
                registry: self.clone(),
                subscription: sub,
            }),
            pinned_at,
            statuses,
        })
    }

    /// A client leaves. The last one removes the subscription, unless it is resumable:
    /// then it lingers for the grace period (a reconnect finds its history and its broker
    /// bindings still there), and goes at the end of it if no client came back (see
    /// `linger`).
    fn release(self: &Arc<Self>, sub: &Arc<Subscription>) {
        let grace = self.fanout.settings.resume_grace;
        let can_linger = !grace.is_zero() && tokio::runtime::Handle::try_current().is_ok();
        let now = Instant::now();
        let mut queue = false;
        let removed = self
            .subscriptions
            .remove_if(sub.bindings(), |_, s| {
                if !Arc::ptr_eq(s, sub) || s.clients.fetch_sub(1, Ordering::Relaxed) != 1 {
                    return false;
                }
                if can_linger && s.is_resumable() {
                    *lock(&s.left_at) = Some(now);
                    queue = !s.queued.swap(true, Ordering::Relaxed);
                    return false;
                }
                true
            })
            .is_some();
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
            let removed = self
                .subscriptions
                .remove_if(sub.bindings(), |_, s| {
                    if !Arc::ptr_eq(s, &sub) {
                        return false;
                    }
                    if s.clients.load(Ordering::Relaxed) > 0 {
                        s.queued.store(false, Ordering::Relaxed);
                        return false;
                    }
                    let deadline = lock(&s.left_at).map_or(now, |at| at + grace);
                    if deadline > now {
                        requeue = Some(deadline);
                        return false;
                    }
                    true
                })
                .is_some();
            if let Some(deadline) = requeue {
                self.lingering.push(self, sub.clone(), deadline);
            }
            if removed {
                self.forget(&sub);
            }
        }
    }

    /// A subscription removed from the map: out of the topology (the broker drops the
    /// bindings nobody else uses).
    fn forget(&self, sub: &Arc<Subscription>) {
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

/// A client's membership of a subscription; dropping it leaves the subscription (the
/// last member to leave removes it).
pub struct Member {
    registry: Arc<Registry>,
    subscription: Arc<Subscription>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.registry.release(&self.subscription);
    }
}

/// A client that subscribed and is not streaming yet: its membership, its pinned position
/// in the log, and the broker state of its bindings. Dropping it leaves the subscription.
pub struct Client {
    /// `None` once attached.
    member: Option<Member>,
    pinned_at: u64,
    statuses: Vec<watch::Receiver<BindState>>,
}

impl Client {
    /// The subscription joined.
    pub fn subscription(&self) -> Option<&Arc<Subscription>> {
        self.member.as_ref().map(|m| &m.subscription)
    }

    /// The log position the client reads from (every frame sent after it subscribed).
    pub fn position(&self) -> u64 {
        self.pinned_at
    }

    /// A resumable client that reconnects with `last_event_id`: it reads from just after
    /// that position if the subscription still holds every frame since; otherwise it
    /// stays live, and is told why.
    pub fn resume(&mut self, last_event_id: &str) -> Result<(), Gap> {
        let member = self.member.as_ref().ok_or(Gap::Invalid)?;
        self.pinned_at = member.subscription.resume(self.pinned_at, last_event_id)?;
        Ok(())
    }

    /// Hands the client's stream to the subscription's writers: `conn` builds it from the
    /// membership (which it must hold for as long as it streams).
    pub fn attach(mut self, conn: impl FnOnce(Member) -> Conn) {
        if let Some(member) = self.member.take() {
            let subscription = member.subscription.clone();
            subscription.attach(conn(member), self.pinned_at);
        }
    }

    /// Waits until the broker has confirmed every binding, or one was refused, or
    /// `timeout` passed.
    pub fn ready(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), BindError>> + Send + 'static {
        let mut statuses = self.statuses.clone();
        async move {
            let all = async {
                for status in &mut statuses {
                    let state = status
                        .wait_for(|s| *s != BindState::Pending)
                        .await
                        .map_err(|_| BindError::Internal)?;
                    if let BindState::Failed(err) = &*state {
                        return Err(err.clone());
                    }
                }
                Ok(())
            };
            tokio::time::timeout(timeout, all)
                .await
                .unwrap_or(Err(BindError::Timeout))
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(member) = &self.member {
            member.subscription.unpin(self.pinned_at);
        }
    }
}

mod linger;
#[cfg(test)]
mod tests;

use linger::Lingering;
