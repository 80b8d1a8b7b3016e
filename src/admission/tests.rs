//! Unit tests of `admission`.

use super::*;
use crate::binding::BindingSet;
use warp::http::{HeaderMap, HeaderValue};

fn admission(limits: AdmissionLimits) -> Arc<Admission> {
    Admission::new(limits, Metrics::new())
}

#[test]
fn connections_are_limited_per_address_and_in_all() {
    let a = admission(AdmissionLimits {
        max_connections: 3,
        per_address: 2,
        ..AdmissionLimits::default()
    });
    let one: IpAddr = "127.0.0.2".parse().expect("ip");
    let two: IpAddr = "127.0.0.3".parse().expect("ip");
    let s1 = a.try_take(one).expect("first");
    let _s2 = a.try_take(one).expect("second");
    assert_eq!(a.try_take(one).err(), Some(Full::Address));
    let _s3 = a.try_take(two).expect("another address");
    assert_eq!(a.try_take(two).err(), Some(Full::Process));
    drop(s1);
    let _s4 = a.try_take(one).expect("a slot freed");
    assert_eq!(a.open(), 3);
}

#[test]
fn state_goes_with_the_last_connection_of_an_address() {
    let a = admission(AdmissionLimits::default());
    let slots: Vec<_> = (0..100)
        .map(|i| a.try_take(IpAddr::from([10, 0, 0, i])).expect("slot"))
        .collect();
    assert_eq!(a.addresses(), 100);
    drop(slots);
    assert_eq!((a.addresses(), a.open()), (0, 0));
}

#[test]
fn new_subscriptions_from_one_address_are_rate_limited() {
    let a = admission(AdmissionLimits {
        subscription_rate: 0.001,
        subscription_burst: 3.0,
        ..AdmissionLimits::default()
    });
    let slot = a.try_take("127.0.0.2".parse().expect("ip")).expect("slot");
    let allowed = (0..10)
        .filter(|_| a.allow_new_subscription(slot.client()))
        .count();
    assert_eq!(allowed, 3);
    let other = a.try_take("127.0.0.3".parse().expect("ip")).expect("slot");
    assert!(
        a.allow_new_subscription(other.client()),
        "another address has its own bucket"
    );
    // Leaving and coming back does not refill the bucket.
    let key = slot.client();
    drop(slot);
    let again = a.try_take("127.0.0.2".parse().expect("ip")).expect("slot");
    assert_eq!(again.client(), key);
    assert!(!a.allow_new_subscription(again.client()));
}

#[test]
fn the_connections_of_an_address_share_a_budget_of_bindings_and_exchanges() {
    use crate::binding::Binding;
    let set = |exchanges: &[&str], patterns: usize| {
        BindingSet::new(
            exchanges
                .iter()
                .flat_map(|e| {
                    (0..patterns).map(move |p| Binding {
                        exchange: (*e).to_owned(),
                        pattern: format!("p{p}"),
                    })
                })
                .collect(),
        )
    };
    let a = admission(AdmissionLimits {
        bindings_per_address: 10,
        exchanges_per_address: 3,
        ..AdmissionLimits::default()
    });
    let ip: IpAddr = "127.0.0.2".parse().expect("ip");
    let mut one = a.try_take(ip).expect("slot");
    one.hold(&set(&["x", "y"], 3))
        .expect("6 bindings, 2 exchanges");
    let mut two = a.try_take(ip).expect("slot");
    assert_eq!(two.hold(&set(&["x"], 5)), Err(OverShare::Bindings(10)));
    two.hold(&set(&["x", "y"], 1))
        .expect("shared exchanges count once");
    let mut three = a.try_take(ip).expect("slot");
    assert_eq!(
        three.hold(&set(&["z", "w"], 1)),
        Err(OverShare::Exchanges(3))
    );
    drop((one, two));
    three.hold(&set(&["z", "w", "v"], 1)).expect("room again");
    let mut other = a.try_take("127.0.0.3".parse().expect("ip")).expect("slot");
    other
        .hold(&set(&["a", "b", "c"], 3))
        .expect("another address");
}

#[test]
fn forwarded_addresses_count_only_behind_trusted_proxies() {
    let a = admission(AdmissionLimits {
        trusted_proxies: vec!["10.0.0.0/8".parse().expect("net")],
        ..AdmissionLimits::default()
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.7, 203.0.113.9, 10.1.2.3"),
    );
    let proxy: IpAddr = "10.9.9.9".parse().expect("ip");
    let stranger: IpAddr = "192.0.2.1".parse().expect("ip");
    assert_eq!(
        a.client_address(proxy, &headers),
        "203.0.113.9".parse::<IpAddr>().expect("ip"),
        "the last untrusted hop, not what the client claimed first"
    );
    assert_eq!(
        a.client_address(stranger, &headers),
        stranger,
        "not a trusted proxy"
    );
    assert_eq!(a.client_address(proxy, &HeaderMap::new()), proxy);
}

#[test]
fn forwarded_entries_with_ports_count_and_garbage_ends_the_walk() {
    let a = admission(AdmissionLimits {
        trusted_proxies: vec![
            "10.0.0.0/8".parse().expect("net"),
            "192.0.2.7/32".parse().expect("net"),
        ],
        ..AdmissionLimits::default()
    });
    let proxy: IpAddr = "10.9.9.9".parse().expect("ip");
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    let from = |xff: &'static str, peer: IpAddr| {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static(xff));
        a.client_address(peer, &headers)
    };
    // What proxies append: a port, brackets.
    assert_eq!(from("203.0.113.9:5512", proxy), ip("203.0.113.9"));
    assert_eq!(from("[2001:db8::5]:443", proxy), ip("2001:db8::5"));
    assert_eq!(from("[2001:db8::5]", proxy), ip("2001:db8::5"));
    // An entry that is not an address ends the walk: what is left of it (a client could
    // have written it) is not believed; the nearest address that parsed counts.
    assert_eq!(from("198.51.100.1, unknown", proxy), proxy);
    assert_eq!(
        from("198.51.100.1, garbage, 10.1.1.1", proxy),
        ip("10.1.1.1")
    );
    assert_eq!(from("198.51.100.1:99999", proxy), proxy, "not a port");
    // Bytes that are not text spoil their own entry only, not the proxy's after them.
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.9").expect("obs-text"),
    );
    assert_eq!(a.client_address(proxy, &headers), ip("203.0.113.9"));
    // A dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d.
    assert_eq!(
        from("203.0.113.9", ip("::ffff:192.0.2.7")),
        ip("203.0.113.9")
    );
    assert_eq!(from("::ffff:203.0.113.9", proxy), ip("203.0.113.9"));
}

#[test]
fn behind_proxies_that_write_forwarded_only_its_for_parameters_count() {
    let a = admission(AdmissionLimits {
        trusted_proxies: vec!["10.0.0.0/8".parse().expect("net")],
        forwarded_header: ForwardedHeader::Forwarded,
        ..AdmissionLimits::default()
    });
    let proxy: IpAddr = "10.9.9.9".parse().expect("ip");
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    let from = |pairs: &[(&'static str, &'static str)]| {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        a.client_address(proxy, &headers)
    };
    // RFC 7239's forms: quoted ports and IPv6, other parameters, case, several headers.
    assert_eq!(
        from(&[("forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43")]),
        ip("192.0.2.60")
    );
    assert_eq!(
        from(&[("forwarded", "For=\"[2001:db8:cafe::17]:4711\"")]),
        ip("2001:db8:cafe::17")
    );
    assert_eq!(
        from(&[
            ("forwarded", "for=198.51.100.1"),
            ("forwarded", "for=\"203.0.113.9:5512\", for=10.1.1.1")
        ]),
        ip("203.0.113.9"),
        "the last untrusted hop over every header line"
    );
    // What a trusted proxy cannot have written ends the walk at the nearest address.
    for (value, expected) in [
        ("for=198.51.100.1, for=unknown", proxy),
        ("for=198.51.100.1, for=_hidden", proxy),
        (
            "for=198.51.100.1, for=garbage, for=10.1.1.1",
            ip("10.1.1.1"),
        ),
        ("for=198.51.100.1, proto=https", proxy),
        ("for=\"198.51.100.1:99999\"", proxy),
        ("for=198.51.100.1, novalue", proxy),
    ] {
        assert_eq!(
            from(&[("forwarded", value)]),
            expected,
            "Forwarded: {value}"
        );
    }
    // A second `for=` in one element (RFC 7239 allows one), say from a Host the proxy
    // copied after its own: the element is refused, never its last `for=` believed.
    assert_eq!(
        from(&[(
            "forwarded",
            "for=198.51.100.1, for=203.0.113.5;host=a;for=6.6.6.6"
        )]),
        proxy
    );
    // What the RFC allows beside `for=` spoils nothing: odd `by=`, empty pairs, spaces,
    // obfuscated ports.
    for value in [
        "for=203.0.113.5;by=_gw-1",
        "for=203.0.113.5;",
        "for=203.0.113.5 ;proto=https",
        "for=\"203.0.113.5:_p1\"",
        "proto=https;FOR=203.0.113.5",
    ] {
        assert_eq!(
            from(&[("forwarded", value)]),
            ip("203.0.113.5"),
            "Forwarded: {value}"
        );
    }
    // A client's opening quote or bytes that are not text spoil only its own piece.
    assert_eq!(
        from(&[("forwarded", "for=\"6.6.6.6, for=203.0.113.5")]),
        ip("203.0.113.5")
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        "forwarded",
        HeaderValue::from_bytes(b"for=\"\xff\", for=203.0.113.5").expect("obs-text"),
    );
    assert_eq!(a.client_address(proxy, &headers), ip("203.0.113.5"));
    // The other header is a client's to write: not read.
    assert_eq!(from(&[("x-forwarded-for", "203.0.113.9")]), proxy);
    assert_eq!(
        from(&[("forwarded", "for=\"[::ffff:203.0.113.9]\"")]),
        ip("203.0.113.9")
    );
}

#[test]
fn ipv6_clients_count_by_their_64() {
    let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
    let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
    let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
    assert_eq!(ClientKey::of(a), ClientKey::of(b));
    assert_ne!(ClientKey::of(a), ClientKey::of(c));
    let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
    assert_eq!(ClientKey::of(mapped).to_string(), "192.0.2.1");
}

mod forwarding_properties {
    use super::*;
    use crate::admission::forwarded::canonical;
    use proptest::prelude::*;

    /// What a client may write into a forwarding header: pieces an attacker would try
    /// (separators, quotes, `for=`, brackets, trusted and untrusted addresses, bytes that
    /// are not text), in any order.
    fn client_line() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b",".to_vec()),
            Just(b";".to_vec()),
            Just(b"\"".to_vec()),
            Just(b"\\".to_vec()),
            Just(b"for=".to_vec()),
            Just(b"FOR =".to_vec()),
            Just(b"by=_a-b".to_vec()),
            Just(b"[".to_vec()),
            Just(b"]".to_vec()),
            Just(b":".to_vec()),
            Just(b" ".to_vec()),
            Just(b"unknown".to_vec()),
            Just(b"_hidden".to_vec()),
            Just(b"6.6.6.6".to_vec()),
            Just(b"10.1.2.3".to_vec()),
            Just(b"[2001:db8::6]:80".to_vec()),
            (0x80u8..=0xff).prop_map(|b| vec![b]),
            "[ -~]{0,6}".prop_map(String::into_bytes),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
    }

    /// The client's address as the proxy writes it, for either header.
    fn entry(addr: IpAddr, port: Option<u16>, header: ForwardedHeader) -> String {
        let node = match (addr, port) {
            (IpAddr::V4(v4), None) => v4.to_string(),
            (IpAddr::V4(v4), Some(p)) => format!("{v4}:{p}"),
            (IpAddr::V6(v6), None) => format!("[{v6}]"),
            (IpAddr::V6(v6), Some(p)) => format!("[{v6}]:{p}"),
        };
        match header {
            ForwardedHeader::XForwardedFor => node,
            ForwardedHeader::Forwarded => format!("for=\"{node}\""),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever a client writes into the header, the trusted proxy's entry after it
        /// (appended to the client's last line, or on a line of its own) decides the
        /// address: the client is never counted as another one.
        #[test]
        fn what_a_client_writes_never_changes_its_address(
            lines in proptest::collection::vec(client_line(), 0..3),
            real in any::<IpAddr>(),
            port in proptest::option::of(any::<u16>()),
            forwarded in any::<bool>(),
            own_line in any::<bool>(),
        ) {
            let trusted: ipnet::IpNet = "10.0.0.0/8".parse().expect("net");
            let expected = canonical(real);
            prop_assume!(!trusted.contains(&expected));
            let header = if forwarded { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
            let a = admission(AdmissionLimits {
                trusted_proxies: vec![trusted],
                forwarded_header: header,
                ..AdmissionLimits::default()
            });
            let name = if forwarded { "forwarded" } else { "x-forwarded-for" };
            let mut lines = lines;
            let appended = entry(real, port, header);
            match lines.last_mut() {
                Some(last) if !own_line => last.extend_from_slice(format!(", {appended}").as_bytes()),
                _ => lines.push(appended.into_bytes()),
            }
            let mut headers = HeaderMap::new();
            for line in &lines {
                let value = HeaderValue::from_bytes(line);
                prop_assume!(value.is_ok());
                if let Ok(value) = value {
                    headers.append(name, value);
                }
            }
            let peer: IpAddr = "10.9.9.9".parse().expect("ip");
            prop_assert_eq!(a.client_address(peer, &headers), expected);
        }
    }
}
