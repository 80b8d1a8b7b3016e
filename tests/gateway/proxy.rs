//! A TCP proxy inside the test process, between the gateway and RabbitMQ, that can cut,
//! stall or refuse the link on command, or close every connection that declares a queue
//! (as a broker that refuses the declaration with a connection error does), without
//! disturbing other tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use events_gateway_test_support::{TestGateway, amqp_addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Bytes flow.
    Pass,
    /// Connections stay open but no byte flows (a hung broker or network).
    Stall,
    /// Bytes flow from the broker but not to it (acknowledgements are held up).
    StallUpstream,
    /// New connections are closed at once (a broker that is down).
    Down,
    /// A connection is closed when its client sends `queue.declare` (RabbitMQ 4.3 closes
    /// the connection with 541 INTERNAL_ERROR for a declaration its settings deny).
    CloseOnDeclare,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Cancelling it closes every open connection; replaced after each cut.
    links: Arc<Mutex<CancellationToken>>,
    /// Local ports of the proxy's connections to the broker (the broker's "peer ports").
    upstream_ports: Arc<Mutex<Vec<u16>>>,
    /// Links relaying right now (client and broker both connected).
    open: Arc<AtomicUsize>,
    /// Connections closed on a `queue.declare` (in [`Mode::CloseOnDeclare`]).
    closed_on_declare: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on 127.0.0.1:<free port>.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, _) = watch::channel(Mode::Pass);
        let links = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let upstream_ports = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let closed_on_declare = Arc::new(AtomicUsize::new(0));
        let proxy = Self {
            addr,
            mode,
            links: links.clone(),
            upstream_ports: upstream_ports.clone(),
            open: open.clone(),
            closed_on_declare: closed_on_declare.clone(),
            stop: stop.clone(),
        };
        let mode_rx = proxy.mode.subscribe();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                if *mode_rx.borrow() == Mode::Down {
                    drop(client);
                    continue;
                }
                let link = links.lock().expect("lock").clone();
                tokio::spawn(relay(
                    client,
                    upstream,
                    mode_rx.clone(),
                    link,
                    upstream_ports.clone(),
                    (open.clone(), closed_on_declare.clone()),
                ));
            }
        });
        proxy
    }

    /// An AMQP URL through this proxy (`query` like `heartbeat=2`, may be empty).
    pub fn amqp_url(&self, query: &str) -> String {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("amqp://guest:guest@{}/%2f{q}", self.addr)
    }

    /// Local ports of every connection the proxy opened to the broker.
    pub fn upstream_ports(&self) -> Vec<u16> {
        self.upstream_ports.lock().expect("lock").clone()
    }

    /// Closes every open connection (the gateway sees its connection drop). Returns how
    /// many were open, so that a test can assert that its cut really cut something.
    pub fn cut(&self) -> usize {
        let mut links = self.links.lock().expect("lock");
        let open = self.open.load(Ordering::Acquire);
        links.cancel();
        *links = CancellationToken::new();
        open
    }

    /// Cuts and refuses new connections until [`FaultProxy::restore`].
    pub fn down(&self) {
        self.mode.send_replace(Mode::Down);
        self.cut();
    }

    /// Refuses new connections until [`FaultProxy::restore`]; open ones stay.
    pub fn refuse_new(&self) {
        self.mode.send_replace(Mode::Down);
    }

    /// Keeps connections open but lets no byte through.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Lets bytes flow from the broker only.
    pub fn stall_upstream(&self) {
        self.mode.send_replace(Mode::StallUpstream);
    }

    /// Closes every connection that sends `queue.declare`, until [`FaultProxy::restore`].
    pub fn close_on_declare(&self) {
        self.mode.send_replace(Mode::CloseOnDeclare);
    }

    /// Connections closed on a `queue.declare` so far.
    pub fn closed_on_declare(&self) -> usize {
        self.closed_on_declare.load(Ordering::Acquire)
    }

    /// Lets bytes and connections through again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Pass);
    }
}

/// A gateway whose broker link goes through a fault proxy in front of the test broker
/// (`query`: AMQP URL parameters such as `heartbeat=2`, may be empty).
pub async fn start_proxied(query: &str, extra: &[&str]) -> (FaultProxy, TestGateway) {
    let proxy = FaultProxy::start(amqp_addr()).await;
    let url = format!("--amqp-url={}", proxy.amqp_url(query));
    let mut args = vec![url.as_str()];
    args.extend_from_slice(extra);
    let gw = TestGateway::start(&args).await;
    (proxy, gw)
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = self.cut();
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    link: CancellationToken,
    ports: Arc<Mutex<Vec<u16>>>,
    (open, closed_on_declare): (Arc<AtomicUsize>, Arc<AtomicUsize>),
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    open.fetch_add(1, Ordering::AcqRel);
    let _open = Decrement(open);
    if let Ok(local) = server.local_addr() {
        ports.lock().expect("lock").push(local.port());
    }
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Biased, cancellation first: after a cut, bytes held back by a stall must never be
    // forwarded, even when the stall is lifted before this task runs again (a cut followed
    // at once by a restore would otherwise let held acknowledgements reach the broker).
    tokio::select! {
        biased;
        () = link.cancelled() => {}
        end = pump(cr, sw, mode.clone(), true) => {
            if let Ok(Ended::OnDeclare) = end {
                closed_on_declare.fetch_add(1, Ordering::AcqRel);
            }
        }
        _ = pump(sr, cw, mode, false) => {}
    }
}

/// How a pump ended without an I/O error.
enum Ended {
    /// Its side closed.
    Closed,
    /// It saw a `queue.declare` in [`Mode::CloseOnDeclare`] (and did not forward it).
    OnDeclare,
}

/// Finds AMQP 0-9-1 method frames in the client's bytes: the protocol header (8 bytes),
/// then frames of type (1), channel (2), size (4), payload (size) and 0xCE; a method
/// frame's payload starts with its class and method ids.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    header_seen: bool,
}

impl Frames {
    /// Adds `bytes`; whether a complete `queue.declare` (class 50, method 10) is among them.
    fn declares(&mut self, bytes: &[u8]) -> bool {
        self.buf.extend_from_slice(bytes);
        if !self.header_seen {
            if self.buf.len() < 8 {
                return false;
            }
            self.buf.drain(..8);
            self.header_seen = true;
        }
        let mut found = false;
        while self.buf.len() >= 7 {
            let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]]);
            let total = 7 + size as usize + 1;
            if self.buf.len() < total {
                break;
            }
            if self.buf[0] == 1 && size >= 4 && self.buf[7..11] == [0, 50, 0, 10] {
                found = true;
            }
            self.buf.drain(..total);
        }
        found
    }
}

/// Counts a link as closed when its relay ends, however it ends.
struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    upstream: bool,
) -> std::io::Result<Ended> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut frames = Frames::default();
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(Ended::Closed);
        }
        if upstream && frames.declares(&buf[..n]) && *mode.borrow() == Mode::CloseOnDeclare {
            return Ok(Ended::OnDeclare);
        }
        while matches!(
            (*mode.borrow_and_update(), upstream),
            (Mode::Stall, _) | (Mode::StallUpstream, true)
        ) {
            if mode.changed().await.is_err() {
                return Ok(Ended::Closed);
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}
