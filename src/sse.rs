//! One client's SSE stream: wait for `ready` (or an `error`), then the subscription's
//! frames, a `ping` every interval, and a reconnect frame when the server shuts down.
//!
//! Invariants:
//! - frames are the subscription's shared `Bytes`, never re-encoded here;
//! - the stream is a plain state machine polled by hyper, with no task of its own: hyper
//!   keeps polling while frames are ready and writes what it collected in one go (up to 16
//!   frames per `writev`);
//! - write coalescing (Nagle-like, `WRITE_COALESCE`): a frame that arrives more than the
//!   window after the client's previous write is written at once; one that arrives sooner
//!   is held until the window since that write has passed, and leaves together with every
//!   frame that arrived meanwhile (they wait in the subscription's shared buffer, not in a
//!   per-client copy). The kernel's per-write cost dominates fan-out CPU, so busy streams
//!   get fewer, larger writes, while quiet streams never wait nor arm a timer; the window
//!   bounds the latency added;
//! - a client that falls behind its subscription's buffer skips the oldest frames and is
//!   told so in an SSE comment; it never slows the others (`Lagged` in the broadcast);
//! - dropping the stream (client gone) drops the [`Client`], which leaves the subscription.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::message::{self, Frame, READY};
use crate::metrics::Metrics;
use crate::registry::Client;
use crate::topology::BindError;

type ReadyFuture = Pin<Box<dyn Future<Output = Result<(), BindError>> + Send>>;

enum Phase {
    Waiting(ReadyFuture),
    Streaming,
    Done,
}

/// The `retry:` delay sent when the server ends a stream on purpose: 0.5–5 s, jittered so
/// that the clients of a draining replica do not all reconnect at the same instant.
pub fn reconnect_delay_ms() -> u64 {
    500 + fastrand::u64(..4500)
}

/// Settings of one stream.
#[derive(Clone)]
pub struct StreamSettings {
    pub ping_interval: Duration,
    pub ready_timeout: Duration,
    /// After a write, how long further frames may wait to be written together (0: never).
    pub write_coalesce: Duration,
}

/// The body of a connect response.
pub struct ClientStream {
    phase: Phase,
    frames: BroadcastStream<Frame>,
    /// One timer for both the next ping and the end of the coalescing window.
    timer: Pin<Box<Sleep>>,
    next_ping: Instant,
    ping_interval: Duration,
    coalesce: Duration,
    /// When the last frame was handed to hyper.
    last_write: Option<Instant>,
    /// A frame that arrived within the window after the last write, and when it may go.
    held: Option<Frame>,
    hold_until: Option<Instant>,
    /// Writing out everything that accumulated during a hold.
    draining: bool,
    /// The draining token, polled only while waiting for `ready` and after a lag: a
    /// streaming client learns of a drain from [`Frame::drain`] in its channel.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    metrics: Metrics,
    connected_at: Instant,
    _client: ClientGauge,
}

/// Admission of SSE connections: at most `max` open at once.
pub struct Slots {
    open: AtomicUsize,
    max: usize,
    metrics: Metrics,
}

impl Slots {
    pub fn new(max: usize, metrics: Metrics) -> Arc<Self> {
        metrics.connections_limit.set(max as i64);
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max,
            metrics,
        })
    }

    /// Takes a slot, or `None` when `max` connections are open.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.connections_open.inc();
        Some(Slot(self.clone()))
    }
}

/// One open SSE connection; dropping it frees the slot.
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections_open.dec();
    }
}

/// Holds the client's subscription and slot for exactly as long as the stream lives, and
/// counts a client that leaves before `ready` or `error`.
struct ClientGauge {
    _client: Client,
    _slot: Slot,
    /// The connection's span (peer address, number of bindings) for its log lines.
    span: tracing::Span,
    metrics: Metrics,
    counted: bool,
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        if !self.counted {
            self.metrics.connection("client_gone");
        }
        tracing::debug!(parent: &self.span, "client left");
    }
}

impl ClientStream {
    pub fn new(
        mut client: Client,
        slot: Slot,
        span: tracing::Span,
        settings: &StreamSettings,
        shutdown: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        let ready = Box::pin(client.ready(settings.ready_timeout));
        // The receiver exists from the moment the client subscribed, so nothing published
        // after `ready` can be missed.
        let frames = match client.take_receiver() {
            Some(rx) => BroadcastStream::new(rx),
            None => BroadcastStream::new(tokio::sync::broadcast::channel(1).1),
        };
        let next_ping = Instant::now() + settings.ping_interval;
        Self {
            phase: Phase::Waiting(ready),
            frames,
            timer: Box::pin(tokio::time::sleep_until(next_ping)),
            next_ping,
            ping_interval: settings.ping_interval,
            coalesce: settings.write_coalesce,
            last_write: None,
            held: None,
            hold_until: None,
            draining: false,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            metrics: metrics.clone(),
            connected_at: Instant::now(),
            _client: ClientGauge {
                _client: client,
                _slot: slot,
                span,
                metrics,
                counted: false,
            },
        }
    }

    fn end_with(&mut self, frame: Bytes) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.phase = Phase::Done;
        Poll::Ready(Some(Ok(frame)))
    }

    /// The streaming phase: frames (coalesced), pings, lag notices.
    fn poll_streaming(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Infallible>>> {
        let now = Instant::now();
        if now >= self.next_ping {
            self.next_ping = now + self.ping_interval;
            return Poll::Ready(Some(Ok(message::ping_frame(SystemTime::now()))));
        }
        if let Some(until) = self.hold_until {
            if now < until {
                return self.sleep_until(until.min(self.next_ping), cx);
            }
            self.hold_until = None;
            self.draining = true;
            if let Some(frame) = self.held.take() {
                return Poll::Ready(Some(Ok(self.written(frame, now))));
            }
        }
        match Pin::new(&mut self.frames).poll_next(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.drain => {
                self.end_with(message::reconnect_frame(reconnect_delay_ms()))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let recent = self
                    .last_write
                    .filter(|at| now.duration_since(*at) < self.coalesce);
                if let (Some(last), false) = (recent, self.draining) {
                    let until = last + self.coalesce;
                    self.held = Some(frame);
                    self.hold_until = Some(until);
                    return self.sleep_until(until.min(self.next_ping), cx);
                }
                Poll::Ready(Some(Ok(self.written(frame, now))))
            }
            Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                // The drain marker may be among the frames this client lost.
                if self.shutdown.as_mut().poll(cx).is_ready() {
                    return self.end_with(message::reconnect_frame(reconnect_delay_ms()));
                }
                tracing::debug!(parent: &self._client.span, missed, "slow client lost messages");
                self.metrics.dropped("slow_client", missed);
                Poll::Ready(Some(Ok(message::lagged_comment(missed))))
            }
            Poll::Ready(None) => {
                self.phase = Phase::Done;
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Nothing more to write now: hyper writes what it collected in one go.
                self.draining = false;
                self.sleep_until(self.next_ping, cx)
            }
        }
    }

    /// Hands `frame` to hyper: records the write time and the fan-out latency.
    fn written(&mut self, frame: Frame, now: Instant) -> Bytes {
        self.last_write = Some(now);
        if frame.end {
            self.phase = Phase::Done;
        }
        self.metrics.fanout_latency.observe(
            now.into_std()
                .saturating_duration_since(frame.received)
                .as_secs_f64(),
        );
        frame.bytes
    }

    /// Arms the timer for `at` and waits.
    fn sleep_until(
        &mut self,
        at: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Infallible>>> {
        if self.timer.deadline() != at {
            self.timer.as_mut().reset(at);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            // Already due: come back at once.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl Stream for ClientStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Only a stream still waiting for `ready` watches the draining token; a streaming
        // one learns of the drain from its channel (`Frame::drain`), which saves a lock
        // per poll on the fan-out path.
        if matches!(this.phase, Phase::Waiting(_)) && this.shutdown.as_mut().poll(cx).is_ready() {
            return this.end_with(message::reconnect_frame(reconnect_delay_ms()));
        }
        match &mut this.phase {
            Phase::Done => Poll::Ready(None),
            Phase::Waiting(ready) => match ready.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => {
                    tracing::debug!(parent: &this._client.span, "ready");
                    this.metrics.connection("ready");
                    this.metrics
                        .time_to_ready
                        .observe(this.connected_at.elapsed().as_secs_f64());
                    this._client.counted = true;
                    this.phase = Phase::Streaming;
                    Poll::Ready(Some(Ok(Bytes::from_static(READY))))
                }
                Poll::Ready(Err(err)) => {
                    tracing::debug!(parent: &this._client.span, error = %err, "ended with an error");
                    let outcome = match err {
                        BindError::Timeout => "timeout",
                        _ => "broker_error",
                    };
                    this.metrics.connection(outcome);
                    this._client.counted = true;
                    this.end_with(message::error_frame(&err.to_string()))
                }
            },
            Phase::Streaming => this.poll_streaming(cx),
        }
    }
}
