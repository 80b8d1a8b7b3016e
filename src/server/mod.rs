//! The HTTP server loop: accepts TCP connections, reads each request head, and hands the
//! connection to whoever serves it.
//!
//! - A connect request (`GET` on a connect path) is served by [`crate::connect`]: once its
//!   head is written, the stream leaves every per-connection HTTP machinery behind (no
//!   read or write buffers, no task of its own) and its socket is written by the
//!   subscription's writers. An idle stream costs its socket and a few hundred bytes.
//! - Every other request is served by hyper with the warp routes, from the bytes read so
//!   far on. hyper serves that one request and closes the connection (`Connection:
//!   close`), so that every connection's first request decides who serves it; a
//!   WebSocket handshake hands the connection over to its session (`ws`).
//!
//! We run our own loop rather than `warp::serve` for that split, and to set the limits an
//! exposed service needs: a header read timeout against slow-header clients, a bound on
//! the request head (and so on the query string), TCP keepalive on every socket, the peer
//! address for the routes, and a client that goes away logged at debug, not as an error.

mod gate;
mod head;
mod rewind;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use warp::Filter;
use warp::reply::Response;

pub use gate::{Gate, GateLimits, open_file_limit};
pub use head::MAX_HEAD_BYTES;

use crate::connect::{After, FromLoop, Streams};
use crate::http::CONNECT_PATHS;
use crate::metrics::Metrics;
use crate::wire::RequestHead;
use gate::{Entry, Pending};
use head::Head;
use rewind::Rewind;

/// The head deadline of a connection let in within the descriptor reserve.
const RESERVE_HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Accept errors (EMFILE: out of descriptors) back off from this, doubling ...
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// ... to this.
const ACCEPT_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Limits of the HTTP side.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A client must send its whole request head within this time (slow-header clients
    /// are disconnected).
    pub header_read_timeout: Duration,
    /// After shutdown, how long open connections may take to finish.
    pub grace: Duration,
    /// TCP keepalive on accepted sockets: idle time before the first probe. A peer that
    /// vanished without a FIN (a dead host, a dropped NAT entry) is then noticed by the
    /// kernel even on a stream with nothing to write.
    pub keepalive: Duration,
}

/// Connections the kernel queues for `accept` (tokio's default is 1024): a ramp of
/// thousands of clients per second must not overflow it, or SYNs are dropped and those
/// clients wait a second for their retransmission.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds the listening socket (SO_REUSEADDR, so a restart can bind at once).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What every connection of the server shares.
struct Server<F> {
    routes: F,
    streams: Arc<Streams>,
    gate: Arc<Gate>,
    limits: Limits,
    metrics: Metrics,
    /// Cancelled when the server stops: a connection waiting for its next request closes,
    /// and hyper finishes the request it is serving, if any, then closes.
    stopping: CancellationToken,
}

/// Serves until `shutdown` is cancelled, then lets connections still being answered
/// finish for at most `grace` (streams end by themselves when the gateway drains).
pub async fn serve<F>(
    listener: TcpListener,
    routes: F,
    (streams, gate): (Arc<Streams>, Arc<Gate>),
    limits: Limits,
    shutdown: CancellationToken,
    metrics: Metrics,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    static ACCEPT_FAILED: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
    let server = Arc::new(Server {
        routes,
        streams,
        gate,
        limits,
        metrics,
        stopping: shutdown.clone(),
    });
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Usually EMFILE (out of file descriptors): back off instead of spinning.
                    if let Some(suppressed) = ACCEPT_FAILED.allow() {
                        tracing::warn!(error = %err, suppressed, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    }
                    server.metrics.http_error("accept_failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_CAP);
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        backoff = ACCEPT_BACKOFF_FIRST;
        let entry = server.gate.enter(peer.ip());
        if let Entry::Refused = entry {
            drop(socket);
            continue;
        }
        connections.spawn(server.clone().connection(socket, peer, entry));
        // Reap finished connection tasks so the set does not grow with every connection.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let finished = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(server.limits.grace, finished)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}

impl<F> Server<F>
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    /// Serves one connection: connect requests here, as long as the client keeps the
    /// connection for more of them; anything else by hyper. Its head deadline is set once
    /// (see `gate`); it is pending until a connect request goes on to admission.
    async fn connection(self: Arc<Self>, socket: TcpStream, peer: SocketAddr, entry: Entry) {
        tune(&socket, self.limits.keepalive);
        let (mut pending, in_reserve) = match entry {
            Entry::Open(pending) => (Some(pending), false),
            Entry::Reserve(pending) => (Some(pending), true),
            Entry::Refused => return,
        };
        let timeout = match in_reserve {
            true => RESERVE_HEAD_TIMEOUT,
            false => self.limits.header_read_timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut socket = socket;
        let mut buf = BytesMut::new();
        loop {
            if pending.is_none() {
                // Kept alive after an answer: pending again, if there is room.
                match self.gate.enter(peer.ip()) {
                    Entry::Open(p) | Entry::Reserve(p) => pending = Some(p),
                    Entry::Refused => return,
                }
            }
            let head = tokio::select! {
                head = head::read(&mut socket, &mut buf, deadline) => head,
                // An idle connection (kept alive after an answer) closes with the server.
                () = self.stopping.cancelled(), if buf.is_empty() => return,
            };
            match head {
                Head::Connect(head) => {
                    // Admission counts it from here on (one within the reserve gets 503).
                    let from = FromLoop {
                        peer,
                        version: head.version,
                        full: in_reserve,
                    };
                    if !in_reserve {
                        drop(pending.take());
                    }
                    let reusable = head.keep_alive() && !head.has_body() && !in_reserve;
                    // Boxed: the route table's future is large, and this task lives as
                    // long as the stream does; only the routing itself should hold it.
                    let answer = Box::pin(self.route(head, from)).await;
                    if buf.is_empty() {
                        // Nothing pipelined: free the head's buffer for the stream's life.
                        buf = BytesMut::new();
                    }
                    match self.streams.deliver(socket, from, reusable, answer).await {
                        After::KeepAlive(kept) => socket = kept,
                        After::Done => return,
                    }
                }
                Head::Other => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let io = Rewind::new(buf.freeze(), socket);
                    let peer = crate::wire::Peer {
                        addr: peer,
                        in_reserve,
                    };
                    return self.hyper(io, peer, left, pending).await;
                }
                Head::Ambiguous => {
                    self.metrics.http_error("bad_request");
                    tracing::debug!(%peer, "connect request with ambiguous framing");
                    return bad_request(socket).await;
                }
                Head::TimedOut => {
                    self.metrics.http_error("header_timeout");
                    tracing::debug!(%peer, "request head not sent in time");
                    return;
                }
                Head::Closed => return,
            }
        }
    }

    /// The route table's answer to a connect request the loop read itself.
    async fn route(&self, head: RequestHead, from: FromLoop) -> Response {
        let target = match &head.query {
            Some(query) => format!("{}?{query}", CONNECT_PATHS[0]),
            None => CONNECT_PATHS[0].to_owned(),
        };
        let mut req = warp::http::Request::new(http_body_util::Empty::<bytes::Bytes>::new());
        *req.uri_mut() = target.parse().unwrap_or_default();
        *req.headers_mut() = head.headers;
        req.extensions_mut().insert(from);
        let mut service = warp::service(self.routes.clone());
        match service.call(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    /// Serves the connection's next request with hyper and the warp routes (its head due
    /// within `head_timeout`), then closes; `_pending` is held until then. Every answer
    /// but a `101` (a WebSocket handshake, whose connection goes to its session) says
    /// `Connection: close`, and hyper closes after it: hyper's own `keep_alive(false)`
    /// would put `close` on the `101` too (`upgrade, close`, which clients refuse).
    async fn hyper(
        &self,
        io: Rewind,
        peer: crate::wire::Peer,
        head_timeout: Duration,
        _pending: Option<Pending>,
    ) {
        let service = warp::service(self.routes.clone());
        let hyper_service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(peer);
            if req.headers().contains_key(warp::http::header::UPGRADE) {
                let upgrade = hyper::upgrade::on(&mut req);
                req.extensions_mut()
                    .insert(crate::wire::Upgrade::new(upgrade));
            }
            let answer = service.clone().call(req);
            async move {
                let mut resp = answer.await?;
                if resp.status() != warp::http::StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut().insert(
                        warp::http::header::CONNECTION,
                        warp::http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout.max(Duration::from_millis(1)))
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES.max(8192))
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), hyper_service)
            // A WebSocket handshake (`ws`) hands the connection to its session.
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = self.stopping.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(err) = result {
            let kind = if err.is_timeout() {
                "header_timeout"
            } else if err.is_parse_too_large() {
                "head_too_large"
            } else if err.is_parse() {
                "bad_request"
            } else if err.is_incomplete_message() || err.is_canceled() || err.is_closed() {
                "client_closed"
            } else {
                "other"
            };
            self.metrics.http_error(kind);
            tracing::debug!(peer = %peer.addr, error = %err, kind, "connection ended with an error");
        }
    }
}

/// Answers 400 to a request the gateway will not read on from, and closes.
async fn bad_request(mut socket: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = br#"{"code":400,"message":"Ambiguous request framing: several Content-Length headers, or Content-Length with Transfer-Encoding."}"#;
    let mut headers = warp::http::HeaderMap::new();
    headers.insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    let answer = crate::wire::response(
        crate::wire::Version::Http11,
        warp::http::StatusCode::BAD_REQUEST,
        &headers,
        body,
        false,
    );
    let write = socket.write_all(&answer);
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
    let _ = socket.shutdown().await;
}

/// Small writes go out at once (no Nagle delay); TCP keepalive notices dead peers.
fn tune(socket: &TcpStream, keepalive: Duration) {
    let _ = socket.set_nodelay(true);
    let probe = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(
            keepalive
                .min(Duration::from_secs(10))
                .max(Duration::from_secs(1)),
        );
    let _ = socket2::SockRef::from(socket).set_tcp_keepalive(&probe);
}
