//! Adaptive concurrency end to end, on the embedded broker: a worker autoscaling between 1
//! and 4 slots grows to 4 under a backlog of sleeping tasks, runs them about four at a time,
//! shrinks back to 1 once idle for its keepalive, and answers Celery's `stats`
//! (`autoscaler`), `autoscale` and `pool_grow` as Celery does.
//!
//! The CPU is left out of this test's policy (`cpu_aware: false`): the test binary runs
//! other tests beside it, whose CPU would count as the worker's. The CPU rules are tested by
//! simulation in `wasmq::autoscale`, the `/proc` sampler by its own unit tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::autoscale::AutoscalePolicy;
use wasmq::broker::{Broker, ControlBroadcast};
use wasmq::client::SendOptions;
use wasmq::protocol::ControlCommand;
use wasmq::worker::{Hooks, WorkerOptions};

use crate::support::{Queue, bundled_registry, runtime, sandbox, spawn_worker};

/// `method` with `arguments` for `node`, and its reply.
async fn control(broker: &dyn Broker, node: &str, method: &str, arguments: Value) -> Value {
    let Value::Object(arguments) = arguments else {
        panic!("arguments are an object")
    };
    let broadcast = ControlBroadcast {
        command: ControlCommand::new(method, arguments, Some(vec![node.to_owned()])),
        reply: true,
        timeout: Duration::from_secs(5),
        limit: Some(1),
    };
    let replies = broker.broadcast_control(&broadcast).await.unwrap();
    replies
        .first()
        .map(|r| r.reply.clone())
        .unwrap_or(Value::Null)
}

/// Polls `stats` (up to `within`) until `autoscaler.current` is `size`; the stats then.
async fn until_size(broker: &dyn Broker, node: &str, size: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let stats = control(broker, node, "stats", json!({})).await;
        if stats["autoscaler"]["current"] == size || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn a_backlog_grows_the_worker_to_its_maximum_and_idleness_shrinks_it_to_its_minimum() {
    runtime().block_on(async {
        let queue = Queue::new();
        let node = "autoscale@test";
        // The most tasks seen running at once, from the worker's own hooks.
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (up, down, seen) = (Arc::clone(&running), Arc::clone(&running), Arc::clone(&most));
        let hooks = Hooks::new()
            .before_task(move |_| {
                let now = up.fetch_add(1, Ordering::SeqCst) + 1;
                seen.fetch_max(now, Ordering::SeqCst);
            })
            .after_task(move |_| {
                down.fetch_sub(1, Ordering::SeqCst);
            });
        let policy = AutoscalePolicy {
            keepalive: Duration::from_secs(2),
            cpu_aware: false,
            ..AutoscalePolicy::new(4, 1)
        };
        let options = WorkerOptions {
            node_name: node.into(),
            autoscale: Some(policy),
            hooks,
            ..WorkerOptions::default()
        };
        let (stop, worker) = spawn_worker(&queue, bundled_registry(sandbox()).await, options);
        let broker = queue.broker.as_ref();

        let stats = until_size(broker, node, 1, Duration::from_secs(10)).await;
        assert_eq!(stats["autoscaler"]["max"], 4, "{stats}");
        assert_eq!(stats["autoscaler"]["min"], 1, "{stats}");
        assert_eq!(stats["pool"]["max-concurrency"], 1, "starts at the minimum: {stats}");

        // Results off: a task's hooks then run while it holds its slot (a result is stored
        // beside the slot), so the hooks count exactly the tasks running at once.
        let started = Instant::now();
        for _ in 0..16 {
            let quiet = SendOptions {
                ignore_result: Some(true),
                ..SendOptions::default()
            };
            queue
                .client
                .send_task("math.sleep", vec![json!(1.0)], Map::new(), quiet)
                .await
                .unwrap();
        }
        let stats = until_size(broker, node, 4, Duration::from_secs(5)).await;
        assert_eq!(stats["autoscaler"]["current"], 4, "grew to the maximum: {stats}");
        assert_eq!(stats["pool"]["max-concurrency"], 4, "{stats}");
        assert!(stats["autoscaler"]["qty"].as_u64().unwrap() >= 4, "{stats}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while control(broker, node, "stats", json!({})).await["wasmq"]["counters"]["succeeded"]
            != 16
        {
            assert!(Instant::now() < deadline, "the 16 tasks did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = started.elapsed();
        // One slot would take 16 s; four, 4 s once grown (growing takes a second or two).
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!(most.load(Ordering::SeqCst), 4, "never more than the maximum at once");

        // Idle: down to the minimum after the keepalive (2 s) without demand.
        let stats = until_size(broker, node, 1, Duration::from_secs(10)).await;
        assert_eq!(stats["autoscaler"]["current"], 1, "shrank to the minimum: {stats}");

        // Remote control, with Celery's replies.
        let reply = control(broker, node, "autoscale", json!({"max": 3, "min": 2})).await;
        assert_eq!(reply, json!({"ok": "autoscale now max=3 min=2"}));
        let stats = control(broker, node, "stats", json!({})).await;
        assert_eq!(
            (&stats["autoscaler"]["current"], &stats["autoscaler"]["max"]),
            (&json!(2), &json!(3)),
            "raised to the new minimum at once: {stats}"
        );
        let reply = control(broker, node, "pool_grow", json!({"n": 1})).await;
        assert_eq!(
            reply,
            json!({"error": "pool_grow is not supported with autoscale. Adjust autoscale range instead."})
        );
        let reply = control(broker, node, "autoscale", json!({"max": 9, "min": 1})).await;
        assert!(
            reply["error"].as_str().is_some_and(|e| e.contains("at most the 4 task slots")),
            "{reply}"
        );

        let _ = stop.send(());
        worker.await.unwrap();
        queue.broker.forget_node(node).await.unwrap();
    });
}
