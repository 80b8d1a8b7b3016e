//! The consumer of one queue: hands each delivery to [`Topology::deliver`] and acknowledges
//! in batches (`multiple`), at most `prefetch` deliveries in flight.
//!
//! Invariant: a delivery clients already received is not sent to them again after a cut.
//! A cut connection makes the broker redeliver (flag `redelivered`) every delivery whose
//! acknowledgement it had not processed, including ones already handed to clients and
//! acknowledged on our side while the acknowledgement was still on the wire. So the hashes
//! of the most recent deliveries (at least `prefetch` of them: the broker holds no more
//! unacknowledged ones) are kept in [`Recent`], carried over to the next consumer of the
//! queue, and a redelivery that matches one is skipped. (A publisher that sends the very
//! same routing key and body twice, and whose second copy is redelivered after a cut,
//! would lose that copy; Pulse messages carry unique ids.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use lapin::{Channel, Consumer};
use tokio::sync::Notify;

use crate::message::Incoming;
use crate::topology::Topology;

/// Deliveries acknowledged at once (with `multiple`) when more are waiting.
pub(super) const ACK_BATCH: u64 = 64;

/// Hands each delivery to the topology and acknowledges in batches; skips redeliveries
/// of recent deliveries (see the module's invariant).
pub(super) async fn consume(
    topology: Arc<Topology>,
    exchange: String,
    channel: Channel,
    mut consumer: Consumer,
    ended: ConsumerEnd,
) {
    let mut unacked = 0u64;
    let mut next = None;
    loop {
        let item = match next.take() {
            Some(item) => item,
            None => consumer.next().await,
        };
        let Some(Ok(delivery)) = item else {
            break;
        };
        let hash = delivery_hash(delivery.routing_key.as_str(), &delivery.data);
        if delivery.redelivered && ended.recent().take(hash) {
            topology.count_duplicate();
        } else {
            let incoming = Incoming {
                exchange: delivery.exchange.as_str(),
                routing_key: delivery.routing_key.as_str(),
                redelivered: delivery.redelivered,
                cc: cc_header(&delivery.properties),
                body: &delivery.data,
            };
            topology.deliver(&exchange, &incoming);
        }
        ended.recent().push(hash);
        unacked += 1;
        if unacked < ACK_BATCH
            && let Some(item) = consumer.next().now_or_never()
        {
            next = Some(item);
            continue;
        }
        let multiple = BasicAckOptions { multiple: true };
        if channel
            .basic_ack(delivery.delivery_tag, multiple)
            .await
            .is_err()
        {
            break;
        }
        unacked = 0;
    }
    tracing::debug!(%exchange, "consumer ended");
    ended.lost.store(true, Ordering::Release);
    ended.notify.notify_one();
}

/// What a consumer shares with its reconciler, and leaves to the next consumer.
#[derive(Clone)]
pub(super) struct ConsumerEnd {
    /// Set when the consumer's stream ended.
    pub(super) lost: Arc<AtomicBool>,
    /// Hashes of the most recent deliveries (see the module doc). A std `Mutex`: one consumer
    /// at a time uses it, for a few nanoseconds per delivery.
    pub(super) recent: Arc<Mutex<Recent>>,
    pub(super) notify: Arc<Notify>,
}

impl ConsumerEnd {
    pub(super) fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded ring of delivery hashes.
pub(super) struct Recent {
    hashes: VecDeque<u64>,
    capacity: usize,
}

impl Recent {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            hashes: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    fn push(&mut self, hash: u64) {
        if self.hashes.len() == self.capacity {
            self.hashes.pop_front();
        }
        self.hashes.push_back(hash);
    }

    /// Whether `hash` was delivered recently; forgets it if so.
    fn take(&mut self, hash: u64) -> bool {
        match self.hashes.iter().rposition(|h| *h == hash) {
            Some(i) => {
                self.hashes.remove(i);
                true
            }
            None => false,
        }
    }

    pub(super) fn clear(&mut self) {
        self.hashes.clear();
    }
}

/// Identifies a delivery well enough to recognise its redelivery.
fn delivery_hash(routing_key: &str, body: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    routing_key.hash(&mut h);
    body.hash(&mut h);
    h.finish()
}

/// The entries of the `CC` header (an array of strings), in order.
fn cc_header(properties: &lapin::BasicProperties) -> Vec<&str> {
    let Some(headers) = properties.headers() else {
        return Vec::new();
    };
    let Some(AMQPValue::FieldArray(entries)) = headers.inner().get("CC") else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|v| match v {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}
