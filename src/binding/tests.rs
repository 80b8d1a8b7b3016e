//! Unit tests of `binding`.

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
        err(r##"{"bindings":[{"exchange":"exchange/a","routingKeyPattern":"#"}],"foo":"bar"}"##),
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
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
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

#[test]
fn patterns_beyond_the_word_and_wildcard_limits_are_refused() {
    let limits = Limits {
        max_pattern_words: 4,
        max_pattern_hashes: 2,
        ..Limits::default()
    };
    let doc = |pattern: &str| {
        format!(r#"{{"bindings":[{{"exchange":"exchange/a","routingKeyPattern":"{pattern}"}}]}}"#)
    };
    assert!(parse_json(&doc("a.b.#.d"), &limits).is_ok());
    assert_eq!(
        parse_json(&doc("a.b.c.d.e"), &limits),
        Err(BindingError::TooManyWords {
            index: 0,
            words: 5,
            max: 4
        })
    );
    assert_eq!(
        parse_json(&doc("#.a.#.#"), &limits),
        Err(BindingError::TooManyHashes {
            index: 0,
            hashes: 3,
            max: 2
        })
    );
    assert_eq!(
        parse_json(&doc("#.a.#.#"), &limits)
            .expect_err("refused")
            .to_string(),
        "Binding 0: `routingKeyPattern` has 3 `#` wildcards; at most 2 are allowed"
    );
    // `#` inside a word is not a wildcard.
    assert!(parse_json(&doc("a#.b#.c#"), &limits).is_ok());
}
