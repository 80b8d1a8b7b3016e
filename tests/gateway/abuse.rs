//! Hostile clients, each attack from one source address (127.0.0.2) against the real
//! binary and the real RabbitMQ, while an honest client on another address (127.0.0.3)
//! connects, gets `ready` within its usual time and receives every message. Each test
//! measures the gateway's RSS and the broker's objects during the attack and checks them
//! against the configured bounds. Every attack loop is bounded in count and in time.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use events_gateway_test_support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_events-gateway");

fn attacker() -> IpAddr {
    IpAddr::from([127, 0, 0, 2])
}

fn honest() -> IpAddr {
    IpAddr::from([127, 0, 0, 3])
}

/// The honest client's check: from its own address it subscribes to `exchange` (a new
/// binding, so the broker must bind it), gets `ready` within 5 s, and receives all of 10
/// messages published then. Returns how long `ready` took.
async fn honest_client_is_served(gw: &ChildGateway, broker: &Broker, exchange: &str) -> Duration {
    let started = Instant::now();
    let mut client = gw.raw_from(honest(), &[(exchange, "honest.#")]).await;
    let (status, event) = client.first_event(Duration::from_secs(5)).await;
    assert_eq!(status, 200, "the honest client is admitted");
    let (kind, data) = event.expect("an event");
    assert_eq!(kind, "ready", "the honest client gets ready, not: {data}");
    let ready_after = started.elapsed();
    for n in 0..10 {
        broker
            .publish(
                exchange,
                "honest.k",
                &[],
                format!("{{\"honest\":{n}}}").as_bytes(),
            )
            .await;
    }
    client
        .read_until(b"{\"honest\":9}", Duration::from_secs(10))
        .await;
    for n in 0..10 {
        assert!(
            contains(&client.buf, format!("{{\"honest\":{n}}}").as_bytes()),
            "message {n} reached the honest client"
        );
    }
    ready_after
}

/// Connects from the attacker's address and returns the answer's status and first event.
async fn attack_once(
    gw: &ChildGateway,
    bindings: &[(&str, &str)],
) -> (RawClient, u16, Option<(String, String)>) {
    let mut client = gw.raw_from(attacker(), bindings).await;
    let (status, event) = client.first_event(Duration::from_secs(10)).await;
    (client, status, event)
}

fn is_error(event: &Option<(String, String)>) -> bool {
    matches!(event, Some((kind, _)) if kind == "error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_bindings_from_one_address_stay_within_its_share() {
    let broker = Broker::connect().await;
    let target = broker.exchange("bindings-attack").await;
    let gw = ChildGateway::start(
        GATEWAY,
        &[
            "--max-bindings-per-address=1000",
            "--max-broker-bindings=3000",
            "--address-subscription-burst=100",
        ],
    )
    .await;
    let rss_before = gw.rss_kib();

    // Act: 60 connections of 100 distinct patterns each (6,000 broker bindings asked).
    let mut held = Vec::new();
    let (mut ready, mut refused) = (0, 0);
    for c in 0..60 {
        let patterns: Vec<String> = (0..100).map(|i| format!("a{c}.p{i}.#")).collect();
        let set: Vec<(&str, &str)> = patterns
            .iter()
            .map(|p| (target.as_str(), p.as_str()))
            .collect();
        let (client, _, event) = attack_once(&gw, &set).await;
        match event {
            Some((kind, _)) if kind == "ready" => ready += 1,
            _ => refused += 1,
        }
        held.push(client);
    }

    // Assert: the address got its share (1,000 bindings) and no more, and others are served.
    assert_eq!(
        (ready, refused),
        (10, 50),
        "10 connections of 100 bindings fit the share"
    );
    let objects = broker_objects(&gw.queue_prefix).await;
    assert!(
        objects.bindings.len() <= 1000,
        "{} broker bindings",
        objects.bindings.len()
    );
    let ready_after = honest_client_is_served(&gw, &broker, &target).await;
    let rss = gw.rss_kib();
    eprintln!(
        "attack: 6,000 bindings asked, {} bound; RSS {rss_before} -> {rss} KiB; honest ready after {ready_after:?}",
        objects.bindings.len()
    );
    assert!(rss < rss_before + 64 * 1024, "RSS {rss} KiB");
    assert_eq!(
        gw.metric("events_gateway_refused_total{reason=\"address_bindings\"}")
            .await,
        50.0
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_read_are_bounded_per_address_and_cut_when_stalled() {
    let broker = Broker::connect().await;
    let busy = broker.exchange("never-read").await;
    let gw = ChildGateway::start(
        GATEWAY,
        &[
            "--max-connections=300",
            "--max-connections-per-address=100",
            "--stall-timeout=2s",
            "--subscription-buffer=32",
        ],
    )
    .await;
    let rss_before = gw.rss_kib();

    // Act: 250 connections from one address that never read after `ready`.
    let mut held = Vec::new();
    let (mut admitted, mut turned_away) = (0, 0);
    for _ in 0..250 {
        let (client, status, _) = attack_once(&gw, &[(&busy, "#")]).await;
        if status == 200 {
            admitted += 1;
            held.push(client);
        } else {
            assert_eq!(status, 503);
            turned_away += 1;
        }
    }
    assert_eq!((admitted, turned_away), (100, 150));
    // The honest client still finds room (the process allows 300).
    let ready_after = honest_client_is_served(&gw, &broker, &busy).await;

    // Traffic fills the non-reading sockets; the stall timeout ends those streams.
    let pad = "x".repeat(64 * 1024);
    let started = Instant::now();
    let published = std::sync::atomic::AtomicUsize::new(0);
    let cut = poll_until(Duration::from_secs(60), || async {
        if gw.metric("events_gateway_connections_open").await <= 1.0 {
            return Some(());
        }
        for _ in 0..20 {
            broker
                .publish(&busy, "k", &[], format!("{{\"pad\":\"{pad}\"}}").as_bytes())
                .await;
        }
        published.fetch_add(20, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        None
    })
    .await;
    assert!(cut.is_some(), "stalled streams were not cut");
    let published = published.into_inner();
    let stalled = gw
        .metric("events_gateway_http_connection_errors_total{kind=\"stalled\"}")
        .await;
    let rss = gw.rss_kib();
    eprintln!(
        "attack: 250 non-reading connections, 100 admitted, {stalled} cut as stalled after {:?} ({published} frames of 64 KiB); RSS {rss_before} -> {rss} KiB; honest ready after {ready_after:?}",
        started.elapsed()
    );
    assert!(stalled >= 100.0);
    assert!(rss < rss_before + 64 * 1024, "RSS {rss} KiB");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_heavy_patterns_are_refused_and_the_worst_allowed_do_not_starve_anyone() {
    let broker = Broker::connect().await;
    let target = broker.exchange("wildcards").await;
    let gw = ChildGateway::start(GATEWAY, &["--address-subscription-burst=200"]).await;
    let rss_before = gw.rss_kib();

    // Beyond the limits: refused with a clear error.
    let many = "#.a.#.b.#.c.#.d.#";
    let (_, _, event) = attack_once(&gw, &[(&target, many)]).await;
    assert_eq!(
        event.map(|(_, data)| data).as_deref(),
        Some("\"Binding 0: `routingKeyPattern` has 5 `#` wildcards; at most 2 are allowed\"")
    );
    let long = vec!["w"; 40].join(".");
    let (_, _, event) = attack_once(&gw, &[(&target, &long)]).await;
    assert!(is_error(&event), "{event:?}");

    // The worst allowed: 100 connections of patterns with 2 `#` and 32 words.
    let mut held = Vec::new();
    for c in 0..100 {
        let pattern = format!("#.{c}.#.x.{}", vec!["y"; 28].join("."));
        let (client, _, event) = attack_once(&gw, &[(&target, &pattern)]).await;
        assert!(matches!(&event, Some((k, _)) if k == "ready"), "{event:?}");
        held.push(client);
    }
    let ready_after = honest_client_is_served(&gw, &broker, &target).await;
    let objects = broker_objects(&gw.queue_prefix).await;
    let rss = gw.rss_kib();
    eprintln!(
        "attack: 2 refused patterns, 100 worst allowed; {} bindings; RSS {rss_before} -> {rss} KiB; honest ready after {ready_after:?}",
        objects.bindings.len()
    );
    assert_eq!(
        objects.bindings.len(),
        100,
        "one each, the honest one gone with it"
    );
    assert_eq!(
        gw.metric("events_gateway_refused_total{reason=\"pattern\"}")
            .await,
        2.0
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_exchanges_cannot_use_up_the_broker_channels() {
    let broker = Broker::connect().await;
    let honest_exchange = broker.exchange("honest-channels").await;
    let mut existing = Vec::new();
    for i in 0..30 {
        existing.push(broker.exchange(&format!("channels-{i}")).await);
    }
    let gw = ChildGateway::start(
        GATEWAY,
        &[
            "--max-exchanges=20",
            "--max-exchanges-per-address=10",
            "--address-subscription-burst=200",
        ],
    )
    .await;
    let rss_before = gw.rss_kib();

    // Act: 50 exchanges that do not exist (each a refused binding: a 404 closes a
    // channel), then 30 that do, each on a connection of its own, all held open.
    let mut held = Vec::new();
    let mut most_channels = 0;
    for i in 0..50 {
        let missing = format!("exchange/test/{}/missing-{i}", unique());
        let (client, _, event) = attack_once(&gw, &[(&missing, "#")]).await;
        assert!(is_error(&event), "{event:?}");
        held.push(client);
    }
    let mut ready = 0;
    for ex in &existing {
        let (client, _, event) = attack_once(&gw, &[(ex, "#")]).await;
        if matches!(&event, Some((k, _)) if k == "ready") {
            ready += 1;
        }
        held.push(client);
        most_channels = most_channels.max(gw.amqp_channels().await);
    }
    assert_eq!(ready, 10, "the address's share of exchanges");
    let ready_after = honest_client_is_served(&gw, &broker, &honest_exchange).await;
    most_channels = most_channels.max(gw.amqp_channels().await);
    let objects = broker_objects(&gw.queue_prefix).await;
    let rss = gw.rss_kib();
    eprintln!(
        "attack: 50 missing and 30 existing exchanges; {} queues, at most {most_channels} channels; RSS {rss_before} -> {rss} KiB; honest ready after {ready_after:?}",
        objects.queues.len()
    );
    // Each exchange in use costs a queue and two channels (operations and consumer).
    assert!(objects.queues.len() <= 11, "{:?}", objects.queues);
    assert!(most_channels <= 2 * 20, "{most_channels} channels");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_subscriptions_cost_memory_by_their_traffic_not_their_capacity() {
    let broker = Broker::connect().await;
    let target = broker.exchange("idle-subscriptions").await;
    // Generous per-address limits: this attack is about what each subscription holds.
    let gw = ChildGateway::start(
        GATEWAY,
        &[
            "--address-subscription-burst=100000",
            "--max-bindings-per-address=100000",
            "--max-connections-per-address=100000",
            "--subscription-buffer=1024",
        ],
    )
    .await;
    // The cost is the slope from the 300th subscription to the 1,500th: what the process
    // allocates while warming up (worker stacks, first buffers) is not the attack's.
    let (warm, n) = (300, 1500);
    let mut held = Vec::new();
    let mut rss_before = 0;
    for c in 0..n {
        if c == warm {
            rss_before = gw.rss_kib();
        }
        let pattern = format!("idle.{c}");
        let (client, _, event) = attack_once(&gw, &[(&target, &pattern)]).await;
        assert!(matches!(&event, Some((k, _)) if k == "ready"), "{event:?}");
        held.push(client);
    }
    let rss = gw.rss_kib();
    let per_subscription = (rss.saturating_sub(rss_before)) as f64 / (n - warm) as f64;
    let ready_after = honest_client_is_served(&gw, &broker, &target).await;
    eprintln!(
        "attack: {n} idle subscriptions; RSS {rss_before} KiB at {warm} -> {rss} KiB ({per_subscription:.1} KiB each, connection included); honest ready after {ready_after:?}"
    );
    // A 1,024-slot buffer reserved up front cost ~80 KiB per subscription.
    assert!(
        per_subscription < 8.0,
        "{per_subscription:.1} KiB per subscription"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_subscriptions_do_not_flood_the_log() {
    let broker = Broker::connect().await;
    let target = broker.exchange("log-flood").await;
    let gw = ChildGateway::start(GATEWAY, &["--address-subscription-burst=20"]).await;
    let lines_before = gw.log_lines().len();
    let started = Instant::now();

    // Act: 200 connections with large binding sets (created, refused by the rate, and
    // released), and 100 asking for exchanges that do not exist.
    let long = "p".repeat(200);
    for c in 0..200 {
        let patterns: Vec<String> = (0..20).map(|i| format!("{long}.{c}.{i}")).collect();
        let set: Vec<(&str, &str)> = patterns
            .iter()
            .map(|p| (target.as_str(), p.as_str()))
            .collect();
        let _ = attack_once(&gw, &set).await;
    }
    for i in 0..100 {
        let missing = format!("exchange/test/{}/nothing-{i}", unique());
        let _ = attack_once(&gw, &[(&missing, "#")]).await;
    }
    let took = started.elapsed();
    let ready_after = honest_client_is_served(&gw, &broker, &target).await;

    let lines = gw.log_lines();
    let new = &lines[lines_before..];
    let bytes: usize = new.iter().map(String::len).sum();
    eprintln!(
        "attack: 300 hostile connections in {took:?} wrote {} log lines, {bytes} bytes; honest ready after {ready_after:?}",
        new.len()
    );
    // Each rate-limited site logs at most once a second (plus the line it starts with).
    let bound = 2 * (took.as_secs() as usize + 2) + 5;
    assert!(
        new.len() <= bound,
        "{} lines (bound {bound}):\n{}",
        new.len(),
        new.join("\n")
    );
    assert!(
        new.iter().all(|l| l.len() < 1024),
        "no line carries a whole binding set"
    );
    // And the refusals are logged (rate-limited, not silenced), each line with a count of
    // those left out: a gateway that logged nothing would pass the bound above.
    let logged: Vec<&String> = new
        .iter()
        .filter(|l| l.contains("subscription refused"))
        .collect();
    assert!(!logged.is_empty(), "no refusal logged:\n{}", new.join("\n"));
    assert!(
        logged.iter().all(|l| l.contains("suppressed=")),
        "each says how many were left out: {logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_is_not_exposed_by_default() {
    // Without a broker it listens on loopback only (127.0.0.1, not other addresses).
    let gw = ChildGateway::start(
        GATEWAY,
        &["--amqp-url=", "--demo=false", "--listen-address=127.0.0.1"],
    )
    .await;
    let rss_before = gw.rss_kib();
    let other = std::net::SocketAddr::new(IpAddr::from([127, 0, 0, 4]), gw.addr.port());
    assert!(
        tokio::net::TcpStream::connect(other).await.is_err(),
        "not reachable on another address"
    );
    // Told to listen beyond loopback without saying it means it: it refuses to start.
    let refused = std::process::Command::new(GATEWAY)
        .args(["--amqp-url=", "--listen-address=0.0.0.0", "--port=0"])
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("EMBEDDED_BROKER=true"));

    // A cross-site form post: refused (403 for its origin; 415 for its type even from
    // the gateway's own page); a preflight from another origin: not allowed.
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/events/v1/publish", gw.addr);
    let form_from = |origin: String| {
        http.post(&url)
            .header("origin", origin)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(r#"{"exchange":"exchange/a","routingKey":"k","payload":1}"#)
            .send()
    };
    let form = form_from("http://evil.example".to_owned())
        .await
        .expect("post");
    assert_eq!(form.status(), 403);
    assert!(form.headers().get("access-control-allow-origin").is_none());
    let own = form_from(format!("http://{}", gw.addr))
        .await
        .expect("post");
    assert_eq!(own.status(), 415);
    let preflight = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .expect("preflight");
    assert!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    let too_many_cc: Vec<String> = (0..65).map(|i| format!("route.{i}")).collect();
    let cc = http
        .post(&url)
        .json(&serde_json::json!({"exchange":"exchange/a","routingKey":"k","cc":too_many_cc,"payload":1}))
        .send()
        .await
        .expect("post");
    assert_eq!(cc.status(), 400);

    // An honest client on this machine is served.
    let mut client = gw
        .raw_from(IpAddr::from([127, 0, 0, 1]), &[("exchange/a", "#")])
        .await;
    let (_, event) = client.first_event(Duration::from_secs(5)).await;
    assert_eq!(event.map(|(k, _)| k).as_deref(), Some("ready"));
    let ok = http
        .post(&url)
        .json(&serde_json::json!({"exchange":"exchange/a","routingKey":"k","payload":{"ok":1}}))
        .send()
        .await
        .expect("post");
    assert_eq!(ok.status(), 200);
    client
        .read_until(b"{\"ok\":1}", Duration::from_secs(5))
        .await;
    eprintln!("embedded: RSS {rss_before} -> {} KiB", gw.rss_kib());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_holds_no_more_bytes_than_its_bound() {
    let broker = Broker::connect().await;
    let target = broker.exchange("queue-bytes").await;
    let proxy = crate::proxy::FaultProxy::start(amqp_addr()).await;
    let url = format!("--amqp-url={}", proxy.amqp_url(""));
    // A small prefetch: deliveries the broker has sent but the gateway has not
    // acknowledged are not counted by x-max-length-bytes (they are no longer ready).
    let gw = ChildGateway::start(GATEWAY, &[&url, "--queue-max-bytes=4MiB", "--prefetch=2"]).await;
    let mut client = gw.raw_from(honest(), &[(&target, "#")]).await;
    let (_, event) = client.first_event(Duration::from_secs(5)).await;
    assert_eq!(event.map(|(k, _)| k).as_deref(), Some("ready"));

    // Act: the gateway cannot take deliveries (its link stalls) while 20 MiB are published.
    proxy.stall();
    let pad = "x".repeat(512 * 1024);
    for n in 0..40 {
        broker
            .publish(
                &target,
                "k",
                &[],
                format!("{{\"n\":{n},\"pad\":\"{pad}\"}}").as_bytes(),
            )
            .await;
    }
    let listing = rabbitmqctl_output(&[
        "list_queues",
        "name",
        "message_bytes_ready",
        "arguments",
        "-q",
    ])
    .await;
    let line = listing
        .lines()
        .find(|l| l.starts_with(&gw.queue_prefix))
        .unwrap_or_else(|| panic!("the gateway's queue in {listing}"));
    let bytes: u64 = line
        .split('\t')
        .nth(1)
        .and_then(|b| b.trim().parse().ok())
        .expect("message_bytes_ready");
    eprintln!("attack: 20 MiB published to a stalled gateway; its queue holds {bytes} bytes ready");
    assert!(line.contains("x-max-length-bytes"), "{line}");
    assert!(bytes <= 4 * 1024 * 1024, "{bytes} bytes ready in the queue");
    proxy.restore();
    drop(gw);
}
