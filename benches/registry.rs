//! The subscription registry on the connect path: a client joining and leaving a shared
//! subscription (the common case for popular dashboards: a dashmap shard lock and a
//! counter), a client creating and releasing a new binding set (the topology's write
//! lock), and joins/leaves from two threads at once on the same set (contention on one
//! shard). This bounds the connection ramp, not the delivery path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use events_gateway::Metrics;
use events_gateway::Registry;
use events_gateway::internals::Caps;
use events_gateway::internals::MemoryBroker;
use events_gateway::internals::Topology;
use events_gateway::internals::{Binding, BindingSet};
use events_gateway::internals::{Fanout, StreamSettings};

fn set(pattern: &str) -> BindingSet {
    BindingSet::new(vec![Binding {
        exchange: "exchange/taskcluster-queue/v1/task-completed".to_owned(),
        pattern: pattern.to_owned(),
    }])
}

fn registry() -> Arc<Registry> {
    let metrics = Metrics::new();
    let topology = Arc::new(Topology::new(metrics.clone()));
    let broker = MemoryBroker::new(topology.clone());
    let fanout = Fanout::new(StreamSettings::default(), metrics.clone());
    Arc::new(Registry::new(
        topology,
        broker,
        fanout,
        Caps::default(),
        metrics,
    ))
}

fn bench(c: &mut Criterion) {
    let reg = registry();
    let _holder = reg
        .subscribe(set("route.tc-treeherder.v2.try.#"), || true)
        .expect("within the caps");
    c.bench_function("join_and_leave_shared_subscription", |b| {
        b.iter(|| {
            drop(
                reg.subscribe(set("route.tc-treeherder.v2.try.#"), || true)
                    .expect("within the caps"),
            )
        })
    });
    let mut i = 0u64;
    c.bench_function("create_and_release_subscription", |b| {
        b.iter(|| {
            i += 1;
            drop(
                reg.subscribe(
                    set(&format!("route.tc-treeherder.v2.p{}.#", i % 1000)),
                    || true,
                )
                .expect("within the caps"),
            )
        })
    });
    c.bench_function("join_and_leave_two_threads_same_set", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters / 2 {
                            drop(
                                reg.subscribe(set("route.tc-treeherder.v2.try.#"), || true)
                                    .expect("within the caps"),
                            );
                        }
                    });
                }
            });
            start.elapsed().max(Duration::from_nanos(1))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
