//! A connect request (`GET /api/events/v1/connect/?bindings=…`) on a socket the server
//! loop hands over after reading its head: the original's answers to a reconnecting
//! client (204), a draining server (a reconnect frame), a full server (503) and bad input
//! (an `error` event); otherwise the stream: the response head at once, `ready` once the
//! broker confirmed every binding, then the socket goes to the subscription's writers.
//!
//! Invariants:
//! - the response head is written before anything waits on the broker;
//! - the client's position in the subscription's log is taken when it subscribes, so a
//!   frame sent while it waits for `ready` is written after `ready`, not lost;
//! - no write here waits longer than the stall timeout on a client that does not read;
//! - a client that leaves, or a gateway that drains, while the stream waits for `ready`
//!   ends the wait at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

mod answers;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warp::http::HeaderValue;

use crate::admission::{Admission, Slot};
use crate::binding::{self, Limits};
use crate::message::{self, READY};
use crate::metrics::Metrics;
use crate::registry::{Client, Registry};
use crate::subscription::{Conn, Lease, StreamSettings};
use crate::topology::BindError;
use crate::wire::{self, RequestHead, Version};
use answers::{Answer, Refused, client_gone, log_refusal};

/// What connect requests share.
pub struct Streams {
    pub registry: Arc<Registry>,
    pub admission: Arc<Admission>,
    pub metrics: Metrics,
    pub limits: Limits,
    pub settings: StreamSettings,
    pub cors_origin: HeaderValue,
    /// Cancelled when the process starts draining.
    pub draining: CancellationToken,
}

/// What becomes of the connection after a connect request.
pub enum After {
    /// Answered; the connection may carry another request.
    KeepAlive(TcpStream),
    /// Closed, or streaming (the socket now belongs to the subscription's writers).
    Done,
}

/// The reason a stream ended before `ready`.
enum Waited {
    Ready,
    Refused(BindError),
    Draining,
    ClientGone,
}

/// What a connect request asked for, beyond its bindings.
struct Request {
    version: Version,
    /// The connection may carry another request after a short answer.
    reusable: bool,
    /// `resume=1`: a resumable stream.
    resumable: bool,
    last_event_id: Option<String>,
}

/// A client admitted to stream: its slot, its subscription, and its connection's span.
struct Admitted {
    slot: Slot,
    client: Client,
    span: tracing::Span,
    connected_at: Instant,
}

impl Streams {
    /// Serves one connect request on `socket`: an early answer, a refusal, or a stream.
    pub async fn serve(&self, socket: TcpStream, head: RequestHead, peer: SocketAddr) -> After {
        let req = Request {
            version: head.version,
            reusable: head.keep_alive() && !head.has_body(),
            resumable: binding::query_flag(head.query.as_deref(), "resume"),
            last_event_id: head
                .headers
                .get("last-event-id")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned()),
        };
        if let Some(answer) = self.early_answer(&req) {
            return self.answer(socket, answer).await;
        }
        match self.admit(&head, &req, peer) {
            Ok(admitted) => self.open(socket, &req, admitted, peer).await,
            Err(answer) => self.answer(socket, answer).await,
        }
    }

    /// Answers 503 (the server is at its limit) to a connect request that arrived within
    /// the descriptor reserve (see the server's gate), and closes.
    pub async fn serve_full(&self, socket: TcpStream, head: RequestHead) {
        let req = Request {
            version: head.version,
            reusable: false,
            resumable: false,
            last_event_id: None,
        };
        let answer = self.full(&req, crate::admission::Full::Process);
        self.answer(socket, answer).await;
    }

    /// Answers that need no slot: 204 to a client that must not come back, and a
    /// reconnect frame from a draining gateway.
    fn early_answer(&self, req: &Request) -> Option<Answer> {
        // The original gives up reconnecting clients this way: every event has `id: -`,
        // so an EventSource that lost its stream comes back with `Last-Event-Id` and gets
        // 204, after which it stops for good. A resumable stream resumes instead, unless
        // its id is `-`: the stream ended on purpose (an `error`), and must not come back.
        let stop = req
            .last_event_id
            .as_deref()
            .is_some_and(|id| !req.resumable || id == "-");
        if stop {
            self.metrics.connection("no_content");
            return Some(self.no_content(req));
        }
        if self.draining.is_cancelled() {
            // Not a 503: EventSource gives up for good on any non-200 answer. The
            // reconnect frame sends the browser elsewhere (another replica) after a
            // jittered delay.
            self.metrics.connection("draining");
            return Some(self.short_stream(req, &message::drain_frame(req.resumable)));
        }
        None
    }

    /// Takes a slot for the client's address, parses its bindings, counts them against
    /// its address's share, and subscribes. Any refusal is a complete answer.
    fn admit(
        &self,
        head: &RequestHead,
        req: &Request,
        peer: SocketAddr,
    ) -> Result<Admitted, Answer> {
        let client_addr = self.admission.client_address(peer.ip(), &head.headers);
        let mut slot = self
            .admission
            .try_take(client_addr)
            .map_err(|full| self.full(req, full))?;
        let set = binding::parse_query(head.query.as_deref(), &self.limits).map_err(|err| {
            self.metrics.connection("bad_input");
            if err.is_pattern_limit() {
                self.metrics.refused("pattern");
            }
            tracing::debug!(%peer, error = %err, "refused bindings");
            self.short_stream(req, &message::error_frame(&err.to_string()))
        })?;
        let refused = |refusal: &dyn Refused| {
            self.metrics.connection("refused");
            self.metrics.refused(refusal.reason());
            log_refusal(refusal, client_addr);
            self.short_stream(req, &message::error_frame(&refusal.to_string()))
        };
        slot.hold(&set).map_err(|over| refused(&over))?;
        let span = tracing::info_span!("connection", %peer, bindings = set.len());
        tracing::debug!(parent: &span, "client connected");
        let key = slot.client();
        let mut client = self
            .registry
            .subscribe(set, || self.admission.allow_new_subscription(key))
            .map_err(|refusal| refused(&refusal))?;
        // The share is held with the membership: a resumable subscription that lingers
        // after its last client stays charged to that client's address until it goes.
        if let Some(share) = slot.take_share() {
            client.charge(Box::new(share));
        }
        Ok(Admitted {
            slot,
            client,
            span,
            connected_at: Instant::now(),
        })
    }

    /// The stream: its head at once (with `ready` when the bindings are already bound,
    /// and a resumable stream's `gap`), `ready` once the broker confirmed them, then the
    /// socket goes to the subscription's writers.
    async fn open(
        &self,
        mut socket: TcpStream,
        req: &Request,
        admitted: Admitted,
        peer: SocketAddr,
    ) -> After {
        let Admitted {
            slot,
            mut client,
            span,
            connected_at,
        } = admitted;
        if self.draining.is_cancelled() {
            // The drain began after the early check: its marker went to the subscriptions
            // that existed then, maybe not to this one. Looked at after the client's
            // position was taken: either the drain is seen here, or it began later and
            // its marker is in the log after that position.
            self.metrics.connection("draining");
            drop(client);
            let drain = self.short_stream(req, &message::drain_frame(req.resumable));
            return self.answer(socket, drain).await;
        }
        let (ready_frame, gap_frame) = match req.resumable {
            true => self.resume(&mut client, req.last_event_id.as_deref()),
            false => (Bytes::from_static(READY), None),
        };
        let mut ready = Box::pin(client.ready(self.settings.ready_timeout));
        let immediate = ready.as_mut().now_or_never();
        let ready_now = matches!(immediate, Some(Ok(())));
        let mut out = wire::stream_head(req.version, &self.stream_headers());
        if let Some(gap) = &gap_frame {
            wire::push_chunk(&mut out, req.version, gap);
        }
        if ready_now {
            wire::push_chunk(&mut out, req.version, &ready_frame);
        }
        if !self.write(&mut socket, &out).await {
            self.metrics.connection("client_gone");
            return After::Done;
        }
        let waited = match immediate {
            Some(Ok(())) => Waited::Ready,
            Some(Err(err)) => Waited::Refused(err),
            None => self.wait_ready(&mut socket, ready).await,
        };
        match waited {
            Waited::Ready => {
                if !ready_now {
                    let mut out = Vec::new();
                    wire::push_chunk(&mut out, req.version, &ready_frame);
                    if !self.write(&mut socket, &out).await {
                        self.metrics.connection("client_gone");
                        return After::Done;
                    }
                }
                tracing::debug!(parent: &span, "ready");
                self.metrics.connection("ready");
                self.metrics
                    .time_to_ready
                    .observe(connected_at.elapsed().as_secs_f64());
                self.stream(client, socket, peer, req, slot);
                After::Done
            }
            Waited::Refused(err) => {
                tracing::debug!(parent: &span, error = %err, "ended with an error");
                self.metrics.connection(match err {
                    BindError::Timeout => "timeout",
                    _ => "broker_error",
                });
                drop(client);
                let end = self.end_stream(req, &message::error_frame(&err.to_string()));
                self.answer(socket, end).await
            }
            Waited::Draining => {
                self.metrics.connection("draining");
                drop(client);
                let end = self.end_stream(req, &message::drain_frame(req.resumable));
                self.answer(socket, end).await
            }
            Waited::ClientGone => {
                tracing::debug!(parent: &span, "client left before ready");
                self.metrics.connection("client_gone");
                After::Done
            }
        }
    }

    /// Waits for `ready`, a drain, or the client leaving, whichever comes first.
    async fn wait_ready(
        &self,
        socket: &mut TcpStream,
        ready: std::pin::Pin<Box<impl Future<Output = Result<(), BindError>>>>,
    ) -> Waited {
        tokio::select! {
            result = ready => match result {
                Ok(()) => Waited::Ready,
                Err(err) => Waited::Refused(err),
            },
            () = self.draining.cancelled() => Waited::Draining,
            () = client_gone(socket) => Waited::ClientGone,
        }
    }

    /// A resumable stream: its subscription keeps a replay window from now on; with a
    /// `Last-Event-Id`, it reads from just after that position, or starts live after a
    /// `gap` event that says why not. Returns its `ready` frame (naming its position) and
    /// the `gap` frame, if any.
    fn resume(&self, client: &mut Client, last_event_id: Option<&str>) -> (Bytes, Option<Bytes>) {
        let Some(sub) = client.subscription().cloned() else {
            return (Bytes::from_static(READY), None);
        };
        sub.mark_resumable();
        let gap = match last_event_id.filter(|id| !id.is_empty()) {
            None => None,
            Some(id) => match client.resume(id) {
                Ok(()) => {
                    self.metrics.resume("replayed");
                    None
                }
                Err(gap) => {
                    self.metrics.resume(gap.reason());
                    let at = sub.position(client.position());
                    Some(message::gap_frame(gap.reason(), None, &at.id()))
                }
            },
        };
        let at = sub.position(client.position());
        (message::ready_frame_at(&at.id()), gap)
    }

    /// Hands the stream to the subscription's writers.
    fn stream(
        &self,
        client: Client,
        socket: TcpStream,
        peer: SocketAddr,
        req: &Request,
        slot: Slot,
    ) {
        let (version, resumable) = (req.version, req.resumable);
        let next_ping = Instant::now() + self.settings.ping_interval;
        let next = client.position();
        client.attach(|member| {
            let lease: Lease = Box::new((member, slot));
            Conn::new(socket, peer, version, resumable, next, next_ping, lease)
        });
    }
}
