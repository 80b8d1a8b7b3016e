//! The wire protocol, byte for byte where the original's transcripts show the bytes.

use std::time::Duration;

use events_gateway_test_support::*;

const ALL_CONNECT_PATHS: &[&str] = &[
    "/api/events/v1/connect/",
    "/api/events/v1/connect",
    "/events/v1/connect/",
    "/events/v1/connect",
];

#[tokio::test]
async fn ready_and_message_bytes_match_the_original() {
    let Scenario {
        broker,
        exchange,
        gw,
    } = Scenario::start("demo", &[]).await;

    let query = bindings_query(&[(&exchange, "primary.#")]);
    let mut raw = RawClient::get(gw.addr, &format!("/api/events/v1/connect/?{query}"), &[]).await;
    raw.read_until(b"event: ready\ndata: {}\nid: -\n\n", Duration::from_secs(5))
        .await;
    let (head, body) = raw.head_and_body();
    assert!(
        head.starts_with("HTTP/1.0 200 OK") || head.starts_with("HTTP/1.1 200 OK"),
        "{head}"
    );
    let head = head.to_ascii_lowercase();
    for line in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "access-control-allow-origin: *",
        "access-control-max-age: 900",
        "access-control-allow-methods: options,get,head,post,put,delete,trace,connect",
        "access-control-allow-headers: x-requested-with,content-type,authorization,accept,origin,cache-control",
        "x-content-type-options: nosniff",
    ] {
        assert!(head.contains(line), "missing {line:?} in {head}");
    }
    assert_eq!(body, b"event: ready\ndata: {}\nid: -\n\n");

    let payload =
        r#"{"status":"fooIsBar","n":1,"nested":{"list":[1,"two",null]},"unicode":"héllo ✓"}"#;
    broker
        .publish(
            &exchange,
            "primary.key.a",
            &["route.index.foo.bar", "not-a-route", "route.notify.a@b.c"],
            payload.as_bytes(),
        )
        .await;
    let expected = format!(
        "event: message\ndata: {{\"payload\":{payload},\"exchange\":\"{exchange}\",\"routingKey\":\"primary.key.a\",\"redelivered\":false,\"routes\":[\"index.foo.bar\",\"notify.a@b.c\"]}}\nid: -\n\n"
    );
    raw.read_until(expected.as_bytes(), Duration::from_secs(5))
        .await;

    // A body with whitespace is compacted; no CC header gives empty routes.
    broker
        .publish(&exchange, "primary.key.b", &[], b"{ \"n\" : 2 }")
        .await;
    let expected = format!(
        "event: message\ndata: {{\"payload\":{{\"n\":2}},\"exchange\":\"{exchange}\",\"routingKey\":\"primary.key.b\",\"redelivered\":false,\"routes\":[]}}\nid: -\n\n"
    );
    raw.read_until(expected.as_bytes(), Duration::from_secs(5))
        .await;
    let (_, body) = raw.head_and_body();
    assert!(
        body.ends_with(expected.as_bytes()),
        "nothing but the frames is sent"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn every_connect_path_serves_the_stream() {
    let gw = TestGateway::start(&[]).await;
    for path in ALL_CONNECT_PATHS {
        let resp = gw
            .http
            .get(gw.url(&format!(
                "{path}?bindings={}",
                urlencode(r#"{"bindings":[]}"#)
            )))
            .send()
            .await
            .expect("connect");
        assert_eq!(resp.status(), 200, "{path}");
        let mut client = SseClient::from_response(resp);
        assert_eq!(client.expect("ready").await, "{}", "{path}");
    }
    let resp = gw
        .http
        .get(gw.url("/api/events/v1/connectx"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn head_is_sent_before_ready_and_ready_times_out_with_an_error() {
    // A broker that never answers: `ready` cannot come, the head must come anyway.
    let gw = TestGateway::start_unchecked(&[
        "--amqp-url=amqp://guest:guest@127.0.0.1:1/%2f",
        "--ready-timeout=5s",
    ])
    .await;
    // The head must not wait for `ready` (5 s away at the earliest): 3 s only allows for
    // a loaded machine.
    let mut client = tokio::time::timeout(
        Duration::from_secs(3),
        gw.connect(&[("exchange/never", "#")]),
    )
    .await
    .expect("response head arrives at once");
    assert_eq!(client.status, 200);
    let error = client.expect_within("error", Duration::from_secs(15)).await;
    assert_eq!(
        error,
        "\"Timed out waiting for the broker to confirm the bindings; try again later\""
    );
    client.expect_end().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn ping_follows_the_interval_with_a_utc_millisecond_time() {
    let gw = TestGateway::start(&["--ping-interval=300ms"]).await;
    // Pings are timed from the stream's start, which is after this.
    let started = std::time::Instant::now();
    let mut client = gw.connect(&[]).await;
    assert_eq!(client.expect("ready").await, "{}");
    for _ in 0..2 {
        let data = client.expect("ping").await;
        let json: serde_json::Value = serde_json::from_str(&data).expect("ping data is JSON");
        let time = json["time"].as_str().expect("time is a string");
        assert_eq!(data, format!("{{\"time\":\"{time}\"}}"));
        // 2026-11-27T11:15:23.085Z
        assert_eq!(time.len(), 24, "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
        humantime::parse_rfc3339(time).expect("RFC 3339");
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    gw.shutdown().await;
}

#[tokio::test]
async fn any_last_event_id_gets_204_without_body() {
    let gw = TestGateway::start(&[]).await;
    for (value, query) in [
        ("-", bindings_query(&[])),
        ("42", "bindings=oops".to_owned()),
        ("", String::new()),
    ] {
        let resp = gw
            .http
            .get(gw.url(&format!("/api/events/v1/connect/?{query}")))
            .header("Last-Event-Id", value)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 204);
        assert!(resp.headers().get("content-type").is_none());
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
        assert!(resp.bytes().await.expect("body").is_empty());
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_one_error_event_then_the_stream_ends() {
    let gw = TestGateway::start(&["--max-bindings=3"]).await;
    let ex = "exchange/test/x";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("bindings={}", urlencode("this is not json")),
            r#""Unexpected token 'h', \"this is not json\" is not valid JSON""#,
        ),
        (
            format!(
                "bindings={}",
                urlencode(&format!(
                    r##"{{"bindings":[{{"exchange":"{ex}","routingKeyPattern":"#"}}],"foo":"bar"}}"##
                ))
            ),
            r#""The json query should have only one key i.e. `bindings`.""#,
        ),
        (
            format!(
                "bindings={}",
                urlencode(&format!(
                    r##"{{"bindings":{{"exchange":"{ex}","routingKeyPattern":"#"}}}}"##
                ))
            ),
            r#""Bindings must be an array of {exchange, routingKeyPattern}""#,
        ),
        (
            format!(
                "bindings={}",
                urlencode(r##"{"bindings":[{"routingKeyPattern":"#"}]}"##)
            ),
            r#""Binding must include `exchange` and `routingKeyPattern` fields""#,
        ),
        (
            format!(
                "bindings={}",
                urlencode(&format!(r#"{{"bindings":[{{"exchange":"{ex}"}}]}}"#))
            ),
            r#""Binding must include `exchange` and `routingKeyPattern` fields""#,
        ),
        (
            String::new(),
            r#""The query parameter `bindings` is missing: expected ?bindings=<URL-encoded JSON {\"bindings\": [{exchange, routingKeyPattern}, ...]}>""#,
        ),
        (
            "bindings=".to_owned(),
            r#""The query parameter `bindings` is empty""#,
        ),
        (
            format!("bindings={}", urlencode("null")),
            r#""The json query should have only one key i.e. `bindings`.""#,
        ),
        (
            format!("bindings={}", urlencode(r#"{"bindings":[42]}"#)),
            r#""Binding 0 must be an object {exchange, routingKeyPattern}""#,
        ),
        (
            format!(
                "bindings={}",
                urlencode(r#"{"bindings":[{"exchange":"","routingKeyPattern":"a"}]}"#)
            ),
            r#""Binding 0: `exchange` must not be empty""#,
        ),
        (
            format!(
                "bindings={}",
                urlencode(r#"{"bindings":[{"exchange":"exchange/a","routingKeyPattern":7}]}"#)
            ),
            r#""Binding 0: `routingKeyPattern` must be a string""#,
        ),
        (
            format!(
                "bindings={}",
                urlencode(&format!(
                    r#"{{"bindings":[{{"exchange":"exchange/{}","routingKeyPattern":"a"}}]}}"#,
                    "x".repeat(250)
                ))
            ),
            r#""Binding 0: `exchange` is 259 bytes long; AMQP allows at most 255""#,
        ),
        (
            bindings_query(&[(ex, "a"), (ex, "b"), (ex, "c"), (ex, "d")]),
            r#""Too many bindings: 4 given, at most 3 are allowed per connection""#,
        ),
        (
            bindings_query(&[("amq.topic", "#")]),
            r#""Exchange `amq.topic` is not allowed: exchange names must start with `exchange/`""#,
        ),
        (
            // invalid percent-encoding and UTF-8 are decoded lossily, then refused as JSON
            "bindings=%FF%FE%zz".to_owned(),
            r#""Unexpected token '�', \"��%zz\" is not valid JSON""#,
        ),
    ];
    for (query, expected) in cases {
        let mut client = gw.connect_query(&query).await;
        assert_eq!(client.status, 200, "{query}");
        assert_eq!(client.headers["content-type"], "text/event-stream");
        assert_eq!(client.expect("error").await, expected, "query {query}");
        client.expect_end().await;
    }
    assert!(
        gw.metric("events_gateway_connections_total{outcome=\"bad_input\"}")
            .await
            >= 15.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn cors_preflight_and_health_routes() {
    let gw = TestGateway::start(&["--cors-origin=https://dash.example"]).await;
    gw.wait_connected().await;
    let resp = gw
        .http
        .request(reqwest::Method::OPTIONS, gw.url("/api/events/v1/connect/"))
        .header("Origin", "https://dash.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .expect("preflight");
    assert!(resp.status().is_success());
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://dash.example"
    );
    assert_eq!(
        resp.headers()["access-control-allow-methods"],
        "OPTIONS,GET,HEAD,POST,PUT,DELETE,TRACE,CONNECT"
    );

    let ping: serde_json::Value = gw
        .http
        .get(gw.url("/api/events/v1/ping"))
        .send()
        .await
        .expect("ping")
        .json()
        .await
        .expect("json");
    assert_eq!(ping["alive"], true);
    assert!(ping["uptime"].as_f64().is_some());
    let lb = gw
        .http
        .get(gw.url("/__lbheartbeat__"))
        .send()
        .await
        .expect("lb");
    assert_eq!(lb.status(), 200);
    let hb = gw
        .http
        .get(gw.url("/__heartbeat__"))
        .send()
        .await
        .expect("hb");
    assert_eq!(hb.status(), 200);
    let version: serde_json::Value = gw
        .http
        .get(gw.url("/__version__"))
        .send()
        .await
        .expect("version")
        .json()
        .await
        .expect("json");
    for key in ["version", "commit", "source", "build"] {
        assert!(version[key].is_string(), "{key}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn heartbeat_reports_a_missing_broker() {
    let gw =
        TestGateway::start_unchecked(&["--amqp-url=amqp://guest:s3cret@127.0.0.1:1/%2f"]).await;
    let resp = gw
        .http
        .get(gw.url("/__heartbeat__"))
        .send()
        .await
        .expect("hb");
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.expect("body");
    assert!(body.contains("\"connected\":false"), "{body}");
    assert!(!body.contains("s3cret"), "the password never shows: {body}");
    let metrics = gw.text("/metrics").await;
    assert!(!metrics.contains("s3cret"));
    assert!(metrics.contains("events_gateway_broker_connected 0"));
    gw.shutdown().await;
}

#[tokio::test]
async fn empty_bindings_are_ready_then_ping() {
    let gw = TestGateway::start(&["--ping-interval=200ms"]).await;
    let mut client = gw.connect(&[]).await;
    assert_eq!(client.expect("ready").await, "{}");
    client.expect("ping").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn draining_ends_streams_with_a_reconnect_frame_and_deletes_queues() {
    let Scenario {
        broker: _broker,
        exchange: ex,
        gw,
    } = Scenario::start("drain", &[]).await;
    let query = bindings_query(&[(&ex, "#")]);
    let mut raw = gw.raw_connect(&[(&ex, "#")]).await;
    let prefix = gw.queue_prefix.clone();
    assert_eq!(broker_objects(&prefix).await.queues.len(), 1);

    let started = std::time::Instant::now();
    let http = gw.http.clone();
    let heartbeat = gw.url("/__heartbeat__");
    let connect = gw.url(&format!("/api/events/v1/connect/?{query}"));
    let drain = tokio::spawn(gw.shutdown());
    // Single-threaded runtime: yielding lets the drain start; the listener stays open for
    // DRAIN_LINGER (1 s) after that, long enough for the two requests below.
    tokio::task::yield_now().await;
    let hb = http.get(&heartbeat).send().await.expect("still answering");
    assert_eq!(hb.status(), 503, "health fails at once");
    assert!(hb.text().await.expect("body").contains("\"draining\":true"));
    // A new connect is sent elsewhere: 200 and only the reconnect frame (a 503 would make
    // EventSource give up for good).
    let refused = http.get(&connect).send().await.expect("still answering");
    assert_eq!(refused.status(), 200);
    let text = refused.text().await.expect("body");
    assert!(
        text.ends_with("\n\n") && is_reconnect_frame(&text[..text.len() - 2]),
        "{text:?}"
    );
    drain.await.expect("drained");
    // The grace period (5 s in tests) plus at most the broker connection's close.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "drain is bounded by the grace period"
    );
    raw.read_to_end(Duration::from_secs(5)).await;
    let (_, body) = raw.head_and_body();
    let body = String::from_utf8_lossy(body);
    // The last frame is a named event (never an empty `message`), resets the last event
    // id (empty `id:`) and sets a retry delay of 500–5000 ms.
    let last = body.rsplit("\n\n").nth(1).expect("a final frame");
    assert!(is_reconnect_frame(last), "{last:?}");
    assert_eq!(
        broker_objects(&prefix).await,
        BrokerObjects::default(),
        "queues are deleted"
    );
}
