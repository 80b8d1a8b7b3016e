//! Admission of SSE connections: at most `max` open at once in the process.
//!
//! Invariant: a [`Slot`] is held for exactly as long as its connection streams (or waits
//! for `ready`); the `connections_open` gauge follows the slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics::Metrics;

/// The connection slots of the process.
pub struct Slots {
    open: AtomicUsize,
    max: usize,
    metrics: Metrics,
}

impl Slots {
    pub fn new(max: usize, metrics: Metrics) -> Arc<Self> {
        metrics.connections_limit.set(max as i64);
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max,
            metrics,
        })
    }

    /// Takes a slot, or `None` when `max` connections are open.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.connections_open.inc();
        Some(Slot(self.clone()))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One open SSE connection; dropping it frees the slot.
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections_open.dec();
    }
}
