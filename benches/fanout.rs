//! In-memory fan-out of one delivery to 1, 1k and 10k clients of one shared subscription:
//! routing (topic trie), encoding the frame once, one broadcast send, and every client
//! receiving its shared `Bytes`. Everything before the socket write; divide by the number
//! of clients for the per-delivery cost the gateway adds on top of the kernel's.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use events_gateway::binding::{Binding, BindingSet};
use events_gateway::broker::MemoryBroker;
use events_gateway::message::Incoming;
use events_gateway::metrics::Metrics;
use events_gateway::registry::Registry;
use events_gateway::topology::Topology;

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
        let registry = Arc::new(Registry::new(topology.clone(), broker, 1024, metrics));
        let set = BindingSet::new(vec![Binding {
            exchange: exchange.to_owned(),
            pattern: "route.tc-treeherder.v2.try.#".to_owned(),
        }]);
        let mut clients: Vec<_> = (0..n).map(|_| registry.subscribe(set.clone())).collect();
        let mut receivers: Vec<_> = clients
            .iter_mut()
            .filter_map(|c| c.take_receiver())
            .collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                topology.deliver(exchange, &msg);
                for rx in &mut receivers {
                    let _ = rx.try_recv();
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
