//! A simulated client socket for model tests of the write path: the test decides how
//! many bytes each write takes (zero included: the write would block), when the socket
//! becomes writable again, and when the client closes; it reads back every byte written.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The gateway's side of a simulated connection; [`SimPeer`] is the test's side.
pub struct SimSocket(Arc<Mutex<Shared>>);

/// The test's side: what the socket takes and what it received.
#[derive(Clone)]
pub struct SimPeer(Arc<Mutex<Shared>>);

#[derive(Default)]
struct Shared {
    /// Every byte the gateway wrote, in order.
    received: Vec<u8>,
    /// Bytes the socket takes before it would block (`None`: any number).
    budget: Option<usize>,
    /// Whether a write may be tried: false after a write would block, until the test
    /// makes the socket writable again.
    writable: bool,
    /// The client closed its side.
    closed: bool,
    /// The gateway closed its sending side.
    shut: bool,
    write_waker: Option<Waker>,
    read_waker: Option<Waker>,
}

/// A connected pair: the gateway's socket and the test's peer. It starts writable, taking
/// any number of bytes.
pub fn pair() -> (SimSocket, SimPeer) {
    let shared = Arc::new(Mutex::new(Shared {
        writable: true,
        ..Shared::default()
    }));
    (SimSocket(shared.clone()), SimPeer(shared))
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimSocket {
    pub fn send(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut s = lock(&self.0);
        if s.closed || s.shut {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let total: usize = slices.iter().map(|b| b.len()).sum();
        let take = s.budget.map_or(total, |b| b.min(total));
        if !s.writable || (take == 0 && total > 0) {
            s.writable = false;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut left = take;
        for slice in slices {
            let n = left.min(slice.len());
            s.received.extend_from_slice(&slice[..n]);
            left -= n;
        }
        if let Some(b) = &mut s.budget {
            *b -= take;
        }
        Ok(take)
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.0);
        if s.writable || s.closed {
            return Poll::Ready(Ok(()));
        }
        s.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.0);
        if s.closed {
            return Poll::Ready(Ok(()));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub fn try_read(&self, _buf: &mut [u8]) -> io::Result<usize> {
        match lock(&self.0).closed {
            true => Ok(0),
            false => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    pub fn shutdown_write(&self) {
        lock(&self.0).shut = true;
    }
}

impl SimPeer {
    /// From now on the socket takes `budget` more bytes (`None`: any number) and is
    /// writable; the gateway's task is woken if it waits for that.
    pub fn take(&self, budget: Option<usize>) {
        let mut s = lock(&self.0);
        s.budget = budget;
        s.writable = true;
        if let Some(waker) = s.write_waker.take() {
            waker.wake();
        }
    }

    /// The client closes its side.
    pub fn close(&self) {
        let mut s = lock(&self.0);
        s.closed = true;
        if let Some(waker) = s.read_waker.take() {
            waker.wake();
        }
        if let Some(waker) = s.write_waker.take() {
            waker.wake();
        }
    }

    /// Every byte written so far.
    pub fn received(&self) -> Vec<u8> {
        lock(&self.0).received.clone()
    }

    /// Whether the gateway ended the stream (closed its sending side).
    pub fn shut(&self) -> bool {
        lock(&self.0).shut
    }

    /// Whether the gateway still holds the connection.
    pub fn connected(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}
