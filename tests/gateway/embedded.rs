//! The embedded broker (no RabbitMQ configured) and the limits of the HTTP side.

use std::time::Duration;

use events_gateway_test_support::*;

#[tokio::test]
async fn published_messages_reach_matching_clients() {
    let gw = TestGateway::start_embedded(&[]).await;
    let mut client = gw
        .connect(&[("exchange/demo/v1/a", "route.tc-treeherder.v2.try.#")])
        .await;
    assert_eq!(client.expect("ready").await, "{}");

    let (status, body) = gw
        .publish(&serde_json::json!({
            "exchange": "exchange/demo/v1/a",
            "routingKey": "primary.abc.0",
            "cc": ["route.tc-treeherder.v2.try.deadbeef.42", "other"],
            "payload": {"state": "completed", "list": [1, 2]},
        }))
        .await;
    assert_eq!((status, body), (200, serde_json::json!({"routed": 1})));
    let msg = message_json(&client.expect("message").await);
    assert_eq!(
        msg["payload"],
        serde_json::json!({"state": "completed", "list": [1, 2]})
    );
    assert_eq!(
        msg["routes"],
        serde_json::json!(["tc-treeherder.v2.try.deadbeef.42"])
    );

    let (status, body) = gw
        .publish(&serde_json::json!({
            "exchange": "exchange/demo/v1/a", "routingKey": "nothing.matches", "payload": 1,
        }))
        .await;
    assert_eq!((status, body), (200, serde_json::json!({"routed": 0})));
    // A message that matches comes next: the one that did not match never arrived.
    let marker = serde_json::json!({"marker": true});
    gw.publish(&serde_json::json!({
        "exchange": "exchange/demo/v1/a",
        "routingKey": "route.tc-treeherder.v2.try.marker",
        "payload": marker,
    }))
    .await;
    client.expect_marker(&marker).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_publish_requests_get_400() {
    let gw = TestGateway::start_embedded(&[]).await;
    for body in [
        serde_json::json!({"exchange": "exchange/a", "payload": {}}),
        serde_json::json!({"exchange": "", "routingKey": "a", "payload": {}}),
        serde_json::json!({"exchange": "exchange/a", "routingKey": "a".repeat(256), "payload": {}}),
        serde_json::json!({"exchange": "exchange/a", "routingKey": "a", "payload": {}, "x": 1}),
    ] {
        let (status, reply) = gw.publish(&body).await;
        assert_eq!(status, 400, "{body}");
        assert!(reply["message"].is_string());
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn publish_does_not_exist_in_amqp_mode() {
    let gw = TestGateway::start(&[]).await;
    let (status, _) = gw
        .publish(&serde_json::json!({"exchange": "exchange/a", "routingKey": "a", "payload": {}}))
        .await;
    assert_eq!(status, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_demo_publishes_treeherder_style_task_events() {
    let gw = TestGateway::start_embedded(&["--demo=true", "--demo-rate=200"]).await;
    let bindings: Vec<(String, String)> = events_gateway::internals::DEMO_EXCHANGES
        .iter()
        .map(|e| ((*e).to_owned(), "route.tc-treeherder.v2.#".to_owned()))
        .collect();
    let refs: Vec<(&str, &str)> = bindings
        .iter()
        .map(|(e, p)| (e.as_str(), p.as_str()))
        .collect();
    let mut client = gw.connect(&refs).await;
    client.expect("ready").await;
    for _ in 0..10 {
        let msg = message_json(&client.expect("message").await);
        assert!(
            msg["exchange"]
                .as_str()
                .expect("exchange")
                .starts_with("exchange/taskcluster-queue/v1/task-")
        );
        assert!(
            msg["routingKey"]
                .as_str()
                .expect("key")
                .starts_with("primary.")
        );
    }
    assert_eq!(
        gw.status_of("/__heartbeat__").await,
        200,
        "the embedded broker is always connected"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_limit_get_503_before_any_stream() {
    let gw = TestGateway::start_embedded(&["--max-connections=2"]).await;
    let mut a = gw.connect(&[]).await;
    let mut b = gw.connect(&[]).await;
    a.expect("ready").await;
    b.expect("ready").await;
    let refused = gw
        .http
        .get(gw.url(&format!("/api/events/v1/connect/?{}", bindings_query(&[]))))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["code"], "TooManyConnections");
    assert_eq!(
        gw.metric("events_gateway_connections_total{outcome=\"over_limit\"}")
            .await,
        1.0
    );
    assert_eq!(gw.metric("events_gateway_connections_limit").await, 2.0);
    // Full: out of the load balancers' rotation until a stream ends.
    assert_eq!(gw.status_of("/__heartbeat__").await, 503);
    let details: serde_json::Value =
        serde_json::from_str(&gw.text("/__heartbeat__").await).expect("json");
    assert_eq!(details["full"], true, "{details}");

    drop(a);
    let c = poll_until(Duration::from_secs(1), || async {
        let attempt = gw.connect(&[]).await;
        (attempt.status == 200).then_some(attempt)
    })
    .await;
    let mut c = c.expect("a slot frees when a client leaves");
    c.expect("ready").await;
    drop(b);
    let back = poll_until(Duration::from_secs(1), || async {
        (gw.status_of("/__heartbeat__").await == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "a replica with room is back in rotation");
    gw.shutdown().await;
}

#[tokio::test]
async fn oversize_request_heads_are_refused_and_the_server_keeps_serving() {
    let gw = TestGateway::start_embedded(&[]).await;
    let huge = "a".repeat(100 * 1024);
    let status_of = |raw: &RawClient| {
        String::from_utf8_lossy(&raw.buf)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let mut raw = RawClient::get(
        gw.addr,
        &format!("/api/events/v1/connect/?bindings={huge}"),
        &[],
    )
    .await;
    raw.read_until(b"\r\n", Duration::from_secs(5)).await;
    assert!(status_of(&raw).contains(" 431 "), "{}", status_of(&raw));
    let mut raw = RawClient::get(gw.addr, "/__lbheartbeat__", &[("X-Huge", &huge)]).await;
    raw.read_until(b"\r\n", Duration::from_secs(5)).await;
    assert!(status_of(&raw).contains(" 431 "), "{}", status_of(&raw));
    let mut client = gw.connect(&[]).await;
    client.expect("ready").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn time_to_ready_and_fanout_latency_are_measured() {
    let gw = TestGateway::start_embedded(&[]).await;
    let mut client = gw.connect(&[("exchange/a", "#")]).await;
    client.expect("ready").await;
    gw.publish(&serde_json::json!({"exchange": "exchange/a", "routingKey": "k", "payload": {}}))
        .await;
    client.expect("message").await;
    assert_eq!(
        gw.metric("events_gateway_time_to_ready_seconds_count")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("events_gateway_fanout_latency_seconds_count")
            .await,
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn hostile_bindings_get_clear_answers_and_others_are_still_served() {
    let gw = TestGateway::start_embedded(&[]).await;
    let mut ok = gw.connect(&[("exchange/a", "#")]).await;
    ok.expect("ready").await;
    let one = r##"{"exchange":"exchange/a","routingKeyPattern":"#"}"##;
    let cases = [
        (
            format!(r#"{{"bindings":[{}]}}"#, vec![one; 400].join(",")),
            "\"Too many bindings: 400 given, at most 100 are allowed per connection\"",
        ),
        (
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            "\"JSON nested too deeply (at most 128 levels)\"",
        ),
        (
            format!(
                r##"{{"bindings":[{{"exchange":"exchange/{}","routingKeyPattern":"#"}}]}}"##,
                "x".repeat(20_000)
            ),
            "\"Binding 0: `exchange` is 20009 bytes long; AMQP allows at most 255\"",
        ),
    ];
    for (json, expected) in cases {
        let mut client = gw
            .connect_query(&format!("bindings={}", urlencode(&json)))
            .await;
        assert_eq!(client.expect("error").await, expected);
        client.expect_end().await;
    }
    gw.publish(
        &serde_json::json!({"exchange": "exchange/a", "routingKey": "k", "payload": {"still": 1}}),
    )
    .await;
    assert_eq!(
        message_json(&ok.expect("message").await)["payload"]["still"],
        1
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn frames_after_a_write_wait_for_the_coalescing_window_and_leave_together() {
    // A window long enough that scheduling delays on a loaded machine cannot blur it.
    let gw = TestGateway::start_embedded(&["--write-coalesce=2s"]).await;
    let mut raw = gw.raw_connect(&[("exchange/a", "#")]).await;
    let gw_ref = &gw;
    let publish = |n: u32| {
        let body =
            serde_json::json!({"exchange": "exchange/a", "routingKey": "k", "payload": {"n": n}});
        async move { gw_ref.publish(&body).await }
    };

    // A frame after a quiet period leaves at once.
    let started = std::time::Instant::now();
    publish(1).await;
    raw.read_until(b"{\"n\":1}", Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // Frames right after a write wait for the window (which opened with frame 1's write,
    // after `started`), then leave together.
    for n in 2..=4 {
        publish(n).await;
    }
    raw.read_until(b"{\"n\":4}", Duration::from_secs(10)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&raw.buf).into_owned();
    for n in 2..=4 {
        assert!(text.contains(&format!("{{\"n\":{n}}}")));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_sends_its_headers_too_slowly_is_disconnected() {
    let gw = TestGateway::start_embedded(&["--header-read-timeout=500ms"]).await;
    let mut slow = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /__lbheartbeat__ HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial head");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut slow, &mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the server closes the connection");
    assert_eq!(
        gw.metric("events_gateway_http_connection_errors_total{kind=\"header_timeout\"}")
            .await,
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn every_route_the_manifest_lists_is_served() {
    // deploy/check.py trusts http::ROUTES (through --print-manifest): each must answer.
    let gw = TestGateway::start_embedded(&[]).await;
    for route in events_gateway::internals::ROUTES {
        let request = if route.ends_with("/publish") {
            gw.http.post(gw.url(route)).json(&serde_json::json!({}))
        } else {
            gw.http.get(gw.url(route))
        };
        let status = request.send().await.expect("request").status();
        assert_ne!(status, 404, "{route} is listed in ROUTES but not served");
    }
    gw.shutdown().await;
}
