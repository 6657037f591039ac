//! Remote control from Celery's own tools: an unmodified Python client's `inspect()` and
//! `control`, and the `celery inspect ping` CLI, against a wasmq worker on RabbitMQ; and
//! `wasmq inspect`/`control` on both brokers (`cli`, `embedded`).

mod cli;
mod embedded;

use serde_json::{Value, json};
use wasmq::broker::amqp::{AmqpOptions, CELERY_PIDBOX_EXCHANGE, revoke_queue};
use wasmq::client::SendOptions;

use crate::semantics::Setup;
use crate::support::{AMQP_URL, KOMBU_AMQP_URL, RABBITMQ, REDIS_URL, rabbitmq_has_queue, runtime};

#[test]
fn celery_inspect_and_control_reach_a_wasmq_worker() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("py-control", AmqpOptions::default());
        let node = format!("wasmq-test-control@{}", setup.queue);
        // One slot: while math.sleep runs, every slot is busy.
        let worker = setup
            .start(wasmq::worker::WorkerOptions {
                concurrency: 1,
                ..setup.options(&node)
            })
            .await;
        let queue2 = format!("{}-second", setup.queue);
        let (queue, shown_node, queue2_env) = (setup.queue.clone(), node.clone(), queue2.clone());
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(crate::support::python())
                .arg(crate::support::python_dir().join("control_client.py"))
                .env("BROKER", KOMBU_AMQP_URL)
                .env("BACKEND", REDIS_URL)
                .env("QUEUE", queue)
                .env("QUEUE2", queue2_env)
                .env("NODE", shown_node)
                .output()
                .expect("run the Python client")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the Python client failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Value = serde_json::from_str(&stdout).unwrap();

        assert_eq!(report["ping"], json!({"ok": "pong"}), "{report:#}");
        let registered = report["registered"].as_array().expect("registered tasks");
        assert!(registered.contains(&json!("math.add")), "{report:#}");
        assert_eq!(report["active_queues"], json!([setup.queue]), "{report:#}");
        assert!(
            report["unknown"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("no_such_command")),
            "an unknown command is answered with an error: {report:#}"
        );

        // Every slot busy: ping answers at once and `active` lists the running task.
        assert_eq!(report["ping_busy"], json!({"ok": "pong"}), "{report:#}");
        assert!(
            report["ping_busy_s"].as_f64().unwrap() < 1.0,
            "ping waited behind the busy slot: {report:#}"
        );
        assert_eq!(
            report["active"],
            json!([{"id": report["sleeping_id"], "name": "math.sleep", "args": [3]}]),
            "{report:#}"
        );
        assert!(report["sleeping"]["ok"].is_number(), "{report:#}");
        // inspect stats: what Flower and celery-exporter read; no credentials.
        let stats = &report["stats"];
        assert_eq!(stats["max_concurrency"], 1, "{report:#}");
        assert_eq!(stats["processes"], 1, "{report:#}");
        assert_eq!(stats["sleep_total"], 1, "{report:#}");
        assert_eq!(stats["has_prefetch"], true, "{report:#}");
        assert_eq!(stats["broker"]["hostname"], "127.0.0.1", "{report:#}");
        assert_eq!(stats["broker"]["port"], 5672, "{report:#}");
        assert_eq!(stats["broker"]["virtual_host"], "/", "{report:#}");
        assert!(
            !stats["broker"].to_string().contains("guest"),
            "credentials in stats: {report:#}"
        );
        assert_eq!(
            report["cli_ping"],
            json!({"code": 0, "pong": true}),
            "{report:#}"
        );

        // revoke with a reply: the unseen id is REVOKED at once, the task started
        // elsewhere keeps its state.
        let reply = report["revoke_reply"]["ok"].as_str().expect("an ok reply");
        assert!(
            reply.starts_with("tasks {") && reply.ends_with("} flagged as revoked"),
            "{report:#}"
        );
        assert_eq!(report["unseen_state"], "REVOKED", "{report:#}");
        assert_eq!(report["started_elsewhere_state"], "STARTED", "{report:#}");
        assert_eq!(report["revoked_listed"], true, "{report:#}");

        // revoke_by_stamped_headers: the stamped task is not run, the other one is.
        let reply = report["stamp_reply"]["ok"].as_str().expect("an ok reply");
        assert!(
            reply.starts_with("headers {'monitoring_id': ['")
                && reply.ends_with("']} flagged as revoked, but not terminated"),
            "{report:#}"
        );
        assert_eq!(report["stamped"]["error"], "TaskRevokedError", "{report:#}");
        assert_eq!(report["stamped"]["state"], "REVOKED", "{report:#}");
        assert_eq!(report["unstamped"], json!({"ok": 4}), "{report:#}");

        // The `celery` CLI with --json.
        assert_eq!(report["cli_ping_json"], json!({"ok": "pong"}), "{report:#}");
        assert_eq!(report["cli_registered"], true, "{report:#}");
        let cli_stats = &report["cli_stats"];
        assert_eq!(cli_stats["max_concurrency"], 1, "{report:#}");
        assert_eq!(cli_stats["has_broker"], true, "{report:#}");
        assert_eq!(cli_stats["has_total"], true, "{report:#}");
        assert!(cli_stats["maxrss"].as_u64().unwrap_or(0) > 0, "{report:#}");
        assert_eq!(cli_stats["consuming"], json!([setup.queue]), "{report:#}");
        assert_eq!(
            report["cli_active"],
            json!([report["cli_active_expected"]]),
            "{report:#}"
        );

        // A near eta: held in memory, listed by `scheduled`, `reserved` and `query_task`.
        assert_eq!(
            report["scheduled"],
            json!([[report["held_id"], true]]),
            "{report:#}"
        );
        assert_eq!(report["reserved"], json!([report["held_id"]]), "{report:#}");
        assert_eq!(report["query_task"], "reserved", "{report:#}");
        assert_eq!(report["held"], json!({"ok": 2}), "{report:#}");

        // rate_limit: 6 tasks at 2/s take at least 2.5 s.
        assert_eq!(
            report["rate_limit_reply"],
            json!({"code": 0, "ok": true}),
            "{report:#}"
        );
        assert_eq!(
            report["registered_rate"],
            json!(["math.add [rate_limit=2/s]"]),
            "{report:#}"
        );
        assert_eq!(
            report["rate_limited"],
            json!([0, 2, 4, 6, 8, 10]),
            "{report:#}"
        );
        let rate_limited_s = report["rate_limited_s"].as_f64().unwrap();
        println!("6 tasks at rate_limit 2/s took {rate_limited_s:.2} s");
        assert!(rate_limited_s >= 2.0, "{report:#}");
        assert_eq!(report["rate_limit_off"], true, "{report:#}");
        assert_eq!(
            report["rate_limit_unknown"],
            json!({"error": "unknown task"}),
            "{report:#}"
        );
        assert!(
            report["rate_limit_bad"]["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("Invalid rate limit string: ValueError(")),
            "{report:#}"
        );

        // time_limit: the next math.sleep(3) stops at the new hard limit of 1 s.
        assert_eq!(
            report["time_limit_reply"],
            json!({"code": 0, "ok": true}),
            "{report:#}"
        );
        assert_eq!(
            report["time_limited"]["error"], "TimeLimitExceeded",
            "{report:#}"
        );
        assert!(
            report["time_limited_s"].as_f64().unwrap() < 2.9,
            "{report:#}"
        );

        // add_consumer / cancel_consumer.
        assert_eq!(
            report["add_consumer"],
            json!({"code": 0, "ok": true}),
            "{report:#}"
        );
        let mut both = vec![setup.queue.clone(), queue2.clone()];
        both.sort();
        assert_eq!(report["queues_after_add"], json!(both), "{report:#}");
        assert_eq!(report["on_queue2"], json!({"ok": 42}), "{report:#}");
        assert_eq!(
            report["cancel_consumer"],
            json!({"code": 0, "ok": true}),
            "{report:#}"
        );
        assert_eq!(
            report["queues_after_cancel"],
            json!([setup.queue]),
            "{report:#}"
        );
        assert_eq!(report["after_cancel_state"], "PENDING", "{report:#}");

        // What wasmq cannot do is an error, never a fake "ok".
        assert_eq!(
            report["autoscale_reply"],
            json!({"error": "ValueError('Autoscale not enabled')"}),
            "{report:#}"
        );
        assert_eq!(
            report["memdump_reply"],
            json!({"error": "memdump is not supported by wasmq"}),
            "{report:#}"
        );
        assert!(
            report["pool_grow_reply"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("started with")),
            "one slot, started with one: {report:#}"
        );

        assert!(
            worker
                .exits_by_itself(std::time::Duration::from_secs(15))
                .await,
            "`control shutdown` did not stop the worker"
        );
        setup.broker.delete_queue(&queue2).await.unwrap();
        // The mailbox goes with its worker (exclusive, auto-delete, as kombu declares it).
        let mailbox = wasmq::broker::amqp::control_queue(&node);
        let mut gone = false;
        for _ in 0..50 {
            if !rabbitmq_has_queue(&mailbox).await {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(gone, "{mailbox} left behind");
        setup.cleanup().await;
    });
}

/// Publishes `command` on Celery's `celery.pidbox` fanout, as kombu does.
async fn broadcast_on_pidbox(command: &Value) {
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    channel
        .exchange_declare(
            CELERY_PIDBOX_EXCHANGE.into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            CELERY_PIDBOX_EXCHANGE.into(),
            "".into(),
            lapin::options::BasicPublishOptions::default(),
            &serde_json::to_vec(command).unwrap(),
            lapin::BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "OK".into()).await;
}

/// The `method` of every remote-control command waiting in `queue` (wasmq's own
/// revocations have none); the messages are put back.
async fn commands_waiting_in(queue: &str) -> Vec<String> {
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    let mut methods = Vec::new();
    let mut tags = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
        .await
        .unwrap()
    {
        let body: Value = serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null);
        if let Some(method) = body.get("method").and_then(Value::as_str) {
            methods.push(method.to_owned());
        }
        tags.push(message.delivery.delivery_tag);
    }
    for tag in tags {
        channel
            .basic_nack(
                tag,
                lapin::options::BasicNackOptions {
                    requeue: true,
                    ..lapin::options::BasicNackOptions::default()
                },
            )
            .await
            .unwrap();
    }
    let _ = connection.close(200, "OK".into()).await;
    methods
}

/// Regression (issue 12): a stopped worker's durable `wasmq.revoke.<node>` queue was bound
/// to `celery.pidbox` and collected every broadcast (Flower's `enable_events` every 5 s,
/// each inspect poll) for a day. Now only revocations wait for it: a Celery revoke made
/// while it is down reaches it through a live worker, which broadcasts it again durably.
#[test]
fn a_stopped_worker_is_kept_revocations_not_other_broadcasts() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("pidbox-durable", AmqpOptions::default());
        let sleeper = format!("wasmq-test-sleeper@{}", setup.queue);
        let awake = format!("wasmq-test-awake@{}", setup.queue);
        let stopped = setup.start(setup.options(&sleeper)).await;
        stopped.stop().await;
        let live = setup.start(setup.options(&awake)).await;
        // Give the live worker time to declare its mailbox.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;

        let revoked = uuid::Uuid::new_v4().to_string();
        broadcast_on_pidbox(&json!({"method": "enable_events", "arguments": {},
            "destination": null, "pattern": null, "matcher": null}))
        .await;
        broadcast_on_pidbox(&json!({"method": "revoke",
            "arguments": {"task_id": [revoked], "terminate": false, "signal": "SIGTERM"},
            "destination": null, "pattern": null, "matcher": null}))
        .await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let waiting = commands_waiting_in(&revoke_queue(&sleeper)).await;
        assert!(
            !waiting.iter().any(|method| method == "enable_events"),
            "the stopped worker's queue collects broadcasts: {waiting:?}"
        );
        live.stop().await;

        // The stopped worker starts again and refuses the task revoked meanwhile.
        let restarted = setup.start(setup.options(&sleeper)).await;
        let result = setup
            .send(
                "math.add",
                json!([1, 2]),
                SendOptions {
                    task_id: Some(revoked.clone()),
                    ..SendOptions::default()
                },
            )
            .await;
        let meta = setup
            .backend
            .wait(&revoked, std::time::Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(meta.status, wasmq::results::TaskState::Revoked, "{meta:?}");
        drop(result);
        restarted.stop().await;
        setup.cleanup().await;
    });
}

/// A revoke with `terminate` is answered by the worker running the task: the others wait
/// a second before storing REVOKED for an id they do not run, so they cannot beat its
/// "terminated" (without `track_started` a running task reads PENDING to them). A plain
/// revoke is stored at once, as Celery 5.6 does. The ids here run nowhere: REVOKED appears
/// only after the grace for the terminate, at once for the plain one.
#[test]
fn idle_workers_give_the_running_worker_a_second_to_answer_a_terminate() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("terminate-grace", AmqpOptions::default());
        let node = format!("wasmq-test-idle@{}", setup.queue);
        let worker = setup.start(setup.options(&node)).await;
        // Give the worker time to declare its mailbox.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let revoke = |id: &str, terminate: bool| {
            json!({"method": "revoke",
                "arguments": {"task_id": [id], "terminate": terminate, "signal": "SIGTERM"},
                "destination": null, "pattern": null, "matcher": null})
        };
        let (terminated, plain) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        broadcast_on_pidbox(&revoke(&terminated, true)).await;
        broadcast_on_pidbox(&revoke(&plain, false)).await;
        let waited = std::time::Instant::now();
        let meta = setup
            .backend
            .wait(&plain, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(meta.status, wasmq::results::TaskState::Revoked, "{meta:?}");
        // The plain revoke is stored; the terminate is not, within its grace.
        if waited.elapsed() < std::time::Duration::from_millis(700) {
            assert!(
                setup.backend.get(&terminated).await.unwrap().is_none(),
                "REVOKED stored for a terminate before the running worker could answer"
            );
        }
        let meta = setup
            .backend
            .wait(&terminated, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(meta.status, wasmq::results::TaskState::Revoked, "{meta:?}");
        worker.stop().await;
        setup.cleanup().await;
    });
}
