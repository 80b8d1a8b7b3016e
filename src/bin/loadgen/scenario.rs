//! Who binds to what, and where each message goes.
//!
//! - `same`: one exchange, every client on the binding `#`: the widest fan-out.
//! - `treeherder`: the 7 `exchange/taskcluster-queue/v1/*` exchanges; K patterns
//!   `route.tc-treeherder.v2.project-<i>.#`, pattern i bound on exchange i mod 7; each of
//!   the first K clients takes one pattern (so every pattern is in use), the others and
//!   every message pick a pattern from a Zipf distribution (a few busy projects, a long
//!   tail), as Treeherder tabs and pushes do.

use crate::Args;

pub const TASK_EXCHANGES: [&str; 7] = [
    "exchange/taskcluster-queue/v1/task-defined",
    "exchange/taskcluster-queue/v1/task-pending",
    "exchange/taskcluster-queue/v1/task-running",
    "exchange/taskcluster-queue/v1/artifact-created",
    "exchange/taskcluster-queue/v1/task-completed",
    "exchange/taskcluster-queue/v1/task-failed",
    "exchange/taskcluster-queue/v1/task-exception",
];

pub struct Pattern {
    pub exchange: usize,
    pub binding: String,
    /// The CC route of messages for this pattern (without the per-message suffix).
    pub route: String,
}

pub struct Scenario {
    pub exchanges: Vec<String>,
    pub patterns: Vec<Pattern>,
    /// The pattern of each client.
    pub client_pattern: Vec<usize>,
    /// Cumulative Zipf weights over patterns, for picking a message's pattern.
    cumulative: Vec<f64>,
    /// Clients ask for resumable streams (`resume=1`).
    resume: bool,
}

impl Scenario {
    pub fn new(args: &Args) -> Self {
        let mut rng = fastrand::Rng::with_seed(7);
        if args.scenario == "same" {
            return Self {
                exchanges: vec!["exchange/loadgen/v1/same".to_owned()],
                patterns: vec![Pattern {
                    exchange: 0,
                    binding: "#".to_owned(),
                    route: "route.loadgen.same".to_owned(),
                }],
                client_pattern: vec![0; args.clients],
                cumulative: vec![1.0],
                resume: args.resume,
            };
        }
        let k = args.patterns.max(1);
        let patterns = (0..k)
            .map(|i| Pattern {
                exchange: i % TASK_EXCHANGES.len(),
                binding: format!("route.tc-treeherder.v2.project-{i}.#"),
                route: format!("route.tc-treeherder.v2.project-{i}"),
            })
            .collect();
        let mut cumulative = Vec::with_capacity(k);
        let mut total = 0.0;
        for i in 0..k {
            total += 1.0 / (i + 1) as f64;
            cumulative.push(total);
        }
        for c in &mut cumulative {
            *c /= total;
        }
        let mut scenario = Self {
            exchanges: TASK_EXCHANGES.iter().map(|e| (*e).to_owned()).collect(),
            patterns,
            client_pattern: Vec::with_capacity(args.clients),
            cumulative,
            resume: args.resume,
        };
        for c in 0..args.clients {
            let p = if c < k { c } else { scenario.pick(&mut rng) };
            scenario.client_pattern.push(p);
        }
        scenario
    }

    /// A pattern drawn from the scenario's distribution.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        let x = rng.f64();
        self.cumulative
            .partition_point(|c| *c < x)
            .min(self.cumulative.len() - 1)
    }

    /// The raw subscribe frame of client `c` (the WebSocket protocol).
    pub fn subscribe_frame(&self, c: usize) -> String {
        let p = &self.patterns[self.client_pattern[c]];
        format!(
            r#"{{"type":"subscribe","bindings":[{{"exchange":"{}","pattern":"{}"}}]}}"#,
            self.exchanges[p.exchange], p.binding
        )
    }

    /// The bindings query of client `c`.
    pub fn query(&self, c: usize) -> String {
        let p = &self.patterns[self.client_pattern[c]];
        let json = format!(
            r#"{{"bindings":[{{"exchange":"{}","routingKeyPattern":"{}"}}]}}"#,
            self.exchanges[p.exchange], p.binding
        );
        format!(
            "bindings={}{}",
            percent_encoding::utf8_percent_encode(&json, percent_encoding::NON_ALPHANUMERIC),
            if self.resume { "&resume=1" } else { "" }
        )
    }
}
