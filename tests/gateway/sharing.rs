//! Shared subscriptions: broker objects do not grow with clients, every client gets each
//! matching message exactly once, failures stay with the clients that caused them.

use std::time::Duration;

use futures_util::future::join_all;

use events_gateway_test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_on_ten_patterns_make_two_queues_and_ten_bindings() {
    let broker = Broker::connect().await;
    let exchanges = [broker.exchange("a").await, broker.exchange("b").await];
    let gw = TestGateway::start(&[]).await;
    let pairs: Vec<(String, String)> = (0..10)
        .map(|i| (exchanges[i % 2].clone(), format!("route.p{i}.#")))
        .collect();

    // Arrange: 500 clients, 50 on each of the 10 (exchange, pattern) pairs.
    let clients = join_all((0..500).map(|i| {
        let (ex, pattern) = &pairs[i % 10];
        let gw = &gw;
        async move {
            let mut client = gw.connect(&[(ex, pattern)]).await;
            // 500 clients wait together on two worker threads: allow for a loaded machine.
            let ready = client.expect_within("ready", Duration::from_secs(20)).await;
            assert_eq!(ready, "{}");
            client
        }
    }))
    .await;

    // Assert: the broker's own objects.
    let objects = broker_objects(&gw.queue_prefix).await;
    assert_eq!(objects.queues.len(), 2, "{objects:?}");
    assert_eq!(objects.bindings.len(), 10, "{objects:?}");
    assert_eq!(objects.consumers, 2, "{objects:?}");
    assert_eq!(gw.metric("events_gateway_subscriptions").await, 10.0);
    assert_eq!(gw.metric("events_gateway_broker_bindings").await, 10.0);
    assert_eq!(gw.metric("events_gateway_broker_queues").await, 2.0);
    assert_eq!(gw.metric("events_gateway_connections_open").await, 500.0);

    // Act: one message per pair (routed through a CC route); every client gets its own.
    for (i, (ex, _)) in pairs.iter().enumerate() {
        let route = format!("route.p{i}.x");
        let body = format!("{{\"pair\":{i}}}");
        broker
            .publish(ex, "primary.key", &[&route], body.as_bytes())
            .await;
    }
    // Then a marker per pair: a client that got another pair's message would see it
    // before its marker (one queue per exchange keeps the order).
    for (i, (ex, _)) in pairs.iter().enumerate() {
        let route = format!("route.p{i}.x");
        let body = format!("{{\"marker\":{i}}}");
        broker
            .publish(ex, "primary.key", &[&route], body.as_bytes())
            .await;
    }
    let mut clients = clients;
    join_all(
        clients
            .iter_mut()
            .enumerate()
            .map(|(i, client)| async move {
                let msg = message_json(&client.expect("message").await);
                assert_eq!(msg["payload"]["pair"], (i % 10) as u64);
                client
                    .expect_marker(&serde_json::json!({"marker": i % 10}))
                    .await;
            }),
    )
    .await;
    assert_eq!(
        gw.metric("events_gateway_messages_delivered_total").await,
        1000.0
    );

    // Everything disappears within 5 s after the clients leave.
    drop(clients);
    broker_eventually(&gw.queue_prefix, Duration::from_secs(5), |o| {
        o.queues.is_empty() && o.bindings.is_empty()
    })
    .await;
    let registry = gw.running.as_ref().expect("running").registry().clone();
    eventually(Duration::from_secs(5), || registry.is_empty()).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_before_ready_or_mid_binding_leave_nothing_behind() {
    let broker = Broker::connect().await;
    let exchanges = [broker.exchange("a").await, broker.exchange("b").await];
    let gw = TestGateway::start(&[]).await;
    gw.wait_connected().await;
    // The gateway runs on this test's own runtime, so its task count is ours to watch:
    // every per-client, per-subscription and per-exchange task must end with its owner.
    let runtime = tokio::runtime::Handle::current().metrics();
    let tasks_before = settled_task_count(&runtime).await;

    for round in 0..3u64 {
        // Each client asks for new patterns and leaves after 0–30 ms: some before the
        // broker round trips start, some in the middle of binding, some after ready.
        join_all((0..200u64).map(|i| {
            let gw = &gw;
            let exchanges = &exchanges;
            async move {
                let a = format!("r{round}.c{}.#", i % 40);
                let b = format!("r{round}.c{}.*", i % 7);
                let client = gw
                    .connect(&[(&exchanges[(i % 2) as usize], &a), (&exchanges[1], &b)])
                    .await;
                tokio::time::sleep(Duration::from_millis(i % 31)).await;
                drop(client);
            }
        }))
        .await;
    }
    broker_eventually(&gw.queue_prefix, Duration::from_secs(5), |o| {
        o.queues.is_empty() && o.bindings.is_empty()
    })
    .await;
    let registry = gw.running.as_ref().expect("running").registry().clone();
    eventually(Duration::from_secs(5), || registry.is_empty()).await;
    reached(Duration::from_secs(5), || {
        runtime.num_alive_tasks() <= tasks_before
    })
    .await;
    let tasks_after = runtime.num_alive_tasks();
    assert!(
        tasks_after <= tasks_before,
        "no task outlives the clients that caused it: {tasks_after} alive, {tasks_before} before"
    );
    assert_eq!(gw.metric("events_gateway_connections_open").await, 0.0);
    assert_eq!(gw.metric("events_gateway_broker_bindings").await, 0.0);
    assert_eq!(gw.metric("events_gateway_broker_queues").await, 0.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn each_client_gets_each_matching_message_exactly_once() {
    let Scenario {
        broker,
        exchange: ex,
        gw,
    } = Scenario::start("once", &[]).await;
    // Several of this set's bindings match the same message, via key and via CC.
    let set = [
        (ex.as_str(), "a.#"),
        (ex.as_str(), "*.b"),
        (ex.as_str(), "#"),
        (ex.as_str(), "route.x"),
    ];
    let mut shared1 = gw.connect(&set).await;
    let mut shared2 = gw.connect(&set).await;
    let mut narrow = gw.connect(&[(ex.as_str(), "route.x")]).await;
    for c in [&mut shared1, &mut shared2, &mut narrow] {
        c.expect("ready").await;
    }
    broker
        .publish(&ex, "a.b", &["route.x", "route.y"], b"{\"n\":1}")
        .await;
    broker.publish(&ex, "zzz", &["route.x"], b"{\"n\":2}").await;
    broker.publish(&ex, "a.q", &[], b"{\"n\":3}").await;
    // A marker that every client matches, once: no client got a message twice before it.
    let marker = serde_json::json!({"marker": true});
    broker
        .publish(&ex, "route.x", &[], marker.to_string().as_bytes())
        .await;
    for c in [&mut shared1, &mut shared2] {
        for n in 1..=3 {
            assert_eq!(message_json(&c.expect("message").await)["payload"]["n"], n);
        }
        c.expect_marker(&marker).await;
    }
    for n in 1..=2 {
        let msg = message_json(&narrow.expect("message").await);
        assert_eq!(msg["payload"]["n"], n);
        assert_eq!(
            msg["routes"],
            serde_json::json!(&["x", "y"][..(3 - n) as usize])
        );
    }
    narrow.expect_marker(&marker).await;
    assert_eq!(gw.metric("events_gateway_subscriptions").await, 2.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_malformed_body_is_dropped_and_counted_and_nothing_else_breaks() {
    let Scenario {
        broker,
        exchange: ex,
        gw,
    } = Scenario::start("bad", &[]).await;
    let mut client = gw.connect(&[(&ex, "#")]).await;
    client.expect("ready").await;
    broker.publish(&ex, "k", &[], b"not json {").await;
    broker.publish(&ex, "k", &[], b"\xff\xfe\x00").await;
    broker.publish(&ex, "k", &[], b"{\"ok\":true}").await;
    let msg = message_json(&client.expect("message").await);
    assert_eq!(msg["payload"]["ok"], true);
    assert_eq!(
        gw.metric("events_gateway_messages_dropped_total{reason=\"malformed\"}")
            .await,
        2.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_missing_exchange_fails_only_its_own_clients_and_leaves_nothing() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("present").await;
    let missing = format!("exchange/test/{}/does-not-exist", unique());
    let gw = TestGateway::start(&[]).await;
    let mut other = gw.connect(&[(&ex, "#")]).await;
    other.expect("ready").await;

    let mut failing = gw
        .connect(&[(&ex, "#"), (&ex, "other.#"), (&missing, "#")])
        .await;
    assert_eq!(
        failing.expect("error").await,
        format!("\"Exchange `{missing}` does not exist\"")
    );
    failing.expect_end().await;
    drop(failing);

    broker.publish(&ex, "k", &[], b"{\"still\":\"here\"}").await;
    assert_eq!(
        message_json(&other.expect("message").await)["payload"]["still"],
        "here"
    );
    let objects = broker_eventually(&gw.queue_prefix, Duration::from_secs(5), |o| {
        o.bindings.len() == 1
    })
    .await;
    assert_eq!(
        objects.queues.len(),
        1,
        "no queue for the missing exchange: {objects:?}"
    );
    assert_eq!(objects.bindings[0].0, ex);
    assert_eq!(
        gw.metric("events_gateway_connections_total{outcome=\"broker_error\"}")
            .await,
        1.0
    );

    // Once the exchange exists, the same bindings work.
    let created = broker.exchange("late").await;
    let mut late = gw.connect(&[(&created, "#")]).await;
    late.expect("ready").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_left_and_asked_for_again_while_the_broker_is_busy_gets_ready() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("again").await;
    // The bug this guards against left `ready` pending forever; 20 s only allows for a
    // loaded machine.
    let gw = TestGateway::start(&["--ready-timeout=20s"]).await;
    gw.wait_connected().await;
    // Keep the exchange's reconciler busy with other bindings coming and going.
    let stop = tokio_util::sync::CancellationToken::new();
    let churn = {
        let (stop, ex, url) = (stop.clone(), ex.clone(), gw.url(""));
        let http = gw.http.clone();
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.is_cancelled() {
                i += 1;
                let query = bindings_query(&[(&ex, &format!("churn.{i}.#"))]);
                let _ = http
                    .get(format!("{url}/api/events/v1/connect/?{query}"))
                    .send()
                    .await;
                // Busy, but not so busy as to starve the other tests running alongside.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for _ in 0..30 {
        let mut first = gw.connect(&[(&ex, "same.#")]).await;
        first.expect_within("ready", Duration::from_secs(20)).await;
        drop(first);
        let mut again = gw.connect(&[(&ex, "same.#")]).await;
        again.expect_within("ready", Duration::from_secs(20)).await;
    }
    stop.cancel();
    churn.await.expect("churn");
    gw.shutdown().await;
}

/// The runtime's task count once it has not changed for half a second: the broker
/// connection starts its own tasks (heartbeats) shortly after it reports itself connected.
/// Fails the test if the count never settles within 10 s: a baseline that is still moving
/// would make the comparison after the churn meaningless.
async fn settled_task_count(runtime: &tokio::runtime::RuntimeMetrics) -> usize {
    let mut last = runtime.num_alive_tasks();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = runtime.num_alive_tasks();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the runtime's task count never settled within 10 s (last {last})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_client_loses_its_oldest_frames_slows_nobody_and_holds_no_memory() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("stuck").await;
    let gw = ChildGateway::start(
        env!("CARGO_BIN_EXE_events-gateway"),
        &["--subscription-buffer=64"],
    )
    .await;
    let path = format!("/api/events/v1/connect/?{}", bindings_query(&[(&ex, "#")]));
    // The stuck client reads up to `ready`, then never again.
    let mut stuck = RawClient::get(gw.addr, &path, &[]).await;
    stuck
        .read_until(b"event: ready", Duration::from_secs(10))
        .await;
    let resp = reqwest::get(format!("http://{}{path}", gw.addr))
        .await
        .expect("connect");
    let mut fast = SseClient::from_response(resp);
    fast.expect("ready").await;

    // The fast client reports its progress; the publisher never gets more than 32
    // messages ahead of it, so it keeps within its 64-frame buffer however loaded the
    // machine is, while the stuck client falls ever further behind.
    let (warm_up, total) = (200, 1700);
    let (progress_tx, progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for n in 0..total {
            let msg = message_json(&fast.expect("message").await);
            assert_eq!(
                msg["payload"]["n"], n,
                "the fast client gets every message in order"
            );
            progress_tx.send_replace(n + 1);
        }
    });
    let filler = "x".repeat(32 * 1024);
    let publish = |range: std::ops::Range<u64>| {
        let (broker, ex, filler) = (&broker, &ex, &filler);
        let mut progress = progress.clone();
        async move {
            for n in range {
                if progress.wait_for(|&got| got + 32 >= n).await.is_err() {
                    return; // the reader failed; its panic is reported below
                }
                let body = format!("{{\"n\":{n},\"filler\":\"{filler}\"}}");
                broker.publish(ex, "k", &[], body.as_bytes()).await;
            }
        }
    };
    // Warm up: fills the stuck client's socket buffers and the allocator's caches.
    publish(0..warm_up).await;
    let _ = progress.clone().wait_for(|&got| got >= warm_up).await;
    let before = gw.rss_kib();

    // Act: 48 MiB more through the subscription while the stuck client reads nothing.
    let mut peak = before;
    let publishing = publish(warm_up..total);
    tokio::pin!(publishing);
    loop {
        tokio::select! {
            () = &mut publishing => break,
            () = tokio::time::sleep(Duration::from_millis(20)) => peak = peak.max(gw.rss_kib()),
        }
    }
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the fast client is not held back")
        .expect("fast client");
    peak = peak.max(gw.rss_kib());

    // Assert: the gateway grew by about its bounded buffer (64 frames of 32 KiB, shared by
    // both clients, plus the stuck client's HTTP write queue), not by what was published.
    let grew = peak.saturating_sub(before);
    eprintln!(
        "gateway RSS {before} KiB before, peak {peak} KiB (+{grew} KiB) for 48 MiB published"
    );
    assert!(
        grew < 16 * 1024,
        "RSS grew by {grew} KiB while a stuck client was connected"
    );
    // The stuck client, reading again, is told how many it lost; the drops are counted.
    stuck
        .read_until(
            b"messages were dropped because this client reads too slowly",
            Duration::from_secs(10),
        )
        .await;
    let metrics = reqwest::get(format!("http://{}/metrics", gw.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let dropped = metric_value(
        &metrics,
        "events_gateway_messages_dropped_total{reason=\"slow_client\"}",
    )
    .expect("slow_client drop counter");
    assert!(dropped > 0.0, "drops are counted");
    drop(gw);
}
