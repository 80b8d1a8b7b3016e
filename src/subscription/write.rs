//! One write to a client's socket: the parts it carries (borrowed, on the stack), its
//! framing (one HTTP/1.1 chunk, or raw bytes on HTTP/1.0), and what is kept of a write the
//! socket did not take whole (slices of the shared frames, never copies of them).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::Bytes;

use super::socket::Socket;
use crate::wire::{self, CHUNK_END, LAST_CHUNK};

/// Most frames one write carries.
pub const MAX_FRAMES_PER_WRITE: usize = 64;
/// A write stops taking frames past this many bytes (one frame at least).
pub const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Parts of one write: chunk head, lag notice, frames (each with its id), ping, end.
pub(super) const MAX_PARTS: usize = 2 * MAX_FRAMES_PER_WRITE + 8;

/// How a write is framed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Framing {
    /// One HTTP/1.1 chunk (otherwise raw bytes: HTTP/1.0).
    pub chunked: bool,
    /// The stream ends with this write (the last chunk follows it).
    pub last: bool,
}

/// Whether the socket took all of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sent {
    All,
    /// It took part of it, or none (it would block): the rest is in `pending`.
    Part,
}

/// Frames `parts` and writes them in one non-blocking vectored write; what the socket did
/// not take goes to `pending` (which must be empty). An error means the socket is gone.
pub(super) fn send_chunk(
    socket: &Socket,
    framing: Framing,
    parts: &Parts<'_>,
    pending: &mut VecDeque<Bytes>,
) -> io::Result<Sent> {
    let (head, head_len) = wire::chunk_head(parts.len);
    let head = &head[..head_len];
    let chunk_head: &[&[u8]] = if framing.chunked { &[head] } else { &[] };
    let chunk_end: &[&[u8]] = match (framing.chunked, framing.last) {
        (false, _) => &[],
        (true, false) => &[CHUNK_END],
        (true, true) => &[CHUNK_END, LAST_CHUNK],
    };
    let mut slices = [IoSlice::new(&[]); MAX_PARTS + 3];
    let mut n = 0;
    let all = chunk_head
        .iter()
        .copied()
        .chain(parts.iter())
        .chain(chunk_end.iter().copied());
    for (slot, slice) in slices.iter_mut().zip(all) {
        *slot = IoSlice::new(slice);
        n += 1;
    }
    let total: usize = slices[..n].iter().map(|s| s.len()).sum();
    let written = match socket.send(&slices[..n]) {
        Ok(written) => written,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written == total {
        return Ok(Sent::All);
    }
    // Keep the rest: shared slices of the frames, small copies of the rest.
    let mut skip = written;
    if framing.chunked {
        keep_rest(pending, &mut skip, Bytes::copy_from_slice(head));
    }
    for (bytes, from, to) in parts.shared() {
        keep_rest(pending, &mut skip, bytes.slice(from..to));
    }
    if framing.chunked {
        keep_rest(pending, &mut skip, Bytes::from_static(CHUNK_END));
        if framing.last {
            keep_rest(pending, &mut skip, Bytes::from_static(LAST_CHUNK));
        }
    }
    Ok(Sent::Part)
}

/// Adds `bytes` to `pending`, less the first `skip` bytes of the write (already taken).
pub(super) fn keep_rest(pending: &mut VecDeque<Bytes>, skip: &mut usize, bytes: Bytes) {
    if *skip >= bytes.len() {
        *skip -= bytes.len();
        return;
    }
    let rest = bytes.slice(*skip..);
    *skip = 0;
    if !rest.is_empty() {
        pending.push_back(rest);
    }
}

/// Drops the first `n` bytes of `pending`.
pub(super) fn consume(pending: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = pending.front_mut() else {
            return;
        };
        if n >= front.len() {
            n -= front.len();
            pending.pop_front();
        } else {
            let rest = front.slice(n..);
            *front = rest;
            n = 0;
        }
    }
}

/// Fills unused slots of [`Parts`].
static EMPTY: Bytes = Bytes::new();

/// The data parts of one write, borrowed: (bytes, from, to) each. A fixed array on the
/// stack: a write costs no allocation.
pub(super) struct Parts<'a> {
    items: [(&'a Bytes, usize, usize); MAX_PARTS],
    count: usize,
    pub(super) len: usize,
}

impl Default for Parts<'_> {
    fn default() -> Self {
        Self {
            items: [(&EMPTY, 0, 0); MAX_PARTS],
            count: 0,
            len: 0,
        }
    }
}

impl<'a> Parts<'a> {
    pub(super) fn push_shared(&mut self, bytes: &'a Bytes, from: usize, to: usize) {
        if to > from && self.count < MAX_PARTS {
            self.items[self.count] = (bytes, from, to);
            self.count += 1;
            self.len += to - from;
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.items[..self.count]
            .iter()
            .map(|(b, from, to)| &b[*from..*to])
    }

    pub(super) fn shared(&self) -> impl Iterator<Item = (&'a Bytes, usize, usize)> + '_ {
        self.items[..self.count].iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rests_are_kept_and_consumed_exactly() {
        let mut pending = VecDeque::new();
        let mut skip = 5;
        keep_rest(&mut pending, &mut skip, Bytes::from_static(b"abc"));
        keep_rest(&mut pending, &mut skip, Bytes::from_static(b"defgh"));
        keep_rest(&mut pending, &mut skip, Bytes::from_static(b"ij"));
        assert_eq!(
            pending,
            vec![Bytes::from_static(b"fgh"), Bytes::from_static(b"ij")]
        );
        consume(&mut pending, 4);
        assert_eq!(pending, vec![Bytes::from_static(b"j")]);
        consume(&mut pending, 1);
        assert!(pending.is_empty());
    }
}
