//! A stream between its head and its writers: its head is written (with `ready` if the
//! bindings were already bound); it waits for the broker to confirm them, or a drain, or
//! its client leaving; then `ready` goes out and the socket goes to the subscription's
//! writers.
//!
//! Invariants:
//! - the client's position was pinned when it subscribed, so a frame sent while it waits
//!   is written after `ready`, not lost;
//! - a client that leaves, or a gateway that drains, ends the wait at once;
//! - no write here waits longer than the stall timeout on a client that does not read.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;

use super::{After, Streams, end_of_stream, write_within};
use crate::admission::Slot;
use crate::message;
use crate::registry::Client;
use crate::subscription::{Conn, Lease};
use crate::topology::BindError;
use crate::wire::Version;

/// The wait for the broker to confirm a client's bindings.
pub(super) type Ready = Pin<Box<dyn Future<Output = Result<(), BindError>> + Send>>;

/// An admitted client whose stream's head is the answer the route gave.
pub(super) struct Opening {
    pub(super) slot: Slot,
    pub(super) client: Client,
    pub(super) span: tracing::Span,
    pub(super) connected_at: Instant,
    pub(super) resumable: bool,
    /// The connection may carry another request once the stream ends before `ready`.
    pub(super) reusable: bool,
    /// Its `ready` frame (it names a resumable stream's position).
    pub(super) ready_frame: Bytes,
    /// `None`: the bindings were bound already, and `ready` is in the head's frames.
    pub(super) ready: Option<Ready>,
}

/// An [`Opening`] carried from the connect route to the server loop in its answer's
/// extensions (which must be `Clone`): taken once.
#[derive(Clone)]
pub struct Handoff(Arc<Mutex<Option<Opening>>>);

impl Handoff {
    pub(super) fn new(opening: Opening) -> Self {
        Self(Arc::new(Mutex::new(Some(opening))))
    }

    pub(super) fn take(&self) -> Option<Opening> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Why a stream ended before `ready`, or that it got it.
enum Waited {
    Ready,
    Refused(BindError),
    Draining,
    ClientGone,
}

impl Opening {
    /// After the head: `ready` (at once, or once the broker confirmed every binding),
    /// then the socket goes to the subscription's writers; or the stream's last frame.
    pub(super) async fn run(
        self,
        streams: &Streams,
        mut socket: TcpStream,
        peer: SocketAddr,
        version: Version,
    ) -> After {
        let Opening {
            slot,
            client,
            span,
            connected_at,
            resumable,
            reusable,
            ready_frame,
            ready,
        } = self;
        let stall = streams.settings.stall_timeout;
        let waited = match ready {
            None => Waited::Ready,
            Some(ready) => tokio::select! {
                result = ready => match result {
                    Ok(()) => {
                        let mut out = Vec::new();
                        crate::wire::push_chunk(&mut out, version, &ready_frame);
                        if !write_within(&mut socket, &out, stall).await {
                            streams.metrics.connection("client_gone");
                            return After::Done;
                        }
                        Waited::Ready
                    }
                    Err(err) => Waited::Refused(err),
                },
                () = streams.draining.cancelled() => Waited::Draining,
                () = client_gone(&socket) => Waited::ClientGone,
            },
        };
        let last = match waited {
            Waited::Ready => {
                tracing::debug!(parent: &span, "ready");
                streams.metrics.connection("ready");
                streams
                    .metrics
                    .time_to_ready
                    .observe(connected_at.elapsed().as_secs_f64());
                hand_over(streams, client, slot, socket, peer, version, resumable);
                return After::Done;
            }
            Waited::Refused(err) => {
                tracing::debug!(parent: &span, error = %err, "ended with an error");
                streams.metrics.connection(match err {
                    BindError::Timeout => "timeout",
                    _ => "broker_error",
                });
                message::error_frame(&err.to_string())
            }
            Waited::Draining => {
                streams.metrics.connection("draining");
                message::drain_frame(resumable)
            }
            Waited::ClientGone => {
                tracing::debug!(parent: &span, "client left before ready");
                streams.metrics.connection("client_gone");
                return After::Done;
            }
        };
        drop(client);
        if !write_within(&mut socket, &end_of_stream(version, &last), stall).await {
            return After::Done;
        }
        super::after_answer(socket, reusable && version.chunked()).await
    }
}

/// Hands the stream to the subscription's writers.
fn hand_over(
    streams: &Streams,
    client: Client,
    slot: Slot,
    socket: TcpStream,
    peer: SocketAddr,
    version: Version,
    resumable: bool,
) {
    let next_ping = Instant::now() + streams.settings.ping_interval;
    let Some((member, subscription, next)) = client.into_stream() else {
        return;
    };
    let lease: Lease = Box::new((member, slot));
    let conn = Conn::new(socket, peer, version, resumable, next, next_ping, lease);
    subscription.attach(conn, next);
}

/// Completes when the client closes its side (or sends something it should not: a stream
/// request has nothing more to say, and its bytes are read and dropped).
async fn client_gone(socket: &TcpStream) {
    let mut buf = [0u8; 256];
    let mut junk = 0usize;
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        match socket.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                junk += n;
                if junk > 4096 {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
