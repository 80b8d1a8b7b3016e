//! Unit tests of `subscription`: the hand-over from `ready` to the writers.

use super::*;
use crate::binding::Binding;
use crate::metrics::Metrics;
use crate::testing::socket_pair;
use bytes::Bytes;
use std::time::Duration;
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

/// A resumable subscription on `exchange/<name>` sharing `fanout`.
fn resumable(name: &str, fanout: &Arc<Fanout>) -> Arc<Subscription> {
    let bindings = Arc::new(BindingSet::new(vec![Binding {
        exchange: format!("exchange/{name}"),
        pattern: "#".to_owned(),
    }]));
    let sub = Arc::new(Subscription::new(bindings, fanout.clone()));
    sub.mark_resumable();
    sub
}

fn kib_frame(n: u8) -> Frame {
    Frame::message(Bytes::from(vec![n; 1024]), Instant::now())
}

#[test]
fn replay_memory_is_bounded_over_all_subscriptions_oldest_first() {
    let settings = StreamSettings {
        replay_memory: 64 * 1024,
        ..StreamSettings::default()
    };
    let fanout = Fanout::new(settings, Metrics::new());
    let old = resumable("old", &fanout);
    let new = resumable("new", &fanout);
    // 40 KiB to the first, then 40 KiB to the second: 80 KiB asked, 64 KiB allowed.
    for n in 0..40 {
        old.send(kib_frame(n));
    }
    for n in 0..40 {
        new.send(kib_frame(n));
    }
    let used = fanout.replay.used();
    assert!(used <= 64 * 1024, "{used} bytes held");
    // The oldest went first: the first subscription lost frames, the second none.
    let (old_held, _) = old.held();
    let (new_held, _) = new.held();
    assert!(old_held < 40 && new_held == 40, "{old_held} and {new_held}");
    // What a client still needs is never dropped for replay memory.
    let pinned = old.pin();
    for n in 0..40 {
        old.send(kib_frame(n));
    }
    assert_eq!(old.read(pinned, 100).map(|f| f.len()), Ok(40));
    drop((old, new));
    assert_eq!(
        fanout.replay.used(),
        0,
        "a log gives its bytes back when it goes"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_tap_reads_each_frame_once_in_order_is_told_what_it_lost_and_releases_its_pin() {
    let mut settings = StreamSettings::default();
    settings.log.max_frames = 4;
    let fanout = Fanout::new(settings, Metrics::new());
    let sub = Arc::new(Subscription::new(subscription().bindings.clone(), fanout));
    let mut tap = sub.tap(sub.pin());
    let frame = |n: u8| Frame::message(Bytes::from(vec![n]), Instant::now());

    // Woken by a frame sent while it waits.
    let waiter = sub.clone();
    let wait = tokio::spawn(async move {
        tokio::task::yield_now().await;
        waiter.send(frame(1));
    });
    tokio::time::timeout(Duration::from_secs(5), tap.changed())
        .await
        .expect("woken by the frame");
    wait.await.expect("sender");
    sub.send(frame(2));
    let firsts = |taken: Taken| match taken {
        Taken::Frames(frames) => frames.iter().map(|f| f.bytes[0]).collect::<Vec<_>>(),
        Taken::Lagged(n) => panic!("lagged {n}"),
    };
    assert_eq!(firsts(tap.take(1)), vec![1]);
    assert_eq!(firsts(tap.take(10)), vec![2]);
    assert_eq!(firsts(tap.take(10)), Vec::<u8>::new());
    // The log holds what the tap has not read, within its bounds: 6 frames into 4.
    for n in 3..9 {
        sub.send(frame(n));
    }
    assert!(matches!(tap.take(10), Taken::Lagged(2)));
    assert_eq!(firsts(tap.take(10)), vec![5, 6, 7, 8]);
    assert_eq!(sub.held().0, 0, "nothing kept past the tap's position");
    sub.send(frame(9));
    assert_eq!(sub.held().0, 1, "kept for the tap");
    drop(tap);
    assert_eq!(sub.held().0, 0, "the pin went with the tap");
}
