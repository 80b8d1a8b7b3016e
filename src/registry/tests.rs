//! Unit tests of `registry`.

use super::*;
use crate::binding::Binding;
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
