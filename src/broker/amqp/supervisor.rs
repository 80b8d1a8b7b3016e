//! The connection supervisor: the one task that owns the AMQP connection.
//!
//! It connects (each attempt bounded by [`CONNECT_TIMEOUT`]), publishes the connection on
//! the broker's `live` watch with a new generation number, waits until the connection
//! dies, withdraws it, and connects again after a capped, jittered exponential backoff.
//! Reconcilers watch `live` and rebuild their queue and bindings on every new generation.
//!
//! Invariant: `live` holds `Some` exactly while the connection is believed usable; the
//! `broker_connected` gauge follows it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties, Event};

use super::{AmqpBroker, Live};

/// How long one attempt to connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between connection attempts: doubles from the first to the cap, ±50 % jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How often the connection's status is looked at, besides its event stream.
const STATUS_CHECK: Duration = Duration::from_secs(1);

impl AmqpBroker {
    /// Runs until shutdown: connect, serve, notice the loss, back off, again.
    pub(super) async fn supervise(self: Arc<Self>) {
        let mut generation = 0u64;
        let mut attempt = 0u32;
        let endpoint = self.endpoint();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
                Ok(Ok(connection)) => {
                    attempt = 0;
                    generation += 1;
                    if generation > 1 {
                        self.metrics.broker_reconnects.inc();
                    }
                    tracing::info!(%endpoint, generation, "broker connected");
                    let Some(reason) = self.serve(connection, generation).await else {
                        return;
                    };
                    tracing::warn!(%endpoint, %reason, "broker connection lost; reconnecting");
                }
                Ok(Err(err)) => {
                    tracing::warn!(%endpoint, error = %err, attempt, "cannot connect to the broker");
                }
                Err(_) => {
                    tracing::warn!(%endpoint, attempt, "timed out connecting to the broker");
                }
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return,
            }
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
    async fn serve(&self, connection: Connection, generation: u64) -> Option<String> {
        let mut events = connection.events_listener();
        let connection = Arc::new(connection);
        self.live.send_replace(Some(Live {
            generation,
            connection: connection.clone(),
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
