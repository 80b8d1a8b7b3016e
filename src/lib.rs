//! events-gateway: watch RabbitMQ / Mozilla Pulse messages over Server-Sent Events, with
//! the wire protocol of Taskcluster's events service and a broker load that does not grow
//! with the number of clients.
//!
//! How a request flows through the parts:
//!
//! ```text
//! server (accept; read each request head)
//!    │ GET on a connect path                 │ any other request
//!    ▼                                       ▼
//! connect (admission: limits per address,   http (warp routes, served by hyper:
//!    204/503, binding: parse + validate      page, health, metrics, publish)
//!    once → BindingSet, head, ready, resume)
//!    │ subscribes, then hands its socket over
//!    ▼
//! registry (one Subscription per distinct BindingSet; caps; resumable grace)
//!    │ adds/removes its bindings in
//!    ▼
//! topology (wanted bindings, broker state, topic tries) ◄── broker::amqp (reconcile the
//!    │                                                      broker, consume deliveries)
//!    │                                                   or broker::memory (embedded; fed
//!    │                                                      by /publish and demo)
//!    │ deliver: match routing key + CC (topic), encode once (message), append to the log
//!    ▼
//! subscription (a log of shared frames; writer shards of up to 256 sockets each, one
//!    wake per shard per frame, non-blocking writes framed by wire)
//! ```
//!
//! [`start`] builds all of it from a [`Config`]; [`run`] also waits for a shutdown signal.

#![forbid(unsafe_code)]

mod admission;
mod binding;
mod broker;
mod config;
mod connect;

mod http;
mod manifest;
mod message;
mod metrics;
mod page;
mod registry;
mod server;
mod subscription;
mod telemetry;
#[cfg(test)]
mod testing;
mod topic;
mod topology;
mod wire;
mod ws;

// The public API: configure, start (or run) and stop a gateway, and look at it.
pub use broker::Broker;
pub use config::{Config, ConfigError};
pub use manifest::manifest;
pub use metrics::Metrics;
pub use registry::Registry;
pub use telemetry::init as init_logging;

/// The gateway's insides, for the project's own benches and tests only: not an API, and
/// any commit may change it.
#[doc(hidden)]
pub mod internals {
    pub use crate::admission::Slot;
    pub use crate::binding::{Binding, BindingSet};
    pub use crate::broker::MemoryBroker;
    pub use crate::broker::demo::EXCHANGES as DEMO_EXCHANGES;
    pub use crate::http::ROUTES;
    pub use crate::message::{Incoming, ping_frame};
    pub use crate::registry::{Caps, Member};
    pub use crate::subscription::{Conn, Fanout, StreamSettings};
    pub use crate::topic::TopicTrie;
    pub use crate::topology::Topology;
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::subscription::Fanout;
use crate::topology::Topology;

/// How long a draining gateway keeps answering (503) before it closes its listener.
pub const DRAIN_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// A running gateway.
pub struct Running {
    local_addr: SocketAddr,
    draining: CancellationToken,
    stop_server: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    broker: Broker,
    registry: Arc<Registry>,
    fanout: Arc<Fanout>,
    stop_demo: CancellationToken,
    metrics: Metrics,
    grace: std::time::Duration,
}

/// Binds the listener, starts the broker side and serves. Returns once the port is bound.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    let topology = Arc::new(Topology::new(metrics.clone()));
    let stop_demo = CancellationToken::new();
    let broker = Broker::start(
        &config.broker,
        &config.hostname,
        topology.clone(),
        metrics.clone(),
        stop_demo.clone(),
    );
    let draining = CancellationToken::new();
    let fanout = Fanout::new(config.stream.clone(), metrics.clone());
    let registry = Arc::new(Registry::new(
        topology,
        broker.reconciler(),
        fanout.clone(),
        config.caps,
        metrics.clone(),
    ));
    for (kind, value) in [
        ("connections_per_address", config.admission.per_address),
        ("subscriptions", config.caps.max_subscriptions),
        ("broker_bindings", config.caps.max_bindings),
        ("exchanges", config.caps.max_exchanges),
        ("lingering_subscriptions", config.caps.max_lingering),
    ] {
        metrics.set_limit(kind, value);
    }
    let cors_origin: warp::http::HeaderValue = config
        .cors_origin
        .parse()
        .context("CORS_ORIGIN is not a valid header value")?;
    let mut admission_limits = config.admission.clone();
    let gate_limits = gate_limits(&config, &mut admission_limits);
    let admission = admission::Admission::new(admission_limits, metrics.clone());
    let gate = server::Gate::new(
        gate_limits,
        admission.clone(),
        config.admission.trusted_proxies.clone(),
        metrics.clone(),
    );
    let streams = Arc::new(connect::Streams {
        registry: registry.clone(),
        admission,
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        settings: config.stream.clone(),
        draining: draining.clone(),
    });
    let state = Arc::new(http::State {
        registry: registry.clone(),
        streams: streams.clone(),
        broker: broker.clone(),
        metrics: metrics.clone(),
        cors_origin,
        started: Instant::now(),
        draining: draining.clone(),
        websocket: Arc::new(ws::Context {
            streams: streams.clone(),
            settings: config.ws,
            origins: ws::Origins::parse(&config.ws_allowed_origins),
            tasks: fanout.tasks.clone(),
            closing: fanout.closing.clone(),
        }),
    });
    let listener = server::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    if let Some(path) = &config.address_file {
        std::fs::write(path, local_addr.to_string())
            .with_context(|| format!("cannot write ADDRESS_FILE {}", path.display()))?;
    }
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        listener,
        http::routes(state),
        (streams, gate),
        server::Limits {
            header_read_timeout: config.header_read_timeout,
            grace: config.shutdown_grace,
            keepalive: config.tcp_keepalive,
        },
        stop_server.clone(),
        metrics.clone(),
    ));
    tracing::info!(%local_addr, broker = %broker.describe(), "events-gateway listening");
    Ok(Running {
        local_addr,
        draining,
        stop_server,
        server,
        broker,
        registry,
        fanout,
        stop_demo,
        metrics,
        grace: config.shutdown_grace,
    })
}

/// Descriptors a process needs besides its client sockets (the broker connection,
/// epoll, the runtime's own, log files).
const OTHER_DESCRIPTORS: usize = 32;

/// The limits before admission, from the configuration and the open-file limit; lowers
/// MAX_CONNECTIONS to fit under the limit less the reserve, if need be.
fn gate_limits(config: &Config, admission: &mut admission::AdmissionLimits) -> server::GateLimits {
    let reserve = config.pending.fd_reserve;
    let sockets = server::open_file_limit()
        .map(|limit| limit.saturating_sub(reserve + OTHER_DESCRIPTORS))
        .unwrap_or(usize::MAX);
    if admission.max_connections > sockets {
        tracing::warn!(
            max_connections = admission.max_connections,
            lowered_to = sockets,
            fd_reserve = reserve,
            "MAX_CONNECTIONS does not fit under the open-file limit less FD_RESERVE; lowered"
        );
        admission.max_connections = sockets;
    }
    server::GateLimits {
        max_pending: config.pending.max,
        max_pending_per_address: config.pending.per_address,
        sockets,
        reserve,
    }
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Drains and stops: health turns 503 and new connects get 503 at once; every stream
    /// gets a reconnect frame and ends; after [`DRAIN_LINGER`] (and once the streams have
    /// ended) the listener closes; the broker queues are deleted. Bounded by the
    /// configured grace period.
    pub async fn shutdown(self) {
        let started = Instant::now();
        tracing::info!("drain started");
        // First the token (streams still waiting for `ready` watch it), then the marker
        // through every subscription's log (streaming ones read that): a stream
        // subscribing in between starts with the token already cancelled.
        self.draining.cancel();
        self.registry.announce_drain();
        self.stop_demo.cancel();
        // Keep answering for a moment: health checks see 503 and new connects get 503 (not
        // "connection refused") while every stream ends with its reconnect frame.
        let linger = DRAIN_LINGER.min(self.grace / 2);
        // Every stream ends with its reconnect frame; its writer task with its last stream.
        self.fanout.tasks.close();
        let streams_done = self.fanout.tasks.wait();
        let _ = tokio::join!(
            tokio::time::sleep(linger),
            tokio::time::timeout(self.grace / 2, streams_done)
        );
        self.stop_server.cancel();
        // Streams still open (clients that did not take their reconnect frame) are cut.
        self.fanout.closing.cancel();
        let left = self.grace.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(left, self.server).await;
        let left = self.grace.saturating_sub(started.elapsed());
        self.broker.shutdown(left).await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drain finished"
        );
    }
}

/// Runs the gateway until `shutdown` completes, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(config).await?;
    shutdown.await;
    running.shutdown().await;
    Ok(())
}
