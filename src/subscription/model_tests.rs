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

use super::shard::{Pass, Shard};
use super::sim::{self, SimPeer};
use super::socket::Socket;
use super::*;
use crate::binding::Binding;
use crate::wire::Version;

#[derive(Clone, Copy, Debug)]
enum Behaviour {
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
struct ClientSpec {
    behaviour: Behaviour,
    resumable: bool,
    /// The step at which it subscribes and is handed to a writer.
    joins: usize,
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

/// What a case did: each client's bytes, start position and end state; the log's end;
/// the positions of the frames that end streams.
struct Outcome {
    clients: Vec<Received>,
    head: u64,
    ends: Vec<u64>,
    epoch_key: String,
}

struct Received {
    spec: ClientSpec,
    bytes: Vec<u8>,
    start: u64,
    /// The gateway still holds the connection.
    connected: bool,
    /// The gateway ended the stream (closed its sending side).
    shut: bool,
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

/// The data of an HTTP/1.1 chunked body; `Err` if the framing breaks. A body cut off
/// mid-chunk (a client that left) gives what came before the cut.
fn dechunk(mut body: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let mut data = Vec::new();
    while !body.is_empty() {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok((data, false));
        };
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or_else(|| format!("bad chunk size {:?}", &body[..line_end.min(20)]))?;
        let rest = &body[line_end + 2..];
        if rest.len() < size + 2 {
            return Ok((data, false));
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".to_owned());
        }
        if size == 0 {
            return Ok((data, true));
        }
        data.extend_from_slice(&rest[..size]);
        body = &rest[size + 2..];
    }
    Ok((data, true))
}

/// Checks one client's stream against the stream rule; returns the position it reached
/// and whether the stream ended with a frame that ends it.
fn check_stream(
    text: &str,
    start: u64,
    resumable: bool,
    outcome: &Outcome,
) -> Result<(u64, bool), String> {
    let epoch_key = outcome.epoch_key.as_str();
    let mut at = start;
    let mut ended = false;
    let id_of = |event: &str| -> Option<u64> {
        let id = event.lines().find_map(|l| l.strip_prefix("id: "))?;
        id.strip_prefix(epoch_key)?.parse().ok()
    };
    let events: Vec<&str> = text.split("\n\n").collect();
    // The text after the last "\n\n" is an event cut off by a client that left.
    for event in &events[..events.len().saturating_sub(1)] {
        if ended {
            return Err(format!("{event:?} after the end of the stream"));
        }
        if let Some(rest) = event.strip_prefix("event: error\ndata: ") {
            let n: u64 = rest
                .split('\n')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad error {event:?}"))?;
            if n != at {
                return Err(format!("error {n} where {at} was due"));
            }
            at += 1;
            ended = true;
        } else if event.starts_with("event: reconnect\ndata: {}\n") {
            if !outcome.ends.contains(&at) {
                return Err(format!("reconnect frame at {at}, where no drain was sent"));
            }
            let id_ok = match resumable {
                true => !event.contains("\nid"),
                false => event.contains("\nid:\nretry: "),
            };
            if !id_ok {
                return Err(format!("reconnect frame with a wrong id: {event:?}"));
            }
            at += 1;
            ended = true;
        } else if let Some(rest) = event.strip_prefix(": note ") {
            let n: u64 = rest.parse().map_err(|_| format!("bad note {event:?}"))?;
            if n != at {
                return Err(format!("comment {n} where {at} was due"));
            }
            at += 1;
        } else if let Some(rest) = event.strip_prefix(": missed ") {
            let n: u64 = rest.parse().map_err(|_| format!("bad notice {event:?}"))?;
            if resumable || n != at {
                return Err(format!(
                    "missed notice {n} at {at} (resumable: {resumable})"
                ));
            }
            at += 1;
        } else if event.starts_with("event: gap\ndata: {\"reason\":\"broker\"}\n") {
            if !resumable || id_of(event) != Some(at) {
                return Err(format!(
                    "broker gap at {at}: {event:?} (resumable: {resumable})"
                ));
            }
            at += 1;
        } else if let Some(rest) = event.strip_prefix(": ") {
            let missed: u64 = rest
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad notice {event:?}"))?;
            if resumable || missed == 0 {
                return Err(format!("unexpected notice {event:?}"));
            }
            at += missed;
        } else if event.starts_with("event: gap\n") {
            if !resumable {
                return Err("gap on a plain stream".to_owned());
            }
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .ok_or("gap without data")?;
            let json: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            let missed = json["missed"].as_u64().ok_or("gap without missed")?;
            if missed == 0 {
                return Err("gap of nothing".to_owned());
            }
            at += missed;
            if id_of(event) != Some(at - 1) {
                return Err(format!("gap {event:?} does not name position {}", at - 1));
            }
        } else if event.starts_with("event: message\n") {
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .ok_or("message without data")?;
            let json: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            let n = json["n"].as_u64().ok_or("message without n")?;
            if n != at {
                return Err(format!("message {n} where {at} was due"));
            }
            let id_ok = match resumable {
                true => id_of(event) == Some(n),
                false => event.ends_with("\nid: -"),
            };
            if !id_ok {
                return Err(format!("message {n} with a wrong id: {event:?}"));
            }
            at += 1;
        } else if event.starts_with("event: ping\n") {
            let id_ok = match resumable {
                true => id_of(event) == Some(at - 1),
                false => event.ends_with("\nid: -"),
            };
            if !id_ok {
                return Err(format!("ping at {at} with a wrong id: {event:?}"));
            }
        } else {
            return Err(format!("unexpected event {event:?}"));
        }
    }
    Ok((at, ended))
}

fn check(case: &Case) -> Result<(), TestCaseError> {
    let outcome = run(case);
    for (i, client) in outcome.clients.iter().enumerate() {
        let spec = &client.spec;
        let (data, whole) =
            dechunk(&client.bytes).map_err(|e| TestCaseError::fail(format!("client {i}: {e}")))?;
        let text = String::from_utf8(data)
            .map_err(|_| TestCaseError::fail(format!("client {i}: not UTF-8")))?;
        let (reached, ended) = check_stream(&text, client.start, spec.resumable, &outcome)
            .map_err(|e| TestCaseError::fail(format!("client {i} ({spec:?}): {e}")))?;
        let must_end = outcome.ends.iter().any(|at| *at >= client.start);
        prop_assert!(
            !client.shut || ended,
            "client {} ({:?}) was ended without its end frame",
            i,
            spec
        );
        prop_assert!(
            !(must_end && client.connected),
            "client {} ({:?}) is still streaming past a frame that ends it",
            i,
            spec
        );
        if client.connected {
            prop_assert!(whole, "client {i}: a chunk was cut off");
            prop_assert!(
                text.is_empty() || text.ends_with("\n\n"),
                "client {i}: an event was cut off"
            );
            prop_assert_eq!(
                reached,
                outcome.head,
                "client {} ({:?}) did not reach the end",
                i,
                spec
            );
        }
    }
    Ok(())
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
