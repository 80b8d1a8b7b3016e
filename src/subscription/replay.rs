//! The global bound on replay memory: the frames that resumable subscriptions keep for
//! clients that may come back (`REPLAY_MEMORY`, bytes over all their logs).
//!
//! Each subscription's log is bounded on its own (frames, bytes, age), but thousands of
//! resumable subscriptions, lingering ones included, could hold their full window each.
//! So the memory of the logs of resumable subscriptions (each frame's bytes, as if it
//! were not shared with other subscriptions, and its entry in the log) is counted in one
//! place ([`ReplayBudget::used`], kept by the logs themselves as they grow and shrink), and
//! when they pass the bound the oldest replay frames go first, across every
//! subscription, until they are back under nine tenths of it (so that a trim is not
//! needed again at the next frame). A replay frame is one no client needs any more (it
//! is kept only for a reconnect): frames that attached or waiting clients still have to
//! write are never dropped here (their own log bounds apply). A client that later
//! resumes from before a dropped frame gets `gap` `expired`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use prometheus::IntGauge;

use super::Subscription;

/// Replay memory across all subscriptions (see the module doc).
pub struct ReplayBudget {
    max: usize,
    /// Bytes held (the `events_gateway_replay_bytes` gauge itself: one atomic).
    used: IntGauge,
    /// The resumable subscriptions (pruned of dead ones as trims go over them).
    subs: Mutex<Vec<Weak<Subscription>>>,
    /// A trim is under way (one at a time; the others need not wait for it).
    trimming: AtomicBool,
}

impl ReplayBudget {
    pub fn new(max: usize, used: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            max,
            used,
            subs: Mutex::new(Vec::new()),
            trimming: AtomicBool::new(false),
        })
    }

    /// Bytes held now in the logs of resumable subscriptions.
    pub fn used(&self) -> usize {
        usize::try_from(self.used.get()).unwrap_or(0)
    }

    /// The bound (REPLAY_MEMORY).
    pub fn max(&self) -> usize {
        self.max
    }

    pub(super) fn add(&self, bytes: usize) {
        self.used.add(bytes as i64);
    }

    pub(super) fn sub(&self, bytes: usize) {
        self.used.sub(bytes as i64);
    }

    /// Counts `sub` among the resumable subscriptions.
    pub(super) fn register(&self, sub: &Arc<Subscription>) {
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        subs.push(Arc::downgrade(sub));
    }

    /// Whether the bound is passed.
    pub(super) fn over(&self) -> bool {
        self.used() > self.max
    }

    /// Drops the oldest replay frames, across subscriptions, until the bytes held are
    /// under nine tenths of the bound, or no replay frame is left. Called without any
    /// subscription's lock held.
    pub(super) fn trim(&self) {
        if self.trimming.swap(true, Ordering::Acquire) {
            return;
        }
        let target = self.max / 10 * 9;
        let subs: Vec<Arc<Subscription>> = {
            let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| s.strong_count() > 0);
            subs.iter().filter_map(Weak::upgrade).collect()
        };
        // The subscriptions by the age of their oldest replay frame, oldest first.
        let mut oldest: BinaryHeap<Reverse<(Instant, usize)>> = subs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.state().replay_front().map(|at| Reverse((at, i))))
            .collect();
        while self.used() > target {
            let Some(Reverse((_, i))) = oldest.pop() else {
                break;
            };
            // Drop from this one until its oldest is younger than the next one's.
            let until = oldest.peek().map(|Reverse((at, _))| *at);
            let mut state = subs[i].state();
            let front = state.drop_replay_front(until, || self.used() <= target);
            drop(state);
            if let Some(at) = front {
                oldest.push(Reverse((at, i)));
            }
        }
        self.trimming.store(false, Ordering::Release);
    }
}
