//! A connect request (`GET /api/events/v1/connect/?bindings=…`). The connect route (in
//! the route table, `http`) gives every answer: the original's answers to a reconnecting
//! client (204), a draining server (a reconnect frame), a full server (503) and bad input
//! (an `error` event), or a stream's head. The server loop reads the request head itself,
//! asks the route table for the answer, and writes it ([`Streams::deliver`]); a stream's
//! body after its head belongs to the subscription's writers (see `opening`).
//!
//! Invariants:
//! - the response head is written before anything waits on the broker;
//! - the client's position in the subscription's log is taken when it subscribes, so a
//!   frame sent while it waits for `ready` is written after `ready`, not lost;
//! - a stream that subscribes as the gateway starts draining still gets the reconnect
//!   frame (the draining token is looked at after its position is taken);
//! - no write here waits longer than the stall timeout on a client that does not read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod answers;
mod opening;
#[cfg(test)]
mod tests;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warp::http::{HeaderMap, header};
use warp::reply::Response;

use crate::admission::{Admission, Full};
use crate::binding::{self, Limits};
use crate::message::{self, READY};
use crate::metrics::Metrics;
use crate::registry::{Client, Registry};
use crate::subscription::StreamSettings;
use crate::wire::{self, LAST_CHUNK, Version};
pub(crate) use answers::{Refused, log_refusal};
pub use opening::Handoff;
use opening::Opening;

/// What connect requests share.
pub struct Streams {
    pub registry: Arc<Registry>,
    pub admission: Arc<Admission>,
    pub metrics: Metrics,
    pub limits: Limits,
    pub settings: StreamSettings,
    /// Cancelled when the process starts draining.
    pub draining: CancellationToken,
}

/// How the server loop marks a connect request it read itself (only such a request can
/// become a stream): who sent it and how.
#[derive(Clone, Copy, Debug)]
pub struct FromLoop {
    pub peer: SocketAddr,
    pub version: Version,
    /// It came within the descriptor reserve: a 503, whatever it asks.
    pub full: bool,
}

/// What becomes of the connection after a connect request.
pub enum After {
    /// Answered; the connection may carry another request.
    KeepAlive(TcpStream),
    /// Closed, or streaming (the socket now belongs to the subscription's writers).
    Done,
}

/// A client admitted to stream: its slot, its subscription, and its connection's span.
struct Admitted {
    slot: crate::admission::Slot,
    client: Client,
    span: tracing::Span,
    connected_at: Instant,
}

/// What a connect request asked for, beyond its bindings.
struct Request<'a> {
    peer: SocketAddr,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    /// `resume=1`: a resumable stream.
    resumable: bool,
    last_event_id: Option<String>,
}

impl Streams {
    /// The connect route's answer to a request the server loop read (see [`FromLoop`]):
    /// a complete answer, or a stream's head with its [`Handoff`] in its extensions.
    pub fn answer(&self, from: FromLoop, query: Option<&str>, headers: &HeaderMap) -> Response {
        if from.full {
            self.metrics.connection("over_limit");
            return answers::full("This server has reached its connection limit; try again later.");
        }
        let req = Request {
            peer: from.peer,
            query,
            headers,
            resumable: binding::query_flag(query, "resume"),
            last_event_id: headers
                .get("last-event-id")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned()),
        };
        if let Some(answer) = self.early_answer(&req) {
            return answer;
        }
        match self.admit(&req) {
            Ok(opening) => self.open(&req, opening),
            Err(answer) => *answer,
        }
    }

    /// Answers that need no slot: 204 to a client that must not come back, and a
    /// reconnect frame from a draining gateway.
    fn early_answer(&self, req: &Request<'_>) -> Option<Response> {
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
            return Some(answers::no_content());
        }
        if self.draining.is_cancelled() {
            // Not a 503: EventSource gives up for good on any non-200 answer. The
            // reconnect frame sends the browser elsewhere (another replica) after a
            // jittered delay.
            self.metrics.connection("draining");
            return Some(answers::stream(message::drain_frame(req.resumable)));
        }
        None
    }

    /// Takes a slot for the client's address, parses its bindings, counts them against
    /// its address's share, and subscribes. Any refusal is a complete answer (boxed: an
    /// answer is large, and most requests are admitted).
    fn admit(&self, req: &Request<'_>) -> Result<Admitted, Box<Response>> {
        let peer = req.peer;
        let client_addr = self.admission.client_address(peer.ip(), req.headers);
        let mut slot = self
            .admission
            .try_take(client_addr)
            .map_err(|full| Box::new(self.full(full)))?;
        let set = binding::parse_query(req.query, &self.limits).map_err(|err| {
            self.metrics.connection("bad_input");
            if err.is_pattern_limit() {
                self.metrics.refused("pattern");
            }
            tracing::debug!(%peer, error = %err, "refused bindings");
            Box::new(answers::stream(message::error_frame(&err.to_string())))
        })?;
        let refused = |refusal: &dyn Refused| {
            self.metrics.connection("refused");
            self.metrics.refused(refusal.reason());
            log_refusal(refusal, client_addr);
            Box::new(answers::stream(message::error_frame(&refusal.to_string())))
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

    /// A 503: a connection limit is reached.
    fn full(&self, full: Full) -> Response {
        let message = match full {
            Full::Process => {
                self.metrics.connection("over_limit");
                "This server has reached its connection limit; try again later."
            }
            Full::Address => {
                self.metrics.connection("over_address_limit");
                self.metrics.refused("address_connections");
                "Too many connections from your address; close some, or try again later."
            }
        };
        answers::full(message)
    }

    /// The stream's head: with `ready` when the bindings are already bound, and a
    /// resumable stream's `gap`; the rest goes with the [`Handoff`].
    fn open(&self, req: &Request<'_>, admitted: Admitted) -> Response {
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
            return answers::stream(message::drain_frame(req.resumable));
        }
        let (ready_frame, gap_frame) = match req.resumable {
            true => self.resume(&mut client, req.last_event_id.as_deref()),
            false => (Bytes::from_static(READY), None),
        };
        let mut ready: opening::Ready = Box::pin(client.ready(self.settings.ready_timeout));
        let mut frames = BytesMut::new();
        if let Some(gap) = gap_frame {
            frames.extend_from_slice(&gap);
        }
        let ready = match ready.as_mut().now_or_never() {
            Some(Ok(())) => {
                frames.extend_from_slice(&ready_frame);
                None
            }
            Some(Err(err)) => {
                // Refused at once: the stream is that error.
                tracing::debug!(parent: &span, error = %err, "ended with an error");
                self.metrics.connection("broker_error");
                frames.extend_from_slice(&message::error_frame(&err.to_string()));
                return answers::stream(frames.freeze());
            }
            None => Some(ready),
        };
        let opening = Opening {
            slot,
            client,
            span,
            connected_at,
            resumable: req.resumable,
            reusable: false,
            ready_frame,
            ready,
        };
        let mut resp = answers::stream(frames.freeze());
        resp.extensions_mut().insert(Handoff::new(opening));
        resp
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

    /// Writes the route's answer to a request the server loop read, with the framing of
    /// `version`: a complete answer (the connection stays for another request if
    /// `reusable` and its framing allows), or a stream's head, after which the stream
    /// goes on (see `opening`).
    pub async fn deliver(
        &self,
        mut socket: TcpStream,
        from: FromLoop,
        reusable: bool,
        mut resp: Response,
    ) -> After {
        let version = from.version;
        let handoff = resp.extensions_mut().remove::<Handoff>();
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let stall = self.settings.stall_timeout;
        let is_stream = parts.headers.get(header::CONTENT_TYPE)
            == Some(&header::HeaderValue::from_static("text/event-stream"));
        if !is_stream {
            let bytes = wire::response(version, parts.status, &parts.headers, &body, reusable);
            if !write_within(&mut socket, &bytes, stall).await {
                return After::Done;
            }
            return after_answer(socket, reusable).await;
        }
        let mut out = wire::stream_head(version, parts.status, &parts.headers);
        match handoff.and_then(|h| h.take()) {
            Some(mut opening) => {
                wire::push_chunk(&mut out, version, &body);
                if !write_within(&mut socket, &out, stall).await {
                    self.metrics.connection("client_gone");
                    return After::Done;
                }
                opening.reusable = reusable;
                opening.run(self, socket, from.peer, version).await
            }
            None => {
                out.extend_from_slice(&end_of_stream(version, &body));
                if !write_within(&mut socket, &out, stall).await {
                    return After::Done;
                }
                after_answer(socket, reusable && version.chunked()).await
            }
        }
    }
}

/// `frame` as the last of a stream whose head was written, then the end of its body.
fn end_of_stream(version: Version, frame: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    wire::push_chunk(&mut bytes, version, frame);
    if version.chunked() {
        bytes.extend_from_slice(LAST_CHUNK);
    }
    bytes
}

/// Writes `bytes` within `timeout`. Returns whether it did.
async fn write_within(socket: &mut TcpStream, bytes: &[u8], timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, socket.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// After a complete answer: the connection carries another request if `keep`, or closes.
async fn after_answer(mut socket: TcpStream, keep: bool) -> After {
    if keep {
        After::KeepAlive(socket)
    } else {
        let _ = socket.shutdown().await;
        After::Done
    }
}
