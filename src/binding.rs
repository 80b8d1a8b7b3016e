//! The `bindings` query parameter: parsed and validated once, at the edge, into a
//! canonical [`BindingSet`]. Everything behind this module trusts a `BindingSet`.
//!
//! Invariants enforced here:
//! - every exchange name and routing-key pattern is a string of at most
//!   [`MAX_NAME_BYTES`] bytes (AMQP's short-string limit), so building broker frames from
//!   them can never fail or panic;
//! - every exchange name is non-empty and starts with one of the allowed prefixes;
//! - a set holds at most `max_bindings` entries, sorted and de-duplicated, so two clients
//!   asking for the same bindings in another order or with repeats share one subscription.
//!
//! Error texts the original Taskcluster service sends are kept word for word (clients and
//! tests match on them); cases the original left to crash get a clear text of our own.

use std::fmt;

use serde_json::Value;

/// AMQP short strings (exchange names, routing keys) hold at most 255 bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// One `(exchange, routingKeyPattern)` pair.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Binding {
    pub exchange: String,
    pub pattern: String,
}

/// A client's bindings in canonical form: sorted and without duplicates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BindingSet(Box<[Binding]>);

impl BindingSet {
    /// Builds the canonical set from any list of bindings (sorts and de-duplicates).
    pub fn new(mut bindings: Vec<Binding>) -> Self {
        bindings.sort_unstable();
        bindings.dedup();
        Self(bindings.into_boxed_slice())
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Binding> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for BindingSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}:{}", b.exchange, b.pattern)?;
        }
        Ok(())
    }
}

/// What a client may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most bindings one connection may name (before de-duplication).
    pub max_bindings: usize,
    /// An exchange name must start with one of these (an empty list allows any name).
    pub allowed_exchange_prefixes: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bindings: 100,
            allowed_exchange_prefixes: vec!["exchange/".to_owned()],
        }
    }
}

/// Which field of a binding entry an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Exchange,
    RoutingKeyPattern,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Exchange => "exchange",
            Field::RoutingKeyPattern => "routingKeyPattern",
        })
    }
}

/// Why a `bindings` parameter was refused. `Display` is the text sent to the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error(
        "The query parameter `bindings` is missing: expected ?bindings=<URL-encoded JSON {{\"bindings\": [{{exchange, routingKeyPattern}}, ...]}}>"
    )]
    Missing,
    #[error("The query parameter `bindings` is empty")]
    Empty,
    /// Not JSON; the text imitates the V8 `JSON.parse` message the original sent.
    #[error("{0}")]
    Json(String),
    #[error("The json query should have only one key i.e. `bindings`.")]
    OnlyOneKey,
    #[error("Bindings must be an array of {{exchange, routingKeyPattern}}")]
    NotAnArray,
    #[error("Too many bindings: {given} given, at most {max} are allowed per connection")]
    TooMany { given: usize, max: usize },
    #[error("Binding {index} must be an object {{exchange, routingKeyPattern}}")]
    NotAnObject { index: usize },
    #[error("Binding must include `exchange` and `routingKeyPattern` fields")]
    MissingField,
    #[error("Binding {index}: `{field}` must be a string")]
    NotAString { index: usize, field: Field },
    #[error("Binding {index}: `exchange` must not be empty")]
    EmptyExchange { index: usize },
    #[error("Binding {index}: `{field}` is {len} bytes long; AMQP allows at most {MAX_NAME_BYTES}")]
    TooLong {
        index: usize,
        field: Field,
        len: usize,
    },
    #[error("Exchange `{exchange}` is not allowed: exchange names must start with {allowed}")]
    NotAllowed { exchange: String, allowed: String },
}

/// Parses the raw query string of a connect request (without the `?`).
///
/// The first `bindings` parameter counts; others are ignored, as Express did.
pub fn parse_query(raw_query: Option<&str>, limits: &Limits) -> Result<BindingSet, BindingError> {
    let value = raw_query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "bindings")
                .map(|(_, v)| v.into_owned())
        })
        .ok_or(BindingError::Missing)?;
    if value.is_empty() {
        return Err(BindingError::Empty);
    }
    parse_json(&value, limits)
}

/// Parses and validates the JSON document `{"bindings": [...]}`.
pub fn parse_json(text: &str, limits: &Limits) -> Result<BindingSet, BindingError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| BindingError::Json(v8_json_error(text, &e)))?;
    let Value::Object(top) = doc else {
        return Err(BindingError::OnlyOneKey);
    };
    if top.len() != 1 {
        return Err(BindingError::OnlyOneKey);
    }
    let Some(bindings) = top.get("bindings") else {
        return Err(BindingError::OnlyOneKey);
    };
    let Value::Array(entries) = bindings else {
        return Err(BindingError::NotAnArray);
    };
    if entries.len() > limits.max_bindings {
        return Err(BindingError::TooMany {
            given: entries.len(),
            max: limits.max_bindings,
        });
    }
    let mut out = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let Value::Object(entry) = entry else {
            return Err(BindingError::NotAnObject { index });
        };
        let (Some(exchange), Some(pattern)) =
            (entry.get("exchange"), entry.get("routingKeyPattern"))
        else {
            return Err(BindingError::MissingField);
        };
        let exchange = name(exchange, index, Field::Exchange)?;
        let pattern = name(pattern, index, Field::RoutingKeyPattern)?;
        if exchange.is_empty() {
            return Err(BindingError::EmptyExchange { index });
        }
        check_allowed(exchange, limits)?;
        out.push(Binding {
            exchange: exchange.to_owned(),
            pattern: pattern.to_owned(),
        });
    }
    Ok(BindingSet::new(out))
}

fn name(value: &Value, index: usize, field: Field) -> Result<&str, BindingError> {
    let Value::String(s) = value else {
        return Err(BindingError::NotAString { index, field });
    };
    if s.len() > MAX_NAME_BYTES {
        return Err(BindingError::TooLong {
            index,
            field,
            len: s.len(),
        });
    }
    Ok(s)
}

fn check_allowed(exchange: &str, limits: &Limits) -> Result<(), BindingError> {
    let prefixes = &limits.allowed_exchange_prefixes;
    if prefixes.is_empty() || prefixes.iter().any(|p| exchange.starts_with(p.as_str())) {
        return Ok(());
    }
    let allowed = prefixes
        .iter()
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join(" or ");
    Err(BindingError::NotAllowed {
        exchange: exchange.to_owned(),
        allowed,
    })
}

/// Imitates the message of V8's `JSON.parse` (what the original service sent), e.g.
/// `Unexpected token 'h', "this is not json" is not valid JSON`. Long inputs are quoted
/// around the error position only, as V8 does (10 characters either side).
fn v8_json_error(text: &str, err: &serde_json::Error) -> String {
    const CONTEXT: usize = 10;
    if err.is_eof() {
        return "Unexpected end of JSON input".to_owned();
    }
    if err.to_string().starts_with("recursion limit exceeded") {
        return "JSON nested too deeply (at most 128 levels)".to_owned();
    }
    let chars: Vec<char> = text.chars().collect();
    let pos = char_position(text, err.line(), err.column()).min(chars.len().saturating_sub(1));
    let token = chars.get(pos).copied().unwrap_or(' ');
    let slice = |from: usize, to: usize| chars[from..to].iter().collect::<String>();
    let quoted = if chars.len() < CONTEXT * 2 + 1 {
        format!("\"{text}\"")
    } else if pos < CONTEXT {
        format!("\"{}\"...", slice(0, pos + CONTEXT))
    } else if pos >= chars.len() - CONTEXT {
        format!("...\"{}\"", slice(pos - CONTEXT, chars.len()))
    } else {
        format!("...\"{}\"...", slice(pos - CONTEXT, pos + CONTEXT))
    };
    format!("Unexpected token '{token}', {quoted} is not valid JSON")
}

/// serde_json reports 1-based line and column (in bytes); V8 counts characters.
fn char_position(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0;
    for (i, l) in text.split('\n').enumerate() {
        if i + 1 == line {
            let byte = column.saturating_sub(1).min(l.len());
            let byte = (0..=byte)
                .rev()
                .find(|b| l.is_char_boundary(*b))
                .unwrap_or(0);
            return text[..offset + byte].chars().count();
        }
        offset += l.len() + 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<BindingSet, BindingError> {
        parse_json(json, &Limits::default())
    }

    fn err(json: &str) -> String {
        parse(json).expect_err("should be refused").to_string()
    }

    #[test]
    fn original_texts_are_kept() {
        assert_eq!(
            err(
                r##"{"bindings":[{"exchange":"exchange/a","routingKeyPattern":"#"}],"foo":"bar"}"##
            ),
            "The json query should have only one key i.e. `bindings`."
        );
        assert_eq!(
            err(r##"{"bindings":{"exchange":"exchange/a","routingKeyPattern":"#"}}"##),
            "Bindings must be an array of {exchange, routingKeyPattern}"
        );
        assert_eq!(
            err(r##"{"bindings":[{"routingKeyPattern":"#"}]}"##),
            "Binding must include `exchange` and `routingKeyPattern` fields"
        );
        assert_eq!(
            err(r#"{"bindings":[{"exchange":"exchange/a"}]}"#),
            "Binding must include `exchange` and `routingKeyPattern` fields"
        );
        assert_eq!(
            err("this is not json"),
            r#"Unexpected token 'h', "this is not json" is not valid JSON"#
        );
    }

    #[test]
    fn missing_and_empty_parameter() {
        let limits = Limits::default();
        assert_eq!(parse_query(None, &limits), Err(BindingError::Missing));
        assert_eq!(
            parse_query(Some("foo=1"), &limits),
            Err(BindingError::Missing)
        );
        assert_eq!(
            parse_query(Some("bindings="), &limits),
            Err(BindingError::Empty)
        );
    }

    #[test]
    fn query_is_percent_decoded() {
        let q = "bindings=%7B%22bindings%22%3A%5B%7B%22exchange%22%3A%22exchange%2Fa%22%2C%22routingKeyPattern%22%3A%22a.%23%22%7D%5D%7D";
        let set = parse_query(Some(q), &Limits::default()).expect("valid");
        let b: Vec<_> = set.iter().collect();
        assert_eq!(b[0].exchange, "exchange/a");
        assert_eq!(b[0].pattern, "a.#");
    }

    #[test]
    fn what_the_original_crashed_on_gets_a_clear_text() {
        assert_eq!(err("null"), BindingError::OnlyOneKey.to_string());
        assert_eq!(err("[]"), BindingError::OnlyOneKey.to_string());
        assert_eq!(
            err(r#"{"bindings":null}"#),
            BindingError::NotAnArray.to_string()
        );
        assert_eq!(
            err(r#"{"bindings":[null]}"#),
            "Binding 0 must be an object {exchange, routingKeyPattern}"
        );
        assert_eq!(
            err(r##"{"bindings":[{"exchange":1,"routingKeyPattern":"#"}]}"##),
            "Binding 0: `exchange` must be a string"
        );
        assert_eq!(
            err(r#"{"bindings":[{"exchange":"exchange/a","routingKeyPattern":null}]}"#),
            "Binding 0: `routingKeyPattern` must be a string"
        );
        assert_eq!(
            err(r##"{"bindings":[{"exchange":"","routingKeyPattern":"#"}]}"##),
            "Binding 0: `exchange` must not be empty"
        );
        assert_eq!(
            err(r##"{"bindings":[{"exchange":"amq.topic","routingKeyPattern":"#"}]}"##),
            "Exchange `amq.topic` is not allowed: exchange names must start with `exchange/`"
        );
        let long = format!(
            r#"{{"bindings":[{{"exchange":"exchange/a","routingKeyPattern":"{}"}}]}}"#,
            "a".repeat(256)
        );
        assert_eq!(
            err(&long),
            "Binding 0: `routingKeyPattern` is 256 bytes long; AMQP allows at most 255"
        );
    }

    #[test]
    fn too_many_bindings() {
        let one = r##"{"exchange":"exchange/a","routingKeyPattern":"#"}"##;
        let json = format!(r#"{{"bindings":[{}]}}"#, vec![one; 101].join(","));
        assert_eq!(
            err(&json),
            "Too many bindings: 101 given, at most 100 are allowed per connection"
        );
    }

    #[test]
    fn sets_are_canonical() {
        let a = parse(r#"{"bindings":[{"exchange":"exchange/b","routingKeyPattern":"x"},{"exchange":"exchange/a","routingKeyPattern":"y"},{"exchange":"exchange/b","routingKeyPattern":"x"}]}"#).expect("valid");
        let b = parse(r#"{"bindings":[{"exchange":"exchange/a","routingKeyPattern":"y"},{"exchange":"exchange/b","routingKeyPattern":"x"}]}"#).expect("valid");
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert!(
            parse(r#"{"bindings":[]}"#)
                .expect("empty is valid")
                .is_empty()
        );
    }

    #[test]
    fn deep_nesting_and_odd_input_do_not_panic() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(err(&deep), "JSON nested too deeply (at most 128 levels)");
        for input in [
            "",
            " ",
            "\u{0}",
            "{",
            "\"é",
            "{\"bindings\":[{\"exchange\":\"é",
            "é\nà",
        ] {
            let _ = parse(input);
        }
        assert_eq!(err("{"), "Unexpected end of JSON input");
    }

    #[test]
    fn long_input_is_quoted_around_the_error() {
        let text = r#"{"bindings": [1, 2, 3, 4, 5, 6, 7, 8], oops}"#;
        assert!(
            err(text).starts_with("Unexpected token 'o', ...\""),
            "{}",
            err(text)
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                ".{0,300}".prop_map(serde_json::Value::from),
                Just(serde_json::Value::from("exchange/a")),
                Just(serde_json::Value::from("#")),
            ];
            leaf.prop_recursive(6, 64, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("bindings".to_owned()),
                            Just("exchange".to_owned()),
                            Just("routingKeyPattern".to_owned()),
                            ".{0,8}"
                        ],
                        inner,
                        0..4
                    )
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Any JSON document is either a valid set within the limits or a clear error.
            #[test]
            fn any_json_gets_a_set_or_an_error(doc in json()) {
                let limits = Limits::default();
                match parse_json(&doc.to_string(), &limits) {
                    Ok(set) => {
                        prop_assert!(set.len() <= limits.max_bindings);
                        for b in set.iter() {
                            prop_assert!(!b.exchange.is_empty() && b.exchange.len() <= MAX_NAME_BYTES);
                            prop_assert!(b.exchange.starts_with("exchange/"));
                            prop_assert!(b.pattern.len() <= MAX_NAME_BYTES);
                        }
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }

            /// Any query string, percent-encoded or not, is handled without panicking.
            #[test]
            fn any_query_is_safe(q in ".{0,200}", raw in proptest::collection::vec(any::<u8>(), 0..200)) {
                let limits = Limits::default();
                let _ = parse_query(Some(&q), &limits);
                let encoded: String = raw.iter().map(|b| format!("%{b:02X}")).collect();
                let _ = parse_query(Some(&format!("bindings={encoded}")), &limits);
            }
        }
    }
}
