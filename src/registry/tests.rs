//! Unit tests of `registry`.

use std::time::Duration;

use super::*;
use crate::binding::Binding;
use crate::subscription::Conn;
use crate::topology::{BindError, BindState};
use std::sync::Mutex;

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Reconcile for Recorder {
    fn exchange_changed(&self, exchange: &str) {
        self.0.lock().expect("lock").push(exchange.to_owned());
    }
}

fn set(pairs: &[(&str, &str)]) -> BindingSet {
    BindingSet::new(
        pairs
            .iter()
            .map(|(e, p)| Binding {
                exchange: (*e).to_owned(),
                pattern: (*p).to_owned(),
            })
            .collect(),
    )
}

fn registry() -> (Arc<Registry>, Arc<Topology>, Arc<Recorder>) {
    let metrics = Metrics::new();
    let topology = Arc::new(Topology::new(metrics.clone()));
    let recorder = Arc::new(Recorder::default());
    let fanout = Fanout::new(
        crate::subscription::StreamSettings::default(),
        metrics.clone(),
    );
    let registry = Arc::new(Registry::new(
        topology.clone(),
        recorder.clone(),
        fanout,
        Caps::default(),
        metrics,
    ));
    (registry, topology, recorder)
}

#[test]
fn equal_sets_share_one_subscription_and_the_last_leaver_unbinds() {
    let (registry, topology, recorder) = registry();
    let a = registry
        .subscribe(set(&[("exchange/x", "a.#"), ("exchange/y", "#")]), || true)
        .expect("within the caps");
    let b = registry
        .subscribe(set(&[("exchange/y", "#"), ("exchange/x", "a.#")]), || true)
        .expect("within the caps");
    assert_eq!(registry.len(), 1);
    assert!(Arc::ptr_eq(
        a.subscription().expect("subscribed"),
        b.subscription().expect("subscribed")
    ));
    assert_eq!(topology.wanted("exchange/x"), vec!["a.#".to_owned()]);
    assert_eq!(recorder.0.lock().expect("lock").len(), 2);

    drop(a);
    assert_eq!(registry.len(), 1);
    assert_eq!(topology.wanted("exchange/x").len(), 1);
    drop(b);
    assert!(registry.is_empty());
    assert!(topology.wanted("exchange/x").is_empty());
    assert!(topology.exchanges().is_empty());
    assert_eq!(recorder.0.lock().expect("lock").len(), 4);
}

#[test]
fn overlapping_sets_share_bindings() {
    let (registry, topology, _) = registry();
    let a = registry
        .subscribe(set(&[("exchange/x", "a.#")]), || true)
        .expect("within the caps");
    let b = registry
        .subscribe(set(&[("exchange/x", "a.#"), ("exchange/x", "b")]), || true)
        .expect("within the caps");
    assert_eq!(registry.len(), 2);
    let mut wanted = topology.wanted("exchange/x");
    wanted.sort();
    assert_eq!(wanted, vec!["a.#".to_owned(), "b".to_owned()]);
    drop(b);
    assert_eq!(topology.wanted("exchange/x"), vec!["a.#".to_owned()]);
    drop(a);
    assert!(topology.exchanges().is_empty());
}

#[tokio::test]
async fn ready_waits_for_every_binding_and_reports_refusals() {
    let (registry, topology, _) = registry();
    let client = registry
        .subscribe(set(&[("exchange/x", "a"), ("exchange/y", "b")]), || true)
        .expect("within the caps");
    let ready = client.ready(Duration::from_secs(5));
    topology.set_state("exchange/x", "a", BindState::Bound);
    topology.set_state(
        "exchange/y",
        "b",
        BindState::Failed(BindError::NoSuchExchange("exchange/y".into())),
    );
    assert_eq!(
        ready.await,
        Err(BindError::NoSuchExchange("exchange/y".into()))
    );
    // A refused binding is not wanted any more, but a new subscription retries it.
    assert!(topology.wanted("exchange/y").is_empty());
    let other = registry
        .subscribe(set(&[("exchange/y", "b"), ("exchange/y", "c")]), || true)
        .expect("within the caps");
    assert_eq!(topology.wanted("exchange/y").len(), 2);
    drop((client, other));
    assert!(topology.exchanges().is_empty());
}

#[tokio::test]
async fn ready_times_out() {
    let (registry, _, _) = registry();
    let client = registry
        .subscribe(set(&[("exchange/x", "a")]), || true)
        .expect("within the caps");
    let result = client.ready(Duration::from_millis(10)).await;
    assert_eq!(result, Err(BindError::Timeout));
}

#[test]
fn concurrent_join_and_leave_leaves_nothing() {
    let (registry, topology, _) = registry();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let registry = registry.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let pattern = format!("p{}", (i + t) % 3);
                    let client = registry
                        .subscribe(set(&[("exchange/x", &pattern)]), || true)
                        .expect("within the caps");
                    drop(client);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert!(registry.is_empty());
    assert!(topology.exchanges().is_empty());
}

/// A registry whose resumable subscriptions linger for `grace`.
fn lingering_registry(grace: Duration) -> Arc<Registry> {
    lingering_registry_with(grace, Caps::default())
}

fn lingering_registry_with(grace: Duration, caps: Caps) -> Arc<Registry> {
    let metrics = Metrics::new();
    let topology = Arc::new(Topology::new(metrics.clone()));
    let settings = crate::subscription::StreamSettings {
        resume_grace: grace,
        ..Default::default()
    };
    let fanout = Fanout::new(settings, metrics.clone());
    Arc::new(Registry::new(
        topology,
        Arc::new(Recorder::default()),
        fanout,
        caps,
        metrics,
    ))
}

/// Joins `set` as a resumable client and leaves at once.
fn join_and_leave(registry: &Arc<Registry>, pairs: &[(&str, &str)]) {
    let client = registry
        .subscribe(set(pairs), || true)
        .expect("within the caps");
    client.subscription().expect("subscribed").mark_resumable();
    drop(client);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_lingering_subscription_goes_one_grace_period_after_its_last_client() {
    let registry = lingering_registry(Duration::from_secs(30));
    join_and_leave(&registry, &[("exchange/x", "a")]);
    assert_eq!(registry.len(), 1, "it lingers");

    // A client comes and goes 20 s later: the grace period runs from then.
    tokio::time::sleep(Duration::from_secs(20)).await;
    join_and_leave(&registry, &[("exchange/x", "a")]);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(registry.len(), 1, "49 s in, 29 s after the last client");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(registry.is_empty(), "gone 31 s after the last client");
    assert_eq!(registry.lingering.len(), 0);

    // A client that holds it at the deadline keeps it, and it lingers again after.
    join_and_leave(&registry, &[("exchange/x", "b")]);
    let held = registry
        .subscribe(set(&[("exchange/x", "b")]), || true)
        .expect("within the caps");
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(registry.len(), 1, "held by a client");
    drop(held);
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(registry.len(), 1, "lingers again after its last client");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(registry.is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn churn_on_lingering_subscriptions_adds_no_task_and_no_timer_entry() {
    let registry = lingering_registry(Duration::from_secs(30));
    join_and_leave(&registry, &[("exchange/x", "warm")]);
    tokio::task::yield_now().await;
    let runtime = tokio::runtime::Handle::current().metrics();
    let tasks_before = runtime.num_alive_tasks();

    // Act: 2,000 departures from 10 resumable subscriptions.
    for i in 0..2000 {
        let pattern = format!("p{}", i % 10);
        join_and_leave(&registry, &[("exchange/x", &pattern)]);
    }
    tokio::task::yield_now().await;

    assert_eq!(registry.len(), 11, "all linger");
    assert_eq!(registry.lingering.len(), 11, "one timer entry each");
    assert_eq!(
        runtime.num_alive_tasks(),
        tasks_before,
        "no task per departure"
    );
}

#[test]
fn a_server_stop_with_a_resumable_client_waiting_for_its_writer_does_not_deadlock() {
    // A deadlock would hang the runtime's thread: the test waits for it with a deadline.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let registry = lingering_registry(Duration::from_secs(30));
            let client = registry
                .subscribe(set(&[("exchange/x", "a")]), || true)
                .expect("within the caps");
            client.subscription().expect("subscribed").mark_resumable();
            let (socket, _client) = crate::testing::socket_pair().await;
            let peer = socket.peer_addr().expect("peer");
            // Handed to a new writer, whose task has not run yet; then the server stops:
            // the writer drops the client it never took, its last client.
            let (member, subscription, at) = client.into_stream().expect("subscribed");
            let conn = Conn::new(
                socket,
                peer,
                crate::wire::Version::Http10,
                true,
                at,
                std::time::Instant::now() + Duration::from_secs(60),
                Box::new(member),
            );
            subscription.attach(conn, at);
            registry.fanout.closing.cancel();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(registry.len(), 1, "it lingers for a reconnect");
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the writer let go of its client without a deadlock");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn lingering_subscriptions_make_room_for_live_clients_oldest_first() {
    let caps = Caps {
        max_subscriptions: 2,
        max_lingering: 2,
        ..Caps::default()
    };
    let registry = lingering_registry_with(Duration::from_secs(30), caps);
    join_and_leave(&registry, &[("exchange/x", "old")]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    join_and_leave(&registry, &[("exchange/x", "newer")]);
    assert_eq!(registry.len(), 2, "both linger, at the cap");

    // A live client needs a subscription of its own: the oldest lingering one goes.
    let live = registry
        .subscribe(set(&[("exchange/x", "live")]), || true)
        .expect("room made");
    let left: Vec<_> = registry
        .subscriptions
        .iter()
        .map(|e| e.key().iter().next().map(|b| b.pattern.clone()))
        .collect();
    assert_eq!(registry.len(), 2);
    assert!(!left.contains(&Some("old".to_owned())), "{left:?}");
    assert!(left.contains(&Some("newer".to_owned())), "{left:?}");
    drop(live);

    // Re-joining a lingering subscription takes the client's token, as creating does.
    let refused = registry.subscribe(set(&[("exchange/x", "newer")]), || false);
    assert!(matches!(refused, Err(Refusal::AddressRate)));
    let joined = registry.subscribe(set(&[("exchange/x", "newer")]), || true);
    assert!(joined.is_ok());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn lingering_subscriptions_have_a_cap_of_their_own() {
    let caps = Caps {
        max_lingering: 3,
        ..Caps::default()
    };
    let registry = lingering_registry_with(Duration::from_secs(30), caps);
    for i in 0..10 {
        join_and_leave(&registry, &[("exchange/x", &format!("p{i}"))]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(registry.len(), 3, "the newest three linger");
    assert_eq!(registry.lingering_count.load(Ordering::Relaxed), 3);
}
