//! The in-process topic matcher agrees with RabbitMQ itself: a corpus of routing keys and
//! `CC` lists goes through a real topic exchange with one queue per pattern, and the queues'
//! contents must equal what the matcher selects.

use std::collections::BTreeSet;

use events_gateway::internals::TopicTrie;
use lapin::options::{
    BasicGetOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;

use events_gateway_test_support::*;

const PATTERNS: &[&str] = &[
    "#", "*", "", "a", "b", "a.*", "a.#", "#.a", "#.#", "a.#.b", "*.*", "a..b", ".", "a.", ".a",
    "*.#", "#.*", "#.a.#", "a.*.#", "*.#.*", "#.#.b", "a.#.#", "*.a.*", "a.b.c", "*.b.*",
    "#.b.#.c", "..", "*..*", "#..#", "#.*.#", "*.*.*", "c.#", "#.c",
];

/// Every key of up to four words over {a, b, c, ""} (so with empty words and leading,
/// trailing and doubled dots), without repeats.
fn keys() -> Vec<String> {
    let words = ["a", "b", "c", ""];
    let mut out = BTreeSet::new();
    out.insert(String::new());
    let mut layer = vec![Vec::<&str>::new()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for prefix in &layer {
            for w in words {
                let mut k = prefix.clone();
                k.push(w);
                out.insert(k.join("."));
                next.push(k);
            }
        }
        layer = next;
    }
    out.into_iter().collect()
}

#[tokio::test]
async fn matcher_selects_exactly_what_rabbitmq_routes() {
    let broker = Broker::connect().await;
    let ex = broker.exchange("topic-corpus").await;
    let channel = broker.connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    // Arrange: one exclusive queue per pattern, bound on the real exchange.
    let mut queues = Vec::new();
    for pattern in PATTERNS {
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue");
        channel
            .queue_bind(
                q.name().clone(),
                ex.as_str().into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        queues.push(q.name().clone());
    }
    let mut trie = TopicTrie::new();
    for (i, p) in PATTERNS.iter().enumerate() {
        trie.insert(p, i);
    }

    // Act: every key, some with CC lists made of other keys.
    let keys = keys();
    let mut expected: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); PATTERNS.len()];
    for (m, key) in keys.iter().enumerate() {
        let cc: Vec<&str> = if m % 3 == 0 {
            vec![
                keys[(m * 7 + 1) % keys.len()].as_str(),
                keys[(m * 13 + 5) % keys.len()].as_str(),
            ]
        } else {
            Vec::new()
        };
        let mut add = |p: &usize| {
            expected[*p].insert(m);
        };
        trie.matches(key, &mut add);
        for c in &cc {
            trie.matches(c, &mut add);
        }
        let props = cc_properties(&cc);
        channel
            .basic_publish(
                ex.as_str().into(),
                key.as_str().into(),
                Default::default(),
                m.to_string().as_bytes(),
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
    }

    // Assert: each queue holds exactly the messages the matcher selected for its pattern.
    for (i, q) in queues.iter().enumerate() {
        let mut got = BTreeSet::new();
        while let Some(msg) = channel
            .basic_get(q.clone(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            let m: usize = std::str::from_utf8(&msg.delivery.data)
                .expect("utf8")
                .parse()
                .expect("index");
            got.insert(m);
        }
        let diff: Vec<_> = got
            .symmetric_difference(&expected[i])
            .map(|m| (keys[*m].clone(), got.contains(m)))
            .collect();
        assert!(
            diff.is_empty(),
            "pattern {:?}: disagreement (key, routed by RabbitMQ): {diff:?}",
            PATTERNS[i]
        );
    }
}
