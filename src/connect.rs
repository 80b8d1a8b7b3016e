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

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::admission::{Admission, Full, OverShare, Slot};
use crate::binding::{self, Limits};
use crate::message::{self, READY};
use crate::metrics::Metrics;
use crate::registry::{Client, Registry};
use crate::subscription::{Conn, Lease, StreamSettings};
use crate::topology::{BindError, Refusal};
use crate::wire::{self, LAST_CHUNK, RequestHead, Version};

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

impl Streams {
    /// Serves one connect request on `socket`.
    pub async fn serve(&self, mut socket: TcpStream, head: RequestHead, peer: SocketAddr) -> After {
        let reusable = head.keep_alive() && !head.has_body();
        let resumable = binding::query_flag(head.query.as_deref(), "resume");
        let last_event_id = head
            .headers
            .get("last-event-id")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned());
        // The original gives up reconnecting clients this way: every event has `id: -`,
        // so an EventSource that lost its stream comes back with `Last-Event-Id` and gets
        // 204, after which it stops for good. A resumable stream resumes instead, unless
        // its id is `-`: the stream ended on purpose (an `error`), and must not come back.
        if last_event_id
            .as_deref()
            .is_some_and(|id| !resumable || id == "-")
        {
            self.metrics.connection("no_content");
            let mut headers = self.headers();
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-store no-cache must-revalidate"),
            );
            let answer = wire::response(
                head.version,
                StatusCode::NO_CONTENT,
                &headers,
                b"",
                reusable,
            );
            return self.answer(socket, &answer, reusable).await;
        }
        if self.draining.is_cancelled() {
            // Not a 503: EventSource gives up for good on any non-200 answer. The
            // reconnect frame sends the browser elsewhere (another replica) after a
            // jittered delay.
            self.metrics.connection("draining");
            let frame = message::drain_frame(resumable);
            return self
                .short_stream(socket, head.version, &frame, reusable)
                .await;
        }
        let client_addr = self.admission.client_address(peer.ip(), &head.headers);
        let mut slot = match self.admission.try_take(client_addr) {
            Ok(slot) => slot,
            Err(full) => return self.full(socket, &head, full, reusable).await,
        };
        let set = match binding::parse_query(head.query.as_deref(), &self.limits) {
            Ok(set) => set,
            Err(err) => {
                self.metrics.connection("bad_input");
                if err.is_pattern_limit() {
                    self.metrics.refused("pattern");
                }
                tracing::debug!(%peer, error = %err, "refused bindings");
                let frame = message::error_frame(&err.to_string());
                drop(slot);
                return self
                    .short_stream(socket, head.version, &frame, reusable)
                    .await;
            }
        };
        if let Err(over) = slot.hold(&set) {
            self.metrics.connection("refused");
            self.metrics.refused(over.reason());
            log_refusal(&over, client_addr);
            let frame = message::error_frame(&over.to_string());
            drop(slot);
            return self
                .short_stream(socket, head.version, &frame, reusable)
                .await;
        }
        let span = tracing::info_span!("connection", %peer, bindings = set.len());
        tracing::debug!(parent: &span, "client connected");
        let connected_at = Instant::now();
        let key = slot.client();
        let client = match self
            .registry
            .subscribe(set, || self.admission.allow_new_subscription(key))
        {
            Ok(client) => client,
            Err(refusal) => {
                self.metrics.connection("refused");
                self.metrics.refused(refusal.reason());
                log_refusal(&refusal, client_addr);
                let frame = message::error_frame(&refusal.to_string());
                drop(slot);
                return self
                    .short_stream(socket, head.version, &frame, reusable)
                    .await;
            }
        };
        let mut client = client;
        let (ready_frame, gap_frame) = match resumable {
            true => self.resume(&mut client, last_event_id.as_deref()),
            false => (Bytes::from_static(READY), None),
        };
        let mut ready = Box::pin(client.ready(self.settings.ready_timeout));
        // Already bound (the common case): the head and `ready` leave in one write.
        let immediate = ready.as_mut().now_or_never();
        let mut out = wire::stream_head(head.version, &self.stream_headers());
        if let Some(gap) = &gap_frame {
            wire::push_chunk(&mut out, head.version, gap);
        }
        if matches!(immediate, Some(Ok(()))) {
            wire::push_chunk(&mut out, head.version, &ready_frame);
        }
        if !self.write(&mut socket, &out).await {
            self.metrics.connection("client_gone");
            return After::Done;
        }
        let ready_written = matches!(immediate, Some(Ok(())));
        let waited = match immediate {
            Some(Ok(())) => Waited::Ready,
            Some(Err(err)) => Waited::Refused(err),
            None => self.wait_ready(&mut socket, ready).await,
        };
        match waited {
            Waited::Ready => {
                if !ready_written {
                    let mut out = Vec::new();
                    wire::push_chunk(&mut out, head.version, &ready_frame);
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
                self.stream(client, socket, peer, head.version, resumable, slot);
                After::Done
            }
            Waited::Refused(err) => {
                tracing::debug!(parent: &span, error = %err, "ended with an error");
                self.metrics.connection(match err {
                    BindError::Timeout => "timeout",
                    _ => "broker_error",
                });
                drop(client);
                let frame = message::error_frame(&err.to_string());
                self.end_stream(socket, head.version, &frame, reusable)
                    .await
            }
            Waited::Draining => {
                self.metrics.connection("draining");
                drop(client);
                let frame = message::drain_frame(resumable);
                self.end_stream(socket, head.version, &frame, reusable)
                    .await
            }
            Waited::ClientGone => {
                tracing::debug!(parent: &span, "client left before ready");
                self.metrics.connection("client_gone");
                After::Done
            }
        }
    }

    /// The 503 a client gets when a connection limit is reached (before any stream starts).
    async fn full(
        &self,
        socket: TcpStream,
        head: &RequestHead,
        full: Full,
        reusable: bool,
    ) -> After {
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
        let body =
            serde_json::json!({"code": "TooManyConnections", "message": message}).to_string();
        let mut headers = self.headers();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        let answer = wire::response(
            head.version,
            StatusCode::SERVICE_UNAVAILABLE,
            &headers,
            body.as_bytes(),
            reusable,
        );
        self.answer(socket, &answer, reusable).await
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
        version: Version,
        resumable: bool,
        slot: Slot,
    ) {
        let next_ping = Instant::now() + self.settings.ping_interval;
        let next = client.position();
        client.attach(|member| {
            let lease: Lease = Box::new((member, slot));
            Conn::new(socket, peer, version, resumable, next, next_ping, lease)
        });
    }

    /// A stream that is one frame long: the head, `frame`, the end.
    async fn short_stream(
        &self,
        socket: TcpStream,
        version: Version,
        frame: &Bytes,
        reusable: bool,
    ) -> After {
        let mut out = wire::stream_head(version, &self.stream_headers());
        wire::push_chunk(&mut out, version, frame);
        if version.chunked() {
            out.extend_from_slice(LAST_CHUNK);
        }
        self.answer(socket, &out, reusable && version.chunked())
            .await
    }

    /// Ends a stream whose head was written with `frame`.
    async fn end_stream(
        &self,
        socket: TcpStream,
        version: Version,
        frame: &Bytes,
        reusable: bool,
    ) -> After {
        let mut out = Vec::new();
        wire::push_chunk(&mut out, version, frame);
        if version.chunked() {
            out.extend_from_slice(LAST_CHUNK);
        }
        self.answer(socket, &out, reusable && version.chunked())
            .await
    }

    /// Writes a complete answer; the connection stays for another request if `reusable`.
    async fn answer(&self, mut socket: TcpStream, bytes: &[u8], reusable: bool) -> After {
        if !self.write(&mut socket, bytes).await {
            return After::Done;
        }
        if reusable {
            After::KeepAlive(socket)
        } else {
            let _ = socket.shutdown().await;
            After::Done
        }
    }

    /// Writes `bytes`, within the stall timeout. Returns whether it did.
    async fn write(&self, socket: &mut TcpStream, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(self.settings.stall_timeout, socket.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// Every response's headers (CORS and security, as Taskcluster's lib-api).
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        wire::add_common_headers(&mut headers, &self.cors_origin);
        headers
    }

    /// A stream's headers.
    fn stream_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        wire::add_common_headers(&mut headers, &self.cors_origin);
        headers
    }
}

/// Logs a refusal, at most once a second (with how many were not logged): a client that
/// is refused in a loop must not flood the logs.
fn log_refusal(refusal: &impl Refused, client: std::net::IpAddr) {
    static LIMITER: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
    if let Some(suppressed) = LIMITER.allow() {
        tracing::info!(%client, reason = refusal.reason(), suppressed, "subscription refused: {refusal}");
    }
}

/// A refusal by a limit: its text for the client and its metric label.
trait Refused: std::fmt::Display {
    fn reason(&self) -> &'static str;
}

impl Refused for Refusal {
    fn reason(&self) -> &'static str {
        Refusal::reason(self)
    }
}

impl Refused for OverShare {
    fn reason(&self) -> &'static str {
        OverShare::reason(self)
    }
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
