//! The Redis broker (kombu's layout) against a real Redis and real Python Celery 5.x: an
//! unmodified Python client and its canvas served by a wasmq worker, wasmq's client calling a
//! Python worker, both kinds of worker sharing one queue, revocation by a Python client, a
//! countdown longer than the visibility timeout, a SIGKILLed worker's messages restored by
//! lease, and the layout itself (priorities, dead letters, malformed messages, broadcasts).
//! Every test uses queues of its own in database 5 and deletes them.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::broker::redis::{RedisBroker, RedisBrokerOptions, kombu};
use wasmq::broker::{Broker, ControlBroadcast, Revocation};
use wasmq::client::{Client, GetError, SendOptions};
use wasmq::protocol::{ControlCommand, Envelope, Properties};
use wasmq::worker::{WorkerOptions, WorkerStats};

use crate::interop::{PythonWorker, check_python_client_results};
use crate::support::{
    REDIS_URL, bundled_registry, python, python_dir, runtime, sandbox, unique_queue,
};

/// The broker database of these tests (results go to [`REDIS_URL`]).
const BROKER: &str = "redis://127.0.0.1:6379/5";

const WAIT: Duration = Duration::from_secs(30);

/// A database of its own for the test whose visibility timeout is 2 s: that timeout would
/// put back the messages of the other tests' workers whenever a heartbeat runs late.
const SHORT_VISIBILITY_BROKER: &str = "redis://127.0.0.1:6379/6";

fn broker_with(url: &str, options: RedisBrokerOptions) -> Arc<RedisBroker> {
    Arc::new(RedisBroker::new(url, options).unwrap())
}

fn broker() -> Arc<RedisBroker> {
    broker_with(BROKER, RedisBrokerOptions::default())
}

fn client(queue: &str) -> Client {
    client_on(BROKER, queue)
}

fn client_on(url: &str, queue: &str) -> Client {
    let results = wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), url).unwrap();
    Client::new(broker_with(url, RedisBrokerOptions::default()), results)
        .with_default_queue(queue.to_owned())
}

/// A wasmq worker in this process consuming `queue` on the Redis broker.
struct RedisWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Arc<WorkerStats>>,
}

async fn start_worker(queue: &str, broker: Arc<RedisBroker>, concurrency: usize) -> RedisWorker {
    let results = wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), BROKER).unwrap();
    let options = WorkerOptions {
        queues: vec![queue.to_owned()],
        concurrency,
        node_name: format!("wasmq-test@{queue}"),
        ..WorkerOptions::default()
    };
    let worker =
        wasmq::worker::Worker::new(broker, results, bundled_registry(sandbox()).await, options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
    });
    RedisWorker { stop, handle }
}

impl RedisWorker {
    async fn stop(self) -> Arc<WorkerStats> {
        let _ = self.stop.send(());
        self.handle.await.unwrap()
    }
}

/// Runs a script of `tests/python` against the Redis broker; returns its JSON report.
async fn run_python(script: &str, queue: &str) -> Value {
    let (script, queue) = (script.to_owned(), queue.to_owned());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(python_dir().join(&script))
            .env("BROKER", BROKER)
            .env("BACKEND", REDIS_URL)
            .env("QUEUE", &queue)
            .output()
            .expect("run a Python client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Runs `script` with Python (Celery installed) and `env`; returns what it printed.
fn python_inline(script: &str, env: &[(&str, &str)]) -> Vec<u8> {
    let output = Command::new(python())
        .args(["-c", script])
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the Python script failed:\n{script}"
    );
    output.stdout
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(BROKER)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The keys of `queue` left in Redis (its lists, delay set and dead letters).
async fn keys_of(queue: &str) -> Vec<String> {
    let mut connection = redis().await;
    let mut left: Vec<String> = Vec::new();
    for key in kombu::queue_keys(queue).into_iter().chain([
        format!("wasmq.delayed.{queue}"),
        format!("wasmq.dead.{queue}"),
    ]) {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        if exists {
            left.push(key);
        }
    }
    left
}

fn envelope(task: &str, id: &str, priority: u8) -> Envelope {
    let mut headers = Map::new();
    headers.insert("task".into(), task.into());
    headers.insert("id".into(), id.into());
    Envelope {
        headers,
        properties: Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            correlation_id: Some(id.into()),
            priority: Some(priority),
            ..Properties::default()
        },
        body: b"[[1, 2], {}, {}]".to_vec(),
    }
}

#[test]
fn python_celery_clients_calls_canvas_and_revokes_are_served_by_a_wasmq_worker_on_redis() {
    python();
    runtime().block_on(async {
        let queue = unique_queue("redis-pyclient");
        let worker = start_worker(&queue, broker(), 2).await;
        check_python_client_results(&run_python("client.py", &queue).await);
        crate::canvas::check_python_canvas_results(&run_python("canvas_client.py", &queue).await);
        let report = run_python("revoke_client.py", &queue).await;
        assert_eq!(report["revoked"]["error"], "TaskRevokedError", "{report:#}");
        // `inspect active` must have shown it running, or the revoke found it still queued.
        assert_eq!(report["seen_running"], true, "{report:#}");
        assert_eq!(report["terminated"]["message"], "terminated", "{report:#}");
        assert!(
            report["terminated_after_s"].as_f64().unwrap() < 3.0,
            "{report:#}"
        );
        assert_eq!(report["after"], json!({"ok": 4}), "{report:#}");

        // Celery's inspect: a pidbox broadcast, answered into the client's reply list.
        let script = "import os, json\nfrom celery import Celery\napp = Celery('c', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])\ni = app.control.inspect(destination=[os.environ['NODE']], timeout=5)\nprint(json.dumps({'ping': i.ping(), 'active_queues': i.active_queues()}))\n";
        let node = format!("wasmq-test@{queue}");
        let output = python_inline(script, &[("BROKER", BROKER), ("BACKEND", REDIS_URL), ("NODE", &node)]);
        let inspected: Value = serde_json::from_slice(&output).unwrap();
        assert_eq!(inspected["ping"][&node], json!({"ok": "pong"}), "{inspected:#}");
        assert_eq!(
            inspected["active_queues"][&node][0]["name"],
            json!(queue),
            "{inspected:#}"
        );

        // 300 tasks at once from Python, all answered.
        let script = "import os, json\nfrom celery import Celery\napp = Celery('c', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])\nsent = [app.send_task('math.add', (i, i), queue=os.environ['QUEUE']) for i in range(300)]\nprint(json.dumps([r.get(timeout=60) for r in sent]))\n";
        let output = python_inline(script, &[("BROKER", BROKER), ("BACKEND", REDIS_URL), ("QUEUE", &queue)]);
        let sums: Vec<f64> = serde_json::from_slice(&output).unwrap();
        assert_eq!(sums, (0..300).map(|i| f64::from(2 * i)).collect::<Vec<_>>());

        // The 2-element body that crash-loops Python workers: a FAILURE and a dead letter.
        let id = format!("poison-{queue}");
        let mut poison = envelope("math.add", &id, 0);
        poison.body = b"[[2, 5], {}]".to_vec();
        broker().publish(&queue, &poison, None).await.unwrap();
        let results =
            wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), BROKER).unwrap();
        let meta = results.wait(&id, WAIT).await.unwrap();
        assert_eq!(meta.exception().unwrap().exc_type, "DecodeError");
        // (The unknown task client.py sent is dead-lettered too.)
        let deadline = Instant::now() + WAIT;
        let dead = loop {
            let dead = broker().dead_letters(&queue, 10).await.unwrap();
            if let Some(poison) = dead.iter().find(|d| d.task_id.as_deref() == Some(id.as_str())) {
                break poison.clone();
            }
            assert!(Instant::now() < deadline, "no dead letter for {id}: {dead:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(dead.reason.starts_with("malformed message: "), "{}", dead.reason);
        assert_eq!(dead.envelope.body, b"[[2, 5], {}]");
        worker.stop().await;
        broker().delete_queue(&queue).await.unwrap();
        assert!(keys_of(&queue).await.is_empty());
    });
}

#[test]
fn a_wasmq_client_calls_a_python_worker_and_both_workers_share_a_queue_running_each_task_once() {
    python();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let queue = unique_queue("redis-shared");
        let (for_python, path) = (queue.clone(), dir.path().to_path_buf());
        let python_worker = tokio::task::spawn_blocking(move || {
            PythonWorker::start_on(BROKER, &for_python, REDIS_URL, &path)
        })
        .await
        .unwrap();
        let client = client(&queue);
        // The Python worker alone: its own tasks, with keyword arguments and a failure.
        let sum = client
            .send_task(
                "tasks.add",
                vec![],
                json!({"x": 40, "y": 2}).as_object().cloned().unwrap(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(sum.get(WAIT).await.unwrap(), json!(42));
        let fail = client
            .send_task("tasks.fail", vec![], Map::new(), SendOptions::default())
            .await
            .unwrap();
        match fail.get(WAIT).await {
            Err(GetError::Failed { exception, .. }) => {
                assert_eq!(exception.exc_type, "ValueError");
                assert_eq!(exception.exc_message, [json!("bad input"), json!(42)]);
            }
            other => panic!("expected ValueError, got {other:?}"),
        }

        // Both on one queue: 300 tasks, each run once by one of them.
        let wasmq_worker = start_worker(&queue, broker(), 4).await;
        const N: i64 = 300;
        let mut results = Vec::new();
        for i in 0..N {
            results.push(
                client
                    .send_task(
                        "math.add",
                        vec![json!(i), json!(i)],
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .unwrap(),
            );
        }
        for (i, result) in (0..N).zip(&results) {
            assert_eq!(
                result.get(WAIT).await.unwrap().as_f64(),
                Some((2 * i) as f64)
            );
        }
        // Every result is in; give a duplicate time to show itself before counting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stats = wasmq_worker.stop().await;
        let by_wasmq = stats.succeeded.load(std::sync::atomic::Ordering::Relaxed);
        let by_python = python_worker
            .log_text()
            .lines()
            .filter(|line| line.contains("Task math.add[") && line.contains("succeeded in"))
            .count() as u64;
        assert_eq!(
            by_wasmq + by_python,
            N as u64,
            "wasmq ran {by_wasmq}, Python {by_python}"
        );
        assert!(
            by_wasmq > 0 && by_python > 0,
            "both took work: wasmq {by_wasmq}, Python {by_python}"
        );
        drop(python_worker);
        broker().delete_queue(&queue).await.unwrap();
    });
}

/// kombu holds a task with a countdown unacknowledged until it is due, so with a visibility
/// timeout shorter than the countdown it is restored and run again (celery#4400 and kin).
/// wasmq keeps delays in a sorted set: nothing is held, each runs once.
#[test]
fn a_countdown_longer_than_the_visibility_timeout_runs_once() {
    python();
    runtime().block_on(async {
        let queue = unique_queue("redis-countdown");
        let short = RedisBrokerOptions {
            visibility_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_millis(400),
            ..RedisBrokerOptions::default()
        };
        let broker = broker_with(SHORT_VISIBILITY_BROKER, short);
        let worker = start_worker(&queue, broker.clone(), 2).await;
        let client = client_on(SHORT_VISIBILITY_BROKER, &queue);
        let sent_at = Instant::now();
        let ours = client
            .send_task(
                "math.add",
                vec![json!(1), json!(2)],
                Map::new(),
                SendOptions {
                    countdown: Some(Duration::from_secs(10)),
                    ..SendOptions::default()
                },
            )
            .await
            .unwrap();
        // An unmodified Python client's countdown: an `eta` header on a message in the list.
        let script = "import os, sys\nfrom celery import Celery\napp = Celery('c', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])\nprint(app.send_task('math.add', (3, 4), queue=os.environ['QUEUE'], countdown=10).id)\n";
        let output = python_inline(script, &[("BROKER", SHORT_VISIBILITY_BROKER), ("BACKEND", REDIS_URL), ("QUEUE", &queue)]);
        let theirs = client.result(String::from_utf8_lossy(&output).trim());
        assert_eq!(ours.get(Duration::from_secs(30)).await.unwrap(), json!(3));
        assert_eq!(theirs.get(Duration::from_secs(30)).await.unwrap(), json!(7));
        let waited = sent_at.elapsed();
        assert!(waited >= Duration::from_secs(9), "ran after {waited:?}");
        // Past several visibility timeouts: nothing comes back to run again.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let stats = worker.stop().await;
        assert_eq!(stats.succeeded.load(std::sync::atomic::Ordering::Relaxed), 2, "each ran once");
        assert_eq!(broker.queue_length(&queue).await.unwrap(), 0);
        broker.delete_queue(&queue).await.unwrap();
    });
}

/// A worker SIGKILLed mid-task: its messages are put back by another wasmq worker as soon
/// as its lease lapses (5 s), where kombu waits for the visibility timeout (an hour).
#[test]
fn a_killed_workers_messages_are_restored_when_its_lease_lapses() {
    runtime().block_on(async {
        let queue = unique_queue("redis-killed");
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        std::fs::copy(crate::support::MATH, plugins.join("math.wasm")).unwrap();
        let log = dir.path().join("killed.log");
        let mut killed = crate::processes::wasmq(dir.path())
            .args([
                "worker",
                "--broker",
                BROKER,
                "--result-backend",
                REDIS_URL,
                "-Q",
                &queue,
            ])
            .arg("--plugins")
            .arg(&plugins)
            .args(["--name", "killed@redis", "--concurrency", "2"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        crate::processes::wait_for_log(&log, "worker ready");
        let client = client(&queue);
        let mut results = Vec::new();
        for _ in 0..4 {
            results.push(
                client
                    .send_task(
                        "math.sleep",
                        vec![json!(1.0)],
                        Map::new(),
                        SendOptions::default(),
                    )
                    .await
                    .unwrap(),
            );
        }
        // Two are running and two prefetched when it dies.
        tokio::time::sleep(Duration::from_millis(500)).await;
        killed.kill().unwrap();
        killed.wait().unwrap();
        let killed_at = Instant::now();
        assert!(
            !std::fs::read_to_string(&log)
                .unwrap()
                .contains("succeeded in")
        );

        let survivor = start_worker(&queue, broker(), 4).await;
        for result in &results {
            assert_eq!(result.get(WAIT).await.unwrap(), json!(1.0));
        }
        let recovered = killed_at.elapsed();
        eprintln!(
            "Redis broker: the killed worker's 4 tasks all finished {recovered:?} after the kill"
        );
        // Lease 5 s + a heartbeat to notice + 1 s to run them.
        assert!(recovered < Duration::from_secs(10), "{recovered:?}");
        let stats = survivor.stop().await;
        assert_eq!(
            stats.succeeded.load(std::sync::atomic::Ordering::Relaxed),
            4
        );
        broker().delete_queue(&queue).await.unwrap();
    });
}

#[test]
fn kombus_layout_priorities_dead_letters_malformed_messages_and_broadcasts() {
    runtime().block_on(async {
        let queue = unique_queue("redis-layout");
        let broker = broker();
        // Priorities: on Redis, 0 is the highest (kombu's steps 0, 3, 6, 9).
        for (id, priority) in [("low", 9), ("high", 0), ("middle", 5)] {
            broker
                .publish(&queue, &envelope("math.add", id, priority), None)
                .await
                .unwrap();
        }
        let mut connection = redis().await;
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(kombu::queue_key(&queue, 5))
            .arg(0)
            .arg(-1)
            .query_async(&mut connection)
            .await
            .unwrap();
        let message: Value = serde_json::from_str(&raw[0]).unwrap();
        assert_eq!(message["properties"]["body_encoding"], "base64");
        assert_eq!(
            message["properties"]["delivery_info"]["routing_key"],
            queue.as_str()
        );
        // Something that is not a kombu message at all.
        let _: () = redis::cmd("LPUSH")
            .arg(&queue)
            .arg("not a message")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(broker.queue_length(&queue).await.unwrap(), 4);

        let mut consumer = broker
            .consume(std::slice::from_ref(&queue), 10)
            .await
            .unwrap();
        let mut order = Vec::new();
        for _ in 0..4 {
            let delivery = tokio::time::timeout(WAIT, consumer.next())
                .await
                .unwrap()
                .unwrap();
            order.push(
                delivery
                    .envelope
                    .headers
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            );
            match order.last().unwrap().as_deref() {
                Some("high") => delivery.ack().await.unwrap(),
                Some("middle") => delivery.release().await.unwrap(),
                Some("low") => delivery.dead_letter("a test").await.unwrap(),
                _ => delivery.dead_letter("malformed message").await.unwrap(),
            }
        }
        assert_eq!(
            order,
            [
                Some("high".into()),
                None,
                Some("middle".into()),
                Some("low".into())
            ]
        );
        // The released message is delivered again, first, and counts its deliveries.
        let again = tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.envelope.headers.get("id"), Some(&json!("middle")));
        assert_eq!(again.delivery_count, 2);
        assert!(again.envelope.headers.get("redelivered").is_none());
        again.ack().await.unwrap();
        let dead = broker.dead_letters(&queue, 10).await.unwrap();
        let reasons: Vec<_> = dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons, ["a test", "malformed message"]);
        assert_eq!(dead[0].task_id.as_deref(), Some("low"));
        assert_eq!(dead[1].envelope.body, b"not a message");
        consumer.close().await;
        drop(consumer);

        // Nothing of them is left unacknowledged.
        let unacked: Vec<String> = redis::cmd("HKEYS")
            .arg("unacked")
            .query_async(&mut connection)
            .await
            .unwrap();
        for key in &unacked {
            let kept: Option<String> = redis::cmd("HGET")
                .arg("unacked")
                .arg(key)
                .query_async(&mut connection)
                .await
                .unwrap();
            assert!(
                !kept.unwrap_or_default().contains(&queue),
                "{key} is still unacknowledged"
            );
        }

        // Delays wait in the queue's sorted set and count towards its length.
        broker
            .publish(
                &queue,
                &envelope("math.add", "later", 0),
                Some(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        assert_eq!(broker.queue_length(&queue).await.unwrap(), 1);

        // Revocations reach a listener that starts later; broadcasts reach a node's mailbox
        // and its reply comes back.
        let task_id = format!("revoked-{queue}");
        broker
            .revoke(&Revocation::now(task_id.clone(), false))
            .await
            .unwrap();
        let mut revocations = broker.revocations("late@redis").await.unwrap();
        let heard = loop {
            let revocation = tokio::time::timeout(WAIT, revocations.recv())
                .await
                .unwrap()
                .unwrap();
            if revocation.task_id == task_id {
                break revocation;
            }
        };
        assert!(!heard.terminate);
        let node = format!("node-{queue}");
        let mut mailbox = broker.control_requests(&node).await.unwrap().unwrap();
        let answering = tokio::spawn(async move {
            let request = mailbox.recv().await.unwrap();
            assert_eq!(request.command.method, "ping");
            request.reply.unwrap().send(json!({"ok": "pong"})).unwrap();
        });
        let replies = broker
            .broadcast_control(&ControlBroadcast {
                command: ControlCommand::new("ping", Map::new(), Some(vec![node.clone()])),
                reply: true,
                timeout: Duration::from_secs(5),
                limit: Some(1),
            })
            .await
            .unwrap();
        answering.await.unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].node, node);
        assert_eq!(replies[0].reply, json!({"ok": "pong"}));

        broker.delete_queue(&queue).await.unwrap();
        assert!(keys_of(&queue).await.is_empty());
    });
}

/// Readiness reflects actual consumption on Redis too: a worker whose Redis is unreachable
/// stays up, retries and reports "not consuming"; one on a live Redis reports consuming.
#[test]
fn a_worker_reports_whether_it_is_consuming_from_redis() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let queue = unique_queue("redis-status");
    let start = |broker: &str, file: &std::path::Path| {
        crate::processes::wasmq(dir.path())
            .args([
                "worker",
                "--broker",
                broker,
                "--result-backend",
                REDIS_URL,
                "-Q",
                &queue,
            ])
            .arg("--plugins")
            .arg(&plugins)
            .arg("--status-file")
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let status = |file: &std::path::Path| {
        let output = crate::processes::wasmq(dir.path())
            .args(["status", "--status-file"])
            .arg(file)
            .output()
            .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let wait_for = |file: &std::path::Path, code: i32| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (actual, stderr) = status(file);
            if actual == code && file.exists() {
                return stderr;
            }
            assert!(
                Instant::now() < deadline,
                "status stayed {actual}: {stderr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let down = dir.path().join("down.json");
    let mut unreachable = start("redis://127.0.0.1:1/0", &down);
    let stderr = wait_for(&down, 1);
    assert!(stderr.contains("not consuming"), "{stderr}");
    assert!(
        unreachable.try_wait().unwrap().is_none(),
        "it stays up and retries"
    );
    let up = dir.path().join("up.json");
    let mut healthy = start(BROKER, &up);
    wait_for(&up, 0);
    assert_eq!(status(&down).0, 1, "still not consuming");
    for child in [&mut unreachable, &mut healthy] {
        crate::processes::signal(child, "-TERM");
        let _ = child.wait();
    }
    runtime().block_on(async { broker().delete_queue(&queue).await.unwrap() });
}
