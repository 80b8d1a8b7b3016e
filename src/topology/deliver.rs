//! What the topology sends to subscriptions: each broker delivery to every subscription it
//! matches (its routing key or any `CC` entry, by AMQP topic rules), its frame encoded once;
//! and the notices that concern every subscription on an exchange (messages may have been
//! missed, an exchange or a binding the broker refused).

use std::sync::Arc;
use std::time::Instant;

use super::{BindError, BindState, SubRef, Topology};
use crate::message::{Frame, Incoming};
use crate::subscription::Subscription;

impl Topology {
    /// Sends one broker delivery to every subscription on `exchange` that it matches
    /// (through its routing key or any `CC` entry), encoding its frame once.
    /// Returns how many subscriptions it reached.
    pub fn deliver(&self, exchange: &str, msg: &Incoming<'_>) -> usize {
        let received = Instant::now();
        self.metrics.messages_received.inc();
        let mut targets: Vec<Arc<Subscription>> = Vec::new();
        {
            let map = self.read();
            if let Some(ex) = map.get(exchange) {
                let mut add = |s: &SubRef| targets.push(s.0.clone());
                ex.trie.matches(msg.routing_key, &mut add);
                for cc in &msg.cc {
                    ex.trie.matches(cc, &mut add);
                }
            }
        }
        // A subscription matched by several of its patterns, or by the key and a CC
        // entry, gets the message once.
        dedup_by_identity(&mut targets);
        if targets.is_empty() {
            self.metrics.dropped("unroutable", 1);
            return 0;
        }
        let frame = match msg.encode() {
            Ok(bytes) => Frame::message(bytes, received).with_cc(msg.cc_json()),
            Err(err) => {
                self.metrics.dropped("malformed", 1);
                log_malformed(exchange, msg.routing_key, &err);
                return 0;
            }
        };
        for sub in &targets {
            sub.send(frame.clone());
        }
        targets.len()
    }

    /// Tells every subscription bound on `exchange` that messages may have been missed:
    /// the broker queue that feeds it was lost (deleted, expired during an outage, or
    /// declared anew under another name). Plain streams get the original's comment,
    /// resumable ones a `gap` event (`{"reason":"broker"}`).
    pub fn missed(&self, exchange: &str) {
        let frame = Frame::missed(crate::message::missed_comment(exchange));
        self.broadcast_to_exchange(exchange, frame, |_| true);
    }

    /// Ends the streams of every subscription bound on `exchange` with an `error` event
    /// (`text`): for clients already streaming when the broker refuses the exchange.
    pub fn fail_streams(&self, exchange: &str, text: &str) {
        let frame = Frame::end(crate::message::error_frame(text));
        self.broadcast_to_exchange(exchange, frame, |_| true);
    }

    /// The broker refused one binding: the clients waiting for it get `err` (their
    /// `ready` fails), and the streams of subscriptions that hold it end with it. Nothing
    /// else on the exchange changes.
    pub fn fail_binding(&self, exchange: &str, pattern: &str, err: BindError) {
        let frame = Frame::end(crate::message::error_frame(&err.to_string()));
        self.set_state(exchange, pattern, BindState::Failed(err));
        self.broadcast_to_exchange(exchange, frame, |sub| {
            sub.bindings()
                .iter()
                .any(|b| b.exchange == exchange && b.pattern == pattern)
        });
    }

    /// Sends `frame` to every subscription bound on `exchange` that `to` accepts.
    fn broadcast_to_exchange(
        &self,
        exchange: &str,
        frame: Frame,
        to: impl Fn(&Subscription) -> bool,
    ) {
        let mut targets: Vec<Arc<Subscription>> = Vec::new();
        {
            let map = self.read();
            if let Some(ex) = map.get(exchange) {
                ex.trie.for_each(&mut |s: &SubRef| {
                    if to(&s.0) {
                        targets.push(s.0.clone());
                    }
                });
            }
        }
        dedup_by_identity(&mut targets);
        for sub in targets {
            sub.send(frame.clone());
        }
    }

    /// Counts a redelivery skipped because its clients already had the message.
    pub fn count_duplicate(&self) {
        self.metrics.dropped("duplicate", 1);
    }
}

/// Removes repeated subscriptions (by identity) in O(n log n): many subscriptions can
/// match one message (every client set that includes `#`).
fn dedup_by_identity(targets: &mut Vec<Arc<Subscription>>) {
    if targets.len() > 1 {
        targets.sort_unstable_by_key(|t| Arc::as_ptr(t) as usize);
        targets.dedup_by(|a, b| Arc::ptr_eq(a, b));
    }
}

/// Logs a malformed message at most once per second, with how many were suppressed.
fn log_malformed(exchange: &str, routing_key: &str, err: &crate::message::MalformedBody) {
    static LIMITER: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
    if let Some(suppressed) = LIMITER.allow() {
        tracing::warn!(exchange, routing_key, error = %err, suppressed, "dropped a message that is not UTF-8 JSON");
    }
}
