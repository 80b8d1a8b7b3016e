//! One client's stream inside a writer shard: its socket, its position in the log, the
//! rest of a write its socket did not take, and its ping clock.
//!
//! Invariants:
//! - a write is one HTTP/1.1 chunk (or raw bytes on HTTP/1.0); when the socket takes only
//!   part of it, the rest is kept as shared `Bytes` (slices of the log's frames, never
//!   copies of them) and written before anything else: the framing never breaks;
//! - the kept rest is one write's worth at most ([`MAX_FRAMES_PER_WRITE`],
//!   [`MAX_WRITE_BYTES`]); a client further behind only holds a position in the log;
//! - a client that closes its side, sends more than [`MAX_JUNK_BYTES`], or takes no byte
//!   for the stall timeout while it has bytes waiting, is dropped.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;

use super::cursor::{Cursor, Due, Window};
use super::socket::Socket;
use super::write::{
    Framing, MAX_FRAMES_PER_WRITE, MAX_PARTS, MAX_WRITE_BYTES, Parts, Sent, consume, send_chunk,
};
use crate::message::{self, Frame, FrameKind};

/// [`message::BROKER_GAP`] as shared bytes (a write borrows its parts).
static BROKER_GAP: Bytes = Bytes::from_static(message::BROKER_GAP);
use crate::wire::Version;

/// Bytes a streaming client may send (it has nothing to say) before it is dropped.
const MAX_JUNK_BYTES: usize = 4096;

/// What a connection holds for as long as it lives (its registry membership, its
/// admission slot); dropped with it.
pub type Lease = Box<dyn Send + Sync>;

/// One client's stream (see the module doc).
pub struct Conn {
    socket: Socket,
    peer: SocketAddr,
    version: Version,
    resumable: bool,
    /// Its position in the log (the next frame to write).
    cursor: Cursor,
    /// The rest of a write the socket did not take whole.
    pending: VecDeque<Bytes>,
    /// The stream ends once `pending` is written.
    ending: bool,
    next_ping: Instant,
    /// When the socket last took a byte, or since when it has had bytes waiting.
    last_progress: Instant,
    junk: usize,
    _lease: Lease,
}

/// Why a connection left its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// The client closed its side or the socket failed.
    Closed,
    /// The stream ended (an `error`, or the drain's reconnect frame) and was written.
    Ended,
    /// Its socket took no byte for the stall timeout.
    Stalled,
    /// It sent bytes on a stream that only writes.
    Misbehaved,
}

/// What a pass offers every client of a shard.
pub struct PassView<'a> {
    pub now: Instant,
    /// A ping due before this is written now (pings due close together share a pass).
    pub ping_due_by: Instant,
    /// The frames this pass copied out of the log.
    pub window: Window<'a>,
    /// A `ping` frame for clients whose ping is due (and its `id` for resumable ones).
    pub ping: &'a dyn Fn(&Conn) -> Bytes,
    pub ping_interval: std::time::Duration,
    pub stall_timeout: std::time::Duration,
    /// The `gap` event a resumable client that lagged gets (instead of the comment): it
    /// names the position before the first frame it goes on with, and how many it missed.
    pub gap: &'a dyn Fn(u64, u64) -> Bytes,
}

/// What one pass did with one client.
pub enum Step {
    /// Still streaming; `more`: it has writable frames left (a write was full).
    Keep {
        more: bool,
    },
    Gone(Gone),
}

/// What went into a write, for the caller's metrics.
#[derive(Default)]
pub struct Written {
    /// Message frames written, and when each reached the gateway.
    pub frames: Vec<Instant>,
    /// Frames the client had lost to the log's bounds.
    pub missed: u64,
}

impl Conn {
    /// A stream whose `ready` is written, reading from log position `next`.
    pub fn new(
        socket: impl Into<Socket>,
        peer: SocketAddr,
        version: Version,
        resumable: bool,
        next: u64,
        next_ping: Instant,
        lease: Lease,
    ) -> Self {
        Self {
            socket: socket.into(),
            peer,
            version,
            resumable,
            cursor: Cursor::at(next),
            pending: VecDeque::new(),
            ending: false,
            next_ping,
            last_progress: Instant::now(),
            junk: 0,
            _lease: lease,
        }
    }

    /// The log position of the next frame to write.
    pub fn next(&self) -> u64 {
        self.cursor.next()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn resumable(&self) -> bool {
        self.resumable
    }

    /// When this connection next needs a pass for itself (ping, or stall deadline).
    pub fn deadline(&self, stall_timeout: std::time::Duration) -> Instant {
        if self.pending.is_empty() {
            self.next_ping
        } else {
            self.last_progress + stall_timeout
        }
    }

    /// Whether the socket did not take all of the last write (the rest is kept).
    pub fn blocked(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the client lags behind frames it may write now.
    pub fn behind(&self, writable_until: u64) -> bool {
        self.pending.is_empty() && self.cursor.behind(writable_until)
    }

    /// One pass: notice a closed or misbehaving client, finish a pending write, then write
    /// what is due (frames, a lag notice, a ping, the end of the stream).
    pub fn pass(&mut self, cx: &mut Context<'_>, view: &PassView<'_>, out: &mut Written) -> Step {
        if let Err(gone) = self.check_read_side(cx) {
            return Step::Gone(gone);
        }
        match self.flush_pending(cx, view) {
            Ok(true) => {}
            Ok(false) => return Step::Keep { more: false },
            Err(gone) => return Step::Gone(gone),
        }
        if self.ending {
            return Step::Gone(Gone::Ended);
        }
        let Some(due) = self.cursor.due(&view.window) else {
            // Its next frames are not in this pass's copy (it was finishing an earlier
            // write when the copy was taken): the next pass copies them.
            return Step::Keep { more: true };
        };
        let ping_due = view.ping_due_by >= self.next_ping;
        if due.missed == 0 && due.frames.is_empty() && due.end.is_none() && !ping_due {
            return Step::Keep { more: false };
        }
        match self.write_due(cx, view, due, ping_due, out) {
            Ok(()) if self.ending && self.pending.is_empty() => Step::Gone(Gone::Ended),
            Ok(()) => Step::Keep {
                more: self.behind(view.window.writable_until),
            },
            Err(gone) => Step::Gone(gone),
        }
    }

    /// Reads what the client sent (it should send nothing): end of stream means gone.
    /// Registers the task for the next read readiness.
    fn check_read_side(&mut self, cx: &mut Context<'_>) -> Result<(), Gone> {
        let mut buf = [0u8; 256];
        loop {
            match self.socket.poll_read_ready(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(_)) => return Err(Gone::Closed),
                Poll::Ready(Ok(())) => {}
            }
            match self.socket.try_read(&mut buf) {
                Ok(0) => return Err(Gone::Closed),
                Ok(n) => {
                    self.junk += n;
                    if self.junk > MAX_JUNK_BYTES {
                        return Err(Gone::Misbehaved);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(Gone::Closed),
            }
        }
    }

    /// Writes the rest of an earlier write. `Ok(true)`: nothing left; `Ok(false)`: the
    /// socket is full (the task is registered for its write readiness).
    fn flush_pending(&mut self, cx: &mut Context<'_>, view: &PassView<'_>) -> Result<bool, Gone> {
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_PARTS];
            let mut n = 0;
            for (slot, bytes) in slices.iter_mut().zip(&self.pending) {
                *slot = IoSlice::new(bytes);
                n += 1;
            }
            match self.socket.send(&slices[..n]) {
                Ok(0) => return Err(Gone::Closed),
                Ok(n) => {
                    self.last_progress = view.now;
                    consume(&mut self.pending, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if view.now.saturating_duration_since(self.last_progress) >= view.stall_timeout
                    {
                        return Err(Gone::Stalled);
                    }
                    match self.socket.poll_write_ready(cx) {
                        Poll::Pending => return Ok(false),
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Err(Gone::Closed),
                    }
                }
                Err(_) => return Err(Gone::Closed),
            }
        }
        Ok(true)
    }

    /// Assembles and writes one chunk: a notice if the client lost frames, the frames
    /// due to it, a ping if due, and the end of the stream if a frame ends it. The cursor
    /// moves past exactly what the chunk carries.
    fn write_due(
        &mut self,
        cx: &mut Context<'_>,
        view: &PassView<'_>,
        due: Due<'_>,
        ping_due: bool,
        out: &mut Written,
    ) -> Result<(), Gone> {
        let mut parts = Parts::default();
        let mut lag_notice = Bytes::new();
        let mut end_frame = Bytes::new();
        if due.missed > 0 {
            out.missed += due.missed;
            tracing::debug!(peer = %self.peer, missed = due.missed, "slow client lost messages");
            let resumes_at = due.at() - u64::from(due.end.is_some());
            lag_notice = if self.resumable {
                (view.gap)(resumes_at, due.missed)
            } else {
                message::lagged_comment(due.missed)
            };
        }
        parts.push_shared(&lag_notice, 0, lag_notice.len());
        if let Some(end) = due.end {
            // The frame that ends the stream was among those lost: it still ends it.
            self.cursor.advance(&due, 0);
            end_frame = self.end_frame(end);
            self.ending = true;
            parts.push_shared(&end_frame, 0, end_frame.len());
            return self.write(cx, view, parts);
        }
        let mut taken = 0;
        let mut bytes = 0;
        for (i, frame) in due.frames.iter().enumerate() {
            if taken == MAX_FRAMES_PER_WRITE || (taken > 0 && bytes >= MAX_WRITE_BYTES) {
                break;
            }
            taken += 1;
            bytes += frame.bytes.len();
            match frame.kind {
                FrameKind::Message => {
                    out.frames.push(frame.received);
                    match due.ids.get(i).filter(|_| self.resumable) {
                        Some(id) => {
                            parts.push_shared(&frame.bytes, 0, message::before_id(&frame.bytes));
                            parts.push_shared(id, 0, id.len());
                        }
                        None => parts.push_shared(&frame.bytes, 0, frame.bytes.len()),
                    }
                }
                FrameKind::Comment => parts.push_shared(&frame.bytes, 0, frame.bytes.len()),
                FrameKind::Missed => match due.ids.get(i).filter(|_| self.resumable) {
                    Some(id) => {
                        parts.push_shared(&BROKER_GAP, 0, BROKER_GAP.len());
                        parts.push_shared(id, 0, id.len());
                    }
                    None => parts.push_shared(&frame.bytes, 0, frame.bytes.len()),
                },
                FrameKind::End | FrameKind::Drain => {
                    end_frame = self.end_frame(frame);
                    self.ending = true;
                }
            }
            if self.ending {
                break;
            }
        }
        self.cursor.advance(&due, taken);
        let ping;
        if ping_due && !self.ending {
            ping = (view.ping)(self);
            parts.push_shared(&ping, 0, ping.len());
            self.next_ping = view.now + view.ping_interval;
        }
        parts.push_shared(&end_frame, 0, end_frame.len());
        if parts.is_empty() {
            return Ok(());
        }
        self.write(cx, view, parts)
    }

    /// What a frame that ends the stream writes: an `error` as it is; the drain marker
    /// as this client's own reconnect frame (its retry delay is jittered per client).
    fn end_frame(&self, frame: &Frame) -> Bytes {
        match frame.kind {
            FrameKind::Drain => message::drain_frame(self.resumable),
            _ => frame.bytes.clone(),
        }
    }

    /// Frames `parts` as one chunk and writes it; keeps what the socket did not take.
    fn write(
        &mut self,
        cx: &mut Context<'_>,
        view: &PassView<'_>,
        parts: Parts<'_>,
    ) -> Result<(), Gone> {
        let framing = Framing {
            chunked: self.version.chunked(),
            last: self.ending,
        };
        let sent = send_chunk(&self.socket, framing, &parts, &mut self.pending)
            .map_err(|_| Gone::Closed)?;
        // Progress, or the start of a wait for the socket to take the rest.
        self.last_progress = view.now;
        if sent == Sent::All {
            return Ok(());
        }
        match self.socket.poll_write_ready(cx) {
            Poll::Ready(Err(_)) => Err(Gone::Closed),
            // Writable again already: the next pass writes the rest.
            Poll::Ready(Ok(())) => {
                cx.waker().wake_by_ref();
                Ok(())
            }
            Poll::Pending => Ok(()),
        }
    }

    /// Closes the sending side after the last bytes (a clean end for the client).
    pub fn finish(self) {
        self.socket.shutdown_write();
    }
}
