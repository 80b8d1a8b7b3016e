//! A WebSocket subscription's side of its session: its bindings' confirmation, then its
//! frames as the tap reads them from the subscription's log, as one stream the session
//! selects on beside the client's frames and its timers.

use std::pin::Pin;

use futures_util::Stream;

use crate::message::Frame;
use crate::registry::Member;
use crate::subscription::{Taken, Tap};
use crate::topology::BindError;

/// Most frames read from a subscription's log per write.
const BATCH: usize = 64;

/// What a subscription says.
pub(super) enum Event {
    /// Its bindings were confirmed by the broker, or one was refused.
    Bound(Result<(), BindError>),
    Frames(Vec<Frame>),
    /// The log dropped this many frames before the client read them.
    Lagged(u64),
}

pub(super) type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;
/// The wait for a subscription's bindings to be confirmed.
type Ready = Pin<Box<dyn Future<Output = Result<(), BindError>> + Send>>;

/// A subscription's events: its bindings' confirmation, then its frames as they come.
/// Holds its tap and its registry membership: dropping it leaves the subscription.
pub(super) fn events(
    tap: Tap,
    member: Member,
    ready: impl Future<Output = Result<(), BindError>> + Send + 'static,
) -> Events {
    struct Reader {
        tap: Tap,
        _member: Member,
        ready: Option<Ready>,
    }
    let reader = Reader {
        tap,
        _member: member,
        ready: Some(Box::pin(ready)),
    };
    Box::pin(futures_util::stream::unfold(reader, |mut r| async move {
        if let Some(ready) = r.ready.take() {
            let result = ready.await;
            return Some((Event::Bound(result), r));
        }
        r.tap.changed().await;
        let event = match r.tap.take(BATCH) {
            Taken::Frames(frames) => Event::Frames(frames),
            Taken::Lagged(missed) => Event::Lagged(missed),
        };
        Some((event, r))
    }))
}
