//! Load generator for events-gateway: drives N concurrent SSE clients over loopback,
//! publishes to RabbitMQ at a given rate with a timestamp in each payload, and reports
//! time-to-ready, deliveries per second, lost and duplicated messages, publish→receipt
//! latency, the gateway's CPU time per delivery and RSS per connection (from /proc), and
//! the broker's queues, bindings and consumers.
//!
//! It starts the gateway itself (the release binary next to this one, or `--gateway-bin`)
//! with a unique queue prefix, so that its broker objects can be counted exactly, and
//! stops it at the end.
//!
//! ```sh
//! cargo build --release
//! target/release/loadgen --scenario same --clients 1000 --rate 200 --duration 20s
//! target/release/loadgen --scenario treeherder --clients 10000 --patterns 1000 --rate 10
//! ```

#![forbid(unsafe_code)]

mod client;
mod gateway;
mod publisher;
mod report;
mod scenario;
mod websocket;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::scenario::Scenario;

/// Drive events-gateway with many SSE clients and a publisher, and measure it.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen")]
pub struct Args {
    /// `same`: every client on one binding; `treeherder`: clients over --patterns CC
    /// routes (Zipf-skewed) across the 7 exchange/taskcluster-queue/v1/* exchanges.
    #[arg(long, default_value = "same", value_parser = ["same", "treeherder"])]
    pub scenario: String,

    /// Concurrent SSE clients.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,

    /// Distinct patterns (treeherder scenario).
    #[arg(long, default_value_t = 1000)]
    pub patterns: usize,

    /// Messages published per second (0: measure idle clients only).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,

    /// How long to publish.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Publish this many messages as fast as possible instead of at --rate.
    #[arg(long)]
    pub burst: Option<u64>,

    /// Bytes of padding in each payload (the timestamp and sequence come on top).
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,

    /// Extra clients on the first pattern that read nothing after `ready` (with a small
    /// receive buffer, so their sockets fill at once): the others' latency shows whether
    /// a stuck client holds them up.
    #[arg(long, default_value_t = 0)]
    pub stuck: usize,

    /// Clients ask for resumable streams (`resume=1`: every message carries its id).
    #[arg(long)]
    pub resume: bool,

    /// Clients speak Taskcluster's WebSocket protocol (`/subscription/raw`, one
    /// subscription each) instead of SSE.
    #[arg(long, conflicts_with_all = ["resume", "stuck"])]
    pub websocket: bool,

    /// Clients connecting at the same time while ramping up.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Clients per source address (a random 127.x.y.1, then .2, …): one address has ~28k
    /// ports towards the gateway.
    #[arg(long, default_value_t = 10_000)]
    pub clients_per_source: usize,

    /// RabbitMQ for the gateway and the publisher.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// The gateway binary (default: events-gateway next to this binary).
    #[arg(long)]
    pub gateway_bin: Option<std::path::PathBuf>,

    /// Port for the gateway.
    #[arg(long, default_value_t = 18090)]
    pub port: u16,

    /// Extra flags for the gateway, e.g. --gateway-arg=--subscription-buffer=4096.
    #[arg(long = "gateway-arg")]
    pub gateway_args: Vec<String>,

    /// Print the report as one JSON object too (for BENCHMARKS.md and the plots).
    #[arg(long)]
    pub json: bool,
}

/// The gateway's own measure of fan-out latency: from a delivery reaching it to the frame
/// handed to a client's socket.
const FANOUT_LATENCY: &str = "events_gateway_fanout_latency_seconds";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenario = Scenario::new(&args);
    let gateway = gateway::Gateway::spawn(&args, &scenario)
        .await
        .context("starting the gateway")?;
    let result = run(&args, &scenario, &gateway).await;
    gateway.stop().await;
    let report = result?;
    report.print(&args);
    Ok(())
}

async fn run(
    args: &Args,
    scenario: &Scenario,
    gateway: &gateway::Gateway,
) -> anyhow::Result<report::Report> {
    let publisher = publisher::Publisher::connect(&args.amqp_url, scenario).await?;
    let mut report = report::Report::new(args);
    let baseline = gateway.sample()?;

    // Ramp: connect every client and wait for its `ready`.
    let started = std::time::Instant::now();
    let clients = client::connect_all(args, scenario, gateway.addr()).await?;
    report.ramp(started.elapsed(), &clients);
    let stuck = client::connect_stuck(args, scenario, gateway.addr()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = gateway.sample()?;
    report.idle(&baseline, &idle, clients.ready());
    report.broker = gateway.broker_objects().await.ok();

    // Publish, then give the last deliveries a moment to arrive.
    if args.rate > 0.0 || args.burst.is_some() {
        let before = gateway.sample()?;
        let fanout_before = gateway.histogram(FANOUT_LATENCY).await?;
        let published = publisher.run(args).await?;
        clients.settle(&published, Duration::from_secs(5)).await;
        let after = gateway.sample()?;
        report.traffic(&published, &clients, &before, &after);
        report.gateway_latency(&fanout_before, &gateway.histogram(FANOUT_LATENCY).await?);
    }
    // Every client leaves: memory should return near the baseline.
    clients.close();
    drop(stuck);
    tokio::time::sleep(Duration::from_secs(12)).await;
    report.after_leave(
        &gateway.sample()?,
        gateway.metric("events_gateway_connections_open").await.ok(),
        gateway.metric("events_gateway_subscriptions").await.ok(),
    );
    Ok(report)
}
