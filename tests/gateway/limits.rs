//! Limits that hold against the ways around them: resumable subscriptions that linger
//! after their clients, replay memory over many subscriptions, sockets that never get to
//! admission, forwarded addresses a proxy could not have written, ambiguous framing, and
//! a publish endpoint reached by another name. Each attack comes from one loopback
//! address (127.0.0.2) against the real binary, on the embedded broker (what is above the
//! broker is the same code in both modes), while an honest client on another address
//! (127.0.0.3) is served. Every attack loop is bounded in count and in time.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use events_gateway_test_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GATEWAY: &str = env!("CARGO_BIN_EXE_events-gateway");
/// The embedded broker, without demo traffic.
const EMBEDDED: [&str; 2] = ["--amqp-url=", "--demo=false"];
/// How soon an honest client beside an attack must be ready: it is served in
/// milliseconds (printed), and the bound leaves room for a busy machine.
const HONEST_WITHIN: Duration = Duration::from_secs(5);

fn attacker() -> IpAddr {
    IpAddr::from([127, 0, 0, 2])
}

fn honest() -> IpAddr {
    IpAddr::from([127, 0, 0, 3])
}

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    EMBEDDED
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

/// A connect path for `bindings`, resumable if asked.
fn connect_path(bindings: &[(&str, &str)], resumable: bool) -> String {
    let resume = if resumable { "&resume=1" } else { "" };
    format!(
        "/api/events/v1/connect/?{}{resume}",
        bindings_query(bindings)
    )
}

/// The honest client subscribes to `exchange` from its own address and must get `ready`
/// within `within`. Returns how long it took.
async fn honest_ready_within(addr: SocketAddr, exchange: &str, within: Duration) -> Duration {
    let started = Instant::now();
    let path = connect_path(&[(exchange, "#")], false);
    let mut client = RawClient::get_from(honest(), addr, &path, &[]).await;
    let (status, event) = client.first_event(within).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "the honest client is admitted");
    let (kind, data) = event.expect("an event");
    assert_eq!(kind, "ready", "the honest client gets ready, not: {data}");
    assert!(took <= within, "ready after {took:?}");
    took
}

/// Publishes on the gateway's embedded broker.
async fn publish(
    addr: SocketAddr,
    http: &reqwest::Client,
    exchange: &str,
    payload: serde_json::Value,
) {
    let body = serde_json::json!({"exchange": exchange, "routingKey": "k", "payload": payload});
    let resp = http
        .post(format!("http://{addr}/api/events/v1/publish"))
        .json(&body)
        .send()
        .await
        .expect("publish");
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lingering_resumable_subscriptions_stay_charged_to_the_address_that_left_them() {
    let gw = ChildGateway::start(
        GATEWAY,
        &args(&[
            "--max-exchanges=200",
            "--max-exchanges-per-address=50",
            "--address-subscription-burst=10",
            "--address-subscription-rate=0.1",
            "--resume-grace=120s",
        ]),
    )
    .await;

    // Act: one address opens 4 resumable streams of 50 new exchanges each, one after
    // another, and closes each once it is ready.
    let mut first_events = Vec::new();
    for round in 0..4 {
        let names: Vec<String> = (0..50)
            .map(|i| format!("exchange/linger/{round}/{i}"))
            .collect();
        let set: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "#")).collect();
        let path = connect_path(&set, true);
        let mut client = RawClient::get_from(attacker(), gw.addr, &path, &[]).await;
        let (_, event) = client.first_event(Duration::from_secs(5)).await;
        first_events.push(event.map(|(kind, _)| kind).unwrap_or_default());
    }

    // Assert: the first lingers, still charged to the address, so the next three do not
    // fit its share; the exchanges in use are the share, not the global cap.
    assert_eq!(first_events, ["ready", "error", "error", "error"]);
    let lingering = "events_gateway_subscriptions_lingering";
    eventually_async(Duration::from_secs(5), || async {
        gw.metric(lingering).await == 1.0
    })
    .await;
    assert_eq!(gw.metric("events_gateway_exchanges").await, 50.0);
    let took = honest_ready_within(gw.addr, "exchange/honest", HONEST_WITHIN).await;

    // Re-joining the lingering subscription costs a token each time, as creating one does.
    let names: Vec<String> = (0..50).map(|i| format!("exchange/linger/0/{i}")).collect();
    let set: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "#")).collect();
    let path = connect_path(&set, true);
    let mut rejoins = (0, 0);
    for _ in 0..20 {
        let mut client = RawClient::get_from(attacker(), gw.addr, &path, &[]).await;
        match client.first_event(Duration::from_secs(5)).await.1 {
            Some((kind, _)) if kind == "ready" => rejoins.0 += 1,
            _ => rejoins.1 += 1,
        }
        drop(client);
        // Wait until it lingers again (no client), so that the next join is a re-join.
        eventually_async(Duration::from_secs(5), || async {
            gw.metric(lingering).await == 1.0
        })
        .await;
    }
    eprintln!(
        "4 x 50 exchanges with resume=1 from one address: {first_events:?}; exchanges in use 50; honest ready after {took:?}; 20 re-joins: {} ready, {} refused",
        rejoins.0, rejoins.1
    );
    assert!(
        rejoins.0 <= 10 && rejoins.1 >= 9,
        "re-joins are rate-limited: {rejoins:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_memory_is_bounded_across_lingering_subscriptions() {
    let bound_mib = 64u64;
    let gw = ChildGateway::start(
        GATEWAY,
        &args(&[
            "--replay-memory=64MiB",
            "--resume-grace=300s",
            "--address-subscription-burst=100",
            "--max-connections-per-address=100",
        ]),
    )
    .await;
    let http = reqwest::Client::new();
    // 25 resumable subscriptions, each left to linger by its client; the first client
    // keeps its id to come back later.
    let mut first_id = String::new();
    for i in 0..25 {
        let exchange = format!("exchange/replay/{i}");
        let path = connect_path(&[(&exchange, "#")], true);
        let mut client = RawClient::get_from(attacker(), gw.addr, &path, &[]).await;
        client
            .read_until(b"event: ready\n", Duration::from_secs(5))
            .await;
        client.read_until(b"\n\n", Duration::from_secs(5)).await;
        if i == 0 {
            let body = String::from_utf8_lossy(&client.buf).into_owned();
            first_id = body
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .expect("the ready event's id")
                .to_owned();
        }
    }
    let rss_before = gw.rss_kib();

    // Act: 8 messages of about 1 MiB to each (200 MiB in all; each log alone may hold
    // 8 MiB).
    let pad = "x".repeat(1_000_000);
    for round in 0..8 {
        for i in 0..25 {
            let payload = serde_json::json!({"n": round, "pad": pad});
            publish(gw.addr, &http, &format!("exchange/replay/{i}"), payload).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Assert: the replay frames held stay within the bound; RSS grew by no more than the
    // bound and a fifth.
    let held = gw.metric("events_gateway_replay_bytes").await;
    let rss = gw.rss_kib();
    let grew_mib = rss.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "25 lingering resumable subscriptions fed 8 x 1 MiB each: replay bytes held {:.1} MiB (bound {bound_mib} MiB); RSS {rss_before} -> {rss} KiB (+{grew_mib:.1} MiB)",
        held / 1048576.0
    );
    assert!(
        held <= (bound_mib * 1024 * 1024) as f64,
        "{held} bytes held"
    );
    assert!(
        grew_mib <= bound_mib as f64 * 1.2,
        "RSS grew by {grew_mib:.1} MiB"
    );

    // The oldest frames went first: the first client, coming back with its id, is told.
    let path = connect_path(&[("exchange/replay/0", "#")], true);
    let mut back =
        RawClient::get_from(attacker(), gw.addr, &path, &[("Last-Event-Id", &first_id)]).await;
    back.read_until(b"event: gap\n", Duration::from_secs(5))
        .await;
    let body = String::from_utf8_lossy(&back.buf).into_owned();
    assert!(body.contains(r#""reason":"expired""#), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_before_admission_cannot_use_up_the_descriptors() {
    // A gateway with 1,024 descriptors, and 1,100 sockets from one address: half send a
    // head that never ends, half a request that gets 204, again every 3 s on the same
    // connection.
    let gw = ChildGateway::start_with_open_files(GATEWAY, 1024, &args(&[])).await;
    let path = connect_path(&[("exchange/pending", "#")], false);
    let mut sockets = Vec::new();
    let mut closed_at_once = 0;
    for i in 0..1100 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(attacker(), 0)).expect("bind");
        let Ok(mut stream) = socket.connect(gw.addr).await else {
            closed_at_once += 1;
            continue;
        };
        let request = if i % 2 == 0 {
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        } else {
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nLast-Event-Id: -\r\n\r\n")
        };
        if stream.write_all(request.as_bytes()).await.is_err() {
            closed_at_once += 1;
            continue;
        }
        sockets.push((i, stream));
    }

    // Assert: while the attack goes on (20 s, the 204 requests again every 3 s), the
    // honest client gets ready within a second, every time.
    let started = Instant::now();
    let mut checks = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        checks.push(honest_ready_within(gw.addr, "exchange/honest", HONEST_WITHIN).await);
        for (i, stream) in sockets.iter_mut().filter(|(i, _)| i % 2 == 1) {
            let again = format!("GET {path} HTTP/1.1\r\nHost: x\r\nLast-Event-Id: -\r\n\r\n");
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut sink)).await;
            let _ = stream.write_all(again.as_bytes()).await;
            let _ = i;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    let refused = gw
        .metric("events_gateway_refused_total{reason=\"pending_per_address\"}")
        .await;
    let pending = gw.metric("events_gateway_connections_pending").await;
    checks.sort();
    eprintln!(
        "1,100 sockets from one address, 1,024 descriptors: {refused} closed as they came ({closed_at_once} seen closed by the client), {pending} pending, {fds} descriptors open; honest ready in {:?} (median of {}), slowest {:?}",
        checks[checks.len() / 2],
        checks.len(),
        checks[checks.len() - 1]
    );
    assert!(refused >= 1000.0, "{refused}");
    assert!(fds < 1024, "{fds} descriptors");
    drop(sockets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_from_one_address_do_not_buffer_without_bound() {
    let gw = ChildGateway::start(GATEWAY, &args(&[])).await;
    let rss_before = gw.rss_kib();
    let path = connect_path(&[("exchange/heads", "#")], false);
    // 2,000 heads of 60 KiB, never finished.
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
        "p".repeat(60 * 1024)
    );
    let mut sockets = Vec::new();
    for _ in 0..2000 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(attacker(), 0)).expect("bind");
        let Ok(mut stream) = socket.connect(gw.addr).await else {
            continue;
        };
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.write_all(head.as_bytes()))
            .await;
        sockets.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = gw.rss_kib();
    let took = honest_ready_within(gw.addr, "exchange/honest", HONEST_WITHIN).await;
    eprintln!(
        "2,000 half-sent 60 KiB heads from one address: RSS {rss_before} -> {rss} KiB; honest ready after {took:?}"
    );
    // 64 pending connections of at most 64 KiB each, and their buffers' slack.
    assert!(rss < rss_before + 16 * 1024, "RSS {rss} KiB");
    drop(sockets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_entries_a_proxy_could_not_have_written_do_not_escape_the_limit() {
    entries_a_proxy_could_not_have_written_do_not_escape_the_limit(
        ("x-forwarded-for", "X-Forwarded-For", "Forwarded"),
        [
            "198.51.100.7:5512",
            "[2001:db8::7]:443",
            "198.51.100.8, unknown",
            "203.0.113.1, garbage:, 198.51.100.9",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc_7239_entries_a_proxy_could_not_have_written_do_not_escape_the_limit() {
    entries_a_proxy_could_not_have_written_do_not_escape_the_limit(
        ("forwarded", "Forwarded", "X-Forwarded-For"),
        [
            "for=\"198.51.100.7:5512\";proto=http",
            "for=\"[2001:db8::7]:443\"",
            "for=198.51.100.8, for=unknown",
            "for=203.0.113.1, for=garbage:, for=198.51.100.9",
        ],
    )
    .await;
}

/// Behind trusted proxy 127.0.0.4 writing `header` (FORWARDED_HEADER `setting`), a client
/// may hold 3 streams, however it varies `other` (which that proxy does not write) and
/// whatever it writes left of the proxy's entry in each of `values`.
async fn entries_a_proxy_could_not_have_written_do_not_escape_the_limit(
    (setting, header, other): (&str, &str, &str),
    values: [&str; 4],
) {
    let gw = ChildGateway::start(
        GATEWAY,
        &args(&[
            "--trusted-proxies=127.0.0.4",
            &format!("--forwarded-header={setting}"),
            "--max-connections-per-address=3",
        ]),
    )
    .await;
    let proxy = IpAddr::from([127, 0, 0, 4]);
    for forwarded in values {
        let mut statuses = Vec::new();
        let mut held = Vec::new();
        for i in 0..8 {
            let path = connect_path(&[("exchange/forwarded", "#")], false);
            let spoofed = match other {
                "Forwarded" => format!("for=192.0.2.{i}"),
                _ => format!("192.0.2.{i}"),
            };
            let headers = [(header, forwarded), (other, spoofed.as_str())];
            let mut client = RawClient::get_from(proxy, gw.addr, &path, &headers).await;
            statuses.push(client.first_event(Duration::from_secs(5)).await.0);
            held.push(client);
        }
        assert_eq!(
            statuses,
            [200, 200, 200, 503, 503, 503, 503, 503],
            "{header}: {forwarded}"
        );
    }
    honest_ready_within(gw.addr, "exchange/honest", HONEST_WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_request_with_ambiguous_framing_gets_400_and_is_closed() {
    let gw = ChildGateway::start(GATEWAY, &args(&[])).await;
    let path = connect_path(&[("exchange/framing", "#")], false);
    for framing in [
        "Content-Length: 0\r\nContent-Length: 60\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        // The "body" would be taken for a second request if the first were read as having none.
        let smuggled = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{framing}\r\n{smuggled}");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("closed within 5 s")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert_eq!(
            answer.matches("HTTP/1.1").count(),
            1,
            "one answer: {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_publish_endpoint_answers_only_its_own_name_and_pages() {
    let gw = ChildGateway::start(GATEWAY, &args(&[])).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/events/v1/publish", gw.addr);
    let body = serde_json::json!({"exchange": "exchange/x", "routingKey": "k", "payload": {}});
    let post = |host: &'static str, origin: Option<&'static str>| {
        let mut req = http.post(&url).header("host", host).json(&body);
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        async move { req.send().await.expect("publish").status().as_u16() }
    };
    // A page on another name that resolves to 127.0.0.1 (DNS rebinding), or another page.
    assert_eq!(post("attacker.example:12345", None).await, 403);
    assert_eq!(
        post("127.0.0.1", Some("http://attacker.example")).await,
        403
    );
    // The gateway by its address, or as localhost, from its own page.
    assert_eq!(post("localhost", None).await, 200);
    assert_eq!(post("127.0.0.1", None).await, 200);
    assert_eq!(post("localhost:80", Some("http://localhost:80")).await, 200);
}
