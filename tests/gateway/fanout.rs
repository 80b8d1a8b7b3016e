//! The stream path past its head: writer shards, sockets that block, clients that leave,
//! and a drain, on the embedded broker (the path is the same in both modes).

use std::time::{Duration, Instant};

use events_gateway_test_support::*;
use futures_util::future::join_all;

/// Publishes `{"n": n, "pad": …}` on `exchange/fanout` with routing key `k`.
async fn publish_n(gw: &TestGateway, n: u64, pad: &str) {
    let (status, _) = gw
        .publish(&serde_json::json!({
            "exchange": "exchange/fanout", "routingKey": "k", "payload": {"n": n, "pad": pad},
        }))
        .await;
    assert_eq!(status, 200);
}

/// The `n` of every message frame in `body`, in order.
fn numbers(body: &str) -> Vec<u64> {
    body.match_indices("{\"payload\":{\"n\":")
        .filter_map(|(at, m)| {
            let digits: String = body[at + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_mid_stream_is_noticed_within_one_ping_interval() {
    let gw = TestGateway::start_embedded(&["--ping-interval=3s"]).await;
    let running = gw.running.as_ref().expect("running");
    let mut stays = gw.raw_connect(&[("exchange/fanout", "#")]).await;
    let leaves = gw.raw_connect(&[("exchange/fanout", "#")]).await;
    publish_n(&gw, 1, "").await;
    stays.read_until(b"{\"n\":1", Duration::from_secs(5)).await;
    assert_eq!(gw.metric("events_gateway_connections_open").await, 2.0);

    // Act: one client closes its socket while its stream is idle (no write to fail on).
    let closed_at = Instant::now();
    drop(leaves);

    // Assert: its slot is freed well within one ping interval, the other stays.
    let metrics = running.metrics().clone();
    eventually(Duration::from_secs(3), || {
        metrics.connections_open.get() == 1
    })
    .await;
    eprintln!("the departure was noticed after {:?}", closed_at.elapsed());
    assert_eq!(
        gw.metric("events_gateway_http_connection_errors_total{kind=\"client_closed\"}")
            .await,
        1.0
    );
    publish_n(&gw, 2, "").await;
    stays.read_until(b"{\"n\":2", Duration::from_secs(5)).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_socket_blocks_keeps_a_bounded_rest_then_hears_what_it_lost() {
    // A small log (16 frames) and large frames, so that a client that stops reading
    // falls out of the log while its socket is full.
    let gw = TestGateway::start_embedded(&["--subscription-buffer=16"]).await;
    let running = gw.running.as_ref().expect("running");
    let mut reader = gw.raw_connect(&[("exchange/fanout", "#")]).await;
    let mut stuck = gw.raw_connect(&[("exchange/fanout", "#")]).await;
    let pad = "x".repeat(64 * 1024);
    let total = 300u64;

    // Act: the stuck client reads nothing while 300 frames of 64 KiB (19 MiB) go by;
    // the reader keeps up, and gets every one of them.
    for n in 0..total {
        publish_n(&gw, n, &pad).await;
        if n % 10 == 9 {
            reader
                .read_until(format!("{{\"n\":{n},").as_bytes(), Duration::from_secs(10))
                .await;
            reader.buf.clear();
        }
    }
    let metrics = running.metrics().clone();
    eventually(Duration::from_secs(5), || {
        metrics.streams_blocked.get() == 1
    })
    .await;

    // The stuck client reads again: what its socket and its kept rest held, then the
    // notice of what it lost, then the frames after it, in order.
    let marker = total + 1;
    publish_n(&gw, marker, "").await;
    stuck
        .read_until(
            format!("{{\"n\":{marker},").as_bytes(),
            Duration::from_secs(30),
        )
        .await;
    let body = String::from_utf8_lossy(&stuck.buf).into_owned();
    let notice = body
        .find(" messages were dropped because this client reads too slowly")
        .expect("the dropped-messages comment");
    let missed: u64 = body[..notice]
        .rsplit(": ")
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count in the comment");
    let received = numbers(&body);
    assert!(received.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(
        received.len() as u64 + missed,
        total + 1,
        "every frame was either written or counted as lost (missed {missed})"
    );
    assert!(missed > 0);
    assert_eq!(
        gw.metric("events_gateway_messages_dropped_total{reason=\"slow_client\"}")
            .await,
        missed as f64
    );
    eventually(Duration::from_secs(5), || {
        metrics.streams_blocked.get() == 0
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_frame_reaches_every_stream_of_every_shard() {
    let gw = TestGateway::start_embedded(&[]).await;
    // 2,600 clients on one subscription (three writer shards) and 50 on others.
    let mut clients: Vec<RawClient> = Vec::new();
    for chunk in 0..27 {
        let batch = join_all((0..100).map(|i| {
            let gw = &gw;
            async move {
                let pattern = if chunk == 26 && i % 2 == 0 {
                    format!("other.{i}")
                } else {
                    "#".to_owned()
                };
                gw.raw_connect(&[("exchange/fanout", pattern.as_str())])
                    .await
            }
        }))
        .await;
        clients.extend(batch);
    }
    assert_eq!(gw.metric("events_gateway_connections_open").await, 2700.0);

    gw.shutdown().await;

    let bodies = join_all(clients.iter_mut().map(|c| async move {
        c.read_to_end(Duration::from_secs(20)).await;
        let (_, body) = c.head_and_body();
        String::from_utf8_lossy(body).into_owned()
    }))
    .await;
    let ended_well = bodies
        .iter()
        .filter(|b| {
            let last = b.rsplit("\n\n").nth(1).unwrap_or_default();
            is_reconnect_frame(last)
        })
        .count();
    assert_eq!(
        ended_well,
        bodies.len(),
        "every stream ends with the reconnect frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stuck_client_does_not_hold_up_the_others() {
    let gw = TestGateway::start_embedded(&[]).await;
    let running = gw.running.as_ref().expect("running");
    let metrics = running.metrics().clone();
    // The stuck client is first in its writer's pass; 20 clients read after it.
    let _stuck = gw.raw_connect(&[("exchange/fanout", "#")]).await;
    let mut readers = Vec::new();
    for _ in 0..20 {
        readers.push(gw.raw_connect(&[("exchange/fanout", "#")]).await);
    }
    let pad = "x".repeat(64 * 1024);

    // Fill the stuck client's socket: frames until its writer keeps a rest for it.
    let mut n = 0u64;
    while metrics.streams_blocked.get() == 0 {
        assert!(n < 2000, "the stuck client's socket never filled");
        publish_n(&gw, n, &pad).await;
        n += 1;
        if n.is_multiple_of(10) {
            for r in &mut readers {
                r.buf.clear();
                r.read_until(
                    format!("{{\"n\":{},", n - 1).as_bytes(),
                    Duration::from_secs(10),
                )
                .await;
            }
        }
    }

    for r in &mut readers {
        r.read_until(
            format!("{{\"n\":{},", n - 1).as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        r.buf.clear();
    }

    // Act and assert: with the stuck client blocked, every frame still reaches every
    // reader, each within a bound far below the stall timeout.
    let mut times = Vec::new();
    for _ in 0..50 {
        let sent = Instant::now();
        publish_n(&gw, n, "").await;
        for r in &mut readers {
            r.read_until(format!("{{\"n\":{n},").as_bytes(), Duration::from_secs(5))
                .await;
            r.buf.clear();
        }
        times.push(sent.elapsed());
        n += 1;
    }
    assert_eq!(
        metrics.streams_blocked.get(),
        1,
        "the stuck client stayed stuck"
    );
    times.sort();
    eprintln!(
        "publish to all 20 readers past a stuck client: median {:?}, slowest {:?} (50 frames)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    gw.shutdown().await;
}
