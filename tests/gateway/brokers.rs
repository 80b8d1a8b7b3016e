//! The RabbitMQ versions users run: scripts/test.sh runs this suite against the host's
//! RabbitMQ (3.10) and again against RabbitMQ 4.3 and 4.0 with upstream 4.3's defaults
//! (scripts/rabbitmq-debian.sh: transient non-exclusive queues and global QoS denied). A cut
//! loses nothing, a binding the broker refuses fails only its clients, a broker that
//! closes every connection gets a backoff rather than a storm, and a lost queue is a
//! `gap` for resumable clients.

use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;

use crate::proxy::start_proxied;
use events_gateway_test_support::*;

/// The broker's version, as its own CLI tells it: (major, minor, patch).
async fn broker_version() -> (u32, u32, u32) {
    let text = rabbitmqctl_output(&["-q", "version"]).await;
    let mut parts = text
        .trim()
        .split(['.', '+', '-'])
        .map(|p| p.parse().unwrap_or(0));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_a_durable_classic_queue_with_its_bounds() {
    let Scenario {
        broker: _broker,
        exchange: ex,
        gw,
    } = Scenario::start("declared", &[]).await;
    let mut client = gw.connect(&[(&ex, "#")]).await;
    client.expect("ready").await;

    let queues = rabbitmqctl_json(&["list_queues", "name", "durable", "arguments"]).await;
    let ours: Vec<_> = queues
        .iter()
        .filter(|q| {
            q["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&gw.queue_prefix))
        })
        .collect();
    assert_eq!(ours.len(), 1, "{queues:?}");
    let queue = ours[0];
    assert_eq!(queue["durable"], true, "{queue}");
    let arguments = queue["arguments"].to_string();
    for expected in [
        "x-queue-type",
        "classic",
        "x-expires",
        "x-max-length",
        "1500",
        "x-max-length-bytes",
        "drop-head",
    ] {
        assert!(arguments.contains(expected), "{expected} in {arguments}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_cut_with_the_user_kept_out_loses_nothing() {
    // Arrange: the gateway on a user of its own, so that the cut is the broker's doing.
    let broker = Broker::connect().await;
    let ex = broker.exchange("cut").await;
    let user = format!("eg-cut-{}", unique());
    rabbitmqctl_output(&["add_user", &user, "cut-pw"]).await;
    let grant = ["set_permissions", "-p", "/", &user, ".*", ".*", ".*"];
    rabbitmqctl_output(&grant).await;
    let url = format!("--amqp-url=amqp://{user}:cut-pw@{}/%2f", amqp_addr());
    let gw = TestGateway::start(&[&url, "--ping-interval=500ms"]).await;
    let mut client = gw.connect(&[(&ex, "#")]).await;
    client.expect("ready").await;
    broker.publish_numbered(&ex, 0..10).await;
    assert_eq!(
        client
            .collect_numbered(10, Duration::from_secs(5))
            .await
            .len(),
        10
    );

    // Act: its user is kept out and its connections closed, for 2 s, while 20 messages
    // are published.
    rabbitmqctl_output(&["clear_permissions", "-p", "/", &user]).await;
    let listing = rabbitmqctl_output(&["list_connections", "pid", "user", "-q"]).await;
    let mut closed = 0;
    for line in listing.lines() {
        if let Some((pid, who)) = line.split_once('\t')
            && who.trim() == user
        {
            rabbitmqctl_output(&["close_connection", pid.trim(), "cut by a test"]).await;
            closed += 1;
        }
    }
    assert!(closed > 0, "the gateway's connection was closed");
    let running = gw.running.as_ref().expect("running");
    eventually(Duration::from_secs(10), || !running.broker().is_connected()).await;
    let cut_at = Instant::now();
    for n in 10..30 {
        broker.publish_numbered(&ex, n..n + 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rabbitmqctl_output(&grant).await;
    eventually(Duration::from_secs(30), || running.broker().is_connected()).await;
    eprintln!("reconnected {:?} after the cut began", cut_at.elapsed());
    broker.publish_numbered(&ex, 30..40).await;

    // Assert: every message published during and after the cut arrives, once, in order.
    let seen = client.collect_numbered(30, Duration::from_secs(20)).await;
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (10..40).collect::<Vec<_>>(),
        "none lost"
    );
    assert!(seen.values().all(|c| *c == 1), "none duplicated: {seen:?}");
    gw.shutdown().await;
    rabbitmqctl_output(&["delete_user", &user]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_with_three_hashes_gets_an_error_within_a_second_and_nobody_else_loses() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("hashes").await;
    let three = "#.a.#.b.#";

    // By default the gateway refuses it itself: current brokers accept at most two `#`.
    let gw = TestGateway::start(&[]).await;
    let started = Instant::now();
    let mut refused = gw.connect(&[(&ex, three)]).await;
    refused.expect("error").await;
    assert!(started.elapsed() < Duration::from_secs(1));
    gw.shutdown().await;

    // Let through, the broker decides: RabbitMQ 4.3.5 and later refuse it (406), older
    // ones bind it. A refusal is final for that binding alone.
    let gw = TestGateway::start(&["--max-pattern-wildcards=3"]).await;
    let mut other = gw.connect(&[(&ex, "#")]).await;
    other.expect("ready").await;
    broker.publish_numbered(&ex, 0..10).await;
    // Messages go on being published while the broker is asked for the pattern.
    let publisher = {
        let ex = ex.clone();
        tokio::spawn(async move {
            let broker = Broker::connect().await;
            for n in 10..30 {
                broker.publish_numbered(&ex, n..n + 1).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let mut asking = gw.connect(&[(&ex, three)]).await;
    let first = asking
        .next_skipping_pings_within(Duration::from_secs(5))
        .await
        .expect("an event");
    let answered_in = started.elapsed();
    publisher.await.expect("published");
    let version = broker_version().await;
    eprintln!(
        "RabbitMQ {version:?} answered a pattern with three `#` in {answered_in:?}: {first:?}"
    );
    if version >= (4, 3, 5) {
        assert_eq!(first.event, "error", "{first:?}");
        assert!(
            first.data.contains("refused the routing key pattern"),
            "{first:?}"
        );
        assert!(
            answered_in < Duration::from_secs(1),
            "the error came after {answered_in:?}"
        );
    } else {
        assert_eq!(first.event, "ready", "RabbitMQ {version:?} accepts it");
    }

    // The other client got every message; the queue and its consumer were never touched.
    let seen = other.collect_numbered(30, Duration::from_secs(10)).await;
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..30).collect::<Vec<_>>()
    );
    assert!(seen.values().all(|c| *c == 1), "{seen:?}");
    assert_eq!(
        gw.metric("events_gateway_broker_reconnects_total").await,
        0.0
    );
    broker_eventually(&gw.queue_prefix, Duration::from_secs(10), |o| {
        o.queues.len() == 1 && o.consumers == 1 && o.bindings.iter().any(|b| b.2 == "#")
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_closes_every_connection_that_declares_gets_a_backoff_not_a_storm() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("storm").await;
    let (proxy, gw) = start_proxied("", &["--ready-timeout=150s", "--ping-interval=5s"]).await;
    gw.wait_connected().await;
    assert_eq!(gw.status_of("/__heartbeat__").await, 200);

    // Act: for 60 s every connection that declares a queue is closed (as RabbitMQ 4.3
    // closes one whose declaration its settings deny); a client waits meanwhile.
    proxy.close_on_declare();
    let mut client = gw.connect(&[(&ex, "#")]).await;
    eventually(Duration::from_secs(10), || proxy.closed_on_declare() >= 1).await;
    let refusing_since = Instant::now();
    let reconnects_before = gw.metric("events_gateway_broker_reconnects_total").await;
    let mut healthy_polls = 0;
    let mut polls = 0;
    while refusing_since.elapsed() < Duration::from_secs(60) {
        if gw.status_of("/__heartbeat__").await == 200 {
            healthy_polls += 1;
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reconnects = gw.metric("events_gateway_broker_reconnects_total").await - reconnects_before;
    let heartbeat = gw.text("/__heartbeat__").await;
    proxy.restore();
    let accepted_at = Instant::now();

    // Assert: a backoff, not a storm; unhealthy all along, with the reason.
    eprintln!(
        "in 60 s: {reconnects} reconnects, {} connections closed on a declare; heartbeat 200 in {healthy_polls} of {polls} polls",
        proxy.closed_on_declare()
    );
    assert!(reconnects <= 10.0, "{reconnects} reconnects in 60 s");
    assert_eq!(healthy_polls, 0, "the heartbeat stays unhealthy");
    assert!(heartbeat.contains("\"healthy\":false"), "{heartbeat}");
    assert!(heartbeat.contains("lost after"), "{heartbeat}");
    assert!(
        gw.metric("events_gateway_broker_connect_failures_total{stage=\"early_loss\"}")
            .await
            >= 1.0
    );

    // Once the broker accepts: the client streams, and the heartbeat is 200 again.
    let ready = client
        .next_skipping_pings_within(Duration::from_secs(60))
        .await
        .expect("an event");
    assert_eq!(ready.event, "ready", "{ready:?}");
    eprintln!(
        "ready {:?} after the broker accepted",
        accepted_at.elapsed()
    );
    broker.publish_numbered(&ex, 0..1).await;
    assert_eq!(
        client
            .collect_numbered(1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    let running = gw.running.as_ref().expect("running");
    eventually(Duration::from_secs(15), || {
        running.broker().health().healthy
    })
    .await;
    assert_eq!(gw.status_of("/__heartbeat__").await, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_by_hand_is_a_gap_for_resumable_clients_and_a_comment_for_others() {
    let Scenario {
        broker,
        exchange: ex,
        gw,
    } = Scenario::start("gap", &[]).await;
    let mut plain = gw.raw_connect(&[(&ex, "#")]).await;
    let query = format!("{}&resume=1", bindings_query(&[(&ex, "#")]));
    let mut resumable = gw.connect_query(&query).await;
    let within = Duration::from_secs(10);
    let event = resumable.next_skipping_pings_within(within).await;
    assert_eq!(event.expect("ready").event, "ready");
    broker.publish_numbered(&ex, 0..1).await;
    let event = resumable.next_skipping_pings_within(within).await;
    assert_eq!(event.expect("a message").event, "message");

    // Act: an operator (or PulseGuardian) deletes the gateway's queue.
    let objects = broker_objects(&gw.queue_prefix).await;
    assert_eq!(objects.queues.len(), 1);
    broker
        .channel
        .queue_delete(
            objects.queues[0].as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("the queue is deleted");
    broker_eventually(&gw.queue_prefix, within, |o| {
        o.queues.len() == 1 && o.bindings.len() == 1 && o.consumers == 1
    })
    .await;
    broker.publish_numbered(&ex, 1..2).await;

    // Assert: the resumable client gets the gap first, with the broker as its reason,
    // then the stream goes on; the plain one gets the original's comment, then the same.
    let gap = resumable
        .next_skipping_pings_within(within)
        .await
        .expect("gap");
    assert_eq!(gap.event, "gap", "{gap:?}");
    assert_eq!(gap.data, r#"{"reason":"broker"}"#);
    assert_ne!(gap.id, "-", "it names a position to resume from");
    let next = resumable
        .next_skipping_pings_within(within)
        .await
        .expect("next");
    assert_eq!(next.event, "message");
    assert_eq!(message_json(&next.data)["payload"]["n"], 1);
    plain.read_until(b"{\"n\":1}", within).await;
    let body = String::from_utf8_lossy(&plain.buf).into_owned();
    let notice = body.find(": messages on ").expect("the comment");
    assert!(notice < body.find("{\"n\":1}").unwrap_or(0), "{body}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_overflowed_during_an_outage_is_told_to_the_clients() {
    // A queue of 10 messages at most, fed 30 while the gateway is away.
    let broker = Broker::connect().await;
    let ex = broker.exchange("overflow").await;
    let (proxy, gw) = start_proxied("", &["--queue-max-length=10"]).await;
    let mut raw = gw.raw_connect(&[(&ex, "#")]).await;
    proxy.down();
    let running = gw.running.as_ref().expect("running");
    eventually(Duration::from_secs(10), || !running.broker().is_connected()).await;
    broker.publish_numbered(&ex, 0..30).await;
    proxy.restore();

    // The broker dropped the oldest 20 (drop-head); the client is told, then gets the
    // newest 10.
    raw.read_until(b"{\"n\":29}", Duration::from_secs(30)).await;
    let body = String::from_utf8_lossy(&raw.buf).into_owned();
    let notice = body.find("may have been missed").expect("the notice");
    let first = body.find("{\"n\":20}").expect("the newest 10");
    assert!(notice < first, "{body}");
    assert!(!body.contains("{\"n\":19}"), "the oldest were dropped");
    gw.shutdown().await;
}
