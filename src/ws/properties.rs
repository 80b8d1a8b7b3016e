//! Whatever a client sends as a frame, the protocol's readers answer with a frame or an
//! error text, never a panic, and a raw subscription binds only what the frame named.

use proptest::prelude::*;
use serde_json::Value;

use super::{named, protocol};

/// JSON a client might send: the protocol's own keys and values mixed with anything.
fn frame_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("subscribe"),
            Just("connection_init"),
            Just("queue"),
            Just("taskDefined"),
            Just("taskCompleted"),
            Just("exchange/taskcluster-queue/v1/task-defined"),
            Just("#"),
            Just("a.b"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("bindings".to_owned()),
                    Just("exchange".to_owned()),
                    Just("pattern".to_owned()),
                    Just("service".to_owned()),
                    Just("subscriptions".to_owned()),
                    Just("routingKey".to_owned()),
                    Just("taskId".to_owned()),
                    Just("subscriptionId".to_owned()),
                    ".{0,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A string a client might put where a name or pattern goes.
fn word() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::from("exchange/taskcluster-queue/v1/task-defined")),
        Just(Value::from("#")),
        Just(Value::from("primary.*.#")),
        Just(Value::from("a.b")),
        Just(Value::from("")),
        ".{0,20}".prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

/// Subscribe frames close to valid ones: raw (bindings) or named (events and a routing
/// key), with fields missing, mistyped or extra.
fn subscribe_json() -> impl Strategy<Value = Value> {
    let binding =
        (word(), word(), any::<bool>()).prop_map(|(exchange, pattern, object)| match object {
            true => serde_json::json!({"exchange": exchange, "pattern": pattern}),
            false => Value::from(vec![exchange, pattern]),
        });
    let raw = proptest::collection::vec(binding, 0..4)
        .prop_map(|bindings| serde_json::json!({"type": "subscribe", "bindings": bindings}));
    let name = prop_oneof![
        Just(Value::from("taskDefined")),
        Just(Value::from("taskCompleted")),
        Just(Value::from("artifactCreated")),
        word(),
    ];
    let named = (
        prop_oneof![Just(Value::from("queue")), word()],
        proptest::collection::vec(name, 0..4),
        proptest::collection::btree_map(
            prop_oneof![
                Just("taskId".to_owned()),
                Just("runId".to_owned()),
                Just("workerType".to_owned()),
                ".{0,8}"
            ],
            prop_oneof![word(), frame_json()],
            0..4,
        ),
    )
        .prop_map(|(service, subscriptions, key)| {
            serde_json::json!({
                "type": "subscribe",
                "service": service,
                "subscriptions": subscriptions,
                "routingKey": Value::Object(key.into_iter().collect()),
            })
        });
    prop_oneof![raw, named, frame_json()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Any text is a frame or a fatal reason; any frame's fields resolve, raw or named,
    /// to bindings or an error text; raw bindings are the frame's own strings.
    #[test]
    fn any_frame_gets_an_answer(doc in subscribe_json(), garbage in ".{0,64}") {
        // The document as serde_json writes it, whose strings appear in it escaped the same
        // way; and any text at all.
        for (text, is_doc) in [(doc.to_string(), true), (garbage, false)] {
            let frame = match protocol::parse(&text) {
                Ok(frame) => frame,
                Err(fatal) => {
                    prop_assert!(!fatal.reason().is_empty());
                    continue;
                }
            };
            match protocol::raw_bindings(&frame.fields) {
                Ok(pairs) => {
                    prop_assert!(!pairs.is_empty() && pairs.len() <= named::MAX_PER_SUBSCRIBE);
                    let escaped = |s: &str| {
                        let quoted = Value::from(s).to_string();
                        quoted[1..quoted.len() - 1].to_owned()
                    };
                    for (exchange, pattern) in pairs {
                        let named_in_doc = |key: &str, value: &str| {
                            text.contains(&format!("\"{key}\":\"{}\"", escaped(value)))
                        };
                        prop_assert!(!is_doc || named_in_doc("exchange", exchange), "{exchange}");
                        prop_assert!(!is_doc || named_in_doc("pattern", pattern), "{pattern}");
                    }
                }
                Err(why) => prop_assert!(!why.is_empty()),
            }
            match named::resolve(&frame.fields) {
                Ok(pairs) => {
                    prop_assert!(!pairs.is_empty() && pairs.len() <= named::MAX_PER_SUBSCRIBE);
                    for (exchange, pattern) in pairs {
                        prop_assert!(exchange.starts_with("exchange/taskcluster-queue/v1/"));
                        prop_assert!(!pattern.is_empty());
                    }
                }
                Err(why) => prop_assert!(!why.is_empty()),
            }
        }
    }
}
