//! Heap bytes an idle stream holds in the gateway, counted by the allocator itself: the
//! gateway runs in this process on jemalloc (as the binary does), wrapped by `cap`, which
//! counts every byte requested; 5,000 clients connect (blocking std sockets on a thread of
//! their own, so they allocate nothing on the heap) and wait for `ready`. Printed: bytes
//! per connection, and the sizes of the per-connection parts (what BENCHMARKS.md's budget
//! table lists). Run with `cargo bench --bench connection_memory`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cap::Cap;
use events_gateway::Config;

#[global_allocator]
static ALLOCATOR: Cap<tikv_jemallocator::Jemalloc> =
    Cap::new(tikv_jemallocator::Jemalloc, usize::MAX);

const CLIENTS: usize = 5_000;
const QUERY: &str = "bindings=%7B%22bindings%22%3A%5B%7B%22exchange%22%3A%22exchange%2Fbench%22%2C%22routingKeyPattern%22%3A%22%23%22%7D%5D%7D";

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let running = rt.block_on(async {
        let config = Config::parse_from([
            "events-gateway",
            "--port=0",
            "--amqp-url=",
            "--demo=false",
            "--log-level=error",
            "--max-connections-per-address=100000",
            "--max-bindings-per-address=100000",
        ])
        .expect("config");
        events_gateway::start(config).await.expect("gateway")
    });
    let addr = running.local_addr();
    // Warm up: the first subscription, the first shard, the runtime's buffers.
    let mut sockets: Vec<TcpStream> = Vec::with_capacity(CLIENTS + 1);
    sockets.push(connect(addr));
    std::thread::sleep(Duration::from_millis(500));
    let before = ALLOCATOR.allocated();
    for _ in 0..CLIENTS {
        sockets.push(connect(addr));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = ALLOCATOR.allocated();
    let per = (after - before) as f64 / CLIENTS as f64;
    println!(
        "idle streams: {CLIENTS}; heap requested by the gateway: {} bytes, {per:.0} bytes per connection",
        after - before
    );
    println!(
        "per-connection parts (size_of): Conn {} B in its shard's Vec; lease (membership + admission slot) {} B, boxed",
        std::mem::size_of::<events_gateway::internals::Conn>(),
        std::mem::size_of::<(
            events_gateway::internals::Member,
            events_gateway::internals::Slot
        )>(),
    );
    drop(sockets);
    rt.block_on(running.shutdown());
}

/// A client over a blocking socket: the request, then read until `ready`.
fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET /api/events/v1/connect/?{QUERY} HTTP/1.0\r\n\r\n").expect("request");
    let mut buf = [0u8; 2048];
    let mut seen = 0;
    loop {
        let n = s.read(&mut buf[seen..]).expect("read");
        assert!(n > 0, "closed before ready");
        seen += n;
        if buf[..seen].windows(13).any(|w| w == b"event: ready\n") {
            return s;
        }
        assert!(seen < buf.len(), "no ready in the first 2 KiB");
    }
}
