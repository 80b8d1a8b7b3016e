//! The broker's application restarted under a running gateway (`rabbitmqctl stop_app`,
//! then `start_app`): every connection is closed by the broker and the node refuses new
//! ones for a while; the gateway's queues are durable, so they are there when it comes
//! back, and nothing is missed.
//!
//! This is its own test binary because it stops RabbitMQ for everyone: `cargo test` runs
//! test binaries one after another, so no other suite sees the outage. Do not run it in
//! parallel with the other suites (e.g. under a runner that runs binaries concurrently).
//! Should it fail half-way, a guard starts the broker's app again.

use std::time::Duration;

use events_gateway_test_support::*;

/// Starts the broker's app again if the test ends (or panics) while it is stopped.
struct RestartGuard {
    stopped: bool,
}

impl RestartGuard {
    async fn stop_app(&mut self) {
        rabbitmqctl_output(&["-q", "stop_app"]).await;
        self.stopped = true;
    }

    async fn start_app(&mut self) {
        rabbitmqctl_output(&["-q", "start_app"]).await;
        rabbitmqctl_output(&["-q", "await_startup"]).await;
        self.stopped = false;
    }
}

impl Drop for RestartGuard {
    fn drop(&mut self) {
        if self.stopped {
            let _ = std::process::Command::new(rabbitmqctl_program())
                .arg("start_app")
                .status();
        }
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_app_restarting_is_survived_and_its_queues_with_it() {
    // Durable, so that it survives the restart (as the gateway's queues do).
    // The declaring connection lives to the end of the test: dropping it deletes the
    // exchange.
    let declarer = Broker::connect().await;
    let ex = declarer.declare_exchange("restart", true).await;
    let gw = TestGateway::start(&["--ping-interval=300ms", "--ready-timeout=60s"]).await;
    let mut streaming = gw.raw_connect(&[(&ex, "#")]).await;
    let broker = Broker::connect().await;
    broker.publish(&ex, "k", &[], b"{\"n\":0}").await;
    streaming
        .read_until(b"{\"n\":0}", Duration::from_secs(5))
        .await;
    drop(broker);

    // Act: the broker's app stops; every connection to it is closed.
    let mut guard = RestartGuard { stopped: false };
    let stopped = std::time::Instant::now();
    guard.stop_app().await;
    let running = gw.running.as_ref().expect("running");
    eventually(Duration::from_secs(10), || !running.broker().is_connected()).await;
    assert_eq!(gw.status_of("/__heartbeat__").await, 503);

    // During the outage the stream stays open and keeps pinging, and a new client waits.
    streaming.buf.clear();
    streaming
        .read_until(b"event: ping", Duration::from_secs(3))
        .await;
    let ready_sum = "events_gateway_time_to_ready_seconds_sum";
    let ready_count = "events_gateway_time_to_ready_seconds_count";
    let (sum_before, count_before) = (gw.metric(ready_sum).await, gw.metric(ready_count).await);
    let waiting_since = std::time::Instant::now();
    let mut waiting = gw.connect(&[(&ex, "waiting.#")]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waited_in_outage = waiting_since.elapsed();

    guard.start_app().await;
    let back = std::time::Instant::now();

    // Assert: reconnected; the queue survived (nothing missed), and is consumed again.
    eventually(Duration::from_secs(60), || running.broker().is_connected()).await;
    eprintln!(
        "reconnected {:?} after the broker's app was up ({:?} after it was stopped)",
        back.elapsed(),
        stopped.elapsed()
    );
    let ready = loop {
        let event = waiting
            .next_within(Duration::from_secs(30))
            .await
            .expect("ready");
        if event.event != "ping" {
            break event;
        }
    };
    assert_eq!((ready.event.as_str(), ready.data.as_str()), ("ready", "{}"));
    // Its `ready` came after the broker was back, not during the outage: the gateway's own
    // time-to-ready for it covers at least the time it spent waiting in the outage.
    assert_eq!(gw.metric(ready_count).await - count_before, 1.0);
    let time_to_ready = gw.metric(ready_sum).await - sum_before;
    assert!(
        time_to_ready >= waited_in_outage.as_secs_f64(),
        "ready after {time_to_ready:.3} s, but the client had already waited {waited_in_outage:?} in the outage"
    );
    broker_eventually(&gw.queue_prefix, Duration::from_secs(10), |o| {
        o.queues.len() == 1 && o.bindings.len() == 2 && o.consumers == 1
    })
    .await;
    // The connection lost in the restart had held only seconds: the new one is healthy
    // once it has been up 5 s (a flapping broker must not look healthy).
    eventually(Duration::from_secs(10), || {
        running.broker().health().healthy
    })
    .await;
    assert_eq!(gw.status_of("/__heartbeat__").await, 200);
    assert!(gw.metric("events_gateway_broker_reconnects_total").await >= 1.0);

    let broker = Broker::connect().await;
    for n in 1..=10 {
        broker
            .publish(&ex, "k", &[], format!("{{\"n\":{n}}}").as_bytes())
            .await;
    }
    broker.publish(&ex, "waiting.k", &[], b"{\"n\":11}").await;
    streaming
        .read_until(b"{\"n\":11}", Duration::from_secs(10))
        .await;
    for n in 1..=11 {
        assert_eq!(
            count(&streaming.buf, format!("{{\"n\":{n}}}").as_bytes()),
            1,
            "message {n} arrives exactly once"
        );
    }
    assert_eq!(
        count(&streaming.buf, b"may have been missed"),
        0,
        "the durable queue survived: no notice"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let message = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = waiting.next_within(left).await.expect("stream stays open");
        if event.event != "ping" {
            break event;
        }
    };
    assert_eq!(message.event, "message");
    assert_eq!(message_json(&message.data)["payload"]["n"], 11);
    gw.shutdown().await;
}
