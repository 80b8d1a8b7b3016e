//! The gateway under test: started as a child process with a unique queue prefix, measured
//! through /proc (CPU time of all its threads, resident memory), stopped with SIGTERM.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::Args;
use crate::scenario::Scenario;

/// CPU time and memory of the gateway at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub cpu: Duration,
    pub rss_bytes: u64,
    pub at: std::time::Instant,
}

pub struct Gateway {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    queue_prefix: String,
}

impl Gateway {
    pub async fn spawn(args: &Args, _scenario: &Scenario) -> anyhow::Result<Self> {
        let bin = match &args.gateway_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("no directory for the gateway binary")?
                .join("events-gateway"),
        };
        let queue_prefix = format!("queue/guest/loadgen-{:08x}", fastrand::u32(..));
        let addr: SocketAddr = ([127, 0, 0, 1], args.port).into();
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen-address=127.0.0.1")
            .arg(format!("--port={}", args.port))
            .arg(format!("--amqp-url={}", args.amqp_url))
            .arg(format!("--queue-prefix={queue_prefix}"))
            .arg(format!("--max-connections={}", args.clients + 100))
            .arg("--log-level=warn")
            .args(&args.gateway_args)
            // The load comes from a few loopback addresses: lift the per-address limits
            // (through the environment, which a gateway without these settings ignores,
            // so that older binaries run with the same command).
            .env("MAX_CONNECTIONS_PER_ADDRESS", "1000000")
            .env("ADDRESS_SUBSCRIPTION_BURST", "1000000")
            .env("MAX_BINDINGS_PER_ADDRESS", "100000000")
            .env("MAX_EXCHANGES_PER_ADDRESS", "100000")
            .env("MAX_PENDING_PER_ADDRESS", "1000000")
            .env("MAX_PENDING_CONNECTIONS", "1000000")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {} (build it with cargo build --release)",
                bin.display()
            )
        })?;
        let pid = child.id().context("gateway exited at once")?;
        let gateway = Self {
            child,
            pid,
            addr,
            queue_prefix,
        };
        for _ in 0..200 {
            if gateway.heartbeat().await.unwrap_or(false) {
                return Ok(gateway);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the gateway did not become healthy on {addr}")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn heartbeat(&self) -> anyhow::Result<bool> {
        let mut s = tokio::net::TcpStream::connect(self.addr).await?;
        s.write_all(b"GET /__heartbeat__ HTTP/1.0\r\n\r\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok(buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200"))
    }

    /// The value of one series of the gateway's /metrics.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let mut s = tokio::net::TcpStream::connect(self.addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
            .context("no such series")
    }

    /// The cumulative buckets of histogram `name`: (upper bound, observations up to it).
    pub async fn histogram(&self, name: &str) -> anyhow::Result<Vec<(f64, f64)>> {
        let mut s = tokio::net::TcpStream::connect(self.addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        let prefix = format!("{name}_bucket{{le=\"");
        Ok(text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, value) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, value.trim().parse().ok()?))
            })
            .collect())
    }

    /// CPU time (user + system, all threads) and resident memory, from /proc.
    pub fn sample(&self) -> anyhow::Result<Sample> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // Fields after the command name (which may contain spaces) start at ") ".
        let after = stat.rsplit_once(") ").context("odd /proc stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: u64 = fields.get(11).context("utime")?.parse()?;
        let stime: u64 = fields.get(12).context("stime")?.parse()?;
        let ticks = clock_ticks();
        let cpu = Duration::from_secs_f64((utime + stime) as f64 / ticks as f64);
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("VmRSS")?
            .parse()?;
        Ok(Sample {
            cpu,
            rss_bytes: rss_kib * 1024,
            at: std::time::Instant::now(),
        })
    }

    /// (queues, bindings, consumers) of this gateway on the broker, from rabbitmqctl.
    pub async fn broker_objects(&self) -> anyhow::Result<(usize, usize, usize)> {
        let queues = rabbitmqctl(&["list_queues", "name", "consumers"]).await?;
        let bindings = rabbitmqctl(&["list_bindings", "source_name", "destination_name"]).await?;
        let mine = |name: &serde_json::Value| {
            name.as_str()
                .is_some_and(|n| n.starts_with(&self.queue_prefix))
        };
        let q = queues.iter().filter(|q| mine(&q["name"])).count();
        let c = queues
            .iter()
            .filter(|q| mine(&q["name"]))
            .map(|q| q["consumers"].as_u64().unwrap_or(0) as usize)
            .sum();
        let b = bindings
            .iter()
            .filter(|b| mine(&b["destination_name"]) && b["source_name"] != "")
            .count();
        Ok((q, b, c))
    }

    /// SIGTERM, then wait (the gateway drains and deletes its queues).
    pub async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .args(["-q", "--formatter", "json"])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "rabbitmqctl {args:?} failed");
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Clock ticks per second for /proc times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}
