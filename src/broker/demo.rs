//! Demo traffic for the embedded broker: a steady, realistic stream of Taskcluster task
//! events, so that a fresh `cargo run` has something to watch at once.
//!
//! Tasks go through Taskcluster's lifecycle (defined → pending → running → completed,
//! failed or exception) on the `exchange/taskcluster-queue/v1/task-*` exchanges, with
//! Taskcluster's routing keys (`primary.<taskId>.<runId>.<workerGroup>.<workerId>.
//! <provisionerId>.<workerType>.<schedulerId>.<taskGroupId>.`, `_` for a field not known
//! yet) and a Treeherder route in `CC` (`route.tc-treeherder.v2.<project>.<revision>.<pushId>`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::MissedTickBehavior;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::IntervalStream;
use tokio_util::sync::CancellationToken;

use super::MemoryBroker;

/// The exchanges the demo publishes to.
pub const EXCHANGES: [&str; 6] = [
    "exchange/taskcluster-queue/v1/task-defined",
    "exchange/taskcluster-queue/v1/task-pending",
    "exchange/taskcluster-queue/v1/task-running",
    "exchange/taskcluster-queue/v1/task-completed",
    "exchange/taskcluster-queue/v1/task-failed",
    "exchange/taskcluster-queue/v1/task-exception",
];

const PROJECTS: [&str; 4] = ["try", "autoland", "mozilla-central", "mozilla-beta"];
const WORKER_TYPES: [&str; 4] = ["b-linux", "t-linux-large", "t-win10-64", "b-osx-arm64"];
/// Tasks in flight at most; beyond, the demo only advances existing tasks.
const MAX_IN_FLIGHT: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Defined,
    Pending,
    Running,
}

struct Task {
    task_id: String,
    group_id: String,
    project: &'static str,
    revision: String,
    push_id: u32,
    worker_type: &'static str,
    worker_id: String,
    state: State,
}

/// Publishes demo events at `rate` messages per second until `shutdown`.
pub async fn run(broker: Arc<MemoryBroker>, rate: f64, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut ticks = IntervalStream::new(tick);
    let mut tasks: VecDeque<Task> = VecDeque::new();
    let mut push = Push::new();
    loop {
        tokio::select! {
            Some(_) = ticks.next() => {}
            () = shutdown.cancelled() => return,
        }
        let advance = !tasks.is_empty() && (tasks.len() >= MAX_IN_FLIGHT || fastrand::bool());
        if !advance {
            if fastrand::u8(..10) == 0 {
                push = Push::new();
            }
            let task = push.task();
            publish(&broker, &task, 0);
            tasks.push_back(task);
            continue;
        }
        let i = fastrand::usize(..tasks.len());
        let next = match tasks[i].state {
            State::Defined => Some(State::Pending),
            State::Pending => Some(State::Running),
            State::Running => None,
        };
        match next {
            Some(state) => {
                tasks[i].state = state;
                publish(&broker, &tasks[i], 0);
            }
            None => {
                if let Some(task) = tasks.remove(i) {
                    let outcome = match fastrand::u8(..20) {
                        0 => 5,     // exception
                        1..=3 => 4, // failed
                        _ => 3,     // completed
                    };
                    publish(&broker, &task, outcome);
                }
            }
        }
    }
}

/// A push: a revision on a project, whose tasks share a task group.
struct Push {
    project: &'static str,
    revision: String,
    push_id: u32,
    group_id: String,
}

impl Push {
    fn new() -> Self {
        Self {
            project: PROJECTS[fastrand::usize(..PROJECTS.len())],
            revision: (0..40)
                .map(|_| char::from_digit(fastrand::u32(..16), 16).unwrap_or('0'))
                .collect(),
            push_id: fastrand::u32(1000..99_999),
            group_id: slug_id(),
        }
    }

    fn task(&self) -> Task {
        Task {
            task_id: slug_id(),
            group_id: self.group_id.clone(),
            project: self.project,
            revision: self.revision.clone(),
            push_id: self.push_id,
            worker_type: WORKER_TYPES[fastrand::usize(..WORKER_TYPES.len())],
            worker_id: format!("i-{:016x}", fastrand::u64(..)),
            state: State::Defined,
        }
    }
}

/// Publishes the event for `task`'s state; `resolved` picks completed (3), failed (4) or
/// exception (5) for a finished task, 0 otherwise.
fn publish(broker: &MemoryBroker, task: &Task, resolved: usize) {
    let (exchange, state) = match (resolved, task.state) {
        (3, _) => (EXCHANGES[3], "completed"),
        (4, _) => (EXCHANGES[4], "failed"),
        (5, _) => (EXCHANGES[5], "exception"),
        (_, State::Defined) => (EXCHANGES[0], "unscheduled"),
        (_, State::Pending) => (EXCHANGES[1], "pending"),
        (_, State::Running) => (EXCHANGES[2], "running"),
    };
    let started = task.state != State::Defined && task.state != State::Pending || resolved != 0;
    let (run_id, worker_group, worker_id) = match task.state {
        State::Defined => ("_".to_owned(), "_", "_"),
        State::Pending if resolved == 0 => ("0".to_owned(), "_", "_"),
        _ => ("0".to_owned(), "us-east-1", task.worker_id.as_str()),
    };
    let provisioner = "proj-gecko";
    let scheduler = "gecko-level-1";
    let routing_key = format!(
        "primary.{}.{run_id}.{worker_group}.{worker_id}.{provisioner}.{}.{scheduler}.{}.",
        task.task_id, task.worker_type, task.group_id
    );
    let route = format!(
        "route.tc-treeherder.v2.{}.{}.{}",
        task.project, task.revision, task.push_id
    );
    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let mut runs = Vec::new();
    if task.state != State::Defined {
        let mut run = serde_json::json!({
            "runId": 0,
            "state": state,
            "reasonCreated": "scheduled",
            "scheduled": now,
        });
        if started {
            run["workerGroup"] = "us-east-1".into();
            run["workerId"] = task.worker_id.clone().into();
            run["started"] = now.clone().into();
        }
        if resolved != 0 {
            run["resolved"] = now.clone().into();
            run["reasonResolved"] = state.into();
        }
        runs.push(run);
    }
    let mut payload = serde_json::json!({
        "status": {
            "taskId": task.task_id,
            "provisionerId": provisioner,
            "workerType": task.worker_type,
            "taskQueueId": format!("{provisioner}/{}", task.worker_type),
            "schedulerId": scheduler,
            "projectId": "none",
            "taskGroupId": task.group_id,
            "state": state,
            "retriesLeft": 5,
            "runs": runs,
        },
        "version": 1,
    });
    if task.state != State::Defined {
        payload["runId"] = 0.into();
    }
    if started {
        payload["workerGroup"] = "us-east-1".into();
        payload["workerId"] = task.worker_id.clone().into();
    }
    let body = payload.to_string();
    broker.publish(exchange, &routing_key, &[route.as_str()], body.as_bytes());
}

/// A Taskcluster-style slug id: 22 URL-safe base64 characters.
fn slug_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id: String = (0..22)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect();
    // Taskcluster slugs never start with '-'.
    if id.starts_with('-') {
        id.replace_range(0..1, "A");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{Binding, BindingSet};
    use crate::metrics::Metrics;
    use crate::registry::Caps;
    use crate::registry::Registry;
    use crate::subscription::{Fanout, StreamSettings};
    use crate::topology::Topology;

    #[tokio::test]
    async fn demo_events_reach_a_treeherder_style_subscription() {
        let metrics = Metrics::new();
        let topology = Arc::new(Topology::new(metrics.clone()));
        let broker = MemoryBroker::new(topology.clone());
        let fanout = Fanout::new(StreamSettings::default(), metrics.clone());
        let registry = Arc::new(Registry::new(
            topology,
            broker.clone(),
            fanout,
            Caps::default(),
            metrics,
        ));
        let set = BindingSet::new(
            EXCHANGES
                .iter()
                .map(|e| Binding {
                    exchange: (*e).to_owned(),
                    pattern: "route.tc-treeherder.v2.#".to_owned(),
                })
                .collect(),
        );
        let client = registry.subscribe(set, || true).expect("within the caps");
        client
            .ready(Duration::from_secs(1))
            .await
            .expect("embedded binds at once");
        let subscription = client.subscription().expect("subscribed").clone();
        let shutdown = CancellationToken::new();
        tokio::spawn(run(broker, 1000.0, shutdown.clone()));
        // The client's pinned position keeps every frame for it in the log.
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while frames.len() < 20 {
            assert!(tokio::time::Instant::now() < deadline, "demo publishes");
            tokio::time::sleep(Duration::from_millis(10)).await;
            frames = subscription.read(client.position(), 20).expect("kept");
        }
        for frame in frames {
            let text = String::from_utf8(frame.bytes.to_vec()).expect("utf8");
            let data = text
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("data line");
            let msg: serde_json::Value = serde_json::from_str(data).expect("json");
            let key = msg["routingKey"].as_str().expect("routing key");
            assert!(key.starts_with("primary.") && key.ends_with('.'), "{key}");
            assert_eq!(key.split('.').count(), 10, "{key}");
            assert!(
                msg["routes"][0]
                    .as_str()
                    .expect("route")
                    .starts_with("tc-treeherder.v2.")
            );
            assert!(msg["payload"]["status"]["taskId"].is_string());
        }
        shutdown.cancel();
    }
}
