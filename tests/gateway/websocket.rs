//! Taskcluster's WebSocket protocol (`/subscription/raw`, `/subscription/named`): every
//! frame type, every close code, every `ProtocolError` case as a client sees them; raw
//! and named subscriptions sharing one broker binding with SSE clients; limits, a slow
//! reader, and a client that behaves as the Taskcluster UI's listener across a drain.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use events_gateway_test_support::*;

const RAW: &str = "/subscription/raw";
const NAMED: &str = "/subscription/named";

fn error(code: &str, message: &str) -> WsEvent {
    WsEvent::Frame(json!({"type": "error", "code": code, "message": message}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_and_close_codes_as_taskclusters_server_sends_them() {
    // 2 s for connection_init: enough for a busy machine, well inside the 5 s waits.
    let gw = TestGateway::start_embedded(&["--ws-init-timeout=2s"]).await;
    let within = Duration::from_secs(5);

    // Fatal first frames: 4400 with Taskcluster's reasons.
    let fatal = [
        (
            json!({"type": "subscribe", "bindings": []}).to_string(),
            "Protocol error: first frame must be connection_init",
        ),
        ("not json".to_owned(), "Protocol error: malformed JSON"),
        (
            r#""a string""#.to_owned(),
            "Protocol error: missing frame type",
        ),
        (
            r#"{"notype":1}"#.to_owned(),
            "Protocol error: missing frame type",
        ),
    ];
    for (text, reason) in fatal {
        let mut client = WsClient::open(gw.addr, RAW, None).await.expect("handshake");
        client.send_text(&text).await;
        assert_eq!(
            client.next(within).await,
            WsEvent::Closed(4400, reason.to_owned()),
            "{text}"
        );
    }
    // No connection_init in time.
    let mut idle = WsClient::open(gw.addr, RAW, None).await.expect("handshake");
    assert_eq!(
        idle.next(within).await,
        WsEvent::Closed(
            4400,
            "Protocol error: no connection_init frame received".to_owned()
        )
    );
    // After the ack: malformed frames still close; unknown types are errors, and the
    // connection stays.
    let mut client = WsClient::ready(gw.addr, RAW).await;
    client.send(json!({"type": "nope"})).await;
    assert_eq!(
        client.next(within).await,
        error("ProtocolError", "Unknown frame type: nope")
    );
    client.send(json!({"type": "connection_init"})).await;
    assert_eq!(
        client.next(within).await,
        error("ProtocolError", "Unknown frame type: connection_init")
    );
    // unsubscribe gets no answer, for an unknown id as for a known one.
    client
        .send(json!({"type": "unsubscribe", "subscriptionId": "unknown"}))
        .await;
    client.send(json!({"type": "unsubscribe"})).await;
    client.send(json!({"type": "nope"})).await;
    assert_eq!(
        client.next(within).await,
        error("ProtocolError", "Unknown frame type: nope")
    );
    client.send_text("{").await;
    assert_eq!(
        client.next(within).await,
        WsEvent::Closed(4400, "Protocol error: malformed JSON".to_owned())
    );

    // Every ProtocolError of a subscribe frame, on the endpoint that reads it.
    let many = vec![json!({"exchange": "exchange/x", "pattern": "#"}); 101];
    let raw_cases = [
        (
            json!({"type": "subscribe"}),
            "subscribe requires a non-empty array of bindings",
        ),
        (
            json!({"type": "subscribe", "bindings": []}),
            "subscribe requires a non-empty array of bindings",
        ),
        (
            json!({"type": "subscribe", "bindings": many}),
            "subscribe allows at most 100 bindings",
        ),
        (
            json!({"type": "subscribe", "bindings": [{"exchange": "exchange/x"}]}),
            "each binding requires an `exchange` and a `pattern` string",
        ),
        (
            json!({"type": "subscribe", "bindings": [{"exchange": 1, "pattern": "#"}]}),
            "each binding requires an `exchange` and a `pattern` string",
        ),
        // The gateway's own checks, as for SSE bindings.
        (
            json!({"type": "subscribe", "bindings": [{"exchange": "other/x", "pattern": "#"}]}),
            "Exchange `other/x` is not allowed: exchange names must start with `exchange/`",
        ),
        (
            json!({"type": "subscribe", "bindings": [{"exchange": "exchange/x", "pattern": "#.#.#"}]}),
            "Binding 0: `routingKeyPattern` has 3 `#` wildcards; at most 2 are allowed",
        ),
    ];
    let named_cases = [
        (
            json!({"type": "subscribe", "subscriptions": ["taskDefined"]}),
            "subscribe requires a `service` string",
        ),
        (
            json!({"type": "subscribe", "service": "hooks", "subscriptions": ["taskDefined"]}),
            "unknown events service: hooks",
        ),
        (
            json!({"type": "subscribe", "service": "queue", "subscriptions": []}),
            "subscribe requires a non-empty array of subscriptions",
        ),
        (
            json!({"type": "subscribe", "service": "queue", "subscriptions": vec!["taskDefined"; 101]}),
            "subscribe allows at most 100 subscriptions",
        ),
        (
            json!({"type": "subscribe", "service": "queue", "subscriptions": ["taskDefined"], "routingKey": "x"}),
            "routingKey must be an object of routing-key fields",
        ),
        (
            json!({"type": "subscribe", "service": "queue", "subscriptions": ["tasksDefined"]}),
            "unknown queue event: tasksDefined",
        ),
        (
            json!({"type": "subscribe", "service": "queue", "subscriptions": ["taskDefined"], "routingKey": {"taskId": "a.b"}}),
            "invalid routingKey for queue event taskDefined: routingKey pattern 'a.b' for taskId cannot contain dots as it does not hold multiple words",
        ),
        (
            json!({"type": "subscribe", "service": "queue", "subscriptions": ["taskDefined"], "routingKey": {"taskId": false}}),
            "invalid routingKey for queue event taskDefined: Value: 'false' is not supported as routingKey pattern for taskId",
        ),
    ];
    for (path, cases) in [(RAW, &raw_cases[..]), (NAMED, &named_cases[..])] {
        let mut client = WsClient::ready(gw.addr, path).await;
        for (frame, text) in cases {
            client.send(frame.clone()).await;
            assert_eq!(
                client.next(within).await,
                error("ProtocolError", text),
                "{path} {frame}"
            );
        }
        // Still open and serving.
        let id = client.subscribe(raw_or_named(path)).await;
        assert_eq!(id.len(), 22, "{id}");
    }
    assert_eq!(
        gw.metric("events_gateway_websocket_closes_total{end=\"4400\"}")
            .await,
        6.0
    );
    gw.shutdown().await;
}

fn raw_or_named(path: &str) -> serde_json::Value {
    match path {
        RAW => raw_subscribe(&[("exchange/x", "#")]),
        _ => json!({"type": "subscribe", "service": "queue", "subscriptions": ["taskDefined"]}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_lifetime_and_drain_close_as_the_ui_expects() {
    let gw = TestGateway::start_embedded(&[
        "--ws-allowed-origins=https://tc.example.com, https://other.example.com/",
        // Long enough for the drain below to come first on a busy machine.
        "--ws-lifetime=3s",
    ])
    .await;
    assert_eq!(
        WsClient::open(gw.addr, RAW, Some("https://evil.example.com"))
            .await
            .err(),
        Some(403)
    );
    assert!(
        WsClient::open(gw.addr, RAW, Some("https://other.example.com"))
            .await
            .is_ok()
    );
    assert!(WsClient::open(gw.addr, NAMED, None).await.is_ok());
    assert_eq!(
        gw.metric("events_gateway_websocket_handshakes_total{outcome=\"origin\"}")
            .await,
        1.0
    );

    // Any other answer closes its connection, `Upgrade` header or not (a kept-alive
    // connection would escape the head deadline).
    for path in ["/__lbheartbeat__", RAW] {
        let mut socket = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        );
        socket.write_all(head.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer));
        assert!(
            matches!(read.await, Ok(Ok(_))),
            "{path}: closed after its answer"
        );
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(answer.contains("connection: close"), "{path}: {answer}");
    }

    let mut old = WsClient::ready(gw.addr, RAW).await;
    assert_eq!(
        old.next(Duration::from_secs(10)).await,
        WsEvent::Closed(4408, "Connection lifetime exceeded".to_owned())
    );
    let mut client = WsClient::ready(gw.addr, RAW).await;
    client
        .subscribe(raw_subscribe(&[("exchange/x", "#")]))
        .await;
    let stop = tokio::spawn(gw.shutdown());
    assert!(matches!(
        client.next(Duration::from_secs(5)).await,
        WsEvent::Closed(1012, _)
    ));
    stop.await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_sse_clients_share_one_binding_and_get_every_message() {
    let Scenario {
        broker,
        exchange,
        gw,
    } = Scenario::start("ws", &[]).await;
    let pattern = "route.shared.#";
    let mut sse = gw.connect(&[(&exchange, pattern)]).await;
    sse.expect("ready").await;
    let mut raw = WsClient::ready(gw.addr, RAW).await;
    let id = raw.subscribe(raw_subscribe(&[(&exchange, pattern)])).await;
    // A second subscription on the same socket, on the same bindings.
    let id2 = raw.subscribe(raw_subscribe(&[(&exchange, pattern)])).await;
    assert_ne!(id, id2);
    let objects = broker_objects(&gw.queue_prefix).await;
    assert_eq!(objects.bindings.len(), 1, "{objects:?}");
    assert_eq!(gw.metric("events_gateway_subscriptions").await, 1.0);
    assert_eq!(
        gw.metric("events_gateway_websocket_subscriptions").await,
        2.0
    );

    for n in 0..20 {
        let body = json!({"n": n}).to_string();
        broker
            .publish(
                &exchange,
                "primary.k",
                &["route.shared.x", "other"],
                body.as_bytes(),
            )
            .await;
    }
    for n in 0..20u64 {
        let sse_msg = message_json(&sse.expect("message").await);
        assert_eq!(sse_msg["payload"]["n"], n);
    }
    // Each subscription's frames in order; the two interleave.
    let mut next = [0u64, 0];
    while next != [20, 20] {
        let frame = raw.frame().await;
        assert_eq!(frame["type"], "data", "{frame}");
        let which = usize::from(frame["subscriptionId"] == id2.as_str());
        assert_eq!(
            frame["message"],
            json!({"payload": {"n": next[which]}, "exchange": exchange, "routingKey": "primary.k",
                   "redelivered": false, "cc": ["route.shared.x", "other"]})
        );
        next[which] += 1;
    }
    // unsubscribe releases at once; the SSE client still holds the subscription.
    raw.send(json!({"type": "unsubscribe", "subscriptionId": id}))
        .await;
    raw.send(json!({"type": "unsubscribe", "subscriptionId": id2}))
        .await;
    eventually_async(Duration::from_secs(5), || async {
        gw.metric("events_gateway_websocket_subscriptions").await == 0.0
    })
    .await;
    broker
        .publish(&exchange, "primary.k", &["route.shared.x"], b"{\"n\":20}")
        .await;
    assert_eq!(
        message_json(&sse.expect("message").await)["payload"]["n"],
        20
    );
    assert_eq!(raw.next(Duration::from_millis(300)).await, WsEvent::Silent);
    drop(sse);
    drop(raw);
    eventually_async(Duration::from_secs(5), || async {
        gw.metric("events_gateway_subscriptions").await == 0.0
    })
    .await;
    drop(broker);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_subscriptions_resolve_to_the_queues_exchanges() {
    let broker = Broker::connect().await;
    let exchange = "exchange/taskcluster-queue/v1/task-defined";
    broker.declare_exact(exchange).await;
    let gw = TestGateway::start(&[]).await;
    let mut sse = gw
        .connect(&[(exchange, "primary.abc123.*.*.*.*.*.*.*.#")])
        .await;
    sse.expect("ready").await;
    let mut named = WsClient::ready(gw.addr, NAMED).await;
    let id = named
        .subscribe(json!({"type": "subscribe", "service": "queue",
            "subscriptions": ["taskDefined"], "routingKey": {"taskId": "abc123"}}))
        .await;
    // The canonical pattern Taskcluster's clients build: the SSE client's binding.
    let objects = broker_objects(&gw.queue_prefix).await;
    assert_eq!(objects.bindings.len(), 1, "{objects:?}");
    for task in ["other", "abc123"] {
        let key = format!("primary.{task}.0.wg.wi.prov.wt.sched.group");
        broker
            .publish(exchange, &key, &[], br#"{"status":{}}"#)
            .await;
    }
    let msg = named.message(&id).await;
    assert_eq!(
        msg["routingKey"],
        "primary.abc123.0.wg.wi.prov.wt.sched.group"
    );
    assert_eq!(msg["cc"], json!([]));
    assert_eq!(
        message_json(&sse.expect("message").await)["routingKey"],
        msg["routingKey"]
    );
    // A named event whose exchange does not exist: the subscription's error, later.
    let id2 = named
        .subscribe(
            json!({"type": "subscribe", "service": "queue", "subscriptions": ["taskGroupSealed"]}),
        )
        .await;
    let frame = named.frame().await;
    assert_eq!(frame["code"], "SubscriptionError", "{frame}");
    assert_eq!(frame["subscriptionId"], id2.as_str(), "{frame}");
    drop(named);
    drop(sse);
    drop(broker);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_for_websocket_connections_and_their_subscriptions() {
    let Scenario {
        broker: _broker,
        exchange,
        gw,
    } = Scenario::start(
        "ws",
        &[
            "--max-connections-per-address=2",
            "--max-bindings-per-address=3",
        ],
    )
    .await;
    let attacker = IpAddr::from([127, 0, 0, 2]);
    let honest = IpAddr::from([127, 0, 0, 3]);
    let _first = WsClient::open_from(attacker, gw.addr, RAW, None)
        .await
        .expect("first");
    let mut second = WsClient::open_from(attacker, gw.addr, RAW, None)
        .await
        .expect("second");
    assert_eq!(
        WsClient::open_from(attacker, gw.addr, RAW, None)
            .await
            .err(),
        Some(503)
    );
    second.send(json!({"type": "connection_init"})).await;
    second.frame().await;
    let patterns = ["a.#", "b.#", "c.#", "d.#"];
    let two: Vec<(&str, &str)> = patterns[..2]
        .iter()
        .map(|p| (exchange.as_str(), *p))
        .collect();
    second.subscribe(raw_subscribe(&two)).await;
    let more: Vec<(&str, &str)> = patterns[2..]
        .iter()
        .map(|p| (exchange.as_str(), *p))
        .collect();
    second.send(raw_subscribe(&more)).await;
    let refused = second.frame().await;
    assert_eq!(refused["code"], "LimitExceeded", "{refused}");
    // The honest address is served throughout.
    let mut client = WsClient::open_from(honest, gw.addr, RAW, None)
        .await
        .expect("honest");
    client.send(json!({"type": "connection_init"})).await;
    assert_eq!(client.frame().await["type"], "connection_ack");
    client.subscribe(raw_subscribe(&more)).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_told_and_closed_and_the_others_get_everything() {
    let Scenario {
        broker,
        exchange,
        gw,
    } = Scenario::start("ws", &["--subscription-buffer=200", "--stall-timeout=30s"]).await;
    let binding = [(exchange.as_str(), "#")];
    let mut fast = WsClient::ready(gw.addr, RAW).await;
    let fast_id = fast.subscribe(raw_subscribe(&binding)).await;
    let mut slow = WsClient::ready_with_receive_buffer(gw.addr, RAW, 16 * 1024).await;
    let slow_id = slow.subscribe(raw_subscribe(&binding)).await;
    let mut sse = gw.connect(&binding).await;
    sse.expect("ready").await;

    // 1,000 messages of 16 KB while the slow client reads nothing: far past what the
    // sockets buffer and the 200-frame log holds. Published 50 at a time, each batch read
    // by the fast clients before the next: however busy the machine, they are never more
    // than 50 frames behind, so only the slow one can lag.
    let filler = "x".repeat(16_000);
    for batch in 0..20u64 {
        let numbers = batch * 50..(batch + 1) * 50;
        for n in numbers.clone() {
            let body = json!({"n": n, "filler": filler}).to_string();
            broker.publish(&exchange, "k", &[], body.as_bytes()).await;
        }
        let fast_reads = async {
            for n in numbers.clone() {
                assert_eq!(fast.message(&fast_id).await["payload"]["n"], n);
            }
        };
        let sse_reads = async {
            for n in numbers.clone() {
                assert_eq!(
                    message_json(&sse.expect("message").await)["payload"]["n"],
                    n
                );
            }
        };
        tokio::join!(fast_reads, sse_reads);
    }

    // The slow client: a prefix of the messages in order, each once, then the error and
    // the close; never a silent gap.
    let mut got = 0u64;
    let end = loop {
        match slow.next(Duration::from_secs(10)).await {
            WsEvent::Frame(frame) if frame["type"] == "data" => {
                assert_eq!(frame["message"]["payload"]["n"], got, "in order, each once");
                got += 1;
            }
            other => break other,
        }
    };
    assert!(got < 1000, "the slow reader lagged");
    match end {
        WsEvent::Frame(frame) => {
            assert_eq!(frame["code"], "SlowClient", "{frame}");
            assert_eq!(frame["subscriptionId"], slow_id.as_str());
        }
        other => panic!("expected the SlowClient error, got {other:?}"),
    }
    assert_eq!(
        slow.next(Duration::from_secs(5)).await,
        WsEvent::Closed(1013, "Too slow".to_owned())
    );
    println!("slow reader: {got} messages in order, then SlowClient and 1013");
    gw.shutdown().await;
}

/// What the UI's listener saw.
#[derive(Debug)]
enum Seen {
    Acked,
    Message(serde_json::Value),
    Closed(u16),
}

/// A client that behaves as the Taskcluster UI's `pulseListener.js`: one subscription per
/// socket; `connection_init` on open, `subscribe` after `connection_ack`; after any close
/// it did not ask for, except 4401 and 4403, a new socket after min(1 s × 2^n, 30 s)
/// (n reset by an ack), which subscribes again. Stops after `sockets` sockets.
async fn ui_listener(
    url: String,
    subscribe: serde_json::Value,
    seen: mpsc::UnboundedSender<Seen>,
    sockets: usize,
) {
    let addr: std::net::SocketAddr = url.parse().expect("address");
    let mut attempts = 0u32;
    for _ in 0..sockets {
        if let Ok(mut ws) = WsClient::open(addr, RAW, None).await {
            ws.send(json!({"type": "connection_init"})).await;
            loop {
                match ws.next(Duration::from_secs(60)).await {
                    WsEvent::Frame(frame) => match frame["type"].as_str() {
                        Some("connection_ack") => {
                            attempts = 0;
                            let _ = seen.send(Seen::Acked);
                            ws.send(subscribe.clone()).await;
                        }
                        Some("data") => {
                            let _ = seen.send(Seen::Message(frame["message"].clone()));
                        }
                        _ => {}
                    },
                    WsEvent::Closed(code, _) => {
                        let _ = seen.send(Seen::Closed(code));
                        if code == 4401 || code == 4403 {
                            return;
                        }
                        break;
                    }
                    WsEvent::Gone | WsEvent::Silent => break,
                }
            }
        }
        let delay = Duration::from_secs(1 << attempts.min(5)).min(Duration::from_secs(30));
        attempts += 1;
        tokio::time::sleep(delay).await;
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    seen.ok().flatten().expect("the listener saw something")
}

/// Publishes until the gateway has delivered a message to a WebSocket (the subscribe frame
/// follows the ack, so the first ones may come before the subscription).
async fn publish(gw: &TestGateway, exchange: &str, from: &str) {
    let body = json!({"exchange": exchange, "routingKey": "k", "payload": {"from": from}});
    for _ in 0..100 {
        gw.publish(&body).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if gw
            .metric("events_gateway_websocket_messages_delivered_total")
            .await
            > 0.0
        {
            return;
        }
    }
    panic!("nothing delivered to the listener by {from}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ui_listener_comes_back_after_a_drain_with_nothing_else_to_do() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let start = |port: u16| async move {
        let flag = format!("--port={port}");
        let free = || std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        eventually(Duration::from_secs(2), free).await;
        TestGateway::start_embedded(&[&flag]).await
    };
    let first = start(port).await;
    let exchange = "exchange/ui/v1/a";
    let (tx, mut rx) = mpsc::unbounded_channel();
    let subscribe = raw_subscribe(&[(exchange, "#")]);
    let listener = tokio::spawn(ui_listener(format!("127.0.0.1:{port}"), subscribe, tx, 3));
    assert!(matches!(next(&mut rx).await, Seen::Acked));
    publish(&first, exchange, "first").await;
    assert!(matches!(next(&mut rx).await, Seen::Message(m) if m["payload"]["from"] == "first"));
    first.shutdown().await;
    let closed = loop {
        match next(&mut rx).await {
            Seen::Message(_) => continue,
            other => break other,
        }
    };
    assert!(matches!(closed, Seen::Closed(1012)), "{closed:?}");
    let second = start(port).await;
    assert!(
        matches!(next(&mut rx).await, Seen::Acked),
        "back after its 1 s backoff"
    );
    publish(&second, exchange, "second").await;
    assert!(matches!(next(&mut rx).await, Seen::Message(m) if m["payload"]["from"] == "second"));
    listener.abort();
    second.shutdown().await;
}
