//! A model test of the whole write path (log, shards, clients, writes) under random
//! schedules: simulated sockets that take any number of bytes per write (zero included)
//! and become writable at random steps; fast, slow, stalled and closing clients in small
//! shards; frames of random sizes; coalescing on and off; logs small enough that clients
//! lag; time that jumps. Each client's bytes must parse (HTTP/1.1 chunks, then SSE) into
//! a stream that obeys the stream rule (see `cursor`): the subscription's frames in order
//! from the client's own position, each exactly once, or one notice covering exactly the
//! frames it skipped. A client still connected at the end must have reached the end.
//!
//! Deterministic: the schedule is the test case, time is simulated, and every shard is
//! driven by hand (no runtime), so proptest shrinks a failure to a short schedule.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::model_check::{Outcome, Received, check_outcome};
use super::shard::{Pass, Shard};
use super::sim::{self, SimPeer};
use super::socket::Socket;
use super::*;
use crate::binding::Binding;
use crate::metrics::Metrics;
use crate::wire::Version;

#[derive(Clone, Copy, Debug)]
pub(super) enum Behaviour {
    /// Takes every byte at once.
    Fast,
    /// Takes what the step allows (possibly nothing).
    Slow,
    /// Takes nothing until the end of the schedule.
    Stalled,
    /// Reads like a slow client, then closes at a step.
    Closes { at: usize },
}

#[derive(Clone, Debug)]
pub(super) struct ClientSpec {
    pub(super) behaviour: Behaviour,
    pub(super) resumable: bool,
    /// The step at which it subscribes and is handed to a writer.
    pub(super) joins: usize,
}

/// A frame the schedule sends.
#[derive(Clone, Copy, Debug)]
enum Send {
    /// A `message` with this many bytes of payload.
    Message(usize),
    /// An SSE comment (a notice to every client).
    Comment,
    /// Messages may have been missed (a comment, or a `gap` on resumable streams).
    Missed,
    /// An `error` that ends every stream.
    End,
    /// The drain marker: every stream ends with its reconnect frame.
    Drain,
}

#[derive(Clone, Debug)]
struct Step {
    /// Frames sent in this step.
    sends: Vec<Send>,
    /// Bytes each slow client's socket takes in this step (`None`: any number).
    budgets: Vec<Option<u16>>,
    /// Which shards are polled in this step (bit `i % 8` for shard `i`), woken or not.
    polls: u8,
    /// Simulated time that passes after the step's polls.
    advance_ms: u16,
}

#[derive(Clone, Debug)]
struct Case {
    coalesce_ms: u64,
    max_frames: usize,
    max_bytes: usize,
    shard_clients: usize,
    clients: Vec<ClientSpec>,
    steps: Vec<Step>,
}

fn behaviour(steps: usize) -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        3 => Just(Behaviour::Fast),
        4 => Just(Behaviour::Slow),
        1 => Just(Behaviour::Stalled),
        1 => (0..steps).prop_map(|at| Behaviour::Closes { at }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..40, 1usize..10).prop_flat_map(|(steps, clients)| {
        let client = (behaviour(steps), any::<bool>(), 0..steps).prop_map(
            |(behaviour, resumable, joins)| ClientSpec {
                behaviour,
                resumable,
                joins,
            },
        );
        let step = (
            prop::collection::vec(
                prop_oneof![
                    50 => (1usize..1500).prop_map(Send::Message),
                    4 => Just(Send::Comment),
                    2 => Just(Send::Missed),
                    1 => Just(Send::End),
                    1 => Just(Send::Drain),
                ],
                0..5,
            ),
            prop::collection::vec(
                prop_oneof![1 => Just(None), 3 => (0u16..600).prop_map(Some)],
                clients,
            ),
            any::<u8>(),
            prop_oneof![Just(0u16), 0u16..40, 0u16..2000],
        )
            .prop_map(|(sends, budgets, polls, advance_ms)| Step {
                sends,
                budgets,
                polls,
                advance_ms,
            });
        (
            prop_oneof![Just(0u64), Just(10u64)],
            2usize..12,
            prop_oneof![Just(usize::MAX), 2_000usize..8_000],
            1usize..4,
            prop::collection::vec(client, clients),
            prop::collection::vec(step, steps),
        )
            .prop_map(
                |(coalesce_ms, max_frames, max_bytes, shard_clients, clients, steps)| Case {
                    coalesce_ms,
                    max_frames,
                    max_bytes,
                    shard_clients,
                    clients,
                    steps,
                },
            )
    })
}

/// A shard of the simulation, with its own waker: the end of a case runs a shard only
/// when something woke it or its timer is due, as the runtime would.
struct SimShard {
    shard: Shard,
    woken: Arc<Woken>,
    last: Pass,
}

#[derive(Default)]
struct Woken(AtomicBool);

impl futures_util::task::ArcWake for Woken {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.store(true, Ordering::SeqCst);
    }
}

impl SimShard {
    fn new(shard: Shard) -> Self {
        Self {
            shard,
            woken: Arc::new(Woken::default()),
            last: Pass::Again,
        }
    }

    /// Whether the runtime would run the shard's task now.
    fn runnable(&self, now: Instant) -> bool {
        match self.last {
            Pass::Again => true,
            Pass::Until(at) => at <= now || self.woken.0.load(Ordering::SeqCst),
            Pass::Ended => false,
        }
    }

    fn pass(&mut self, now: Instant) -> &Pass {
        self.woken.0.store(false, Ordering::SeqCst);
        let waker = futures_util::task::waker(self.woken.clone());
        let mut cx = Context::from_waker(&waker);
        self.last = self.shard.pass(&mut cx, now);
        &self.last
    }
}

/// A client of the simulation: its socket's other end and where it started reading.
struct Sim {
    spec: ClientSpec,
    peer: Option<SimPeer>,
    start: u64,
}

fn run(case: &Case) -> Outcome {
    let settings = StreamSettings {
        ping_interval: Duration::from_millis(700),
        write_coalesce: Duration::from_millis(case.coalesce_ms),
        stall_timeout: Duration::from_secs(3),
        log: LogLimits {
            max_frames: case.max_frames,
            max_bytes: case.max_bytes,
            max_age: Duration::from_secs(3600),
        },
        shard_clients: case.shard_clients,
        ..StreamSettings::default()
    };
    let bindings = Arc::new(BindingSet::new(vec![Binding {
        exchange: "exchange/model".to_owned(),
        pattern: "#".to_owned(),
    }]));
    let fanout = Fanout::new(settings, Metrics::new());
    let sub = Arc::new(Subscription::new(bindings, fanout.clone()));
    let epoch_key = sub.position(1).id();
    let epoch_key = epoch_key[..epoch_key.len() - 1].to_owned();
    let base = Instant::now();
    let mut now = base;
    let mut shards: Vec<SimShard> = Vec::new();
    let mut sims: Vec<Sim> = case
        .clients
        .iter()
        .map(|spec| Sim {
            spec: spec.clone(),
            peer: None,
            start: 0,
        })
        .collect();
    let mut sent = 0u64;
    let mut ends = Vec::new();
    for (index, step) in case.steps.iter().enumerate() {
        for (i, sim) in sims.iter_mut().enumerate() {
            if sim.spec.joins == index {
                let (socket, peer) = sim::pair();
                let at = sub.pin();
                if sim.spec.resumable {
                    sub.mark_resumable();
                }
                let conn = Conn::new(
                    Socket::Sim(socket),
                    "127.0.0.1:1".parse().expect("address"),
                    Version::Http11,
                    sim.spec.resumable,
                    at,
                    now + fanout.settings.ping_interval,
                    Box::new(()),
                );
                if let Some(shared) = sub.hand_over(conn, at) {
                    shards.push(SimShard::new(Shard::new(sub.clone(), shared)));
                }
                sim.start = at;
                sim.peer = Some(peer);
            }
            let Some(peer) = &sim.peer else { continue };
            match sim.spec.behaviour {
                Behaviour::Fast => peer.take(None),
                Behaviour::Stalled => peer.take(Some(0)),
                Behaviour::Slow => peer.take(step.budgets[i].map(usize::from)),
                Behaviour::Closes { at } if at == index => peer.close(),
                Behaviour::Closes { at } if at < index => {}
                Behaviour::Closes { .. } => peer.take(step.budgets[i].map(usize::from)),
            }
        }
        for send in &step.sends {
            sent += 1;
            let frame = match *send {
                Send::Comment => Frame::comment(Bytes::from(format!(": note {sent}\n\n"))),
                Send::Missed => Frame::missed(Bytes::from(format!(": missed {sent}\n\n"))),
                Send::Message(size) => {
                    let data = format!("{{\"n\":{sent},\"pad\":\"{}\"}}", "x".repeat(size));
                    Frame::message(
                        Bytes::from(format!("event: message\ndata: {data}\nid: -\n\n")),
                        now,
                    )
                }
                Send::End => {
                    ends.push(sent);
                    Frame::end(Bytes::from(format!(
                        "event: error\ndata: {sent}\nid: -\n\n"
                    )))
                }
                Send::Drain => {
                    ends.push(sent);
                    Frame::drain()
                }
            };
            sub.send(frame);
        }
        let mut i = 0;
        while i < shards.len() {
            if step.polls & (1 << (i % 8)) != 0 && *shards[i].pass(now) == Pass::Ended {
                shards.swap_remove(i);
            } else {
                i += 1;
            }
        }
        now += Duration::from_millis(u64::from(step.advance_ms));
    }
    // The end: every client still there reads everything, and each shard runs when the
    // runtime would run it (woken, or its timer due), while time creeps on by 1 ms when
    // none is runnable, for 100 ms: past any coalescing window, short of a ping interval.
    // A client must catch up within that; a wake-up the write path forgets leaves it
    // waiting for its ping, and fails the case.
    for sim in &sims {
        if let Some(peer) = &sim.peer {
            peer.take(None);
        }
    }
    for _ in 0..100 {
        if !shards.iter().any(|s| s.runnable(now)) {
            now += Duration::from_millis(1);
        }
        for shard in shards.iter_mut().filter(|s| s.runnable(now)) {
            shard.pass(now);
        }
        shards.retain(|s| s.last != Pass::Ended);
    }
    let head = sub.state().log.next_seq();
    let clients = sims
        .into_iter()
        .filter_map(|sim| {
            let peer = sim.peer?;
            Some(Received {
                spec: sim.spec,
                bytes: peer.received(),
                start: sim.start,
                connected: peer.connected(),
                shut: peer.shut(),
            })
        })
        .collect();
    Outcome {
        clients,
        head,
        ends,
        epoch_key,
    }
}

/// Runs a case and checks what every client received.
fn check(case: &Case) -> Result<(), TestCaseError> {
    check_outcome(&run(case))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_stream_is_its_subscriptions_frames_in_order_from_its_position(case in case()) {
        check(&case)?;
    }
}
