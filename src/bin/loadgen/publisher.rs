//! Publishes to RabbitMQ at a steady rate (or a burst as fast as possible), each payload
//! carrying its sequence number and its publish time in nanoseconds since the epoch.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::Args;
use crate::scenario::Scenario;

/// What was published.
pub struct Published {
    pub total: u64,
    /// Messages per pattern.
    pub per_pattern: Vec<u64>,
    pub elapsed: Duration,
}

pub struct Publisher<'a> {
    _connection: Connection,
    channel: Channel,
    scenario: &'a Scenario,
}

impl<'a> Publisher<'a> {
    /// Connects and declares the scenario's exchanges (topic, as Pulse's are).
    pub async fn connect(url: &str, scenario: &'a Scenario) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for ex in &scenario.exchanges {
            channel
                .exchange_declare(
                    ex.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(Self {
            _connection: connection,
            channel,
            scenario,
        })
    }

    /// Publishes `--burst` messages at once, or `--rate` per second for `--duration`.
    pub async fn run(&self, args: &Args) -> anyhow::Result<Published> {
        let mut rng = fastrand::Rng::with_seed(11);
        let pad = "x".repeat(args.payload_bytes);
        let mut per_pattern = vec![0; self.scenario.patterns.len()];
        let started = Instant::now();
        let total = match args.burst {
            Some(n) => n,
            None => (args.rate * args.duration.as_secs_f64()).round() as u64,
        };
        let tick = Duration::from_millis(1);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut seq = 0;
        while seq < total {
            let due = match args.burst {
                Some(_) => total,
                None => ((started.elapsed().as_secs_f64() * args.rate) as u64 + 1).min(total),
            };
            while seq < due {
                let p = self.scenario.pick(&mut rng);
                per_pattern[p] += 1;
                self.publish(seq, p, &pad).await?;
                seq += 1;
            }
            if args.burst.is_none() {
                interval.tick().await;
            }
        }
        self.channel.wait_for_confirms().await?;
        Ok(Published {
            total,
            per_pattern,
            elapsed: started.elapsed(),
        })
    }

    async fn publish(&self, seq: u64, pattern: usize, pad: &str) -> anyhow::Result<()> {
        let p = &self.scenario.patterns[pattern];
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let body = format!("{{\"seq\":{seq},\"ts\":{ts},\"pad\":\"{pad}\"}}");
        let route = format!("{}.{:x}.{}", p.route, seq.wrapping_mul(2654435761), seq);
        let mut headers = FieldTable::default();
        headers.insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                route.as_str().into(),
            )])),
        );
        let routing_key =
            format!("primary.task{seq}.0.us-east-1.worker.proj-gecko.b-linux.gecko-level-1.group.");
        // The confirm is collected at the end (wait_for_confirms): publishing is pipelined.
        let _confirm = self
            .channel
            .basic_publish(
                self.scenario.exchanges[p.exchange].as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_headers(headers),
            )
            .await?;
        Ok(())
    }
}
