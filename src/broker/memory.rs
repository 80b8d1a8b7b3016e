//! The embedded broker: an in-process stand-in for RabbitMQ so that the gateway runs on a
//! fresh machine with nothing else installed. It shares everything above the broker with
//! AMQP mode (registry, topology, topic routing, fan-out, SSE); only the source of
//! deliveries differs: the publish endpoint and the demo generator.
//!
//! Every exchange exists here (there is nothing to declare), so a binding is confirmed at
//! once, and `ready` follows without a round trip. Messages published to an exchange no
//! one is bound to are dropped, as a topic exchange without matching bindings drops them.

use std::sync::Arc;

use super::Reconcile;
use crate::message::Incoming;
use crate::topology::{BindState, Topology};

/// The in-process broker.
pub struct MemoryBroker {
    topology: Arc<Topology>,
}

impl MemoryBroker {
    pub fn new(topology: Arc<Topology>) -> Arc<Self> {
        Arc::new(Self { topology })
    }

    /// Routes one message to every subscription it matches, as a topic exchange would.
    /// Returns how many subscriptions it reached.
    pub fn publish(&self, exchange: &str, routing_key: &str, cc: &[&str], body: &[u8]) -> usize {
        let incoming = Incoming {
            exchange,
            routing_key,
            redelivered: false,
            cc: cc.to_vec(),
            body,
        };
        self.topology.deliver(exchange, &incoming)
    }
}

impl Reconcile for MemoryBroker {
    fn exchange_changed(&self, exchange: &str) {
        for pattern in self.topology.wanted(exchange) {
            self.topology
                .set_state(exchange, &pattern, BindState::Bound);
        }
    }
}
