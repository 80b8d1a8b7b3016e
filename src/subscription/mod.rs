//! A subscription: one distinct binding set, the log of frames its clients share, and the
//! writers that put those frames on the clients' sockets.
//!
//! How a frame travels: the topology routes a delivery to the subscriptions it matches and
//! calls [`Subscription::send`], which appends the frame (encoded once, shared `Bytes`) to
//! the [`Log`] and wakes the subscription's writer shards: one wake per shard, never one
//! per client. Each [`shard`] is a task that owns up to [`SHARD_CLIENTS`] client sockets
//! and writes the new frames to all of them in one pass, with non-blocking writes.
//!
//! Invariants:
//! - fan-out never waits on a slow client: a socket that would block keeps its unwritten
//!   rest (at most one write's worth) and its position in the log; the others go on; the
//!   log's bounds decide when it has lagged (it is then told how many frames it lost);
//! - memory follows traffic: the log holds only frames a client still needs, or that the
//!   replay window keeps for clients that may resume, within its bounds;
//! - a client attached here was given `ready` first (by `stream::connect`); it reads every
//!   frame sent after it subscribed ([`Subscription::pin`]);
//! - the lock is a std `Mutex`, never held across an `.await` nor during a socket write:
//!   a shard copies the frames it needs (reference counts) and writes after unlocking.
//!
//! This type sits below the registry (which creates and counts subscriptions) and the
//! topology (which routes deliveries to them): http → registry → topology → subscription.

mod conn;
mod log;
mod shard;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

pub use conn::{Conn, Lease};
pub use log::{Log, LogLimits};

use crate::binding::BindingSet;
use crate::message::Frame;
use crate::metrics::Metrics;

/// Most clients one writer task serves. A pass over a shard writes to each of its clients
/// in turn on one core; more shards let the runtime's workers share a wide fan-out, and
/// bound how long the last client of a shard waits for a frame.
pub const SHARD_CLIENTS: usize = 256;

/// How streams are written.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    pub ping_interval: Duration,
    pub ready_timeout: Duration,
    /// After a write, how long further frames may wait to be written together (0: never).
    pub write_coalesce: Duration,
    /// A stream whose socket takes no byte for this long while it has bytes to write is
    /// ended (STALL_TIMEOUT).
    pub stall_timeout: Duration,
    pub log: LogLimits,
}

impl Default for StreamSettings {
    /// The defaults of the configuration.
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(20),
            ready_timeout: Duration::from_secs(30),
            write_coalesce: Duration::from_millis(10),
            stall_timeout: Duration::from_secs(40),
            log: LogLimits::default(),
        }
    }
}

/// What every subscription's writers share.
pub struct Fanout {
    pub settings: StreamSettings,
    pub metrics: Metrics,
    /// Cancelled when the gateway starts draining. Streams learn of a drain from the
    /// marker frame in their log; this is looked at only for a stream that lagged, since
    /// the marker may be among the frames it lost.
    pub draining: CancellationToken,
    /// Cancelled when the server stops: writers close every socket they still hold.
    pub closing: CancellationToken,
}

impl Fanout {
    pub fn new(settings: StreamSettings, metrics: Metrics) -> Arc<Self> {
        Self::with_draining(settings, metrics, CancellationToken::new())
    }

    /// Writers that learn of a drain from `draining` too (see [`Fanout::draining`]).
    pub fn with_draining(
        settings: StreamSettings,
        metrics: Metrics,
        draining: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            metrics,
            draining,
            closing: CancellationToken::new(),
        })
    }
}

/// One distinct binding set, its log and its writers.
pub struct Subscription {
    bindings: Arc<BindingSet>,
    fanout: Arc<Fanout>,
    state: Mutex<State>,
    /// Clients holding this subscription; changed only under the registry's shard lock.
    pub(crate) clients: AtomicUsize,
}

struct State {
    log: Log,
    shards: Vec<ShardSlot>,
    /// Positions of clients that subscribed but are not attached yet (waiting for
    /// `ready`): the log keeps their frames.
    pins: BTreeMap<u64, usize>,
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
            fanout,
            state: Mutex::new(State {
                log,
                shards: Vec::new(),
                pins: BTreeMap::new(),
            }),
            clients: AtomicUsize::new(1),
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
        state.log.push(frame);
        if state.shards.is_empty() && state.pins.is_empty() {
            // Nobody will read it.
            let next = state.log.next_seq();
            state.log.retain_from(next, Instant::now());
        }
        for slot in &state.shards {
            slot.shared.waker.wake();
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

    /// Forgets a pin taken by [`Subscription::pin`] (a client that left before `ready`).
    pub(crate) fn unpin(&self, at: u64) {
        let mut state = self.state();
        state.unpin(at);
    }

    /// Hands a client (its `ready` written) to a writer; its pin goes with it.
    pub fn attach(self: &Arc<Self>, conn: Conn, pinned_at: u64) {
        let mut state = self.state();
        state.unpin(pinned_at);
        let room = state
            .shards
            .iter_mut()
            .filter(|s| s.attached + s.inbox.len() < SHARD_CLIENTS)
            .min_by_key(|s| s.attached + s.inbox.len());
        if let Some(slot) = room {
            slot.needs_from = slot.needs_from.min(conn.next());
            slot.inbox.push(conn);
            slot.shared.waker.wake();
            return;
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
        drop(state);
        tokio::spawn(shard::run(self.clone(), shared));
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

    /// Drops the frames no client needs any more.
    fn retain(&mut self, now: Instant) {
        let pinned = self.pins.keys().next().copied();
        let needed = self.shards.iter().map(|s| s.needs_from).chain(pinned).min();
        let from = needed.unwrap_or_else(|| self.log.next_seq());
        self.log.retain_from(from, now);
    }
}
