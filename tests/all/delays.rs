//! Delayed execution (countdown, eta) on the real brokers, without unacked messages: through
//! RabbitMQ's native delayed delivery levels (shared with Python Celery) and through the
//! Redis sorted-set scheduler. Each accuracy test prints the lateness it measured — the
//! result's `date_done` minus the message's `eta`; `math.add` takes well under a
//! millisecond, so that is when the task started — as `lateness_ms …` (run with
//! `--nocapture` to see it).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use wasmq::broker::Broker;
use wasmq::broker::amqp::AmqpBroker;
use wasmq::broker::scheduled::{RedisScheduler, RedisSchedulerOptions, ScheduledBroker};
use wasmq::client::{AsyncResult, Client, SendOptions};
use wasmq::worker::WorkerOptions;

use crate::support::{
    AMQP_URL, KOMBU_AMQP_URL, RABBITMQ, REDIS_URL, bundled_registry, python, python_dir, runtime,
    sandbox, unique_queue,
};

const WAIT: Duration = Duration::from_secs(60);

/// A wasmq worker in this process, consuming `queue` from `broker`, results in Redis.
struct InProcessWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
    /// Forgets the node once the worker has stopped.
    broker: Arc<dyn Broker>,
    node: String,
}

impl InProcessWorker {
    async fn start(broker: Arc<dyn Broker>, queue: &str) -> Self {
        let backend = wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), AMQP_URL)
            .expect("backend");
        let registry = bundled_registry(sandbox()).await;
        let options = WorkerOptions {
            queues: vec![queue.to_owned()],
            concurrency: 4,
            node_name: format!("wasmq-delays@{queue}"),
            ..WorkerOptions::default()
        };
        let node = options.node_name.clone();
        let worker = wasmq::worker::Worker::new(Arc::clone(&broker), backend, registry, options);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("worker");
        });
        Self {
            stop,
            handle,
            broker,
            node,
        }
    }

    /// Stops the worker and deletes its node's revocation queue.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.expect("worker task");
        self.broker
            .forget_node(&self.node)
            .await
            .expect("forget the node");
    }
}

fn amqp() -> Arc<dyn Broker> {
    Arc::new(AmqpBroker::new(AMQP_URL).expect("broker"))
}

fn client(broker: Arc<dyn Broker>, queue: &str) -> Client {
    let backend =
        wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), AMQP_URL).expect("backend");
    Client::new(broker, backend).with_default_queue(queue)
}

/// A delayed `math.add(a, b)` sent through `client`, with the eta it carries.
struct Sent {
    result: AsyncResult,
    eta: DateTime<Utc>,
    expected: Value,
}

async fn send_add(client: &Client, a: i64, b: i64, countdown: Duration) -> Sent {
    let options = SendOptions {
        countdown: Some(countdown),
        ..SendOptions::default()
    };
    let message = client.build_message("math.add", vec![json!(a), json!(b)], Map::new(), &options);
    let eta = message.eta.expect("a countdown sets the eta");
    let result = client.send_message(&message, None).await.expect("send");
    Sent {
        result,
        eta,
        expected: json!(a + b),
    }
}

/// Waits for the result; returns how long after its eta the task ran (negative: early).
async fn lateness(sent: &Sent) -> chrono::Duration {
    let value = sent.result.get(WAIT).await.expect("result");
    assert_eq!(value, sent.expected);
    let meta = sent.result.meta().await.expect("meta").expect("stored");
    let done = meta
        .date_done
        .as_deref()
        .and_then(wasmq::protocol::parse_time)
        .expect("date_done");
    done - sent.eta
}

/// Asserts every task ran no earlier than its eta and less than a second after it, and
/// prints the figures.
fn check_accuracy(what: &str, lateness: &[chrono::Duration]) {
    let mut ms: Vec<i64> = lateness.iter().map(|d| d.num_milliseconds()).collect();
    eprintln!("lateness_ms {what}: {ms:?}");
    for late in lateness {
        assert!(
            *late >= chrono::Duration::zero(),
            "{what}: a task ran before its eta: {ms:?}"
        );
        assert!(
            *late < chrono::Duration::seconds(1),
            "{what}: a task ran a second or more after its eta: {ms:?}"
        );
    }
    ms.sort_unstable();
    eprintln!(
        "lateness_ms {what}: max {} median {}",
        ms.last().copied().unwrap_or_default(),
        ms.get(ms.len() / 2).copied().unwrap_or_default()
    );
}

/// Sends a 5 s countdown first, then 1, 2 and 3 s ones, a fractional one and one under a
/// second.
async fn send_mixed(client: &Client) -> Vec<Sent> {
    let mut sent = vec![send_add(client, 5, 0, Duration::from_secs(5)).await];
    for (i, secs) in [1_u64, 2, 3].into_iter().enumerate() {
        let i = i64::try_from(i).unwrap();
        sent.push(send_add(client, i, 10, Duration::from_secs(secs)).await);
    }
    sent.push(send_add(client, 7, 7, Duration::from_millis(2_500)).await);
    sent.push(send_add(client, 8, 8, Duration::from_millis(300)).await);
    sent
}

/// Each task of [`send_mixed`] starts within a second after its eta, so the 1 s one was not
/// held behind the 5 s one.
async fn check_mixed(sent: &[Sent], what: &str) {
    let mut late = Vec::new();
    for s in sent {
        late.push(lateness(s).await);
    }
    check_accuracy(what, &late);
}

async fn delete(broker: &dyn Broker, queue: &str) {
    broker.delete_queue(queue).await.expect("delete the queue");
}

#[test]
fn delayed_tasks_on_rabbitmq_start_within_a_second_of_their_eta_in_any_order() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("delays");
        let worker = InProcessWorker::start(amqp(), &queue).await;
        let sent = send_mixed(&client(amqp(), &queue)).await;
        check_mixed(&sent, "rabbitmq").await;
        worker.stop().await;
        delete(&*amqp(), &queue).await;
    });
}

#[test]
fn a_delayed_task_survives_a_worker_restart_before_it_is_due() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("delays-restart");
        let broker = amqp();
        let worker = InProcessWorker::start(Arc::clone(&broker), &queue).await;
        let client = client(Arc::clone(&broker), &queue);
        // Long enough for the new worker to load its plugins before the task is due.
        let sent = send_add(&client, 20, 22, Duration::from_secs(8)).await;
        worker.stop().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let worker = InProcessWorker::start(amqp(), &queue).await;
        check_accuracy("rabbitmq worker restart", &[lateness(&sent).await]);
        worker.stop().await;
        delete(&*broker, &queue).await;
    });
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[test]
fn a_delayed_task_survives_a_rabbitmq_restart() {
    // Stopping RabbitMQ disturbs every other RabbitMQ test: run alone.
    let _exclusive = RABBITMQ
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("delays-broker-restart");
        let broker = amqp();
        let worker = InProcessWorker::start(Arc::clone(&broker), &queue).await;
        let client = client(Arc::clone(&broker), &queue);
        let sent = send_add(&client, 1, 2, Duration::from_secs(15)).await;
        let started = Instant::now();
        tokio::task::spawn_blocking(|| {
            rabbitmqctl(&["stop_app"]);
            rabbitmqctl(&["start_app"]);
            rabbitmqctl(&["await_startup"]);
        })
        .await
        .unwrap();
        let back_after = started.elapsed();
        eprintln!("rabbitmq was back {back_after:?} after the publish");
        let late = lateness(&sent).await;
        if back_after < Duration::from_secs(12) {
            check_accuracy("rabbitmq broker restart", &[late]);
        } else {
            eprintln!("lateness_ms rabbitmq broker restart (back late): {late}");
        }
        worker.stop().await;
        delete(&*broker, &queue).await;
    });
}

/// An unmodified Python Celery client whose queues are quorum queues (the only case in which
/// Celery 5.5+ uses native delayed delivery; it also needs a non-direct exchange) publishes a
/// countdown to `celery_delayed_27`; it reaches the wasmq worker's queue through the levels.
#[test]
fn a_python_celery_client_with_quorum_queues_delays_through_the_shared_levels() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    python();
    runtime().block_on(async {
        let queue = unique_queue("delays-py");
        // Python declares the work queue first (quorum, topic exchange), as it would in a
        // Celery deployment; the wasmq worker uses it as it is.
        let queue_for_python = queue.clone();
        let output = tokio::task::spawn_blocking(move || {
            run_python_delayed_client(&queue_for_python, "declare")
        })
        .await
        .unwrap();
        assert_eq!(output["declared"], true, "{output}");
        let worker = InProcessWorker::start(amqp(), &queue).await;
        // The worker has declared the levels and bound the queue: the client can send.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let queue_for_python = queue.clone();
        let output = tokio::task::spawn_blocking(move || {
            run_python_delayed_client(&queue_for_python, "send")
        })
        .await
        .unwrap();
        assert_eq!(output["result"], 42, "{output}");
        assert_eq!(
            output["exchange"], "celery_delayed_27",
            "Celery used native delayed delivery: {output}"
        );
        let late = output["lateness_ms"].as_f64().expect("lateness");
        eprintln!("lateness_ms python quorum client: {late}");
        assert!((0.0..1000.0).contains(&late), "{output}");
        worker.stop().await;
        delete(&*amqp(), &queue).await;
    });
}

fn run_python_delayed_client(queue: &str, mode: &str) -> Value {
    let output = Command::new(python())
        .arg(python_dir().join("delayed_client.py"))
        .arg(mode)
        .env("BROKER", KOMBU_AMQP_URL)
        .env("BACKEND", REDIS_URL)
        .env("QUEUE", queue)
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn scheduler(prefix: &str) -> Arc<RedisScheduler> {
    Arc::new(
        RedisScheduler::new(
            REDIS_URL,
            RedisSchedulerOptions {
                prefix: prefix.to_owned(),
                ..RedisSchedulerOptions::default()
            },
        )
        .expect("scheduler"),
    )
}

#[test]
fn delayed_tasks_through_the_redis_scheduler_start_within_a_second_of_their_eta() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("delays-redis");
        let prefix = format!("{queue}.scheduler");
        // The worker and the client each have their own scheduler, as separate processes do.
        let worker_side: Arc<dyn Broker> =
            Arc::new(ScheduledBroker::new(amqp(), scheduler(&prefix)));
        let client_side: Arc<dyn Broker> =
            Arc::new(ScheduledBroker::new(amqp(), scheduler(&prefix)));
        let worker = InProcessWorker::start(worker_side, &queue).await;
        let sent = send_mixed(&client(Arc::clone(&client_side), &queue)).await;
        // Nothing waits in RabbitMQ meanwhile: the messages are in Redis.
        assert_eq!(amqp().queue_length(&queue).await.unwrap(), 0);
        assert!(client_side.queue_length(&queue).await.unwrap() >= 5);
        check_mixed(&sent, "redis scheduler").await;
        worker.stop().await;
        delete(&*client_side, &queue).await;
        scheduler(&prefix).clear().await.unwrap();
    });
}

#[test]
fn a_claim_whose_scheduler_died_is_published_exactly_once_after_its_lease() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("delays-reclaim");
        let prefix = format!("{queue}.scheduler");
        let broker = amqp();
        let (dead, alive) = (scheduler(&prefix), scheduler(&prefix));
        let client = client(Arc::clone(&broker), &queue);
        let message = client
            .build_message(
                "math.add",
                vec![json!(1), json!(1)],
                Map::new(),
                &SendOptions::default(),
            )
            .encode();
        dead.schedule(&queue, &message, Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The first scheduler claims it and dies before publishing.
        let claimed = dead.claim(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(claimed.members.len(), 1);
        // While the lease holds, nobody else takes it.
        assert_eq!(alive.publish_due(&*broker).await.unwrap().published, 0);
        assert_eq!(alive.pending(&queue).await.unwrap(), 1, "claimed, not lost");
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(alive.publish_due(&*broker).await.unwrap().published, 1);
        assert_eq!(alive.publish_due(&*broker).await.unwrap().published, 0);
        assert_eq!(dead.publish_due(&*broker).await.unwrap().published, 0);
        assert_eq!(alive.pending(&queue).await.unwrap(), 0);

        // Many due messages, two schedulers racing: each is published exactly once.
        for _ in 0..49 {
            alive
                .schedule(&queue, &message, Duration::from_millis(1))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (one, two) = tokio::join!(
            async {
                let mut n = 0;
                for _ in 0..10 {
                    n += dead.publish_due(&*broker).await.unwrap().published;
                }
                n
            },
            async {
                let mut n = 0;
                for _ in 0..10 {
                    n += alive.publish_due(&*broker).await.unwrap().published;
                }
                n
            }
        );
        assert_eq!(one + two, 49, "{one} + {two}");
        let mut consumer = broker
            .consume(std::slice::from_ref(&queue), 100)
            .await
            .unwrap();
        for _ in 0..50 {
            let delivery = tokio::time::timeout(WAIT, consumer.next())
                .await
                .unwrap()
                .unwrap();
            delivery.ack().await.unwrap();
        }
        let extra = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
        assert!(extra.is_err(), "a message was published twice");
        consumer.flush_acks().await;
        consumer.close().await;
        drop(consumer);
        delete(&*broker, &queue).await;
        alive.clear().await.unwrap();
    });
}
