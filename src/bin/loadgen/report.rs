//! The measurements of one run, printed for people and, with `--json`, as one JSON object.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::Args;
use crate::client::Clients;
use crate::gateway::Sample;
use crate::publisher::Published;

#[derive(Default)]
pub struct Report {
    pub fields: serde_json::Map<String, Value>,
    pub broker: Option<(usize, usize, usize)>,
}

fn percentiles(values: impl Iterator<Item = u64>) -> Option<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3).ok()?;
    for v in values {
        let _ = h.record(v.max(1));
    }
    (!h.is_empty()).then_some(h)
}

impl Report {
    pub fn new(args: &Args) -> Self {
        let mut r = Self::default();
        r.set("scenario", json!(args.scenario));
        r.set("clients", json!(args.clients));
        r.set("stuck_clients", json!(args.stuck));
        r.set("resume", json!(args.resume));
        r.set("websocket", json!(args.websocket));
        if args.scenario == "treeherder" {
            r.set("patterns", json!(args.patterns));
        }
        match args.burst {
            Some(n) => r.set("burst", json!(n)),
            None => {
                r.set("rate_per_s", json!(args.rate));
                r.set("duration_s", json!(args.duration.as_secs_f64()));
            }
        }
        r
    }

    fn set(&mut self, key: &str, value: Value) {
        self.fields.insert(key.to_owned(), value);
    }

    pub fn ramp(&mut self, took: Duration, clients: &Clients) {
        self.set("clients_ready", json!(clients.ready()));
        self.set("clients_failed", json!(clients.failed));
        self.set("ramp_s", json!(round(took.as_secs_f64(), 3)));
        self.set(
            "ramp_clients_per_s",
            json!(round(
                clients.ready() as f64 / took.as_secs_f64().max(1e-9),
                0
            )),
        );
        let ready = percentiles(
            clients
                .clients
                .iter()
                .map(|c| c.ready_after.as_micros() as u64),
        );
        if let Some(h) = ready {
            self.set("ready_p50_ms", json!(ms(h.value_at_quantile(0.5))));
            self.set("ready_p99_ms", json!(ms(h.value_at_quantile(0.99))));
            self.set("ready_max_ms", json!(ms(h.max())));
        }
    }

    pub fn idle(&mut self, baseline: &Sample, idle: &Sample, ready: usize) {
        self.set("rss_baseline_mib", json!(mib(baseline.rss_bytes)));
        self.set("rss_idle_mib", json!(mib(idle.rss_bytes)));
        let per = idle.rss_bytes.saturating_sub(baseline.rss_bytes) as f64 / ready.max(1) as f64;
        self.set("rss_per_connection_kib", json!(round(per / 1024.0, 2)));
    }

    pub fn traffic(
        &mut self,
        published: &Published,
        clients: &Clients,
        before: &Sample,
        after: &Sample,
    ) {
        let (expected, received, unique, dups, dropped, latencies) = clients.totals(published);
        let seconds = published.elapsed.as_secs_f64().max(1e-9);
        self.set("published", json!(published.total));
        self.set("publish_s", json!(round(seconds, 3)));
        self.set("deliveries_expected", json!(expected));
        self.set("deliveries_received", json!(received));
        self.set("lost", json!(expected.saturating_sub(unique)));
        self.set("duplicates", json!(dups));
        self.set("dropped_by_gateway", json!(dropped));
        let window = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
        self.set(
            "deliveries_per_s",
            json!(round(received as f64 / window, 0)),
        );
        if let Some(h) = percentiles(latencies.iter().map(|v| u64::from(*v))) {
            self.set("latency_p50_ms", json!(ms(h.value_at_quantile(0.5))));
            self.set("latency_p99_ms", json!(ms(h.value_at_quantile(0.99))));
            self.set("latency_p999_ms", json!(ms(h.value_at_quantile(0.999))));
            self.set("latency_max_ms", json!(ms(h.max())));
        }
        let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64();
        self.set("gateway_cpu_s", json!(round(cpu, 2)));
        self.set("gateway_cpu_percent", json!(round(100.0 * cpu / window, 1)));
        self.set(
            "cpu_per_delivery_us",
            json!(round(cpu * 1e6 / received.max(1) as f64, 3)),
        );
        self.set("rss_loaded_mib", json!(mib(after.rss_bytes)));
    }

    pub fn after_leave(&mut self, sample: &Sample, open: Option<f64>, subscriptions: Option<f64>) {
        self.set("rss_after_leave_mib", json!(mib(sample.rss_bytes)));
        self.set("connections_open_after_leave", json!(open));
        self.set("subscriptions_after_leave", json!(subscriptions));
    }

    /// The gateway's own fan-out latency over the traffic phase (from its histogram,
    /// interpolated within buckets): what part of publish→receipt the gateway spends.
    pub fn gateway_latency(&mut self, before: &[(f64, f64)], after: &[(f64, f64)]) {
        let delta: Vec<(f64, f64)> = after
            .iter()
            .map(|(le, n)| {
                let was = before
                    .iter()
                    .find(|(b, _)| b == le)
                    .map_or(0.0, |(_, n)| *n);
                (*le, n - was)
            })
            .collect();
        for (name, q) in [
            ("gateway_fanout_p50_ms", 0.5),
            ("gateway_fanout_p99_ms", 0.99),
        ] {
            if let Some(v) = quantile(&delta, q) {
                self.set(name, json!((v * 1e3 * 100.0).round() / 100.0));
            }
        }
    }

    pub fn print(mut self, args: &Args) {
        if let Some((q, b, c)) = self.broker {
            self.set("broker_queues", json!(q));
            self.set("broker_bindings", json!(b));
            self.set("broker_consumers", json!(c));
        }
        let width = self.fields.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in &self.fields {
            println!("{k:width$}  {v}");
        }
        if args.json {
            println!("{}", Value::Object(self.fields));
        }
    }
}

fn ms(us: u64) -> f64 {
    round(us as f64 / 1000.0, 3)
}

fn mib(bytes: u64) -> f64 {
    round(bytes as f64 / (1024.0 * 1024.0), 2)
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// The `q` quantile of cumulative buckets, interpolated linearly within its bucket (as
/// Prometheus's histogram_quantile does).
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}
