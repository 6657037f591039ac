//! Remote control from Celery's own tools: an unmodified Python client's `inspect()` and
//! `control`, and the `celery inspect ping` CLI, against a wasmq worker on RabbitMQ.

use serde_json::{Value, json};
use wasmq::broker::amqp::AmqpOptions;

use crate::semantics::Setup;
use crate::support::{KOMBU_AMQP_URL, RABBITMQ, REDIS_URL, rabbitmq_has_queue, runtime};

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
        let (queue, shown_node) = (setup.queue.clone(), node.clone());
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(crate::support::python())
                .arg(crate::support::python_dir().join("control_client.py"))
                .env("BROKER", KOMBU_AMQP_URL)
                .env("BACKEND", REDIS_URL)
                .env("QUEUE", queue)
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
        worker.stop().await;
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
