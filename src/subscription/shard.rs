//! A writer shard: one task that writes a subscription's frames to up to
//! [`SHARD_CLIENTS`](super::SHARD_CLIENTS) client sockets.
//!
//! Each pass (woken by a new frame, a socket becoming readable or writable, or its timer):
//! take the clients handed over, copy the frames they need out of the log (reference
//! counts, under the lock) into a window, then visit every client once, without the
//! lock: notice a closed socket, finish a write the socket did not take, and write what
//! is due from its own position (see `cursor`) in one non-blocking vectored write. A
//! client whose frames are not in the window (it finished an earlier write during the
//! pass) is served by the next pass, at once. Then report back the clients held and the
//! oldest position they need, so that the log drops what nobody needs.
//!
//! Invariants:
//! - the task never waits on one socket: a write that would block is kept by its
//!   connection and finished when that socket is writable again;
//! - write coalescing (`WRITE_COALESCE`) is per shard: new frames that follow the shard's
//!   previous flush within the window wait for its end and leave together, in one write
//!   per client; frames after a quiet spell go at once (no timer);
//! - the task ends when it holds no client and none is waiting to be taken, under the
//!   subscription's lock, so that a client handed over is never lost.

use std::cell::RefCell;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prometheus::local::{LocalHistogram, LocalIntCounter};

use super::conn::{Conn, Gone, PassView, Step, Written};
use super::cursor::Window;
use super::log::Read;
use super::{ShardShared, Subscription};
use crate::message::{self, Frame};

/// Frames a pass copies out of the log at most (a client further behind catches up over
/// several passes).
const MAX_FRAMES_PER_PASS: usize = 4096;
/// The longest a pass may come early for a ping: pings of clients due close together
/// share a pass.
const MAX_PING_SLACK: Duration = Duration::from_millis(250);

/// Runs the shard until it holds no client, or the server stops.
pub(super) async fn run(sub: Arc<Subscription>, shared: Arc<ShardShared>) {
    let mut closing = std::pin::pin!(sub.fanout.closing.clone().cancelled_owned());
    let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut shard = Shard::new(sub, shared);
    // Unconstrained: a pass polls the readiness of every socket of the shard, more than
    // tokio's per-poll budget allows; a pass is bounded by the shard's size.
    let poll = std::future::poll_fn(|cx| {
        if closing.as_mut().poll(cx).is_ready() {
            shard.close();
            return Poll::Ready(());
        }
        match shard.pass(cx, Instant::now()) {
            Pass::Ended => Poll::Ready(()),
            Pass::Again => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Pass::Until(deadline) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    });
    tokio::task::coop::unconstrained(poll).await;
}

/// What a pass leaves to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pass {
    /// The shard holds no client and none is waiting: the task ends.
    Ended,
    /// A client has more to write at once: pass again.
    Again,
    /// Pass again when woken (a frame, a client, a socket), or at this time at the latest
    /// (a ping, a stall deadline, the end of the coalescing window).
    Until(Instant),
}

pub(super) struct Shard {
    sub: Arc<Subscription>,
    shared: Arc<ShardShared>,
    clients: Vec<Conn>,
    /// This pass's copy of the frames its clients need (reused).
    frames: Vec<Frame>,
    /// The `id:` line of each of `frames`, when a client of the shard is resumable.
    ids: Vec<Bytes>,
    /// This pass's copy of the subscription's frames that end streams (see `cursor`).
    ends: Vec<(u64, Frame)>,
    /// Frames before this position may be written; later ones wait for the end of the
    /// coalescing window.
    synced: u64,
    last_flush: Option<Instant>,
    written: Written,
    /// Clients counted in the `streams_blocked` gauge by this shard.
    blocked: i64,
    latency: LocalHistogram,
    delivered: LocalIntCounter,
}

impl Shard {
    pub(super) fn new(sub: Arc<Subscription>, shared: Arc<ShardShared>) -> Self {
        let fanout = sub.fanout.clone();
        Self {
            sub,
            shared,
            clients: Vec::new(),
            frames: Vec::new(),
            ids: Vec::new(),
            ends: Vec::new(),
            synced: 0,
            last_flush: None,
            written: Written::default(),
            blocked: 0,
            latency: fanout.metrics.fanout_latency.local(),
            delivered: fanout.metrics.messages_delivered.local(),
        }
    }

    /// One pass at time `now` (see the module doc). The task registers for the shard's
    /// wake-ups and for the readiness of every socket it could not finish.
    pub(super) fn pass(&mut self, cx: &mut Context<'_>, now: Instant) -> Pass {
        self.shared.waker.register(cx.waker());
        let (log_first, first, hold_until) = self.take_clients_and_frames(now);
        let settings = &self.sub.fanout.settings;
        let ping_slack = (settings.ping_interval / 10).min(MAX_PING_SLACK);
        self.ids.clear();
        if self.clients.iter().any(Conn::resumable) {
            let sub = &self.sub;
            self.ids
                .extend((0..self.frames.len() as u64).map(|i| sub.id_line(first + i)));
        }
        let ping: RefCell<Option<Bytes>> = RefCell::new(None);
        let ping_for = |conn: &Conn| {
            let shared = ping
                .borrow_mut()
                .get_or_insert_with(|| message::ping_frame(SystemTime::now()))
                .clone();
            if !conn.resumable() {
                return shared;
            }
            // A resumable stream's ping names its position, so that a client that saw no
            // message can still resume.
            message::with_id(&shared, &self.sub.id_line(conn.next().saturating_sub(1)))
        };
        let gap = |at: u64, missed: u64| {
            let at = self.sub.position(at);
            message::gap_frame("slow", Some(missed), &at.id())
        };
        let view = PassView {
            now,
            ping_due_by: now + ping_slack,
            window: Window {
                frames: &self.frames,
                ids: &self.ids,
                first,
                log_first,
                writable_until: self.synced,
                ends: &self.ends,
            },
            ping: &ping_for,
            ping_interval: settings.ping_interval,
            stall_timeout: settings.stall_timeout,
            gap: &gap,
        };
        let mut more = false;
        let mut wrote_frames = false;
        let mut deadline = hold_until.unwrap_or(now + settings.ping_interval);
        let mut i = 0;
        while i < self.clients.len() {
            let step = self.clients[i].pass(cx, &view, &mut self.written);
            wrote_frames |= !self.written.frames.is_empty();
            for at in self.written.frames.drain(..) {
                self.latency
                    .observe(now.saturating_duration_since(at).as_secs_f64());
                self.delivered.inc();
            }
            if self.written.missed > 0 {
                self.sub
                    .fanout
                    .metrics
                    .dropped("slow_client", std::mem::take(&mut self.written.missed));
            }
            match step {
                Step::Keep { more: behind } => {
                    more |= behind;
                    deadline = deadline.min(self.clients[i].deadline(settings.stall_timeout));
                    i += 1;
                }
                Step::Gone(gone) => {
                    let conn = self.clients.swap_remove(i);
                    self.gone(conn, gone);
                }
            }
        }
        self.latency.flush();
        self.delivered.flush();
        if wrote_frames {
            // The coalescing window opens with a write of frames (not with a ping).
            self.last_flush = Some(now);
        }
        let blocked = self.clients.iter().filter(|c| c.blocked()).count() as i64;
        self.set_blocked(blocked);
        if self.report(now) {
            return Pass::Ended;
        }
        if more {
            return Pass::Again;
        }
        Pass::Until(deadline)
    }

    /// Takes the clients handed over and copies the frames the clients need; decides
    /// whether new frames go now or wait for the coalescing window. Returns the log's
    /// oldest position, the position of the first frame copied and, if frames wait,
    /// until when.
    fn take_clients_and_frames(&mut self, now: Instant) -> (u64, u64, Option<Instant>) {
        let mut state = self.sub.state();
        if let Some(slot) = state
            .shards
            .iter_mut()
            .find(|s| s.shared.id == self.shared.id)
        {
            self.clients.append(&mut slot.inbox);
        }
        let head = state.log.next_seq();
        let log_first = state.log.first_seq();
        self.ends.clear();
        self.ends.extend(state.ends.iter().cloned());
        let mut hold_until = None;
        if head > self.synced {
            let window = self.sub.fanout.settings.write_coalesce;
            match self.last_flush {
                Some(last) if !window.is_zero() && now < last + window => {
                    hold_until = Some(last + window);
                }
                _ => self.synced = head,
            }
        }
        let from = self
            .clients
            .iter()
            .filter(|c| c.behind(self.synced))
            .map(Conn::next)
            .min()
            .unwrap_or(self.synced)
            .max(log_first);
        self.frames.clear();
        if let Read::Frames(frames) = state.log.read_from(from) {
            self.frames
                .extend(frames.take(MAX_FRAMES_PER_PASS).cloned());
        }
        (log_first, from, hold_until)
    }

    /// Brings the `streams_blocked` gauge up to date with this shard's count.
    fn set_blocked(&mut self, blocked: i64) {
        if blocked != self.blocked {
            self.sub
                .fanout
                .metrics
                .streams_blocked
                .add(blocked - self.blocked);
            self.blocked = blocked;
        }
    }

    /// A client leaves the shard: counted, and its socket closed cleanly if its stream
    /// ended.
    fn gone(&self, conn: Conn, gone: Gone) {
        let metrics = &self.sub.fanout.metrics;
        tracing::debug!(peer = %conn.peer(), ?gone, "stream ended");
        match gone {
            Gone::Ended => conn.finish(),
            Gone::Closed => metrics.http_error("client_closed"),
            Gone::Stalled => metrics.http_error("stalled"),
            Gone::Misbehaved => metrics.http_error("unexpected_data"),
        }
    }

    /// Tells the subscription what the shard holds and needs; drops unneeded frames.
    /// Returns whether the shard ended (it held no client and none was waiting).
    fn report(&mut self, now: Instant) -> bool {
        let needs_from = self.clients.iter().map(Conn::next).min();
        let mut state = self.sub.state();
        let Some(index) = state
            .shards
            .iter()
            .position(|s| s.shared.id == self.shared.id)
        else {
            return true;
        };
        let slot = &mut state.shards[index];
        if self.clients.is_empty() && slot.inbox.is_empty() {
            state.shards.swap_remove(index);
            state.retain(now);
            return true;
        }
        slot.attached = self.clients.len();
        slot.needs_from = needs_from
            .into_iter()
            .chain(slot.inbox.iter().map(Conn::next))
            .min()
            .unwrap_or(self.synced);
        state.retain(now);
        false
    }

    /// The server stopped: whoever is still here, or was handed over and not taken yet,
    /// is cut off.
    pub(super) fn close(&mut self) {
        self.clients.clear();
        self.set_blocked(0);
        let slot = {
            let mut state = self.sub.state();
            let index = state
                .shards
                .iter()
                .position(|s| s.shared.id == self.shared.id);
            let slot = index.map(|i| state.shards.swap_remove(i));
            state.retain(Instant::now());
            slot
        };
        // Dropped without the subscription's lock: a connection's lease leaves the
        // registry, which may look at this subscription again.
        drop(slot);
    }
}
