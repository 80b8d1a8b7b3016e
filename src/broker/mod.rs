//! The broker side: keeps the broker's bindings equal to what the [`Topology`] wants and
//! feeds deliveries back into it.
//!
//! [`Topology`]: crate::topology::Topology

pub mod amqp;

pub use amqp::{AmqpBroker, AmqpSettings};

/// What the registry tells the broker side: the bindings wanted on `exchange` changed.
/// Implementations must not block: they only schedule the work.
pub trait Reconcile: Send + Sync + 'static {
    fn exchange_changed(&self, exchange: &str);
}
