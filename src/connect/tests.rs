//! Unit tests of `connect`: the steps of a connect request, in orders a race produces.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use warp::http::HeaderMap;

use super::*;
use crate::broker::MemoryBroker;
use crate::config::Config;
use crate::subscription::Fanout;
use crate::testing::socket_pair;
use crate::topology::Topology;

/// The connect side of a gateway on the embedded broker, with the default settings.
fn streams() -> Streams {
    let config = Config::parse_from(["events-gateway", "--amqp-url="]).expect("config");
    let metrics = Metrics::new();
    let topology = Arc::new(Topology::new(metrics.clone()));
    let broker = MemoryBroker::new(topology.clone());
    let fanout = Fanout::new(config.stream.clone(), metrics.clone());
    let registry = Arc::new(Registry::new(
        topology,
        broker,
        fanout,
        config.caps,
        metrics.clone(),
    ));
    Streams {
        registry,
        admission: crate::admission::Admission::new(config.admission, metrics.clone()),
        metrics,
        limits: config.limits,
        settings: config.stream,
        draining: CancellationToken::new(),
    }
}

/// Everything the client reads until the gateway closes (5 s at most).
async fn read_to_end(client: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
        .await
        .expect("the stream ends within 5 s")
        .expect("read");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_stream_that_subscribes_as_the_drain_begins_still_ends_with_the_reconnect_frame() {
    let streams = streams();
    let query = "bindings=%7B%22bindings%22%3A%5B%7B%22exchange%22%3A%22exchange%2Fx%22%2C%22routingKeyPattern%22%3A%22%23%22%7D%5D%7D";
    let headers = HeaderMap::new();
    let (server, mut client) = socket_pair().await;
    let peer = server.peer_addr().expect("peer");
    let req = Request {
        peer,
        query: Some(query),
        headers: &headers,
        resumable: false,
        last_event_id: None,
    };

    // Act: the request passes the early check; the drain begins (token, then the marker
    // to every subscription there is); then the request subscribes (a new subscription,
    // which the marker never reached) and gets its answer, which is written.
    assert!(streams.early_answer(&req).is_none());
    streams.draining.cancel();
    streams.registry.announce_drain();
    let admitted = match streams.admit(&req) {
        Ok(admitted) => admitted,
        Err(_) => panic!("admitted"),
    };
    let answer = streams.open(&req, admitted);
    let from = FromLoop {
        peer,
        version: Version::Http10,
        full: false,
    };
    streams.deliver(server, from, false, answer).await;

    // Assert: the client is sent elsewhere, and the stream ends.
    let body = read_to_end(&mut client).await;
    assert!(
        body.contains("event: reconnect\ndata: {}\nid:\nretry: ") && body.ends_with("\n\n"),
        "the reconnect frame ends the stream: {body:?}"
    );
}
