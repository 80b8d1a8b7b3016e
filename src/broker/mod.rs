//! The broker side: keeps the broker's bindings equal to what the [`Topology`] wants and
//! feeds deliveries back into it. Two implementations share everything above them:
//! [`AmqpBroker`] (RabbitMQ / Pulse) and [`MemoryBroker`] (embedded, for a fresh machine).
//!
//! [`Topology`]: crate::topology::Topology

pub mod amqp;
pub mod demo;
pub mod memory;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use amqp::{AmqpBroker, AmqpSettings};
pub use memory::MemoryBroker;

use crate::metrics::Metrics;
use crate::topology::Topology;

/// Which broker to use.
#[derive(Clone, Debug)]
pub enum BrokerSettings {
    /// RabbitMQ or Pulse.
    Amqp(Box<AmqpSettings>),
    /// The in-process broker, optionally with the demo generator.
    Embedded(Demo),
}

/// The demo generator of the embedded broker.
#[derive(Clone, Debug)]
pub struct Demo {
    pub enabled: bool,
    /// Messages per second.
    pub rate: f64,
}

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
    /// Starts the broker side `settings` name, feeding `topology`: the AMQP connection's
    /// supervisor, or the embedded broker and its demo generator (which `stop_demo`
    /// stops). `hostname` (the pod's, may be empty) goes into queue names.
    pub fn start(
        settings: &BrokerSettings,
        hostname: &str,
        topology: Arc<Topology>,
        metrics: Metrics,
        stop_demo: CancellationToken,
    ) -> Self {
        match settings {
            BrokerSettings::Amqp(settings) => Broker::Amqp(AmqpBroker::start(
                (**settings).clone(),
                hostname,
                topology,
                metrics,
            )),
            BrokerSettings::Embedded(demo) => {
                let broker = MemoryBroker::new(topology);
                metrics.broker_connected.set(1);
                if demo.enabled {
                    tokio::spawn(demo::run(broker.clone(), demo.rate, stop_demo));
                }
                tracing::info!(
                    demo = demo.enabled,
                    "no broker configured: running on the embedded broker{}; to use RabbitMQ set AMQP_URL=amqp://user:password@host:5672/%2f, for Pulse set PULSE_HOSTNAME, PULSE_USERNAME and PULSE_PASSWORD",
                    if demo.enabled {
                        " with demo task events"
                    } else {
                        ""
                    }
                );
                Broker::Memory(broker)
            }
        }
    }

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
