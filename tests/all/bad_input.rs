//! Bad input at scale (issue 17): messages no client should send, sent anyway by one that
//! can, end as a clear error or are served — never a worker that crashes on them.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{RABBITMQ, python, python_dir, runtime, unique_queue};

const RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// Publishes `math.add(20, 22)` as Celery's protocol 2 with one more header, `deep`, nested
/// `depth` lists deep: from Python's py-amqp (kombu's transport), on a thread with room for
/// its recursive encoder — a Rust publisher in this process would need the stack this test
/// is about on lapin's I/O thread.
fn publish_with_deep_header(queue: &str, id: &str, depth: usize) {
    let output = Command::new(python())
        .arg(python_dir().join("deep_header.py"))
        .env("DEPTH", depth.to_string())
        .env("QUEUE", queue)
        .env("ID", id)
        .output()
        .expect("run deep_header.py");
    assert!(
        output.status.success(),
        "deep_header.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A header nested 26,000 deep — about as deep as a content header that fits RabbitMQ's
/// default 128 KiB frame can be — used to overflow the stack of lapin's I/O thread and
/// abort the worker process, again after every restart while RabbitMQ redelivered the
/// message. The `wasmq` binary now gives its threads room for it: the task is served, and
/// the worker lives on.
#[test]
fn a_header_nested_26000_deep_is_served_without_crashing_the_worker_process() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let queue = unique_queue("deep-header");
    let id = format!("{queue}-task");
    publish_with_deep_header(&queue, &id, 26_000);
    let node = format!("{queue}@test");
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .current_dir(dir.path())
        .env_remove("RUST_MIN_STACK")
        .args([
            "worker",
            "--broker",
            RABBITMQ_URL,
            "--result-backend",
            REDIS_URL,
        ])
        .args(["--queues", &queue, "--concurrency", "1", "--name", &node])
        .arg("--plugins")
        .arg(dir.path().join("plugins"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let outcome = runtime().block_on(async {
        let backend =
            wasmq::results::connect(REDIS_URL, Duration::from_secs(600), RABBITMQ_URL).unwrap();
        backend.wait(&id, Duration::from_secs(60)).await
    });
    let alive = worker.try_wait().unwrap().is_none();
    let _ = worker.kill();
    let _ = worker.wait();
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    assert!(alive, "the worker died:\n{log}");
    let meta = outcome.unwrap_or_else(|e| panic!("no result: {e}\n{log}"));
    assert_eq!(meta.result, serde_json::json!(42), "{log}");
    runtime().block_on(async {
        let broker = wasmq::broker::connect(RABBITMQ_URL).unwrap();
        let _ = broker.delete_queue(&queue).await;
        let _ = broker.forget_node(&node).await;
    });
}
