//! A subscription's log: the frames its clients have not all written yet, each with its
//! sequence number, bounded by count, bytes and age.
//!
//! Invariants:
//! - sequence numbers start at 1, grow by one per frame and are never reused within a
//!   subscription; frame `seq` is at index `seq - first`;
//! - memory follows the traffic, never the configured capacity: the deque starts empty
//!   and keeps only frames that some reader still needs (`retain_from`), or that the
//!   replay window keeps for clients that may resume; and never more than `max_frames`
//!   frames, `max_bytes` bytes, or frames older than `max_age` (the oldest go first);
//! - the log makes room before it grows: a full log drops its oldest frame before it
//!   takes a new one, so its deque never grows past `max_frames` slots;
//! - the log of a resumable subscription counts its bytes in the global replay budget
//!   (see `replay`), from the moment it is charged to it until it is dropped;
//! - a reader whose next frame was dropped has lagged: it learns how many it missed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::replay::ReplayBudget;
use crate::message::Frame;

/// What one frame costs a log besides its bytes: its entry (the shared `Bytes` handle,
/// when it arrived, its kind). Counted in the replay budget, since many subscriptions
/// with small messages hold more in entries than in bytes (56 bytes each on x86_64).
const SLOT_BYTES: usize = std::mem::size_of::<Frame>();

/// How much a log may hold.
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    /// Most frames (SUBSCRIPTION_BUFFER).
    pub max_frames: usize,
    /// Most bytes of frames (SUBSCRIPTION_BUFFER_BYTES).
    pub max_bytes: usize,
    /// Oldest frame kept for a client that may resume (REPLAY_WINDOW).
    pub max_age: Duration,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_frames: 1024,
            max_bytes: 8 * 1024 * 1024,
            max_age: Duration::from_secs(300),
        }
    }
}

/// The frames of one subscription (see the module doc).
pub struct Log {
    /// Sequence number of `frames[0]` (or of the next frame when empty).
    first: u64,
    frames: VecDeque<Frame>,
    bytes: usize,
    limits: LogLimits,
    /// The global replay budget its bytes count in, once its subscription is resumable.
    budget: Option<Arc<ReplayBudget>>,
}

/// What a reader at a position can read.
pub enum Read<'a> {
    /// Frames from the reader's position on (possibly none yet).
    Frames(std::collections::vec_deque::Iter<'a, Frame>),
    /// The reader's next frames were dropped: this many (reading resumes at the log's
    /// first frame).
    Lagged { missed: u64 },
}

impl Log {
    pub fn new(limits: LogLimits) -> Self {
        Self {
            first: 1,
            frames: VecDeque::new(),
            bytes: 0,
            limits,
            budget: None,
        }
    }

    /// Counts this log's memory in `budget` from now on.
    pub fn charge_to(&mut self, budget: Arc<ReplayBudget>) {
        if self.budget.is_none() {
            budget.add(self.bytes + self.frames.len() * SLOT_BYTES);
            self.budget = Some(budget);
        }
    }

    /// The sequence number the next frame will get: a new reader starts here.
    pub fn next_seq(&self) -> u64 {
        self.first + self.frames.len() as u64
    }

    /// The oldest sequence number still held.
    pub fn first_seq(&self) -> u64 {
        self.first
    }

    /// Drops the oldest frames that the count and byte bounds leave no room for, then
    /// appends `frame`; returns its sequence number. A frame larger than the byte bound is
    /// kept, alone.
    pub fn push(&mut self, frame: Frame) -> u64 {
        let len = frame.size();
        while !self.frames.is_empty()
            && (self.frames.len() >= self.limits.max_frames.max(1)
                || self.bytes + len > self.limits.max_bytes)
        {
            self.pop_front();
        }
        let seq = self.next_seq();
        self.bytes += len;
        if let Some(budget) = &self.budget {
            budget.add(len + SLOT_BYTES);
        }
        self.frames.push_back(frame);
        seq
    }

    /// When the oldest frame reached the gateway, if the log holds one before `seq`.
    pub fn front_before(&self, seq: u64) -> Option<Instant> {
        (self.first < seq)
            .then(|| self.frames.front().map(|f| f.received))
            .flatten()
    }

    /// Frames from `seq` on.
    pub fn read_from(&self, seq: u64) -> Read<'_> {
        if seq < self.first {
            return Read::Lagged {
                missed: self.first - seq,
            };
        }
        let skip = usize::try_from(seq - self.first).unwrap_or(usize::MAX);
        Read::Frames(self.frames.range(skip.min(self.frames.len())..))
    }

    /// Drops frames before `seq` (no reader needs them) and frames older than the replay
    /// window, whichever drops more.
    pub fn retain_from(&mut self, seq: u64, now: std::time::Instant) {
        while self.first < seq && !self.frames.is_empty() {
            self.pop_front();
        }
        while let Some(front) = self.frames.front() {
            if now.saturating_duration_since(front.received) <= self.limits.max_age {
                break;
            }
            self.pop_front();
        }
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes of the frames held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops the oldest frame.
    pub fn pop_front(&mut self) {
        if let Some(frame) = self.frames.pop_front() {
            self.bytes -= frame.size();
            if let Some(budget) = &self.budget {
                budget.sub(frame.size() + SLOT_BYTES);
            }
            self.first += 1;
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.sub(self.bytes + self.frames.len() * SLOT_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Instant;

    fn frame(text: &'static str) -> Frame {
        Frame::message(Bytes::from_static(text.as_bytes()), Instant::now())
    }

    fn limits(max_frames: usize, max_bytes: usize) -> LogLimits {
        LogLimits {
            max_frames,
            max_bytes,
            max_age: Duration::from_secs(60),
        }
    }

    fn texts(log: &Log, from: u64) -> Vec<Bytes> {
        match log.read_from(from) {
            Read::Frames(frames) => frames.map(|f| f.bytes.clone()).collect(),
            Read::Lagged { .. } => panic!("lagged"),
        }
    }

    #[test]
    fn sequence_numbers_and_reads() {
        let mut log = Log::new(limits(8, 1024));
        assert_eq!(log.next_seq(), 1);
        assert_eq!(log.push(frame("a")), 1);
        assert_eq!(log.push(frame("b")), 2);
        assert_eq!(texts(&log, 1), vec!["a", "b"]);
        assert_eq!(texts(&log, 2), vec!["b"]);
        assert!(texts(&log, 3).is_empty());
        assert!(texts(&log, 99).is_empty());
    }

    #[test]
    fn bounded_by_count_and_bytes_and_readers_behind_lag() {
        let mut log = Log::new(limits(3, 1024));
        for t in ["a", "b", "c", "d", "e"] {
            log.push(frame(t));
        }
        assert_eq!((log.first_seq(), log.len()), (3, 3));
        assert!(matches!(log.read_from(1), Read::Lagged { missed: 2 }));
        let mut log = Log::new(limits(100, 10));
        for t in ["aaaa", "bbbb", "cccc"] {
            log.push(frame(t));
        }
        assert_eq!((log.first_seq(), log.bytes()), (2, 8));
        // A frame larger than the byte bound is still kept, alone.
        log.push(frame("xxxxxxxxxxxxxxxx"));
        assert_eq!((log.len(), log.first_seq()), (1, 4));
    }

    #[test]
    fn a_full_log_makes_room_before_it_grows() {
        let mut log = Log::new(limits(64, usize::MAX));
        for _ in 0..1000 {
            log.push(frame("x"));
        }
        assert_eq!(log.len(), 64);
        assert!(
            log.frames.capacity() <= 64,
            "{} slots for 64 frames",
            log.frames.capacity()
        );
    }

    #[test]
    fn retained_only_while_needed_and_within_the_window() {
        let mut log = Log::new(limits(100, 1024));
        for t in ["a", "b", "c"] {
            log.push(frame(t));
        }
        log.retain_from(3, Instant::now());
        assert_eq!((log.first_seq(), log.len()), (3, 1));
        log.retain_from(10, Instant::now());
        assert!(log.is_empty());
        assert_eq!((log.first_seq(), log.next_seq()), (4, 4));
        log.push(frame("d"));
        log.retain_from(1, Instant::now() + Duration::from_secs(120));
        assert!(log.is_empty(), "older than the window");
        assert_eq!(log.next_seq(), 5);
    }
}
