//! What a task can know and ask (issue 20, cause 8): Celery's `self.request` fields, a
//! retry with new arguments and its own retry limit, `Reject(requeue=True)`, `*args`, and
//! the task declarations `time_limit`, `soft_time_limit` and `ignore_result` — with the
//! bundled `math` plugin, in the sandbox and through a worker on both brokers. Every
//! RabbitMQ test uses a queue of its own and deletes it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::broker::amqp::AmqpOptions;
use wasmq::client::SendOptions;
use wasmq::engine::{CallRequest, MessageInfo, MessageProperties, Outcome};

use crate::semantics::Setup;
use crate::support::{MATH, RABBITMQ, call, load, runtime, sandbox, success};

const WAIT: Duration = Duration::from_secs(30);

fn object(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap()
}

/// The plugin's declarations reach the host through `describe`, and a call's request
/// fields reach the task; the SDK completes a retry's arguments and turns a requeue into
/// its outcome.
#[test]
fn declarations_reach_the_host_and_the_request_reaches_the_task() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let budgeted = math.task("math.budgeted").unwrap();
        assert_eq!(budgeted.limits.timeout, Some(Duration::from_secs(5)));
        assert_eq!(budgeted.soft_timeout, Some(Duration::from_millis(300)));
        assert!(math.task("math.add_quietly").unwrap().ignore_result);
        assert!(!math.task("math.add").unwrap().ignore_result);
        assert_eq!(math.task("math.total").unwrap().params, ["*numbers"]);

        assert_eq!(
            success(&sandbox, &math, "math.total", "[1, 2, 3.5]").await,
            json!(6.5)
        );
        assert_eq!(
            success(&sandbox, &math, "math.total", "[]").await,
            json!(0.0)
        );

        // retry(args=…, kwargs=…, max_retries=…): the next attempt's arguments.
        let mut request = CallRequest::new("math.collatz", "[3]");
        request.kwargs_json = r#"{"steps": 1}"#.into();
        let report = sandbox.call(&math, request).await.unwrap();
        assert_eq!(
            report.outcome,
            Outcome::Retry {
                countdown: Some(Duration::ZERO),
                reason: "3 → 10".into(),
                exc: None,
                args: Some(vec![json!(10)]),
                kwargs: Some(object(json!({"steps": 2}))),
                max_retries: Some(1000),
                expires: None,
            }
        );

        // Reject(requeue=True) on a first delivery; the result on a redelivery.
        let report = call(&sandbox, &math, "math.second_chance", "[5]").await;
        assert_eq!(
            report.outcome,
            Outcome::Rejected {
                reason: "not on the first delivery".into(),
                requeue: true,
            }
        );
        let mut request = CallRequest::new("math.second_chance", "[5]");
        request.message.redelivered = true;
        let report = sandbox.call(&math, request).await.unwrap();
        assert_eq!(report.outcome, Outcome::Success("5".into()));

        let mut request = CallRequest::new("math.debug_task", "[]");
        request.retries = 2;
        request.message = MessageInfo {
            eta: Some("2026-11-28T18:56:05.710508+00:00".into()),
            expires: None,
            time_limit: Some(Duration::from_secs(30)),
            soft_time_limit: Some(Duration::from_millis(2500)),
            redelivered: true,
            headers: object(json!({"x-test-header": "test-value"})),
            properties: MessageProperties {
                priority: Some(7),
                app_id: Some("1234".into()),
                content_type: Some("application/json".into()),
                ..MessageProperties::default()
            },
        };
        let id = request.id.clone();
        let report = sandbox.call(&math, request).await.unwrap();
        let Outcome::Success(json) = report.outcome else {
            panic!("math.debug_task: {}", report.outcome)
        };
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            json!({
                "id": id, "retries": 2, "eta": "2026-11-28T18:56:05.710508+00:00",
                "expires": null, "time_limit": 30.0, "soft_time_limit": 2.5, "priority": 7,
                "redelivered": true, "headers": {"x-test-header": "test-value"},
                "properties": {"content_type": "application/json", "priority": 7, "app_id": "1234"}
            })
        );
        let bare = success(&sandbox, &math, "math.debug_task", "[]").await;
        assert_eq!(
            (&bare["headers"], &bare["time_limit"], &bare["properties"]),
            (&json!(null), &json!(null), &json!({})),
            "nothing said: None, as Celery"
        );
    });
}

/// Through a worker: the message's fields reach the task, a retry runs with new arguments,
/// a requeued message comes back redelivered, and the declarations are honoured.
async fn what_a_task_knows_and_asks(setup: &Setup) {
    let worker = setup.start(setup.options("request")).await;
    let started = Instant::now();
    // ignore_result declared: nothing stored for a message that does not ask.
    let quiet = setup
        .send("math.add_quietly", json!([1, 2]), SendOptions::default())
        .await;

    let request = setup
        .send(
            "math.debug_task",
            json!([]),
            SendOptions {
                countdown: Some(Duration::from_millis(200)),
                expires: Some(Duration::from_secs(60)),
                priority: Some(7),
                time_limit: Some(Duration::from_secs(20)),
                soft_time_limit: Some(Duration::from_secs(10)),
                headers: object(json!({"x-demo": "yes"})),
                ..SendOptions::default()
            },
        )
        .await;
    let seen = request.get(WAIT).await.unwrap();
    assert_eq!(seen["id"], json!(request.id));
    assert_eq!(seen["retries"], json!(0));
    for field in ["eta", "expires"] {
        let time = seen[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {seen}"));
        assert!(
            wasmq::protocol::parse_time(time).is_some(),
            "{field}: {time}"
        );
    }
    assert_eq!(seen["time_limit"], json!(20.0), "as the message asked");
    assert_eq!(seen["soft_time_limit"], json!(10.0));
    assert_eq!(seen["priority"], json!(7));
    assert_eq!(seen["redelivered"], json!(false));
    assert_eq!(seen["headers"], json!({"x-demo": "yes"}), "{seen}");
    assert_eq!(seen["properties"]["priority"], json!(7));
    assert_eq!(
        seen["properties"]["content_type"],
        json!("application/json")
    );

    // A property only a raw publisher (a Python client's `app_id=`) sets.
    let message = setup.client.build_message(
        "math.debug_task",
        vec![],
        Map::new(),
        &SendOptions::default(),
    );
    let mut envelope = message.encode();
    envelope.properties.app_id = Some("wasmq-test".into());
    setup
        .broker
        .publish(&setup.queue, &envelope, None)
        .await
        .unwrap();
    let seen = setup.client.result(&message.id).get(WAIT).await.unwrap();
    assert_eq!(seen["properties"]["app_id"], json!("wasmq-test"), "{seen}");

    // Each retry runs with the next number and the steps so far: 6 → 3 → 10 → 5 → 16 → 8
    // → 4 → 2 → 1, eight retries, more than the policy's three (max_retries per call).
    let collatz = setup
        .send("math.collatz", json!([6]), SendOptions::default())
        .await;
    assert_eq!(collatz.get(WAIT).await.unwrap(), json!(8));

    // Requeued on its first delivery, it succeeds when the message comes back.
    let second = setup
        .send("math.second_chance", json!([5]), SendOptions::default())
        .await;
    assert_eq!(second.get(WAIT).await.unwrap(), json!(5));

    // The message may ask for the result the task declares it ignores.
    let kept = setup
        .send(
            "math.add_quietly",
            json!([20, 22]),
            SendOptions {
                ignore_result: Some(false),
                ..SendOptions::default()
            },
        )
        .await;
    assert_eq!(kept.get(WAIT).await.unwrap(), json!(42));

    // The declared soft limit (300 ms) stops it; a message's own soft limit comes first.
    let budgeted = setup
        .send("math.budgeted", json!([1000]), SendOptions::default())
        .await;
    let steps = budgeted.get(WAIT).await.unwrap().as_u64().unwrap();
    assert!(
        (10..100).contains(&steps),
        "{steps} steps of 10 ms in 300 ms"
    );
    let budgeted = setup
        .send(
            "math.budgeted",
            json!([1000]),
            SendOptions {
                soft_time_limit: Some(Duration::from_millis(50)),
                ..SendOptions::default()
            },
        )
        .await;
    let short = budgeted.get(WAIT).await.unwrap().as_u64().unwrap();
    assert!(short < steps, "{short} steps in 50 ms, {steps} in 300 ms");
    assert!(started.elapsed() < WAIT);

    let stats = worker.stop().await;
    assert!(
        quiet.meta().await.unwrap().is_none(),
        "no result stored for math.add_quietly"
    );
    assert_eq!(
        stats.succeeded.load(Ordering::Relaxed),
        8,
        "the quiet task ran: debug ×2, collatz, second_chance, add_quietly ×2, budgeted ×2"
    );
    assert_eq!(stats.retried.load(Ordering::Relaxed), 8, "collatz");
    assert!(
        stats.released.load(Ordering::Relaxed) >= 1,
        "second_chance requeued"
    );
}

#[test]
fn request_fields_retries_with_new_arguments_and_requeues_on_the_embedded_broker() {
    runtime().block_on(async {
        let setup = Setup::embedded();
        what_a_task_knows_and_asks(&setup).await;
        setup.cleanup().await;
    });
}

#[test]
fn request_fields_retries_with_new_arguments_and_requeues_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("request", AmqpOptions::default());
        what_a_task_knows_and_asks(&setup).await;
        setup.cleanup().await;
    });
}

#[test]
fn request_fields_retries_with_new_arguments_and_requeues_on_redis() {
    runtime().block_on(async {
        let setup = Setup::redis("redis-request");
        what_a_task_knows_and_asks(&setup).await;
        setup.cleanup().await;
    });
}
