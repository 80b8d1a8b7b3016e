//! Topic matching: one routing key plus a CC route against 1k and 100k patterns in the
//! trie. Every delivery is matched once (not once per client), so this bounds how many
//! messages per second one exchange's consumer can route; 100k patterns is far beyond a
//! busy Pulse deployment, 1k is Treeherder-like.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use events_gateway::internals::TopicTrie;
use std::hint::black_box;

fn patterns(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 4 {
            0 => format!("route.tc-treeherder.v2.project-{i}.#"),
            1 => format!("primary.*.*.*.*.proj-{i}.#"),
            2 => format!("route.index.project-{i}.*.latest"),
            _ => format!("#.worker-{i}.#"),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_match");
    let key = "primary.fUAy7ljeTL2b9aYmXrTdyQ.0.us-east-1.i-0123456789abcdef.proj-gecko.b-linux.gecko-level-1.YbdqzkF0TSS0lpGU6ZKZ7Q.";
    let cc = "route.tc-treeherder.v2.project-1000.abcdef0123456789.17318";
    for n in [1_000usize, 100_000] {
        let mut trie = TopicTrie::new();
        for (i, p) in patterns(n).iter().enumerate() {
            trie.insert(p, i);
        }
        group.bench_with_input(BenchmarkId::new("key_and_cc", n), &trie, |b, trie| {
            b.iter(|| {
                let mut hits = 0usize;
                trie.matches(black_box(key), &mut |_| hits += 1);
                trie.matches(black_box(cc), &mut |_| hits += 1);
                hits
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
