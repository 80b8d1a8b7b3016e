//! Encoding a `message` frame (payload validated and compacted, routes from CC): done once
//! per delivery whatever the number of clients, so it is the per-message cost on the
//! consumer's path; `ping_frame` is built once per client per ping interval.

use criterion::{Criterion, criterion_group, criterion_main};
use events_gateway::internals::{Incoming, ping_frame};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let body = format!(
        r#"{{"status":{{"taskId":"fUAy7ljeTL2b9aYmXrTdyQ","provisionerId":"proj-gecko","workerType":"b-linux","schedulerId":"gecko-level-1","taskGroupId":"YbdqzkF0TSS0lpGU6ZKZ7Q","state":"completed","runs":[{{"runId":0,"state":"completed","reasonCreated":"scheduled","scheduled":"2026-11-27T11:15:23.085Z"}}]}},"runId":0,"workerGroup":"us-east-1","workerId":"i-0123456789","version":1,"pad":"{}"}}"#,
        "x".repeat(64)
    );
    let msg = Incoming {
        exchange: "exchange/taskcluster-queue/v1/task-completed",
        routing_key: "primary.fUAy7ljeTL2b9aYmXrTdyQ.0.us-east-1.i-0123456789.proj-gecko.b-linux.gecko-level-1.YbdqzkF0TSS0lpGU6ZKZ7Q.",
        redelivered: false,
        cc: vec![
            "route.tc-treeherder.v2.try.abcdef0123456789.17318",
            "route.index.gecko.v2.try.latest",
        ],
        body: body.as_bytes(),
    };
    c.bench_function("encode_message_frame", |b| {
        b.iter(|| black_box(&msg).encode())
    });
    c.bench_function("encode_ping_frame", |b| {
        b.iter(|| ping_frame(black_box(std::time::SystemTime::now())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
