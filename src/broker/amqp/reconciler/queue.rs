//! The reconciler's queue operations: declare the exchange's queue and start its consumer,
//! check that the exchange and an earlier queue still exist, and delete the queue.
//!
//! The declaration works on RabbitMQ 3.10 through 4.3 with upstream's defaults: a durable
//! classic queue (4.3 refuses transient non-exclusive queues; an explicit
//! `x-queue-type=classic` keeps brokers that default to quorum queues from making it one),
//! with `x-expires` (it goes by itself once the gateway is gone) and length bounds
//! (drop-head). Durable costs: its metadata is kept on disk, and persistent messages
//! routed to it are written to disk.
//!
//! Invariants:
//! - a queue is declared only after a passive declare found its exchange, so a missing
//!   exchange leaves nothing on the broker;
//! - a queue from an earlier connection is re-declared only after a passive check that it
//!   survived; if it did not, its clients are told that messages may have been missed;
//! - a queue the broker cannot declare under its name (404: a durable queue whose node is
//!   down; 406: a queue of that name with other arguments) is declared under a new name,
//!   and its clients are told that messages may have been missed; never "no such
//!   exchange";
//! - a refusal fails every binding of the exchange and ends the streams bound on it.

use std::sync::atomic::Ordering;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use super::{Reconciler, Retry};
use crate::broker::amqp::Live;
use crate::broker::amqp::consumer::consume;
use crate::broker::amqp::errors::{
    DeclareFailure, TimedError, declare_failure, exchange_refusal, is_not_found, timed,
};
use crate::topology::{BindError, BindState};

/// New names tried in one pass for a queue the broker cannot declare under its name.
const MAX_RENAMES_PER_PASS: u32 = 3;

impl Reconciler {
    /// Checks the exchange exists, declares the queue and starts consuming. `Ok(false)`:
    /// the broker refused (the subscriptions were told); nothing was left on the broker.
    pub(super) async fn declare(&mut self, live: &Live) -> Result<bool, Retry> {
        let ops = self.ops_channel(live).await?;
        if let Err(err) = exchange_exists(&ops, &self.exchange).await {
            return self.exchange_failed(err);
        }
        let options = QueueDeclareOptions {
            durable: true,
            exclusive: false,
            auto_delete: false,
            ..Default::default()
        };
        let mut renames = 0;
        loop {
            let ops = if self.queue_may_exist {
                self.check_queue_survived(live).await?
            } else {
                self.ops_channel(live).await?
            };
            let declared = timed(ops.queue_declare(
                self.queue.as_str().into(),
                options,
                self.queue_arguments(),
            ))
            .await;
            let err = match declared {
                Ok(_) => break,
                Err(err) => err,
            };
            self.ops = None;
            match declare_failure(&err, &self.exchange) {
                DeclareFailure::Refused(refused) => return Ok(self.fail_exchange(refused)),
                DeclareFailure::Retry => return Err(Retry::from(err)),
                DeclareFailure::Rename(reason) if renames < MAX_RENAMES_PER_PASS => {
                    renames += 1;
                    self.rename_queue(&reason);
                }
                DeclareFailure::Rename(reason) => return Err(Retry(reason)),
            }
        }
        self.declared = true;
        self.queue_may_exist = true;
        self.start_consumer(live).await?;
        Ok(true)
    }

    /// The broker cannot declare the queue under its name: the next name is tried, and
    /// the clients on the exchange are told that messages may have been missed if the
    /// old queue held some for them. The old queue, if it exists, expires by itself.
    fn rename_queue(&mut self, reason: &str) {
        let old = std::mem::take(&mut self.queue);
        self.renames += 1;
        self.queue = self.broker.queue_name(&self.exchange, self.renames);
        tracing::warn!(exchange = %self.exchange, %old, new = %self.queue, %reason, "the broker cannot declare the queue under its name; using a new one");
        if self.queue_may_exist {
            self.broker.topology.missed(&self.exchange);
            self.consumer_end.recent().clear();
        }
        self.queue_may_exist = false;
        self.bound.clear();
        self.stale.clear();
    }

    /// `x-queue-type=classic` (brokers that default to quorum queues, as Amazon MQ's 4.2
    /// does for durable ones, would otherwise put every message through a Raft log),
    /// `x-expires` (the queue outlives a short outage but not the process), and
    /// `x-max-length` and `x-max-length-bytes` with drop-head (the broker never holds an
    /// unbounded backlog, in messages or in bytes).
    fn queue_arguments(&self) -> FieldTable {
        let settings = &self.broker.settings;
        let expires_ms = settings
            .queue_expires
            .as_millis()
            .clamp(1, u128::from(u32::MAX)) as u32;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        args.insert("x-expires".into(), AMQPValue::LongUInt(expires_ms));
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongUInt(settings.queue_max_length),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(settings.queue_max_bytes).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        args
    }

    /// The broker sends no notice when an exchange is deleted: its bindings vanish and the
    /// queue simply gets nothing more. So the exchange of a declared queue is checked (a
    /// passive declare); if it is gone, the streams bound on it end with an error, as when
    /// a client asks for a missing exchange.
    pub(super) async fn check_exchange(&mut self, live: &Live) -> Result<(), Retry> {
        if !self.declared || self.generation != live.generation {
            return Ok(());
        }
        let ops = self.ops_channel(live).await?;
        let Err(err) = exchange_exists(&ops, &self.exchange).await else {
            return Ok(());
        };
        if is_not_found(&err) {
            tracing::warn!(exchange = %self.exchange, "exchange no longer exists; ending the streams bound on it");
            // Its bindings went with it.
            self.bound.clear();
        }
        self.exchange_failed(err).map(|_| ())
    }

    /// Before declaring again a queue we had: did it survive (outage shorter than
    /// `x-expires`, nobody deleted it)? If not, its messages since are lost: the
    /// subscriptions on this exchange are told, and nothing of the old queue is assumed.
    /// Returns the channel to go on with (a failed passive declare closes the channel).
    async fn check_queue_survived(&mut self, live: &Live) -> Result<Channel, Retry> {
        let ops = self.ops_channel(live).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let probe =
            timed(ops.queue_declare(self.queue.as_str().into(), passive, FieldTable::default()))
                .await;
        match probe {
            Ok(queue) => {
                if queue.message_count() >= self.broker.settings.queue_max_length {
                    // The backlog reached its bound while we were away: the broker has
                    // been dropping the oldest messages (drop-head).
                    tracing::warn!(queue = %self.queue, exchange = %self.exchange, backlog = queue.message_count(), "the queue's backlog reached QUEUE_MAX_LENGTH during the outage; its oldest messages were dropped");
                    self.broker.topology.missed(&self.exchange);
                }
                Ok(ops)
            }
            Err(err) if is_not_found(&err) => {
                tracing::warn!(queue = %self.queue, exchange = %self.exchange, "broker queue was lost; re-creating it, messages published meanwhile are missed");
                self.queue_may_exist = false;
                self.bound.clear();
                self.stale.clear();
                self.consumer_end.recent().clear();
                self.broker.topology.missed(&self.exchange);
                self.ops = None;
                self.ops_channel(live).await
            }
            Err(err) => Err(Retry::from(err)),
        }
    }

    /// A failed passive declare of the exchange: final refusals fail every binding of the
    /// exchange (`Ok(false)`), anything else is retried.
    fn exchange_failed(&mut self, err: TimedError) -> Result<bool, Retry> {
        self.ops = None;
        match exchange_refusal(&err, &self.exchange) {
            Some(refused) => Ok(self.fail_exchange(refused)),
            None => Err(Retry::from(err)),
        }
    }

    /// Fails every binding of the exchange, and ends the streams bound on it. Returns
    /// `false` (nothing is declared).
    fn fail_exchange(&mut self, refused: BindError) -> bool {
        // Any client can cause this (an exchange that does not exist): rate-limited.
        static LIMITER: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
        if let Some(suppressed) = LIMITER.allow() {
            tracing::info!(exchange = %self.exchange, error = %refused, suppressed, "bindings refused");
        }
        // Clients still waiting learn it from their `ready` watch; clients already
        // streaming (the exchange vanished during an outage) get the error too.
        self.broker
            .topology
            .fail_streams(&self.exchange, &refused.to_string());
        self.broker
            .topology
            .set_all(&self.exchange, BindState::Failed(refused));
        false
    }

    /// Opens a channel of the consumer's own, with `prefetch`, and starts its task.
    async fn start_consumer(&mut self, live: &Live) -> Result<(), Retry> {
        let channel = timed(live.connection.create_channel()).await?;
        timed(channel.basic_qos(self.broker.settings.prefetch, BasicQosOptions::default())).await?;
        let consumer = timed(channel.basic_consume(
            self.queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        self.consumer_end.lost.store(false, Ordering::Release);
        let task = tokio::spawn(consume(
            self.broker.topology.clone(),
            self.exchange.clone(),
            channel.clone(),
            consumer,
            self.consumer_end.clone(),
        ));
        self.consumer = Some((channel, task));
        Ok(())
    }

    /// Stops consuming and deletes the queue (its bindings go with it). If that fails the
    /// queue still disappears by itself once unused for `x-expires`; what was bound is
    /// then only possibly there. Returns whether the queue is gone.
    pub(super) async fn delete_queue(&mut self, live: &Live) -> bool {
        if let Some((channel, task)) = self.consumer.take() {
            task.abort();
            let _ = timed(channel.close(200, "no longer needed".into())).await;
        }
        self.declared = false;
        let Ok(ops) = self.ops_channel(live).await else {
            self.stale.extend(self.bound.drain());
            return false;
        };
        let deleted =
            timed(ops.queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default()))
                .await;
        match deleted {
            Ok(_) => {
                self.queue_may_exist = false;
                self.bound.clear();
                self.stale.clear();
                true
            }
            Err(err) => {
                tracing::debug!(queue = %self.queue, error = %err, "could not delete queue");
                self.ops = None;
                self.stale.extend(self.bound.drain());
                false
            }
        }
    }
}

/// A passive declare: fails (and closes the channel) if the exchange does not exist.
async fn exchange_exists(ops: &Channel, exchange: &str) -> Result<(), TimedError> {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    timed(ops.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        passive,
        FieldTable::default(),
    ))
    .await
}
