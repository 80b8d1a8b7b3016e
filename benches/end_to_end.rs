//! End to end in one process: the embedded broker publishes one message and the bench
//! waits until every one of N SSE clients (raw TCP over loopback) has read its frame. This
//! is the whole delivery path: routing, encoding once, the subscription's log, its writer
//! shards, the socket writes and the loopback reads. Time per message / N is the per-delivery
//! cost; with 1000 clients it is what a dashboard fleet costs per event.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use events_gateway::Broker;
use events_gateway::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

const QUERY: &str = "bindings=%7B%22bindings%22%3A%5B%7B%22exchange%22%3A%22exchange%2Fbench%22%2C%22routingKeyPattern%22%3A%22%23%22%7D%5D%7D";
const FRAME_END: &[u8] = b"id: -\n\n";

/// Reads frames, counting each complete one into `count`.
async fn client(addr: std::net::SocketAddr, count: Arc<AtomicUsize>, notify: Arc<Notify>) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let req = format!("GET /api/events/v1/connect/?{QUERY} HTTP/1.0\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let frames = carry
            .windows(FRAME_END.len())
            .filter(|w| *w == FRAME_END)
            .count();
        if frames > 0 {
            let last = carry.len() - FRAME_END.len() + 1;
            let keep = carry[last..].to_vec();
            carry = keep;
            count.fetch_add(frames, Ordering::Relaxed);
            notify.notify_one();
        }
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("end_to_end_loopback");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    for n in [100usize, 1_000] {
        let (running, count, notify) = rt.block_on(async {
            let config = Config::parse_from([
                "events-gateway",
                "--listen-address=127.0.0.1",
                "--port=0",
                "--amqp-url=",
                "--demo=false",
                "--write-coalesce=0ms",
                "--log-level=error",
            ])
            .expect("config");
            let running = events_gateway::start(config).await.expect("gateway");
            let count = Arc::new(AtomicUsize::new(0));
            let notify = Arc::new(Notify::new());
            for _ in 0..n {
                tokio::spawn(client(running.local_addr(), count.clone(), notify.clone()));
            }
            // Every client has its `ready` frame.
            while count.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (running, count, notify)
        });
        let Broker::Memory(broker) = running.broker().clone() else {
            panic!("embedded broker expected");
        };
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.to_async(&rt).iter_custom(|iters| {
                let broker = broker.clone();
                let count = count.clone();
                let notify = notify.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let target = count.load(Ordering::Relaxed) + n;
                        broker.publish("exchange/bench", "k", &[], br#"{"n":1}"#);
                        while count.load(Ordering::Relaxed) < target {
                            notify.notified().await;
                        }
                    }
                    start.elapsed()
                }
            })
        });
        rt.block_on(running.shutdown());
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
