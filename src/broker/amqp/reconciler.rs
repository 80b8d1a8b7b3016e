//! The reconciler of one exchange: a task that keeps the exchange's queue, bindings and
//! consumer equal to what the [`Topology`] wants, on channels of its own.
//!
//! It keeps two views of the broker: what it confirmed on the current connection
//! (`declared`, `bound`) and what may still exist from an earlier one (`queue_may_exist`,
//! `stale`): a queue outlives a lost connection (it is not exclusive), and so do its
//! bindings, so patterns released during an outage are unbound after recovery.
//!
//! Invariants:
//! - after a lost connection or a failed operation nothing is assumed confirmed: the queue
//!   is declared again (same name) and every wanted pattern bound again;
//! - a refusal is final only for what it names: only the first refusal of a pipelined
//!   batch is known to be about its own pattern (see [`Reconciler::bind_missing`]);
//! - the task ends only after its queue is gone, and only while holding the broker's
//!   actors lock with nothing wanted ([`Reconciler::leave`]).
//!
//! Its queue's life (declare, checks, rename, delete) is in the child module [`queue`].
//!
//! [`Topology`]: crate::topology::Topology

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::Channel;
use lapin::types::FieldTable;
use tokio::sync::Notify;

use super::consumer::{ACK_BATCH, ConsumerEnd, Recent};
use super::errors::{bind_refusal, timed};
use super::{AmqpBroker, Live};
use crate::topology::BindState;

mod queue;

/// A reconciler whose broker operation failed for a transient reason retries after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A transient failure (lost connection, timeout): the pass is retried later.
pub(super) struct Retry(String);

impl<E: std::fmt::Display> From<E> for Retry {
    fn from(err: E) -> Self {
        Retry(err.to_string())
    }
}

/// Keeps one exchange's queue, bindings and consumer equal to what the topology wants.
pub(super) struct Reconciler {
    broker: Arc<AmqpBroker>,
    exchange: String,
    queue: String,
    /// New queue names taken because the broker could not declare the queue under its
    /// name (see [`queue`]).
    renames: u32,
    notify: Arc<Notify>,
    /// Connection generation our channels belong to (0: none).
    generation: u64,
    /// The channel for declares, binds and unbinds (a refusal closes it).
    ops: Option<Channel>,
    consumer: Option<(Channel, tokio::task::JoinHandle<()>)>,
    /// Shared with the consumer task: set when its stream ends (channel or connection
    /// lost, queue deleted by someone else), and its most recent deliveries.
    consumer_end: ConsumerEnd,
    /// Queue declared (and consumed) on the current connection.
    declared: bool,
    /// The queue may exist on the broker (declared on this or an earlier connection).
    queue_may_exist: bool,
    /// Patterns bound on the current connection.
    bound: HashSet<String>,
    /// Patterns bound on an earlier connection that may still be on the queue.
    stale: HashSet<String>,
    /// What this reconciler last added to the queue and binding gauges.
    reported: (i64, i64),
}

impl Reconciler {
    pub(super) fn new(broker: Arc<AmqpBroker>, exchange: String, notify: Arc<Notify>) -> Self {
        let queue = broker.queue_name(&exchange, 0);
        let recent = Recent::new((usize::from(broker.settings.prefetch) + ACK_BATCH as usize) * 2);
        Self {
            broker,
            exchange,
            queue,
            renames: 0,
            generation: 0,
            ops: None,
            consumer: None,
            consumer_end: ConsumerEnd {
                lost: Arc::new(AtomicBool::new(false)),
                recent: Arc::new(Mutex::new(recent)),
                notify: notify.clone(),
            },
            notify,
            declared: false,
            queue_may_exist: false,
            bound: HashSet::new(),
            stale: HashSet::new(),
            reported: (0, 0),
        }
    }

    /// The task: one pass whenever something changed (wanted bindings, the connection, a
    /// retry or an exchange check falling due), until nothing is wanted and the queue is
    /// gone, or the broker shuts down.
    pub(super) async fn run(mut self) {
        let mut live_rx = self.broker.live.subscribe();
        let mut check_due = false;
        loop {
            let live = live_rx.borrow_and_update().clone();
            if self.broker.shutdown.is_cancelled() {
                if let Some(live) = &live {
                    self.delete_queue(live).await;
                }
                self.report();
                self.leave(true);
                return;
            }
            let retry = match &live {
                Some(live) => {
                    let pass = self.pass(std::mem::take(&mut check_due), live).await;
                    match pass {
                        Ok(()) => false,
                        Err(Retry(reason)) => {
                            tracing::warn!(exchange = %self.exchange, %reason, "broker operation failed; will retry");
                            self.forget_connection();
                            true
                        }
                    }
                }
                None => {
                    self.forget_connection();
                    false
                }
            };
            self.report();
            if !self.queue_may_exist && self.leave(false) {
                return;
            }
            // Only a queue that is declared and consumed has an exchange worth checking.
            let check_after =
                (self.declared && !retry).then_some(self.broker.settings.exchange_check_interval);
            tokio::select! {
                () = self.notify.notified() => {}
                changed = live_rx.changed() => {
                    if changed.is_err() { return; }
                }
                () = sleep_if(retry.then_some(RETRY_AFTER)) => {}
                () = sleep_if(check_after) => check_due = true,
                () = self.broker.shutdown.cancelled() => {}
            }
        }
    }

    /// One pass: the exchange check if due, then the reconciliation.
    async fn pass(&mut self, check_due: bool, live: &Live) -> Result<(), Retry> {
        if check_due {
            self.check_exchange(live).await?;
        }
        self.reconcile(live).await
    }

    /// Makes the broker match what is wanted now.
    async fn reconcile(&mut self, live: &Live) -> Result<(), Retry> {
        self.adopt_connection(live);
        let wanted: HashSet<String> = self
            .broker
            .topology
            .wanted(&self.exchange)
            .into_iter()
            .collect();
        if wanted.is_empty() {
            return self.remove_queue(live).await;
        }
        if !self.declared && !self.declare(live).await? {
            return Ok(());
        }
        self.confirm_still_bound(&wanted);
        let bound = self.bind_missing(live, &wanted).await;
        let unbound = self.unbind_unwanted(live, &wanted).await;
        bound.and(unbound)
    }

    /// A new connection, or a consumer that ended, means nothing on the broker is
    /// confirmed any more.
    fn adopt_connection(&mut self, live: &Live) {
        let consumer_lost = self.consumer_end.lost.swap(false, Ordering::AcqRel);
        if self.generation != live.generation || consumer_lost {
            if self.generation != 0 {
                self.forget_connection();
            }
            self.generation = live.generation;
        }
    }

    /// Deletes the queue nobody needs any more (if it may exist).
    async fn remove_queue(&mut self, live: &Live) -> Result<(), Retry> {
        if self.queue_may_exist && !self.delete_queue(live).await {
            return Err(Retry("could not delete the queue".into()));
        }
        Ok(())
    }

    /// A binding released and asked for again while we were busy is a new entry in the
    /// topology, still Pending, though it never left the broker: confirms it.
    fn confirm_still_bound(&self, wanted: &HashSet<String>) {
        for pattern in wanted.intersection(&self.bound) {
            self.broker
                .topology
                .confirm_if_pending(&self.exchange, pattern);
        }
    }

    /// Binds every wanted pattern not bound yet, pipelined, and records each answer.
    ///
    /// The broker closes the channel on a refusal, and lapin fails every reply pending on
    /// it with the same error: only the first refusal of a batch is known to be about its
    /// own pattern (it is final for the subscriptions that asked for it); the patterns
    /// after it are bound again at once on a new channel. Each round decides at least
    /// one pattern, so the rounds are bounded by the patterns; a refusal never touches
    /// the queue, the consumer or the other bindings.
    async fn bind_missing(&mut self, live: &Live, wanted: &HashSet<String>) -> Result<(), Retry> {
        let mut to_bind: Vec<String> = wanted.difference(&self.bound).cloned().collect();
        while !to_bind.is_empty() {
            let ops = self.ops_channel(live).await?;
            let binds = to_bind.iter().map(|pattern| {
                timed(ops.queue_bind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    pattern.as_str().into(),
                    Default::default(),
                    FieldTable::default(),
                ))
            });
            let results = join_all(binds).await;
            let mut again = Vec::new();
            let mut refused_one = false;
            for (pattern, result) in to_bind.into_iter().zip(results) {
                let err = match result {
                    Ok(()) => {
                        self.stale.remove(&pattern);
                        self.broker
                            .topology
                            .set_state(&self.exchange, &pattern, BindState::Bound);
                        self.bound.insert(pattern);
                        continue;
                    }
                    Err(err) if refused_one => {
                        // Failed with the channel the refusal before it closed.
                        let _ = err;
                        again.push(pattern);
                        continue;
                    }
                    Err(err) => err,
                };
                let Some(refused) = bind_refusal(&err, &self.exchange, &pattern) else {
                    return Err(Retry::from(err));
                };
                refused_one = true;
                self.ops = None;
                log_bind_refusal(&self.exchange, &refused);
                self.broker
                    .topology
                    .fail_binding(&self.exchange, &pattern, refused);
            }
            to_bind = again;
        }
        Ok(())
    }

    /// Unbinds every pattern bound now or on an earlier connection that is not wanted.
    async fn unbind_unwanted(
        &mut self,
        live: &Live,
        wanted: &HashSet<String>,
    ) -> Result<(), Retry> {
        let to_unbind: Vec<String> = self
            .bound
            .union(&self.stale)
            .filter(|p| !wanted.contains(*p))
            .cloned()
            .collect();
        if to_unbind.is_empty() {
            return Ok(());
        }
        let ops = self.ops_channel(live).await?;
        let unbinds = to_unbind.iter().map(|pattern| {
            timed(ops.queue_unbind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                pattern.as_str().into(),
                FieldTable::default(),
            ))
        });
        let mut outcome = Ok(());
        for (pattern, result) in to_unbind.iter().zip(join_all(unbinds).await) {
            match result {
                Ok(()) => {
                    self.bound.remove(pattern);
                    self.stale.remove(pattern);
                }
                Err(err) => outcome = Err(Retry::from(err)),
            }
        }
        outcome
    }

    /// The operations channel, opened again if a refusal (or the connection) closed it.
    async fn ops_channel(&mut self, live: &Live) -> Result<Channel, Retry> {
        if let Some(ops) = &self.ops
            && ops.status().connected()
        {
            return Ok(ops.clone());
        }
        let ops = timed(live.connection.create_channel()).await?;
        self.ops = Some(ops.clone());
        Ok(ops)
    }

    /// Removes this reconciler from the broker's map if nothing is wanted (or `force`).
    /// Returns whether it did (the task must then end).
    fn leave(&self, force: bool) -> bool {
        let mut actors = self.broker.actors.lock().unwrap_or_else(|e| e.into_inner());
        if force || self.broker.topology.wanted(&self.exchange).is_empty() {
            actors.remove(&self.exchange);
            return true;
        }
        false
    }

    /// Brings the queue and binding gauges up to date with this reconciler's state.
    fn report(&mut self) {
        let now = (
            i64::from(self.queue_may_exist),
            self.bound.union(&self.stale).count() as i64,
        );
        let metrics = &self.broker.metrics;
        metrics.broker_queues.add(now.0 - self.reported.0);
        metrics.broker_bindings.add(now.1 - self.reported.1);
        self.reported = now;
    }

    /// After a lost connection or a failed operation nothing is assumed confirmed: the
    /// queue is declared again (same name) and every wanted pattern bound again; what was
    /// bound before is remembered as possibly still there.
    fn forget_connection(&mut self) {
        if let Some((_, task)) = self.consumer.take() {
            task.abort();
        }
        self.ops = None;
        self.declared = false;
        self.stale.extend(self.bound.drain());
        self.generation = 0;
        self.broker
            .topology
            .set_all(&self.exchange, BindState::Pending);
    }
}

/// Logs a binding the broker refused (any client can cause this: rate-limited).
fn log_bind_refusal(exchange: &str, refused: &crate::topology::BindError) {
    static LIMITER: crate::telemetry::RateLimited = crate::telemetry::RateLimited::new();
    if let Some(suppressed) = LIMITER.allow() {
        tracing::info!(exchange, error = %refused, suppressed, "binding refused");
    }
}

/// Sleeps for `after`, or forever when `None` (a `select!` branch that never fires).
async fn sleep_if(after: Option<Duration>) {
    match after {
        Some(after) => tokio::time::sleep(after).await,
        None => std::future::pending().await,
    }
}
