//! The socket a stream is written to: a client's TCP socket, or in unit tests a simulated
//! one (`sim`) that takes any number of bytes per write, so that a model test can drive
//! the whole write path under schedules a real network rarely produces.
//!
//! An enum rather than a type parameter: the subscription, its shards and their clients
//! stay one concrete type, and in a build without tests the enum has one variant, which
//! the compiler reduces to the TCP socket itself.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use tokio::net::TcpStream;

/// A stream's socket (see the module doc).
pub enum Socket {
    Tcp(TcpStream),
    #[cfg(test)]
    Sim(super::sim::SimSocket),
}

impl From<TcpStream> for Socket {
    fn from(socket: TcpStream) -> Self {
        Socket::Tcp(socket)
    }
}

impl Socket {
    /// One non-blocking vectored write. `sendmsg` rather than tokio's `writev`: a socket
    /// write that skips the file layer (its position lock and checks) costs less per
    /// call, and a stream makes one call per frame it writes. A would-block clears
    /// tokio's readiness, as tokio's own writes do.
    pub fn send(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(socket) => socket.try_io(tokio::io::Interest::WRITABLE, || {
                socket2::SockRef::from(socket).send_vectored(slices)
            }),
            #[cfg(test)]
            Socket::Sim(sim) => sim.send(slices),
        }
    }

    /// Registers the task for the socket's write readiness.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Socket::Tcp(socket) => socket.poll_write_ready(cx),
            #[cfg(test)]
            Socket::Sim(sim) => sim.poll_write_ready(cx),
        }
    }

    /// Registers the task for the socket's read readiness.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Socket::Tcp(socket) => socket.poll_read_ready(cx),
            #[cfg(test)]
            Socket::Sim(sim) => sim.poll_read_ready(cx),
        }
    }

    /// A non-blocking read (`Ok(0)`: the client closed its side).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(socket) => socket.try_read(buf),
            #[cfg(test)]
            Socket::Sim(sim) => sim.try_read(buf),
        }
    }

    /// Closes the sending side after the last bytes (a clean end for the client).
    pub fn shutdown_write(&self) {
        match self {
            Socket::Tcp(socket) => {
                let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
            }
            #[cfg(test)]
            Socket::Sim(sim) => sim.shutdown_write(),
        }
    }
}
