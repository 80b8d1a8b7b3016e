//! A reader of a subscription's log that is not a writer shard's client: a task that
//! reads frames at its own pace (a WebSocket subscription, see `crate::ws`).
//!
//! A tap holds a pin at its position, so the log keeps the frames it has not read, within
//! the log's bounds like any client: a tap that falls behind them is told how many frames
//! it lost ([`Taken::Lagged`]) and reads on from the log's first frame. It never holds up
//! the writers: they do not wait for it, and a subscription's `send` only wakes the taps
//! waiting in [`Tap::changed`] (one `Notify`, looked at only when the subscription has a
//! tap).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Subscription, log};
use crate::message::Frame;

/// A reader of a subscription's log from its own position (see the module doc). Dropping
/// it releases its pin.
pub struct Tap {
    subscription: Arc<Subscription>,
    /// The next log position to read; pinned.
    at: u64,
}

/// What a tap read.
pub enum Taken {
    /// Frames from the tap's position, in order (none: nothing new yet).
    Frames(Vec<Frame>),
    /// The log dropped this many of the tap's next frames (its bounds); the tap reads on
    /// from the log's first frame.
    Lagged(u64),
}

impl Subscription {
    /// A tap reading from `pinned_at` (a client's position, taken with
    /// [`Subscription::pin`]); the pin goes with it.
    pub fn tap(self: &Arc<Self>, pinned_at: u64) -> Tap {
        self.taps.fetch_add(1, Ordering::AcqRel);
        Tap {
            subscription: self.clone(),
            at: pinned_at,
        }
    }

    /// Wakes the taps waiting for frames (called after a frame is appended).
    pub(super) fn wake_taps(&self) {
        if self.taps.load(Ordering::Acquire) > 0 {
            self.notify.notify_waiters();
        }
    }
}

impl Tap {
    /// The subscription read.
    pub fn subscription(&self) -> &Arc<Subscription> {
        &self.subscription
    }

    /// Up to `max` frames from the tap's position, moving its pin past them; or how many
    /// frames the log dropped before the tap could read them.
    pub fn take(&mut self, max: usize) -> Taken {
        let mut state = self.subscription.state();
        let (taken, next) = match state.log.read_from(self.at) {
            log::Read::Frames(frames) => {
                let frames: Vec<Frame> = frames.take(max).cloned().collect();
                let next = self.at + frames.len() as u64;
                (Taken::Frames(frames), next)
            }
            log::Read::Lagged { missed } => (Taken::Lagged(missed), state.log.first_seq()),
        };
        if next != self.at {
            // The new pin first: unpinning the old one lets the log drop what is before
            // the oldest pin left.
            *state.pins.entry(next).or_insert(0) += 1;
            state.unpin(self.at);
            self.at = next;
        }
        taken
    }

    /// Waits until the log holds a frame at or after the tap's position (or the tap has
    /// lagged): [`Tap::take`] then has something to say.
    pub async fn changed(&self) {
        let notified = self.subscription.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before looking, so a frame appended in between wakes it.
        notified.as_mut().enable();
        if self.subscription.state().log.next_seq() > self.at {
            return;
        }
        notified.await;
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.subscription.taps.fetch_sub(1, Ordering::AcqRel);
        self.subscription.unpin(self.at);
    }
}
