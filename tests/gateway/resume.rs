//! Resumable streams (`resume=1`): every message carries an id that names its position;
//! a client that reconnects with `Last-Event-Id` gets every message since, once, in order,
//! or a `gap` event that says why not; without `resume=1` nothing changes.

use std::time::Duration;

use events_gateway_test_support::*;

/// The connect path of a resumable stream on all of `exchange`.
fn resumable_path(exchange: &str) -> String {
    format!(
        "/api/events/v1/connect/?{}&resume=1",
        bindings_query(&[(exchange, "#")])
    )
}

/// A resumable stream over raw HTTP/1.0, with `Last-Event-Id` if given.
async fn connect(gw: &TestGateway, exchange: &str, last_id: Option<&str>) -> RawClient {
    let path = resumable_path(exchange);
    let headers: Vec<(&str, &str)> = last_id
        .map(|id| ("Last-Event-Id", id))
        .into_iter()
        .collect();
    let mut raw = RawClient::get(gw.addr, &path, &headers).await;
    raw.read_until(b"event: ready\n", Duration::from_secs(5))
        .await;
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_for_two_seconds_gets_every_message_once_in_order() {
    let Scenario {
        broker,
        exchange: ex,
        gw,
    } = Scenario::start("resume", &[]).await;
    let mut first = connect(&gw, &ex, None).await;
    broker.publish_numbered(&ex, 0..10).await;
    first.read_until(b"{\"n\":9}", Duration::from_secs(5)).await;
    let before = frames(&first);
    assert!(
        before
            .iter()
            .all(|f| f.id.as_deref().is_some_and(|id| id != "-")),
        "{before:?}"
    );
    let id = last_id(&before);

    // Act: the connection is closed under the client; 200 messages are published in the
    // 2 s it is away (its subscription, its history and its binding stay meanwhile).
    drop(first);
    let away = std::time::Instant::now();
    broker.publish_numbered(&ex, 10..210).await;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(away.elapsed())).await;
    let mut again = connect(&gw, &ex, Some(&id)).await;
    again
        .read_until(b"{\"n\":209}", Duration::from_secs(10))
        .await;
    broker.publish_numbered(&ex, 210..211).await;
    again
        .read_until(b"{\"n\":210}", Duration::from_secs(5))
        .await;

    // Assert: before and after, every message once, in order, then the live one.
    let after = frames(&again);
    assert!(after.iter().all(|f| f.event != "gap"), "no gap: {after:?}");
    let mut all = numbers(&before);
    all.extend(numbers(&after));
    assert_eq!(all, (0..211).collect::<Vec<_>>());
    assert_eq!(
        gw.metric("events_gateway_resumes_total{outcome=\"replayed\"}")
            .await,
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_past_the_window_or_from_another_epoch_gets_a_gap_then_live_messages() {
    let Scenario {
        broker,
        exchange: ex,
        gw,
    } = Scenario::start("resume-gap", &["--subscription-buffer=10"]).await;
    let other = TestGateway::start(&[]).await;

    // An id from another gateway (another epoch: a restart, another replica).
    let from_other = connect(&other, &ex, None).await;
    let foreign_id = last_id(&frames(&from_other));
    // An id that falls out of a 10-frame window.
    let mut old = connect(&gw, &ex, None).await;
    broker.publish_numbered(&ex, 0..1).await;
    old.read_until(b"{\"n\":0}", Duration::from_secs(5)).await;
    let old_id = last_id(&frames(&old));
    let mut keeps_subscription = connect(&gw, &ex, None).await;
    drop(old);
    broker.publish_numbered(&ex, 1..31).await;
    // Every one of them has reached the gateway before the reconnects below.
    keeps_subscription
        .read_until(b"{\"n\":30}", Duration::from_secs(5))
        .await;

    for (id, reason) in [(old_id, "expired"), (foreign_id, "other-epoch")] {
        let mut client = connect(&gw, &ex, Some(&id)).await;
        let got = frames(&client);
        assert_eq!(got[0].event, "gap", "the stream starts with a gap: {got:?}");
        assert_eq!(message_json(&got[0].data)["reason"], reason);
        assert_eq!(got[1].event, "ready");
        assert!(numbers(&got).is_empty(), "nothing replayed: {got:?}");
        let live = 100 + u64::from(reason == "expired");
        broker.publish_numbered(&ex, live..live + 1).await;
        client
            .read_until(
                format!("{{\"n\":{live}}}").as_bytes(),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(numbers(&frames(&client)), vec![live]);
    }
    other.shutdown().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_ids_get_a_gap_never_another_subscriptions_frames() {
    let broker = Broker::connect().await;
    let mine = broker.exchange("resume-mine").await;
    let theirs = broker.exchange("resume-theirs").await;
    let gw = TestGateway::start(&[]).await;
    // Another subscription's id, with history behind it.
    let mut victim = connect(&gw, &theirs, None).await;
    let victim_start = last_id(&frames(&victim));
    broker.publish_numbered(&theirs, 0..5).await;
    victim
        .read_until(b"{\"n\":4}", Duration::from_secs(5))
        .await;
    let _me = connect(&gw, &mine, None).await;

    // A forged id: a real epoch, a guessed subscription, position 0.
    let epoch = victim_start.split('-').next().expect("epoch");
    let forged = format!("{epoch}-0000000000000001-0");
    for (id, reason) in [
        (victim_start.as_str(), "other-subscription"),
        (forged.as_str(), "other-subscription"),
        ("not-an-id", "invalid-id"),
        ("12345", "invalid-id"),
        (&"9".repeat(500), "invalid-id"),
    ] {
        let mut client = connect(&gw, &mine, Some(id)).await;
        broker.publish_numbered(&mine, 7..8).await;
        client
            .read_until(b"{\"n\":7}", Duration::from_secs(5))
            .await;
        let got = frames(&client);
        assert_eq!(got[0].event, "gap", "{id}: {got:?}");
        assert_eq!(message_json(&got[0].data)["reason"], reason, "{id}");
        assert_eq!(
            numbers(&got),
            vec![7],
            "only its own, live messages: {got:?}"
        );
    }
    // `-` (the id of an error, in both protocols) ends reconnection: 204.
    let path = resumable_path(&mine);
    let mut dash = RawClient::get(gw.addr, &path, &[("Last-Event-Id", "-")]).await;
    dash.read_to_end(Duration::from_secs(5)).await;
    assert!(dash.head_and_body().0.contains(" 204 "));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_ready_carry_the_position_and_a_drain_keeps_it() {
    let Scenario {
        broker,
        exchange: ex,
        gw,
    } = Scenario::start("resume-ping", &["--ping-interval=300ms"]).await;
    let mut client = connect(&gw, &ex, None).await;
    client
        .read_until(b"event: ping", Duration::from_secs(5))
        .await;
    let got = frames(&client);
    let ready_id = got[0].id.clone().expect("ready has an id");
    let ping_id = got
        .iter()
        .find(|f| f.event == "ping")
        .and_then(|f| f.id.clone());
    assert_eq!(
        ping_id.as_deref(),
        Some(ready_id.as_str()),
        "no message yet: same position"
    );

    // A client that saw only pings resumes from there.
    drop(client);
    broker.publish_numbered(&ex, 0..3).await;
    let mut again = connect(&gw, &ex, Some(&ready_id)).await;
    again.read_until(b"{\"n\":2}", Duration::from_secs(5)).await;
    assert_eq!(numbers(&frames(&again)), vec![0, 1, 2]);

    // A drain sends it away with its id intact (no `id:` reset).
    gw.shutdown().await;
    again.read_to_end(Duration::from_secs(10)).await;
    let body = String::from_utf8_lossy(&again.buf).into_owned();
    let last = body.rsplit("\n\n").nth(1).expect("a last frame");
    assert!(
        is_resumable_reconnect_frame(last),
        "the reconnect frame keeps the id: {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_resume_the_original_protocol_is_unchanged() {
    let Scenario {
        broker,
        exchange: ex,
        gw,
    } = Scenario::start("no-resume", &[]).await;
    // A resumable client on the same bindings changes nothing for the others.
    let _resumable = connect(&gw, &ex, None).await;
    let mut plain = gw.raw_connect(&[(&ex, "#")]).await;
    broker.publish_numbered(&ex, 0..1).await;
    plain.read_until(b"{\"n\":0}", Duration::from_secs(5)).await;
    let got = frames(&plain);
    assert!(got.iter().all(|f| f.id.as_deref() == Some("-")), "{got:?}");
    let path = format!("/api/events/v1/connect/?{}", bindings_query(&[(&ex, "#")]));
    let id = "0000000000000000-0000000000000000-0";
    let mut old = RawClient::get(gw.addr, &path, &[("Last-Event-Id", id)]).await;
    old.read_to_end(Duration::from_secs(5)).await;
    assert!(old.head_and_body().0.contains(" 204 "));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_subscription_outlives_its_last_client_for_the_grace_period_only() {
    let Scenario {
        broker: _broker,
        exchange: ex,
        gw,
    } = Scenario::start("resume-grace", &["--resume-grace=8s"]).await;
    let running = gw.running.as_ref().expect("running");
    let metrics = running.metrics().clone();
    let registry = running.registry().clone();
    let client = connect(&gw, &ex, None).await;
    drop(client);
    eventually(Duration::from_secs(5), || {
        metrics.connections_open.get() == 0
    })
    .await;
    assert_eq!(
        registry.len(),
        1,
        "it lingers, with its binding, for a reconnect"
    );
    // 8 s of grace: the broker's view (two rabbitmqctl runs, slow on a busy machine) is
    // read well inside it.
    assert_eq!(broker_objects(&gw.queue_prefix).await.bindings.len(), 1);
    eventually(Duration::from_secs(20), || registry.is_empty()).await;
    broker_eventually(&gw.queue_prefix, Duration::from_secs(10), |o| {
        o.bindings.is_empty()
    })
    .await;
    gw.shutdown().await;
}
