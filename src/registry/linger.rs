//! The grace periods of lingering subscriptions: a resumable subscription whose last
//! client left stays (with its log and its broker bindings) for `RESUME_GRACE`, so that a
//! reconnect resumes; it goes at the end of the grace period if no client came back.
//!
//! One queue and one task for the whole registry, not a timer per departure: churn on a
//! subscription (clients that join and leave again) moves its deadline, never adds a
//! task or an entry. Invariants:
//! - a lingering subscription has exactly one entry in the queue (its `queued` flag, set
//!   and cleared under the registry's map lock for its key, says so);
//! - an entry is looked at when its deadline passes: the subscription goes if no client
//!   came back and its last departure is older than the grace period; it is queued again
//!   at its new deadline if a client came and left since; it leaves the queue if a client
//!   holds it now (the next departure queues it again).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Registry;
use crate::subscription::Subscription;

/// Lingering subscriptions by deadline.
#[derive(Default)]
pub(super) struct Lingering {
    /// (deadline, a tie-breaker) → the subscription.
    queue: Mutex<BTreeMap<(Instant, u64), Arc<Subscription>>>,
    /// Tells the task that an entry came (it may be the first, or the earliest).
    wake: Notify,
    /// Whether the task was started (at the first departure that lingers).
    started: std::sync::OnceLock<()>,
    ties: std::sync::atomic::AtomicU64,
}

impl Lingering {
    fn queue(&self) -> MutexGuard<'_, BTreeMap<(Instant, u64), Arc<Subscription>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `sub` until `deadline`; starts the registry's task if it is not running.
    pub(super) fn push(&self, registry: &Arc<Registry>, sub: Arc<Subscription>, deadline: Instant) {
        let tie = self.ties.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue().insert((deadline, tie), sub);
        self.wake.notify_one();
        self.started.get_or_init(|| {
            tokio::spawn(run(Arc::downgrade(registry)));
        });
    }

    /// Takes the entries whose deadline has passed.
    pub(super) fn take_due(&self, now: Instant) -> Vec<Arc<Subscription>> {
        let mut queue = self.queue();
        let later = queue.split_off(&(now, u64::MAX));
        let due = std::mem::replace(&mut *queue, later);
        due.into_values().collect()
    }

    /// Takes the entry whose deadline comes first.
    pub(super) fn take_oldest(&self) -> Option<Arc<Subscription>> {
        self.queue().pop_first().map(|(_, sub)| sub)
    }

    /// The earliest deadline queued.
    fn next_deadline(&self) -> Option<Instant> {
        self.queue().keys().next().map(|(at, _)| *at)
    }

    /// Entries queued now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.queue().len()
    }
}

/// The registry's one timer task: ends the grace periods that are over. It ends with the
/// registry.
async fn run(registry: Weak<Registry>) {
    loop {
        let Some(lingering) = registry.upgrade().map(|r| r.lingering.clone()) else {
            return;
        };
        match lingering.next_deadline() {
            None => lingering.wake.notified().await,
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = lingering.wake.notified() => {}
                }
            }
        }
        let Some(registry) = registry.upgrade() else {
            return;
        };
        registry.end_grace_periods(Instant::now());
    }
}
