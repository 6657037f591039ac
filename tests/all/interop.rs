//! RabbitMQ, Redis and real Python Celery (the newest 5.x, in a virtualenv): an unmodified
//! Python client calling wasmq workers, wasmq's client calling a Python worker, the
//! poison message that crash-loops Python workers, and a dropped broker connection.
//! Every test uses queues of its own and deletes them.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use wasmq::broker::Broker;
use wasmq::broker::amqp::AmqpBroker;
use wasmq::client::{Client, GetError, SendOptions};
use wasmq::protocol::{Envelope, Properties};
use wasmq::worker::WorkerOptions;

use crate::support::{
    AMQP_URL, KOMBU_AMQP_URL, RABBITMQ, REDIS_URL, bundled_registry, python, python_dir, runtime,
    sandbox, unique_queue,
};

const WAIT: Duration = Duration::from_secs(30);

/// A wasmq worker in this process, consuming `queue` on RabbitMQ.
struct AmqpWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

async fn start_worker(queue: &str, backend_url: &str) -> AmqpWorker {
    let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::new(AMQP_URL).unwrap());
    let backend =
        wasmq::results::connect(backend_url, Duration::from_secs(3600), AMQP_URL).unwrap();
    let registry = bundled_registry(sandbox()).await;
    let options = WorkerOptions {
        queues: vec![queue.to_owned()],
        concurrency: 2,
        node_name: node(queue),
        ..WorkerOptions::default()
    };
    let worker = wasmq::worker::Worker::new(broker, backend, registry, options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    AmqpWorker { stop, handle }
}

impl AmqpWorker {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap();
    }
}

/// The node name of the wasmq workers consuming `queue`.
fn node(queue: &str) -> String {
    format!("wasmq-test@{queue}")
}

/// Deletes `queue` and what RabbitMQ holds for the node of its (stopped) wasmq workers.
async fn delete(queue: &str) {
    let broker = AmqpBroker::new(AMQP_URL).unwrap();
    broker.delete_queue(queue).await.unwrap();
    broker.forget_node(&node(queue)).await.unwrap();
}

fn run_python_client(queue: &str, backend: &str) -> Value {
    let output = Command::new(python())
        .arg(python_dir().join("client.py"))
        .env("BROKER", KOMBU_AMQP_URL)
        .env("BACKEND", backend)
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

/// What `tests/python/client.py` must report when a wasmq worker serves it (on any broker).
pub(crate) fn check_python_client_results(results: &Value) {
    assert_eq!(results["add"], json!({"ok": 5}), "{results:#}");
    assert_eq!(results["kwargs"], json!({"ok": 42}), "{results:#}");
    assert_eq!(results["compressed"], json!({"ok": 42}), "{results:#}");
    assert_eq!(results["countdown"], json!({"ok": 42}), "{results:#}");
    assert_eq!(
        results["text"],
        json!({"ok": "hello-from-python"}),
        "{results:#}"
    );
    let div = &results["div"];
    assert_eq!(div["error"], "ZeroDivisionError", "{results:#}");
    assert_eq!(div["message"], "division by zero");
    assert_eq!(div["is_zero_division"], true);
    let spin = &results["spin"];
    assert_eq!(spin["error"], "TimeLimitExceeded", "{results:#}");
    assert_eq!(
        spin["is_time_limit"], true,
        "Python can `except TimeLimitExceeded`"
    );
    let hog = &results["hog"];
    assert_eq!(hog["error"], "MemoryError", "{results:#}");
    assert_eq!(hog["is_memory_error"], true);
    let unknown = &results["unknown"];
    assert_eq!(unknown["error"], "NotRegistered", "{results:#}");
    assert_eq!(unknown["is_not_registered"], true);
    assert!(unknown["message"].as_str().unwrap().contains("math.nope"));
    // Issue 20: a task's own exception class and arguments reach Python as raised.
    let custom = &results["custom"];
    assert_eq!(custom["error"], "OutOfRange", "{results:#}");
    assert_eq!(
        custom["is_out_of_range"], true,
        "Python can `except wasmq_errors.OutOfRange`"
    );
    assert_eq!(custom["args"], json!([7.0, 0.0, 5.0]), "{results:#}");
    let gave_up = &results["gave_up"];
    assert_eq!(gave_up["is_gave_up"], true, "retry(exc=…): {results:#}");
    assert_eq!(
        gave_up["args"],
        json!(["the service never answers", 1]),
        "{results:#}"
    );
    // Issue 20, cause 8: what a task can know and ask, from a Python client.
    let request = &results["request"]["ok"];
    assert_eq!(request["priority"], 7, "{results:#}");
    assert_eq!(request["headers"], json!({"x-demo": "yes"}), "{results:#}");
    assert_eq!(
        request["properties"]["app_id"], "python-client",
        "{results:#}"
    );
    assert_eq!(
        (&request["time_limit"], &request["soft_time_limit"]),
        (&json!(20.0), &json!(10.0)),
        "{results:#}"
    );
    assert!(request["eta"].is_string(), "{results:#}");
    assert_eq!(request["redelivered"], false);
    assert_eq!(results["collatz"], json!({"ok": 8}), "{results:#}");
    assert_eq!(results["second_chance"], json!({"ok": 5}), "{results:#}");
    assert_eq!(results["total"], json!({"ok": 6.5}), "{results:#}");
    assert_eq!(results["kept"], json!({"ok": 42}), "{results:#}");
}

#[test]
fn python_celery_client_is_served_by_a_wasmq_worker_with_rpc_and_redis_results() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    python();
    runtime().block_on(async {
        for (backend, python_backend) in [("rpc://", "rpc://"), (REDIS_URL, REDIS_URL)] {
            let queue = unique_queue("pyclient");
            let worker = start_worker(&queue, backend).await;
            let queue_for_python = queue.clone();
            let results = tokio::task::spawn_blocking(move || {
                run_python_client(&queue_for_python, python_backend)
            })
            .await
            .unwrap();
            check_python_client_results(&results);
            worker.stop().await;
            delete(&queue).await;
        }
    });
}

/// A Python Celery worker running `tests/python/tasks.py`.
pub(crate) struct PythonWorker {
    child: Child,
    log: std::path::PathBuf,
}

impl PythonWorker {
    pub(crate) fn start(queue: &str, backend: &str, dir: &std::path::Path) -> Self {
        Self::start_on(KOMBU_AMQP_URL, queue, backend, dir)
    }

    /// A Celery worker (solo pool, `tests/python/tasks.py`) consuming `queue` on `broker`.
    pub(crate) fn start_on(
        broker: &str,
        queue: &str,
        backend: &str,
        dir: &std::path::Path,
    ) -> Self {
        let log = dir.join(format!("{queue}.log"));
        let child = Command::new(python())
            .args([
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "--pool",
                "solo",
                "--loglevel",
                "info",
            ])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-Q",
                queue,
            ])
            .args(["--hostname", &format!("py-{queue}@localhost")])
            .current_dir(python_dir())
            .env("BROKER", broker)
            .env("BACKEND", backend)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start a Celery worker");
        let worker = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&worker.log).unwrap_or_default();
            if text.contains(" ready.") {
                break worker;
            }
            assert!(
                Instant::now() < deadline,
                "the Celery worker never became ready:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl PythonWorker {
    /// What the worker logged so far (Celery logs `Task <name>[<id>] succeeded in …` for each
    /// task it ran).
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn wasmq_client_calls_a_python_celery_worker_through_rpc_and_redis() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        for backend in ["rpc://", REDIS_URL] {
            let queue = unique_queue("pyworker");
            let (queue_for_worker, dir_path, backend_owned) =
                (queue.clone(), dir.path().to_path_buf(), backend.to_owned());
            let python_worker = tokio::task::spawn_blocking(move || {
                PythonWorker::start(&queue_for_worker, &backend_owned, &dir_path)
            })
            .await
            .unwrap();
            let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::new(AMQP_URL).unwrap());
            let results =
                wasmq::results::connect(backend, Duration::from_secs(3600), AMQP_URL).unwrap();
            let client = Client::new(broker, results).with_default_queue(queue.clone());
            let sum = client
                .send_task(
                    "tasks.add",
                    vec![json!(2), json!(3)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            assert_eq!(sum.get(WAIT).await.unwrap(), json!(5), "{backend}");
            let kw = client
                .send_task(
                    "tasks.add",
                    vec![],
                    json!({"x": 40, "y": 2}).as_object().cloned().unwrap(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            assert_eq!(kw.get(WAIT).await.unwrap(), json!(42), "{backend}");
            let fail = client
                .send_task("tasks.fail", vec![], Map::new(), SendOptions::default())
                .await
                .unwrap();
            match fail.get(WAIT).await {
                Err(GetError::Failed { exception, .. }) => {
                    assert_eq!(exception.exc_type, "ValueError", "{backend}");
                    assert_eq!(
                        exception.exc_message,
                        [json!("bad input"), json!(42)],
                        "{backend}"
                    );
                }
                other => panic!("{backend}: expected ValueError, got {other:?}"),
            }
            drop(python_worker);
            delete(&queue).await;
        }
    });
}

#[test]
fn the_two_element_body_that_crash_loops_python_workers_is_dead_lettered() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("poison");
        let worker = start_worker(&queue, REDIS_URL).await;
        let broker = AmqpBroker::new(AMQP_URL).unwrap();
        let id = format!("poison-{queue}");
        let poison = Envelope {
            headers: json!({"task": "math.add", "id": id, "lang": "py"})
                .as_object()
                .cloned()
                .unwrap(),
            properties: Properties {
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                correlation_id: Some(id.clone()),
                ..Properties::default()
            },
            body: b"[[2, 5], {}]".to_vec(),
        };
        broker.publish(&queue, &poison, None).await.unwrap();
        let backend =
            wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), AMQP_URL).unwrap();
        let meta = backend.wait(&id, WAIT).await.unwrap();
        let exception = meta.exception().unwrap();
        assert_eq!(exception.exc_type, "DecodeError");
        assert!(
            exception.message().contains("got 2 elements"),
            "{exception}"
        );
        // Dead-lettered with the reason, not redelivered in a loop.
        let deadline = Instant::now() + WAIT;
        let dead = loop {
            let dead = broker.dead_letters(&queue, 10).await.unwrap();
            if !dead.is_empty() || Instant::now() > deadline {
                break dead;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].task_id.as_deref(), Some(id.as_str()));
        assert!(
            dead[0].reason.starts_with("malformed message: "),
            "{}",
            dead[0].reason
        );
        assert_eq!(dead[0].envelope.body, b"[[2, 5], {}]");
        // And the worker keeps serving.
        let client =
            Client::new(Arc::new(broker.clone()), backend).with_default_queue(queue.clone());
        let ok = client
            .send_task(
                "math.add",
                vec![json!(1), json!(2)],
                Map::new(),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(ok.get(WAIT).await.unwrap(), json!(3));
        assert_eq!(broker.queue_length(&queue).await.unwrap(), 0);
        worker.stop().await;
        delete(&queue).await;
    });
}

#[test]
fn the_worker_reconnects_when_rabbitmq_drops_its_connections_and_every_task_completes() {
    // Closing every connection disturbs other RabbitMQ tests: run alone.
    let _exclusive = RABBITMQ
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let queue = unique_queue("reconnect");
        let worker = start_worker(&queue, REDIS_URL).await;
        let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::new(AMQP_URL).unwrap());
        let backend =
            wasmq::results::connect(REDIS_URL, Duration::from_secs(3600), AMQP_URL).unwrap();
        let client = Client::new(broker, backend).with_default_queue(queue.clone());
        let mut results = Vec::new();
        for i in 0..40_i64 {
            let r = client
                .send_task(
                    "math.sleep",
                    vec![json!(0.05)],
                    Map::new(),
                    SendOptions::default(),
                )
                .await
                .unwrap();
            results.push(r);
            if i == 10 {
                // Tasks are flowing: drop every connection from the broker side.
                let status = tokio::task::spawn_blocking(|| {
                    Command::new("rabbitmqctl")
                        .args(["close_all_connections", "wasmq interop test"])
                        .stdout(Stdio::null())
                        .status()
                })
                .await
                .unwrap()
                .expect("rabbitmqctl");
                assert!(status.success());
            }
        }
        for r in &results {
            assert_eq!(r.get(Duration::from_secs(60)).await.unwrap(), json!(0.05));
        }
        worker.stop().await;
        delete(&queue).await;
    });
}

/// The HTTP status of `GET path` on `port` of 127.0.0.1, or none while nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Readiness reflects actual consumption: a worker whose broker is unreachable is alive but
/// reports "not consuming" (Celery's silent failure mode) and answers `/readyz` with 503
/// while `/healthz` says it lives; one on RabbitMQ reports consuming and is ready.
#[test]
fn wasmq_status_reports_whether_the_worker_is_actually_consuming() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let status = |file: &std::path::Path| {
        let output = Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .current_dir(dir.path())
            .args(["status", "--status-file"])
            .arg(file)
            .output()
            .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let start = |broker: &str, file: &std::path::Path, queue: &str, metrics: u16| {
        // In the test's folder: the worker keeps its revocations in .wasmq/state/ there,
        // not in the crate directory (bug 2 of issue 11).
        Command::new(env!("CARGO_BIN_EXE_wasmq"))
            .current_dir(dir.path())
            .args([
                "worker",
                "--broker",
                broker,
                "--result-backend",
                REDIS_URL,
                "-Q",
                queue,
                "--name",
                &node(queue),
            ])
            .arg("--plugins")
            .arg(&plugins)
            .arg("--status-file")
            .arg(file)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics}"))
            .env(
                "WASMQ_CACHE_DIR",
                std::env::temp_dir().join("wasmq-test-artifact-cache"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_for = |file: &std::path::Path, code: i32| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (actual, stderr) = status(file);
            if actual == code {
                return stderr;
            }
            assert!(
                Instant::now() < deadline,
                "status stayed {actual}: {stderr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let queue = unique_queue("status");
    let down = dir.path().join("down.json");
    let down_port = free_port();
    let mut unreachable = start(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        &down,
        &queue,
        down_port,
    );
    // Exit 1 also means "no status file yet": wait until the worker has written one (it
    // loads its plugins first, which takes a while on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !down.exists() {
        assert!(Instant::now() < deadline, "the worker wrote no status file");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = wait_for(&down, 1);
    assert!(stderr.contains("not consuming"), "{stderr}");
    assert!(
        unreachable.try_wait().unwrap().is_none(),
        "the worker stays up and keeps retrying"
    );
    assert_eq!(http_status(down_port, "/readyz"), Some(503));
    assert_eq!(http_status(down_port, "/healthz"), Some(200));
    let up = dir.path().join("up.json");
    let up_port = free_port();
    let mut healthy = start(AMQP_URL, &up, &queue, up_port);
    wait_for(&up, 0);
    assert_eq!(http_status(up_port, "/readyz"), Some(200));
    assert_eq!(http_status(up_port, "/healthz"), Some(200));
    // Still not ready: it never reached its broker.
    assert_eq!(http_status(down_port, "/readyz"), Some(503));
    for child in [&mut unreachable, &mut healthy] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    // A stopped worker's status is not "consuming".
    assert_eq!(status(&up).0, 1);
    runtime().block_on(delete(&queue));
}
