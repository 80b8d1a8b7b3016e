//! A subscription: one distinct binding set, the log of frames its clients share, and the
//! writers that put those frames on the clients' sockets.
//!
//! How a frame travels: the topology routes a delivery to the subscriptions it matches and
//! calls [`Subscription::send`], which appends the frame (encoded once, shared `Bytes`) to
//! the [`Log`] and wakes the subscription's writer shards: one wake per shard, never one
//! per client. Each [`shard`] is a task that owns up to [`SHARD_CLIENTS`] client sockets
//! and writes the new frames to all of them in one pass, with non-blocking writes. A
//! [`Tap`] reads the same log at its own pace instead (a WebSocket subscription, whose
//! connection task writes its own frames); the writers never wait for it.
//!
//! Invariants:
//! - the stream rule: every client's stream is the subscription's frames in order from
//!   its own position, each exactly once, or one notice covering exactly the frames the
//!   log dropped before it could write them; a frame that ends streams (an `error`, the
//!   drain marker) ends the stream even when it was dropped. [`cursor`] is the one place
//!   that decides what a client writes next and moves it; `model_tests` checks the rule
//!   under random schedules;
//! - fan-out never waits on a slow client: a socket that would block keeps its unwritten
//!   rest (at most one write's worth) and its position in the log; the others go on; the
//!   log's bounds decide when it has lagged (it is then told how many frames it lost);
//! - memory follows traffic: the log holds only frames a client still needs, or that the
//!   replay window keeps for clients that may resume, within its bounds;
//! - a client attached here was given `ready` first (by `connect`); it reads every frame
//!   sent after it subscribed ([`Subscription::pin`]);
//! - the lock is a std `Mutex`, never held across an `.await` nor during a socket write:
//!   a shard copies the frames it needs (reference counts) and writes after unlocking;
//!   nor while a connection is dropped: its lease leaves the registry, which may look
//!   at this subscription again.
//!
//! This type sits below the registry (which creates, counts and lingers subscriptions)
//! and the topology (which routes deliveries to them): server → connect → registry →
//! topology → subscription.

mod conn;
mod cursor;
mod fanout;
mod log;
#[cfg(test)]
mod model_check;
#[cfg(test)]
mod model_tests;
mod position;
mod replay;
mod shard;
#[cfg(test)]
mod sim;
mod socket;
mod tap;
#[cfg(test)]
mod tests;
mod write;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures_util::task::AtomicWaker;

pub use conn::{Conn, Lease};
pub use fanout::{Fanout, SHARD_CLIENTS, StreamSettings};
pub use log::{Log, LogLimits};
pub use position::{Gap, Position};
pub use replay::ReplayBudget;
pub use tap::{Taken, Tap};

use crate::binding::BindingSet;
use crate::message::{self, Frame};

/// One distinct binding set, its log and its writers.
pub struct Subscription {
    bindings: Arc<BindingSet>,
    /// Random for each subscription (a new one for the same bindings gets another): a
    /// resumable id names it, so that an id of another subscription never matches, and
    /// cannot be guessed from the bindings.
    key: u64,
    fanout: Arc<Fanout>,
    state: Mutex<State>,
    /// Clients holding this subscription; changed only under the registry's shard lock.
    pub(crate) clients: AtomicUsize,
    /// Taps reading the log at their own pace (see [`tap`]), and how they are woken.
    taps: AtomicUsize,
    notify: tokio::sync::Notify,
    /// When the last client left, while the subscription lingers for a reconnect (see
    /// the registry's `linger`); changed only under the registry's map lock.
    pub(crate) left_at: Mutex<Option<tokio::time::Instant>>,
    /// Whether the subscription has its entry in the registry's grace-period queue;
    /// changed only under the registry's map lock.
    pub(crate) queued: std::sync::atomic::AtomicBool,
    /// While it lingers: what its last client held of its address's share, given back
    /// when it goes or a client holds it again (see the registry).
    pub(crate) charge: Mutex<Option<Lease>>,
}

struct State {
    log: Log,
    /// A client asked for resumable delivery: the log keeps frames for the replay window
    /// (its bounds), not only while an attached client needs them.
    resumable: bool,
    shards: Vec<ShardSlot>,
    /// Positions of clients that subscribed but are not attached yet (waiting for
    /// `ready`): the log keeps their frames.
    pins: BTreeMap<u64, usize>,
    /// Frames sent that end every stream (an `error`, the drain marker) and their
    /// positions, as long as a client may still need them: a client that lost one to the
    /// log's bounds still ends with it. Rare: one per refused exchange, one drain.
    ends: VecDeque<(u64, Frame)>,
}

/// The subscription's view of one writer task.
struct ShardSlot {
    shared: Arc<ShardShared>,
    /// Clients handed over, not yet taken by the task.
    inbox: Vec<Conn>,
    /// Clients the task holds (as of its last pass).
    attached: usize,
    /// The lowest log position its clients still need (as of its last pass).
    needs_from: u64,
}

/// What a writer task and its subscription share outside the lock.
struct ShardShared {
    id: u64,
    waker: AtomicWaker,
}

impl Subscription {
    /// A subscription for `bindings` with one client.
    pub(crate) fn new(bindings: Arc<BindingSet>, fanout: Arc<Fanout>) -> Self {
        let log = Log::new(fanout.settings.log);
        Self {
            bindings,
            key: fastrand::u64(..),
            fanout,
            state: Mutex::new(State {
                log,
                resumable: false,
                shards: Vec::new(),
                pins: BTreeMap::new(),
                ends: VecDeque::new(),
            }),
            clients: AtomicUsize::new(1),
            taps: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
            left_at: Mutex::new(None),
            queued: std::sync::atomic::AtomicBool::new(false),
            charge: Mutex::new(None),
        }
    }

    pub fn bindings(&self) -> &BindingSet {
        &self.bindings
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is updated in small steps that leave it consistent; a panic elsewhere
        // while holding the lock is no reason to stop serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a frame for every client and wakes the writers (one wake per shard).
    pub(crate) fn send(&self, frame: Frame) {
        let mut state = self.state();
        let ends = frame.ends_stream().then(|| frame.clone());
        let seq = state.log.push(frame);
        if let Some(end) = ends {
            state.ends.push_back((seq, end));
        }
        if state.shards.is_empty() && state.pins.is_empty() {
            // Nobody will read it now (a resumable subscription keeps it for a reconnect).
            state.retain(Instant::now());
        }
        for slot in &state.shards {
            slot.shared.waker.wake();
        }
        let resumable = state.resumable;
        drop(state);
        self.wake_taps();
        if resumable && self.fanout.replay.over() {
            self.fanout.replay.trim();
        }
    }

    /// The position a new client starts reading at; the log keeps frames from there on
    /// until [`Subscription::unpin`] or [`Subscription::attach`].
    pub(crate) fn pin(&self) -> u64 {
        let mut state = self.state();
        let at = state.log.next_seq();
        *state.pins.entry(at).or_insert(0) += 1;
        at
    }

    /// The position just before `seq`, for a resumable id (what a client has received).
    pub fn position(&self, seq: u64) -> Position {
        Position {
            epoch: self.fanout.epoch,
            key: self.key,
            seq: seq.saturating_sub(1),
        }
    }

    /// The `id:` line of the frame at `seq`, for resumable streams.
    pub fn id_line(&self, seq: u64) -> bytes::Bytes {
        let at = Position {
            epoch: self.fanout.epoch,
            key: self.key,
            seq,
        };
        message::id_line(&at.id())
    }

    /// From now on the log keeps frames for the replay window, for clients that may
    /// resume, within the global replay budget.
    pub fn mark_resumable(self: &Arc<Self>) {
        let mut state = self.state();
        if !state.resumable {
            state.resumable = true;
            state.log.charge_to(self.fanout.replay.clone());
            self.fanout.replay.register(self);
        }
    }

    /// Whether a client asked for resumable delivery (the subscription then lingers after
    /// its last client, for a reconnect).
    pub fn is_resumable(&self) -> bool {
        self.state().resumable
    }

    /// Moves a client's pin from `pinned_at` back to just after `id`'s position, if the
    /// log still holds every frame since. Returns the new position, or why not.
    pub(crate) fn resume(&self, pinned_at: u64, id: &str) -> Result<u64, Gap> {
        let at = Position::parse(id).ok_or(Gap::Invalid)?;
        if at.epoch != self.fanout.epoch {
            return Err(Gap::OtherEpoch);
        }
        if at.key != self.key {
            return Err(Gap::OtherSubscription);
        }
        let from = at.seq.checked_add(1).ok_or(Gap::Invalid)?;
        let mut state = self.state();
        if from > state.log.next_seq() {
            return Err(Gap::Invalid);
        }
        if from < state.log.first_seq() {
            return Err(Gap::Expired);
        }
        *state.pins.entry(from).or_insert(0) += 1;
        state.unpin(pinned_at);
        Ok(from)
    }

    /// Forgets a pin taken by [`Subscription::pin`] (a client that left before `ready`).
    pub(crate) fn unpin(&self, at: u64) {
        let mut state = self.state();
        state.unpin(at);
    }

    /// Hands a client (its `ready` written) to a writer; its pin goes with it.
    pub fn attach(self: &Arc<Self>, conn: Conn, pinned_at: u64) {
        if let Some(shared) = self.hand_over(conn, pinned_at) {
            self.fanout.tasks.spawn(shard::run(self.clone(), shared));
        }
    }

    /// Puts a client in the inbox of a shard with room, or of a new shard, which the
    /// caller must then run (returned).
    fn hand_over(&self, conn: Conn, pinned_at: u64) -> Option<Arc<ShardShared>> {
        let mut state = self.state();
        // The pin goes only once the shard needs the client's frames: unpinned first, a
        // frame sent between `ready` and now would be dropped as needed by nobody.
        let max = self.fanout.settings.shard_clients.max(1);
        let room = state
            .shards
            .iter_mut()
            .filter(|s| s.attached + s.inbox.len() < max)
            .min_by_key(|s| s.attached + s.inbox.len());
        if let Some(slot) = room {
            slot.needs_from = slot.needs_from.min(conn.next());
            slot.inbox.push(conn);
            slot.shared.waker.wake();
            state.unpin(pinned_at);
            return None;
        }
        let shared = Arc::new(ShardShared {
            id: fastrand::u64(..),
            waker: AtomicWaker::new(),
        });
        state.shards.push(ShardSlot {
            shared: shared.clone(),
            needs_from: conn.next(),
            inbox: vec![conn],
            attached: 0,
        });
        state.unpin(pinned_at);
        Some(shared)
    }

    /// Up to `max` frames from log position `from` on (a copy: shared `Bytes`), or how
    /// many were lost if the log no longer holds `from`. For benches and tests; the
    /// writers read the log themselves.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<Frame>, u64> {
        match self.state().log.read_from(from) {
            log::Read::Frames(frames) => Ok(frames.take(max).cloned().collect()),
            log::Read::Lagged { missed, .. } => Err(missed),
        }
    }

    /// Clients attached to writers now (not counting those waiting for `ready`).
    pub fn attached(&self) -> usize {
        self.state()
            .shards
            .iter()
            .map(|s| s.attached + s.inbox.len())
            .sum()
    }

    /// Frames and bytes the log holds now.
    pub fn held(&self) -> (usize, usize) {
        let state = self.state();
        (state.log.len(), state.log.bytes())
    }
}

impl State {
    fn unpin(&mut self, at: u64) {
        if let Some(n) = self.pins.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&at);
            }
        }
        self.retain(Instant::now());
    }

    /// Drops the frames no client needs any more; a resumable subscription keeps what the
    /// replay window allows (its count, bytes and age bounds) for clients that come back.
    fn retain(&mut self, now: Instant) {
        let needed = self.needed();
        let from = match self.resumable {
            true => self.log.first_seq(),
            false => needed,
        };
        self.log.retain_from(from, now);
        while self.ends.front().is_some_and(|(at, _)| *at < needed) {
            self.ends.pop_front();
        }
    }

    /// The oldest position a client (attached or waiting for `ready`) still needs; the
    /// log's end if none.
    fn needed(&self) -> u64 {
        let pinned = self.pins.keys().next().copied();
        let needed = self.shards.iter().map(|s| s.needs_from).chain(pinned).min();
        needed.unwrap_or_else(|| self.log.next_seq())
    }

    /// When the oldest replay frame (one no client needs, kept for a reconnect) reached
    /// the gateway, if there is one.
    fn replay_front(&self) -> Option<Instant> {
        self.log.front_before(self.needed())
    }

    /// Drops replay frames from the front: those that reached the gateway no later than
    /// `until` (all of them if `None`), until `enough` says so. Returns when the oldest
    /// replay frame left reached the gateway.
    fn drop_replay_front(
        &mut self,
        until: Option<Instant>,
        enough: impl Fn() -> bool,
    ) -> Option<Instant> {
        let needed = self.needed();
        while let Some(at) = self.log.front_before(needed) {
            if until.is_some_and(|until| at > until) || enough() {
                return Some(at);
            }
            self.log.pop_front();
        }
        None
    }
}
