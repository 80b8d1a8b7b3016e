//! Named subscriptions (`/subscription/named`): event names of a Taskcluster service and
//! a routing-key object, resolved to bindings as Taskcluster's events clients build them.
//!
//! The data is the queue service's exchanges reference (`queue-exchanges.json`, with where
//! it came from): each event's exchange and its routing-key fields in order. A field with
//! a constant (`routingKeyKind`) is always that constant; a given value is used as it is
//! (a number as its decimal text; a single-word field may not contain a dot); a field not
//! given is `*`, or `#` if it holds several words (the reserved trailing field). Fields
//! the event does not have are ignored, as Taskcluster's clients do. Error texts are
//! Taskcluster's, word for word.

use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;

/// The one service whose events can be named.
pub const SERVICE: &str = "queue";

/// Most event names (or bindings) one subscribe frame may carry.
pub const MAX_PER_SUBSCRIBE: usize = 100;

#[derive(Deserialize)]
struct Reference {
    #[serde(rename = "exchangePrefix")]
    exchange_prefix: String,
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    exchange: String,
    #[serde(rename = "routingKey")]
    routing_key: Vec<Field>,
}

#[derive(Deserialize)]
struct Field {
    name: String,
    #[serde(rename = "multipleWords")]
    multiple_words: bool,
    #[serde(default)]
    constant: Option<String>,
}

/// The queue's exchanges reference, parsed once. It is compiled in and checked by a unit
/// test, so a parse failure is a build defect, not a client's doing; it then resolves
/// nothing (every name is unknown) rather than panicking.
static QUEUE: LazyLock<Reference> = LazyLock::new(|| {
    serde_json::from_str(include_str!("queue-exchanges.json")).unwrap_or(Reference {
        exchange_prefix: String::new(),
        entries: Vec::new(),
    })
});

/// Resolves a named subscribe frame to `(exchange, pattern)` pairs, one per name in order,
/// or the `ProtocolError` text Taskcluster sends.
pub fn resolve(frame: &serde_json::Map<String, Value>) -> Result<Vec<(String, String)>, String> {
    let Some(Value::String(service)) = frame.get("service") else {
        return Err("subscribe requires a `service` string".to_owned());
    };
    if service != SERVICE {
        return Err(format!("unknown events service: {service}"));
    }
    let names = match frame.get("subscriptions") {
        Some(Value::Array(names)) if !names.is_empty() => names,
        _ => return Err("subscribe requires a non-empty array of subscriptions".to_owned()),
    };
    if names.len() > MAX_PER_SUBSCRIBE {
        return Err(format!(
            "subscribe allows at most {MAX_PER_SUBSCRIBE} subscriptions"
        ));
    }
    let empty = serde_json::Map::new();
    let fields = match frame.get("routingKey") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err("routingKey must be an object of routing-key fields".to_owned()),
    };
    let reference = &*QUEUE;
    names
        .iter()
        .map(|name| {
            let name = js_string(name);
            let entry = reference
                .entries
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| format!("unknown {SERVICE} event: {name}"))?;
            let pattern = pattern(entry, fields)
                .map_err(|why| format!("invalid routingKey for {SERVICE} event {name}: {why}"))?;
            Ok((
                format!("{}{}", reference.exchange_prefix, entry.exchange),
                pattern,
            ))
        })
        .collect()
}

/// The routing-key pattern of one event for the given fields.
fn pattern(entry: &Entry, fields: &serde_json::Map<String, Value>) -> Result<String, String> {
    let mut words = Vec::with_capacity(entry.routing_key.len());
    for field in &entry.routing_key {
        if let Some(constant) = &field.constant {
            words.push(constant.clone());
            continue;
        }
        let word = match fields.get(&field.name) {
            None | Some(Value::Null) => match field.multiple_words {
                true => "#".to_owned(),
                false => "*".to_owned(),
            },
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(format!(
                    "Value: '{}' is not supported as routingKey pattern for {}",
                    js_string(other),
                    field.name
                ));
            }
        };
        if !field.multiple_words && word.contains('.') {
            return Err(format!(
                "routingKey pattern '{word}' for {} cannot contain dots as it does not hold multiple words",
                field.name
            ));
        }
        words.push(word);
    }
    Ok(words.join("."))
}

/// A JSON value as JavaScript's `String()` shows it (for the texts Taskcluster sends).
fn js_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(js_string).collect::<Vec<_>>().join(","),
        Value::Object(_) => "[object Object]".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(value: Value) -> serde_json::Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!("a test frame is an object"),
        }
    }

    #[test]
    fn the_reference_parses_and_holds_the_queue_events() {
        let names: Vec<&str> = QUEUE.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names.len(), 11, "{names:?}");
        assert!(names.contains(&"taskDefined") && names.contains(&"taskGroupResolved"));
        assert_eq!(QUEUE.exchange_prefix, "exchange/taskcluster-queue/v1/");
    }

    #[test]
    fn fields_fill_the_pattern_as_taskclusters_clients_do() {
        let got = resolve(&frame(serde_json::json!({
            "service": "queue",
            "subscriptions": ["taskDefined", "taskGroupResolved", "taskCompleted"],
            "routingKey": {"taskId": "abc123", "taskGroupId": "G", "runId": 0, "unknownField": "x"}
        })));
        assert_eq!(
            got,
            Ok(vec![
                (
                    "exchange/taskcluster-queue/v1/task-defined".to_owned(),
                    "primary.abc123.0.*.*.*.*.*.G.#".to_owned()
                ),
                (
                    "exchange/taskcluster-queue/v1/task-group-resolved".to_owned(),
                    "primary.G.*.#".to_owned()
                ),
                (
                    "exchange/taskcluster-queue/v1/task-completed".to_owned(),
                    "primary.abc123.0.*.*.*.*.*.G.#".to_owned()
                ),
            ])
        );
        let all = resolve(&frame(serde_json::json!({
            "service": "queue", "subscriptions": ["taskDefined"], "routingKey": null
        })));
        assert_eq!(
            all.map(|b| b[0].1.clone()),
            Ok("primary.*.*.*.*.*.*.*.*.#".to_owned())
        );
    }

    #[test]
    fn every_protocol_error_has_taskclusters_text() {
        let cases = [
            (
                serde_json::json!({}),
                "subscribe requires a `service` string",
            ),
            (
                serde_json::json!({"service": 1}),
                "subscribe requires a `service` string",
            ),
            (
                serde_json::json!({"service": "hooks"}),
                "unknown events service: hooks",
            ),
            (
                serde_json::json!({"service": "queue"}),
                "subscribe requires a non-empty array of subscriptions",
            ),
            (
                serde_json::json!({"service": "queue", "subscriptions": []}),
                "subscribe requires a non-empty array of subscriptions",
            ),
            (
                serde_json::json!({"service": "queue", "subscriptions": vec!["taskDefined"; 101]}),
                "subscribe allows at most 100 subscriptions",
            ),
            (
                serde_json::json!({"service": "queue", "subscriptions": ["taskDefined"], "routingKey": [1]}),
                "routingKey must be an object of routing-key fields",
            ),
            (
                serde_json::json!({"service": "queue", "subscriptions": ["tasksDefined"]}),
                "unknown queue event: tasksDefined",
            ),
            (
                serde_json::json!({"service": "queue", "subscriptions": ["taskDefined"], "routingKey": {"taskId": "a.b"}}),
                "invalid routingKey for queue event taskDefined: routingKey pattern 'a.b' for taskId cannot contain dots as it does not hold multiple words",
            ),
            (
                serde_json::json!({"service": "queue", "subscriptions": ["taskDefined"], "routingKey": {"taskId": true}}),
                "invalid routingKey for queue event taskDefined: Value: 'true' is not supported as routingKey pattern for taskId",
            ),
        ];
        for (input, text) in cases {
            assert_eq!(
                resolve(&frame(input.clone())),
                Err(text.to_owned()),
                "{input}"
            );
        }
    }
}
