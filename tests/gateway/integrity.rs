//! Stream integrity on real sockets: a slow reader the way a browser on a bad network
//! reads (a 4 KiB receive buffer, 536-byte segments, 2 KiB every 2 ms) in the same writer
//! shard as 100 fast clients, while 1,500 messages of 4 KB go by at 500 a second. Its
//! stream must obey the stream rule (each message once and in order, or one notice that
//! covers exactly what it skipped); the fast clients must get every message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use events_gateway_test_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAST_CLIENTS: usize = 100;
const MESSAGES: u64 = 1500;
const EXCHANGE: &str = "exchange/integrity";
/// How long a reader may take to see the last message.
const READ_DEADLINE: Duration = Duration::from_secs(90);
/// How far the publisher may run ahead of the slowest fast client: half the log, so that
/// on a busy machine only the slow reader can fall out of it.
const FAST_SLACK: u64 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_beside_fast_ones_gets_each_message_once_or_a_notice_plain() {
    slow_reader_beside_fast_clients(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_beside_fast_ones_gets_each_message_once_or_a_gap_resumable() {
    slow_reader_beside_fast_clients(true).await;
}

async fn slow_reader_beside_fast_clients(resumable: bool) {
    // Arrange: a log of 512 frames (2 MB of these messages), so that the slow reader,
    // at about 1 MB/s against 2 MB/s published, falls out of it and hears a notice.
    let gw = TestGateway::start_embedded(&["--subscription-buffer=512"]).await;
    let mut path = format!(
        "/api/events/v1/connect/?{}",
        bindings_query(&[(EXCHANGE, "#")])
    );
    if resumable {
        path.push_str("&resume=1");
    }
    let mut fast = Vec::new();
    for _ in 0..FAST_CLIENTS {
        let mut client = RawClient::get(gw.addr, &path, &[]).await;
        client
            .read_until(b"event: ready\n", Duration::from_secs(5))
            .await;
        fast.push(client);
    }
    let slow = SlowClient::connect(gw.addr, &path).await;
    let progress: Vec<Arc<AtomicU64>> = (0..FAST_CLIENTS).map(|_| Arc::default()).collect();
    let fast: Vec<_> = fast
        .into_iter()
        .zip(&progress)
        .map(|(c, at)| tokio::spawn(read_fast(c, resumable, at.clone())))
        .collect();
    let slow = tokio::spawn(slow.read(resumable));

    // Act: 1,500 messages of about 4 KB, 500 a second, never more than FAST_SLACK ahead
    // of the slowest fast client.
    let pad = "x".repeat(4000);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slowest = || progress.iter().map(|p| p.load(Ordering::Relaxed)).min();
    let started = std::time::Instant::now();
    for n in 0..MESSAGES {
        tick.tick().await;
        let deadline = tokio::time::Instant::now() + READ_DEADLINE;
        while slowest().unwrap_or(n) + FAST_SLACK < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fast clients stopped at {:?}",
                slowest()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let payload = serde_json::json!({"n": n, "pad": pad});
        assert_eq!(gw.publish_embedded(EXCHANGE, "k", &payload), 1);
    }
    let rate = MESSAGES as f64 / started.elapsed().as_secs_f64();

    // Assert: the fast clients got everything; the slow one obeys the rule.
    for (i, task) in fast.into_iter().enumerate() {
        let rule = task.await.expect("fast reader");
        assert!(
            rule.violations.is_empty(),
            "fast client {i}: {:?}",
            rule.violations
        );
        assert_eq!(
            (rule.received, rule.missed),
            (MESSAGES, 0),
            "fast client {i} got every message"
        );
    }
    let rule = slow.await.expect("slow reader");
    eprintln!(
        "slow reader ({}, {rate:.0} messages/s): {} received, {} reported dropped in {} notices",
        if resumable { "resumable" } else { "plain" },
        rule.received,
        rule.missed,
        rule.notices
    );
    assert!(
        rule.violations.is_empty(),
        "slow client: {:?}",
        rule.violations
    );
    assert_eq!(rule.received + rule.missed, MESSAGES);
    assert_eq!(
        gw.metric("events_gateway_messages_dropped_total{reason=\"slow_client\"}")
            .await,
        rule.missed as f64,
        "what the slow client was told it lost is what the gateway counts"
    );
    gw.shutdown().await;
}

/// Reads a fast client's stream (HTTP/1.0, raw SSE after the head) to the last message,
/// showing in `at` how far it got.
async fn read_fast(mut client: RawClient, resumable: bool, at: Arc<AtomicU64>) -> StreamRule {
    let mut rule = StreamRule::new(0, resumable);
    let (_, body) = client.head_and_body();
    rule.feed(body);
    at.store(rule.next, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + READ_DEADLINE;
    let mut buf = vec![0u8; 64 * 1024];
    while rule.next < MESSAGES {
        let n = tokio::time::timeout_at(deadline, client.stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("a fast client stopped at {}", rule.next))
            .expect("read");
        assert!(n > 0, "a fast client's stream ended at {}", rule.next);
        rule.feed(&buf[..n]);
        at.store(rule.next, Ordering::Relaxed);
    }
    rule
}

/// A client on a bad network: a 4 KiB receive buffer, 536-byte segments, HTTP/1.1
/// (chunked), reading 2 KiB every 2 ms.
struct SlowClient {
    stream: TcpStream,
    /// Body bytes read with the head.
    early: Vec<u8>,
}

impl SlowClient {
    async fn connect(addr: SocketAddr, path: &str) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket2::SockRef::from(&socket)
            .set_tcp_mss(536)
            .expect("TCP_MAXSEG");
        let mut stream = socket.connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        while find(&head, b"\r\n\r\n").is_none() {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the head within 5 s")
                .expect("read");
            assert!(n > 0, "closed before the head");
            head.extend_from_slice(&buf[..n]);
        }
        let at = find(&head, b"\r\n\r\n").unwrap_or_default() + 4;
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
        Self {
            stream,
            early: head.split_off(at),
        }
    }

    async fn read(mut self, resumable: bool) -> StreamRule {
        let mut rule = StreamRule::new(0, resumable);
        let mut chunks = Dechunk::default();
        rule.feed(&chunks.feed(&self.early));
        let deadline = tokio::time::Instant::now() + READ_DEADLINE;
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut buf = [0u8; 2048];
        while rule.next < MESSAGES {
            tick.tick().await;
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("the slow client stopped at {}", rule.next))
                .expect("read");
            assert!(n > 0, "the slow client's stream ended at {}", rule.next);
            rule.feed(&chunks.feed(&buf[..n]));
        }
        rule
    }
}
