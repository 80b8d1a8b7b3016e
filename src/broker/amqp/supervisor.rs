//! The connection supervisor: the one task that owns the AMQP connection.
//!
//! It connects (each attempt bounded by [`CONNECT_TIMEOUT`]), publishes the connection on
//! the broker's `live` watch with a new generation number, waits until the connection
//! dies, withdraws it, and connects again after a capped, jittered exponential backoff.
//! Reconcilers watch `live` and rebuild their queue and bindings on every new generation.
//!
//! A broker can accept connections and close each one at once (it refuses what the
//! gateway declares with a connection error, it is overloaded, a proxy cuts it): so the
//! backoff starts again from its first step only after a connection has held for
//! [`STABLE_AFTER`]; a connection lost sooner counts as a failed attempt (metric
//! `broker_connect_failures_total{stage="early_loss"}`, a rate-limited log line).
//!
//! Invariants: `live` holds `Some` exactly while the connection is believed usable; the
//! `broker_connected` gauge follows it. The broker is reported healthy (`/__heartbeat__`)
//! while a connection is up and holds: the first one, one after a connection that held,
//! or one up for [`HEALTHY_AFTER`] after connections that did not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties, Event};

use super::{AmqpBroker, Live};
use crate::telemetry::RateLimited;

/// How long one attempt to connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between connection attempts: doubles from the first to the cap, ±50 % jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How often the connection's status is looked at, besides its event stream.
const STATUS_CHECK: Duration = Duration::from_secs(1);
/// A connection that stays up this long resets the backoff; one lost sooner is a failed
/// attempt.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(30);
/// After connections that did not hold, a new one is reported healthy once it has been
/// up this long.
pub(super) const HEALTHY_AFTER: Duration = Duration::from_secs(5);

/// Why the last connection ended or an attempt failed, for `/__heartbeat__`.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// A connection is up and holds (see the module doc).
    pub healthy: bool,
    pub connected: bool,
    /// What went wrong last, when not healthy.
    pub reason: Option<String>,
}

impl AmqpBroker {
    /// Runs until shutdown: connect, serve, notice the loss, back off, again.
    pub(super) async fn supervise(self: Arc<Self>) {
        static LOST: RateLimited = RateLimited::new();
        static FAILED: RateLimited = RateLimited::new();
        let mut generation = 0u64;
        let mut attempt = 0u32;
        let endpoint = self.endpoint();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
                Ok(Ok(connection)) => {
                    generation += 1;
                    if generation > 1 {
                        self.metrics.broker_reconnects.inc();
                    }
                    tracing::info!(%endpoint, generation, "broker connected");
                    let opened = Instant::now();
                    let Some(reason) = self.serve(connection, generation, attempt == 0).await
                    else {
                        return;
                    };
                    let held = opened.elapsed();
                    if held >= STABLE_AFTER {
                        attempt = 0;
                    } else {
                        self.metrics
                            .broker_connect_failures
                            .with_label_values(&["early_loss"])
                            .inc();
                    }
                    let reason = format!(
                        "the connection was lost after {:.1} s: {reason}",
                        held.as_secs_f64()
                    );
                    if let Some(suppressed) = LOST.allow() {
                        tracing::warn!(%endpoint, %reason, attempt, suppressed, "broker connection lost; reconnecting");
                    }
                    self.set_failure(reason);
                }
                Ok(Err(err)) => {
                    self.metrics
                        .broker_connect_failures
                        .with_label_values(&["connect"])
                        .inc();
                    if let Some(suppressed) = FAILED.allow() {
                        tracing::warn!(%endpoint, error = %err, attempt, suppressed, "cannot connect to the broker");
                    }
                    self.set_failure(format!("cannot connect: {err}"));
                }
                Err(_) => {
                    self.metrics
                        .broker_connect_failures
                        .with_label_values(&["connect"])
                        .inc();
                    if let Some(suppressed) = FAILED.allow() {
                        tracing::warn!(%endpoint, attempt, suppressed, "timed out connecting to the broker");
                    }
                    self.set_failure("timed out connecting".to_owned());
                }
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            self.metrics.broker_backoff.set(delay.as_secs_f64());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return,
            }
            self.metrics.broker_backoff.set(0.0);
        }
    }

    fn set_failure(&self, reason: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// Whether a connection is up and holds, and what went wrong last if not.
    pub fn health(&self) -> Health {
        let live = self.live.borrow().clone();
        let reason = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match live {
            Some(live) => {
                let healthy = live.trusted || live.opened.elapsed() >= HEALTHY_AFTER;
                Health {
                    healthy,
                    connected: true,
                    reason: (!healthy).then(|| {
                        format!(
                            "connected for {:.1} s after connections that did not hold; {}",
                            live.opened.elapsed().as_secs_f64(),
                            reason.unwrap_or_default()
                        )
                    }),
                }
            }
            None => Health {
                healthy: false,
                connected: false,
                reason: Some(reason.unwrap_or_else(|| "connecting".to_owned())),
            },
        }
    }

    /// One attempt to open the connection (with a heartbeat unless the URL sets one).
    async fn connect(&self) -> lapin::Result<Connection> {
        let mut uri = self.settings.uri.clone();
        uri.query.heartbeat.get_or_insert(10);
        let props = ConnectionProperties::default()
            .with_connection_name(format!("events-gateway {}", self.instance).into());
        Connection::connect_uri(uri, props).await
    }

    /// Publishes `connection` and waits until it dies. Returns why, or `None` on shutdown
    /// (the connection then stays published so that reconcilers can delete their queues).
    /// `trusted`: the connection before it held (or this is the first), so this one is
    /// healthy at once.
    async fn serve(
        &self,
        connection: Connection,
        generation: u64,
        trusted: bool,
    ) -> Option<String> {
        let mut events = connection.events_listener();
        let connection = Arc::new(connection);
        self.live.send_replace(Some(Live {
            generation,
            connection: connection.clone(),
            opened: Instant::now(),
            trusted,
        }));
        self.metrics.broker_connected.set(1);
        let mut check = tokio::time::interval(STATUS_CHECK);
        let reason = loop {
            tokio::select! {
                event = events.next() => match event {
                    // Channel errors (a missing exchange) are reported here too; only a
                    // dead connection ends this loop.
                    Some(Event::Error(err)) if !connection.status().connected() => {
                        break err.to_string()
                    }
                    Some(_) => {}
                    None => break "connection dropped".to_owned(),
                },
                _ = check.tick() => {
                    if !connection.status().connected() {
                        break "connection closed".to_owned();
                    }
                }
                () = self.shutdown.cancelled() => return None,
            }
        };
        self.live.send_replace(None);
        self.metrics.broker_connected.set(0);
        Some(reason)
    }
}

/// Capped exponential backoff with ±50 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    base.mul_f64(0.5 + fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_CAP.mul_f64(1.5));
            assert!(d >= BACKOFF_FIRST.mul_f64(0.5));
        }
    }
}
