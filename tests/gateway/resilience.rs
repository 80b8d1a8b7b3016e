//! Faults injected for real: the gateway's link to RabbitMQ is cut, refused or stalled by
//! a proxy in the test process, and an operator deletes a queue. Clients stay connected
//! and lose nothing the design promises.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::proxy::start_proxied;
use events_gateway_test_support::*;

async fn wait_broker(gw: &TestGateway, connected: bool, within: Duration) {
    let running = gw.running.as_ref().expect("running");
    eventually(within, || running.broker().is_connected() == connected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_shorter_than_the_queue_expiry_loses_nothing() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("outage").await;
    let (proxy, gw) = start_proxied("", &["--ping-interval=300ms"]).await;
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

    // Act: the broker link goes down; messages keep being published meanwhile.
    proxy.down();
    wait_broker(&gw, false, Duration::from_secs(5)).await;
    assert_eq!(
        gw.status_of("/__heartbeat__").await,
        503,
        "the outage shows in health"
    );
    assert_eq!(gw.metric("events_gateway_broker_connected").await, 0.0);
    broker.publish_numbered(&ex, 10..20).await;
    // The client stays connected: pings go on.
    client.expect("ping").await;
    let outage_started = std::time::Instant::now();
    proxy.restore();
    wait_broker(&gw, true, Duration::from_secs(30)).await;
    let recovered_in = outage_started.elapsed();
    broker.publish_numbered(&ex, 20..30).await;

    // Assert: everything published during and after the outage arrives, once, in order.
    let seen = client.collect_numbered(20, Duration::from_secs(10)).await;
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (10..30).collect::<Vec<_>>()
    );
    assert!(seen.values().all(|c| *c == 1), "no duplicates: {seen:?}");
    assert!(gw.metric("events_gateway_broker_reconnects_total").await >= 1.0);
    eprintln!("recovered {recovered_in:?} after the link came back");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_in_the_middle_of_a_burst_neither_loses_nor_duplicates() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("burst").await;
    // A queue that holds the whole burst: what is tested here is the cuts, not the bound.
    let (proxy, gw) = start_proxied(
        "",
        &["--subscription-buffer=8192", "--queue-max-length=10000"],
    )
    .await;
    let mut client = gw.connect(&[(&ex, "#")]).await;
    client.expect("ready").await;

    // The publisher counts what it published; it publishes a first third, tells the test,
    // goes on to two thirds, and waits there until the second cut is made, so that both
    // cuts fall between messages published before and after them whatever the timing.
    let total = 3000u64;
    let published = Arc::new(AtomicU64::new(0));
    let (first_third, first_third_rx) = tokio::sync::oneshot::channel::<()>();
    let (second_cut_done, second_cut) = tokio::sync::oneshot::channel::<()>();
    let publisher = {
        let (ex, published) = (ex.clone(), published.clone());
        tokio::spawn(async move {
            let broker = Broker::connect().await;
            let mut first_third = Some(first_third);
            let mut second_cut = Some(second_cut);
            for n in 0..total {
                if n == total / 3 {
                    let _ = first_third.take().map(|tx| tx.send(()));
                }
                if n == 2 * total / 3
                    && let Some(rx) = second_cut.take()
                {
                    let _ = rx.await;
                }
                broker.publish_numbered(&ex, n..n + 1).await;
                published.store(n + 1, Ordering::Release);
            }
        })
    };
    // Act: cut the gateway's link twice while the burst flows.
    first_third_rx.await.expect("the publisher reached a third");
    let mut cuts = Vec::new();
    let metrics = gw.running.as_ref().expect("running").metrics().clone();
    for reconnected in 0..2 {
        // The second cut only once the gateway is back on a new link.
        eventually(Duration::from_secs(30), || {
            metrics.broker_reconnects.get() >= reconnected && metrics.broker_connected.get() == 1
        })
        .await;
        let closed = proxy.cut();
        cuts.push((closed, published.load(Ordering::Acquire)));
    }
    let _ = second_cut_done.send(());
    publisher.await.expect("published");

    // The faults really happened mid-burst: each cut closed the gateway's link, with
    // messages published before it and after it.
    for (closed, at) in &cuts {
        assert!(*closed >= 1, "a cut closed the gateway's link: {cuts:?}");
        assert!(
            *at >= total / 3 && *at < total,
            "messages were published before and after each cut: {cuts:?}"
        );
    }
    // Each cut cost the gateway its connection.
    eventually(Duration::from_secs(30), || {
        metrics.broker_reconnects.get() >= 2
    })
    .await;
    let seen = client
        .collect_numbered(total as usize, Duration::from_secs(30))
        .await;
    assert_eq!(seen.len() as u64, total, "nothing lost");
    let dups: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dups.is_empty(), "no duplicates: {dups:?}");
    // No late duplicate either: the next message after the burst is a marker.
    let marker = serde_json::json!({"marker": true});
    broker
        .publish(&ex, "k", &[], marker.to_string().as_bytes())
        .await;
    client.expect_marker(&marker).await;
    eprintln!(
        "cuts (links closed, messages published at the cut): {cuts:?}; redeliveries skipped as duplicates: {}",
        gw.metric("events_gateway_messages_dropped_total{reason=\"duplicate\"}")
            .await
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_lost_in_a_cut_do_not_duplicate_messages() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("acks").await;
    // A short heartbeat: should the broker not see the old connection close, it still
    // drops it (and requeues its deliveries) within a few seconds.
    let (proxy, gw) = start_proxied("heartbeat=2", &[]).await;
    let mut client = gw.connect(&[(&ex, "#")]).await;
    client.expect("ready").await;

    // Arrange: deliveries reach the client but their acknowledgements never reach the
    // broker; then the link is cut, so the broker redelivers all of them.
    proxy.stall_upstream();
    broker.publish_numbered(&ex, 0..50).await;
    assert_eq!(
        client
            .collect_numbered(50, Duration::from_secs(10))
            .await
            .len(),
        50
    );
    assert!(proxy.cut() >= 1, "the cut closed the gateway's link");
    proxy.restore();
    wait_broker(&gw, true, Duration::from_secs(30)).await;

    // Assert: the redeliveries are recognised and skipped; new messages flow.
    let running = gw.running.as_ref().expect("running");
    let metrics = running.metrics().clone();
    let duplicates = || {
        metrics
            .messages_dropped
            .with_label_values(&["duplicate"])
            .get()
    };
    if !reached(Duration::from_secs(20), || duplicates() >= 50).await || duplicates() != 50 {
        let queues = rabbitmqctl_output(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "-q",
        ])
        .await;
        let conns = rabbitmqctl_output(&["list_connections", "peer_port", "state", "-q"]).await;
        eprintln!(
            "queues:\n{queues}\nconnections:\n{conns}\nproxy ports: {:?}",
            proxy.upstream_ports()
        );
    }
    assert_eq!(
        duplicates(),
        50,
        "every redelivery was recognised (connected: {}, reconnects: {}, received: {})",
        metrics.broker_connected.get(),
        metrics.broker_reconnects.get(),
        metrics.messages_received.get(),
    );
    broker.publish_numbered(&ex, 50..55).await;
    let seen = client.collect_numbered(5, Duration::from_secs(10)).await;
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (50..55).collect::<Vec<_>>()
    );
    let marker = serde_json::json!({"marker": true});
    broker
        .publish(&ex, "k", &[], marker.to_string().as_bytes())
        .await;
    client.expect_marker(&marker).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_during_an_outage_wait_then_get_an_error() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("waiting").await;
    let (proxy, gw) = start_proxied("", &["--ready-timeout=1500ms"]).await;
    gw.wait_connected().await;
    proxy.down();
    wait_broker(&gw, false, Duration::from_secs(5)).await;

    let started = std::time::Instant::now();
    let mut waiting = gw.connect(&[(&ex, "#")]).await;
    assert_eq!(
        waiting.expect("error").await,
        "\"Timed out waiting for the broker to confirm the bindings; try again later\""
    );
    assert!(started.elapsed() >= Duration::from_millis(1400));
    waiting.expect_end().await;
    assert_eq!(
        gw.metric("events_gateway_connections_total{outcome=\"timeout\"}")
            .await,
        1.0
    );

    proxy.restore();
    wait_broker(&gw, true, Duration::from_secs(30)).await;
    let mut after = gw.connect(&[(&ex, "#")]).await;
    after.expect("ready").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_link_is_noticed_by_heartbeats_and_recovered() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("stall").await;
    let (proxy, gw) = start_proxied("heartbeat=1", &[]).await;
    let mut client = gw.connect(&[(&ex, "#")]).await;
    client.expect("ready").await;

    proxy.stall();
    let stalled_at = std::time::Instant::now();
    wait_broker(&gw, false, Duration::from_secs(15)).await;
    let noticed_in = stalled_at.elapsed();
    proxy.cut();
    proxy.restore();
    wait_broker(&gw, true, Duration::from_secs(30)).await;
    // The binding is back once a new client is ready on it (ready needs bind-ok).
    let mut probe = gw.connect(&[(&ex, "#")]).await;
    probe.expect("ready").await;
    broker.publish_numbered(&ex, 0..5).await;
    assert_eq!(
        client
            .collect_numbered(5, Duration::from_secs(10))
            .await
            .len(),
        5
    );
    eprintln!("stall noticed after {noticed_in:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_refused_fails_only_the_clients_that_asked() {
    let broker = Broker::connect().await;
    let allowed = broker.exchange("allowed").await;
    let denied = broker.exchange("denied").await;
    // A broker user that may read (bind from) only exchanges whose names end in /allowed.
    let user = format!("eg-limited-{}", unique());
    rabbitmqctl_output(&["add_user", &user, "secret-pw"]).await;
    let own = format!("^queue/{user}/.*$");
    let read = format!("^(queue/{user}/.*|exchange/test/.*/allowed)$");
    rabbitmqctl_output(&["set_permissions", "-p", "/", &user, &own, &own, &read]).await;

    let url = format!("--amqp-url=amqp://{user}:secret-pw@{}/%2f", amqp_addr());
    let prefix = format!("--queue-prefix=queue/{user}/gw");
    let gw = TestGateway::start(&[&url, &prefix]).await;
    let mut ok = gw.connect(&[(&allowed, "#")]).await;
    ok.expect("ready").await;
    let mut refused = gw.connect(&[(&allowed, "#"), (&denied, "#")]).await;
    assert_eq!(
        refused.expect("error").await,
        format!("\"Access to exchange `{denied}` was refused by the broker\"")
    );
    refused.expect_end().await;

    broker.publish(&allowed, "k", &[], b"{\"n\":1}").await;
    assert_eq!(message_json(&ok.expect("message").await)["payload"]["n"], 1);
    gw.shutdown().await;
    rabbitmqctl_output(&["delete_user", &user]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_broker_is_reopened_and_nothing_is_lost() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("closed").await;
    let (proxy, gw) = start_proxied("", &[]).await;
    let mut client = gw.connect(&[(&ex, "#")]).await;
    client.expect("ready").await;

    // The broker closes the gateway's connection (as an operator's close_connection does).
    // The table output spells the pid as close_connection wants it.
    let listing = rabbitmqctl_output(&["list_connections", "pid", "peer_port", "-q"]).await;
    let ports = proxy.upstream_ports();
    let pid = listing
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(_, port)| port.trim().parse().is_ok_and(|p: u16| ports.contains(&p)))
        .map(|(pid, _)| pid.trim().to_owned())
        .unwrap_or_else(|| panic!("the gateway's connection in {listing:?} (ports {ports:?})"));
    // Refused reconnects keep the outage open until the test has seen it: otherwise the
    // gateway may be back before a slow rabbitmqctl returns.
    proxy.refuse_new();
    rabbitmqctl_output(&["close_connection", &pid, "closed by a test"]).await;
    wait_broker(&gw, false, Duration::from_secs(10)).await;
    broker.publish_numbered(&ex, 0..10).await;
    proxy.restore();
    wait_broker(&gw, true, Duration::from_secs(30)).await;
    let seen = client.collect_numbered(10, Duration::from_secs(10)).await;
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    assert!(seen.values().all(|c| *c == 1));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_an_exchange_deleted_during_an_outage_end_with_an_error() {
    let broker = Broker::connect().await;
    let doomed = broker.exchange("doomed").await;
    let kept = broker.exchange("kept").await;
    let (proxy, gw) = start_proxied("", &[]).await;
    let mut streaming = gw.connect(&[(&doomed, "#")]).await;
    streaming.expect("ready").await;
    let mut other = gw.connect(&[(&kept, "#")]).await;
    other.expect("ready").await;

    proxy.down();
    wait_broker(&gw, false, Duration::from_secs(5)).await;
    broker.delete_exchange(&doomed).await;
    proxy.restore();
    wait_broker(&gw, true, Duration::from_secs(30)).await;

    assert_eq!(
        streaming.expect("error").await,
        format!("\"Exchange `{doomed}` does not exist\"")
    );
    streaming.expect_end().await;
    broker.publish(&kept, "k", &[], b"{\"n\":1}").await;
    assert_eq!(
        message_json(&other.expect("message").await)["payload"]["n"],
        1
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_an_exchange_deleted_while_connected_end_with_an_error() {
    let broker = Broker::connect().await;
    let doomed = broker.exchange("doomed").await;
    let kept = broker.exchange("kept").await;
    let gw = TestGateway::start(&["--exchange-check-interval=200ms"]).await;
    let mut streaming = gw.connect(&[(&doomed, "#")]).await;
    streaming.expect("ready").await;
    let mut other = gw.connect(&[(&kept, "#")]).await;
    other.expect("ready").await;

    // Act: the exchange goes away while the gateway's connection stays up; RabbitMQ
    // removes its bindings without telling anyone.
    broker.delete_exchange(&doomed).await;

    // Assert: the periodic check notices; only that exchange's clients are affected, and
    // its queue goes away once they have left.
    assert_eq!(
        streaming.expect("error").await,
        format!("\"Exchange `{doomed}` does not exist\"")
    );
    streaming.expect_end().await;
    drop(streaming);
    broker_eventually(&gw.queue_prefix, Duration::from_secs(5), |o| {
        o.queues.len() == 1 && o.bindings.len() == 1
    })
    .await;
    broker.publish(&kept, "k", &[], b"{\"n\":1}").await;
    assert_eq!(
        message_json(&other.expect("message").await)["payload"]["n"],
        1
    );
    assert_eq!(gw.metric("events_gateway_broker_bindings").await, 1.0);
    gw.shutdown().await;
}
