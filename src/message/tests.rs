//! Unit tests of `message`.

use super::*;
use std::time::{Duration, UNIX_EPOCH};

#[test]
fn message_frame_matches_the_original_bytes() {
    let body =
        r#"{"status":"fooIsBar","n":1,"nested":{"list":[1,"two",null]},"unicode":"héllo ✓"}"#;
    let msg = Incoming {
        exchange: "exchange/conformance-transcript/v1/demo",
        routing_key: "primary.key.a",
        redelivered: false,
        cc: vec!["route.index.foo.bar", "not-a-route", "route.notify.a@b.c"],
        body: body.as_bytes(),
    };
    let expected = "event: message\ndata: {\"payload\":{\"status\":\"fooIsBar\",\"n\":1,\"nested\":{\"list\":[1,\"two\",null]},\"unicode\":\"héllo ✓\"},\"exchange\":\"exchange/conformance-transcript/v1/demo\",\"routingKey\":\"primary.key.a\",\"redelivered\":false,\"routes\":[\"index.foo.bar\",\"notify.a@b.c\"]}\nid: -\n\n";
    assert_eq!(msg.encode().expect("valid"), expected.as_bytes());
}

#[test]
fn a_frame_holds_no_more_memory_than_its_bytes_and_the_slack() {
    // Long names and many routes: beyond any fixed allowance, which would double the
    // buffer (and a frame in the replay window would hold twice its size).
    let exchange = format!("exchange/{}", "e".repeat(200));
    let key = "k.".repeat(100);
    let routes: Vec<String> = (0..20)
        .map(|i| format!("route.{i}.{}", "r".repeat(50)))
        .collect();
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(4000));
    let msg = Incoming {
        exchange: &exchange,
        routing_key: &key,
        redelivered: true,
        cc: routes.iter().map(String::as_str).collect(),
        body: body.as_bytes(),
    };
    let frame = msg.encode().expect("valid");
    let len = frame.len();
    let held = frame.try_into_mut().expect("unique").capacity();
    assert!(
        held >= len && held <= len + FRAME_SLACK,
        "{held} bytes for {len}"
    );
}

#[test]
fn payload_is_compacted_but_strings_are_kept() {
    let out = compact_json(b"{ \"a\" : [1, 2],\n \"b\": \"x y \\\" z\" }").expect("valid");
    assert_eq!(out, br#"{"a":[1,2],"b":"x y \" z"}"#);
}

#[test]
fn malformed_bodies_are_refused() {
    assert_eq!(compact_json(b"\xff\xfe"), Err(MalformedBody::NotUtf8));
    assert!(matches!(
        compact_json(b"{not json"),
        Err(MalformedBody::NotJson(_))
    ));
    assert!(matches!(compact_json(b""), Err(MalformedBody::NotJson(_))));
}

#[test]
fn control_frames() {
    assert_eq!(
        error_frame("Bindings must be an array of {exchange, routingKeyPattern}"),
        "event: error\ndata: \"Bindings must be an array of {exchange, routingKeyPattern}\"\nid: -\n\n"
    );
    assert_eq!(
        error_frame("\"undefined\" is not valid JSON"),
        "event: error\ndata: \"\\\"undefined\\\" is not valid JSON\"\nid: -\n\n"
    );
    let t = UNIX_EPOCH + Duration::from_millis(1_795_778_123_085);
    assert_eq!(
        ping_frame(t),
        "event: ping\ndata: {\"time\":\"2026-11-27T11:15:23.085Z\"}\nid: -\n\n"
    );
    assert_eq!(
        reconnect_frame(1500),
        "event: reconnect\ndata: {}\nid:\nretry: 1500\n\n"
    );
}
