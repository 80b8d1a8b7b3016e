//! The broker side: keeps the broker's bindings equal to what the [`Topology`] wants and
//! feeds deliveries back into it. Two implementations share everything above them:
//! [`AmqpBroker`] (RabbitMQ / Pulse) and [`MemoryBroker`] (embedded, for a fresh machine).
//!
//! [`Topology`]: crate::topology::Topology

pub mod amqp;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

pub use amqp::{AmqpBroker, AmqpSettings};
pub use memory::MemoryBroker;

/// What the registry tells the broker side: the bindings wanted on `exchange` changed.
/// Implementations must not block: they only schedule the work.
pub trait Reconcile: Send + Sync + 'static {
    fn exchange_changed(&self, exchange: &str);
}

/// The broker this process uses.
#[derive(Clone)]
pub enum Broker {
    Amqp(Arc<AmqpBroker>),
    Memory(Arc<MemoryBroker>),
}

impl Broker {
    /// The registry's handle on it.
    pub fn reconciler(&self) -> Arc<dyn Reconcile> {
        match self {
            Broker::Amqp(b) => b.clone(),
            Broker::Memory(b) => b.clone(),
        }
    }

    /// Whether deliveries can flow (the embedded broker always can).
    pub fn is_connected(&self) -> bool {
        match self {
            Broker::Amqp(b) => b.is_connected(),
            Broker::Memory(_) => true,
        }
    }

    /// Whether a broker connection is up and holds, and what went wrong last if not (the
    /// embedded broker is always healthy).
    pub fn health(&self) -> amqp::Health {
        match self {
            Broker::Amqp(b) => b.health(),
            Broker::Memory(_) => amqp::Health {
                healthy: true,
                connected: true,
                reason: None,
            },
        }
    }

    /// Where messages come from, without credentials.
    pub fn describe(&self) -> String {
        match self {
            Broker::Amqp(b) => b.endpoint(),
            Broker::Memory(_) => "embedded".to_owned(),
        }
    }

    /// Deletes this process's broker objects, waiting at most `within`.
    pub async fn shutdown(&self, within: Duration) {
        if let Broker::Amqp(b) = self {
            b.shutdown(within).await;
        }
    }
}
