//! SSE clients over raw TCP (HTTP/1.0, so the body is the plain event stream): cheap
//! enough that one process can hold tens of thousands of them.
//!
//! Each client records what it received: which sequence numbers (to count lost and
//! duplicated messages), the publish→receipt latency of each (from the payload's `ts`),
//! and what the gateway said it dropped (the slow-client comment).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

use crate::Args;
use crate::publisher::Published;
use crate::scenario::Scenario;

/// What one client saw.
#[derive(Default)]
pub struct Seen {
    /// Bit per sequence number received.
    pub seqs: Vec<u64>,
    pub received: u64,
    pub duplicates: u64,
    /// Publish→receipt latencies, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Messages the gateway said it dropped for this client.
    pub dropped_by_gateway: u64,
}

impl Seen {
    pub(crate) fn record(&mut self, seq: u64, ts_ns: u64, now_ns: u64) {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seqs.len() <= word {
            self.seqs.resize(word + 1, 0);
        }
        if self.seqs[word] & (1 << bit) != 0 {
            self.duplicates += 1;
        } else {
            self.seqs[word] |= 1 << bit;
        }
        self.received += 1;
        let latency = now_ns.saturating_sub(ts_ns) / 1000;
        self.latencies_us.push(latency.min(u32::MAX as u64) as u32);
    }

    fn unique(&self) -> u64 {
        self.seqs.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

pub struct Client {
    pub pattern: usize,
    pub ready_after: Duration,
    pub seen: Arc<Mutex<Seen>>,
    pub(crate) task: JoinHandle<()>,
}

/// Every client, connected and ready.
pub struct Clients {
    pub clients: Vec<Client>,
    pub failed: usize,
    received: Arc<AtomicU64>,
}

/// Connects `args.clients` clients, `args.connect_concurrency` at a time, each waiting for
/// its `ready`.
pub async fn connect_all(
    args: &Args,
    scenario: &Scenario,
    gateway: SocketAddr,
) -> anyhow::Result<Clients> {
    let received = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(args.clients);
    let mut failed = 0;
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    while next < args.clients || !pending.is_empty() {
        while next < args.clients && pending.len() < args.connect_concurrency {
            let source = source_address(next, args.clients_per_source);
            let pattern = scenario.client_pattern[next];
            let received = received.clone();
            if args.websocket {
                let subscribe = scenario.subscribe_frame(next);
                pending.push(tokio::spawn(async move {
                    crate::websocket::connect(gateway, source, subscribe, pattern, received).await
                }));
            } else {
                let query = scenario.query(next);
                pending.push(tokio::spawn(async move {
                    connect(gateway, source, &query, pattern, received).await
                }));
            }
            next += 1;
        }
        match pending.next().await {
            Some(Ok(Ok(client))) => clients.push(client),
            Some(Ok(Err(err))) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("client failed: {err:#}");
                }
            }
            Some(Err(_)) => failed += 1,
            None => {}
        }
    }
    Ok(Clients {
        clients,
        failed,
        received,
    })
}

/// Connects `args.stuck` clients on the first client's pattern that, once `ready`, read
/// nothing more (a 4 KiB receive buffer fills at once). Dropping them closes them.
pub async fn connect_stuck(
    args: &Args,
    scenario: &Scenario,
    gateway: SocketAddr,
) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    let mut stuck = Vec::with_capacity(args.stuck);
    for i in 0..args.stuck {
        let socket = TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        socket.bind(SocketAddr::new(
            source_address(args.clients + i, args.clients_per_source),
            0,
        ))?;
        let mut stream = socket.connect(gateway).await?;
        let query = scenario.query(0);
        let request =
            format!("GET /api/events/v1/connect/?{query} HTTP/1.0\r\nHost: gateway\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !contains(&buf, b"event: ready\n") {
            let n =
                tokio::time::timeout(Duration::from_secs(60), stream.read(&mut chunk)).await??;
            anyhow::ensure!(n > 0, "a stuck client was closed before ready");
            buf.extend_from_slice(&chunk[..n]);
        }
        stuck.push(stream);
    }
    Ok(stuck)
}

/// Source addresses: `per_source` clients on each, starting at a random 127.x.y.1 per run
/// (one address has about 28k ephemeral ports towards one destination, and the sockets a
/// previous run left in TIME_WAIT keep theirs busy for a minute).
pub(crate) fn source_address(i: usize, per_source: usize) -> IpAddr {
    static BASE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        u32::from(Ipv4Addr::new(
            127,
            fastrand::u8(1..255),
            fastrand::u8(..),
            1,
        ))
    });
    let n = (i / per_source.max(1)) as u32;
    IpAddr::V4(Ipv4Addr::from(base + n))
}

async fn connect(
    gateway: SocketAddr,
    source: IpAddr,
    query: &str,
    pattern: usize,
    received: Arc<AtomicU64>,
) -> anyhow::Result<Client> {
    let started = Instant::now();
    let mut stream = dial(gateway, source).await?;
    let request = format!("GET /api/events/v1/connect/?{query} HTTP/1.0\r\nHost: gateway\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let ready_at = loop {
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut chunk)).await??;
        anyhow::ensure!(
            n > 0,
            "closed before ready: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = find(&buf, b"event: ready\n") {
            break at;
        }
        anyhow::ensure!(
            !contains(&buf, b"event: error"),
            "error: {}",
            String::from_utf8_lossy(&buf)
        );
    };
    let ready_after = started.elapsed();
    let rest = buf.split_off(ready_at);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let task = tokio::spawn(read_events(stream, rest, seen.clone(), received));
    Ok(Client {
        pattern,
        ready_after,
        seen,
        task,
    })
}

/// A client's TCP connection to the gateway from `source`, small writes sent at once.
pub(crate) async fn dial(
    gateway: SocketAddr,
    source: IpAddr,
) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(gateway).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads frames until the connection closes, recording every `message`.
async fn read_events(
    mut stream: tokio::net::TcpStream,
    mut pending: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
    received: Arc<AtomicU64>,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut consumed = 0;
        let mut count = 0;
        {
            let now_ns = now_ns();
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(end) = find(&pending[consumed..], b"\n\n") {
                let frame = &pending[consumed..consumed + end];
                if frame.starts_with(b"event: message") {
                    if let (Some(seq), Some(ts)) = (
                        number_after(frame, b"\"seq\":"),
                        number_after(frame, b"\"ts\":"),
                    ) {
                        seen.record(seq, ts, now_ns);
                        count += 1;
                    }
                } else if frame.starts_with(b": ")
                    && let Some(n) = number_after(frame, b": ")
                {
                    seen.dropped_by_gateway += n;
                }
                consumed += end + 2;
            }
        }
        received.fetch_add(count, Ordering::Relaxed);
        pending.drain(..consumed);
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

impl Clients {
    pub fn ready(&self) -> usize {
        self.clients.len()
    }

    /// Waits until every expected delivery arrived, or nothing arrived for `quiet`.
    pub async fn settle(&self, published: &Published, quiet: Duration) {
        let expected: u64 = self
            .clients
            .iter()
            .map(|c| published.per_pattern[c.pattern])
            .sum();
        let mut last = self.received.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        loop {
            let now = self.received.load(Ordering::Relaxed);
            if now >= expected || last_change.elapsed() > quiet {
                return;
            }
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Totals over every client: (expected, received, unique, duplicates, dropped by the
    /// gateway), and every latency.
    pub fn totals(&self, published: &Published) -> (u64, u64, u64, u64, u64, Vec<u32>) {
        let (mut expected, mut received, mut unique, mut dups, mut dropped) = (0, 0, 0, 0, 0);
        let mut latencies = Vec::new();
        for c in &self.clients {
            expected += published.per_pattern[c.pattern];
            let seen = c.seen.lock().unwrap_or_else(|e| e.into_inner());
            received += seen.received;
            unique += seen.unique();
            dups += seen.duplicates;
            dropped += seen.dropped_by_gateway;
            latencies.extend_from_slice(&seen.latencies_us);
        }
        (expected, received, unique, dups, dropped, latencies)
    }

    pub fn close(self) {
        for c in self.clients {
            c.task.abort();
        }
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// The decimal number right after `key` in `frame`.
pub(crate) fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(frame, key)? + key.len();
    let digits = frame[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[start..start + digits])
        .ok()?
        .parse()
        .ok()
}
