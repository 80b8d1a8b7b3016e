//! A client's position in its subscription's log, and the one way it moves.
//!
//! The stream rule: a client's stream is its subscription's frames in order from its own
//! position, each frame exactly once, or one notice covering exactly the frames the log
//! dropped before the client could write them. This file is where the rule is kept:
//! [`Cursor::due`] is the only place that decides which frames a client may write now,
//! and [`Cursor::advance`] the only place that moves the client, by what a write took of
//! those frames. A shard copies frames out of the log into a [`Window`]; a client whose
//! frames are not in that copy (it was busy finishing an earlier write when the copy was
//! taken, or is too far ahead of the slowest client) gets nothing from it and is served
//! by the next pass: never another client's frames.

use bytes::Bytes;

use crate::message::Frame;

/// The frames a shard's pass copied out of its subscription's log, and where they sit.
pub struct Window<'a> {
    /// Copies of the log's frames from position `first` on.
    pub frames: &'a [Frame],
    /// The `id:` line of each of `frames`, or none when no client of the shard resumes.
    pub ids: &'a [Bytes],
    pub first: u64,
    /// The log's oldest position: a client before it has lost frames.
    pub log_first: u64,
    /// Frames before this position may be written now; later ones wait for the end of
    /// the coalescing window.
    pub writable_until: u64,
    /// The subscription's frames that end its streams (an `error`, the drain marker)
    /// that a client may still need, with their positions, oldest first: a client that
    /// lost one to the log's bounds still ends with it.
    pub ends: &'a [(u64, Frame)],
}

/// What a client may write now, read from a window at its own position.
#[derive(Debug)]
pub struct Due<'a> {
    /// Frames the log dropped before the client wrote them (0: none). They are written as
    /// one notice, before `frames`.
    pub missed: u64,
    /// The frames from the client's position (past the missed ones) on, that may be
    /// written now; possibly none.
    pub frames: &'a [Frame],
    /// The `id:` line of each of `frames` (empty if the window has none).
    pub ids: &'a [Bytes],
    /// The frame that ends the stream, when the log dropped it among the missed ones:
    /// it is written after the notice, and nothing after it.
    pub end: Option<&'a Frame>,
    /// The position of `frames[0]` (or just past `end`).
    at: u64,
}

impl Due<'_> {
    /// The position of the first frame due (past the missed ones).
    pub fn at(&self) -> u64 {
        self.at
    }
}

/// A client's position: the log position of the next frame it will write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor(u64);

impl Cursor {
    /// A client that reads from log position `next` on.
    pub fn at(next: u64) -> Self {
        Self(next)
    }

    /// The log position of the next frame to write.
    pub fn next(self) -> u64 {
        self.0
    }

    /// Whether the client has frames before `until` still to write.
    pub fn behind(self, until: u64) -> bool {
        self.0 < until
    }

    /// What is due from `window` at this position: the frames the log dropped since, then
    /// the frames that may be written now. `None` when the window does not hold the
    /// client's next frame although it may be written now: the client needs another pass.
    pub fn due<'a>(self, window: &Window<'a>) -> Option<Due<'a>> {
        let at = self.0.max(window.log_first);
        let lost_end = window.ends.iter().find(|(e, _)| (self.0..at).contains(e));
        if let Some((end_at, end)) = lost_end {
            // The stream ends with a frame the log dropped: the notice covers the frames
            // before it, and the stream ends with it.
            return Some(Due {
                missed: end_at - self.0,
                frames: &[],
                ids: &[],
                end: Some(end),
                at: end_at + 1,
            });
        }
        let missed = at - self.0;
        let copied_until = window.first + window.frames.len() as u64;
        let until = window.writable_until.min(copied_until);
        if at < until && at < window.first {
            // Its next frame is in the log, not in this copy.
            return None;
        }
        if at >= until && at < window.writable_until {
            // Frames it may write now, beyond this copy.
            return None;
        }
        let (from, to) = if at < until {
            (index(at - window.first), index(until - window.first))
        } else {
            (0, 0)
        };
        let ids = match window.ids.len() {
            0 => &[][..],
            _ => &window.ids[from..to],
        };
        Some(Due {
            missed,
            frames: &window.frames[from..to],
            ids,
            end: None,
            at,
        })
    }

    /// Moves past what a write took from `due`: its missed frames (and its end frame)
    /// and the first `taken` of its frames.
    pub fn advance(&mut self, due: &Due<'_>, taken: usize) {
        debug_assert!(taken <= due.frames.len());
        debug_assert!(due.at >= self.0);
        self.0 = due.at + taken.min(due.frames.len()) as u64;
    }
}

/// A distance within a window as an index (a window holds at most a few thousand frames).
fn index(distance: u64) -> usize {
    usize::try_from(distance).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn frames(n: usize) -> Vec<Frame> {
        (0..n)
            .map(|i| Frame::message(Bytes::from(format!("{i}")), Instant::now()))
            .collect()
    }

    fn window(frames: &[Frame], first: u64, log_first: u64, writable_until: u64) -> Window<'_> {
        Window {
            frames,
            ids: &[],
            first,
            log_first,
            writable_until,
            ends: &[],
        }
    }

    #[test]
    fn a_client_reads_from_its_own_position() {
        let copy = frames(5); // positions 10..15
        let w = window(&copy, 10, 8, 15);
        let due = Cursor::at(12).due(&w).expect("in the window");
        assert_eq!((due.missed, due.at(), due.frames.len()), (0, 12, 3));
        assert_eq!(due.frames[0].bytes, "2");
        let mut cursor = Cursor::at(12);
        cursor.advance(&due, 2);
        assert_eq!(cursor.next(), 14);
    }

    #[test]
    fn frames_dropped_by_the_log_are_missed_then_reading_goes_on() {
        let copy = frames(5); // positions 10..15
        let w = window(&copy, 10, 10, 15);
        let due = Cursor::at(4).due(&w).expect("in the window");
        assert_eq!((due.missed, due.at(), due.frames.len()), (6, 10, 5));
        let mut cursor = Cursor::at(4);
        cursor.advance(&due, 0);
        assert_eq!(cursor.next(), 10, "the notice covers 4..10, nothing else");
    }

    #[test]
    fn a_client_behind_the_copy_gets_nothing_from_it() {
        // The copy starts at 12 (where the other clients are); the log still holds 9.
        let copy = frames(3);
        let w = window(&copy, 12, 8, 15);
        assert!(Cursor::at(9).due(&w).is_none());
        // Behind the log too: the notice would cover 4..8 only; it waits for a copy.
        assert!(Cursor::at(4).due(&w).is_none());
    }

    #[test]
    fn a_client_beyond_the_copy_gets_nothing_from_it() {
        let copy = frames(3); // 10..13, though 13 and 14 may be written
        let w = window(&copy, 10, 10, 15);
        assert!(Cursor::at(13).due(&w).is_none());
        let due = Cursor::at(15).due(&w).expect("up to date");
        assert!(due.frames.is_empty());
    }

    #[test]
    fn an_end_frame_lost_to_the_log_still_ends_the_stream() {
        let ends = [
            (7, Frame::end(Bytes::from_static(b"event: error\n"))),
            (9, Frame::drain()),
        ];
        let copy = frames(2); // 10..12; end frames were at 7 and 9
        let mut w = window(&copy, 10, 10, 12);
        w.ends = &ends;
        let due = Cursor::at(4).due(&w).expect("due");
        assert_eq!((due.missed, due.frames.len()), (3, 0), "4..7, then the end");
        assert!(
            due.end
                .is_some_and(|f| f.kind == crate::message::FrameKind::End)
        );
        let mut cursor = Cursor::at(4);
        cursor.advance(&due, 0);
        assert_eq!(cursor.next(), 8);
        // A client past the first ends with the second.
        let due = Cursor::at(8).due(&w).expect("due");
        assert_eq!(due.missed, 1);
        assert!(
            due.end
                .is_some_and(|f| f.kind == crate::message::FrameKind::Drain)
        );
        // A client past both is not concerned.
        assert!(Cursor::at(10).due(&w).is_some_and(|d| d.end.is_none()));
        w.log_first = 5;
        let due = Cursor::at(5).due(&w);
        assert!(
            due.is_none(),
            "7 is in the log, not in the copy: another pass"
        );
    }

    #[test]
    fn frames_waiting_for_the_coalescing_window_are_not_due() {
        let copy = frames(5); // 10..15, only 10..12 may be written
        let w = window(&copy, 10, 10, 12);
        let due = Cursor::at(11).due(&w).expect("in the window");
        assert_eq!(due.frames.len(), 1);
        let due = Cursor::at(13).due(&w).expect("nothing due yet");
        assert!(due.frames.is_empty());
    }
}
