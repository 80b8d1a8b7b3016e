//! The HTTP server loop: accepts TCP connections and serves each with hyper's HTTP/1
//! connection driver and the warp routes.
//!
//! We run our own loop instead of `warp::serve` to set the limits an exposed service needs
//! (header read timeout against slow-header clients, a bound on the request head size and
//! so on the query string), to hand the peer address to the routes, and to log a client
//! that goes away at debug level instead of as an error (under churn that is thousands of
//! lines of noise).

use std::convert::Infallible;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use warp::Filter;
use warp::reply::Response;

use crate::http::PeerAddr;
use crate::metrics::Metrics;

/// Limits of the HTTP side.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A client must send its whole request head within this time (slow-header clients
    /// are disconnected).
    pub header_read_timeout: Duration,
    /// After shutdown, how long open connections may take to finish.
    pub grace: Duration,
}

/// Largest request head (request line with the query string, and headers) accepted.
/// hyper answers 431 to larger heads, whether they arrive in one read or in pieces.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

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

/// Serves `routes` on `listener` until `shutdown` is cancelled, then lets open
/// connections finish (streams end themselves on shutdown) for at most `grace`.
pub async fn serve<F>(
    listener: TcpListener,
    routes: F,
    limits: Limits,
    shutdown: CancellationToken,
    metrics: Metrics,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let graceful = GracefulShutdown::new();
    let service = warp::service(routes);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Usually EMFILE (out of file descriptors): back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let hyper_service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            let mut service = service.clone();
            service.call(req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES.max(8192))
            .serve_connection(TokioIo::new(stream), hyper_service);
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                // A departing SSE client shows up here as an incomplete message: normal,
                // so never logged as an error.
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
                metrics.http_error(kind);
                tracing::debug!(%peer, error = %err, kind, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}
