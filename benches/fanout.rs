//! One delivery to a subscription shared by 1, 1k and 10k clients, in memory: routing
//! (topic trie), encoding the frame once, and appending it to the subscription's log.
//! Everything before the writers; it must not grow with the number of clients (the
//! writers' per-client cost, a socket write each, is what `end_to_end` measures).

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use events_gateway::Metrics;
use events_gateway::Registry;
use events_gateway::internals::Caps;
use events_gateway::internals::Incoming;
use events_gateway::internals::MemoryBroker;
use events_gateway::internals::Topology;
use events_gateway::internals::{Binding, BindingSet};
use events_gateway::internals::{Fanout, StreamSettings};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_one_message");
    let exchange = "exchange/taskcluster-queue/v1/task-completed";
    let body = format!(
        r#"{{"status":{{"state":"completed"}},"pad":"{}"}}"#,
        "x".repeat(256)
    );
    let msg = Incoming {
        exchange,
        routing_key: "primary.abc.0.us-east-1.i-1.proj-gecko.b-linux.gecko-level-1.group.",
        redelivered: false,
        cc: vec!["route.tc-treeherder.v2.try.abcdef.1"],
        body: body.as_bytes(),
    };
    for n in [1usize, 1_000, 10_000] {
        let metrics = Metrics::new();
        let topology = Arc::new(Topology::new(metrics.clone()));
        let broker = MemoryBroker::new(topology.clone());
        let fanout = Fanout::new(StreamSettings::default(), metrics.clone());
        let registry = Arc::new(Registry::new(
            topology.clone(),
            broker,
            fanout,
            Caps::default(),
            metrics,
        ));
        let set = BindingSet::new(vec![Binding {
            exchange: exchange.to_owned(),
            pattern: "route.tc-treeherder.v2.try.#".to_owned(),
        }]);
        let clients: Vec<_> = (0..n)
            .map(|_| {
                registry
                    .subscribe(set.clone(), || true)
                    .expect("within the caps")
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| topology.deliver(exchange, &msg))
        });
        drop(clients);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
