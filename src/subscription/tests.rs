//! Unit tests of `subscription`: the hand-over from `ready` to the writers.

use super::*;
use crate::binding::Binding;
use crate::testing::socket_pair;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

fn subscription() -> Arc<Subscription> {
    let bindings = Arc::new(BindingSet::new(vec![Binding {
        exchange: "exchange/x".to_owned(),
        pattern: "#".to_owned(),
    }]));
    let fanout = Fanout::new(StreamSettings::default(), Metrics::new());
    Arc::new(Subscription::new(bindings, fanout))
}

#[tokio::test(flavor = "current_thread")]
async fn a_frame_sent_between_ready_and_attach_reaches_the_client() {
    let sub = subscription();
    let pinned = sub.pin();
    // Sent after the client was given `ready`, before its socket reached a writer: the
    // subscription has no writer yet, so only the pin keeps this frame.
    sub.send(Frame::message(
        Bytes::from_static(b"event: message\ndata: 1\nid: -\n\n"),
        Instant::now(),
    ));
    let (server, mut client) = socket_pair().await;
    let peer = server.peer_addr().expect("peer");
    let conn = Conn::new(
        server,
        peer,
        crate::wire::Version::Http10,
        false,
        pinned,
        Instant::now() + Duration::from_secs(60),
        Box::new(()),
    );
    sub.attach(conn, pinned);
    assert_eq!(sub.read(pinned, 10).map(|f| f.len()), Ok(1), "still held");

    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !got.ends_with(b"data: 1\nid: -\n\n") {
        let mut chunk = [0u8; 256];
        let n = tokio::time::timeout_at(deadline, client.read(&mut chunk))
            .await
            .expect("the frame within 5 s")
            .expect("read");
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
}
