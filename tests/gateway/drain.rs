//! Graceful drain seen from a client that follows the SSE reconnection rules: it
//! reconnects by itself to the next gateway on the same address, and gets 204 only where
//! the protocol says so.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use events_gateway_test_support::*;

/// What the client saw: each connection attempt, and each dispatched event.
#[derive(Debug)]
enum Seen {
    Connected {
        status: u16,
        last_event_id: Option<String>,
    },
    Event {
        kind: String,
        data: String,
    },
    Stopped,
}

/// A client that follows the HTML Living Standard's EventSource rules: it keeps the last
/// event id (an `id` field, even an empty one, updates it at the next blank line, also when
/// no event is dispatched), honours `retry`, reconnects after a stream ends with
/// `Last-Event-Id` when that id is not empty, and stops for good on a non-200 answer.
async fn spec_client(url: String, seen: mpsc::UnboundedSender<Seen>, max_connections: usize) {
    let http = reqwest::Client::new();
    let mut last_event_id = String::new();
    let mut retry = Duration::from_millis(1000);
    for _ in 0..max_connections {
        let mut req = http.get(&url).header("Accept", "text/event-stream");
        let sent_id = (!last_event_id.is_empty()).then(|| last_event_id.clone());
        if let Some(id) = &sent_id {
            req = req.header("Last-Event-Id", id);
        }
        let Ok(resp) = req.send().await else {
            tokio::time::sleep(retry).await;
            continue;
        };
        let status = resp.status().as_u16();
        let _ = seen.send(Seen::Connected {
            status,
            last_event_id: sent_id,
        });
        if status != 200 {
            let _ = seen.send(Seen::Stopped);
            return;
        }
        let (mut data, mut kind, mut id_buffer) =
            (String::new(), String::new(), last_event_id.clone());
        let mut pending = Vec::new();
        let mut body = resp.bytes_stream();
        while let Some(Ok(chunk)) = body.next().await {
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line = String::from_utf8_lossy(&pending[..end]).into_owned();
                pending.drain(..=end);
                if line.is_empty() {
                    last_event_id = id_buffer.clone();
                    if !data.is_empty() {
                        let _ = seen.send(Seen::Event {
                            kind: if kind.is_empty() {
                                "message".into()
                            } else {
                                kind.clone()
                            },
                            data: data.trim_end_matches('\n').to_owned(),
                        });
                    }
                    data.clear();
                    kind.clear();
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                    None => (line.clone(), String::new()),
                };
                match field.as_str() {
                    "event" => kind = value,
                    "data" => {
                        data.push_str(&value);
                        data.push('\n');
                    }
                    "id" if !value.contains('\0') => id_buffer = value,
                    "retry" => {
                        if let Ok(ms) = value.parse::<u64>() {
                            retry = Duration::from_millis(ms);
                        }
                    }
                    _ => {}
                }
            }
        }
        tokio::time::sleep(retry).await;
    }
    let _ = seen.send(Seen::Stopped);
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>, within: Duration) -> Seen {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("client saw something in time")
        .expect("client running")
}

async fn expect_event(rx: &mut mpsc::UnboundedReceiver<Seen>, expected: &str) -> String {
    loop {
        match next_seen(rx, Duration::from_secs(10)).await {
            Seen::Event { kind, data } if kind == "ping" => drop(data),
            Seen::Event { kind, data } => {
                assert_eq!(kind, expected, "{data}");
                return data;
            }
            other => panic!("expected {expected}, got {other:?}"),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start_on(port: u16) -> TestGateway {
    let flag = format!("--port={port}");
    // The port may still be held by the draining gateway for a moment (its listener lingers
    // at least 1 s, longer while streams finish; more on a busy machine).
    let free = || std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    eventually(Duration::from_secs(10), free).await;
    TestGateway::start_embedded(&[&flag]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_following_client_moves_to_the_next_gateway_when_one_drains() {
    let port = free_port();
    let first = start_on(port).await;
    let url = first.url(&format!(
        "/api/events/v1/connect/?{}",
        bindings_query(&[("exchange/drain/v1/a", "#")])
    ));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = tokio::spawn(spec_client(url, tx, 6));

    assert!(matches!(
        next_seen(&mut rx, Duration::from_secs(5)).await,
        Seen::Connected {
            status: 200,
            last_event_id: None
        }
    ));
    expect_event(&mut rx, "ready").await;
    let msg = serde_json::json!({"exchange": "exchange/drain/v1/a", "routingKey": "k", "payload": {"from": "first"}});
    first.publish(&msg).await;
    assert_eq!(
        message_json(&expect_event(&mut rx, "message").await)["payload"]["from"],
        "first"
    );

    // Act: the first gateway drains; a second one takes over the address.
    let heartbeat = first.url("/__heartbeat__");
    let drain = tokio::spawn(first.shutdown());
    let second = start_on(port).await;
    drain.await.expect("drained");
    let answer = reqwest::get(&heartbeat).await.expect("second answers");
    assert_eq!(answer.status(), 200);

    // Assert: the client was told with a named `reconnect` event (never a `message`),
    // came back by itself, never with Last-Event-Id, and gets the new stream (a
    // reconnection that reached the first gateway while it lingered was sent away again
    // with another reconnect frame).
    let mut told = 0;
    loop {
        match next_seen(&mut rx, Duration::from_secs(10)).await {
            Seen::Connected {
                status: 200,
                last_event_id: None,
            } => {}
            Seen::Event { kind, data } if kind == "reconnect" && data == "{}" => told += 1,
            Seen::Event { kind, .. } if kind == "ready" && told > 0 => break,
            other => panic!("expected a reconnection without Last-Event-Id, got {other:?}"),
        }
    }
    let msg = serde_json::json!({"exchange": "exchange/drain/v1/a", "routingKey": "k", "payload": {"from": "second"}});
    second.publish(&msg).await;
    assert_eq!(
        message_json(&expect_event(&mut rx, "message").await)["payload"]["from"],
        "second"
    );
    client.abort();
    second.shutdown().await;
}

#[tokio::test]
async fn after_an_error_the_client_gets_204_and_stops() {
    let gw = TestGateway::start_embedded(&[]).await;
    let url = gw.url("/api/events/v1/connect/?bindings=%7B%22bindings%22%3A42%7D");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = tokio::spawn(spec_client(url, tx, 5));
    assert!(matches!(
        next_seen(&mut rx, Duration::from_secs(5)).await,
        Seen::Connected {
            status: 200,
            last_event_id: None
        }
    ));
    assert_eq!(
        expect_event(&mut rx, "error").await,
        "\"Bindings must be an array of {exchange, routingKeyPattern}\""
    );
    match next_seen(&mut rx, Duration::from_secs(5)).await {
        Seen::Connected {
            status,
            last_event_id,
        } => {
            assert_eq!(status, 204);
            assert_eq!(last_event_id.as_deref(), Some("-"));
        }
        other => panic!("expected a reconnection, got {other:?}"),
    }
    assert!(matches!(
        next_seen(&mut rx, Duration::from_secs(5)).await,
        Seen::Stopped
    ));
    client.await.expect("client stops by itself");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stream_still_waiting_for_ready_also_gets_the_reconnect_frame() {
    // A broker that never answers: the stream waits for `ready` when the drain starts.
    let gw = TestGateway::start_unchecked(&[
        "--amqp-url=amqp://guest:guest@127.0.0.1:1/%2f",
        "--ready-timeout=60s",
    ])
    .await;
    let mut waiting = RawClient::get(
        gw.addr,
        &format!(
            "/api/events/v1/connect/?{}",
            bindings_query(&[("exchange/never", "#")])
        ),
        &[],
    )
    .await;
    waiting
        .read_until(b"\r\n\r\n", Duration::from_secs(5))
        .await;
    let drain = tokio::spawn(gw.shutdown());
    waiting.read_to_end(Duration::from_secs(10)).await;
    let (_, body) = waiting.head_and_body();
    let body = String::from_utf8_lossy(body);
    assert!(
        body.ends_with("\n\n") && is_reconnect_frame(&body[..body.len() - 2]),
        "only the reconnect frame: {body:?}"
    );
    drain.await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_stream_that_lost_the_drain_notice_still_gets_the_reconnect_frame() {
    let gw = TestGateway::start_embedded(&["--subscription-buffer=4"]).await;
    // A client that stops reading after `ready`, so that it falls behind.
    let mut stuck = gw.raw_connect(&[("exchange/lag", "#")]).await;
    let filler = "x".repeat(32 * 1024);
    let publish = |n: u32| {
        let body = serde_json::json!({
            "exchange": "exchange/lag", "routingKey": "k", "payload": {"n": n, "filler": filler}
        });
        let gw = &gw;
        async move { gw.publish(&body).await }
    };
    // Enough to fill the socket buffers between the gateway and the client.
    for n in 0..400 {
        assert_eq!(publish(n).await.0, 200);
    }
    // The drain notice goes into the 4-frame buffer, and newer messages push it out.
    let http = gw.http.clone();
    let url = gw.url("/api/events/v1/publish");
    let drain = tokio::spawn(gw.shutdown());
    for n in 400..410 {
        let body =
            serde_json::json!({"exchange": "exchange/lag", "routingKey": "k", "payload": {"n": n}});
        let _ = http.post(&url).json(&body).send().await;
    }
    stuck.read_to_end(Duration::from_secs(10)).await;
    let (_, body) = stuck.head_and_body();
    let body = String::from_utf8_lossy(body);
    // It fell behind: the messages published last (and the drain notice) never reached it.
    let highest = body
        .match_indices("\"n\":")
        .filter_map(|(at, _)| {
            let digits: String = body[at + 4..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u32>().ok()
        })
        .max()
        .expect("some messages");
    assert!(highest < 400, "the client lagged (last message {highest})");
    let last = body.rsplit("\n\n").nth(1).expect("a final frame");
    assert!(
        is_reconnect_frame(last),
        "ends with the reconnect frame, got {last:?}"
    );
    drain.await.expect("drained");
}
