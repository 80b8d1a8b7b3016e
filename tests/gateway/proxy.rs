//! A TCP proxy inside the test process, between the gateway and RabbitMQ, that can cut,
//! stall or refuse the link on command, without disturbing other tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
        let proxy = Self {
            addr,
            mode,
            links: links.clone(),
            upstream_ports: upstream_ports.clone(),
            open: open.clone(),
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
                    open.clone(),
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

    /// Lets bytes and connections through again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Pass);
    }
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
    open: Arc<AtomicUsize>,
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
        _ = pump(cr, sw, mode.clone(), true) => {}
        _ = pump(sr, cw, mode, false) => {}
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
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        while matches!(
            (*mode.borrow_and_update(), upstream),
            (Mode::Stall, _) | (Mode::StallUpstream, true)
        ) {
            if mode.changed().await.is_err() {
                return Ok(());
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}
