//! Celery's task semantics on every broker (embedded, RabbitMQ, Redis): automatic retries with backoff, rate limits,
//! revoke (with terminate, and across restarts), poison-message protection, routes and
//! priorities. Every RabbitMQ test uses queues of its own and deletes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use wasmq::broker::Broker;
use wasmq::broker::amqp::{AmqpBroker, AmqpOptions, revoke_queue};
use wasmq::client::{Client, GetError, SendOptions};
use wasmq::policy::{PolicyOverrides, TaskAnnotations};
use wasmq::results::{ResultBackend, TaskState};
use wasmq::worker::{Worker, WorkerOptions, WorkerStats};

use crate::support::{
    AMQP_URL, Queue, RABBITMQ, REDIS_URL, bundled_registry, rabbitmq_has_queue, runtime, sandbox,
    unique_queue,
};

const WAIT: Duration = Duration::from_secs(30);

/// A broker, a result backend and a client on them: the embedded pair, or RabbitMQ with
/// Redis results on a queue of its own. (Also used by `request.rs`.)
pub(crate) struct Setup {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) backend: Arc<dyn ResultBackend>,
    pub(crate) client: Client,
    pub(crate) queue: String,
    /// The nodes of the workers started, forgotten at cleanup.
    nodes: std::sync::Mutex<Vec<String>>,
    _embedded: Option<Queue>,
}

impl Setup {
    pub(crate) fn embedded() -> Self {
        let embedded = Queue::new();
        Self {
            broker: embedded.broker.clone(),
            backend: embedded.backend.clone(),
            client: embedded.client.clone(),
            queue: "celery".into(),
            nodes: std::sync::Mutex::default(),
            _embedded: Some(embedded),
        }
    }

    pub(crate) fn rabbitmq(prefix: &str, amqp: AmqpOptions) -> Self {
        let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::with_options(AMQP_URL, amqp).unwrap());
        let backend =
            wasmq::results::connect(REDIS_URL, Duration::from_secs(600), AMQP_URL).unwrap();
        let queue = unique_queue(prefix);
        let client = Client::new(broker.clone(), backend.clone()).with_default_queue(&queue);
        Self {
            broker,
            backend,
            client,
            queue,
            nodes: std::sync::Mutex::default(),
            _embedded: None,
        }
    }

    /// The Redis broker (database 5, as `redis_broker.rs`) with Redis results, on a queue of
    /// its own.
    pub(crate) fn redis(prefix: &str) -> Self {
        const BROKER: &str = "redis://127.0.0.1:6379/5";
        let broker = wasmq::broker::connect(BROKER).unwrap();
        let backend = wasmq::results::connect(REDIS_URL, Duration::from_secs(600), BROKER).unwrap();
        let queue = unique_queue(prefix);
        let client = Client::new(broker.clone(), backend.clone()).with_default_queue(&queue);
        Self {
            broker,
            backend,
            client,
            queue,
            nodes: std::sync::Mutex::default(),
            _embedded: None,
        }
    }

    pub(crate) fn options(&self, node: &str) -> WorkerOptions {
        WorkerOptions {
            queues: vec![self.queue.clone()],
            concurrency: 2,
            node_name: node.into(),
            shutdown_timeout: Duration::from_secs(10),
            ..WorkerOptions::default()
        }
    }

    /// Starts a worker in this process; stop it with [`Running::stop`].
    pub(crate) async fn start(&self, options: WorkerOptions) -> Running {
        self.nodes.lock().unwrap().push(options.node_name.clone());
        let worker = Worker::new(
            self.broker.clone(),
            self.backend.clone(),
            bundled_registry(sandbox()).await,
            options,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap()
        });
        Running { stop, handle }
    }

    pub(crate) async fn send(
        &self,
        task: &str,
        args: Value,
        options: SendOptions,
    ) -> wasmq::client::AsyncResult {
        self.client
            .send_task(task, args.as_array().cloned().unwrap(), Map::new(), options)
            .await
            .unwrap()
    }

    /// Deletes the queue (RabbitMQ) and what the broker holds for every worker node started
    /// (call it once they have stopped).
    pub(crate) async fn cleanup(self) {
        if self._embedded.is_none() {
            self.broker.delete_queue(&self.queue).await.unwrap();
        }
        let nodes = std::mem::take(&mut *self.nodes.lock().unwrap());
        for node in nodes {
            self.broker.forget_node(&node).await.unwrap();
        }
    }
}

pub(crate) struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Arc<WorkerStats>>,
}

impl Running {
    pub(crate) async fn stop(self) -> Arc<WorkerStats> {
        let _ = self.stop.send(());
        self.handle.await.unwrap()
    }

    /// Whether the worker stops by itself (not told by the test) within `within`; it is
    /// told to stop afterwards in any case.
    pub(crate) async fn exits_by_itself(self, within: Duration) -> bool {
        let Running { stop, handle } = self;
        let exited = tokio::time::timeout(within, handle).await.is_ok();
        drop(stop);
        exited
    }
}

fn done_at(meta: &wasmq::results::ResultMeta) -> DateTime<Utc> {
    wasmq::protocol::parse_time(meta.date_done.as_deref().unwrap()).unwrap()
}

/// `math.unstable` fails with ConnectionError, which its declared policy retries with a
/// 100 ms × 2^n backoff (no jitter) up to 4 times; the worker's configuration overrides it.
async fn autoretry(setup: &Setup) {
    let worker = setup.start(setup.options("autoretry")).await;
    let started = Instant::now();
    let recovered = setup
        .send("math.unstable", json!([3]), SendOptions::default())
        .await;
    assert_eq!(
        recovered.get(WAIT).await.unwrap(),
        json!(3),
        "succeeds on its 4th run"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700),
        "backoff 100 + 200 + 400 ms, took {elapsed:?}"
    );
    let gave_up = setup
        .send("math.unstable", json!([10]), SendOptions::default())
        .await;
    match gave_up.get(WAIT).await {
        Err(GetError::Failed { exception, .. }) => {
            assert_eq!(exception.exc_type, "ConnectionError", "the failure itself");
            assert_eq!(
                exception.exc_message,
                [json!("attempt 5: the service is down")]
            );
        }
        other => panic!("expected ConnectionError after 4 retries, got {other:?}"),
    }
    let stats = worker.stop().await;
    assert_eq!(
        stats.retried.load(std::sync::atomic::Ordering::Relaxed),
        3 + 4
    );

    // The worker's [tasks."math.*"] table beats what the plugin declares.
    let mut options = setup.options("autoretry-configured");
    options.task_policies = TaskAnnotations::new([(
        "math.*".to_owned(),
        PolicyOverrides {
            max_retries: Some(1),
            ..PolicyOverrides::default()
        },
    )]);
    let worker = setup.start(options).await;
    let limited = setup
        .send("math.unstable", json!([3]), SendOptions::default())
        .await;
    match limited.get(WAIT).await {
        Err(GetError::Failed { exception, .. }) => {
            assert_eq!(
                exception.exc_message,
                [json!("attempt 2: the service is down")]
            );
        }
        other => panic!("expected a failure after 1 retry, got {other:?}"),
    }
    worker.stop().await;
}

/// Regression (issue 20, causes 2 and 7): a task's own exception class keeps its module and
/// its arguments (Celery stores `exc_module: "wasmq_errors"`, `exc_type: "OutOfRange"`,
/// `exc_message: [7.0, 0.0, 5.0]`), and `retry(exc=…)` ends with that exception once the
/// retries are spent, not `MaxRetriesExceededError`.
#[test]
fn exceptions_keep_their_class_and_arguments_and_retry_exc_is_raised() {
    runtime().block_on(async {
        let setup = Setup::embedded();
        let worker = setup.start(setup.options("exceptions")).await;
        let result = setup
            .send("math.bounded", json!([7, 0, 5]), SendOptions::default())
            .await;
        let Err(GetError::Failed { exception, .. }) = result.get(WAIT).await else {
            panic!("math.bounded(7, 0, 5) fails")
        };
        assert_eq!(
            (exception.exc_module.as_str(), exception.exc_type.as_str()),
            ("wasmq_errors", "OutOfRange")
        );
        assert_eq!(exception.exc_message, [json!(7.0), json!(0.0), json!(5.0)]);

        let result = setup
            .send("math.give_up", json!([]), SendOptions::default())
            .await;
        let Err(GetError::Failed { exception, .. }) = result.get(WAIT).await else {
            panic!("math.give_up fails once its retry is spent")
        };
        assert_eq!(exception.exc_type, "GaveUp", "{exception}");
        assert_eq!(
            exception.exc_message,
            [json!("the service never answers"), json!(1)]
        );
        worker.stop().await;
        setup.cleanup().await;
    });
}

#[test]
fn automatic_retries_back_off_exponentially_on_the_embedded_broker() {
    runtime().block_on(autoretry(&Setup::embedded()));
}

#[test]
fn automatic_retries_back_off_exponentially_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("autoretry", AmqpOptions::default());
        autoretry(&setup).await;
        setup.cleanup().await;
    });
}

/// `math.throttled` declares 5/s: 10 runs are spread over ≥ 1.8 s, while unthrottled tasks
/// sent after them finish long before.
async fn rate_limit(setup: &Setup) {
    let worker = setup.start(setup.options("rate-limit")).await;
    let sent = Instant::now();
    let mut throttled = Vec::new();
    for i in 0..10 {
        throttled.push(
            setup
                .send("math.throttled", json!([i]), SendOptions::default())
                .await,
        );
    }
    let mut quick = Vec::new();
    for i in 0..5 {
        quick.push(
            setup
                .send("math.add", json!([i, i]), SendOptions::default())
                .await,
        );
    }
    for (i, result) in quick.iter().enumerate() {
        assert_eq!(result.get(WAIT).await.unwrap(), json!(2 * i));
    }
    let quick_done = sent.elapsed();
    let mut times = Vec::new();
    for (i, result) in throttled.iter().enumerate() {
        assert_eq!(result.get(WAIT).await.unwrap(), json!(i));
        times.push(done_at(&result.meta().await.unwrap().unwrap()));
    }
    let all_done = sent.elapsed();
    times.sort();
    let span = (*times.last().unwrap() - *times.first().unwrap())
        .to_std()
        .unwrap();
    assert!(
        span >= Duration::from_millis(1_700),
        "10 runs at 5/s need ≥ 1.8 s, took {span:?}"
    );
    assert!(
        quick_done < Duration::from_millis(1_200) && quick_done < all_done,
        "other tasks are not held behind the rate limit: {quick_done:?} vs {all_done:?}"
    );
    worker.stop().await;
}

#[test]
fn rate_limits_space_runs_without_blocking_other_tasks_on_the_embedded_broker() {
    runtime().block_on(rate_limit(&Setup::embedded()));
}

#[test]
fn rate_limits_space_runs_without_blocking_other_tasks_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("rate", AmqpOptions::default());
        rate_limit(&setup).await;
        setup.cleanup().await;
    });
}

async fn assert_revoked(result: &wasmq::client::AsyncResult, reason: &str) {
    match result.get(WAIT).await {
        Err(GetError::Revoked { exception, .. }) => {
            assert_eq!(exception.exc_type, "TaskRevokedError");
            assert_eq!(exception.exc_message, [json!(reason)]);
        }
        other => panic!("expected REVOKED({reason}), got {other:?}"),
    }
}

/// Waits until a worker has received `n` revocations (they propagate asynchronously).
async fn settle_revocations() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Revoked before it is sent: not run, REVOKED. Revoked while the worker is down: still
/// refused after it starts (and after a restart that reads the state file). Revoked with
/// terminate while running: interrupted, REVOKED("terminated"), and the worker carries on.
async fn revoke(setup: &Setup, node: &str) {
    let state = tempfile::tempdir().unwrap();
    let mut options = setup.options(node);
    options.state_file = Some(state.path().join("revoked.json"));

    // A first run declares the worker's revocation queue (RabbitMQ) and stops.
    setup.start(options.clone()).await.stop().await;
    let while_down = uuid::Uuid::new_v4().to_string();
    setup.client.revoke(&while_down, false).await.unwrap();

    let worker = setup.start(options.clone()).await;
    settle_revocations().await;
    let before = uuid::Uuid::new_v4().to_string();
    setup.client.revoke(&before, false).await.unwrap();
    settle_revocations().await;
    for id in [&while_down, &before] {
        let result = setup
            .send(
                "math.add",
                json!([1, 2]),
                SendOptions {
                    task_id: Some(id.clone()),
                    ..SendOptions::default()
                },
            )
            .await;
        assert_revoked(&result, "revoked").await;
    }

    // A guest spinning on the CPU and a guest blocked in a host call (sleeping) are both
    // interrupted at once.
    for (task, args) in [("hostile.spin", json!([])), ("math.sleep", json!([20]))] {
        let running = setup.send(task, args, SendOptions::default()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = Instant::now();
        setup.client.revoke(&running.id, true).await.unwrap();
        assert_revoked(&running, "terminated").await;
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "terminate interrupts {task} at once, took {:?}",
            asked.elapsed()
        );
    }
    let after = setup
        .send("math.add", json!([2, 2]), SendOptions::default())
        .await;
    assert_eq!(
        after.get(WAIT).await.unwrap(),
        json!(4),
        "the worker carries on"
    );
    worker.stop().await;

    // A restart remembers what it was told, even where the broker broadcast it only once.
    let worker = setup.start(options).await;
    let again = setup
        .send(
            "math.add",
            json!([1, 2]),
            SendOptions {
                task_id: Some(before.clone()),
                ..SendOptions::default()
            },
        )
        .await;
    assert_revoked(&again, "revoked").await;
    worker.stop().await;
}

#[test]
fn revoke_refuses_and_terminates_tasks_across_restarts_on_the_embedded_broker() {
    runtime().block_on(revoke(&Setup::embedded(), "revoke-embedded"));
}

#[test]
fn revoke_refuses_and_terminates_tasks_across_restarts_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("revoke", AmqpOptions::default());
        let node = format!("wasmq-test-revoke@{}", setup.queue);
        revoke(&setup, &node).await;
        setup.cleanup().await;
    });
}

/// Regression (issue 11, bug 3): every test worker on RabbitMQ left its durable
/// `wasmq.revoke.<node>` queue behind, collecting every `celery.pidbox` broadcast for a week.
/// The queue stays durable (it outlives its worker, so revocations made while the worker is
/// down wait for it), and forgetting the stopped node at cleanup deletes it for good.
#[test]
fn cleanup_deletes_the_revoke_queue_of_a_stopped_worker_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("forget-node", AmqpOptions::default());
        let node = format!("wasmq-test-forget@{}", setup.queue);
        let revoke = revoke_queue(&node);
        let worker = setup.start(setup.options(&node)).await;
        let sum = setup
            .send("math.add", json!([2, 3]), SendOptions::default())
            .await;
        assert_eq!(sum.get(WAIT).await.unwrap(), json!(5));
        assert!(
            rabbitmq_has_queue(&revoke).await,
            "the worker listens on it"
        );
        worker.stop().await;
        assert!(
            rabbitmq_has_queue(&revoke).await,
            "durable: it outlives its worker"
        );
        setup.cleanup().await;
        assert!(!rabbitmq_has_queue(&revoke).await, "cleanup deletes it");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !rabbitmq_has_queue(&revoke).await,
            "and nothing declares it again"
        );
    });
}

/// A message whose consumers keep dying (here: released without being settled, as a
/// crashed worker's messages are) is dead-lettered after `max_deliveries`, with the count
/// in the dead letter and a FAILURE for the sender; it does not loop forever.
async fn poison(setup: &Setup) {
    let result = setup
        .send("math.add", json!([1, 1]), SendOptions::default())
        .await;
    for _ in 0..3 {
        let mut consumer = setup
            .broker
            .consume(std::slice::from_ref(&setup.queue), 1)
            .await
            .unwrap();
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("the message comes back")
            .unwrap();
        delivery.release().await.unwrap();
        consumer.close().await;
    }
    let mut options = setup.options("poison");
    options.max_deliveries = 3;
    let worker = setup.start(options).await;
    let poisoned_after = match result.get(WAIT).await {
        Err(GetError::Failed { exception, .. }) => {
            assert_eq!(exception.exc_type, "WorkerLostError");
            assert_eq!(exception.exc_module, "billiard.exceptions");
            // At least the three abandoned deliveries and this one; a consumer that closes
            // while a delivery is on its way hands that one back too, which also counts.
            let text = exception.exc_message[0].as_str().unwrap().to_owned();
            let count: u32 = text
                .strip_prefix("poison message: delivered ")
                .and_then(|rest| rest.strip_suffix(" times without finishing (max_deliveries 3)"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected reason: {text}"));
            assert!(count >= 4, "{text}");
            count
        }
        other => panic!("expected WorkerLostError, got {other:?}"),
    };
    let deadline = Instant::now() + WAIT;
    let dead = loop {
        let dead = setup.broker.dead_letters(&setup.queue, 10).await.unwrap();
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        dead.len(),
        1,
        "dead-lettered once, not duplicated: {:?}",
        dead.iter()
            .map(|d| (d.delivery_count, d.reason.clone(), d.task_id.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(dead[0].delivery_count, poisoned_after);
    assert!(
        dead[0].reason.starts_with("poison message"),
        "{}",
        dead[0].reason
    );
    let fine = setup
        .send("math.add", json!([2, 3]), SendOptions::default())
        .await;
    assert_eq!(fine.get(WAIT).await.unwrap(), json!(5));
    worker.stop().await;
}

#[test]
fn poison_messages_are_dead_lettered_after_max_deliveries_on_the_embedded_broker() {
    runtime().block_on(poison(&Setup::embedded()));
}

#[test]
fn poison_messages_are_dead_lettered_after_max_deliveries_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("poison", AmqpOptions::default());
        poison(&setup).await;
        setup.cleanup().await;
    });
}

/// Messages waiting in a priority queue are taken highest priority first.
async fn priorities(setup: &Setup) {
    let mut low = Vec::new();
    for i in 0..6 {
        low.push(
            setup
                .send(
                    "math.add",
                    json!([i, 0]),
                    SendOptions {
                        priority: Some(1),
                        ..SendOptions::default()
                    },
                )
                .await,
        );
    }
    let high = setup
        .send(
            "math.add",
            json!([100, 0]),
            SendOptions {
                priority: Some(9),
                ..SendOptions::default()
            },
        )
        .await;
    let mut options = setup.options("priorities");
    options.concurrency = 1;
    options.prefetch_multiplier = 1;
    let worker = setup.start(options).await;
    assert_eq!(high.get(WAIT).await.unwrap(), json!(100));
    let high_done = done_at(&high.meta().await.unwrap().unwrap());
    for result in &low {
        result.get(WAIT).await.unwrap();
        let done = done_at(&result.meta().await.unwrap().unwrap());
        assert!(
            high_done <= done,
            "the priority 9 task ran before priority 1 ones"
        );
    }
    worker.stop().await;
}

#[test]
fn priorities_are_honoured_by_the_embedded_broker() {
    runtime().block_on(priorities(&Setup::embedded()));
}

#[test]
fn priorities_are_honoured_on_rabbitmq_queues_declared_with_x_max_priority() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq(
            "priority",
            AmqpOptions {
                queue_max_priority: Some(10),
            },
        );
        priorities(&setup).await;
        setup.cleanup().await;
    });
}

/// Routes send tasks to queues by name pattern; a worker consumes several queues.
async fn routes(setup: &Setup) {
    let (math, text) = (
        format!("{}-math", setup.queue),
        format!("{}-text", setup.queue),
    );
    let routes = wasmq::routes::TaskRoutes::new([
        ("math.*".to_owned(), math.clone()),
        ("text.slugify".to_owned(), text.clone()),
    ]);
    let client = setup.client.clone().with_routes(routes);
    let send = |task: &'static str, args: Value| {
        let client = client.clone();
        async move {
            client
                .send_task(
                    task,
                    args.as_array().cloned().unwrap(),
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap()
        }
    };
    let sum = send("math.add", json!([20, 22])).await;
    let slug = send("text.slugify", json!(["Hello Routes"])).await;
    let words = send("text.word_count", json!(["one two"])).await;
    assert_eq!(setup.broker.queue_length(&math).await.unwrap(), 1);
    assert_eq!(setup.broker.queue_length(&text).await.unwrap(), 1);
    assert_eq!(
        setup.broker.queue_length(&setup.queue).await.unwrap(),
        1,
        "unrouted tasks go to the default queue"
    );
    let mut options = setup.options("routes");
    options.queues = vec![math.clone(), text.clone(), setup.queue.clone()];
    let worker = setup.start(options).await;
    assert_eq!(sum.get(WAIT).await.unwrap(), json!(42));
    assert_eq!(slug.get(WAIT).await.unwrap(), json!("hello-routes"));
    assert_eq!(words.get(WAIT).await.unwrap(), json!(2));
    worker.stop().await;
    for queue in [math, text] {
        setup.broker.delete_queue(&queue).await.unwrap();
    }
}

#[test]
fn routes_send_tasks_to_queues_by_pattern_on_the_embedded_broker() {
    runtime().block_on(routes(&Setup::embedded()));
}

#[test]
fn routes_send_tasks_to_queues_by_pattern_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("routes", AmqpOptions::default());
        routes(&setup).await;
        setup.cleanup().await;
    });
}

#[test]
fn a_result_state_is_stored_for_each_automatic_retry() {
    // The RETRY state between attempts is what a Celery client sees while it waits.
    runtime().block_on(async {
        let setup = Setup::embedded();
        let mut options = setup.options("retry-state");
        options.task_policies = TaskAnnotations::new([(
            "math.unstable".to_owned(),
            PolicyOverrides {
                retry_backoff: Some(Duration::from_secs(2)),
                ..PolicyOverrides::default()
            },
        )]);
        let worker = setup.start(options).await;
        let result = setup
            .send("math.unstable", json!([1]), SendOptions::default())
            .await;
        let deadline = Instant::now() + WAIT;
        let retrying = loop {
            let meta = result.meta().await.unwrap();
            if let Some(meta) = meta.filter(|m| m.status != TaskState::Pending) {
                break meta;
            }
            assert!(Instant::now() < deadline, "no state stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(retrying.status, TaskState::Retry);
        assert_eq!(retrying.exception().unwrap().exc_type, "ConnectionError");
        assert_eq!(result.get(WAIT).await.unwrap(), json!(1));
        worker.stop().await;
    });
}

/// The soft limit reaches the task (`ctx.should_stop()`), which stops cleanly with a result
/// long before its hard limit; on both brokers, whatever the concurrency.
async fn soft_limit(setup: &Setup) {
    let worker = setup.start(setup.options("soft-limit")).await;
    let started = Instant::now();
    let result = setup
        .send(
            "math.cooperative",
            json!([1000]),
            SendOptions {
                soft_time_limit: Some(Duration::from_millis(300)),
                time_limit: Some(Duration::from_secs(20)),
                ..SendOptions::default()
            },
        )
        .await;
    let steps = result.get(WAIT).await.unwrap().as_u64().unwrap();
    assert!(
        (5..100).contains(&steps),
        "stopped at the soft limit after {steps} of 1000 steps of 10 ms"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The hard limit from the message beats the worker's 30 s default.
    let hard = setup
        .send(
            "math.cooperative",
            json!([1000]),
            SendOptions {
                time_limit: Some(Duration::from_millis(500)),
                ..SendOptions::default()
            },
        )
        .await;
    match hard.get(WAIT).await {
        Err(GetError::Failed { exception, .. }) => {
            assert_eq!(exception.exc_type, "TimeLimitExceeded");
            assert_eq!(exception.exc_message, [json!(0.5)]);
        }
        other => panic!("expected TimeLimitExceeded, got {other:?}"),
    }
    worker.stop().await;
}

#[test]
fn soft_and_hard_time_limits_on_the_embedded_broker() {
    runtime().block_on(soft_limit(&Setup::embedded()));
}

#[test]
fn soft_and_hard_time_limits_on_rabbitmq() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("soft-limit", AmqpOptions::default());
        soft_limit(&setup).await;
        setup.cleanup().await;
    });
}

#[test]
fn a_python_celery_client_revokes_and_terminates_tasks_on_wasmq_workers() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("py-revoke", AmqpOptions::default());
        let node = format!("wasmq-test-py-revoke@{}", setup.queue);
        let worker = setup.start(setup.options(&node)).await;
        let queue = setup.queue.clone();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(crate::support::python())
                .arg(crate::support::python_dir().join("revoke_client.py"))
                .env("BROKER", crate::support::KOMBU_AMQP_URL)
                .env("BACKEND", REDIS_URL)
                .env("QUEUE", queue)
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
        assert_eq!(report["revoked"]["error"], "TaskRevokedError", "{report:#}");
        assert_eq!(report["revoked"]["state"], "REVOKED");
        // `inspect active` must have shown it running, or the revoke found it still queued.
        assert_eq!(report["seen_running"], true, "{report:#}");
        assert_eq!(
            report["terminated"]["error"], "TaskRevokedError",
            "{report:#}"
        );
        assert_eq!(report["terminated"]["message"], "terminated");
        assert!(
            report["terminated_after_s"].as_f64().unwrap() < 3.0,
            "{report:#}"
        );
        assert_eq!(report["after"], json!({"ok": 4}), "{report:#}");
        worker.stop().await;
        setup.cleanup().await;
    });
}

#[test]
fn automatic_retries_back_off_exponentially_on_redis() {
    runtime().block_on(async {
        let setup = Setup::redis("redis-autoretry");
        autoretry(&setup).await;
        setup.cleanup().await;
    });
}

#[test]
fn rate_limits_space_runs_without_blocking_other_tasks_on_redis() {
    runtime().block_on(async {
        let setup = Setup::redis("redis-rate");
        rate_limit(&setup).await;
        setup.cleanup().await;
    });
}

#[test]
fn poison_messages_are_dead_lettered_after_max_deliveries_on_redis() {
    runtime().block_on(async {
        let setup = Setup::redis("redis-poison");
        poison(&setup).await;
        setup.cleanup().await;
    });
}

#[test]
fn revoke_refuses_and_terminates_tasks_across_restarts_on_redis() {
    runtime().block_on(async {
        let setup = Setup::redis("redis-revoke");
        revoke(&setup, &format!("revoke-redis@{}", setup.queue)).await;
        setup.cleanup().await;
    });
}
